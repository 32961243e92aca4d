"""The test matrix: one session per framework, a parity session with all of them.

``nox`` runs every session but ``demo``; ``nox -s demo`` runs the main job. Each session
installs only what it needs, at the versions of ``requirements/pins.txt`` (a constraints
file), and tells the tests which frameworks it covers through ``ALIG_TEST_FRAMEWORKS``
(see ``tests/conftest.py``). A session whose test folder holds no test yet is reported as
skipped, with the reason, never as passed.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
PINS = str(ROOT / "requirements" / "pins.txt")
TEST_TOOLS = ("numpy", "pytest", "hypothesis")
EVERY_FRAMEWORK = ("torch", "tensorflow-cpu", "keras", "jax", "jaxlib", "optax")
BENCHMARK_TOOLS = ("scikit-learn", "matplotlib")  # the datasets (load_digits, ...) and figures
INTEGRATIONS = ("lightning", "accelerate", "transformers", "flax")
DOCS_TOOLS = ("mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python", "ruff")
"""The site's builder; ruff formats the API reference's signatures (mkdocstrings calls it)."""
PARALLEL_TOOLS = ("pytest-xdist",)
"""The docs session's blocks and examples are each a fresh process, mostly importing a
framework: two at a time on the CI machine's two cores (``pytest -n 2``)."""
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}

nox.options.sessions = [
    "lint",
    "core",
    "torch",
    "jax",
    "tf",
    "keras_jax",
    "keras_torch",
    "integrations",
    "parity",
    "docs",
]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


def _install(session: nox.Session, *packages: str, env: dict[str, str] | None = None) -> None:
    session.install("-c", PINS, "-e", ".", *TEST_TOOLS, *packages, env=env)


def _run_tests(
    session: nox.Session,
    folder: str,
    frameworks: str,
    env: dict[str, str] | None = None,
    doctests: str | None = None,
    doctest_ignore: tuple[str, ...] = (),
) -> None:
    """Runs pytest on ``tests/<folder>`` (and the doctests of ``src/<doctests>``, but the
    modules of ``doctest_ignore``), or skips the session, loudly, if the folder has no test."""
    if not any((ROOT / "tests" / folder).glob("**/test_*.py")):
        session.skip(f"tests/{folder} holds no test yet: nothing was run for '{session.name}'")
    run_env = {"ALIG_TEST_FRAMEWORKS": frameworks, **QUIET_TF, **(env or {})}
    if doctests:  # a run of its own: --doctest-modules would import every file it is given
        # integrations/ imports trainers that only the integrations session installs
        ignore = [f"--ignore=src/{doctests}/{name}" for name in ("integrations", *doctest_ignore)]
        session.run("pytest", "--doctest-modules", f"src/{doctests}", *ignore, env=run_env)
    session.run(
        "pytest",
        f"tests/{folder}",
        *session.posargs,
        env=run_env,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) over the whole tree, mypy over ``src/`` (see pyproject.toml).

    mypy needs the typed frameworks (torch, jax, numpy) to check the adapters against their
    APIs; Keras, optax, TensorFlow and the trainers publish no types and are read as Any.
    """
    session.install("-c", PINS, "ruff", "mypy", "numpy", "torch", "jax", "jaxlib")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def core(session: nox.Session) -> None:
    """alig_core and its oracle, with NumPy only (no framework installed)."""
    _install(session)
    session.run(
        "pytest",
        "--doctest-modules",
        "src/alig_core",
        *session.posargs,
        env={"ALIG_TEST_FRAMEWORKS": "core"},
    )
    _run_tests(session, "core", "core")


@nox.session
def torch(session: nox.Session) -> None:
    """The torch.optim adapter (expecttest: torch's own optimizer test harness imports it)."""
    _install(session, "torch", "expecttest")
    _run_tests(session, "torch", "torch", doctests="alig_torch")


@nox.session
def jax(session: nox.Session) -> None:
    """The optax adapter (2 host devices for the sharding tests)."""
    _install(session, "jax", "jaxlib", "optax")
    _run_tests(
        session,
        "jax",
        "jax",
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        doctests="alig_jax",
    )


def _keras_tests(session: nox.Session, backend: str, *packages: str) -> None:
    """The Keras tests and alig_tf's doctests on one backend (fixed at import: a session each)."""
    _install(session, "keras", *packages)
    # alig_tf._tensorflow imports TensorFlow, installed in the TensorFlow session only
    tensorflow_only = () if backend == "tensorflow" else ("_tensorflow.py",)
    _run_tests(
        session,
        "keras",
        "keras",
        {"KERAS_BACKEND": backend},
        doctests="alig_tf",
        doctest_ignore=tensorflow_only,
    )


@nox.session
def tf(session: nox.Session) -> None:
    """The Keras 3 optimizer on the TensorFlow backend."""
    _keras_tests(session, "tensorflow", "tensorflow-cpu")


@nox.session
def keras_jax(session: nox.Session) -> None:
    """The Keras 3 optimizer on the JAX backend."""
    _keras_tests(session, "jax", "jax", "jaxlib")


@nox.session
def keras_torch(session: nox.Session) -> None:
    """The Keras 3 optimizer on the torch backend."""
    _keras_tests(session, "torch", "torch")


@nox.session
def integrations(session: nox.Session) -> None:
    """Lightning, accelerate, transformers' Trainer, DeepSpeed and flax.nnx.Optimizer (installed
    here only). DeepSpeed installs from its sdist with no op built (``DS_BUILD_OPS=0``); the
    tests skip the one op it compiles at init."""
    _install(
        session,
        "torch",
        "lightning",
        "accelerate",
        "transformers",
        "jax",
        "jaxlib",
        "optax",
        "flax",
        "deepspeed",
        env={"DS_BUILD_OPS": "0"},
    )
    _run_tests(session, "integrations", "integrations")


@nox.session
def parity(session: nox.Session) -> None:
    """Every framework on the same model from the same start, plus the benchmark smoke runs."""
    _install(session, *EVERY_FRAMEWORK, *BENCHMARK_TOOLS, "pytorch_optimizer")
    _run_tests(session, "parity", "parity", {"KERAS_BACKEND": "tensorflow"})


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site: every ```python block of README.md and docs/ runs (``tests/docs``), the
    examples run (``tests/examples``), then ``mkdocs build --strict`` builds the site into
    ``site/``, warnings as errors (a broken link or API reference fails)."""
    _install(
        session, *EVERY_FRAMEWORK, *INTEGRATIONS, *BENCHMARK_TOOLS, *DOCS_TOOLS, *PARALLEL_TOOLS
    )
    folders = [name for name in ("docs", "examples") if (ROOT / "tests" / name).is_dir()]
    session.run(
        "pytest",
        "-n",
        "2",
        *(f"tests/{name}" for name in folders),
        *session.posargs,
        env={"ALIG_TEST_FRAMEWORKS": ",".join(folders), "KERAS_BACKEND": "tensorflow", **QUIET_TF},
    )
    session.chdir(ROOT)
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: the README's first command."""
    _install(session, *EVERY_FRAMEWORK, *BENCHMARK_TOOLS)
    session.chdir(ROOT)  # ``benchmarks`` is a package: run from the repository root
    session.run(
        "python",
        "-m",
        "benchmarks.parity",
        *session.posargs,
        env={"KERAS_BACKEND": "tensorflow", **QUIET_TF},
    )
