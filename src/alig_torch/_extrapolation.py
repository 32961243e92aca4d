"""Extrapolation around any ``torch.optim.Optimizer``: glue around the core's procedure.

The procedure (phases, default ``lr_x``, linearised loss, skip rule, state) is
:func:`alig_core._extrapolation.extrapolation_step`; this module stores its state (the
anchor in the optimizer's ``state``, the phase and counters as Python ints), takes the loss
in (:class:`alig_torch._loss.LossIntake`, the one AliG has), computes the squared gradient
norm once (AliG's own, for an AliG base), and writes the parameters. How torch meets the
core (the ``_foreach`` list operations, the skip flag on the host and over the ranks, the
bases) is :mod:`alig_torch._extrapolation_glue`. The user's guide is the "Extrapolation"
section of ``docs/guides/torch.md``; the procedure is ``docs/extrapolation.md``'s.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from alig_core import ExtrapolationConfig
from alig_core._extrapolation import (
    ExtrapolationCall,
    ExtrapolationState,
    current_anchor,
    extrapolation_step,
    noise_generator_seed,
)
from alig_core._extrapolation_config import validate_seed
from alig_torch._accumulation import Accumulation
from alig_torch._extrapolation_glue import (
    ANCHOR_GRADIENTS,
    HOST,
    NAMES,
    WRAPPED,
    AliGBase,
    ForeachLists,
    ForeignBase,
    Guard,
    agree,
    check_checkpoint,
    check_options,
    check_param,
    copy_into,
    foreign_evaluation,
    gradients,
)
from alig_torch._loss import LossIntake
from alig_torch._norms import accumulation_dtype
from alig_torch._optimizer import AliG

__all__ = ["ANCHOR_GRADIENTS", "Extrapolation"]


class Extrapolation(Optimizer):
    r"""Extrapolated steps around any ``torch.optim.Optimizer`` (EXTRAP-SGD and relatives).

    With :math:`w_t` the iterate (the *anchor*), each iteration evaluates the loss and the
    gradient at an extrapolated point and lets the base optimizer step **from the anchor**
    with that gradient:

    .. math::

        \tilde w_t = w_t + d_t, \qquad
        w_{t+1} = \mathrm{Base}\big(w_t,\ g(\tilde w_t)\big)

    with :math:`d_t = -\mathrm{lr_x}\, g(w_t)` (``"gradient"``, two evaluations per
    iteration), :math:`-\mathrm{lr_x}\, g(\tilde w_{t-1})` (``"past"``) or
    :math:`\sigma \xi_t` (``"noise"``). Around :class:`~alig_torch.AliG`, ALI-G steps on
    the linearised loss :math:`l(\tilde w) + \langle g(\tilde w), w_t - \tilde w\rangle`.
    A non-finite loss or gradient skips the iteration (parameters back at the anchor, the
    base's state untouched). The call forms, ``lr_x=None``, the parameters between calls
    (:meth:`at_anchor`), checkpoints, DDP and the pitfalls: the "Extrapolation" section of
    the PyTorch guide (``docs/guides/torch.md``); the procedure: ``docs/extrapolation.md``.

    Args:
      base_optimizer: the optimizer to wrap (its ``param_groups`` are shared).
      mode: ``"gradient"``, ``"past"`` or ``"noise"``.
      lr_x: the displacement's step size: ``None`` (the base's), a number >= 0 (0: the
        wrapper is its base, bit for bit) or a schedule of the iteration count.
      sigma: the noise scale (``"noise"`` mode only, required there).
      linearized: around AliG, the linearised loss (``True``) or the plain one.
      alternate: ``step(closure)`` in ``"gradient"`` mode calls the closure once per step
        and alternates (``True``), or twice on the same batch (``False``).
      anchor_gradient: ``"all_reduced"`` or ``"local"`` (under DDP).
      seed: the noise's seed (``"noise"`` mode; default 0).

    Raises:
      ValueError: an invalid option, or a base that cannot be wrapped.

    Example:
      >>> import torch
      >>> from alig_torch import AliG, Extrapolation
      >>> model = torch.nn.Linear(3, 1)
      >>> opt = Extrapolation(AliG(model.parameters(), max_lr=0.1, momentum=0.9))
      >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
      >>> def closure():
      ...     opt.zero_grad()
      ...     loss = (model(x) - y).square().mean()
      ...     loss.backward()
      ...     return loss
      >>> loss = opt.step(closure)  # at the anchor, then at the extrapolated point
      >>> opt.iteration, opt.is_extrapolated
      (1, False)

    Reference:
      T. Lin, L. Kong, S. U. Stich, M. Jaggi, "Extrapolation for Large-batch Training in
      Deep Learning", ICML 2020, arXiv:2006.05720.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        mode: str = "gradient",
        *,
        lr_x: float | Callable[[int], Any] | None = None,
        sigma: float | None = None,
        linearized: bool = True,
        alternate: bool = False,
        anchor_gradient: str = "all_reduced",
        seed: int | None = None,
    ) -> None:
        config = ExtrapolationConfig(mode=mode, lr_x=lr_x, sigma=sigma, linearized=linearized)
        check_options(base_optimizer, Extrapolation, alternate, anchor_gradient)
        self._config = config
        self.alternate = alternate
        self.anchor_gradient = anchor_gradient
        self.seed = validate_seed(seed, mode=config.mode)
        self.base_optimizer = base_optimizer
        self._is_alig = isinstance(base_optimizer, AliG)
        self._constructing = True
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self._constructing = False
        self.param_groups = base_optimizer.param_groups  # one list: additions show in both
        self.defaults = base_optimizer.defaults
        self._phase = 0
        self._iteration = 0
        self._skipped = 0
        self._in_anchor_context = False
        for p in self._params():
            check_param(p)
            self.state[p]["anchor"] = p.detach().clone()
        self._guard = Guard()
        self._install_guard()
        self._own_intake = LossIntake(Accumulation(self), self._loss_device_and_dtype)

    # ------------------------------------------------------------------ construction

    def _install_guard(self) -> None:
        handle = self.base_optimizer.register_step_pre_hook(self._guard)
        weakref.finalize(self, handle.remove)
        WRAPPED[self.base_optimizer] = weakref.ref(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group to the base optimizer (the groups are shared).

        Raises:
          RuntimeError: while the parameters hold the extrapolated point (the new
            parameters would have no anchor): add it when :attr:`is_extrapolated` is False.
        """
        if getattr(self, "_constructing", False):  # Optimizer.__init__: the base's groups
            self.param_groups.append(param_group)
            return
        if self._phase:
            raise RuntimeError(
                "Extrapolation.add_param_group() while the parameters hold the extrapolated "
                "point: add the group when opt.is_extrapolated is False (after an update in "
                "mode='gradient')."
            )
        self.base_optimizer.add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            check_param(p)
            self.state[p]["anchor"] = p.detach().clone()

    def __getstate__(self) -> dict[str, Any]:
        dropped = ("_guard", "_own_intake", "_cached")
        return {k: v for k, v in self.__dict__.items() if k not in dropped}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._guard = Guard()
        self._install_guard()
        self._own_intake = LossIntake(Accumulation(self), self._loss_device_and_dtype)

    def __repr__(self) -> str:
        c = self._config
        options = f"mode={c.mode!r}, lr_x={c.lr_x!r}, sigma={c.sigma!r}, linearized={c.linearized}"
        return f"Extrapolation({options},\n  base_optimizer={self.base_optimizer!r})"

    # ------------------------------------------------------------------ public state

    @property
    def config(self) -> ExtrapolationConfig:
        """The validated options (mode, lr_x, sigma, linearized), the core's."""
        return self._config

    @property
    def mode(self) -> str:
        """``"gradient"``, ``"past"`` or ``"noise"``."""
        return self._config.mode

    @property
    def is_extrapolated(self) -> bool:
        """Whether the parameters hold the extrapolated point ``w~_t`` (the core's phase 1)."""
        return bool(self._phase)

    @property
    def anchor_pass(self) -> bool:
        """Whether the evaluation being made (between calls: the next) places ``w~_t``.

        True at the anchor in ``"gradient"`` mode: the gradient to compute under
        ``ddp_model.no_sync()`` with ``anchor_gradient="local"``.
        """
        return self._config.mode == "gradient" and not self._phase

    @property
    def iteration(self) -> int:
        """Iterations completed (base steps taken): the argument of an ``lr_x`` schedule."""
        return self._iteration

    @property
    def iterations_skipped(self) -> int:
        """Iterations skipped (a non-finite loss or gradient at either point)."""
        return self._skipped

    def anchor_params(self) -> list[torch.Tensor]:
        """Copies of the anchor ``w_t``, one per parameter (in the param groups' order)."""
        with torch.no_grad():
            return [
                current_anchor(torch, self._phase, self.state[p]["anchor"], p).detach().clone()
                for p in self._params()
            ]

    @contextlib.contextmanager
    def at_anchor(self) -> Iterator[None]:
        """Puts the anchor ``w_t`` into the parameters for the block, then ``w~_t`` back.

        For evaluation and saving between calls (save inside the block:
        ``model.state_dict()`` holds references to the parameters). Stepping inside the
        block raises. Where the parameters hold the anchor already, nothing moves.
        """
        if self._in_anchor_context:
            raise RuntimeError("Extrapolation.at_anchor() is already active; do not nest it.")
        params = self._params()
        held: list[torch.Tensor] = []
        self._in_anchor_context = True
        try:
            if self._phase:
                with torch.no_grad():
                    held = [p.detach().clone() for p in params]
                    copy_into(params, [self.state[p]["anchor"] for p in params])
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, held, strict=False):
                    p.copy_(w)
            self._in_anchor_context = False

    def noise(self, iteration: int) -> list[torch.Tensor]:
        """``xi_t`` of iteration ``iteration``: one standard normal tensor per parameter.

        Drawn on each parameter's device and in its dtype, from a generator seeded with
        ``(seed, iteration)`` only, so a resumed run draws the same noise. The update of
        iteration ``t`` places ``w~_{t+1} = w_{t+1} + sigma * noise(t + 1)``.
        """
        generators: dict[torch.device, torch.Generator] = {}
        xi = []
        for p in self._params():
            generator = generators.get(p.device)
            if generator is None:
                generator = torch.Generator(device=p.device)
                generator.manual_seed(noise_generator_seed(self.seed, int(iteration)))
                generators[p.device] = generator
            xi.append(torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device))
        return xi

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients (the base optimizer's ``zero_grad``); forgets added losses."""
        self.base_optimizer.zero_grad(set_to_none)
        self._intake().forget()

    def add_loss(self, loss: Any) -> None:
        """Adds the loss of one backward pass to the loss of the next call.

        With gradient accumulation, call it after each ``backward()`` with the loss as it
        was backpropagated (e.g. already divided by the number of micro-batches), then
        ``opt.step()``: the call uses their sum, the loss of the summed gradient, as
        ``opt.step(loss=[loss_1, ..., loss_k])`` does. Around AliG it is AliG's
        :meth:`~alig_torch.AliG.add_loss` (one intake, one count of the backward passes).
        :meth:`zero_grad` and :meth:`step` forget the added losses.

        Example:
          >>> import torch
          >>> from alig_torch import AliG, Extrapolation
          >>> model = torch.nn.Linear(3, 1)
          >>> opt = Extrapolation(AliG(model.parameters(), max_lr=0.1), mode="past")
          >>> opt.zero_grad()
          >>> for x, y in [(torch.randn(4, 3), torch.randn(4, 1))] * 2:  # 2 micro-batches
          ...     loss = (model(x) - y).square().mean() / 2
          ...     loss.backward()
          ...     opt.add_loss(loss)
          >>> _ = opt.step()
        """
        self._intake().add(loss, NAMES)

    # ------------------------------------------------------------------ state_dict

    def state_dict(self) -> dict[str, Any]:
        """The base's ``state_dict`` and the wrapper's state: phase, counters, anchor, seed.

        The anchor is saved where the parameters hold ``w~_t`` (phase 1), as one tensor per
        parameter in the param groups' order. Loads with ``torch.load(weights_only=True)``.
        """
        anchor = None
        if self._phase:
            anchor = [self.state[p]["anchor"].detach().clone() for p in self._params()]
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "extrapolation": {
                "mode": self._config.mode,
                "linearized": self._config.linearized,
                "phase": self._phase,
                "iteration": self._iteration,
                "skipped": self._skipped,
                "seed": self.seed,
                "anchor": anchor,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads :meth:`state_dict` (load the parameters as they were saved, too).

        Raises:
          ValueError: not an Extrapolation state_dict (e.g. the base's alone), one of
            another ``mode`` or ``linearized``, or an anchor that does not fit the
            parameters. Nothing is loaded then.
        """
        params = self._params()
        ours = {"mode": self._config.mode, "linearized": self._config.linearized}
        saved = check_checkpoint(state_dict, ours, params)
        anchor: list[torch.Tensor] = saved.get("anchor") or []
        phase = int(saved["phase"])
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        with torch.no_grad():
            if phase:
                for p, a in zip(params, anchor, strict=True):
                    self.state[p]["anchor"].copy_(a)
        self._phase = phase
        self._iteration = int(saved["iteration"])
        self._skipped = int(saved["skipped"])
        self.seed = int(saved["seed"])

    # ------------------------------------------------------------------ the step

    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One call: extrapolates, updates, or both (see the PyTorch guide).

        Args:
          closure: zeroes the gradients, computes the loss, calls ``backward()`` and
            returns the loss (called under ``torch.enable_grad()``; twice in
            ``"gradient"`` mode unless ``alternate``). A loss that is not callable is
            taken as ``loss=``.
          loss: the loss of the gradient in ``.grad`` (a float or a 0-d tensor, unscaled
            under loss scaling); with gradient accumulation, the list of the losses of the
            backward passes (summed; or :meth:`add_loss`). AliG as the base needs one.

        Returns:
          The loss of the first evaluation of the call (the closure's, or the loss used).
        """
        if self._in_anchor_context:
            raise RuntimeError(
                "Extrapolation.step() inside opt.at_anchor(): the parameters hold the anchor "
                "only for evaluation and saving. Step after the with-block."
            )
        intake = self._intake()
        closure, closure_loss, loss = intake.evaluate(closure, loss, NAMES)
        used = intake.resolve(closure, closure_loss, loss, NAMES, required=self._is_alig)
        first = closure_loss if closure_loss is not None else used
        if not self.anchor_pass:
            self._call(used)
            return first
        skipped = self._call(used)
        self.base_optimizer.zero_grad()  # g(w_t) must not add into g(w~_t)
        if closure is None or self.alternate or skipped:
            return first
        closure, closure_loss, _ = intake.evaluate(closure, None, NAMES)
        self._call(intake.resolve(closure, closure_loss, None, NAMES, required=self._is_alig))
        return first

    def _intake(self) -> LossIntake:
        """AliG's intake around AliG (one count of the backward passes), else the wrapper's."""
        if self._is_alig:
            intake: LossIntake = self.base_optimizer._intake  # type: ignore[attr-defined]
            return intake
        return self._own_intake

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _loss_device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        params = self._params()
        if not params:
            raise ValueError("Extrapolation has no parameters: its param groups are empty.")
        return params[0].device, accumulation_dtype(params)

    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
        """The parameters, their stored anchors, and whether all are on the CPU.

        Cached while the param groups hold the same tensors.
        """
        params = self._params()
        cached = self.__dict__.get("_cached")
        if cached is not None:
            known = cached[0]
            if len(known) == len(params) and all(map(operator.is_, known, params)):
                return cached
        if not params:
            raise ValueError("Extrapolation has no parameters: its param groups are empty.")
        anchors = [self.state[p]["anchor"] for p in params]
        self._cached = (params, anchors, all(p.device.type == "cpu" for p in params))
        return self._cached

    @torch.no_grad()
    def _call(self, loss: Any) -> bool:
        """One call of the core on this evaluation; returns whether it skipped."""
        params, anchors, on_cpu = self._tensors()
        grads = gradients(params)
        base: AliGBase | ForeignBase
        if self._is_alig:  # AliG's checks, path and S (one norm), not yet agreed
            evaluation = self.base_optimizer._evaluation(loss, agree=False)  # type: ignore[attr-defined]
            base = AliGBase(self.base_optimizer, params, evaluation)
            host, loss_n, sq = evaluation.path.on_host, evaluation.loss, evaluation.sq_grad_norm
        else:
            config = self._config
            past_default = config.mode == "past" and config.lr_x is None
            base = ForeignBase(self.base_optimizer, self._guard, params, past_default)
            host, loss_n, sq = on_cpu, *foreign_evaluation(params, grads, loss, on_cpu)
        local_anchor = self.anchor_pass and self.anchor_gradient == "local"
        state = ExtrapolationState(
            anchor=tuple(anchors),
            phase=self._phase,
            iteration=self._iteration,
            skipped=self._skipped,
        )
        call = extrapolation_step(
            HOST if host else torch,
            self._config,
            state,
            params,
            grads,
            loss=loss_n,
            sq_grad_norm=sq,
            base=base,
            noise=self.noise,
            lists=ForeachLists(host, lambda flag, at: agree(flag, at, base, local_anchor)),
        )
        return self._apply(params, anchors, call)

    def _apply(
        self, params: list[torch.Tensor], anchors: list[torch.Tensor], call: ExtrapolationCall
    ) -> bool:
        """Stores the call's state and writes its parameters; returns whether it skipped."""
        copy_into(anchors, call.state.anchor)
        copy_into(params, call.params)
        self._phase = int(call.state.phase)
        self._iteration = int(call.state.iteration)
        self._skipped = int(call.state.skipped)
        return bool(call.skipped)
