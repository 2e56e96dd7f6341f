"""dcache: training-free caching for diffusion models.

>>> import dcache
>>> pipe = dcache.accelerate(pipe, policy="taylorseer")     # doctest: +SKIP
>>> image = pipe(prompt_embeds=..., num_inference_steps=50)  # doctest: +SKIP
>>> pipe.dcache.stats()                                      # doctest: +SKIP
>>> dcache.disable(pipe)                                     # doctest: +SKIP

Objects that are not diffusers denoisers (the diffusion-LLM models and the autoregressive video
pipeline in ``dcache.pipelines``) take part through a small protocol: they define
``_dcache_task`` (a task name from :data:`dcache.registry.TASKS`),
``_dcache_accelerate(configs: list) -> None`` and ``_dcache_disable() -> None``, and expose a
``dcache`` attribute with ``stats()`` and ``reset()`` while accelerated.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from dcache.registry import make_config, policies, register_policy

__version__ = "0.1.0"
__all__ = ["accelerate", "disable", "accelerated", "policies", "register_policy", "resolve_policy"]


def resolve_policy(policy: Any, options: dict[str, Any], task: str | None = None) -> list[Any]:
    """Turn a policy name, config object or list of either into a list of validated configs.

    With a single name, ``options`` are that policy's config fields. With a list, ``options`` may
    hold one dict per policy name (``taylorseer={"interval": 4}``).
    """
    items = policy if isinstance(policy, (list, tuple)) else [policy]
    if not items:
        raise ValueError("policy list is empty; give at least one policy name or config")
    single = not isinstance(policy, (list, tuple))
    configs, used = [], set()
    for item in items:
        if isinstance(item, str):
            if single:
                opts = dict(options)
                used.update(options)
            else:
                key = item.strip().lower().replace("_", "-")
                opts = options.get(key, options.get(item, {}))
                if not isinstance(opts, dict):
                    raise ValueError(f"options for policy {item!r} must be a dict, got {type(opts).__name__}")
                used.update(k for k in (key, item) if k in options)
            configs.append(make_config(item, opts, task))
        elif getattr(type(item), "policy_name", None):
            if task is not None and type(item).policy_task != task:
                raise ValueError(f"policy {type(item).policy_name!r} is for {type(item).policy_task} models, not {task}")
            configs.append(item)
        else:
            raise ValueError(
                f"policy must be a name, a policy config object or a list of them, got {type(item).__name__}; "
                f"names: {', '.join(policies(task))}"
            )
    unused = sorted(set(options) - used)
    if unused:
        raise ValueError(f"options {unused} were not used by any of the policies {[type(c).policy_name for c in configs]}")
    grans = [c.granularity for c in configs]
    dup = sorted({g for g in grans if grans.count(g) > 1})
    if dup:
        raise ValueError(f"one policy per granularity; {dup} given more than once")
    return configs


def accelerate(obj: Any, policy: Any = "taylorseer", **options: Any) -> Any:
    """Install caching on a diffusers pipeline, a bare denoiser, or a dcache dLLM/AR-video object.

    Returns the same object. ``policy`` is a name from :func:`dcache.policies`, a config object, or
    a list (one per granularity). Options are the policy's config fields.

    Example::

        pipe = dcache.accelerate(pipe, policy="taylorseer", interval=4, order=2)
        pipe = dcache.accelerate(pipe, policy="teacache", threshold=0.4)
    """
    if hasattr(obj, "_dcache_accelerate"):
        configs = resolve_policy(policy, options, getattr(obj, "_dcache_task", None))
        obj._dcache_accelerate(configs)
        return obj
    from dcache.engine import install

    configs = resolve_policy(policy, options, "image")
    return install(obj, configs)


def disable(obj: Any) -> Any:
    """Remove every dcache hook; the object behaves exactly as before ``accelerate``."""
    if hasattr(obj, "_dcache_disable"):
        obj._dcache_disable()
        return obj
    from dcache.engine import uninstall

    return uninstall(obj)


@contextlib.contextmanager
def accelerated(obj: Any, policy: Any = "taylorseer", **options: Any) -> Iterator[Any]:
    """``with dcache.accelerated(pipe, policy="fbcache"): pipe(...)`` — disabled again on exit."""
    accelerate(obj, policy, **options)
    try:
        yield obj
    finally:
        disable(obj)
