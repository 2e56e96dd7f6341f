import pytest
import torch

import dcache
from dcache.pipelines.dllm.generate import dream_generate, llada_generate, pad_prompts

from .conftest import RAGGED

POLICIES = [
    ("dkv", dict(variant="decode", refresh_interval=4)),
    ("dkv", dict(variant="prefill")),
    ("dkv", dict(variant="pd", refresh_interval=4)),
    ("prefix-cache", dict(threshold=0.5)),
    ("dual-cache", dict(threshold=0.5)),
    ("prefix-cache", dict(threshold=None)),
    ("dual-cache", dict(threshold=None)),
    ("elastic", dict(gamma=0.9, threshold=None)),
    ("elastic", dict(gamma=0.5, threshold=0.5, track_num=2)),
]


def _gen(model, **kw):
    if model.logits_shift:
        return model.generate(RAGGED, max_new_tokens=16, steps=16, block_length=8, **kw)
    return model.generate(RAGGED, gen_length=16, block_length=8, steps=16, **kw)


def _well_formed(model, out):
    ids, am = pad_prompts(RAGGED, model.config.pad_token_id)
    assert out.sequences.shape == (3, 16)
    assert not (out.sequences == model.mask_token_id).any()
    assert int(out.sequences.min()) >= 0 and int(out.sequences.max()) < model.config.vocab_size
    assert torch.equal(out.canvas[:, : ids.shape[1]][am], ids[am])  # prompt untouched


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_vanilla_batched_ragged_rows_match_single_rows(which, llada, dream):
    model = llada if which == "llada" else dream
    out = _gen(model)
    _well_formed(model, out)
    for i, p in enumerate(RAGGED):
        kw = dict(max_new_tokens=16) if model.logits_shift else dict(gen_length=16)
        one = model.generate([p], steps=16, block_length=8, **kw)
        assert torch.equal(one.sequences[0], out.sequences[i])


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_refresh_interval_one_reproduces_vanilla(which, llada, dream):
    model = llada if which == "llada" else dream
    base = _gen(model)
    dcache.accelerate(model, policy="dkv", variant="decode", refresh_interval=1)
    out = _gen(model)
    assert torch.equal(out.sequences, base.sequences)
    assert model.dcache.stats()["full_forwards"] == out.nfe
    dcache.disable(model)


def test_greedy_interval_one_reproduces_vanilla_random_remasking(llada):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    base = llada.generate(RAGGED, gen_length=16, block_length=8, steps=16, remasking="random", generator=g())
    dcache.accelerate(llada, policy="dkv", variant="greedy", refresh_interval=1)
    out = llada.generate(RAGGED, gen_length=16, block_length=8, steps=16, remasking="random", generator=g())
    assert torch.equal(out.sequences, base.sequences)
    dcache.disable(llada)


@pytest.mark.parametrize("which", ["llada", "dream"])
@pytest.mark.parametrize("policy,opts", POLICIES)
def test_every_policy_well_formed_on_ragged_batch(which, policy, opts, llada, dream):
    model = llada if which == "llada" else dream
    dcache.accelerate(model, policy=policy, **opts)
    out = _gen(model)
    _well_formed(model, out)
    st = model.dcache.stats()
    assert st["policy"] == policy and st["runs"] == 1
    # a cache policy must actually skip work: fewer token-forwards than nfe full canvases
    assert st["cached_forwards"] > 0 and st["token_fraction_computed"] < 1.0
    model.dcache.reset()
    assert model.dcache.stats()["nfe"] == 0
    dcache.disable(model)
    assert not hasattr(model, "dcache")


def test_dkv_greedy_well_formed_and_skips_masks(llada):
    dcache.accelerate(llada, policy="dkv", variant="greedy", refresh_interval=2, window_size=1)
    out = llada.generate(RAGGED, gen_length=16, block_length=8, steps=16, remasking="random",
                         generator=torch.Generator().manual_seed(0))
    _well_formed(llada, out)
    assert llada.dcache.stats()["token_fraction_computed"] < 0.7
    dcache.disable(llada)


