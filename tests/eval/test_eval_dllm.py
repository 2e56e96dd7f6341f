"""`dcache eval --task dllm`: JSONL outputs, exact-match accuracy and token agreement, checked by hand."""

import json

import pytest
import torch

from dcache.cli import main as cli


def test_dllm_eval_rows_and_jsonl(tmp_path):
    from dcache.pipelines.dllm import scripts_task as task

    out = tmp_path / "d"
    assert cli(["eval", "--task", "dllm", "--gen-length", "64", "--block-length", "32", "--num-samples", "3",
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
            prompts, mask, _ = task.make_problems(1, gen_length=64, seed=x["seed"])
            tokens = torch.tensor([x["tokens"]])
            # several valid answers per prompt: correctness is valid_rows, not equality with one answer
            correct.append(bool(task.valid_rows(tokens, prompts, mask)[0]))
            assert x["correct"] == correct[-1] and x["output"] == task.render(tokens[0])
            assert x["prompt"] == task.render(prompts[0][mask[0]])
            assert 2 <= len(x["answers"]) <= 3 and (task.render(tokens[0]) in x["answers"]) == correct[-1]
        assert r["task"] == pytest.approx(sum(correct) / 3) and r["task_metric"] == "exact_match"
        same = sum(a == b for x, y in zip(mine, base) for a, b in zip(x["tokens"], y["tokens"]))
        assert r["token_agreement"] == pytest.approx(same / (3 * 64))
    assert rows[0]["task"] == 1.0  # the reference model solves its task at gen length 64
    assert rows[1]["computed_fraction"] < 0.5  # the dual cache reuses most K/V at this threshold


def test_dllm_valid_answers_are_the_valid_rows():
    from dcache.eval.targets import dllm_valid_answers
    from dcache.pipelines.dllm import scripts_task as task

    prompts, mask, answers = task.make_problems(16, gen_length=64, seed=3)
    for i in range(16):
        valid = dllm_valid_answers(prompts[i], mask[i], 64)
        n = len(valid)
        assert n == int(((prompts[i] >= 50) & (prompts[i] < 54) & mask[i]).sum())
        assert task.valid_rows(valid, prompts[i:i + 1].expand(n, -1), mask[i:i + 1].expand(n, -1)).all()
        assert (valid == answers[i]).all(1).any()  # the answer make_problems drew is one of them
