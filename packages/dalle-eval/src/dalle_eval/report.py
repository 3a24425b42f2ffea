"""A static HTML report: prompts beside their images, and the metrics, viewable straight from disk."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin-bottom: 2rem; }
td, th { border: 1px solid #ccc; padding: 0.4rem 0.8rem; text-align: left; vertical-align: middle; }
img { image-rendering: pixelated; width: 96px; height: 96px; margin: 2px; }
img.grid { width: auto; height: auto; max-width: 100%; }
.prompt { font-weight: 600; }
"""


def _metrics_rows(metrics: Mapping[str, Any], prefix: str = "") -> list[str]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_metrics_rows(value, f"{name}."))
        else:
            shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
            rows.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(shown)}</td></tr>")
    return rows


def _src(directory: Path, path: str | Path) -> str:
    """A relative URL for ``path``: forward slashes, percent-encoded (spaces, ``#``), HTML-escaped."""
    return html.escape(quote(Path(path).relative_to(directory).as_posix()))


def write_report(
    directory: Path,
    title: str,
    entries: Sequence[tuple[str, Sequence[Path], str]],
    metrics: Mapping[str, Any],
    grid: Path | None = None,
    notes: Sequence[str] = (),
    note_header: str = "checker",
) -> Path:
    """Write ``directory/index.html``: ``notes`` as paragraphs, one row per ``(prompt, image paths, note)``, the grid,
    then the metrics table.

    Image paths are written relative to ``directory`` (with forward slashes) so the report can be moved or served as
    a folder; every image lies inside ``directory``.
    """
    rows = []
    for prompt, images, note in entries:
        cells = "".join(f'<img src="{_src(directory, p)}" alt="{html.escape(prompt)}">' for p in images)
        rows.append(
            f'<tr><td class="prompt">{html.escape(prompt)}</td><td>{cells}</td><td>{html.escape(note)}</td></tr>'
        )
    grid_html = f'<h2>Sample grid</h2><img class="grid" src="{_src(directory, grid)}" alt="grid">' if grid else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{chr(10).join(f"<p>{html.escape(note)}</p>" for note in notes)}
<h2>Prompts and images</h2>
<table><tr><th>prompt</th><th>images</th><th>{html.escape(note_header)}</th></tr>
{chr(10).join(rows)}
</table>
{grid_html}
<h2>Metrics</h2>
<table>
{chr(10).join(_metrics_rows(metrics))}
</table>
</body></html>
"""
    path = directory / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
