"""ALI-G as a ``torch.optim.Optimizer``: the class :class:`AliG`.

As in ``torch/optim/sgd.py``, the class validates, keeps the param groups and the state,
resolves the loss of a step and calls the functional form once per group
(:func:`alig_torch._functional.alig`, which picks how the step runs). The sums of squares
are :mod:`alig_torch._norms`' (and, over the ranks, :mod:`alig_torch._distributed`'s); what
a param group and a checkpoint may hold is checked in :mod:`alig_torch._groups`; the
records live in :mod:`alig_torch._records`; the numbers and the records' transitions come
from :mod:`alig_core`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, NoReturn

import torch
from torch.optim.optimizer import Optimizer

import alig_core
from alig_core import AliGConfig
from alig_core._config import describe_value, validate_max_lr
from alig_core._scalars import python_scalars
from alig_torch import _distributed
from alig_torch._accumulation import INTEGRATIONS_HELP, Accumulation
from alig_torch._deepspeed_guard import check_stepped_by_deepspeed
from alig_torch._functional import StepPath, alig, project, select_path
from alig_torch._groups import (
    CONVENTION_KEY,
    FRESH_STATE_HELP,
    cap_argument,
    check_group_hyperparameters,
    check_group_keys,
    check_group_params,
    check_keyword_options,
    check_saved_group,
    check_step_caps,
    stored_cap,
)
from alig_torch._loss import LossIntake, LossNames, loss_as_tensor
from alig_torch._norms import Norms, accumulation_dtype
from alig_torch._records import RecordProperty, stored_shape, write_records

__all__ = ["AliG"]


def _refuse_as_not_a_state_dict(state_dict: Any) -> NoReturn:
    keys = f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""
    raise ValueError(
        f"AliG.load_state_dict needs an optimizer state_dict (a dict with 'state' and "
        f"'param_groups'), got {type(state_dict).__name__}{keys}. {FRESH_STATE_HELP}"
    )


def _checked_for_loading(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """AliG's check of a state to load, run as torch's last ``load_state_dict`` pre-hook."""
    assert isinstance(optimizer, AliG)
    return optimizer._checked(state_dict)


_LOSS_HELP = (
    "ALI-G computes its step size from the loss of the gradient it applies. Hand it over in "
    "one of these ways: opt.step(closure) with a closure that zeroes the gradients, computes "
    "the loss, calls loss.backward() and returns the loss (as for torch.optim.LBFGS; "
    "Lightning's automatic optimization passes one); opt.step(loss=loss) after "
    "loss.backward(); with gradient accumulation, opt.add_loss(loss) after each backward() "
    "(the loss as it was backpropagated, e.g. divided by the number of micro-batches) then "
    "opt.step(), or opt.step(loss=[loss_1, ..., loss_k]); with a GradScaler, "
    "scaler.unscale_(opt); scaler.step(opt, loss=loss) with the unscaled loss (or "
    "opt.add_loss(loss) of the unscaled loss, then scaler.step(opt)). In a trainer: "
    f"{INTEGRATIONS_HELP}"
)


_NAMES = LossNames(
    step="AliG.step",
    who="ALI-G",
    no_loss=f"AliG.step() got no loss. {_LOSS_HELP}",
    loss_help=_LOSS_HELP,
)
"""How AliG's loss intake names it in its errors."""

_NOT_GIVEN: Any = object()


class _Sums:
    """The sum of squares of a step's path; with ``once``, computed once per list of tensors.

    ``S`` is taken once per call of the extrapolation wrapper even where it is asked twice:
    this rank's (for the core's skip rule), then in the ranks' agreement on the same
    gradients (the same tensors, by identity). AliG's own step asks once and keeps nothing
    (a compiled step would guard on the tensors' ids).
    """

    __slots__ = ("accumulate", "device", "done", "path")

    def __init__(
        self, path: StepPath, accumulate: torch.dtype, device: torch.device, *, once: bool
    ) -> None:
        self.path, self.accumulate, self.device = path, accumulate, device
        self.done: dict[tuple[int, ...], Any] | None = {} if once else None

    def __call__(self, tensors: list[torch.Tensor]) -> Any:
        if self.done is None:
            return self.path.sum_of_squares(tensors, self.accumulate, self.device)
        key = tuple(map(id, tensors))
        if key not in self.done:
            self.done[key] = self.path.sum_of_squares(tensors, self.accumulate, self.device)
        return self.done[key]


class _Evaluation(NamedTuple):
    """One step's inputs: this rank's checked tensors and ``(loss, S)``.

    ``(loss, S)`` are those the ranks agreed on, or this rank's until :meth:`AliG._agreed`.
    """

    loss: Any
    sq_grad_norm: Any
    groups: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]
    path: StepPath
    sums: _Sums
    norms: Norms
    device: torch.device
    accumulate: torch.dtype


