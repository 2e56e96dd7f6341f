"""Every bad input is one line on stderr and exit code 2, found before any model runs."""

import json
import os

import pytest
import torch

from dcache.cli import main as cli

BAD_EVAL = [
    (["--policy", "nope"], "unknown policy 'nope'; accepted: "),  # the list's head moves as policies are added
    (["--policy", "taylorseer(interval=4"], "unclosed '('"),
    (["--policy", "static;fbcache"], "not ';'"),
    (["--policy", "taylorseer(intervl=3)"], "unknown option(s) ['intervl'] for policy 'taylorseer'; accepted:"),
    (["--policy", "taylorseer", "--option", "interval=-2"], "interval must be in [1, inf], got -2"),
    (["--policy", "static,fbcache", "--option", "interval=2"], "--option applies to a single --policy"),
    (["--model", "./no-such-pipeline"], "--model './no-such-pipeline': no such directory"),
    (["--weights-dir", "/no/such/dir"], "--weights-dir '/no/such/dir' does not exist"),
    (["--out", "{file}"], "is a file, not a directory"),
    (["--out", "/proc/dcache-eval-out"], "is not writable"),
    (["--steps", "-3"], "--steps must be an integer >= 1, got -3"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--guidance", "-1"], "--guidance must be a number >= 0, got -1"),
    (["--num-samples", "0"], "--num-samples must be an integer >= 1"),
    (["--device", "banana"], "--device 'banana' is not a device; accepted: cpu, cuda, cuda:N, mps"),
    (["--seeds", "1,x"], "--seeds must be integers or ranges like 0-9"),
    (["--seeds", "1,1"], "repeats a seed"),
    (["--sweep", "teacache.threshold"], "write policy.option=v1,v2"),
    (["--sweep", "teacache.threshld=0.1,0.2"], "unknown option(s) ['threshld'] for policy 'teacache'"),
    (["--sweep", "nope.x=1,2"], "unknown policy 'nope'"),
    (["--fid"], "--fid needs Inception weights: pass --inception-weights PATH, or put weights-inception-2015-12-05"),
    (["--clip-model", "/no/such/openai-clip"], "--clip-model '/no/such/openai-clip'"),
    (["--prompts", "/no/such/prompts.txt"], "--prompts '/no/such/prompts.txt' is not a file"),
    (["--prompts", "{empty}"], "holds no prompts"),
    (["--pareto-metric", "fid"], "--pareto-metric fid needs --fid"),
    (["--pareto-metric", "beauty"], "--pareto-metric 'beauty'; accepted: psnr"),
    (["--task", "audio"], "--task 'audio'; accepted: image"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--task", "ar-video", "--policy", "taylorseer"], "policy 'taylorseer' is for image models, not ar-video"),
    (["--task", "ar-video", "--peers"], "--peers is not available for --task ar-video yet"),
    (["--task", "dllm", "--gen-length", "30", "--block-length", "16"], "--gen-length 30 must be a multiple of --block-length 16"),
    (["--task", "dllm", "--policy", "kv-rolling"], "policy 'kv-rolling' is for ar-video models, not dllm"),
    (["--task", "dllm", "--guidance", "3"], "--guidance does not apply to --task dllm"),
    (["--task", "ar-video", "--vbench", "subject_consistency"], "--vbench needs --vbench-python PATH. VBench needs its own"),
    (["--task", "ar-video", "--vbench", "beauty"], "unknown dimension(s) ['beauty']; accepted on custom videos:"),
    (["--vbench", "subject_consistency"], "--vbench scores videos: use it with --task ar-video"),
    (["--task", "ar-video", "--steps", "4"], "--steps does not apply to --task ar-video"),
    # diffusers pipelines, video ones in particular (read from model_index.json, nothing loaded)
    (["--model", "{notpipe}"], "is not a diffusers pipeline directory (no model_index.json)"),
    (["--model", "{nodenoiser}", "--prompt", "a cat"], "(WanPipeline) has no transformer or unet; dcache caches the denoiser"),
    (["--model", "{nofolder}", "--prompt", "a cat"], "model_index.json names a transformer but the folder transformer/ is missing"),
    (["--model", "{wan}"], "(WanPipeline) takes prompts: pass --prompt TEXT (repeatable) or --prompts FILE"),
    (["--model", "{wan_noenc}", "--prompt", "a cat"], "(WanPipeline) has no text_encoder/tokenizer, so prompts cannot be encoded"),
    (["--model", "{flux}", "--prompt", "a cat", "--num-frames", "9"], "--num-frames applies to video pipelines; --model"),
    (["--model", "{wan}", "--prompt", "a cat", "--num-frames", "-3"], "--num-frames must be an integer >= 1, got -3"),
    (["--model", "{wan}", "--prompt", "a cat", "--height", "0"], "--height must be an integer >= 1, got 0"),
    (["--num-frames", "9"], "--num-frames applies to a diffusers pipeline --model, not the embedded"),
    (["--model", "{wan}", "--prompt", ""], "--prompt must not be empty"),
    (["--prompt", "a cat", "--prompts", "{empty}"], "give --prompt TEXT or --prompts FILE / --classes, not both"),
    (["--model", "{flux}", "--prompt", "a cat", "--vbench", "subject_consistency"], "--vbench scores videos"),
    (["--task", "dllm", "--height", "16"], "--height does not apply to --task dllm"),
]
try:  # image-reward 1.5 does not import with transformers 5 (dcache/eval/image_reward.py)
    import ImageReward  # noqa: F401
except Exception:  # noqa: BLE001
    BAD_EVAL.append((["--image-reward"], "--image-reward takes ImageReward-v1.0 (the default) or a path to an "
                     "ImageReward .pt checkpoint, and needs the image-reward package importable:"))
if not torch.cuda.is_available():
    BAD_EVAL.append((["--device", "cuda"], "--device 'cuda' is unavailable: torch sees no CUDA GPU here"))

BAD_OTHER = [
    (["bench", "--policies", "nope"], "dcache bench", "unknown policy 'nope'"),
    (["bench", "--policies", "taylorseer(interval=0)"], "dcache bench", "interval must be in [1, inf]"),
    (["bench", "--task", "audio"], "dcache bench", "--task 'audio'; accepted: ar-video, dllm, image"),
    (["bench", "--out", "{file}"], "dcache bench", "is a file"),
    (["bench", "--model", "./nowhere"], "dcache bench", "no such directory"),
    (["bench", "--threads", "-1"], "dcache bench", "--threads must be an integer >= 1"),
    (["bench", "--task", "ar-video", "--policies", "kv-full;kv-rolling"], "dcache bench", "not ';'"),
    (["bench", "--task", "ar-video", "--policies", "taylorseer"], "dcache bench", "not ar-video"),
    (["policies", "--task", "audio"], "dcache policies", "invalid choice: 'audio'"),
    (["frobnicate"], "dcache frobnicate", "unknown command 'frobnicate'; accepted: bench, eval, demo, policies"),
]


def _pipeline_dir(root, name, index, folders=()):
    """A directory holding only a model_index.json (and empty component folders): enough for the
    checks that must refuse before anything is loaded."""
    d = root / name
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps(index))
    for f in folders:
        (d / f).mkdir()
    return d


def _fill(args, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    e = tmp_path / "empty.txt"
    e.write_text("\n \n")
    wan = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
           "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    dirs = {
        "notpipe": tmp_path / "not-a-pipeline",
        "nodenoiser": _pipeline_dir(tmp_path, "no-denoiser", {**wan, "transformer": [None, None]}, ["vae"]),
        "nofolder": _pipeline_dir(tmp_path, "no-folder", wan, ["vae"]),
        "wan": _pipeline_dir(tmp_path, "wan", wan, ["transformer", "vae", "text_encoder", "tokenizer"]),
        "wan_noenc": _pipeline_dir(tmp_path, "wan-noenc", {**wan, "text_encoder": [None, None], "tokenizer": [None, None]},
                                   ["transformer", "vae"]),
        "flux": _pipeline_dir(tmp_path, "flux", {"_class_name": "FluxPipeline", "transformer": ["diffusers",
                              "FluxTransformer2DModel"], "text_encoder": ["transformers", "CLIPTextModel"],
                              "tokenizer": ["transformers", "CLIPTokenizer"]}, ["transformer"]),
    }
    dirs["notpipe"].mkdir()
    return [a.format(file=f, empty=e, **dirs) for a in args]


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("args, needle", BAD_EVAL, ids=[" ".join(a) for a, _ in BAD_EVAL])
def test_bad_eval_input_is_one_line_and_exit_2(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no Inception weights there
    out = tmp_path / "out"
    argv = ["eval", "--num-samples", "2", "--out", str(out)] + _fill(args, tmp_path)
    assert cli(argv) == 2
    line = _one_line(capsys)
    assert line.startswith("dcache eval: error: ") and needle in line, line
    assert not (out / "samples").exists()  # refused before anything was generated


@pytest.mark.parametrize("args, prog, needle", BAD_OTHER, ids=[" ".join(a) for a, _, _ in BAD_OTHER])
def test_bad_bench_and_policies_input(args, prog, needle, tmp_path, capsys):
    assert cli(_fill(args, tmp_path)) == 2
    line = _one_line(capsys)
    assert line.startswith(f"{prog}: error: ") and needle in line, line


def test_class_out_of_range_is_refused_before_generation(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(["eval", "--model", "digits", "--classes", "3,12", "--steps", "2", "--out", str(out)]) == 2
    assert "--classes 12 is out of range; this model draws classes 0..9" in _one_line(capsys)
    assert not (out / "samples").exists()


def test_version_and_help(capsys):
    import dcache

    assert cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dcache {dcache.__version__}"
    assert cli(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: 50; images only)" in text and "(default: 8)" in text and "examples:" in text and "--sweep teacache.threshold" in text


def test_policies_by_task(capsys):
    assert cli(["policies", "--task", "ar-video"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.strip().splitlines()}
    import dcache

    assert names == set(dcache.policies("ar-video")) and "taylorseer" not in names
