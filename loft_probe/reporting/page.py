"""The report as text: one self-contained HTML page and one Markdown page over the same sections.

Every string that comes from a run (names, layers, meta values, error messages quoting them) is
untrusted: it is HTML-escaped in the page and Markdown-escaped in the .md. The HTML page also carries a
Content-Security-Policy that allows inline styles and data: images and nothing else, so that a string
that slipped through could still run no script and load nothing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import re
from dataclasses import dataclass

import pandas as pd

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f3f3f3; }
td.text, th.text { text-align: left; }
img { max-width: 100%; height: auto; display: block; }
figure { margin: 1rem 0 2rem; }
figcaption, .note, dl { font-size: 0.9rem; color: #444; }
dt { font-family: monospace; }
.note { font-style: italic; }
""".strip()

# Backslash-escaped in Markdown: emphasis, code, links and images ([ ] suffice: no link without them), raw HTML
# and entities (< > &), table cells (|), headings, strikethrough and math in renderers that have them.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>&|#~$])")


@dataclass
class Section:
    """One figure of the report: a fixed file name, a title, a caption, and the PNG or why it is missing."""

    key: str  # file stem of figures/<key>.png: fixed in the code, never taken from a run
    title: str
    caption: str  # may quote run strings: escaped on output like everything else
    png: bytes | None = None
    note: str = ""  # why the figure is missing (or what it leaves out)


def md_escape(text: object) -> str:
    """Text safe in a Markdown paragraph or table cell: specials backslash-escaped, one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars included


def cell(value: object) -> str:
    """A table value as text: floats to 4 significant digits, missing values as an em dash, JSON otherwise."""
    if value is None or (_is_number(value) and math.isnan(value)):
        return "—"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)  # meta values of any JSON type


def _text_columns(table: pd.DataFrame) -> set[str]:
    """Columns to align left: any value not a number (names, meta values of any JSON type)."""
    return {column for column in table.columns
            if not table[column].map(lambda value: value is None or _is_number(value)).all()}


def html_table(table: pd.DataFrame) -> str:
    text = _text_columns(table)
    head = "".join(f'<th class="{"text" if c in text else "num"}">{html.escape(str(c))}</th>' for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"text" if c in text else "num"}">{html.escape(cell(v))}</td>'
                         for c, v in zip(table.columns, row, strict=True)) + "</tr>\n"
        for row in table.itertuples(index=False))
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def md_table(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(md_escape(c) for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(md_escape(cell(v)) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def html_page(intro: list[str], tables: list[tuple[str, pd.DataFrame, dict[str, str]]],
              sections: list[Section], footer: str, heading: str = "loft-probe report") -> str:
    """The page: intro paragraphs, titled tables with their column legends, then the figure sections."""
    parts = [f"<p>{html.escape(line)}</p>" for line in intro]
    for title, table, legend in tables:
        parts.append(f"<h2>{html.escape(title)}</h2>\n{html_table(table)}")
        if legend:
            parts.append("<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                          for k, v in legend.items()) + "</dl>")
    for section in sections:
        parts.append(f'<h2 id="{section.key}">{html.escape(section.title)}</h2>')
        if section.png is not None:
            data = base64.b64encode(section.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(section.title)}">'
                         f"<figcaption>{html.escape(section.caption)}</figcaption></figure>")
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f"<title>{html.escape(heading)}</title>\n<style>\n{STYLE}\n</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(heading)}</h1>\n" + "\n".join(parts) +
            f"\n<footer><p>{html.escape(footer)}</p></footer>\n</body>\n</html>\n")


def markdown_page(intro: list[str], tables: list[tuple[str, pd.DataFrame, dict[str, str]]],
                  sections: list[Section], footer: str, figure_dir: str, heading: str = "loft-probe report") -> str:
    """The same page in Markdown, its figures linked as `figure_dir`/<key>.png."""
    parts = [f"# {md_escape(heading)}"] + [md_escape(line) for line in intro]
    for title, table, legend in tables:
        parts += [f"## {md_escape(title)}", md_table(table)]
        if legend:
            parts.append("\n".join(f"- `{k}`: {md_escape(v)}" for k, v in legend.items()))
    for section in sections:
        parts.append(f"## {md_escape(section.title)}")
        if section.png is not None:
            parts.append(f"![{md_escape(section.title)}]({figure_dir}/{section.key}.png)\n\n"
                         f"{md_escape(section.caption)}")
        if section.note:
            parts.append(f"*{md_escape(section.note)}*")
    return "\n\n".join([*parts, md_escape(footer)]) + "\n"
