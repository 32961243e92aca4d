"""Every step path of alig_torch against the NumPy oracle, on CPU tensors, and the functional form.

``alig_torch._functional.STEP_PATHS`` holds the ways a step runs: ``"host"`` (the CPU),
``"foreach"`` (an accelerator's: branch-free, nothing read back) and ``"single_tensor"``
(the reference, and what ``torch.compile`` traces). On the CPU only ``"host"`` and
``"single_tensor"`` are chosen by themselves; forcing the path runs the accelerator's on
CPU tensors too, so CI checks every path against the shared oracle table
(``tests/support/alig_cases.py``), through :class:`AliG` and through the public
functional :func:`alig_torch.alig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import torch

import alig_cases as table
import alig_core
import alig_torch
from alig_cases import CASES, Case, Step
from alig_core._math import Records, record_step
from alig_core._scalars import python_scalars
from alig_torch import AliG
from alig_torch._functional import _SMALL_TENSOR, STEP_PATHS, project, select_path

PATHS = sorted(STEP_PATHS)
DTYPES = {"float64": (torch.float64, np.float64), "float32": (torch.float32, np.float32)}


class Seen(NamedTuple):
    """What a runner reads after a step: the records and the momentum buffers."""

    records: Records
    buffers: list[np.ndarray | None]


Runner = Callable[[list[torch.Tensor], Step], Seen]
"""One step on ``params`` with ``step``'s gradients and loss."""


def _optimizer_runner(case: Case, path: str, params: list[torch.Tensor]) -> Runner:
    """Steps an :class:`AliG` whose path is forced to ``path``."""
    opt = AliG(params, **case.kwargs)
    opt._step_path = path

    def run(params: list[torch.Tensor], step: Step) -> Seen:
        for p, g in zip(params, step.grads, strict=True):
            p.grad = None if g is None else torch.tensor(g, dtype=p.dtype)
        opt.step(loss=step.loss)
        records = Records(
            float(opt.gamma),
            float(opt.gamma_hat),
            bool(opt.capped),
            int(opt.steps_taken),
            int(opt.steps_skipped),
        )
        buffers = [
            opt.state[p]["momentum_buffer"].numpy() if "momentum_buffer" in opt.state[p] else None
            for p in params
        ]
        return Seen(records, buffers)

    return run


def _functional_runner(case: Case, path: str, params: list[torch.Tensor]) -> Runner:
    """Drives :func:`alig_torch.alig` as an optimizer would: S over the present gradients,
    the buffers of their parameters, the records, the projection over all parameters."""
    config = case.config
    chosen = STEP_PATHS[path]
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    buffers = [torch.zeros_like(p) for p in params]
    used = [False] * len(params)
    records = Records(0.0, 0.0, False, 0, 0)

    def run(params: list[torch.Tensor], step: Step) -> Seen:
        nonlocal records
        present = [i for i, g in enumerate(step.grads) if g is not None]
        grads = [torch.tensor(step.grads[i], dtype=params[i].dtype) for i in present]
        sq = sum(float(torch.sum(g.to(torch.float64) ** 2)) for g in grads)
        with torch.no_grad():
            size = alig_torch.alig(
                [params[i] for i in present],
                grads,
                [buffers[i] for i in present] if config.momentum else [],
                loss=torch.tensor(step.loss, dtype=dtype),
                sq_grad_norm=torch.tensor(sq, dtype=dtype),
                max_lr=math.inf if config.max_lr is None else config.max_lr,
                momentum=config.momentum,
                adjusted_momentum=config.adjusted_momentum,
                eps=config.eps,
                f_star=config.f_star,
                path=path,
            )
            kind = float if chosen.on_host else torch.Tensor  # the path's kind of number
            assert isinstance(size.gamma, kind), (path, type(size.gamma))
            if config.max_norm is not None:
                sq_params = sum(float(torch.sum(p.to(torch.float64) ** 2)) for p in params)
                number = chosen.number(sq_params, params[0].device, dtype)
                project(params, number, max_norm=config.max_norm, skipped=size.skipped, path=chosen)
        if not bool(size.skipped):
            for i in present:
                used[i] = True
        as_numbers = [float(size.gamma), float(size.gamma_hat), bool(size.capped)]
        records = record_step(
            python_scalars, records, alig_core.StepSize(*as_numbers, bool(size.skipped))
        )
        momentum = bool(config.momentum)
        shown = [b.numpy() if u and momentum else None for b, u in zip(buffers, used, strict=True)]
        return Seen(records, shown)

    return run


def _check_against_oracle(
    case: Case,
    dtype_name: str,
    make_runner: Callable[..., Runner],
    path: str,
    shapes: tuple[tuple[int, ...], ...] = table.PARAM_SHAPES,
) -> None:
    dtype, numpy_dtype = DTYPES[dtype_name]
    steps, tol = table.tolerance(numpy_dtype)
    sequence = table.make_sequence(steps, numpy_dtype, pinned=case.pinned_at_cap, shapes=shapes)
    initial = table.initial_params(numpy_dtype, shapes=shapes)
    history = table.run_oracle(case.config, initial, sequence)
    params = [torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in initial]
    run = make_runner(case, path, params)
    gammas = set()
    for t, (step, (expected, state)) in enumerate(zip(sequence, history, strict=True)):
        seen = run(params, step)
        actual = [p.detach().numpy() for p in params]
        assert table.max_relative_deviation(actual, expected) <= tol, f"step {t} ({step.event})"
        assert seen.records.gamma == pytest.approx(state.gamma, rel=tol, abs=tol), f"step {t}"
        assert seen.records.gamma_hat == pytest.approx(state.gamma_hat, rel=tol, abs=tol)
        assert seen.records.capped == state.capped, f"step {t}"
        assert seen.records.steps_taken == state.steps_taken, f"step {t}"
        assert seen.records.steps_skipped == state.steps_skipped, f"step {t}"
        for ours, theirs in zip(seen.buffers, state.buffers, strict=True):
            if theirs is None:  # never had a gradient, or momentum 0: no buffer in use
                assert ours is None or not np.any(ours)
            else:
                assert table.max_relative_deviation([ours], [theirs]) <= max(tol, 1e-12) * 10
        gammas.add(state.gamma)
    if not case.pinned_at_cap:
        assert state.steps_skipped > 0  # the sequence's skipped steps were taken through
        assert len(gammas) > steps // 4, "gamma must move (not pinned at the cap)"


