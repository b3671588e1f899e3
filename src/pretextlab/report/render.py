"""Renderers of the report's document model: Markdown (report.md) and HTML (report.html), the same content."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from pretextlab.report.document import Block, Cell, anchor


@dataclass(frozen=True)
class _Inline:
    """How one output format marks up a table cell's text: its escaping, link, bold and underline."""

    escape: Callable[[str], str]
    link: str  # a str.format template with {text} and {href}
    bold: str
    underline: str

    def cell(self, cell: Cell) -> str:
        text = self.escape(cell.text)
        if cell.link:
            text = self.link.format(text=text, href=anchor(cell.link))
        if cell.bold:
            text = self.bold.format(text=text)
        if cell.underline:
            text = self.underline.format(text=text)
        return text


# Markdown underlines with <ins> (GitHub renders it; there is no Markdown underline).
_MARKDOWN = _Inline(lambda text: text.replace("|", "\\|"), "[{text}](#{href})", "**{text}**", "<ins>{text}</ins>")
_HTML = _Inline(html.escape, '<a href="#{href}">{text}</a>', "<b>{text}</b>", "<u>{text}</u>")


def _html_cell(cell: Cell, align: str) -> str:
    classes = " ".join(c for c in ("num" if align == "right" else "", "missing" if cell.missing else "") if c)
    return f'<td class="{classes}">{_HTML.cell(cell)}</td>' if classes else f"<td>{_HTML.cell(cell)}</td>"


def _render(blocks: Sequence[Block], by_kind: Mapping[str, Callable[[Block], Sequence[str]]]) -> list[str]:
    """Each block's lines from its kind's renderer, in order; kinds a format has no renderer for are left out."""
    return [line for block in blocks if block.kind in by_kind for line in by_kind[block.kind](block)]


def _markdown_table(block: Block) -> list[str]:
    table = block.table
    if table is None:
        return []
    return [
        "| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |",
        "|" + "|".join("---:" if a == "right" else ":---" for a in table.alignment()) + "|",
        *("| " + " | ".join(_MARKDOWN.cell(c) for c in row) + " |" for row in table.rows),
        "",
    ]


def _markdown_details(block: Block) -> list[str]:
    anchor_line = [f'<a id="{block.id}"></a>\n'] if block.id else []
    return [*anchor_line, f"<details><summary>{html.escape(block.text)}</summary>\n", render_markdown(block.children), "</details>\n"]


_MARKDOWN_BLOCKS: dict[str, Callable[[Block], Sequence[str]]] = {
    "heading": lambda block: [f"{'#' * block.level} {block.text}\n"],
    "paragraph": lambda block: [block.text + "\n"],
    "files": lambda block: [block.text + "\n"],
    "table": _markdown_table,
    "image": lambda block: [f"![{block.text}]({block.path})\n"],
    "details": _markdown_details,
    "anchor": lambda block: [f'<a id="{block.text}"></a>\n'],
    "list": lambda block: ["\n".join("- " + "".join(_MARKDOWN.cell(c) for c in item) for item in block.items) + "\n"],
}


