"""MkDocs hooks (``hooks:`` in mkdocs.yml): the benchmarks' results, on the site as they are.

``benchmarks/README.md`` and the figures and tables beside it are written where the
benchmarks run; the site shows them without copies:

- every file of ``benchmarks/`` that a page may show (``*.png``, ``results.md``) is served
  at the same path on the site, so a page links ``benchmarks/convergence/gamma.png``;
- a line ``<!-- include benchmarks/README.md -->`` in a page is replaced by that file, its
  relative links rewritten to the served files (and to the site's pages for
  ``README.md``), so that ``mkdocs build --strict`` checks every one of them, and its
  title line left out (the page has its own).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
SERVED = ("benchmarks/**/*.png", "benchmarks/**/results.md")
"""Files of the repository served on the site at their own path."""
PAGES_FOR = {"README.md": "getting-started.md"}
"""Repository files that are not on the site -> the page that holds their content."""
INCLUDE = re.compile(r"^<!-- include (?P<path>[\w./-]+\.md) -->$", re.MULTILINE)
LINK = re.compile(r"\]\((?P<target>(?![a-z]+:|#)[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_files(files: Files, config: Any) -> Files:
    """Serves the files of ``SERVED`` at their repository path."""
    for pattern in SERVED:
        for path in sorted(ROOT.glob(pattern)):
            src_uri = path.relative_to(ROOT).as_posix()
            files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files


def _rewrite_links(text: str, source: str, page: str) -> str:
    """The links of ``source`` (a repository path), made relative to the docs page ``page``."""
    source_dir = posixpath.dirname(source)
    page_dir = posixpath.dirname(page)

    def rewrite(match: re.Match[str]) -> str:
        target = posixpath.normpath(posixpath.join(source_dir, match["target"]))
        anchor = match["anchor"] or ""
        if target in PAGES_FOR:
            target, anchor = PAGES_FOR[target], ""
        elif target.startswith("docs/"):
            target = target.removeprefix("docs/")
        elif not (ROOT / target).is_file():
            raise ValueError(f"{source} links to {match['target']!r}, which does not exist")
        return f"]({posixpath.relpath(target, page_dir or '.')}{anchor})"

    return LINK.sub(rewrite, text)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Replaces each ``<!-- include PATH -->`` line with that file, its links rewritten."""

    def include(match: re.Match[str]) -> str:
        source = match["path"]
        text = (ROOT / source).read_text(encoding="utf-8")
        text = re.sub(r"\A# .*\n", "", text)  # its title: the page has its own
        return _rewrite_links(text, source, page.file.src_uri)

    return INCLUDE.sub(include, markdown)
