"""`dtrain bench ...`: measurements printed as a table, or as JSON with --json."""
from __future__ import annotations

import json


def emit(rows: list[dict], as_json: bool, extra: dict | None = None) -> str:
    """A list of flat dicts -> JSON, or an aligned text table (columns in first-row order). Every output
    records the machine it was measured on: CPU, torch's CPU capability, threads, GPU."""
    from dtrain.precision import machine

    extra = {**(extra or {}), "machine": machine()}
    if as_json:
        return json.dumps({"rows": rows, **extra}, indent=2)
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines += [f"{k}: {_fmt(v)}" for k, v in extra.items()]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
