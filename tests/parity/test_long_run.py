"""The long run (``benchmarks.long_run``): 20,000 steps per framework, no NaN, gamma in
[0, max_lr], the loss into the interpolation regime, and no growth of resident memory."""

from __future__ import annotations

import pytest

from benchmarks import long_run


@pytest.fixture(scope="module")
def problem() -> long_run.Problem:
    return long_run.make_problem(20_000)


@pytest.mark.parametrize("framework", long_run.FRAMEWORKS)
def test_twenty_thousand_steps_stay_finite_bounded_and_lean(framework, problem) -> None:
    result = long_run.RUNNERS[framework](problem)
    assert result.failures() == [], result
    assert result.rss_after_warm_up > 0  # the memory check really measured something
