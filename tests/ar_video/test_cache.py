"""Ring buffers, byte accounting and Forcing-KV bookkeeping, checked against brute force."""

import pytest
import torch
import torch.nn.functional as F

from dcache.schedulers._forcing_heads import HeadSplit
from dcache.schedulers._kv_ring import CacheLayout, HeadGroup
from dcache.schedulers.forcing_kv import ForcingKVConfig, ForcingKVCache, select_segments
from dcache.schedulers.kv_full import KVFullConfig
from dcache.schedulers.kv_rolling import KVRollingConfig

T, C, H, D, L = 6, 3, 4, 8, 3  # tokens/frame, chunk frames, heads, head dim, layers


def layout(num_frames=15, dtype=torch.float32, batch=1):
    return CacheLayout(L, H, D, T, C, num_frames, batch, dtype, "cpu")


def frames_pos(frames):
    return torch.cat([torch.arange(f * T, (f + 1) * T) for f in frames]) if frames else torch.empty(0, dtype=torch.long)


def test_ring_order_after_wraparound():
    g = HeadGroup(layout(), None, [("ring", 2 * T)])
    for f in range(7):
        k = torch.full((1, H, T, D), float(f))
        g.append("ring", k, k.clone(), frames_pos([f]))
        r = g.regions["ring"]
        want = frames_pos(list(range(max(0, f - 1), f + 1)))
        assert torch.equal(r.pos[r.chrono_slots()], want)
        kk, _ = g.region_kv("ring", r.chrono_slots())
        assert torch.equal(kk[0, 0, :, 0], (want // T).float())
    # a block larger than the ring keeps only its newest tokens, in order
    big = torch.arange(5 * T, dtype=torch.float32).view(1, 1, -1, 1).expand(1, H, -1, D)
    g.append("ring", big, big, torch.arange(100, 100 + 5 * T))
    r = g.regions["ring"]
    assert torch.equal(r.pos[r.chrono_slots()], torch.arange(100 + 3 * T, 100 + 5 * T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_counts_exact(dtype):
    item = torch.empty((), dtype=dtype).element_size()
    lay = layout(num_frames=15, dtype=dtype, batch=2)
    full = KVFullConfig().build_cache(lay)
    assert full.nbytes() == L * 2 * 2 * H * (15 - C) * T * D * item
    assert full.slot_nbytes() == L * 2 * 2 * H * C * T * D * item
    roll = KVRollingConfig(sink_frames=1, window_frames=4).build_cache(lay)
    assert roll.nbytes() == L * 2 * 2 * H * (1 + 4) * T * D * item
    split = HeadSplit(L, H, [[0], [0, 1, 2], []], [[1, 2, 3], [3], [0, 1, 2, 3]])
    cfg = ForcingKVConfig(sink_frames=1, static_ctx_frames=1, dynamic_ring_frames=2, dynamic_budget_frames=1, num_segments=3)
    fk = ForcingKVCache(lay, cfg, split)
    per_head_static, per_head_dyn = (1 + 1) * T, (1 + 2 + 1) * T
    heads_static = H + 3 + 0  # layer 0 unsplit -> all static
    heads_dyn = 0 + 1 + 4
    assert fk.nbytes() == 2 * 2 * D * item * (heads_static * per_head_static + heads_dyn * per_head_dyn)
    # the full buffer is bigger than the Forcing-KV one by the expected ratio
    assert fk.nbytes() < full.nbytes()


def _drive(cache, n_chunks, seed=0):
    """Feed random K/V chunk by chunk; at every read check each group against masked full attention."""
    g = torch.Generator().manual_seed(seed)
    hist_k = [torch.empty(1, H, 0, D) for _ in range(L)]
    hist_v = [torch.empty(1, H, 0, D) for _ in range(L)]
    for c in range(n_chunks):
        fs = c * C
        for commit in (False, True) if c + 1 < n_chunks else (False,):
            for layer in range(L):
                q, k, v = (torch.randn(1, H, C * T, D, generator=g) for _ in range(3))
                kept = [(grp, grp.positions()) for grp in cache.groups[layer]]
                out = cache.attend(layer, q, k, v, fs, commit)
                K = torch.cat([hist_k[layer], k], 2)
                V = torch.cat([hist_v[layer], v], 2)
                for grp, pos in kept:
                    heads = range(H) if grp.heads is None else grp.heads.tolist()
                    keep = torch.zeros(K.shape[2], dtype=torch.bool)
                    keep[pos] = True
                    keep[fs * T :] = True
                    ref = F.scaled_dot_product_attention(q[:, heads], K[:, heads][:, :, keep], V[:, heads][:, :, keep])
                    assert (out[:, heads] - ref).abs().max() < 1e-5
                if commit:
                    hist_k[layer], hist_v[layer] = K, V
    return hist_k


def test_full_and_rolling_keep_the_right_tokens():
    full = KVFullConfig().build_cache(layout(15))
    _drive(full, 5)
    with pytest.raises(ValueError, match="full"):
        full._commit(0, 12)
    assert torch.equal(full.groups[0][0].positions(), frames_pos(list(range(12))))
    roll = KVRollingConfig(sink_frames=1, window_frames=4).build_cache(layout(15))
    _drive(roll, 5)
    assert torch.equal(roll.groups[1][0].positions(), frames_pos([0, 8, 9, 10, 11]))


def test_forcing_kv_equals_masked_attention_and_bookkeeping():
    split = HeadSplit(L, H, [[0, 1], [0, 2], [3]], [[2, 3], [1, 3], [0, 1, 2]])
    cfg = ForcingKVConfig(sink_frames=1, static_ctx_frames=1, dynamic_ring_frames=1, dynamic_budget_frames=1, num_segments=3)
    cache = ForcingKVCache(layout(15), cfg, split)
    assert len(cache.groups[0]) == 1 and cache.groups[0][0].heads is None  # layer 0 unsplit
    assert [g.kind for g in cache.groups[1]] == ["static", "dynamic"]
    _drive(cache, 4)
    st, dy = cache.groups[1]
    assert torch.equal(st.positions(), frames_pos([0, 8]))  # sink + newest committed frame
    pos = dy.positions()
    sel = dy.regions["selected"]
    assert sel.valid == sel.cap == T  # replaced every commit, never grown past the budget
    assert torch.equal(dy.regions["ring"].pos, frames_pos([8]))
    chosen = sel.pos[: sel.valid]
    assert ((chosen >= 5 * T) & (chosen < 8 * T)).all()  # from the 3 frames that left the ring
    assert len(pos) == 3 * T
    # layers share one selection (same token positions)
    assert torch.equal(cache.groups[2][1].regions["selected"].pos, sel.pos)


def test_selector_picks_exactly_the_changed_segments():
    g = torch.Generator().manual_seed(0)
    P, seg = 3, 2
    base = torch.randn(1, 2, T, D, generator=g)
    frames = [base.clone() for _ in range(4)]
    # candidate frame i differs from frame i+1 only in segment changed[i]
    changed = {0: 2, 2: 1}
    for i in range(3):
        frames[i + 1] = frames[i].clone()
        if i in changed:
            s = changed[i]
            frames[i + 1][:, :, s * seg : (s + 1) * seg] = torch.randn(1, 2, seg, D, generator=g)
    seq = torch.cat(frames, 2)
    idx, _ = select_segments(seq, T, 3, P, max_segments=2)
    want = torch.cat([torch.arange(0 * T + 2 * seg, 0 * T + 3 * seg), torch.arange(2 * T + 1 * seg, 2 * T + 2 * seg)])
    assert torch.equal(idx[0], want)
    # each sample is scored on its own keys (the reference scored batch 0 and reused it for all)
    other = [base.clone() for _ in range(4)]
    for f in (1, 2, 3):  # changes between frames 0 and 1 in segment 0, then stays
        other[f][:, :, :seg] += 5.0
    for f in (2, 3):  # changes between frames 1 and 2 in segment 1, then stays
        other[f][:, :, seg : 2 * seg] -= 5.0
    other = torch.cat(other, 2)
    idx2, _ = select_segments(torch.cat([seq, other], 0), T, 3, P, 2)
    assert torch.equal(idx2[0], want)
    assert torch.equal(idx2[1], torch.cat([torch.arange(0, seg), torch.arange(T + seg, T + 2 * seg)]))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="window_frames"):
        KVRollingConfig(window_frames=0)
    with pytest.raises(ValueError, match="dynamic_ring_frames"):
        ForcingKVConfig(dynamic_ring_frames=0)
    with pytest.raises(ValueError, match="num_segments"):
        ForcingKVCache(layout(), ForcingKVConfig(num_segments=4), HeadSplit(L, H, [[]] * L, [list(range(H))] * L))
    with pytest.raises(ValueError, match="head_file"):
        ForcingKVConfig().build_cache(layout())


def test_num_segments_auto_and_explicit():
    assert ForcingKVConfig().segments_for(1560) == 6  # Wan 480p: 30 x 52 tokens, Forcing-KV's 6
    assert ForcingKVConfig().segments_for(64) == 4 and ForcingKVConfig().segments_for(35) == 5
    assert ForcingKVConfig(num_segments=8).segments_for(64) == 8
    with pytest.raises(ValueError, match="num_segments=8 must divide tokens_per_frame=36"):
        ForcingKVConfig(num_segments=8).segments_for(36)
    with pytest.raises(ValueError, match="num_segments must be an int >= 1"):
        ForcingKVConfig(num_segments=0)
