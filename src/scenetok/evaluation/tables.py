"""Result tables: group-and-average, CSV and markdown. Plain Python, shared by every benchmark.

Rows are dicts. A value that is None, NaN or missing is left out of a mean (and written as an empty
cell); a row's list/dict values are written as JSON in CSV cells.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable, Sequence
from scenetok.io import atomic_write_text


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_of(values: Iterable) -> float | None:
    """Mean of the finite numbers in ``values`` (booleans count as 0/1); None when there are none."""
    nums = [float(v) for v in values if _is_number(v) or isinstance(v, bool)]
    return sum(nums) / len(nums) if nums else None


def group_mean(rows: Sequence[dict], keys: Sequence[str], metrics: Sequence[str], count: str = "images") -> list[dict]:
    """One row per distinct value of ``keys`` (in order of first appearance): the keys, the number of
    rows in the group (column ``count``) and the mean of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(_hashable(r.get(k)) for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        row = {k: members[0].get(k) for k in keys}
        row[count] = len(members)
        for m in metrics:
            row[m] = mean_of(r.get(m) for r in members)
        out.append(row)
    return out


def _hashable(v):
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, dict):
        return tuple(sorted(v.items()))
    return v


def columns_of(rows: Sequence[dict], first: Sequence[str] = ()) -> list[str]:
    """All keys of ``rows`` in order of first appearance, ``first`` ones first."""
    cols = [c for c in first]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(round(v, 6))
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def to_csv(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    cols = list(columns) if columns is not None else columns_of(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue()


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV (atomically)."""

    return atomic_write_text(path, to_csv(rows, columns))


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub markdown table; floats rounded to ``digits``."""
    cols = list(columns) if columns is not None else columns_of(rows)

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.{digits}f}" if math.isfinite(v) else ""
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def mean_ci(values: Iterable, z: float = 1.96) -> dict:
    """``{"mean", "ci95", "std", "n"}`` of the finite numbers in ``values`` (booleans count as 0/1):
    ``std`` with n − 1 in the denominator, ``ci95`` the half-width ``z · std / √n`` of the normal
    approximation (0 for one value; every field None but ``n`` for none)."""
    nums = [float(v) for v in values if _is_number(v) or isinstance(v, bool)]
    n = len(nums)
    if not n:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    mean = sum(nums) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in nums) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "ci95": z * std / math.sqrt(n), "std": std, "n": n}


def group_stats(rows: Sequence[dict], keys: Sequence[str], metrics: Sequence[str], count: str = "images") -> list[dict]:
    """Like :func:`group_mean`, with per metric also ``<metric>_ci95`` (95 % normal-approximation
    half-width), ``<metric>_std`` and ``<metric>_n`` (how many rows had a value)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(_hashable(r.get(k)) for k in keys), []).append(r)
    out = []
    for members in groups.values():
        row = {k: members[0].get(k) for k in keys}
        row[count] = len(members)
        for m in metrics:
            s = mean_ci(r.get(m) for r in members)
            row[m], row[f"{m}_ci95"], row[f"{m}_std"], row[f"{m}_n"] = s["mean"], s["ci95"], s["std"], s["n"]
        out.append(row)
    return out
