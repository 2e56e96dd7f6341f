"""One result row: printed as a JSON line and appended to the sweep's .jsonl file as it finishes,
so an interrupted sweep keeps every row it measured."""
from __future__ import annotations

import json


def emit(row: dict, path: str) -> None:
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
