"""Policy registry: every caching policy registers its config class here under a name.

Policy modules live in ``dcache.schedulers`` (one file per method) and are imported on first use,
so adding a file there is all it takes to make a policy available to ``dcache.accelerate``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["PolicyInfo", "register_policy", "get_policy", "policies", "make_config"]

# A task names the kind of model a policy acts on; `accelerate` only accepts a policy whose task
# matches the object it is given.
TASKS = ("image", "dllm", "ar-video")


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    description: str
    task: str
    granularity: str
    config_cls: type


_POLICIES: dict[str, PolicyInfo] = {}
_loaded = False


def register_policy(
    name: str, *, description: str, task: str = "image", granularity: str = "step"
) -> Callable[[type], type]:
    """Class decorator: register a config dataclass as policy ``name``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def deco(cls: type) -> type:
        if name in _POLICIES and _POLICIES[name].config_cls is not cls:
            raise ValueError(f"policy {name!r} is already registered by {_POLICIES[name].config_cls}")
        _POLICIES[name] = PolicyInfo(name, description, task, granularity, cls)
        cls.policy_name = name
        cls.policy_task = task
        cls.granularity = granularity
        return cls

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import dcache.schedulers as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def get_policy(name: str, task: str | None = None) -> PolicyInfo:
    _load_builtin()
    if not isinstance(name, str):
        raise ValueError(f"a policy name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    info = _POLICIES.get(key)
    accepted = sorted(n for n, p in _POLICIES.items() if task is None or p.task == task)
    if info is None:
        raise ValueError(f"unknown policy {name!r}; accepted: {', '.join(accepted)}")
    if task is not None and info.task != task:
        raise ValueError(
            f"policy {name!r} is for {info.task} models, not {task}; accepted here: {', '.join(accepted)}"
        )
    return info


def policies(task: str | None = None, *, detailed: bool = False) -> dict[str, Any]:
    """Name → one-line description of every registered policy (optionally of one task).

    With ``detailed=True`` each value is ``{"description", "task", "granularity"}`` instead::

        >>> dcache.policies("image", detailed=True)["toca"]["granularity"]
        'token'
    """
    _load_builtin()
    chosen = [(n, p) for n, p in sorted(_POLICIES.items()) if task is None or p.task == task]
    if detailed:
        return {n: {"description": p.description, "task": p.task, "granularity": p.granularity} for n, p in chosen}
    return {n: p.description for n, p in chosen}


def make_config(name: str, options: dict[str, Any], task: str | None = None) -> Any:
    """Build and validate the config of policy ``name`` from keyword options."""
    info = get_policy(name, task)
    fields = {f.name for f in dataclasses.fields(info.config_cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for policy {info.name!r}; accepted: {', '.join(sorted(fields)) or 'none'}"
        )
    return info.config_cls(**options)
