"""Result tables: one formatting path for every table ptanet writes (Tables 3-5 of the paper and ours).

Rows are plain dicts holding raw numbers (rates as fractions); a column spec ``(key, header, format)``
decides how a value is shown, so the same rows feed Markdown for people and JSON/CSV for programs.
Formats: "pct" (fraction -> percent, 2 decimals), "f2", "f3", "int", "str". A missing key, None or nan
shows as "n/a": rows from different sources (e.g. a baseline without PTA fields) share one table.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Column = tuple[str, str, str]  # (row key, header, format)

NA = "n/a"
FORMATS = ("pct", "f2", "f3", "int", "str")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_value(value: Any, fmt: str) -> str:
    """One cell as text; raises ValueError for an unknown format so a typo in a column spec shows at once."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown column format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "str":
        return NA if _is_missing(value) else str(value)
    if _is_missing(value):
        return NA
    number = float(value)
    if math.isnan(number):  # e.g. numpy nan, which is not a Python float
        return NA
    if fmt == "pct":
        return f"{100.0 * number:.2f}"
    if fmt == "f2":
        return f"{number:.2f}"
    if fmt == "f3":
        return f"{number:.3f}"
    return str(int(round(number)))


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table (numeric columns right-aligned), ending with a newline."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" if fmt != "str" else "---" for _, _, fmt in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [format_value(row.get(key), fmt).replace("|", r"\|") for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """nan/inf -> None (JSON has no nan), numpy scalars -> Python, recursively through dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """Raw rows, every key, nan -> null (valid JSON for programs)."""
    return json.dumps(_json_safe(list(rows)), indent=2, allow_nan=False) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """The listed columns, headed by their keys, raw values (rates stay fractions; missing -> empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([key for key, _, _ in columns])
    for row in rows:
        values = (_json_safe(row.get(key)) for key, _, _ in columns)
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def render(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], fmt: str) -> str:
    """The table as "markdown", "json" or "csv" text."""
    if fmt == "markdown":
        return to_markdown(rows, columns)
    if fmt == "json":
        return to_json(rows)
    if fmt == "csv":
        return to_csv(rows, columns)
    raise ValueError(f"unknown table format {fmt!r}; use markdown, json or csv")


def write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], out_base: str | Path) -> dict[str, Path]:
    """Write ``out_base.md`` (formatted), ``.json`` (raw rows, every key, nan -> null) and ``.csv``
    (see :func:`to_csv`). Returns {"md": path, "json": path, "csv": path}.
    """
    for _, _, fmt in columns:
        format_value(None, fmt)  # validate every format before writing anything
    base = Path(out_base)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: base.with_name(base.name + "." + ext) for ext in ("md", "json", "csv")}
    paths["md"].write_text(to_markdown(rows, columns), encoding="utf-8")
    paths["json"].write_text(to_json(rows), encoding="utf-8")
    paths["csv"].write_text(to_csv(rows, columns), encoding="utf-8", newline="")
    return paths
