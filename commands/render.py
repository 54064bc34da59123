"""How a command shows its result on stdout: :data:`out` (the one rich console), one JSON
object (:func:`print_json`) and the two-column table of a benchmark's figures."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console()


def print_json(result: Any) -> None:
    """``result`` as one indented JSON object on stdout (what ``--json`` prints)."""
    print(json.dumps(result, indent=2))


def render_figures(title: str, res: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures: one JSON object, or a two-column table (nested ones as JSON)."""
    if as_json:
        print_json(res)
        return
    t = Table(title=title, show_header=False)
    for key, value in res.items():
        shown = json.dumps(value) if isinstance(value, dict) else str(value)
        t.add_row(key.replace("_", " "), shown)
    out.print(t)
