"""The benchmarks: a package, run as modules from the repository root.

``python -m benchmarks.parity`` (the main job), ``benchmarks.convergence``,
``benchmarks.large_batch``, ``benchmarks.long_run``, ``benchmarks.step_time``,
``benchmarks.step_time_distributed`` and ``benchmarks.extrapolation_cost``; what each
measures and its results:
``benchmarks/README.md``. The tests import from it as ``benchmarks.<module>`` (pytest puts
the repository root on the path: ``pythonpath`` in ``pyproject.toml``).
"""
