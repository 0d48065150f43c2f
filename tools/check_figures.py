"""Check that no figure was lost when documentation moved: every measured figure of an old text (a number with a unit,
a ratio, a count like "13 of 16", a number in scientific notation or with decimals) must still appear in README.md or
docs/*.md. Used when the README was split into docs/ pages; run it again after moving text around.

    git show e5ef504:README.md > /tmp/old_readme.md
    .venv/bin/python tools/check_figures.py /tmp/old_readme.md          # lists the figures not found, exit 1 if any
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS = (r"(?:GiB|GB|MiB|MB|KB|B|ms|s|min|%|x|dB|px|M|k|steps|tests|layers|parameters|tokens|modules|keys|repeats"
         r"|epochs|prompts|noises|images|samples)")
NUMBER = r"\d+(?:[ ,]\d{3})*(?:\.\d+)?(?:e-?\d+)?"
FIGURE = re.compile(
    rf"(?<![\w.]){NUMBER}(?:\s?(?:-|to|/)\s?{NUMBER})?\s?{UNITS}(?![\w])"  # 3.8 GiB, 1.15-1.30x, 0.98x, 40 s
    rf"|(?<![\w.])\d+ of (?:the |\d+ )?\d*(?![\w])"                             # 13 of the 16, 0 of 4
    rf"|(?<![\w.])\d+(?:\.\d+)?e-\d+(?![\w])"                              # 1.3e-6
    rf"|(?<![\w.])\d+\.\d+(?![\w.])"                                       # 0.36, 1.198
)


def figures(text: str) -> list[str]:
    """The figures of a text, in order, without repeats (whitespace inside a figure normalised to one space)."""
    found = [re.sub(r"\s+", " ", m.group(0)) for m in FIGURE.finditer(text)]
    return list(dict.fromkeys(found))


def current_docs(root: Path = ROOT) -> str:
    """README.md and every docs/*.md page, joined with whitespace runs collapsed (figures may wrap across lines)."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return re.sub(r"\s+", " ", "\n".join(p.read_text(encoding="utf-8") for p in pages if p.is_file()))


def missing(old_text: str, new_text: str) -> list[str]:
    return [f for f in figures(old_text) if f not in new_text]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    old = Path(argv[0]).read_text(encoding="utf-8")
    lost = missing(old, current_docs())
    print(f"{len(figures(old))} figures in {argv[0]}; {len(lost)} not found in README.md or docs/*.md")
    for figure in lost:
        print("  missing:", figure)
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
