"""`dcache eval --task dllm`: JSONL outputs, exact-match accuracy and token agreement, checked by hand."""

import json

import pytest

from dcache.cli import main as cli


def test_dllm_eval_rows_and_jsonl(tmp_path):
    from dcache.pipelines.dllm import tasks

    out = tmp_path / "d"
    assert cli(["eval", "--task", "dllm", "--gen-length", "32", "--block-length", "16", "--num-samples", "3",
                "--threads", "1", "--policy", "dual-cache(threshold=0.5)", "--seeds", "5,6,7", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["baseline", "dual-cache"]
    lines = {r["id"]: [json.loads(x) for x in open(out / "samples" / f"{r['id']}.jsonl")] for r in rows}
    base = lines["baseline"]
    assert [x["seed"] for x in base] == [5, 6, 7]
    for r in rows:
        mine = lines[r["id"]]
        correct = []
        for x in mine:
            _, answer = tasks.make_problems(1, gen_length=32, n_range=(24, 32), seed=x["seed"])
            correct.append(x["tokens"] == answer[0].tolist())
            assert x["correct"] == correct[-1] and x["output"] == tasks.render(answer.new_tensor(x["tokens"]))
        assert r["task"] == pytest.approx(sum(correct) / 3) and r["task_metric"] == "exact_match"
        same = sum(a == b for x, y in zip(mine, base) for a, b in zip(x["tokens"], y["tokens"]))
        assert r["token_agreement"] == pytest.approx(same / (3 * 32))
    assert rows[1]["computed_fraction"] < 0.5  # the dual cache reuses most K/V at this threshold