def test_dkv_decode_cached_step_uses_stale_decoded_kv(llada):
    """A cached dKV step must equal a full forward in which decoded tokens keep the K/V computed when
    the cache was built: check by comparing against a model whose prompt/decoded K/V are frozen."""
    from dcache.pipelines.dllm.modeling import KVCache

    ids = torch.randint(0, 100, (2, 10))
    x0 = ids.clone()
    x0[:, 6:] = 120  # masks
    cache = KVCache()
    llada(x0, cache=cache)
    x1 = x0.clone()
    x1[:, 6] = 7  # decoded at the previous step: recomputed, not yet cached
    valid = x0 != 120
    active = (~valid).nonzero()[:, 1].view(2, -1)
    out = llada(x1, active=active, cache=cache, key_mask=valid).logits
    # reference: the decoded positions' K/V come from x0 while everything else sees x1. Because the
    # model is bidirectional that is not a plain forward on either canvas:
    full1 = llada(x1).logits[:, 6:]
    full0 = llada(x0).logits[:, 6:]
    assert not torch.allclose(out, full1, atol=1e-4)  # stale K/V really are reused
    assert not torch.allclose(out, full0, atol=1e-4)  # and fresh ones are computed
    # the cached rows of the buffer still hold the K/V of x0
    ref = KVCache()
    llada(x0, cache=ref)
    torch.testing.assert_close(cache.k[1][:, :, :6], ref.k[1][:, :, :6])


def test_threshold_parallel_decoding_reduces_steps(llada):
    base = llada.generate(RAGGED, gen_length=16, block_length=8, steps=16)
    dcache.accelerate(llada, policy="dual-cache", threshold=0.05)
    out = llada.generate(RAGGED, gen_length=16, block_length=8, steps=16)
    assert out.nfe < base.nfe
    dcache.disable(llada)


def test_streaming_callback_sees_every_commit(llada):
    seen = []
    out = llada.generate(RAGGED, gen_length=16, block_length=8, steps=8,
                         callback=lambda step, toks, committed: seen.append(committed.sum(1)))
    assert len(seen) == out.steps == 8
    assert torch.equal(torch.stack(seen).sum(0), torch.full((3,), 16))


def test_temperature_sampling_is_seeded(llada, dream):
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = llada.generate(RAGGED, gen_length=16, block_length=8, steps=16, temperature=1.0, generator=g())
    b = llada.generate(RAGGED, gen_length=16, block_length=8, steps=16, temperature=1.0, generator=g())
    assert torch.equal(a.sequences, b.sequences)
    c = llada.generate(RAGGED, gen_length=16, block_length=8, steps=16)
    assert not torch.equal(a.sequences, c.sequences)
    d = dream.generate(RAGGED, max_new_tokens=16, steps=16, temperature=0.7, top_p=0.9, top_k=20,
                       alg="entropy", generator=g())
    _well_formed(dream, d)


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_dream_algs_well_formed(alg, dream):
    out = dream.generate(RAGGED, max_new_tokens=16, steps=8, alg=alg, generator=torch.Generator().manual_seed(0))
    _well_formed(dream, out)


def test_bad_inputs_raise(llada, dream):
    with pytest.raises(ValueError, match="multiple of block_length"):
        llada.generate(RAGGED, gen_length=20, block_length=8, steps=20)
    with pytest.raises(ValueError, match="remasking"):
        llada.generate(RAGGED, gen_length=16, block_length=8, steps=16, remasking="topk")
    with pytest.raises(ValueError, match="alg"):
        dream.generate(RAGGED, max_new_tokens=16, steps=16, alg="nope")
    with pytest.raises(ValueError, match="variant"):
        dcache.accelerate(llada, policy="dkv", variant="nope")
    with pytest.raises(ValueError, match="refresh_interval"):
        dcache.accelerate(llada, policy="dkv", refresh_interval=0)
    with pytest.raises(ValueError, match="threshold"):
        dcache.accelerate(llada, policy="dual-cache", threshold=1.5)
    with pytest.raises(ValueError, match="gamma"):
        dcache.accelerate(llada, policy="elastic", gamma=0)
    with pytest.raises(ValueError, match="accepted.*dkv"):
        dcache.accelerate(llada, policy="taylorseer")
    dcache.accelerate(llada, policy="dkv", variant="greedy")
    with pytest.raises(ValueError, match="random"):
        llada.generate(RAGGED, gen_length=16, block_length=8, steps=16)
    dcache.disable(llada)
    with pytest.raises(ValueError, match="prompts"):
        llada.generate([], gen_length=16, block_length=8, steps=16)


