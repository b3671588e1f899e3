"""The report's document model: blocks (headings, paragraphs, tables, images, details) that every renderer reads."""

from __future__ import annotations

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


@dataclass
class Block:
    kind: str  # heading, paragraph, table, image, details, anchor, code, list
    text: str = ""
    level: int = 2
    table: Table | None = None
    path: str = ""
    children: list["Block"] = field(default_factory=list)
    items: list[list[Cell]] = field(default_factory=list)  # a list's entries, each a run of inline cells (links, bold)


def anchor(config_hash: str) -> str:
    return f"run-{config_hash}"