"""The default of ``AliG(lr=...)``: not given (``None`` is a value of the cap: no cap)."""


class AliG(Optimizer):
    r"""ALI-G: SGD with the Polyak step size, capped at ``max_lr``.

    .. math::

        \gamma_t = \min\left(\max\left(\frac{l_t - f_\star}{\|g_t\|^2 + \epsilon}, 0\right),
        \eta\right)

    where :math:`l_t` is the minibatch loss and :math:`\|g_t\|^2` the squared gradient
    norm over every parameter of every group (one global norm, before momentum). Then,
    for each parameter with a gradient, with buffer :math:`b` (zero at the start):

    * ``momentum == 0``: :math:`p \leftarrow p - \gamma g`;
    * standard (``adjusted_momentum=False``, the paper's PyTorch code):
      :math:`b \leftarrow \mu b - \gamma g`, :math:`p \leftarrow p - \gamma g + \mu b`;
    * adjusted (``adjusted_momentum=True``):
      :math:`b \leftarrow \mu b - g`, :math:`p \leftarrow p - \gamma g + \gamma\mu b`.

    With ``max_norm``, all parameters are then scaled onto the l2 ball of that radius.
    A step whose loss or gradient norm is not finite is skipped: parameters and buffers
    stay bit-for-bit as they were and ``steps_skipped`` goes up.

    .. note::
        **Momentum conventions.** The standard convention keeps ``-gamma * g`` in the
        buffer, so a past step keeps the step size it was taken with. The adjusted one
        keeps ``-g`` and multiplies by the current gamma: it is what
        ``torch.optim.SGD(nesterov=True)`` (and TF1's Nesterov ``MomentumOptimizer``) do
        with ``lr = gamma``. The two agree while gamma is constant (e.g. pinned at
        ``max_lr``) and differ as soon as it moves, which it always does in ALI-G. The
        buffers also differ: standard buffers hold ``-gamma * g``, adjusted ones ``-g``.

    The loss reaches the optimizer in one of these ways:

    * ``opt.step(closure)``: the closure is called under ``torch.enable_grad()`` and must
      return the loss (Lightning's automatic optimization passes one);
    * ``opt.step(loss=loss)``: after ``loss.backward()``; with
      ``torch.amp.GradScaler``, call ``scaler.unscale_(opt)`` then
      ``scaler.step(opt, loss=loss)`` with the *unscaled* loss (GradScaler refuses
      closures);
    * gradient accumulation: :meth:`add_loss` after each ``backward()`` then
      ``opt.step()``, or ``opt.step(loss=[loss_1, ..., loss_k])``: the loss of a summed
      gradient is the sum of the losses that were backpropagated. The optimizer counts
      the backward passes that reached its parameters and refuses a step given one
      micro-batch's loss for a gradient of several;
    * trainers: :mod:`alig_torch.integrations` (Lightning's ``AliGCallback`` for
      ``accumulate_grad_batches`` and fp16 AMP, a ``backward`` helper for accelerate, an
      ``AliGTrainer`` for Hugging Face transformers). Without the callback, Lightning's
      fp16 AMP plugin calls ``scaler.step(opt)`` with no loss: that raises, it never steps
      with a stale value.

    On an accelerator and under ``torch.compile`` the step size stays a 0-d tensor: no
    ``.item()`` or host synchronisation, so ``torch.compile(opt.step.__wrapped__,
    fullgraph=True)`` traces a step. When every tensor is on the CPU (and ``foreach`` is
    not ``False``), where reading a number back costs no synchronisation, the step size is
    computed on Python floats (float64) and the update runs with scalar coefficients, as
    ``torch.optim.SGD`` does: Python arithmetic instead of a dozen 0-d tensor operations.
    These are the step paths of :mod:`alig_torch._functional` (``"foreach"``,
    ``"host"``, ``"single_tensor"`` for ``foreach=False``), picked in one place.

    **Monitoring.** After each step, every param group holds 0-d tensors ``gamma``,
    ``gamma_hat`` and ``capped`` (of the last step taken; kept as they were on a skipped
    step), and ``steps_taken`` / ``steps_skipped`` counters; the properties of the same
    names read them from the first group.

    **Distributed.** When ``torch.distributed`` is initialized and ``process_group`` (the
    default group unless given) has more than one rank, every step makes one small
    collective over it (a single process makes none): each rank hands in its loss and the
    sums of squares of its gradients, and every rank takes the same step, the one of the
    global batch: the loss is the ranks' mean (``all_reduce_loss=False``: their common
    value, which must then be the global mean on every rank), and the squared gradient norm
    adds the parts that ranks hold alone (``partitioned``: a ZeroRedundancyOptimizer
    partition, FSDP1 shards; DTensors by their placements) and counts once the gradients
    every rank holds whole (DDP). The ranks also check that they agree: a rank whose loss or
    gradients are refused, ranks configured differently, different replicated gradients
    (e.g. a sharded optimizer without ``partitioned=True``) or different losses with
    ``all_reduce_loss=False`` raise the same error on every rank, after the collective,
    so that none is left waiting in one. See the "Distributed and sharded training" table
    of ``docs/guides/torch.md``.

    **Checkpoints and other optimizers' options.** :meth:`state_dict` records each
    group's momentum convention; :meth:`load_state_dict` refuses another optimizer's state
    (``torch.optim.SGD``'s buffers hold ``+(mu*b + g)``, the opposite sign of both
    conventions), a state whose convention cannot be read, and one of the other convention.
    Param-group keys of other optimizers that would be ignored or change the step
    (``weight_decay``: use ``max_norm``; ``nesterov``: use ``adjusted_momentum``;
    ``dampening``, ``maximize``, ``betas``, ``fused``, ...) raise a ``ValueError``; LR
    schedulers' keys and a user's own are kept. OneCycleLR and CyclicLR cycle the group's
    ``momentum`` by default (``cycle_momentum=True``), as for ``torch.optim.SGD``: each step
    uses the momentum of that step; pass ``cycle_momentum=False`` to keep it fixed.

    Args:
      params: the parameters to optimize, or dicts defining param groups (each may set
        ``max_lr``/``lr``, ``momentum``, ``adjusted_momentum``, ``eps``, ``f_star``).
      max_lr: the cap ``eta`` on the step size, stored as the group's ``lr`` so that LR
        schedulers drive it; ``None`` for no cap (stored as ``lr = inf``; a scheduler on it
        is refused at the first step: give a finite cap to schedule). A number, or a
        one-element tensor (kept as a 0-d one, as ``torch.optim`` takes a tensor ``lr``).
        A cap that an LR scheduler or a hand drives below 0 raises at the step, before
        anything moves (a tensor cap is not read back: its step is taken with gamma 0).
      momentum: ``mu``, with ``0 <= mu < 1``.
      adjusted_momentum: the momentum convention (see the note).
      eps: ``delta``, added to the squared gradient norm.
      f_star: the lower bound of the loss.
      max_norm: radius of the l2-ball constraint on all parameters; ``None`` for none.
        See :func:`project_onto_ball` for the initial parameters.
      foreach: use the foreach implementation (default: on when all tensors are on a
        device that supports it, as in ``torch.optim``).
      all_reduce_loss: average the loss over ``process_group`` (see above); ``False``
        only if the loss you pass is already the mean of the global batch (the ranks then
        check that they got the same one).
      partitioned: whether each rank's AliG holds only a part of the parameters, the
        others lying on the other ranks of ``process_group``, so that the sums of squares
        (of the gradients, and of the parameters for ``max_norm``) are added over the
        ranks: ``True`` under ``torch.distributed.optim.ZeroRedundancyOptimizer`` (pass
        it with ZeRO's other keyword arguments) and FSDP1 with ``use_orig_params=True``
        and a strategy that shards; ``False`` where every rank holds every parameter (DDP,
        FSDP1 ``NO_SHARD``). ``None`` (the default) is ``False``, except for FSDP1 flat
        parameters (``use_orig_params=False``), whose sharding AliG reads itself; FSDP1's
        original parameters (``use_orig_params=True``) need it given. DTensors (FSDP2,
        tensor parallel) need nothing.
      process_group: the ranks that split the batch: the loss is averaged, partitioned
        sums are added and the agreement is checked over them; ``None`` for the default
        group. Not kept by ``pickle``/``copy.deepcopy`` (a process group cannot be copied):
        a copy uses the default group.
      lr: another name of ``max_lr`` (the key the param groups keep it under, as in every
        torch optimizer); giving both is a ``ValueError``.
      **other_options: the options of other torch optimizers are accepted with the value
        that changes nothing (``weight_decay=0``, ``maximize=False``, ``fused=None``,
        ``differentiable=False``, ...) and otherwise refused with a ``ValueError`` that says
        what to use instead (``weight_decay``: ``max_norm``; ``nesterov``:
        ``adjusted_momentum``); an unknown name is a ``ValueError`` listing AliG's arguments.

    Raises:
      TypeError: ``params`` is a single tensor (as ``torch.optim``'s optimizers raise).
      ValueError: an invalid setting, with its value and what to pass instead.

    Example:
      >>> model = torch.nn.Linear(3, 1)
      >>> opt = AliG(model.parameters(), max_lr=0.1, momentum=0.9)
      >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
      >>> def closure():
      ...     opt.zero_grad()
      ...     loss = torch.nn.functional.mse_loss(model(x), y)
      ...     loss.backward()
      ...     return loss
      >>> loss = opt.step(closure)
      >>> bool(opt.param_groups[0]["gamma"] <= 0.1)
      True

    Reference:
      L. Berrada, A. Zisserman, M. P. Kumar, "Training Neural Networks for and by
      Interpolation", ICML 2020, arXiv:1906.05661.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        max_lr: float | None = None,
        momentum: float = 0.0,
        *,
        adjusted_momentum: bool = False,
        eps: float = 1e-5,
        f_star: float = 0.0,
        max_norm: float | None = None,
        foreach: bool | None = None,
        all_reduce_loss: bool = True,
        partitioned: bool | None = None,
        process_group: Any = None,
        lr: Any = _NOT_GIVEN,
        **other_options: Any,
    ) -> None:
        if isinstance(params, torch.Tensor):  # torch.optim's own error and words
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or "
                f"dicts, but got {torch.typename(params)}"
            )
        check_keyword_options(other_options)
        max_lr = cap_argument(max_lr, lr, lr is not _NOT_GIVEN)
        if max_lr is not None:
            max_lr = stored_cap(max_lr)  # a one-element tensor as a 0-d one
        config = AliGConfig(
            max_lr=validate_max_lr(max_lr),
            momentum=momentum,
            adjusted_momentum=adjusted_momentum,
            eps=eps,
            f_star=f_star,
            max_norm=max_norm,
        )
        self.max_norm = config.max_norm
        self.all_reduce_loss = bool(all_reduce_loss)
        if partitioned is not None and not isinstance(partitioned, bool):
            raise ValueError(
                f"partitioned must be True, False or None (AliG reads FSDP1's flat parameters "
                f"itself), got {partitioned!r} (type {type(partitioned).__name__})."
            )
        self.partitioned = partitioned
        self.process_group = process_group
        defaults = {
            "lr": stored_cap(max_lr),
            "momentum": config.momentum,
            "adjusted_momentum": config.adjusted_momentum,
            "eps": config.eps,
            "f_star": config.f_star,
            "foreach": foreach,
        }
        params_or_groups: list[Any] = list(params)
        if not params_or_groups:
            raise ValueError(
                "AliG got an empty parameter list. Pass the tensors to optimize, e.g. "
                "AliG(model.parameters(), max_lr=0.1), or a list of param-group dicts."
            )
        # An instance attribute, not a property: wrappers that subclass AliG's class and
        # forward attribute reads (Lightning's LightningOptimizer) reach the optimizer's own.
        self._accumulation = Accumulation(self)  # the losses added, the backward passes seen
        self._intake = LossIntake(self._accumulation, self._loss_device_and_dtype)
        super().__init__(params_or_groups, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group; ``max_lr`` is accepted as the name of its ``lr``.

        Keys of other optimizers that ALI-G would ignore or that would change the step
        (``weight_decay``, ``nesterov``, ``dampening``, ``maximize``, ``betas``, ``fused``,
        ...) raise a ``ValueError`` that says what to use instead, unless they hold the value
        that changes nothing (``weight_decay=0``, ``maximize=False``, ...). Other keys (a
        user's own, those LR schedulers write) are kept, as in any torch optimizer.
        """
        if isinstance(param_group, dict):
            check_group_keys(param_group, f"Param group {len(self.param_groups)}")
        if isinstance(param_group, dict) and "max_lr" in param_group:
            if "lr" in param_group:
                raise ValueError(
                    f"Param group {len(self.param_groups)} sets both 'max_lr' = "
                    f"{describe_value(param_group['max_lr'])} and 'lr' = "
                    f"{describe_value(param_group['lr'])}; they are the same thing (the cap on "
                    "the step size): set only one."
                )
            param_group = dict(param_group)
            max_lr = param_group.pop("max_lr")
            param_group["lr"] = stored_cap(max_lr)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["lr"] = stored_cap(group["lr"])
            check_group_hyperparameters(group)
            check_group_params(group)
        except ValueError:
            self.param_groups.pop()  # a refused group is not added
            raise
        self._accumulation.watch(group["params"])

    def state_dict(self) -> dict[str, Any]:
        """Returns the state as ``torch.optim.Optimizer.state_dict`` does, with a marker.

        Each saved param group also holds ``momentum_convention``: what its momentum
        buffers hold, as :func:`alig_core.momentum_convention` codes it (0: no buffers,
        1: the standard convention's ``-gamma*g`` terms, 2: the adjusted one's ``-g``
        terms). :meth:`load_state_dict` checks it; the live param groups do not hold it.
        """
        state = super().state_dict()
        for group, saved in zip(self.param_groups, state["param_groups"], strict=True):
            has_buffers = any("momentum_buffer" in self.state.get(p, {}) for p in group["params"])
            saved[CONVENTION_KEY] = alig_core.momentum_convention(
                has_buffers, bool(group["adjusted_momentum"])
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads an AliG state_dict; refuses any state it cannot resume exactly.

        Refused, with a ``ValueError`` that says what was given and what to do:

        * another optimizer's state (its param groups lack ALI-G's keys ``adjusted_momentum``,
          ``eps``, ``f_star``): e.g. ``torch.optim.SGD``'s ``momentum_buffer`` holds
          ``+(mu*b + g)``, the opposite sign of both ALI-G conventions;
        * a state whose momentum convention cannot be read (no ``adjusted_momentum``), or
          whose ``momentum_convention`` marker contradicts its ``adjusted_momentum`` and
          buffers;
        * a state of the other convention than this optimizer's group: the two conventions
          keep different quantities in the buffers (``-gamma*g`` terms against ``-g``
          terms), so resuming with the other one would silently change the trajectory;
          torch's default would also overwrite the group's setting;
        * keys of other optimizers (as :meth:`add_param_group`) or invalid hyperparameters.

        State dicts saved before the marker existed (their groups hold ``adjusted_momentum``,
        ``eps`` and ``f_star``) load as before. The checks run on the state that the hooks of
        :meth:`register_load_state_dict_pre_hook` return (torch runs them first), so a hook
        can mend an old checkpoint, and a hook's edits are checked too.
        """
        if not isinstance(state_dict, dict):
            _refuse_as_not_a_state_dict(state_dict)
        # torch runs the load_state_dict pre-hooks first (a hook may mend an old checkpoint,
        # or spoil a good one): AliG checks the state they return, as the last pre-hook.
        handle = self.register_load_state_dict_pre_hook(_checked_for_loading)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    def _checked(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` checked as :meth:`load_state_dict` says, without its markers."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
            _refuse_as_not_a_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        for index, saved in enumerate(saved_groups):
            check_saved_group(index, saved, state_dict.get("state"))
        for index, (ours, saved) in enumerate(zip(self.param_groups, saved_groups, strict=False)):
            if bool(saved["adjusted_momentum"]) != bool(ours["adjusted_momentum"]):
                raise ValueError(
                    f"This checkpoint's param group {index} was trained with "
                    f"adjusted_momentum={saved['adjusted_momentum']}, but this optimizer's "
                    f"group has adjusted_momentum={ours['adjusted_momentum']}: their momentum "
                    "buffers hold different quantities. Build the optimizer with "
                    f"adjusted_momentum={saved['adjusted_momentum']} to resume."
                )
        groups = [{k: v for k, v in g.items() if k != CONVENTION_KEY} for g in saved_groups]
        return {**state_dict, "param_groups": groups}

    def __getstate__(self) -> dict[str, Any]:
        return {
            **super().__getstate__(),
            "max_norm": self.max_norm,
            "all_reduce_loss": self.all_reduce_loss,
            "partitioned": self.partitioned,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        for index, group in enumerate(state.get("param_groups", [])):
            if "adjusted_momentum" not in group:
                raise ValueError(
                    f"AliG param group {index} has no 'adjusted_momentum': the momentum "
                    "convention of its buffers cannot be read, and guessing it would silently "
                    "change the trajectory. Set the group's 'adjusted_momentum' to the value "
                    "it was trained with."
                )
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not differentiable:  # torch adds it; AliG has no differentiable step: a copy is equal
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("max_norm", None)
        self.__dict__.setdefault("all_reduce_loss", True)
        self.__dict__.setdefault("partitioned", None)
        self.__dict__.setdefault("process_group", None)
        for group in self.param_groups:
            group.setdefault("eps", 1e-5)
            group.setdefault("f_star", 0.0)
            group.setdefault("foreach", None)
        if "_accumulation" not in self.__dict__:  # a copy or unpickled: not the original's
            self._accumulation = Accumulation(self)
        self._intake = LossIntake(self._accumulation, self._loss_device_and_dtype)
        self._accumulation.watch([p for group in self.param_groups for p in group["params"]])

    def __repr__(self) -> str:
        text = super().__repr__()
        return text[:-1] + f"max_norm: {self.max_norm}\n)"

    # ------------------------------------------------------------------ monitoring

    gamma = RecordProperty()
    gamma_hat = RecordProperty()
    capped = RecordProperty()
    steps_taken = RecordProperty()
    steps_skipped = RecordProperty()

    _step_path: str | None = None
    """Forces a path of :data:`alig_torch._functional.STEP_PATHS` (tests: every path on CPU
    tensors); ``None`` lets :func:`alig_torch._functional.select_path` choose."""

    # ------------------------------------------------------------------ the step

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss: Any | Sequence[Any] = None,
    ) -> Any:
        """Performs one ALI-G step; returns the loss.

        The loss is, in this order: the sum of the losses added with :meth:`add_loss`
        since the last step (a closure's return value is then ignored: under Lightning
        with :class:`~alig_torch.integrations.lightning.AliGCallback` it is one
        micro-batch's); else ``loss=``; else the closure's return value. A closure that
        returns ``None`` (Lightning's manual optimization passes one) leaves the loss to
        ``loss=`` or :meth:`add_loss`.

        When more than one backward pass reached the parameters since the last step or
        :meth:`zero_grad`, ``.grad`` is their sum and the loss must be the sum of their
        losses, handed over one per backward pass (:meth:`add_loss`, or ``loss=`` as a
        list): a single loss, or a different number of losses, raises a ``ValueError``
        rather than taking a wrong step. The count comes from a hook on each parameter;
        where no hook fires (e.g. FSDP1 flat parameters) nothing is checked.

        Args:
          closure: re-evaluates the model and returns the loss (called under
            ``torch.enable_grad()``); or, if it is not callable, the loss itself
            (``opt.step(loss)`` is ``opt.step(loss=loss)``).
          loss: the loss of the gradient in ``.grad``, a float or a 0-d tensor (unscaled
            under loss scaling), or a list of the losses of the backward passes that
            accumulated it (summed).

        Returns:
          The closure's return value when it gave one, else the loss the step used
          (``loss=`` as given, or the sum of a list or of the added losses).
        """
        intake = self._intake
        closure, closure_loss, loss = intake.evaluate(closure, loss, _NAMES)
        try:
            try:
                check_stepped_by_deepspeed(self)  # DeepSpeed's loss comes through its integration
            except ValueError:
                intake.forget()  # as resolve() does on every refusal
                raise
            used = intake.resolve(closure, closure_loss, loss, _NAMES, required=True)
        except ValueError as error:
            self._fail(error)
        self._step(used)
        return closure_loss if closure_loss is not None else used

    def add_loss(self, loss: Any) -> None:
        """Adds the loss of one backward pass to the loss of the next step.

        With gradient accumulation, call it once per ``backward()`` with the loss exactly
        as it was backpropagated (e.g. already divided by the number of micro-batches);
        :meth:`step` without a loss then uses their sum, the loss of the summed gradient.
        :meth:`zero_grad` and :meth:`step` forget the added losses. The loss is detached
        and summed as a 0-d tensor in the accumulation dtype, with no host
        synchronisation. Under loss scaling, add the unscaled loss.

        Args:
          loss: a float or a 0-d tensor.

        Example:
          >>> model = torch.nn.Linear(3, 1)
          >>> opt = AliG(model.parameters(), max_lr=0.1)
          >>> opt.zero_grad()
          >>> for x, y in [(torch.randn(4, 3), torch.randn(4, 1))] * 2:  # 2 micro-batches
          ...     loss = torch.nn.functional.mse_loss(model(x), y) / 2
          ...     loss.backward()
          ...     opt.add_loss(loss)
          >>> _ = opt.step()
        """
        self._intake.add(loss, _NAMES)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients (as ``torch.optim``) and forgets the added losses with them."""
        super().zero_grad(set_to_none)
        self._accumulation.forget()

    def _loss_device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        params = [p for group in self.param_groups for p in group["params"]]
        if not params:
            if _distributed.active_group(self.process_group) is not None:
                return torch.device("cpu"), torch.float64  # an empty ZeRO partition (_step)
            raise ValueError("AliG has no parameters to optimize: its param groups are empty.")
        return params[0].device, accumulation_dtype(params)

    def _fail(self, error: ValueError) -> NoReturn:
        """Raises ``error``; under torch.distributed, on every rank of the group at once.

        This rank takes part in the step's collective with a failure flag, so that the
        other ranks raise too instead of waiting in it until the process-group timeout.
        """
        process_group = _distributed.active_group(self.process_group)
        if process_group is None:
            raise error
        _distributed.Ranks(
            process_group, partitioned=self.partitioned, all_reduce_loss=self.all_reduce_loss
        ).fail_together(error)

    @torch.no_grad()
    def _step(self, loss: Any) -> None:
        """One step: the ranks agree on ``(loss, S)`` (:meth:`_evaluation`), then it is taken."""
        self._step_with(self._evaluation(loss, agree=True))

    def _evaluation(self, loss: Any, *, agree: bool) -> _Evaluation:
        """This rank's checks, the groups' tensors, the path, and the step's ``(loss, S)``.

        ``agree``: under torch.distributed, the ranks agree on them now (the collective of
        the step); else ``S`` is this rank's alone, to be agreed by :meth:`_agreed` (the
        extrapolation wrapper, which agrees on the loss it linearises). ``S`` is computed
        once either way.
        """
        all_params = [p for group in self.param_groups for p in group["params"]]
        process_group = _distributed.active_group(self.process_group)
        if not all_params and process_group is None:
            raise ValueError("AliG has no parameters to optimize: its param groups are empty.")
        ranks = None
        if process_group is not None:
            ranks = _distributed.Ranks(
                process_group, partitioned=self.partitioned, all_reduce_loss=self.all_reduce_loss
            )
        # A rank without parameters (an empty ZeroRedundancyOptimizer partition) takes part
        # in the collectives all the same, its loss in float64.
        accumulate = accumulation_dtype(all_params) if all_params else torch.float64
        device = all_params[0].device if all_params else torch.device("cpu")
        try:  # the checks of this rank: under torch.distributed, failed on every rank at once
            check_step_caps(self.param_groups)  # before anything moves
            loss_t = loss_as_tensor(loss, device, accumulate, who="ALI-G", loss_help=_LOSS_HELP)
            groups = [(group, *self._collect(group)) for group in self.param_groups]
            partitioned = set() if ranks is None else ranks.partitioned_ids(all_params)
        except ValueError as error:
            if ranks is None:
                raise
            ranks.fail_together(error)
        path = select_path(all_params, foreach=self._use_foreach(all_params), path=self._step_path)
        sums = _Sums(path, accumulate, device, once=not agree and ranks is not None)
        norms = Norms(ranks, all_params, partitioned, self._fingerprint, self.partitioned is True)
        evaluation = _Evaluation(
            path.number(loss_t, device, accumulate),
            None,
            groups,
            path,
            sums,
            norms,
            device,
            accumulate,
        )
        if agree or ranks is None:
            return self._agreed(evaluation, evaluation.loss)
        return evaluation._replace(sq_grad_norm=sums([g for _, _, gs in groups for g in gs]))

    def _agreed(self, evaluation: _Evaluation, loss: Any) -> _Evaluation:
        """``evaluation`` with ``(loss, S)`` as the ranks agree on them.

        One collective under torch.distributed; a single process: ``loss`` and this rank's
        ``S``, as they are.
        """
        path, device, accumulate = evaluation.path, evaluation.device, evaluation.accumulate
        groups = evaluation.groups
        loss_n, sq_grad_norm = evaluation.norms.agree(
            path.number(loss, device, accumulate),
            [p for _, params, _ in groups for p in params],
            [g for _, _, grads in groups for g in grads],
            evaluation.sums,
            accumulate,
        )
        return evaluation._replace(
            loss=path.number(loss_n, device, accumulate),
            sq_grad_norm=path.number(sq_grad_norm, device, accumulate),
        )

    def _step_with(self, evaluation: _Evaluation) -> Any:
        """Takes the step of ``(evaluation.loss, evaluation.sq_grad_norm)`` as given.

        No norm is computed and no collective made (but the projection's); returns the first
        group's gamma.

        The extrapolation wrapper's entry point: it hands the linearised loss and the ``S``
        of its one norm (``alig_core._extrapolation``).
        """
        path, device, sums = evaluation.path, evaluation.device, evaluation.sums
        norms = evaluation.norms
        record_dtype = norms.record_dtype(evaluation.accumulate)
        skipped: Any = None
        gamma: Any = None
        for group, params, grads in evaluation.groups:
            size = alig(
                params,
                grads,
                self._buffers(group, params),
                loss=evaluation.loss,
                sq_grad_norm=evaluation.sq_grad_norm,
                max_lr=group["lr"],
                momentum=group["momentum"],
                adjusted_momentum=group["adjusted_momentum"],
                eps=group["eps"],
                f_star=group["f_star"],
                path=path.name,
            )
            skipped = size.skipped
            gamma = size.gamma if gamma is None else gamma
            write_records(group, size, path, device, record_dtype)
        if self.max_norm is None or (path.on_host and skipped):
            return gamma  # a host step knows it was skipped: no norm to take
        all_params = norms.all_params
        sq_param_norm = path.number(
            norms.of_params(sums, evaluation.accumulate), device, evaluation.accumulate
        )
        project(all_params, sq_param_norm, max_norm=self.max_norm, skipped=skipped, path=path)
        return gamma

    def step_size_at(self, loss: Any, sq_grad_norm: Any, *, group: int | None = None) -> Any:
        r"""ALI-G's step size ``gamma`` for a loss and a squared gradient norm, moving nothing.

        :math:`\gamma = \min(\max((l - f_\star) / (S + \epsilon), 0), \eta)` with the
        param group's ``lr`` (the cap), ``eps`` and ``f_star``, as a step would take it
        (:func:`alig_core.step_size`; 0 where ``loss`` or ``S`` is not finite). Neither
        the parameters nor the records move. :class:`~alig_torch.Extrapolation` takes it
        as its default ``lr_x`` at the anchor, so that an option that changes ALI-G's step
        size changes the displacement with it.

        Args:
          loss: the loss ``l``, a float or a 0-d tensor.
          sq_grad_norm: ``S``, a float or a 0-d tensor.
          group: the index of the param group whose settings to use; ``None``: every group
            must take the same step size (the same ``lr``, ``eps`` and ``f_star``).

        Returns:
          ``gamma``: a Python float where ``loss`` and ``S`` are Python numbers, else a
          0-d tensor.

        Raises:
          ValueError: ``group=None`` and the groups' settings differ, or a cap below 0.

        Example:
          >>> opt = AliG(torch.nn.Linear(2, 1).parameters(), max_lr=0.1)
          >>> opt.step_size_at(1.0, 4.0)  # min((1 - 0) / (4 + 1e-5), 0.1)
          0.1
          >>> round(opt.step_size_at(0.2, 4.0), 6)
          0.05
        """
        if group is None:
            settings = {
                (repr(g["lr"]), repr(g["eps"]), repr(g["f_star"])) for g in self.param_groups
            }
            if len(settings) != 1:
                raise ValueError(
                    "AliG.step_size_at(group=None) needs one step size, and the param groups "
                    f"differ in lr, eps or f_star ({sorted(settings)}). Pass group=<index> for "
                    "one group's (or, for Extrapolation's default lr_x, pass lr_x=...)."
                )
            group = 0
        chosen = self.param_groups[group]
        check_step_caps([chosen])
        on_host = not isinstance(loss, torch.Tensor) and not isinstance(sq_grad_norm, torch.Tensor)
        if on_host:
            xp: Any = python_scalars
            values = [float(chosen[k]) for k in ("lr", "eps", "f_star")]
            loss, sq_grad_norm = float(loss), float(sq_grad_norm)
        else:
            xp = torch
            like = loss if isinstance(loss, torch.Tensor) else sq_grad_norm
            loss, sq_grad_norm = (torch.as_tensor(v).to(like) for v in (loss, sq_grad_norm))
            values = [chosen[k] for k in ("lr", "eps", "f_star")]
        cap, eps, f_star = values
        return alig_core.step_size(xp, loss, sq_grad_norm, max_lr=cap, eps=eps, f_star=f_star).gamma

    def _fingerprint(self, dtensors: int) -> float:
        """The settings that decide a step, as one number: see :func:`_distributed.fingerprint`."""
        partitioned = {None: -1.0, False: 0.0, True: 1.0}[self.partitioned]
        values = [
            float(len(self.param_groups)),
            -1.0 if self.max_norm is None else float(self.max_norm),
            float(self.all_reduce_loss),
            partitioned,
            float(dtensors),
        ]
        for group in self.param_groups:
            values += [
                float(group["lr"]),
                float(group["momentum"]),
                float(group["adjusted_momentum"]),
                float(group["eps"]),
                float(group["f_star"]),
            ]
        return _distributed.fingerprint(values)

    def _use_foreach(self, params: list[torch.Tensor]) -> bool:
        requested = {group["foreach"] for group in self.param_groups}
        if requested == {False}:
            return False
        if True in requested:
            return True
        return not torch.jit.is_scripting() and all(
            p.device.type in ("cpu", "cuda", "xpu", "mps") for p in params
        )

    def _collect(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters of ``group`` that have a gradient, and their gradients."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(
                    f"ALI-G does not support sparse gradients (a parameter of shape "
                    f"{tuple(p.shape)} has one). Use a dense embedding (sparse=False), or "
                    "torch.optim.SparseAdam for the sparse parameters."
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _buffers(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The momentum buffers of ``params`` (created as zeros), none without momentum."""
        if group["momentum"] == 0:
            return []
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                ).reshape(stored_shape(p))
            buffer = state["momentum_buffer"]
            buffers.append(buffer if buffer.shape == p.shape else buffer.view(p.shape))
        return buffers
