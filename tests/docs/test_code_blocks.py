"""Every ```python block of README.md and docs/**/*.md runs as pasted.

Each block is written to a file and run as a standalone script by a fresh Python process,
in an empty temporary folder, with TensorFlow quiet and ``KERAS_BACKEND=tensorflow`` (a
block that wants another backend sets ``os.environ["KERAS_BACKEND"]`` before importing
Keras). A block fails with its stderr, whose tracebacks give the lines of the page. The
test ids are ``file:line`` (the line of the opening fence).

A block that must not run (several processes, a GPU) is fenced ```python {.notest}: the
class in braces is what MkDocs (pymdownx.superfences) renders as Python and GitHub too.
Such blocks are not collected. So that no block escapes the runner, a fence that looks like
Python under another tag (```py, ```python3, ```Python ...), a ```python fence that MkDocs
would not render (```python notest, the bare word), and an untagged block that imports
something fail ``test_no_block_escapes_the_runner``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")))
BLOCK_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "KERAS_BACKEND": "tensorflow",
}
TIMEOUT_S = 600
"""A block runs in seconds; this only ends one that hangs."""

OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*?)[ \t]*$")
PYTHON_LIKE = re.compile(r"i?py(thon)?[0-9.]*|pycon|pyi|python-?repl", re.IGNORECASE)
"""Language tags that mean Python to a reader or a highlighter, ``python`` aside."""
FENCE_OPTIONS = re.compile(r"(\{[^{}]*\}|([A-Za-z][\w-]*=\"[^\"]*\"[ \t]*)*)")
"""What pymdownx.superfences accepts after the language: ``{.class ...}`` or key="value"."""
IMPORT_LINE = re.compile(r"^\s*(import [\w.]+|from [\w.]+ import )", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """A fenced code block of a Markdown file."""

    path: Path
    line: int
    """The line of its opening fence, from 1."""
    language: str
    classes: frozenset[str]
    options: str
    """What follows the language on the fence line."""
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def runs(self) -> bool:
        # the bare word too: the author meant it, test_no_block_escapes_the_runner fails on it
        notest = "notest" in self.classes or "notest" in self.options.split()
        return self.language == "python" and not notest

    def escape_reason(self) -> str | None:
        """Why this block would escape the runner unnoticed, or None."""
        if self.language == "python":
            if not FENCE_OPTIONS.fullmatch(self.options):
                return (
                    f"the fence's {self.options!r} after 'python' is no pymdownx.superfences "
                    "syntax: MkDocs renders the block as plain text; to keep a block from "
                    "running, fence it ```python {.notest}"
                )
            return None
        if PYTHON_LIKE.fullmatch(self.language):
            return (
                f"language tag {self.language!r}: only ```python blocks run; tag it python "
                "(or python {.notest} for a block that must not run)"
            )
        if not self.language and IMPORT_LINE.search(self.code):
            return (
                "an untagged block that imports: tag it python (or python {.notest}), or "
                "text if it is not code"
            )
        return None


def _parse_info(info: str) -> tuple[str, frozenset[str], str]:
    """(language, classes, options) of a fence's info string."""
    if info.startswith("{") and info.endswith("}"):  # ```{.python .notest}
        names = [t[1:] for t in info[1:-1].split() if t.startswith(".")]
        return (names[0] if names else ""), frozenset(names[1:]), ""
    language, _, options = info.partition(" ")
    options = options.strip()
    classes = re.fullmatch(r"\{([^{}]*)\}", options)
    names = classes[1].split() if classes else []
    return language, frozenset(t[1:] for t in names if t.startswith(".")), options


def parse_blocks(path: Path, text: str) -> list[Block]:
    """The fenced code blocks of ``text`` (CommonMark's rules for fences, nested ones kept
    inside their outer block; a fence in a list item has its indent removed)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = OPENING.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            strip = len(line) - len(line.lstrip(" \t"))
            body.append(line[min(indent, strip) :])
            j += 1
        language, classes, options = _parse_info(opening["info"])
        code = "\n".join(body) + "\n"
        blocks.append(Block(path, i + 1, language, classes, options, code))
        i = j + 1
    return blocks


BLOCKS = [block for path in SOURCES for block in parse_blocks(path, path.read_text("utf-8"))]
RUNNABLE = [block for block in BLOCKS if block.runs]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_code_block_runs(block: Block, tmp_path: Path) -> None:
    # named after its page, its lines where they are on the page: a traceback's "File
    # "README.md.py", line 130" is line 130 of README.md
    script = tmp_path / f"{block.path.name}.py"
    script.write_text("\n" * block.line + block.code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, **BLOCK_ENV},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"the ```python block at {block.id} exited with {result.returncode}; "
            f"its stderr:\n{result.stderr}",
            pytrace=False,
        )


def test_no_block_escapes_the_runner() -> None:
    escaped = [f"{b.id}: {reason}" for b in BLOCKS if (reason := b.escape_reason())]
    assert not escaped, "blocks that the runner would skip unnoticed:\n" + "\n".join(escaped)


def test_the_sources_hold_runnable_blocks() -> None:
    # README.md is the entry: a glob or a parser gone wrong would collect nothing and pass
    assert any(block.path.name == "README.md" for block in RUNNABLE)


# The collector itself, on Markdown written here.

SAMPLE = """\
```python
print("runs")
```

```python {.notest}
raise SystemExit("skipped")
```

```{.python .notest}
raise SystemExit("skipped too")
```

````markdown
```python
print("an example of Markdown: not run")
```
````

1. a list item

    ```python title="train.py"
    import os
    ```

```bash
pip install alig
```
"""


def _sample(text: str) -> list[Block]:
    return parse_blocks(ROOT / "sample.md", text)


def test_the_collector_runs_python_blocks_and_skips_notest_ones() -> None:
    blocks = _sample(SAMPLE)
    assert [(b.line, b.language, b.runs) for b in blocks] == [
        (1, "python", True),
        (5, "python", False),
        (9, "python", False),
        (13, "markdown", False),
        (21, "python", True),
        (25, "bash", False),
    ]
    assert blocks[0].code == 'print("runs")\n'
    assert blocks[4].code == "import os\n"  # the list item's indent removed
    assert blocks[0].id == "sample.md:1"
    assert all(b.escape_reason() is None for b in blocks)


@pytest.mark.parametrize(
    "fence",
    ["```py", "```py3", "```python3", "```Python", "```pycon", "```{.py}", "```python notest"],
)
def test_a_block_that_would_escape_is_reported(fence: str) -> None:
    (block,) = _sample(f"{fence}\nprint(1)\n```\n")
    assert not block.runs
    assert block.escape_reason() is not None


def test_an_untagged_block_that_imports_is_reported() -> None:
    untagged, text = _sample("```\nimport torch\n```\n\n```\ngamma = min(g, max_lr)\n```\n")
    assert untagged.escape_reason() is not None
    assert text.escape_reason() is None