RUNNERS = {"optimizer": _optimizer_runner, "functional": _functional_runner}


@pytest.mark.parametrize("form", list(RUNNERS))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_path_follows_the_oracle(case: Case, dtype_name: str, path: str, form: str) -> None:
    """Every path, forced, through AliG and through the public ``alig_torch.alig`` (with
    ``project``): float64 within 1e-10 over 100 steps, float32 within 1e-5 over 20, records
    and buffers included (the accelerator's path on CPU tensors)."""
    _check_against_oracle(case, dtype_name, RUNNERS[form], path)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_host_path_follows_the_oracle_with_a_large_tensor(case: Case) -> None:
    """The table again with a first parameter of 65,536 entries (``LARGE_PARAM_SHAPES``), in
    float64 (1e-10 over 100 steps): from ``_SMALL_TENSOR`` entries on, the host path (the
    CPU's default) updates each tensor on its own, code that the table's small shapes never
    reach. The other paths have no size threshold: one code for every size."""
    assert math.prod(table.LARGE_PARAM_SHAPES[0]) >= _SMALL_TENSOR > math.prod((4, 3))
    shapes = table.LARGE_PARAM_SHAPES
    _check_against_oracle(case, "float64", _optimizer_runner, "host", shapes)


def test_each_situation_picks_one_path(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)]
    meta = [torch.zeros(3, device="meta")]
    assert select_path(cpu, foreach=True).name == "host"
    assert select_path(cpu, foreach=False).name == "single_tensor"
    assert select_path(meta, foreach=True).name == "foreach"  # any device but the CPU
    assert select_path(meta, foreach=False).name == "single_tensor"
    assert select_path(cpu, foreach=True, path="foreach").name == "foreach"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert select_path(cpu, foreach=True).name == "single_tensor"
    assert select_path(meta, foreach=True).name == "single_tensor"


def test_an_unknown_path_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Unknown step path 'fused'.*'foreach', 'host'"):
        select_path([torch.zeros(1)], foreach=True, path="fused")


def test_the_optimizer_takes_the_path_it_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """AliG asks select_path once per step; on CPU tensors it gets the host path by default
    and the reference with foreach=False."""
    seen: list[str] = []
    import alig_torch._optimizer as optimizer_module

    def spy(*args, **kwargs):
        chosen = select_path(*args, **kwargs)
        seen.append(chosen.name)
        return chosen

    monkeypatch.setattr(optimizer_module, "select_path", spy)
    for foreach in (None, False):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        AliG([p], max_lr=0.1, foreach=foreach).step(loss=1.0)
    assert seen == ["host", "single_tensor"]


@pytest.mark.parametrize("path", PATHS)
def test_the_functional_form_skips_a_non_finite_step_bit_for_bit(path: str) -> None:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator, dtype=torch.float64) for s in ((4, 3), (5,), ())]
    buffers = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    grads[1][2] = math.nan
    before = [t.clone() for t in params + buffers]
    size = alig_torch.alig(
        params, grads, buffers, loss=0.7, sq_grad_norm=math.nan, max_lr=0.1, momentum=0.9,
        adjusted_momentum=False, eps=1e-5, f_star=0.0, path=path,
    )  # fmt: skip
    assert bool(size.skipped)
    for a, b in zip(params + buffers, before, strict=True):
        assert a.numpy().tobytes() == b.numpy().tobytes()


def test_the_functional_form_refuses_missing_buffers() -> None:
    with pytest.raises(ValueError, match=r"momentum=0.9 needs one momentum buffer per parameter"):
        alig_torch.alig(
            [torch.zeros(2)], [torch.ones(2)], [], loss=1.0, sq_grad_norm=2.0, max_lr=0.1,
            momentum=0.9, adjusted_momentum=False, eps=0.0, f_star=0.0,
        )  # fmt: skip


def test_the_functional_form_takes_none_as_no_cap() -> None:
    """``max_lr=None`` and ``inf`` are the same step (the core's one rule), on every path."""
    for path in PATHS:
        steps = []
        for cap in (None, math.inf):
            p = torch.tensor([1.0, -2.0], dtype=torch.float64)
            size = alig_torch.alig(
                [p], [torch.tensor([1.0, 0.0], dtype=torch.float64)], [], loss=5.0,
                sq_grad_norm=1.0, max_lr=cap, momentum=0.0, adjusted_momentum=False, eps=0.0,
                f_star=0.0, path=path,
            )  # fmt: skip
            steps.append((float(size.gamma), bool(size.capped), p.tolist()))
        assert steps[0] == steps[1] == (5.0, False, [-4.0, -2.0]), path
