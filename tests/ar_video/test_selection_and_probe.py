"""Per-sample segment selection, the selection controls, the attention-mass probe, given first
chunks, and the occlusion world's data, each checked against an independent computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from dcache.schedulers._forcing_heads import HeadSplit
from dcache.schedulers._kv_probe import AttentionMassProbe
from dcache.schedulers._kv_ring import CacheLayout
from dcache.schedulers.forcing_kv import ForcingKVCache, ForcingKVConfig, select_segments
from dcache.schedulers.kv_full import KVFullConfig
from dcache.schedulers.kv_rolling import KVRollingConfig

T, C, H, D, L = 6, 3, 4, 8, 3
SPLIT = HeadSplit(L, H, [[0, 1], [0, 2], [3]], [[2, 3], [1, 3], [0, 1, 2]])


def layout(batch=2, num_frames=15):
    return CacheLayout(L, H, D, T, C, num_frames, batch, torch.float32, "cpu")


def drive(cache, n_chunks, batch, seed=0, same_samples=False):
    """Random K/V chunk by chunk; at every read each sample of each group must equal masked full
    attention over *that sample's* retained tokens. Returns the per-layer committed keys."""
    g = torch.Generator().manual_seed(seed)
    hist_k = [torch.empty(batch, H, 0, D) for _ in range(L)]
    hist_v = [torch.empty(batch, H, 0, D) for _ in range(L)]
    for c in range(n_chunks):
        fs = c * C
        for commit in (False, True) if c + 1 < n_chunks else (False,):
            for layer in range(L):
                q, k, v = (torch.randn(1 if same_samples else batch, H, C * T, D, generator=g).expand(batch, -1, -1, -1).contiguous()
                           for _ in range(3))
                groups = cache.groups[layer] if hasattr(cache, "groups") else []
                kept = [(grp, [grp.positions(b) for b in range(batch)]) for grp in groups]
                out = cache.attend(layer, q, k, v, fs, commit)
                K, V = torch.cat([hist_k[layer], k], 2), torch.cat([hist_v[layer], v], 2)
                for grp, pos in kept:
                    heads = range(H) if grp.heads is None else grp.heads.tolist()
                    for b in range(batch):
                        keep = torch.zeros(K.shape[2], dtype=torch.bool)
                        keep[pos[b]] = True
                        keep[fs * T :] = True
                        ref = F.scaled_dot_product_attention(q[b : b + 1, heads], K[b : b + 1, heads][:, :, keep], V[b : b + 1, heads][:, :, keep])
                        assert (out[b : b + 1, heads] - ref).abs().max() < 1e-5
                if commit:
                    hist_k[layer], hist_v[layer] = K, V
    return hist_k


def test_selection_differs_across_samples_whose_content_differs():
    cfg = ForcingKVConfig(num_segments=3)
    cache = ForcingKVCache(layout(batch=2), cfg, SPLIT)
    drive(cache, 5, batch=2)
    sel = cache.groups[1][1].regions["selected"]
    assert sel.pos_b is not None and sel.pos_b.shape == (2, sel.cap)
    assert not torch.equal(sel.pos_b[0], sel.pos_b[1])  # different keys -> different segments
    # every sample's choice is what the selector picks on that sample alone
    same = ForcingKVCache(layout(batch=2), cfg, SPLIT)
    drive(same, 5, batch=2, same_samples=True)
    s2 = same.groups[1][1].regions["selected"]
    assert torch.equal(s2.pos_b[0], s2.pos_b[1])  # identical samples choose alike
    # layers share one selection per sample
    assert torch.equal(cache.groups[2][1].regions["selected"].pos_b, sel.pos_b)


def test_random_selection_is_seeded_and_is_not_lowest():
    def run(**kw):
        cache = ForcingKVCache(layout(batch=1), ForcingKVConfig(num_segments=3, **kw), SPLIT)
        drive(cache, 5, batch=1, seed=3)
        return cache.groups[1][1].regions["selected"].pos.clone()

    assert torch.equal(run(selection="random", seed=1), run(selection="random", seed=1))
    draws = {tuple(run(selection="random", seed=s).tolist()) for s in range(6)}
    assert len(draws) > 1
    assert not torch.equal(run(selection="lowest"), run(selection="highest"))


def test_keep_selected_lets_an_old_change_stay():
    """A segment that changed a lot long ago stays with keep_selected=True, is replaced otherwise."""
    lay = CacheLayout(2, H, D, T, C, 15, 1, torch.float32, "cpu")
    split = HeadSplit(2, H, [[0, 1]] * 2, [[2, 3]] * 2)
    base = torch.randn(1, H, T, D, generator=torch.Generator().manual_seed(0))

    def frames_for(c):  # 3 frames of the chunk at frame c*3; frame 2 flips segment 0 once
        out = []
        for f in range(c * C, c * C + C):
            x = base.clone()
            if f >= 2:
                x[:, :, :2] = -base[:, :, :2]
            out.append(x + 0.01 * f)  # small drift elsewhere: high similarity
        return torch.cat(out, 2)

    def run(keep):
        cache = ForcingKVCache(lay, ForcingKVConfig(num_segments=3, dynamic_budget_frames=1, keep_selected=keep), split)
        for c in range(4):
            k = frames_for(c)
            for layer in range(2):
                cache.attend(layer, k, k, k, c * C, commit=True)
        return cache.groups[1][1].regions["selected"].pos

    # the flip between frames 1 and 2 makes frame 1's segment 0 (tokens 6, 7) the most changed
    assert {6, 7} <= set(run(True).tolist())
    assert not {6, 7} & set(run(False).tolist())


