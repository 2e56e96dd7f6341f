import json

import torch

from dcache.cli import main as cli_main
from dcache.pipelines.dllm import tasks
from dcache.pipelines.dllm.config import LLaDAConfig
from dcache.pipelines.dllm.modeling import LLaDAModelLM


def test_bench_writes_rows_for_every_policy(tmp_path, capsys):
    torch.manual_seed(0)
    model = LLaDAModelLM(LLaDAConfig(vocab_size=tasks.VOCAB, mask_token_id=tasks.MASK, eos_token_id=tasks.EOS,
                                     pad_token_id=tasks.EOS))
    model.save_pretrained(str(tmp_path / "m"))
    out = tmp_path / "out"
    rc = cli_main(["bench", "--task", "dllm", "--model", str(tmp_path / "m"), "--batch-sizes", "2",
                   "--gen-lengths", "16", "--block-length", "8", "--problems", "2",
                   "--policies", "vanilla", "dkv-decode", "dual-cache+parallel", "elastic", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in rows] == ["vanilla", "dkv-decode", "dual-cache+parallel", "elastic"]
    for r in rows:
        assert {"policy", "accuracy", "tokens_per_s", "speedup", "nfe"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_s"] > 0
    assert rows[0]["speedup"] == 1.0 and rows[0]["nfe"] == 16
    assert rows[1]["token_fraction"] < 1.0
    assert "dkv-decode" in capsys.readouterr().out


def test_issue_targets_check_speed_and_accuracy():
    from dcache.eval.bench_dllm import issue_targets

    def row(p, acc, sp, L=128):
        return {"policy": p, "gen_length": L, "batch": 8, "accuracy": acc, "speedup": sp}

    rows = [row("vanilla", 0.95, 1.0), row("dual-cache+parallel", 0.945, 5.0), row("dkv-decode", 0.94, 2.0),
            row("vanilla", 0.5, 1.0, L=64), row("dkv-decode", 0.5, 9.0, L=64)]
    got = {t["check"]: t["pass"] for t in issue_targets(rows)}
    assert got == {"dual-cache+parallel": True, "dkv-decode": False}  # dkv lost a point; only L=128 counts
    rows[1]["speedup"] = 3.9
    assert not issue_targets(rows)[0]["pass"]
