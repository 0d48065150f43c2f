"""The documentation a user reads: every relative link and picture in README.md and docs/*.md points to a file of the
repository (and an #anchor to a heading of that file, spelled as GitHub spells it), and the README stays short."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](picture); nested [![a](x)](y) gives x and y
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (word characters, spaces and hyphens kept),
    spaces turned into hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans show paths, they are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto:


def test_anchor_spelling_matches_github():
    assert github_anchor("Python API (`zimage_core`, no ComfyUI needed)") == "python-api-zimage_core-no-comfyui-needed"
    assert github_anchor("Inpainting, samplers and ComfyUI's MODEL wire") == "inpainting-samplers-and-comfyuis-model-wire"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert broken == [], f"{page.relative_to(ROOT)}: {broken}"


def test_readme_is_short_and_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    first_block = FENCE.search(text).group(0)
    assert "tools/demo.sh" in first_block and "tools/test.sh" in first_block


def test_figure_check_finds_a_lost_figure():
    """tools/check_figures.py (the check that no figure was lost when the README moved into docs/) reports a figure
    that is missing and accepts one that wrapped across lines."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from check_figures import missing

    old = "sampling needs 11.9 GiB, 0.98x the time, max |diff| 1.3e-6; 13 of the 16 samples"
    assert missing(old, "sampling needs 11.9\nGiB, 0.98x; 1.3e-6; 13 of the 16".replace("\n", " ")) == []
    assert missing(old, "sampling needs 11.8 GiB, 0.98x the time, 1.3e-6, 13 of the 16") == ["11.9 GiB"]
