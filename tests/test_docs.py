"""The docs pages' Python examples run: each page's blocks in order, in one namespace per page.

A block that cannot run here (it needs a GPU, several processes or a C++ build) is marked by the
line ``<!-- not run: the reason -->`` right above its fence; it is still compiled, so it stays
valid Python. Relative links in the README and in these pages point to files that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
# the pages whose examples these tests run (studies.md and nyuv2.md document commands)
PAGES = ("balancers.md", "design.md", "training.md", "native.md", "performance.md")
BLOCK = re.compile(r"(?:^<!-- not run: (?P<reason>[^\n]*?) -->\n)?^```python\n(?P<code>.*?)^```",
                   flags=re.S | re.M)
LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#(?P<anchor>[^)]*))?\)")
CODE = re.compile(r"^```.*?^```|`[^`\n]*`", flags=re.S | re.M)  # fenced blocks, code spans


def python_blocks(path: Path) -> list[tuple[str, str | None]]:
    """(code, reason it is not run or None) of each ```python block of a Markdown file."""
    return [(m["code"], m["reason"]) for m in BLOCK.finditer(path.read_text())]


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, capsys):
    path = DOCS / page
    blocks = python_blocks(path)
    namespace: dict = {"__name__": f"docs.{page}"}
    for number, (code, reason) in enumerate(blocks, 1):
        compiled = compile(code, f"{path}:block {number}", "exec")
        if reason is None:
            exec(compiled, namespace)


def test_the_pages_that_teach_have_examples_that_run():
    for page in ("balancers.md", "design.md", "training.md"):
        assert any(reason is None for _, reason in python_blocks(DOCS / page)), page


def test_a_marked_block_is_not_run(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- not run: needs torchrun -->\n```python\nraise SystemExit\n```\n"
                    "```python\nx = 1\n```\n")
    assert python_blocks(page) == [("raise SystemExit\n", "needs torchrun"), ("x = 1\n", None)]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped,
    spaces as hyphens."""
    headings = re.findall(r"^#+ (.*)$", CODE.sub("", path.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p}" for p in PAGES)])
def test_relative_links_resolve(page):
    path = ROOT / page
    for match in LINK.finditer(CODE.sub("", path.read_text())):
        target, anchor = match["target"], match["anchor"]
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"
        if anchor and target.endswith(".md"):
            assert anchor in anchors(path.parent / target), f"{page} links to {target}#{anchor}"
