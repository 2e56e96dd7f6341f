"""Cost of one generation (FLOPs, peak memory) and speedups that never mix timing sessions."""

from __future__ import annotations

import statistics
from typing import Any, Callable

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_pass", "speedup"]


class _LiveBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors created inside the mode (one count per storage).

    Every op's outputs pass through here; a storage is counted once however many views share
    it, and released when the last tensor seen on it is freed. Weights and inputs that existed
    before are not counted, which is what "peak memory of a generation" should mean.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # data_ptr -> [tensors alive, bytes]
        self.live = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        ent = self.refs.get(ptr)
        if ent is None:
            return
        ent[0] -= 1
        if ent[0] == 0:
            self.live -= ent[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            try:
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
            except (RuntimeError, NotImplementedError):
                continue
            if ptr == 0:
                continue
            ent = self.refs.get(ptr)
            if ent is None:
                self.refs[ptr] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            else:
                ent[0] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def count_pass(fn: Callable[[], Any], device: str) -> tuple[float, int | None]:
    """Run ``fn`` once under torch's FLOP counter and a memory probe → (FLOPs, peak bytes).

    FLOPs are counted at the dispatcher, so a module whose forward a cache replaced (dcache's,
    diffusers', cache-dit's) counts only when its matmuls really run. CPU SDPA has no FLOP formula
    in torch, so attention is not in the count there (the linear layers dominate these models).
    Peak memory: CUDA's allocator peak above what was allocated before; on CPU the peak of live
    bytes of tensors created during the call (:class:`_LiveBytes`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        torch.cuda.synchronize(dev)
        return float(counter.get_total_flops()), int(torch.cuda.max_memory_allocated(dev) - base)
    probe = _LiveBytes()
    with FlopCounterMode(display=False) as counter, probe, torch.no_grad():
        fn()
    return float(counter.get_total_flops()), int(probe.peak)


def speedup(base: dict[int, dict], other: dict[int, dict]) -> dict[str, Any]:
    """Speedup of ``other`` over ``base`` from per-sample records keyed by sample index.

    Only pairs timed in the same session (one invocation of the command) enter the ratio; a
    sample generated before a kill and its partner after the resume are not comparable (the
    machine, its load and the warm-up differ). With no same-session pair the row gets no
    speedup and says why.
    """
    pairs = [(base[i]["wall_s"], other[i]["wall_s"]) for i in sorted(set(base) & set(other))
             if base[i]["session"] == other[i]["session"]]
    mixed = len(set(base) & set(other)) - len(pairs)
    sessions = {r["session"] for r in list(base.values()) + list(other.values())}
    out: dict[str, Any] = {"timed_pairs": len(pairs), "timing_sessions": len(sessions)}
    if not pairs:
        out.update(speedup=None, timing_note="no baseline sample timed in the same session; rerun in a new --out to time it")
        return out
    b, o = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    ratios = [p[0] / p[1] for p in pairs]
    out.update(speedup=b / o, speedup_median=statistics.median(ratios),
               speedup_spread=(min(ratios), max(ratios)))
    if mixed:
        out["timing_note"] = f"{mixed} pair(s) timed across a resume left out of the ratio"
    return out
