"""Per-family adapters: where the blocks are, what they return, which modules are the expensive sites.

Register an adapter for another model class with :func:`register_adapter`.
"""

from __future__ import annotations

from typing import Callable

import torch

from dcache.pipelines.adapters import cogvideox, flux, hunyuan_video, ltx, pixart_dit, qwenimage, sd3, unet, wan
from dcache.pipelines.adapters.base import Adapter, BlockSpec, get_arg

__all__ = ["Adapter", "BlockSpec", "get_adapter", "register_adapter", "supported_models", "get_arg"]

_FACTORIES: dict[str, Callable[[], Adapter]] = {}


def register_adapter(model_class_name: str, factory: Callable[[], Adapter]) -> None:
    """Make ``dcache.accelerate`` accept models of class ``model_class_name``.

    ``factory`` returns an :class:`Adapter` naming the block lists and a :class:`BlockSpec` per block class.
    """
    _FACTORIES[model_class_name] = factory


for _make in (flux.make, sd3.make, pixart_dit.make_pixart, pixart_dit.make_dit, wan.make, hunyuan_video.make,
              cogvideox.make, ltx.make, qwenimage.make, unet.make):
    for _name in _make().model_classes:
        register_adapter(_name, _make)


def supported_models() -> list[str]:
    return sorted(_FACTORIES)


def get_adapter(model: torch.nn.Module) -> Adapter:
    # Walk the MRO so subclasses of a supported model (fine-tunes with extra heads) are accepted.
    for cls in type(model).__mro__:
        if cls.__name__ in _FACTORIES:
            return _FACTORIES[cls.__name__]()
    raise ValueError(
        f"unsupported model class {type(model).__name__}; supported: {', '.join(supported_models())}. "
        "To add one, call dcache.pipelines.adapters.register_adapter(class_name, factory) with an Adapter "
        "naming its block lists and a BlockSpec per block class."
    )
