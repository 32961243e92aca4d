"""alig_torch.Extrapolation against the NumPy oracle on the shared extrapolation table.

Every mode x base (torch.optim.SGD(nesterov=True), AliG standard and adjusted, with and
without projection) x call form, through the checks every adapter runs
(``extrapolation_checks``): the parameters, the anchor, the phase, the counters and the
base's state after every call; d = 0 equals the bare base bit for bit; skipped iterations
leave everything bit for bit (here also on the wrapper's own evaluations).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from extrapolation_cases import CASES, ExtrapolationCase
from extrapolation_checks import ExtrapolationOracleChecks, MakeRun, check_skipped_iterations
from worker_scripts import import_script

HARNESS = import_script(Path(__file__).with_name("extrapolation_worker.py"))


# ---------------------------------------------------------------- the oracle


class TestOracle(ExtrapolationOracleChecks):
    """The shared extrapolation table (``extrapolation_checks``), every row."""

    make_run: ClassVar[MakeRun] = HARNESS.TorchRun
    perturbed_case = "gradient-alig_standard-same_batch"


# ---------------------------------------------------------------- skipped iterations


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_skipped_iterations_leave_everything_bit_for_bit(case: ExtrapolationCase) -> None:
    """SPEC 7, on the wrapper's own evaluations: the anchor, the base's state and the
    counters as they were; the parameters back at the anchor."""
    check_skipped_iterations(HARNESS.TorchRun, case)
