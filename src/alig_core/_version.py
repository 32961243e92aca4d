"""The version of the installed ``alig`` distribution, for every package's ``__version__``.

``alig_core``, ``alig_torch``, ``alig_jax`` and ``alig_tf`` are four import packages of one
distribution, ``alig``; each ``__version__`` is that distribution's version, read from its
installed metadata (so it is the one place a version is written: ``pyproject.toml``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["UNKNOWN_VERSION", "distribution_version"]

UNKNOWN_VERSION = "0+unknown"
"""The version reported when the distribution is not installed (the sources put on
``sys.path`` by hand): a valid PEP 440 version that sorts before every release."""


def distribution_version(distribution: str = "alig") -> str:
    """The installed version of ``distribution``, or :data:`UNKNOWN_VERSION` if it is not installed.

    Args:
      distribution: the distribution's name (``"alig"``, the one these packages ship in).

    Returns:
      The version string from the distribution's metadata, e.g. ``"0.1.0"``.

    Example:
      >>> distribution_version("no-such-distribution-installed")
      '0+unknown'
    """
    try:
        return version(distribution)
    except PackageNotFoundError:
        return UNKNOWN_VERSION
