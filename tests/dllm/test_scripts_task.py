import inspect
import json

import pytest
import torch

import dcache
from dcache.pipelines.dllm import scripts_task as task
from dcache.pipelines.dllm.config import DreamConfig, LLaDAConfig
from dcache.pipelines.dllm.generate import dream_generate, llada_generate
from dcache.pipelines.dllm.modeling import LLaDAModelLM

from .conftest import LLADA_TINY, RAGGED


def test_problems_have_the_documented_layout_and_answers_are_valid():
    prompts, mask, ans = task.make_problems(64, gen_length=40, seed=3)
    assert prompts.shape == (64, task.PROMPT_MAX) and ans.shape == (64, 40)
    for r in range(64):
        row = prompts[r][mask[r]].tolist()
        assert row[0] == task.BOS and row[-1] == task.SEP and row[-18] == task.SEP
        marks = row[1:-18]
        assert 2 <= len(marks) <= 3 and marks == sorted(marks)
        msg = row[-17:-1]
        script = int(ans[r, 0]) // 10
        assert task.MARK0 + script - 1 in marks  # the answer's script is an allowed one
        assert [int(t) for t in ans[r]] == [10 * script + msg[i % 16] for i in range(40)]
    assert bool(task.valid_rows(ans, prompts, mask).all())
    # both scripts of a 2-script prompt occur over many draws: several valid answers per prompt
    seen = {int(a) // 10 for a in task.make_problems(200, 16, seed=1, n_allowed=(2,))[2][:, 0]}
    assert len(seen) == 4


def test_validity_rejects_mixed_wrong_and_disallowed_scripts():
    prompts, mask, ans = task.make_problems(4, gen_length=32, seed=0, n_allowed=(2,))
    msg = prompts[:, -17:-1]
    allowed = [sorted({int(t) - task.MARK0 + 1 for t in prompts[r][mask[r]] if task.MARK0 <= t < task.MARK0 + 4})
               for r in range(4)]
    other = [a[1] if int(ans[r, 0]) // 10 == a[0] else a[0] for r, a in enumerate(allowed)]
    mixed = ans.clone()
    mixed[0, 20] = 10 * other[0] + msg[0, 20 % 16]          # one token in the other allowed script
    wrong = ans.clone()
    wrong[1, 5] = 10 * (int(ans[1, 5]) // 10) + (int(msg[1, 5]) + 1) % 10   # wrong digit
    banned = ans.clone()
    bad = next(s for s in range(1, 5) if s not in allowed[2])
    banned[2] = 10 * bad + msg[2, torch.arange(32) % 16]   # consistent, but a script not allowed
    for gen, r in ((mixed, 0), (wrong, 1), (banned, 2)):
        ok = task.valid_rows(gen, prompts, mask)
        assert not ok[r] and int(ok.sum()) == 3
    assert task.script_mix(mixed) == 0.25 and task.script_mix(ans) == 0.0
    with pytest.raises(ValueError, match="same rows"):
        task.valid_rows(ans[:2], prompts, mask)


@pytest.mark.parametrize("key,value", [("scale_logits", True), ("input_emb_norm", True),
                                       ("layer_norm_type", "default"), ("activation_type", "gelu"),
                                       ("alibi", True), ("rope", False), ("clip_qkv", 8.0)])
def test_llada_config_refuses_options_it_does_not_implement(key, value, tmp_path):
    with pytest.raises(ValueError, match=key):
        LLaDAConfig.from_dict({**LLADA_TINY, key: value})
    # the official defaults of the same keys load
    LLaDAConfig.from_dict({**LLADA_TINY, "scale_logits": False, "input_emb_norm": False, "layer_norm_type": "rms",
                           "activation_type": "silu", "alibi": False, "rope": True, "clip_qkv": None})
    cfg = LLaDAConfig(**LLADA_TINY).to_dict()
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=key):
        LLaDAModelLM.from_pretrained(str(tmp_path))


def test_dream_config_refuses_rope_scaling():
    with pytest.raises(ValueError, match="rope_scaling"):
        DreamConfig.from_dict({"rope_scaling": {"type": "yarn", "factor": 4.0}})
    DreamConfig.from_dict({"rope_scaling": None, "use_sliding_window": False})


def test_dream_sampler_defaults_are_the_official_generation_config():
    # Dream-org/Dream-v0-Instruct-7B generation_config.json: temperature 0.0, top_p null, top_k null, eps 0.001
    d = {k: p.default for k, p in inspect.signature(dream_generate).parameters.items()}
    assert d["temperature"] == 0.0 and d["top_p"] is None and d["top_k"] is None and d["eps"] == 1e-3


def test_sliding_window_of_one_decodes_left_to_right(llada):
    order = []
    out = llada_generate(llada, RAGGED, gen_length=16, block_length=16, steps=16, window_length=1,
                         callback=lambda s, toks, committed: order.append(committed.float().argmax(1)))
    assert out.steps == 16
    assert torch.equal(torch.stack(order), torch.arange(16)[:, None].expand(16, 3))
    with pytest.raises(ValueError, match="block_length=gen_length"):
        llada_generate(llada, RAGGED, gen_length=16, block_length=8, steps=16, window_length=4)


def test_prompt_longer_than_the_context_is_refused_before_generation(llada):
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        llada_generate(llada, [[1] * 60], gen_length=16, block_length=8, steps=16)


@pytest.mark.parametrize("policy", ["prefix-cache", "dual-cache"])
def test_block_caches_refreshed_every_step_equal_vanilla(policy, llada, dream):
    # block length 1: every step starts a block, so every step is a full forward (the exact case)
    for model in (llada, dream):
        kw = dict(max_new_tokens=8) if model.logits_shift else dict(gen_length=8)
        base = model.generate(RAGGED, block_length=1, steps=8, **kw)
        dcache.accelerate(model, policy=policy, threshold=None)
        try:
            out = model.generate(RAGGED, block_length=1, steps=8, **kw)
            assert model.dcache.stats()["cached_forwards"] == 0
        finally:
            dcache.disable(model)
        assert torch.equal(out.sequences, base.sequences)


def test_elastic_trigger_refreshes_from_the_next_layer(llada):
    from dcache.schedulers.elastic import ElasticConfig

    def run(gamma):
        dcache.accelerate(llada, policy="elastic", gamma=gamma, threshold=None)
        try:
            out = llada.generate(RAGGED, gen_length=16, block_length=16, steps=16, window_length=4)
            return out, llada.dcache.stats()
        finally:
            dcache.disable(llada)

    out, st = run(1.0)  # attention never stays exactly identical: every cached step triggers at layer 0
    assert st["partial_refreshes"] == st["cached_forwards"] > 0
    # recomputing layers 1.. is less than a full forward and more than the active tokens alone
    _, st_never = run(1e-6)
    assert st_never["partial_refreshes"] == 0
    assert st_never["token_fraction_computed"] < st["token_fraction_computed"] < 1.0
    planner = ElasticConfig(gamma=1.0).make_planner()
    assert planner.widen(0) is False  # nothing triggered yet
