"""FLOPs per module, measured once per input shape with torch's FlopCounterMode.

The stats report "fraction of denoiser FLOPs avoided": every skipped block or site adds its
measured FLOPs. The count covers the matmul-like ops torch's counter knows (linear, conv, bmm,
attention where the backend reports it), which dominate a transformer's cost.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sig(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (v.shape, v.dtype)
    if isinstance(v, (list, tuple)):
        # Lists of tensors (ControlNet samples): their number and first shape say enough.
        return (len(v), _sig(v[0]) if v else None)
    return None


def signature(args: tuple, kwargs: dict) -> tuple:
    """Key of a FLOP table: shapes and dtypes of the call's tensors (computed on every call: cheap)."""
    return (tuple(_sig(a) for a in args), tuple((k, _sig(v)) for k, v in kwargs.items()))


_TABLES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, FlopTable]]" = weakref.WeakKeyDictionary()


def tables_for(model: torch.nn.Module) -> dict[tuple, "FlopTable"]:
    """The FLOP tables measured on ``model``, by input signature (kept as long as the model lives)."""
    return _TABLES.setdefault(model, {})


class FlopTable:
    """Measured FLOPs by qualified module name, for one input signature."""

    def __init__(self, counts: dict[str, float], root: str) -> None:
        self.counts = counts
        self.total = counts.get(root, 0.0)

    def of(self, name: str) -> float:
        return self.counts.get(name, 0.0)


class _Counter(FlopCounterMode):
    """FlopCounterMode that attributes FLOPs to module objects, not to names.

    Measurement starts inside the denoiser's own forward, where torch's name tracker would only
    see the children, and name them by class (colliding across blocks); identities do not collide.
    """

    def __init__(self) -> None:
        super().__init__(display=False)
        self.stack: list[torch.nn.Module] = []
        self.by_module: dict[int, float] = {}
        self.grand_total = 0.0

    def _count_flops(self, func_packet, out, args, kwargs):  # noqa: ANN001 - torch's signature
        if func_packet in self.flop_registry:
            n = float(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
            self.grand_total += n
            for key in {id(m) for m in self.stack}:
                self.by_module[key] = self.by_module.get(key, 0.0) + n
        return out


def measure(fn: Callable[[], Any], root: torch.nn.Module, names: dict[torch.nn.Module, str]) -> tuple[Any, FlopTable]:
    """Run ``fn`` (a call of ``root``) under the counter; return its output and FLOPs by module name."""
    counter = _Counter()
    counter.stack.append(root)  # ``fn`` runs inside root's forward, after root's own pre-hooks
    # The module hooks are process-wide while the dispatch mode is per thread: a forward running
    # in another thread (a second request in a server) must not land on this thread's stack.
    owner = threading.get_ident()

    def pre(module: torch.nn.Module, args: Any) -> None:
        if threading.get_ident() == owner:
            counter.stack.append(module)

    def post(module: torch.nn.Module, args: Any, out: Any) -> None:
        if threading.get_ident() == owner and counter.stack and counter.stack[-1] is module:
            counter.stack.pop()

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post)
    try:
        with counter:
            out = fn()
    finally:
        h1.remove()
        h2.remove()
    counts = {name: counter.by_module.get(id(m), 0.0) for m, name in names.items()}
    table = FlopTable(counts, "")
    table.total = counter.grand_total
    return out, table
