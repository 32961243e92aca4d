"""The functional form of ALI-G, :func:`alig`: one step over lists of tensors.

As in ``torch/optim/sgd.py``: :class:`alig_torch.AliG` keeps the param groups and the
state and calls :func:`alig` once per group; :func:`alig` runs the step along one of the
paths of :data:`STEP_PATHS`, picked in one place, :func:`select_path`:

* ``"host"`` (every tensor on the CPU, ``foreach``): the step size on Python floats
  (:data:`alig_core._scalars.python_scalars`: reading a CPU number costs no synchronisation), the
  squared norm as BLAS dot products, the update with in-place kernels and scalar
  coefficients, as ``torch.optim.SGD`` does;
* ``"foreach"`` (on an accelerator): foreach kernels per (device, dtype) and 0-d tensors,
  branch-free, nothing read back;
* ``"single_tensor"`` (``foreach=False``, and under ``torch.compile``): the readable
  reference, one tensor at a time, out of place, then written back.

Every number comes from :mod:`alig_core`; the paths differ only in how they gather and
write. ``path=`` forces one (``tests/torch/test_torch_paths.py`` runs the oracle table
over every path on CPU tensors, the accelerator's included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

import alig_core
from alig_core import step_size
from alig_core._math import momentum_coefficients, momentum_update, projection_scale
from alig_core._scalars import python_scalars
from alig_torch._norms import (
    SumOfSquares,
    accumulation_dtype,
    by_device_and_dtype,
    foreach_sum_of_squares,
    host_sum_of_squares,
    loop_sum_of_squares,
)

__all__ = [
    "STEP_PATHS",
    "GroupTensors",
    "StepPath",
    "alig",
    "project",
    "project_onto_ball",
    "select_path",
]


class GroupTensors(NamedTuple):
    """The tensors of one group's step, aligned: what a path's update writes in place."""

    params: list[torch.Tensor]
    """The parameters that have a gradient."""
    grads: list[torch.Tensor]
    """Their gradients."""
    buffers: list[torch.Tensor]
    """Their momentum buffers (empty without momentum)."""


Update = Callable[..., None]
"""``(tensors: GroupTensors, size: StepSize, *, momentum, adjusted) -> None``."""


class StepPath(NamedTuple):
    """One way to run the step: the kind of its numbers and its three kernels."""

    name: str
    on_host: bool
    """The step size and the sums are Python floats (else 0-d tensors, nothing read back)."""
    sum_of_squares: SumOfSquares
    update: Update
    """Updates parameters and buffers in place with a :class:`alig_core.StepSize`."""
    scale: Callable[[list[torch.Tensor], Any], None]
    """Multiplies every parameter by the projection factor, in place."""

    @property
    def xp(self) -> Any:
        """The array namespace the core's functions get on this path."""
        return python_scalars if self.on_host else torch

    def number(self, value: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """``value`` (a float or a 0-d tensor) as this path's numbers are."""
        if self.on_host:
            return float(value)
        if isinstance(value, torch.Tensor):
            return value.to(device=device, dtype=dtype)
        return torch.tensor(value, device=device, dtype=dtype)

    def hyperparameter(self, value: Any) -> Any:
        """A group's setting (a float, a 0-d tensor or ``None``) as this path takes it."""
        return float(value) if self.on_host and value is not None else value


def _host_update(
    tensors: GroupTensors, size: alig_core.StepSize, *, momentum: float, adjusted: bool
) -> None:
    """``p`` and ``b`` updated in place with the core's coefficients as Python floats.

    A skipped step returns before touching anything. Tensors under :data:`_SMALL_TENSOR`
    entries are updated together by foreach kernels (one call for all of them), larger
    ones one at a time, each finishing while it is still in cache.
    """
    if size.skipped:
        return
    params, grads, buffers = tensors
    c = momentum_coefficients(size.gamma, momentum=momentum, adjusted_momentum=adjusted)
    small = [i for i, p in enumerate(params) if p.numel() < _SMALL_TENSOR]
    large = [i for i, p in enumerate(params) if p.numel() >= _SMALL_TENSOR]
    if small:
        ps, gs = [params[i] for i in small], [grads[i] for i in small]
        if momentum == 0:
            torch._foreach_add_(ps, gs, alpha=c.param_grad)
        else:
            bs = [buffers[i] for i in small]
            torch._foreach_mul_(bs, c.buffer_decay)
            torch._foreach_add_(bs, gs, alpha=c.buffer_grad)
            torch._foreach_add_(ps, gs, alpha=c.param_grad)
            torch._foreach_add_(ps, bs, alpha=c.param_buffer)
    for i in large:
        p, g = params[i], grads[i]
        if momentum == 0:
            p.add_(g, alpha=c.param_grad)
            continue
        b = buffers[i]
        b.mul_(c.buffer_decay).add_(g, alpha=c.buffer_grad)
        p.add_(g, alpha=c.param_grad).add_(b, alpha=c.param_buffer)


_SMALL_TENSOR = 1 << 16
"""The host path's split between tensors updated together and one at a time (entries)."""


def _single_tensor_update(
    tensors: GroupTensors, size: alig_core.StepSize, *, momentum: Any, adjusted: bool
) -> None:
    """The reference: one parameter at a time, out of place, then written back."""
    params, grads, buffers = tensors
    coefficients = momentum_coefficients(size.gamma, momentum=momentum, adjusted_momentum=adjusted)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        skipped = size.skipped.to(p.device)
        if momentum == 0:
            new_p = alig_core._math.sgd_update(p, g, size.gamma.to(device=p.device, dtype=p.dtype))
        else:
            c = alig_core._math.MomentumCoefficients(*(_like(x, p) for x in coefficients))
            new_p, new_b = momentum_update(p, g, buffers[i], c)
            buffers[i].copy_(alig_core._math.keep_if_skipped(torch, skipped, buffers[i], new_b))
        p.copy_(alig_core._math.keep_if_skipped(torch, skipped, p, new_p))


def _like(value: Any, like: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return value


def _foreach_update(
    tensors: GroupTensors, size: alig_core.StepSize, *, momentum: Any, adjusted: bool
) -> None:
    """Foreach kernels per (device, dtype): branch-free, no host synchronisation.

    A skipped step must leave everything bit-for-bit unchanged without reading
    ``skipped`` back: the gradients are replaced by zeros where the step is skipped (a
    NaN gradient would poison any multiplication), and the coefficients become the
    identity (buffer decay 1, every other coefficient 0).
    """
    tensor_lists = [tensors.params, tensors.grads] + ([tensors.buffers] if momentum != 0 else [])
    for (device, dtype), lists in by_device_and_dtype(tensor_lists).items():
        device_params, device_grads = lists[0], lists[1]
        skipped = size.skipped.to(device)
        zero = torch.zeros((), dtype=dtype, device=device)
        device_grads = [torch.where(skipped, zero, g) for g in device_grads]
        gamma = size.gamma.to(device=device, dtype=dtype)
        c = momentum_coefficients(gamma, momentum=momentum, adjusted_momentum=adjusted)
        if momentum == 0:
            torch._foreach_add_(
                device_params, torch._foreach_mul(device_grads, _as_tensor(c.param_grad, gamma))
            )
            continue
        device_buffers = lists[2]
        decay = torch.where(skipped, 1.0, torch.as_tensor(c.buffer_decay, dtype=dtype))
        param_buffer = torch.where(skipped, 0.0, torch.as_tensor(c.param_buffer, dtype=dtype))
        torch._foreach_mul_(device_buffers, decay.to(device))
        torch._foreach_add_(
            device_buffers, torch._foreach_mul(device_grads, _as_tensor(c.buffer_grad, gamma))
        )
        torch._foreach_add_(
            device_params, torch._foreach_mul(device_grads, _as_tensor(c.param_grad, gamma))
        )
        torch._foreach_add_(
            device_params, torch._foreach_mul(device_buffers, param_buffer.to(device))
        )


def _as_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _host_scale(params: list[torch.Tensor], scale: float) -> None:
    if scale != 1.0 and params:  # inside the ball: bit for bit untouched
        torch._foreach_mul_(params, scale)


def _single_tensor_scale(params: list[torch.Tensor], scale: torch.Tensor) -> None:
    for p in params:
        p.mul_(scale.to(p.device))


def _foreach_scale(params: list[torch.Tensor], scale: torch.Tensor) -> None:
    for (device, _), (tensors, *_) in by_device_and_dtype([params]).items():
        torch._foreach_mul_(tensors, scale.to(device))


STEP_PATHS: dict[str, StepPath] = {
    path.name: path
    for path in (
        StepPath("host", True, host_sum_of_squares, _host_update, _host_scale),
        StepPath(
            "single_tensor", False, loop_sum_of_squares, _single_tensor_update, _single_tensor_scale
        ),
        StepPath("foreach", False, foreach_sum_of_squares, _foreach_update, _foreach_scale),
    )
}
"""Every way to run a step, by name: the one registry."""


def select_path(params: list[torch.Tensor], *, foreach: bool, path: str | None = None) -> StepPath:
    """The one place that picks how a step runs (see the module docstring).

    Args:
      params: the parameters the step updates (every group's, for :class:`AliG`).
      foreach: whether the foreach kernels may be used (``AliG``'s ``foreach`` resolved).
      path: a key of :data:`STEP_PATHS` to force one (tests run every path on CPU tensors).

    Raises:
      ValueError: ``path`` names no registered path.
    """
    if path is not None:
        if path not in STEP_PATHS:
            raise ValueError(
                f"Unknown step path {path!r}; the registered paths are {sorted(STEP_PATHS)}. "
                "Pass one of them, or path=None to let the step choose."
            )
        return STEP_PATHS[path]
    if not foreach or torch.compiler.is_compiling():
        # Traced, the single-tensor body fuses into one kernel, and a compiled foreach body
        # rounds differently: test_compiled_step_equals_eager_without_recompiling.
        return STEP_PATHS["single_tensor"]
    if all(p.device.type == "cpu" for p in params):
        return STEP_PATHS["host"]
    return STEP_PATHS["foreach"]


def alig(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    loss: torch.Tensor | float,
    sq_grad_norm: torch.Tensor | float,
    max_lr: float | torch.Tensor,
    momentum: float,
    adjusted_momentum: bool,
    eps: float,
    f_star: float,
    foreach: bool = False,
    path: str | None = None,
) -> alig_core.StepSize:
    r"""Functional ALI-G: updates ``params`` (and buffers) in place; returns the step size.

    One group's step, as :class:`alig_torch.AliG` takes it (see there for the update rule):

    .. math::

        \gamma = \min\left(\max\left(\frac{l - f_\star}{S + \epsilon}, 0\right),
        \eta\right)

    then each parameter moves with its gradient and buffer, in the momentum convention
    of ``adjusted_momentum``; a step whose ``loss`` or ``sq_grad_norm`` is not finite
    changes nothing. Projection is the caller's, over all parameters (:func:`project`).

    Args:
      params: the parameters that have a gradient.
      grads: their gradients.
      momentum_buffers: one buffer per parameter (zeros at the start) when
        ``momentum != 0``, else empty.
      loss: the loss of the gradients, a float or a 0-d tensor in the accumulation dtype.
      sq_grad_norm: ``S``, the squared global gradient norm (over every group).
      max_lr: the cap ``eta``; ``inf`` (or ``None``) for no cap.
      momentum: ``mu``.
      adjusted_momentum: the momentum convention.
      eps: ``delta``, added to ``S``.
      f_star: the lower bound of the loss.
      foreach: allow the foreach paths (:func:`select_path`).
      path: force a path of :data:`STEP_PATHS` by name.

    Returns:
      The :class:`alig_core.StepSize` taken: Python numbers on the ``"host"`` path, 0-d
      tensors on the others.

    Example:
      >>> p = torch.tensor([1.0, -2.0])
      >>> size = alig([p], [torch.tensor([1.0, 0.0])], [], loss=0.5, sq_grad_norm=1.0,
      ...             max_lr=0.1, momentum=0.0, adjusted_momentum=False, eps=0.0, f_star=0.0)
      >>> p, round(float(size.gamma), 6), bool(size.capped)
      (tensor([ 0.9000, -2.0000]), 0.1, True)
    """
    chosen = select_path(params, foreach=foreach, path=path)
    device = params[0].device if params else torch.device("cpu")
    if chosen.on_host:
        dtype = torch.float64  # the step size on Python floats
    elif isinstance(loss, torch.Tensor):
        dtype = loss.dtype
    else:
        dtype = accumulation_dtype(params)
    size = step_size(
        chosen.xp,
        chosen.number(loss, device, dtype),
        chosen.number(sq_grad_norm, device, dtype),
        max_lr=chosen.hyperparameter(max_lr),
        eps=chosen.hyperparameter(eps),
        f_star=chosen.hyperparameter(f_star),
    )
    if not params:
        return size
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError(
            f"alig(): momentum={momentum} needs one momentum buffer per parameter; got "
            f"{len(momentum_buffers)} buffers for {len(params)} parameters. Pass zeros like "
            "each parameter at the start (torch.zeros_like(p)), then the same buffers."
        )
    chosen.update(
        GroupTensors(params, grads, momentum_buffers),
        size,
        momentum=chosen.hyperparameter(momentum),
        adjusted=adjusted_momentum,
    )
    return size


def project(
    params: list[torch.Tensor],
    sq_param_norm: Any,
    *,
    max_norm: float,
    skipped: Any,
    path: StepPath,
) -> None:
    """Scales ``params`` onto the l2 ball of radius ``max_norm``; nothing on a skipped step.

    ``sq_param_norm`` is the squared norm of all of them, in the path's kind of number.
    """
    scale = projection_scale(path.xp, sq_param_norm, max_norm, skipped=skipped)
    path.scale(params, scale)


def project_onto_ball(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """Projects ``params`` in place onto the l2 ball of radius ``max_norm`` (all of them at once).

    ALI-G never changes parameters at construction: call this once on the initial
    parameters when training with ``max_norm``, so that training starts inside the ball.

    Example:
      >>> w = torch.tensor([3.0, 4.0])
      >>> project_onto_ball([w], max_norm=1.0)
      >>> w
      tensor([0.6000, 0.8000])
    """
    alig_core._config.validate_max_norm(max_norm)
    tensors = list(params)
    if not tensors:
        return
    reference = STEP_PATHS["single_tensor"]
    with torch.no_grad():
        sq_norm = reference.sum_of_squares(tensors, accumulation_dtype(tensors), tensors[0].device)
        project(tensors, sq_norm, max_norm=max_norm, skipped=None, path=reference)
