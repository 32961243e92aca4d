"""A griffe extension for the API reference: ``Example:`` read as ``Examples:``.

The docstrings' sections are titled ``Example:`` (Google style allows both words), and
griffe's Google parser reads only ``Examples:`` as examples, the rest as an admonition
whose ``>>>`` lines would render as text. This extension renames the title before the
docstrings are parsed; the sources stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE_TITLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Renames each docstring's ``Example:`` section title to ``Examples:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called for every object griffe loads, before its docstring is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)
