"""A griffe extension for the API reference: the docstrings' reST markup read as Markdown.

The docstrings are Google style with a few reST habits (Sphinx roles, ``.. math::``,
``.. note::``, ``Example:`` sections) that the Markdown renderer of mkdocstrings would show
as typed. This extension rewrites them, before the docstrings are parsed, into what the
site renders (the sources stay as they are):

- ``Example:`` -> ``Examples:`` (griffe's Google parser reads only the plural as examples);
- ``:class:`Name``` and the other roles -> ```Name``` (inline code, no link);
- ``:math:`x``` -> ``$x$`` and a ``.. math::`` block -> ``$$ ... $$`` (pymdownx.arithmatex,
  typeset by MathJax);
- ``.. note::`` / ``.. warning::`` -> an admonition (``!!! note``).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

EXAMPLE_TITLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):`~?(?P<name>[^`]+)`")
MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<name>math|note|warning)::[ \t]*(?P<rest>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _directives(text: str) -> str:
    """``.. math::``, ``.. note::`` and ``.. warning::`` blocks, in Markdown."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["rest"]] if match["rest"] else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        inner = textwrap.dedent("\n".join(body[1:] if match["rest"] else body)).strip("\n")
        if match["rest"]:  # ``.. math::  formula`` with its continuation lines
            inner = match["rest"].strip() + ("\n" + inner if inner else "")
        if match["name"] == "math":
            block = [
                f"{indent}$$",
                *(indent + line for line in inner.splitlines()),
                f"{indent}$$",
            ]
        else:
            block = [f"{indent}!!! {match['name']}", ""]
            block += [(indent + "    " + line) if line else "" for line in inner.splitlines()]
        if out and out[-1].strip():
            out.append("")
        out += [*block, ""]
    return "\n".join(out)


def rest_to_markdown(text: str) -> str:
    """The docstring ``text`` with its reST markup rewritten (see the module's docstring)."""
    text = EXAMPLE_TITLE.sub(r"\1Examples:", text)
    text = _directives(text)
    text = MATH_ROLE.sub(lambda m: f"${m['tex']}$", text)
    return ROLE.sub(
        lambda m: f"`{m['name'].rsplit('.', 1)[-1] if m[0].count('~') else m['name']}`", text
    )


class RestToMarkdown(griffe.Extension):
    """Rewrites each docstring's reST markup into Markdown before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called for every object griffe loads, before its docstring is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = rest_to_markdown(obj.docstring.value)
