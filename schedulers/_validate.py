"""Shared checks for policy configs: every bad value becomes a ValueError naming what is accepted."""

from __future__ import annotations

from typing import Any


def check_int(policy: str, name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{policy}: {name} must be an int, got {type(value).__name__} {value!r}")
    _check_range(policy, name, value, lo, hi)


def check_float(policy: str, name: str, value: Any, lo: float | None = None, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{policy}: {name} must be a number, got {type(value).__name__} {value!r}")
    _check_range(policy, name, value, lo, hi)


def check_bool(policy: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{policy}: {name} must be True or False, got {type(value).__name__} {value!r}")


def check_choice(policy: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{policy}: {name} must be one of {choices}, got {value!r}")


def check_mask(policy: str, mask: Any) -> list[int]:
    """A per-step schedule: a non-empty list of 0 and 1 (1 = compute)."""
    if (not isinstance(mask, (list, tuple)) or not mask
            or not all(isinstance(m, int) and not isinstance(m, bool) and m in (0, 1) for m in mask)):
        raise ValueError(f"{policy}: steps_mask must be a non-empty list of 0 and 1 (1 = compute), got {mask!r}")
    return list(mask)


def _check_range(policy: str, name: str, value: float, lo: float | None, hi: float | None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{policy}: {name} must be in {rng}, got {value!r}")