def test_policy_argument_without_accelerate(llada):
    from dcache.schedulers.dkv import DKVConfig

    base = llada_generate(llada, RAGGED, gen_length=16, block_length=8, steps=16)
    out = llada_generate(llada, RAGGED, gen_length=16, block_length=8, steps=16,
                         policy=DKVConfig(refresh_interval=1))
    assert torch.equal(base.sequences, out.sequences)
    assert dream_generate  # exported


def _naive_cached_step(model, x1, active, stale_k, stale_v, valid):
    """Hand-written reference of one dKV cached step for one row: active tokens see fresh K/V for
    themselves and the stale (pre-RoPE) K/V of cached positions; nothing else."""
    import torch.nn.functional as F

    cfg = model.config
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    L = x1.shape[0]
    pos = torch.arange(L).float()
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)

    def rope(t, p):  # t: (n, H, D)
        c, s = ang[p].cos()[:, None], ang[p].sin()[:, None]
        return t * c + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * s

    keys_pos = [j for j in range(L) if valid[j] or j in active]
    h = model._embed()(x1[active])
    for li, p in enumerate(model._layer_parts()):
        x = p.norm1(h)
        q = p.q(x).view(-1, nh, hd)
        k_new = p.k(x).view(-1, nh, hd)
        v_new = p.v(x).view(-1, nh, hd)
        ks, vs = [], []
        for j in keys_pos:
            if j in active:
                ks.append(k_new[active.index(j)])
                vs.append(v_new[active.index(j)])
            else:
                ks.append(stale_k[li][:, j])
                vs.append(stale_v[li][:, j])
        K = rope(torch.stack(ks), keys_pos)
        V = torch.stack(vs)
        Q = rope(q, active)
        w = torch.einsum("qhd,khd->hqk", Q, K) / hd ** 0.5
        a = torch.einsum("hqk,khd->qhd", w.softmax(-1), V).reshape(len(active), -1)
        h = h + p.o(a)
        x = p.norm2(h)
        h = h + p.down(F.silu(p.gate(x)) * p.up(x))
    return model._head()(model._final_norm()(h))


def test_dkv_cached_step_matches_hand_written_reference(llada):
    from dcache.pipelines.dllm.modeling import KVCache

    torch.manual_seed(1)
    x0 = torch.randint(0, 100, (2, 12))
    x0[0, 7:] = 120
    x0[1, 5:] = 120
    cache = KVCache()
    llada(x0, cache=cache)
    stale_k = [k.clone() for k in cache.k]
    stale_v = [v.clone() for v in cache.v]
    x1 = x0.clone()
    x1[0, 8] = 3   # decoded last step: recomputed now, not yet cached
    x1[1, 5] = 4
    valid = x0 != 120
    from dcache.pipelines.dllm.runtime import mask_to_index

    idx = mask_to_index(~valid)  # ragged: row 0 has 5 active, row 1 has 7
    out = llada(x1, active=idx, cache=cache, key_mask=valid).logits
    for b in range(2):
        act = [int(i) for i in idx[b] if i < 12]
        ref = _naive_cached_step(llada, x1[b], act, [k[b] for k in stale_k], [v[b] for v in stale_v], valid[b])
        torch.testing.assert_close(out[b, : len(act)], ref, rtol=1e-4, atol=1e-4)
