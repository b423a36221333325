"""How every subcommand reports: JSON, a CSV of its rows, a markdown table, a PNG."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_SECRET_FLAGS = ("api-key", "-secret", "-password", "-access-key")


def redacted(flags: Sequence[str]) -> list[str]:
    """``flags`` with the values of secret ones (``--api-key``, ``--admin-api-key``, ...)
    replaced by ``***``: results files are shared, keys must not be in them."""
    out: list[str] = []
    hide = False
    for flag in flags:
        name, eq, _ = flag.partition("=")
        secret = name.startswith("--") and name.endswith(_SECRET_FLAGS)
        if hide:
            out.append("***")
        elif secret and eq:
            out.append(f"{name}=***")
        else:
            out.append(flag)
        hide = secret and not eq and not hide
    return out


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``rows`` (flat dicts, the first one's keys as the header) as CSV; floats to 4 places,
    booleans as 0/1."""
    def cell(v: Any) -> Any:
        if isinstance(v, bool):
            return int(v)
        return f"{v:.4f}" if isinstance(v, float) else v

    with path.open("w", newline="") as f:
        out = csv.writer(f)
        if rows:
            out.writerow(list(rows[0]))
            for row in rows:
                out.writerow([cell(row.get(k, "")) for k in rows[0]])
    return path


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; the first column left-aligned, the rest right; floats to 3 places."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |",
             "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_or_say(kind: str, results: dict[str, Any], path: Path) -> str:
    """Write the PNG for ``kind``'s results; the line that says where (or why not)."""
    from sgl_kvext_bench import plot

    try:
        return f"plot: {getattr(plot, f'plot_{kind}')(results, path)}"
    except ValueError as exc:            # matplotlib missing
        return f"plot: skipped ({exc})"
