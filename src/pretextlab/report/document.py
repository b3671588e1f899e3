"""The report's document model: blocks (headings, paragraphs, tables, images, details) that every renderer reads."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MISSING = "—"


@dataclass
class Cell:
    text: str
    link: str | None = None  # a run's config hash
    bold: bool = False
    underline: bool = False
    missing: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    align: list[str] | None = None  # per column "left" (text) or "right" (numbers); None = read from the cells

    def alignment(self) -> list[str]:
        """Text left, numbers right: a column is numeric when every cell that is not missing reads as a number."""
        if self.align is not None:
            return list(self.align)
        result = []
        for j in range(len(self.header)):
            texts = [row[j].text for row in self.rows if j < len(row) and not row[j].missing and row[j].text]
            result.append("right" if texts and all(_NUMBER.match(t) for t in texts) else "left")
        return result


# A number as the tables write it: 70.5, 12, 3/4 (probes done of planned), 1e-03.
_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?([eE][-+]?\d+)?(/\d+)?%?$")


@dataclass
class Block:
    kind: str  # heading, paragraph, files (a figure's other formats), table, image, details, anchor, code, list
    text: str = ""
    level: int = 2
    table: Table | None = None
    path: str = ""
    children: list["Block"] = field(default_factory=list)
    items: list[list[Cell]] = field(default_factory=list)  # a list's entries, each a run of inline cells (links, bold)
    id: str = ""  # an anchor on the block itself (a run's details: a link to it opens it)


def anchor(config_hash: str) -> str:
    return f"run-{config_hash}"
