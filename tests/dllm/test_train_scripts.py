"""train_scripts: ``--init`` continues from the given weights; bad length / evaluation specs are refused."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from dcache.eval.bench_dllm import default_model_dir
from dcache.pipelines.dllm import scripts_task as task
from dcache.pipelines.dllm import train_scripts


def _shipped() -> str:
    path = default_model_dir("llada")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip("llada reference weights not shipped in this checkout")
    return path


def test_init_loads_the_given_weights(tmp_path):
    src = _shipped()
    common = ["--family", "llada", "--max-steps", "0", "--final-evals", "64:2"]
    assert train_scripts.main(common + ["--init", src, "--out", str(tmp_path / "cont")]) == 0
    assert train_scripts.main(common + ["--out", str(tmp_path / "fresh")]) == 0
    ref = load_file(os.path.join(src, "model.safetensors"))
    cont = load_file(str(tmp_path / "cont" / "model.safetensors"))
    fresh = load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert ref.keys() == cont.keys() == fresh.keys()
    assert all(torch.equal(ref[k], cont[k]) for k in ref)
    assert not all(torch.equal(ref[k], fresh[k]) for k in ref)
    # the loaded model solves the task, a fresh one does not; the earlier stages are kept in the record
    rec = json.loads((tmp_path / "cont" / "training.json").read_text())
    assert rec["history"][-1]["acc_gen64"] == 1.0 and rec["args"]["init"] == src
    old = json.loads(open(os.path.join(src, "training.json")).read())
    assert len(rec["previous_runs"]) == len(old.get("previous_runs", [])) + 1
    assert json.loads((tmp_path / "fresh" / "training.json").read_text())["history"][-1]["acc_gen64"] == 0.0


@pytest.mark.parametrize("flag,value,msg", [("--lengths", "short:0.5,1024:0.4", "sum to 1"),
                                            ("--lengths", "long:1", "--lengths takes"),
                                            ("--evals", "60:8", "multiple of 32"),
                                            ("--init", "/nonexistent", "model.safetensors")])
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, flag, value, msg):
    with pytest.raises(SystemExit) as e:
        train_scripts.main(["--out", str(tmp_path / "x"), flag, value])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_length_mix_is_sampled_as_given():
    g = torch.Generator().manual_seed(0)
    mix = train_scripts.parse_lengths("short:0.25,1024:0.75")
    gens = [train_scripts.batch(3072, g, 1024, mix)[0].shape[1] - task.PROMPT_MAX for _ in range(400)]
    long = sum(x == 1024 for x in gens) / len(gens)
    assert 0.65 < long < 0.85 and all(24 <= x <= 128 or x == 1024 for x in gens)


class _Recorder(torch.nn.Module):
    """Wraps a model and keeps the token canvases it is run on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []
        self.logits_shift = model.logits_shift

    def forward(self, ids, *a, **kw):
        self.seen.append(ids.clone())
        return self.model(ids, *a, **kw)


@pytest.mark.parametrize("last_share", [0.0, 1.0])
def test_block_loss_runs_on_a_clean_prefix_a_partly_masked_block_and_a_masked_suffix(last_share):
    torch.manual_seed(0)
    model = _Recorder(train_scripts.build("llada")[0])
    g = torch.Generator().manual_seed(3)
    x, am, plen = train_scripts.batch(3072, g, 256, train_scripts.parse_lengths("256:1"))
    starts = set()
    for _ in range(12):
        loss = train_scripts.block_loss_fn(model, x, am, plen, g, last_share=last_share)
        canvas = model.seen[-1]
        masked = canvas == task.MASK
        assert torch.equal(canvas[~masked], x[~masked]) and not masked[:, :plen].any()
        first = int(masked.any(0).nonzero()[0])  # the block's start: every answer slot before it is clean
        s = plen + (first - plen) // 32 * 32
        assert masked[:, s + 32:].all() and not masked[:, :s].any()
        assert 0 < masked[:, s:s + 32].sum() <= masked[:, s:s + 32].numel()
        starts.add(s)
        assert torch.isfinite(loss) and loss > 0
    assert starts == {plen + 256 - 32} if last_share == 1.0 else len(starts) > 2
    loss.backward()
    assert all(p.grad is not None for p in model.model.parameters() if p.requires_grad)


def test_last_block_probe_scores_the_shipped_model_and_fails_a_broken_one():
    from dcache.pipelines.dllm.modeling import LLaDAModelLM

    model = LLaDAModelLM.from_pretrained(_shipped())
    assert train_scripts.evaluate(model, 8, 64, threshold=train_scripts.LAST) == 1.0
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.0)  # uniform logits: the greedy choice is token 0, never the answer
    assert train_scripts.evaluate(model, 8, 64, threshold=train_scripts.LAST) == 0.0
    assert train_scripts.parse_evals("1024:8@last,64:4@0.9") == ((1024, 8, "last"), (64, 4, 0.9))
    assert train_scripts._eval_key(1024, "last") == "acc_gen1024_last"


@pytest.mark.parametrize("args", [["--stale-frac", "0.7", "--block-frac", "0.5"], ["--block-frac", "-0.1"]])
def test_loss_shares_must_fit_in_one(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        train_scripts.main(["--out", str(tmp_path / "x")] + args)
    assert e.value.code == 2 and "summing to at most 1" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_the_three_losses_read_each_familys_logits_at_the_slot_they_predict(family):
    # the shipped weights solve the task, so every loss is near zero on fresh problems, and only if
    # Dream's logits are read one slot to the left (unshifted, its losses are above 10)
    from dcache.pipelines.dllm.modeling import DreamModel, LLaDAModelLM

    path = default_model_dir(family)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip(f"{family} reference weights not shipped in this checkout")
    model = (LLaDAModelLM if family == "llada" else DreamModel).from_pretrained(path).eval()
    x, am, plen = train_scripts.batch(3072, torch.Generator().manual_seed(0), 256, train_scripts.parse_lengths("256:1"))
    with torch.no_grad():
        for fn in (train_scripts.loss_fn, train_scripts.block_loss_fn, train_scripts.stale_cache_loss_fn):
            assert fn(model, x, am, plen, torch.Generator().manual_seed(1)).item() < 0.1, fn.__name__
