"""``--sweep policy.key=a,b,c``: the grid of policy settings one ``dcache eval`` runs.

Several ``--sweep`` options on the same policy form a Cartesian grid; sweeps of different
policies are separate grids. A swept policy also listed in ``--policy`` takes its other options
from there. Every combination is validated (by building its config) before anything runs.

>>> expand([("teacache", {})], ["teacache.threshold=0.1,0.2"], task="image")
[('teacache', {'threshold': 0.1}), ('teacache', {'threshold': 0.2})]
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from dcache.eval import policy_spec

__all__ = ["parse_sweep", "expand"]

_KEY = re.compile(r"([A-Za-z][A-Za-z0-9_\-]*)\.([A-Za-z_][A-Za-z0-9_]*)$")


def parse_sweep(spec: str) -> tuple[str, str, list[Any]]:
    """``"teacache.threshold=0.1,0.2"`` → ``("teacache", "threshold", [0.1, 0.2])``."""
    if "=" not in spec:
        raise ValueError(f"--sweep {spec!r}: write policy.option=v1,v2,... (e.g. teacache.threshold=0.1,0.2)")
    left, right = (s.strip() for s in spec.split("=", 1))
    m = _KEY.match(left)
    if not m:
        raise ValueError(f"--sweep {spec!r}: {left!r} is not policy.option (e.g. taylorseer.interval=3,5)")
    if ";" in right:
        raise ValueError(f"--sweep {spec!r}: separate values with ',', not ';'")
    values = [policy_spec.literal(v) for v in policy_spec.split_list(right, f"--sweep {spec}") if v]
    if not values:
        raise ValueError(f"--sweep {spec!r}: no values after '='")
    name = m.group(1).lower().replace("_", "-")
    return name, m.group(2).replace("-", "_"), values


def expand(policies: list[tuple[str, dict]], sweeps: list[str], task: str) -> list[tuple[str, dict]]:
    """The policy list with each swept policy replaced by its grid (order: as given)."""
    from dcache.registry import make_config

    grids: dict[str, dict[str, list[Any]]] = {}
    for spec in sweeps:
        name, key, values = parse_sweep(spec)
        if key in grids.setdefault(name, {}):
            raise ValueError(f"--sweep {spec!r}: {name}.{key} is swept twice")
        grids[name][key] = values
    base = {n: o for n, o in policies}
    order = [n for n, _ in policies] + [n for n in grids if n not in base]
    out: list[tuple[str, dict]] = []
    seen: set[str] = set()
    for name in order:
        if name in grids and name in seen:
            continue
        seen.add(name)
        if name not in grids:
            out += [(n, o) for n, o in policies if n == name and (n, o) not in out]
            continue
        keys = list(grids[name])
        for combo in itertools.product(*(grids[name][k] for k in keys)):
            opts = dict(base.get(name, {}), **dict(zip(keys, combo)))
            try:
                make_config(name, opts, task)
            except (ValueError, TypeError) as e:
                raise ValueError(f"--sweep {name}: {e}") from None
            out.append((name, opts))
    return out
