"""The site's build tools (tools/): the docstrings' reST rewritten into Markdown, and the
benchmarks' README included with its links pointing at the files the site serves."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


griffe_rest = _load("griffe_rest")
mkdocs_hooks = _load("mkdocs_hooks")


def test_roles_become_inline_code() -> None:
    text = "See :class:`AliG`, :func:`alig_core.step_size` and :meth:`~torch.optim.Optimizer.step`."
    assert griffe_rest.rest_to_markdown(text) == ("See `AliG`, `alig_core.step_size` and `step`.")


def test_math_becomes_arithmatex_and_example_sections_are_read_as_examples() -> None:
    text = textwrap.dedent(
        """\
        The step :math:`\\gamma_t`:

        .. math::

            \\gamma = \\min(\\hat\\gamma, \\eta)

        Example:
          >>> 1 + 1
          2
        """
    )
    assert griffe_rest.rest_to_markdown(text) == textwrap.dedent(
        """\
        The step $\\gamma_t$:

        $$
        \\gamma = \\min(\\hat\\gamma, \\eta)
        $$

        Examples:
          >>> 1 + 1
          2"""
    )


def test_a_one_line_math_directive_keeps_its_continuation_lines() -> None:
    text = "Scale:\n\n.. math::  N = a, \\qquad\n           s = b\n\nThen."
    assert griffe_rest.rest_to_markdown(text) == "Scale:\n\n$$\nN = a, \\qquad\ns = b\n$$\n\nThen."


def test_a_note_becomes_an_admonition_and_ends_with_its_indent() -> None:
    text = "Intro.\n\n.. note::\n    **Bold.** First line\n    second line.\n\nAfter."
    assert griffe_rest.rest_to_markdown(text) == (
        "Intro.\n\n!!! note\n\n    **Bold.** First line\n    second line.\n\nAfter."
    )


def test_the_benchmarks_links_point_at_the_served_files() -> None:
    text = (
        "[README](../README.md#set-up), [below](#step-time), "
        "[gamma](convergence/gamma.png), [spec](../docs/specification.md#2-hyperparameters), "
        "[paper](https://arxiv.org/abs/1906.05661)"
    )
    assert mkdocs_hooks._rewrite_links(text, "benchmarks/README.md", "benchmarks.md") == (
        "[README](getting-started.md), [below](#step-time), "
        "[gamma](benchmarks/convergence/gamma.png), [spec](specification.md#2-hyperparameters), "
        "[paper](https://arxiv.org/abs/1906.05661)"
    )


def test_a_link_to_a_missing_file_stops_the_build() -> None:
    with pytest.raises(ValueError, match=r"no_such\.png"):
        mkdocs_hooks._rewrite_links("[x](no_such.png)", "benchmarks/README.md", "benchmarks.md")
