"""The documentation: the mkdocs site builds under --strict, and the README's links hold.

`mkdocs build --strict` (with the `validation` settings of mkdocs.yml) fails on a broken
link or anchor, a page missing from the nav and an absolute link; the README is not part
of the site, so its links, its length and the repository paths the pages name are
checked here.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_REPO_PATH = re.compile(r"(?:src|stages|flows|tests|bench|docs)/[\w./-]*")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(_CODE_SPAN.sub("", line))
    return "\n".join(out)


def _code_blocks(text: str, lang: str) -> list[str]:
    blocks, current, fenced = [], None, False
    for line in text.splitlines():
        if _FENCE.match(line):
            if not fenced:
                current = [] if line.strip().lstrip("`~").strip() == lang else None
            elif current is not None:
                blocks.append("\n".join(current))
                current = None
            fenced = not fenced
        elif fenced and current is not None:
            current.append(line)
    return blocks


def _github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return anchors


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "index.html").is_file()
    for page in _pages():  # every page of docs/ became a page of the site
        rel = page.relative_to(DOCS).with_suffix("")
        built = site / "index.html" if rel.name == "index" else site / rel / "index.html"
        assert built.is_file(), f"{page.relative_to(REPO)} was not built"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; move detail into docs/ (at most {MAX_README_LINES})"
    )


def test_readme_relative_links_point_at_existing_files():
    text = README.read_text(encoding="utf-8")
    targets = _LINK.findall(_prose(text))
    assert targets, "no links found in README.md"
    broken = []
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (README.parent / path).resolve() if path else README
        if not file.exists():
            broken.append(f"{target}: {path} does not exist")
        elif (
            anchor
            and file.suffix == ".md"
            and (anchor not in _github_anchors(file.read_text(encoding="utf-8")))
        ):
            broken.append(f"{target}: no heading #{anchor} in {path or 'README.md'}")
    assert broken == []


def test_repository_paths_named_in_the_docs_exist():
    # `src/lmops/core/train.py`, `bench/results/estimate.md`: paths the pages quote as code
    # are not links, so mkdocs cannot check them; a moved or renamed file must not leave
    # them behind.
    missing = []
    for doc in [README, *_pages()]:
        for span in _CODE_SPAN.findall(doc.read_text(encoding="utf-8")):
            if _REPO_PATH.fullmatch(span) and not (REPO / span).exists():
                missing.append(f"{doc.relative_to(REPO)}: {span}")
    assert missing == []


def test_python_examples_import_what_exists():
    missing = []
    for doc in [README, *_pages()]:
        for block in _code_blocks(doc.read_text(encoding="utf-8"), "python"):
            for module, names in re.findall(r"^from (lmops[\w.]*) import (.+)$", block, re.M):
                try:
                    mod = importlib.import_module(module)
                except ImportError as exc:
                    missing.append(f"{doc.relative_to(REPO)}: {module} ({exc})")
                    continue
                for name in (n.strip().split(" as ")[0] for n in names.split(",")):
                    if not hasattr(mod, name):
                        missing.append(f"{doc.relative_to(REPO)}: {module}.{name}")
    assert missing == []


_SERVER_CMD = re.compile(r"(mlflow (server|ui|models serve)|prefect server start)\b(.*)")


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_documented_servers_bind_the_loopback_interface(page):
    text = page.read_text(encoding="utf-8").replace("\\\n", " ")  # join continued lines
    for line in text.splitlines():
        m = _SERVER_CMD.search(line)
        if m is None or "`" in m.group(3)[:1] or line.lstrip().startswith(("|", "-")):
            continue
        assert "0.0.0.0" not in line, line
        if m.group(1) != "mlflow ui":  # mlflow ui binds 127.0.0.1 unless told otherwise
            assert re.search(r"(--host|-h) 127\.0\.0\.1", line), line
