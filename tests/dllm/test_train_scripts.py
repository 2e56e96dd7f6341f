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
