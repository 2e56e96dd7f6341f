"""Knobs of a policy, generated from its config dataclass fields (never a hand-written list).

Each init field of ``get_policy(name).config_cls`` becomes one :class:`Knob`: ints and floats become
number boxes, bools check boxes, everything else (``str | None``, tuples, ``Any``) a text box whose
value is a Python literal (the command line's syntax: ``0.2``, ``(0,)``, ``None``; a bare word stays
a string). A blank box means the field's default, so the config class keeps the last word.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

from dcache.registry import get_policy, make_config, policies

__all__ = ["Knob", "knobs_for", "policy_knobs", "options_from_values", "build_config"]


@dataclass(frozen=True)
class Knob:
    policy: str
    name: str
    kind: str  # "int" | "float" | "bool" | "text"
    default: Any
    optional: bool  # the field also accepts None

    @property
    def label(self) -> str:
        return f"{self.policy}: {self.name}"


def _kind(type_text: str) -> tuple[str, bool]:
    """A field annotation (a string under ``from __future__ import annotations``) → (kind, optional)."""
    parts = [p.strip() for p in str(type_text).replace("Optional[", "").rstrip("]").split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    if len(parts) == 1 and parts[0] in ("int", "float", "bool") and not optional:
        return parts[0], False
    return "text", optional


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def knobs_for(policy: str) -> list[Knob]:
    """One knob per init field of the policy's config class, in declaration order."""
    info = get_policy(policy)
    out = []
    for f in dataclasses.fields(info.config_cls):
        if not f.init:
            continue
        kind, optional = _kind(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)))
        out.append(Knob(info.name, f.name, kind, _default(f), optional))
    return out


def policy_knobs(task: str) -> dict[str, list[Knob]]:
    """Every registered policy of ``task`` → its knobs (the registry's order)."""
    return {name: knobs_for(name) for name in policies(task)}


def display_default(knob: Knob) -> Any:
    """The value a UI widget starts with."""
    if knob.kind == "text":
        return "" if knob.default is None else repr(knob.default)
    return knob.default


def _parse(knob: Knob, raw: Any) -> tuple[bool, Any]:
    """(given, value) for one widget value; ``given`` is False when the field keeps its default."""
    if knob.kind == "bool":
        return (bool(raw) != bool(knob.default)), bool(raw)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return False, None
    if knob.kind == "int":
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"{knob.label} must be an integer, got {raw!r}")
        try:
            return True, int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{knob.label} must be an integer, got {raw!r}") from None
    if knob.kind == "float":
        try:
            return True, float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{knob.label} must be a number, got {raw!r}") from None
    text = str(raw).strip()
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return True, text


def options_from_values(knobs: list[Knob], values: list[Any]) -> dict[str, Any]:
    """Widget values (one per knob) → the options that differ from the config's defaults."""
    if len(knobs) != len(values):
        raise ValueError(f"expected {len(knobs)} knob values, got {len(values)}")
    opts = {}
    for knob, raw in zip(knobs, values):
        given, value = _parse(knob, raw)
        # a widget left at its start value passes nothing: the config class keeps its own default
        if given and not (type(value) is type(knob.default) and value == knob.default):
            opts[knob.name] = value
    return opts


def build_config(policy: str, task: str, options: dict[str, Any]) -> Any:
    """A validated config object; bad names, types and ranges raise the registry's ValueError."""
    try:
        return make_config(policy, options, task)
    except TypeError as e:  # a dataclass rejecting a value's type before its own validation
        raise ValueError(f"bad option for policy {policy!r}: {e}") from None