def test_probe_mass_equals_an_independent_softmax():
    lay = layout(batch=1)
    full = AttentionMassProbe(KVFullConfig().build_cache(lay))
    drive(full, 4, batch=1)
    assert full.stats()["attn_mass_kept"] == pytest.approx(1.0) and full.stats()["history_mass_kept"] == pytest.approx(1.0)
    # kv-rolling(window 1): one call, by hand
    roll = AttentionMassProbe(KVRollingConfig(sink_frames=1, window_frames=1).build_cache(lay))
    g = torch.Generator().manual_seed(5)
    ks = []
    for c in range(3):
        k = torch.randn(1, H, C * T, D, generator=g)
        for layer in range(L):
            roll.attend(layer, k, k, k, c * C, commit=True)
        ks.append(k)
    q = torch.randn(1, H, C * T, D, generator=g)
    k = torch.randn(1, H, C * T, D, generator=g)
    before = (roll._kept, roll._hist_kept, roll._hist_total, roll._n)
    roll.attend(0, q, k, k, 9, commit=False)
    Kall = torch.cat(ks + [k], 2)
    p = torch.softmax(q @ Kall.transpose(-1, -2) / math.sqrt(D), -1)
    kept_idx = torch.cat([torch.arange(0, T), torch.arange(8 * T, 9 * T), torch.arange(9 * T, 12 * T)])  # sink, frame 8, chunk
    want = p[..., kept_idx].sum(-1).mean()
    assert roll._kept - before[0] == pytest.approx(float(want), abs=1e-5)
    want_hist = p[..., kept_idx[: 2 * T]].sum() / p[..., : 9 * T].sum()
    assert (roll._hist_kept - before[1]) / (roll._hist_total - before[2]) == pytest.approx(float(want_hist), abs=1e-5)


def test_recency_bias_per_sample_rows_equal_single_rows():
    from dcache.pipelines.ar_video.attention import RecencyBias

    rb = RecencyBias([[3.0, 1.0]], sink_frames=1)
    qf = torch.tensor([6, 6, 7])
    kf = torch.tensor([[0, 2, 5, 6], [0, 3, 4, 7]])
    both = rb(0, None, qf, kf, torch.float32)
    assert both.shape == (2, 2, 3, 4)
    for b in range(2):
        assert torch.equal(both[b : b + 1], rb(0, None, qf, kf[b], torch.float32))


def test_given_first_chunk_is_committed_like_a_generated_one(pipe, emb):
    """The output starts with the given chunk; every later forward equals a dense block-causal
    forward over (given chunk, generated history, current chunk)."""
    from dcache.pipelines.ar_video.pipeline import block_causal_frame_mask

    given = torch.randn(1, 4, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    pipe.trace = []
    out = pipe(emb, num_frames=9, seed=0, context_frames=given)
    assert torch.equal(out.latents[:, :, :3], given)
    first = pipe.trace[0]
    assert first["commit"] and first["frame_start"] == 0 and torch.equal(first["x"], given)
    clean = torch.cat([t["x"] for t in pipe.trace if t["commit"]], 2)
    for t in pipe.trace[1:]:
        fs = t["frame_start"]
        x = torch.cat([clean[:, :, :fs], t["x"]], 2)
        sig = torch.cat([torch.zeros(1, fs), torch.full((1, 3), t["sigma"])], 1)
        v = pipe.forward_dense(x, sig, emb, frame_mask=block_causal_frame_mask(fs + 3, 3))[:, :, fs:]
        assert (v - t["v"]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="context_frames must be"):
        pipe(emb, num_frames=9, seed=0, context_frames=given[:, :, :2])
    with pytest.raises(ValueError, match="context_frames must be"):
        pipe(emb, num_frames=3, seed=0, context_frames=given)


def test_occlusion_world_hides_and_returns_the_digit():
    from dcache.pipelines.ar_video import occlusion as occ

    lat, prompts, px = occ.make_batch(6, 30, torch.Generator().manual_seed(0))
    assert lat.shape == (6, 4, 30, 12, 12) and px.shape == (6, 1, 30, 24, 24)
    returned = 0
    for b, (speed, height, direction) in enumerate(prompts):
        v = px[b, 0]
        bar = (v == occ.BAR_VALUE).all(-1)  # [F, rows] covered by the bar
        assert (bar.sum(-1) == height).all()
        top = bar.float().argmax(-1)  # first covered row per frame
        assert int(top[1] - top[0]) == speed * direction or int(top[0]) in (0, 24 - height)  # moves as told unless bouncing
        scene = v[1]
        assert v[0].sum() < scene.sum()  # the digit is not in the sink frame
        for f in range(1, 30):  # wherever the bar is not, the frame is the scene of frame 1
            free = ~bar[f] & ~bar[1]
            assert torch.equal(v[f][free], scene[free])
        # some row of the digit is hidden, then seen again: what reappears is what was seen
        for r in range(24):
            hidden = bar[1:, r].nonzero()
            if len(hidden) and not bar[1, r] and scene[r].max() > 0.6 and int(hidden[-1]) + 2 < 30:
                returned += 1
    assert returned > 0
    assert occ.prompt_embeds(prompts).shape == (6, 3, 32)
    with pytest.raises(ValueError, match="speed in"):
        occ.prompt_embeds([(3, 6, 1)])
