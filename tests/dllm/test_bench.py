import json

import pytest
import torch

import dcache
from dcache.cli import main as cli_main
from dcache.eval import bench_dllm
from dcache.pipelines.dllm import scripts_task as task
from dcache.pipelines.dllm.config import LLaDAConfig
from dcache.pipelines.dllm.modeling import LLaDAModelLM


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    model = LLaDAModelLM(LLaDAConfig(vocab_size=task.VOCAB, mask_token_id=task.MASK, eos_token_id=task.EOS,
                                     pad_token_id=task.PAD, max_sequence_length=128))
    model.save_pretrained(str(tmp_path / "m"))
    return str(tmp_path / "m")


def test_bench_rows_separate_schedules_and_effects(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["bench", "--task", "dllm", "--model", tiny_dir, "--batch-sizes", "2", "--gen-lengths", "16",
                   "--block-length", "8", "--problems", "2", "--accuracy-batch", "2", "--repeats", "2",
                   "--policies", "dkv(variant=decode,refresh_interval=4),dual-cache,elastic",
                   "--ablations", "one-shot,frozen-cache", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    got = [(r["schedule"], r["row"]) for r in rows]
    for sch in ("block8", "block8+thr0.9"):
        for name in ("vanilla", "dkv(variant='decode',refresh_interval=4)", "dual-cache", "elastic"):
            assert (sch, name) in got
    assert ("block8", "one-shot") in got and ("block8", "frozen-cache") in got
    by = {(r["schedule"], r["row"]): r for r in rows}
    van = by[("block8", "vanilla")]
    assert van["nfe"] == 16 and van["total_speedup"] == 1.0 and van["repeats"] == 2
    dual = by[("block8", "dual-cache")]
    assert dual["nfe"] == 16  # same schedule as vanilla: the same number of steps
    assert 0 < dual["cached_steps"] < 1 and dual["token_fraction"] < 1
    assert {"cache_speedup", "cache_bound", "total_speedup", "work_ratio", "flag", "spread"} <= set(dual)
    assert "parallel_speedup" in by[("block8+thr0.9", "vanilla")]
    assert "partial_refreshes" in by[("block8", "elastic")]
    assert by[("block8", "one-shot")]["nfe"] == 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["threads"] == 1 and meta["repeats"] == 2
    assert "dual-cache" in capsys.readouterr().out


def test_bench_accepts_exactly_the_registered_dllm_policies(tiny_dir, tmp_path):
    from dcache.eval.policy_spec import parse_policies

    names = sorted(dcache.policies(task="dllm"))
    assert names == ["dkv", "dual-cache", "elastic", "prefix-cache"]
    assert [n for n, _ in parse_policies(",".join(names + ["vanilla"]), task="dllm", extra_names=("vanilla",))] \
        == names + ["vanilla"]
    for bad, msg in (("taylorseer", "accepted"), ("dual-cache(threshold=0.5)", "--thresholds"),
                     ("dkv(variant=nope)", "variant")):
        with pytest.raises(SystemExit, match=msg):
            bench_dllm.main(["--model", tiny_dir, "--policies", bad, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="multiple of --block-length"):
        bench_dllm.main(["--model", tiny_dir, "--gen-lengths", "20", "--block-length", "8", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="ablation"):
        bench_dllm.main(["--model", tiny_dir, "--ablations", "nope", "--out", str(tmp_path / "x")])


def _row(sched, row, kind, acc, nfe=256, tf=None):
    return {"gen_length": 256, "batch": 8, "schedule": sched, "row": row, "kind": kind, "accuracy": acc}


def test_summary_flags_speedups_that_no_saved_compute_explains():
    Schedule, Row = bench_dllm.Schedule, bench_dllm.Row
    fixed = Schedule(32)
    rows = [Row("vanilla", "vanilla", fixed), Row("dual-cache", "policy", fixed, policy=("dual-cache", {}))]
    acc = {0: {"accuracy": 1.0, "nfe": 256, "token_fraction": 1.0}, 1: {"accuracy": 1.0, "nfe": 256, "token_fraction": 0.25}}

    class A:
        block_length = 32

    for t_dual, flagged in ((2.0, False), (1.0, True)):  # 8 s -> 2 s is 4x (bound 4x); 8x exceeds it
        times = {0: [8.0, 8.0], 1: [t_dual, t_dual]}
        work = {0: (256, 1.0), 1: (256, 0.25)}
        out = bench_dllm._summarise(rows, acc, times, work, 256, 8, A)
        assert out[1]["cache_bound"] == 4.0
        assert ("cache>1/token_fraction" in out[1]["flag"]) is flagged


def test_issue_targets_need_speed_and_accuracy():
    rows = [dict(_row("block32", "vanilla", "vanilla", 0.95)),
            dict(_row("block32", "dual-cache", "policy", 0.95), cache_speedup=2.5),
            dict(_row("block32+thr0.9", "dual-cache", "policy", 0.93), total_speedup=12.0)]
    got = {t["check"]: t["pass"] for t in bench_dllm.issue_targets(rows)}
    assert got == {"dual-cache own speedup": True, "dual-cache + threshold 0.9 total": False}  # lost 2 points
    rows[1]["cache_speedup"] = 1.9
    assert not bench_dllm.issue_targets(rows)[0]["pass"]
    rows[1]["cache_speedup"] = 9.0
    for r in rows:
        r["accuracy"] = 0.0  # a model that fails the task cannot pass a target at "equal accuracy"
    assert not any(t["pass"] for t in bench_dllm.issue_targets(rows))


def test_accuracy_pass_counts_as_a_timing_round(tiny_dir, tmp_path, monkeypatch):
    calls: dict[tuple[str, str, int], int] = {}
    real = bench_dllm._generate

    def counting(model, row, prompts, mask, gen_len):
        key = (row.schedule.name, row.label, gen_len)
        calls[key] = calls.get(key, 0) + 1
        return real(model, row, prompts, mask, gen_len)

    monkeypatch.setattr(bench_dllm, "_generate", counting)
    common = ["--model", tiny_dir, "--gen-lengths", "16", "--block-length", "8", "--problems", "2",
              "--accuracy-batch", "2", "--repeats", "3", "--policies", "dual-cache", "--ablations", "one-shot",
              "--thresholds", "none"]
    bench_dllm.main(common + ["--batch-sizes", "2", "--out", str(tmp_path / "a")])
    plain = dict(calls)
    calls.clear()
    bench_dllm.main(common + ["--batch-sizes", "2", "--accuracy-as-round", "--ablation-problems", "1",
                              "--out", str(tmp_path / "b")])
    # one accuracy pass + 3 rounds, against one accuracy pass that is round 1 + 2 rounds
    assert plain[("block8", "dual-cache", 16)] == 4 and calls[("block8", "dual-cache", 16)] == 3
    assert plain[("block8", "vanilla", 16)] == 4 and calls[("block8", "vanilla", 16)] == 3
    assert calls[("block8", "one-shot", 16)] == 1  # ablations are never timed
    rows = {r["row"]: r for r in json.loads((tmp_path / "b" / "results.json").read_text())}
    assert rows["dual-cache"]["repeats"] == 3 and rows["vanilla"]["repeats"] == 3
    assert rows["one-shot"]["problems"] == 1 and rows["dual-cache"]["problems"] == 2
    # the accuracy of the two runs is the same computation
    a = {r["row"]: r["accuracy"] for r in json.loads((tmp_path / "a" / "results.json").read_text())}
    assert a["dual-cache"] == rows["dual-cache"]["accuracy"] and a["vanilla"] == rows["vanilla"]["accuracy"]
    with pytest.raises(SystemExit, match="ablation-problems"):
        bench_dllm.main(common + ["--ablation-problems", "5", "--out", str(tmp_path / "c")])
