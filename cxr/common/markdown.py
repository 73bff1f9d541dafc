"""Shared Markdown files that several scripts write into (BENCHMARKS.md): each owns one `## ` section."""
from __future__ import annotations

import re
from pathlib import Path


def replace_section(path: Path, heading: str, section: str, title: str = "# Benchmarks") -> None:
    """Write `section` (which starts with `heading`) into path, replacing only the previous copy of that
    section; every other section is kept as it is."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"{title}\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text.rstrip("\n") + "\n")


def publish(section: str, path: Path, heading: str, write: bool = True) -> None:
    """Print a benchmark's section and, unless write is False, put it into BENCHMARKS.md (path)."""
    print("\n" + section)
    if not write:
        print(f"(not written to {path})")
        return
    replace_section(Path(path), heading, section)
    print(f"wrote the section to {path}")


def table(header: list[str], rows) -> list[str]:
    """A Markdown table as lines: the header, the |---| rule and one line per row (cells as str())."""
    return [_row(header), "|" + "---|" * len(header), *(_row(row) for row in rows)]


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def num(x: float, nd: int = 1) -> str:
    """A number with thousands separators and nd decimals: 12,345.6."""
    return f"{x:,.{nd}f}"


def met(ok: bool) -> str:
    """A goal's verdict as the reports print it."""
    return "**met**" if ok else "**not met**"