def render_markdown(blocks: Sequence[Block]) -> str:
    return "\n".join(_render(blocks, _MARKDOWN_BLOCKS))


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; overflow-wrap: break-word; }
nav { font-size: 0.92em; border-bottom: 1px solid #ddd; padding-bottom: 0.5em; }
nav ul { margin: 0.2em 0; padding-left: 1.2em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { color: #777; }
img { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
code { overflow-wrap: anywhere; }
details { margin: 0.3em 0 1em; }
details:target { outline: 2px solid #1f77b4; outline-offset: 3px; }
.files { font-size: 0.85em; color: #555; }
@media (max-width: 640px) {
  body { margin: 0.5em auto; padding: 0 0.6em; }
  th, td { padding: 0.2em 0.35em; }
  h1 { font-size: 1.5em; }
}
@media print {
  nav, .files { display: none; }
  body { max-width: none; margin: 0; padding: 0; }
  a { color: inherit; text-decoration: none; }
  .scroll { overflow: visible; }
  pre { white-space: pre-wrap; }
  img, table, figure { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
}
"""

# A link to a run opens that run's collapsed block (and any block around it), whether it is followed
# in this page (click, hash change) or arrives from outside (load with #run-...); printing opens all.
_SCRIPT = """
function pretextlabOpen(id) {
  var target = document.getElementById(id);
  if (!target) return;
  for (var node = target; node; node = node.parentElement) { if (node.tagName === "DETAILS") node.open = true; }
  target.scrollIntoView();
}
function pretextlabFromHash() { if (location.hash.length > 1) pretextlabOpen(decodeURIComponent(location.hash.slice(1))); }
window.addEventListener("hashchange", pretextlabFromHash);
window.addEventListener("load", pretextlabFromHash);
document.addEventListener("click", function (event) {
  var link = event.target.closest ? event.target.closest('a[href^="#"]') : null;
  if (link) pretextlabOpen(decodeURIComponent(link.getAttribute("href").slice(1)));
});
window.addEventListener("beforeprint", function () {
  document.querySelectorAll("details").forEach(function (d) { d.open = true; });
});
"""


def _heading_ids(blocks: Sequence[Block]) -> dict[int, str]:
    """An id for each level-2/3 heading (for the contents), unique in the page."""
    ids: dict[int, str] = {}
    used: set[str] = set()
    for block in blocks:
        if block.kind == "heading" and block.level in (2, 3):
            base = "s-" + (re.sub(r"[^a-z0-9]+", "-", block.text.lower()).strip("-") or "section")
            name, n = base, 2
            while name in used:
                name, n = f"{base}-{n}", n + 1
            used.add(name)
            ids[id(block)] = name
    return ids


def _contents(blocks: Sequence[Block], ids: dict[int, str]) -> str:
    entries: list[tuple[str, list[str]]] = []
    for block in blocks:
        if id(block) not in ids:
            continue
        link = f'<a href="#{ids[id(block)]}">{html.escape(block.text)}</a>'
        if block.level == 2 or not entries:
            entries.append((link, []))
        else:
            entries[-1][1].append(link)
    items = [f"<li>{top}" + (": " + " · ".join(subs) if subs else "") + "</li>" for top, subs in entries]
    return "<nav><b>Contents</b>\n<ul>\n" + "\n".join(items) + "\n</ul></nav>" if items else ""


def _html_paragraph(block: Block) -> list[str]:
    text = html.escape(block.text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)
    return [f'<p class="files">{text}</p>' if block.kind == "files" else f"<p>{text}</p>"]


def _html_table(block: Block) -> list[str]:
    if block.table is None:
        return []
    align = block.table.alignment()
    head = "".join(('<th class="num">' if a == "right" else "<th>") + f"{html.escape(h)}</th>"
                   for h, a in zip(block.table.header, align))
    rows = ["<tr>" + head + "</tr>"]
    rows += ["<tr>" + "".join(_html_cell(c, a) for c, a in zip(row, align)) + "</tr>" for row in block.table.rows]
    return ['<div class="scroll"><table>\n' + "\n".join(rows) + "\n</table></div>"]


def render_html(blocks: Sequence[Block], title: str) -> str:
    ids = _heading_ids(blocks)

    def heading(block: Block) -> list[str]:
        attr = f' id="{ids[id(block)]}"' if id(block) in ids else ""
        lines = [f"<h{block.level}{attr}>{html.escape(block.text)}</h{block.level}>"]
        return lines + [_contents(blocks, ids)] if block.level == 1 else lines

    def details(block: Block) -> list[str]:
        attr = f' id="{html.escape(block.id)}"' if block.id else ""
        return [f"<details{attr}><summary>{html.escape(block.text)}</summary>", *_render(block.children, by_kind), "</details>"]

    by_kind: dict[str, Callable[[Block], Sequence[str]]] = {
        "heading": heading,
        "paragraph": _html_paragraph,
        "files": _html_paragraph,
        "table": _html_table,
        "image": lambda block: [f'<p><img src="{html.escape(block.path)}" alt="{html.escape(block.text)}"></p>'],
        "details": details,
        "anchor": lambda block: [f'<a id="{html.escape(block.text)}"></a>'],
        "code": lambda block: [f"<pre>{html.escape(block.text)}</pre>"],
        "list": lambda block: ["<ul>\n" + "\n".join("<li>" + "".join(_HTML.cell(c) for c in item) + "</li>" for item in block.items) + "\n</ul>"],
    }
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(_render(blocks, by_kind))
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def markdown_blocks(blocks: list[Block]) -> list[Block]:
    """Markdown has no 'code' block kind of ours: turn them into fenced paragraphs."""
    result = []
    for block in blocks:
        if block.kind == "code":
            result.append(Block("paragraph", text=f"```json\n{block.text}\n```"))
        elif block.kind == "details":
            result.append(Block("details", text=block.text, children=markdown_blocks(block.children), id=block.id))
        else:
            result.append(block)
    return result
