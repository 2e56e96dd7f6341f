"""The one policy-list syntax of every dcache command line: ``name,name(key=value,...),...``.

``a+b(k=v)`` composes policies on one model (one per granularity, e.g. ``taylorseer+fastercache``);
its options are then per part: ``("a+b", {"a": {}, "b": {"k": v}})``.

Shared by ``dcache bench`` (every task), ``dcache eval`` and the demo, so a list that works in one
works in all. Values are Python literals (``0.2``, ``True``, ``"fp16"``, ``(1, 2)``); a bare word
that is not a literal is kept as a string (``dtype=bfloat16``).

>>> parse_policies("static,taylorseer(interval=4, order=2)", task="image")
[('static', {}), ('taylorseer', {'interval': 4, 'order': 2})]
"""

from __future__ import annotations

import ast
import re
from typing import Any

__all__ = ["parse_policies", "format_policy", "split_list", "literal"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")


def _split_top(text: str, spec: str) -> list[str]:
    """Split on commas outside brackets; refuse unbalanced brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in policy list {spec!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unclosed '(' in policy list {spec!r}: write name(key=value,...)")
    parts.append("".join(cur))
    return parts


def _value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _parse_one(item: str, spec: str) -> tuple[str, dict[str, Any]]:
    item = item.strip()
    m = _NAME.match(item)
    if not m:
        raise ValueError(f"bad policy {item!r} in {spec!r}: write name or name(key=value,...), separated by ','")
    name, rest = m.group(0), item[m.end():].strip()
    opts: dict[str, Any] = {}
    if rest:
        if not (rest.startswith("(") and rest.endswith(")")):
            hint = " (separate policies with ',', not ';')" if ";" in rest else ""
            raise ValueError(f"bad policy {item!r} in {spec!r}: write name(key=value,...){hint}")
        for part in _split_top(rest[1:-1], spec):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"bad option {part!r} in {spec!r}: write name(key=value,...)")
            k, v = (s.strip() for s in part.split("=", 1))
            if not _NAME.fullmatch(k):
                raise ValueError(f"bad option name {k!r} in {spec!r}")
            if k in opts:
                raise ValueError(f"option {k!r} given twice in {item!r}")
            opts[k.replace("-", "_")] = _value(v)
    return name.lower().replace("_", "-"), opts


def parse_policies(spec: str, task: str | None = "image", extra_names: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``"a,b(k=v,k2=v2)"`` → ``[("a", {}), ("b", {"k": v, "k2": v2})]``; ``a+b(k=v)`` is one
    configuration of composed policies → ``("a+b", {"a": {}, "b": {"k": v}})``.

    Names are checked against ``dcache.policies(task)`` (plus ``extra_names``, e.g. a bench's
    ``baseline`` row); options are checked by building each policy's config, so a typo is an
    error here, before any generation runs.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("no policies given: write name or name(key=value,...), separated by ','")
    out = [_parse_item(item, spec) for item in _split_top(spec, spec) if item.strip()]
    if not out:
        raise ValueError(f"no policies in {spec!r}")
    from dcache import resolve_policy
    from dcache.registry import make_config

    for name, opts in out:
        if "+" in name:
            # A composition: one config per part, and the one-per-granularity rule checked now.
            resolve_policy(name.split("+"), opts, task)
        elif name not in extra_names:
            make_config(name, opts, task)  # names the accepted policies or options when it refuses
    return out


def _parse_item(item: str, spec: str) -> tuple[str, dict[str, Any]]:
    """``a(k=v)+b`` (policies composed on one model) → ``("a+b", {"a": {"k": v}, "b": {}})``."""
    parts = [p for p in _split_top_on(item, "+", spec)]
    if len(parts) == 1:
        return _parse_one(item, spec)
    parsed = [_parse_one(p, spec) for p in parts]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"policy given twice in the composition {item.strip()!r}")
    return "+".join(names), {n: o for n, o in parsed}


def _split_top_on(text: str, sep: str, spec: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def format_policy(name: str, opts: dict[str, Any]) -> str:
    """The inverse of one item of :func:`parse_policies`: ``taylorseer(interval=4)``."""
    if not opts:
        return name
    return f"{name}({','.join(f'{k}={v!r}' for k, v in opts.items())})"


def split_list(text: str, what: str) -> list[str]:
    """Split ``a,b,(c,d)`` on commas outside brackets; unbalanced brackets are a ValueError."""
    return [p.strip() for p in _split_top(text, what)]


def literal(raw: str) -> Any:
    """A Python literal (``0.2``, ``True``, ``(1, 2)``), else the bare word as a string."""
    return _value(raw.strip())
