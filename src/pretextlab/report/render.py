"""Renderers of the report's document model: Markdown (report.md) and HTML (report.html), the same content."""

from __future__ import annotations

import html
import re
from typing import Sequence

from pretextlab.report.document import Block, Cell, anchor


def _md_cell(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|")
    if cell.link:
        text = f"[{text}](#{anchor(cell.link)})"
    if cell.bold:
        text = f"**{text}**"
    if cell.underline:
        text = f"<ins>{text}</ins>"
    return text


def _html_inline(cell: Cell) -> str:
    text = html.escape(cell.text)
    if cell.link:
        text = f'<a href="#{anchor(cell.link)}">{text}</a>'
    if cell.bold:
        text = f"<b>{text}</b>"
    if cell.underline:
        text = f"<u>{text}</u>"
    return text


def _html_cell(cell: Cell) -> str:
    text = _html_inline(cell)
    return f'<td class="missing">{text}</td>' if cell.missing else f"<td>{text}</td>"


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if block.kind == "heading":
            out.append(f"{'#' * block.level} {block.text}\n")
        elif block.kind == "paragraph":
            out.append(block.text + "\n")
        elif block.kind == "table" and block.table is not None:
            table = block.table
            out.append("| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |")
            out.append("|" + "|".join("---" for _ in table.header) + "|")
            for row in table.rows:
                out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            out.append("")
        elif block.kind == "image":
            out.append(f"![{block.text}]({block.path})\n")
        elif block.kind == "details":
            out.append(f"<details><summary>{html.escape(block.text)}</summary>\n")
            out.append(render_markdown(block.children))
            out.append("</details>\n")
        elif block.kind == "anchor":
            out.append(f'<a id="{block.text}"></a>\n')
        elif block.kind == "list":
            out.append("\n".join("- " + "".join(_md_cell(c) for c in item) for item in block.items) + "\n")
    return "\n".join(out)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.missing { color: #999; }
img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.3em 0 1em; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    def body(items: Sequence[Block]) -> list[str]:
        out: list[str] = []
        for block in items:
            if block.kind == "heading":
                out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
            elif block.kind == "paragraph":
                text = html.escape(block.text)
                text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
                out.append(f"<p>{text}</p>")
            elif block.kind == "table" and block.table is not None:
                rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.table.header) + "</tr>"]
                rows += ["<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in block.table.rows]
                out.append("<table>\n" + "\n".join(rows) + "\n</table>")
            elif block.kind == "image":
                out.append(f'<p><img src="{html.escape(block.path)}" alt="{html.escape(block.text)}"></p>')
            elif block.kind == "details":
                out.append(f"<details><summary>{html.escape(block.text)}</summary>")
                out.extend(body(block.children))
                out.append("</details>")
            elif block.kind == "anchor":
                out.append(f'<a id="{html.escape(block.text)}"></a>')
            elif block.kind == "code":
                out.append(f"<pre>{html.escape(block.text)}</pre>")
            elif block.kind == "list":
                out.append("<ul>\n" + "\n".join("<li>" + "".join(_html_inline(c) for c in item) + "</li>" for item in block.items) + "\n</ul>")
        return out

    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(body(blocks))
        + "\n</body></html>\n"
    )


def markdown_blocks(blocks: list[Block]) -> list[Block]:
    """Markdown has no 'code' block kind of ours: turn them into fenced paragraphs."""
    result = []
    for block in blocks:
        if block.kind == "code":
            result.append(Block("paragraph", text=f"```json\n{block.text}\n```"))
        elif block.kind == "details":
            result.append(Block("details", text=block.text, children=markdown_blocks(block.children)))
        else:
            result.append(block)
    return result
