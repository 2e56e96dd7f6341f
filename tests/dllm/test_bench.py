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
