"""Δ-DiT on tiny random-init diffusers transformers (real pipelines and schedulers).

Which block is cached at which step is checked against the stage rule written out below, and
every reused block output against its own input plus the residual (output − input) that the same
block produced at the last step it ran, for the same guidance branch — all recorded here with
PyTorch hooks, independently of dcache's bookkeeping.
"""

import pytest
import torch

import dcache
from dcache.pipelines.adapters import get_adapter

BLOCK_MODELS = ["flux", "sd3", "pixart", "dit", "qwenimage", "wan", "cogvideox", "hunyuan_video", "ltx"]


def expected_cached(s, T, n, interval=2, boundary=0.5, k=None):
    """Δ-DiT's rule: on non-full steps, the rear k blocks early (s < b·T), the front k late."""
    k = k if k is not None else max(n // 2, 1)
    if s % interval == 0:
        return set()
    return set(range(n - k, n)) if s < round(boundary * T) else set(range(k))


def blocks_of(model):
    adapter = get_adapter(model)
    return adapter, adapter.blocks(model)


class BlockRecorder:
    """Per denoiser call and block: image/text stream in and out, and whether the block's first
    linear layer ran (it does only when the block is really computed)."""

    def __init__(self, model):
        self.adapter, self.blocks = blocks_of(model)
        self.calls = []
        self.handles = [model.register_forward_pre_hook(lambda *a: self.calls.append({}))]
        for i, blk in enumerate(self.blocks):
            spec = self.adapter.spec(blk)
            leaf = next(m for m in blk.modules() if isinstance(m, torch.nn.Linear))
            ran = [0]
            self.handles.append(leaf.register_forward_hook(lambda *a, ran=ran: ran.__setitem__(0, ran[0] + 1)))
            self.handles.append(blk.register_forward_pre_hook(self._pre(i, spec, ran), with_kwargs=True))
            self.handles.append(blk.register_forward_hook(self._post(i, spec, ran)))

    def _pre(self, i, spec, ran):
        def hook(m, args, kw):
            h = kw.get(spec.hidden, args[0] if args else None)
            e = kw.get(spec.encoder) if spec.encoder else None
            if spec.encoder and e is None and len(args) > 1:
                e = args[1]
            self.calls[-1][i] = dict(h=h.clone(), e=None if e is None else e.clone(), ran0=ran[0])
        return hook

    def _post(self, i, spec, ran):
        def hook(m, args, out):
            rec = self.calls[-1][i]
            if len(spec.returns) == 1:
                oh, oe = out, None
            else:
                d = dict(zip(spec.returns, out))
                oh, oe = d["hidden"], d.get("encoder")
            rec.update(oh=oh.clone(), oe=None if oe is None else oe.clone(), ran=ran[0] > rec["ran0"])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def gen(pipe, kw, attr, steps):
    return getattr(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **kw), attr)


def check_reuse(rec, T, branches, **rule):
    n = len(rec.blocks)
    assert len(rec.calls) == T * branches
    last = {}
    for c, blocks in enumerate(rec.calls):
        s, br = divmod(c, branches)
        cached = expected_cached(s, T, n, **rule)
        for i in range(n):
            r = blocks[i]
            assert r["ran"] == (i not in cached), (s, br, i)
            if r["ran"]:
                last[(br, i)] = r
                continue
            f = last[(br, i)]
            torch.testing.assert_close(r["oh"], r["h"] + (f["oh"] - f["h"]), rtol=0, atol=0)
            if r["oe"] is not None and f["oe"] is not None and r["e"] is not None:
                torch.testing.assert_close(r["oe"], r["e"] + (f["oe"] - f["e"]), rtol=0, atol=0)


@pytest.mark.parametrize("name, branches", [("pixart", 1), ("flux_cfg", 2)])
def test_cached_blocks_follow_the_stage_rule_and_reuse_their_own_residual(tiny_pipes, name, branches):
    """pixart batches CFG in one call; Flux with true CFG calls the transformer twice per step."""
    if name == "flux_cfg":
        import tiny

        pipe, kw, attr, _ = tiny.flux(cfg=True)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe, kw, attr, _ = tiny_pipes(name)
    model = pipe.transformer
    T = 6
    rec = BlockRecorder(model)
    try:
        with dcache.accelerated(pipe, "delta-dit", num_cached_blocks=2):
            gen(pipe, kw, attr, T)
    finally:
        rec.remove()
    check_reuse(rec, T, branches, k=2)
    if branches == 2:  # the two branches' residuals differ, so a mix-up would be caught above
        b0, b1 = rec.calls[0][0], rec.calls[1][0]
        assert not torch.allclose(b0["oh"] - b0["h"], b1["oh"] - b1["h"])


def test_options_move_the_boundary_interval_and_group(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    T = 9
    rec = BlockRecorder(pipe.transformer)
    try:
        with dcache.accelerated(pipe, "delta-dit", boundary=0.3, interval=3, num_cached_blocks=1):
            gen(pipe, kw, attr, T)
    finally:
        rec.remove()
    check_reuse(rec, T, 1, interval=3, boundary=0.3, k=1)


@pytest.mark.parametrize("name", BLOCK_MODELS)
def test_every_block_adapter_skips_inner_layers(tiny_pipes, name):
    pipe, kw, attr, inner = tiny_pipes(name)
    calls = [0]
    h = inner.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        gen(pipe, kw, attr, 4)
        plain = calls[0]
        calls[0] = 0
        with dcache.accelerated(pipe, "delta-dit"):
            gen(pipe, kw, attr, 4)
            stats = pipe.dcache.stats()
    finally:
        h.remove()
    # 4 steps: 0 and 2 full, 1 early (the last block is in the rear group: reused), 3 late (runs).
    assert calls[0] * 4 == plain * 3
    assert stats["reused"] > 0


def test_no_state_across_runs_and_disable_is_exact(tiny_pipes):
    pipe, kw, attr, _ = tiny_pipes("flux")
    base = gen(pipe, kw, attr, 5)
    dcache.accelerate(pipe, "delta-dit")
    try:
        a, sa = gen(pipe, kw, attr, 5), pipe.dcache.stats()
        b, sb = gen(pipe, kw, attr, 5), pipe.dcache.stats()
    finally:
        dcache.disable(pipe)
    assert torch.equal(a, b) and sa == sb
    assert not torch.equal(a, base)
    assert torch.equal(gen(pipe, kw, attr, 5), base)


def test_refusals(tiny_pipes):
    sd, _, _, _ = tiny_pipes("sd_unet")
    with pytest.raises(ValueError, match="block chain"):
        dcache.accelerate(sd, "delta-dit")
    flux, _, _, _ = tiny_pipes("flux")
    with pytest.raises(ValueError, match=r"num_cached_blocks must be in \[1, 4\]"):
        dcache.accelerate(flux, "delta-dit", num_cached_blocks=5)
    for bad in (dict(boundary=1.5), dict(interval=0), dict(num_cached_blocks=0), dict(boundary="half")):
        with pytest.raises(ValueError, match="delta-dit"):
            dcache.accelerate(flux, "delta-dit", **bad)
    assert "dcache" not in sd.__dict__ and "dcache" not in flux.__dict__
