"""Extrapolation around any ``torch.optim.Optimizer`` (``docs/extrapolation.md``).

A thin adapter of :mod:`alig_core._extrapolation`: this module gathers the parameters and
gradients, computes the squared gradient norm, converts the loss, calls one phase function
of the core per phase, copies the results into the parameters and runs the base
optimizer's own ``step``. Every number (the displacement, the extrapolated point, the
linearised loss handed to ALI-G, the default ``lr_x``, the skip rule, the state) comes
from the core; see ``docs/extrapolation.md``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from alig_core import ExtrapolationConfig
from alig_core._config import describe_value
from alig_core._extrapolation import (
    ExtrapolationCall,
    ExtrapolationState,
    UpdateInputs,
    anchor_params,
    anchor_step_size,
    evaluation_skipped,
    extrapolate,
    finish_update,
    noise_generator_seed,
    update_inputs,
)
from alig_core._extrapolation_config import validate_seed
from alig_torch._functional import select_path
from alig_torch._loss import loss_as_tensor, summed_losses
from alig_torch._norms import accumulation_dtype, as_0d
from alig_torch._optimizer import AliG

__all__ = ["ANCHOR_GRADIENTS", "Extrapolation"]

ANCHOR_GRADIENTS: tuple[str, ...] = ("all_reduced", "local")
"""Under data parallelism, which gradient at the anchor places ``w~`` in ``"gradient"`` mode."""

_LOSS_HELP = (
    "Hand the loss over as for any torch optimizer: opt.step(closure) with a closure that "
    "zeroes the gradients, computes the loss, calls loss.backward() and returns the loss, "
    "or opt.step(loss=loss) after loss.backward() (one evaluation per call: calls alternate "
    "between the anchor and the extrapolated point in mode='gradient'). With a GradScaler "
    "(which refuses closures): scaler.unscale_(opt); scaler.step(opt, loss=loss) with the "
    "unscaled loss."
)


class _Guard:
    """The base's step pre-hook: refuses ``base.step()`` called past the wrapper."""

    __slots__ = ("stepping",)

    def __init__(self) -> None:
        self.stepping = False

    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if not self.stepping:
            raise RuntimeError(
                f"This {type(optimizer).__name__} is wrapped by alig_torch.Extrapolation, and "
                "its step() was called directly: the base must step only through the "
                "wrapper (from the anchor, once per iteration). Call the wrapper's step() "
                "instead (and hand the wrapper, not its base, to GradScaler, LR schedulers "
                "and trainers)."
            )


_WRAPPED: weakref.WeakKeyDictionary[Optimizer, weakref.ref[Extrapolation]] = (
    weakref.WeakKeyDictionary()
)
"""Each base optimizer's live wrapper (a base is wrapped at most once)."""


def _world_size() -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


class Extrapolation(Optimizer):
    r"""Extrapolated steps around any ``torch.optim.Optimizer`` (EXTRAP-SGD and relatives).

    With :math:`w_t` the iterate (the *anchor*), each iteration evaluates the loss and the
    gradient at an extrapolated point and lets the base optimizer step **from the anchor**
    with that gradient (extragradient):

    .. math::

        \tilde w_t = w_t + d_t, \qquad
        w_{t+1} = \mathrm{Base}\big(w_t,\ g(\tilde w_t)\big)

    with the displacement :math:`d_t`, by ``mode``:

    * ``"gradient"`` (EXTRAP-SGD): :math:`d_t = -\mathrm{lr_x}\, g(w_t)`, a minibatch
      gradient at the anchor (two evaluations per iteration);
    * ``"past"``: :math:`d_t = -\mathrm{lr_x}\, g(\tilde w_{t-1})`, the gradient the
      previous update used, :math:`d_0 = 0` (one evaluation per iteration);
    * ``"noise"``: :math:`d_t = \sigma \xi_t`, :math:`\xi_t` standard normal, drawn from a
      torch generator seeded with ``(seed, t)`` (one evaluation per iteration; the
      perturbation baseline).

    The base's state (momentum buffers, counters) moves once per iteration. With
    :class:`~alig_torch.AliG` as the base, ALI-G takes the Polyak step of the linear model
    of the loss at :math:`\tilde w_t` seen from the anchor:

    .. math::

        \hat\gamma = \frac{l(\tilde w) - f_\star + \langle g(\tilde w), w_t - \tilde w\rangle}
                          {\|g(\tilde w)\|^2 + \epsilon}

    then its usual clamp at 0 and cap (``linearized=False``: the plain :math:`l(\tilde w)`).
    The wrapper hands ALI-G the corrected loss through ``step(loss=...)``; every other base
    is stepped with ``step()``. Projection (AliG's ``max_norm``) applies to :math:`w_{t+1}`,
    never to :math:`\tilde w_t`. ``lr_x=None`` (the default) takes the base's own step
    size: its param groups' ``lr`` (SGD); for ALI-G in ``"gradient"`` mode its step size at
    the anchor (from :math:`l(w_t)`, :math:`g(w_t)`; ALI-G's records do not move for it),
    in ``"past"`` mode the gamma of the previous update. For a base whose step is not
    ``lr`` times the gradient (Adam), pass ``lr_x``.

    **Skipped iterations.** A non-finite loss or gradient at either point skips the whole
    iteration: the base does not step (its state stays bit for bit), and the parameters go
    back to the anchor. In ``"gradient"`` mode a non-finite evaluation at the anchor skips
    before the second evaluation is made.

    **Call forms.** ``opt.step(closure)`` in ``"gradient"`` mode runs the closure at the
    anchor, then at :math:`\tilde w_t`, on the same batch (``alternate=False``, the
    default). ``opt.step(loss=loss)`` (or ``opt.step()`` for a base that needs no loss)
    after ``loss.backward()`` makes one evaluation per call, so in ``"gradient"`` mode the
    calls alternate: one extrapolates (the gradient of that batch at the anchor), the next
    updates (the gradient of the next batch at :math:`\tilde w_t`): loops that call
    ``step`` once per batch (Hugging Face Trainer, Lightning's manual optimization) run
    unchanged. ``alternate=True`` makes ``step(closure)`` alternate too (one closure call
    per ``step``: Lightning's automatic optimization with one evaluation per batch).
    ``"past"`` and ``"noise"`` make one evaluation per call in every form. The loss is the
    loss of the gradient in ``.grad`` (the base ALI-G needs it; SGD does not, but a loss
    given is checked by the skip rule). After the anchor evaluation the wrapper clears the
    gradients (``base.zero_grad()``), so that :math:`g(w_t)` never adds into
    :math:`g(\tilde w_t)`.

    **Between calls** the parameters may hold :math:`\tilde w_t`: always in ``"past"`` and
    ``"noise"`` modes after the first update, and between the two calls of an iteration of
    the alternating ``"gradient"`` form (:attr:`is_extrapolated` says which). To evaluate
    or save the model at the anchor, use :meth:`at_anchor`::

        with opt.at_anchor():
            evaluate(model)
            torch.save(model.state_dict(), "model.pt")  # inside the block

    or :meth:`anchor_params` (copies). A checkpoint of a run resumes exactly with
    ``opt.state_dict()`` (the base's state, the anchor, the phase, the iteration count
    that keys the noise and the schedules) and ``model.state_dict()`` saved *outside*
    :meth:`at_anchor` (the parameters as they are).

    **Data parallel (DDP).** Under ``torch.distributed`` with more than one process, the
    wrapper makes the ranks agree: a non-finite value on any rank skips the iteration on
    every rank (one small all-reduce per call), never a hang or a divergence. Which
    gradient at the anchor places :math:`\tilde w_t` in ``"gradient"`` mode is
    ``anchor_gradient``:

    * ``"all_reduced"`` (the default): the anchor pass is an ordinary DDP backward, so
      :math:`g(w_t)` is averaged over the ranks and every rank computes the same
      :math:`\tilde w_t`; the wrapper averages the anchor loss over the ranks (for ALI-G's
      default ``lr_x``). Two ranks equal one process on the whole batch.
    * ``"local"``: run the anchor pass under ``ddp_model.no_sync()`` (no communication):
      each rank extrapolates along its own gradient, with its own default ``lr_x`` (ALI-G:
      its local loss and gradient), to its own :math:`\tilde w_t^{(r)}`. The update
      gradient is DDP's average of the ranks' :math:`g_r(\tilde w_t^{(r)})`, so every
      rank takes the same step from the same anchor; with ALI-G, each rank's corrected
      loss uses that averaged gradient and its own displacement, and ALI-G averages the
      corrected losses over the ranks. In the closure (or the loop), choose the context
      with :attr:`anchor_pass`:
      ``with ddp_model.no_sync() if opt.anchor_pass else contextlib.nullcontext(): ...``.

    Never run the update pass under ``no_sync``. DTensor (FSDP2) parameters are refused.

    **Pitfalls.**

    * *BatchNorm*: every forward pass in training mode updates the running statistics,
      the pass at :math:`\tilde w_t` included. In ``"gradient"`` mode, to keep only the
      anchor's, set the BatchNorm layers' ``momentum`` to 0 for the pass where
      :attr:`is_extrapolated` is True (as davda54/sam's ``disable_running_stats``). In
      ``"past"`` and ``"noise"`` modes every evaluation after the first is at
      :math:`\tilde w_t`.
    * *GradScaler* refuses closures: use the alternating form,
      ``scaler.unscale_(opt); scaler.step(opt, loss=loss); scaler.update()``, with the
      unscaled loss (for the same-batch form, make the two calls on the same batch). When
      the scaler finds an overflow it does not call ``step`` at all: the next evaluation is
      made at the same point.
    * *Evaluation and checkpoints* between calls see :math:`\tilde w_t`: use
      :meth:`at_anchor` (above).
    * *The base* must step only through the wrapper: its ``step()`` called directly raises.
      A base that already stepped (has state) may be wrapped: its state carries on, and
      the wrapper starts at the anchor (the parameters as they are) at iteration 0.
    * *Gradient accumulation*: hand over the loss of every backward pass, as
      ``opt.step(loss=[loss_1, ..., loss_k])`` or with :meth:`add_loss` after each
      ``backward()`` (the loss of the summed gradient is the sum of the backpropagated
      losses). AliG counts the backward passes and refuses a single micro-batch's loss
      at the update. The trainer integrations (``alig_torch.integrations``) do not
      look inside this wrapper.
    * On an accelerator each call reads the skip flag back (one host synchronisation):
      the base must not step on a skipped iteration, and only ALI-G could do without.

    Args:
      base_optimizer: the optimizer to wrap (``torch.optim.SGD(nesterov=True)``,
        :class:`~alig_torch.AliG`, any ``torch.optim.Optimizer``). The wrapper shares its
        ``param_groups`` (LR schedulers may drive either).
      mode: ``"gradient"``, ``"past"`` or ``"noise"``.
      lr_x: the displacement's step size in the gradient modes: ``None`` (the base's, see
        above), a number >= 0 (0: the wrapper is its base, bit for bit), or a schedule, a
        callable of the iteration count (an ``int``). ``None`` in ``"noise"`` mode.
      sigma: the noise scale, ``"noise"`` mode only (required there; 0 turns it off).
      linearized: ALI-G as the base: the linearised loss (``True``) or the plain loss
        at :math:`\tilde w_t`. Ignored by a base that takes no loss.
      alternate: ``step(closure)`` in ``"gradient"`` mode calls the closure once per
        ``step`` and alternates (``True``), or twice on the same batch (``False``).
      anchor_gradient: ``"all_reduced"`` or ``"local"`` (see *Data parallel*).
      seed: ``"noise"`` mode: the seed of the noise (default 0); ``None`` elsewhere.

    Raises:
      ValueError: an invalid option (``mode``, ``lr_x``, ``sigma``, ``linearized``: the
        core's validation), or a base that cannot be wrapped.

    Example:
      >>> import torch
      >>> from alig_torch import AliG, Extrapolation
      >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
      <torch._C.Generator object at ...>
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
      >>> sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
      >>> opt = Extrapolation(sgd, mode="past")
      >>> for _ in range(2):
      ...     opt.zero_grad()
      ...     torch.nn.functional.mse_loss(model(x), y).backward()
      ...     _ = opt.step()
      >>> opt.is_extrapolated  # the parameters hold w~; evaluate at the anchor:
      True
      >>> with opt.at_anchor():
      ...     anchor_loss = torch.nn.functional.mse_loss(model(x), y)

    Reference:
      T. Lin, L. Kong, S. U. Stich, M. Jaggi, "Extrapolation for Large-batch Training in
      Deep Learning", ICML 2020, arXiv:2006.05720. The details the paper's text did not
      settle here (stepping from the anchor, ``"past"`` mode, ALI-G's linearised step)
      are this project's: see ``docs/extrapolation.md``.
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
        if not isinstance(base_optimizer, Optimizer):
            raise ValueError(
                f"Invalid base_optimizer: got {describe_value(base_optimizer)}; expected a "
                "torch.optim.Optimizer (e.g. torch.optim.SGD(params, lr=0.1, momentum=0.9, "
                "nesterov=True) or alig_torch.AliG(params, max_lr=0.1)). Build the optimizer "
                "first, then wrap it."
            )
        if isinstance(base_optimizer, Extrapolation):
            raise ValueError(
                "Invalid base_optimizer: got an Extrapolation; expected the optimizer it "
                "wraps. Extrapolation does not nest: wrap the base optimizer once."
            )
        previous = _WRAPPED.get(base_optimizer)
        if previous is not None and previous() is not None:
            raise ValueError(
                f"This {type(base_optimizer).__name__} is already wrapped by another "
                "Extrapolation: two wrappers would each step it. Use the existing wrapper, "
                "or build a new base optimizer."
            )
        if not isinstance(alternate, bool):
            raise ValueError(
                f"Invalid alternate: got {describe_value(alternate)}; expected True or False. Pass "
                "alternate=True for one closure call per step (calls alternate between the "
                "anchor and the extrapolated point), False for both on the same batch."
            )
        if anchor_gradient not in ANCHOR_GRADIENTS:
            raise ValueError(
                f"Invalid anchor_gradient: got {describe_value(anchor_gradient)}; expected "
                "'all_reduced' (the anchor pass is an ordinary DDP backward: every rank "
                "extrapolates along the averaged gradient) or 'local' (the anchor pass runs "
                "under ddp_model.no_sync(): each rank along its own)."
            )
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
        self._added: list[Any] = []  # the losses of add_loss() since the last call
        for p in self._params():
            self._check_param(p)
            self.state[p]["anchor"] = p.detach().clone()
        self._guard = _Guard()
        self._install_guard()

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        if p.is_complex() or not p.is_floating_point():
            raise ValueError(
                f"Extrapolation moves real floating-point parameters; got one of dtype "
                f"{p.dtype} and shape {tuple(p.shape)}. Optimize torch.view_as_real(p) for a "
                "complex parameter; leave integer tensors out of the optimizer."
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from torch.distributed.tensor import DTensor

            if isinstance(p, DTensor):
                raise ValueError(
                    "Extrapolation does not support DTensor (FSDP2, tensor parallel) "
                    f"parameters yet (got one of shape {tuple(p.shape)}): its gradient norm "
                    "and displacement would be a shard's. Use DDP, or the base optimizer "
                    "without extrapolation."
                )

    def _install_guard(self) -> None:
        handle = self.base_optimizer.register_step_pre_hook(self._guard)
        weakref.finalize(self, handle.remove)
        _WRAPPED[self.base_optimizer] = weakref.ref(self)

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
            self._check_param(p)
            self.state[p]["anchor"] = p.detach().clone()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_guard"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._guard = _Guard()
        self._install_guard()

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
        params = self._params()
        with torch.no_grad():
            return [a.clone() for a in anchor_params(torch, self._core_state(params), params)]

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
                    state = self._core_state(params)
                    anchors = anchor_params(torch, state, params)
                    held = [p.detach().clone() for p in params]
                    for p, a in zip(params, anchors, strict=True):
                        p.copy_(a)
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
        self._added = []

    def add_loss(self, loss: Any) -> None:
        """Adds the loss of one backward pass to the loss of the next call.

        With gradient accumulation, call it after each ``backward()`` with the loss as it
        was backpropagated (e.g. already divided by the number of micro-batches), then
        ``opt.step()``: the call uses their sum, the loss of the summed gradient, as
        ``opt.step(loss=[loss_1, ..., loss_k])`` does. :meth:`zero_grad` and
        :meth:`step` forget the added losses.

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
        self._loss_tensor(loss, torch.device("cpu"), torch.float64)  # checked now
        self._added.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)

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
        if not (
            isinstance(state_dict, dict)
            and "extrapolation" in state_dict
            and "base_optimizer" in state_dict
        ):
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)
            raise ValueError(
                f"Not an Extrapolation state_dict (keys {keys}); expected the dict of "
                "Extrapolation.state_dict(), with 'base_optimizer' and 'extrapolation'. To "
                "start extrapolating from a base optimizer's checkpoint, load it into the "
                "base first: base.load_state_dict(sd); opt = Extrapolation(base, ...)."
            )
        saved = state_dict["extrapolation"]
        for key in ("mode", "linearized"):
            ours = getattr(self._config, key)
            if saved.get(key) != ours:
                raise ValueError(
                    f"This checkpoint was saved with {key}={saved.get(key)!r}, and this "
                    f"Extrapolation has {key}={ours!r}: resuming would change the run. Build "
                    f"the wrapper with {key}={saved.get(key)!r} to resume."
                )
        params = self._params()
        anchor = saved.get("anchor")
        phase = int(saved["phase"])
        if phase:
            shapes = [tuple(a.shape) for a in anchor] if isinstance(anchor, list) else None
            if shapes != [tuple(p.shape) for p in params]:
                raise ValueError(
                    f"This checkpoint's anchor has shapes {shapes}; the parameters have "
                    f"{[tuple(p.shape) for p in params]}. Load it into a wrapper of the same "
                    "parameters, in the same param groups."
                )
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
        """One call: extrapolates, updates, or both (see the class docstring).

        Args:
          closure: zeroes the gradients, computes the loss, calls ``backward()`` and
            returns the loss (called under ``torch.enable_grad()``; twice in
            ``"gradient"`` mode unless ``alternate``).
          loss: the loss of the gradient in ``.grad`` (a float or a 0-d tensor, unscaled
            under loss scaling), when no closure is given; with gradient accumulation,
            the list of the losses of the backward passes (summed; or :meth:`add_loss`).
            ALI-G as the base needs one.

        Returns:
          The loss of the first evaluation of the call (the closure's, or ``loss``).
        """
        if self._in_anchor_context:
            raise RuntimeError(
                "Extrapolation.step() inside opt.at_anchor(): the parameters hold the anchor "
                "only for evaluation and saving. Step after the with-block."
            )
        added, self._added = self._added, []
        if closure is not None and loss is not None:
            raise ValueError(
                f"Extrapolation.step() got both a closure and loss=; give one. {_LOSS_HELP}"
            )
        if added:
            if closure is not None or loss is not None:
                raise ValueError(
                    f"Extrapolation.step() got {len(added)} losses added with add_loss() and "
                    "also a closure or loss=; hand the loss over one way."
                )
            loss = added
        first = self._evaluate(closure, loss)
        if self.anchor_pass:
            skipped = self._extrapolate(first)
            self.base_optimizer.zero_grad()  # g(w_t) must not add into g(w~_t)
            if closure is None or self.alternate or skipped:
                return first
            self._update(self._evaluate(closure, None))
            return first
        self._update(first)
        return first

    def _evaluate(self, closure: Callable[[], Any] | None, loss: Any) -> Any:
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is None and self._is_alig:
            raise ValueError(
                "Extrapolation around AliG got no loss: ALI-G computes its step size (and "
                f"its default lr_x) from the loss at every evaluation. {_LOSS_HELP}"
            )
        return loss

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _core_state(self, params: list[torch.Tensor]) -> ExtrapolationState:
        device = params[0].device if params else None
        return ExtrapolationState(
            anchor=tuple(self.state[p]["anchor"] for p in params),
            phase=torch.tensor(self._phase, device=device),
            iteration=self._iteration,  # a Python int: what an lr_x schedule is called with
            skipped=self._skipped,
        )

    def _gather(
        self, loss: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor | None, torch.Tensor]:
        """The parameters, their gradients, the loss (0-d; a list's sum) and ``S`` (0-d)."""
        params = self._params()
        if not params:
            raise ValueError("Extrapolation has no parameters: its param groups are empty.")
        grads: list[torch.Tensor | None] = []
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    f"Extrapolation does not support sparse gradients (a parameter of shape "
                    f"{tuple(p.shape)} has one). Use a dense embedding (sparse=False)."
                )
            grads.append(None if p.grad is None else p.grad.detach())
        dtype, device = accumulation_dtype(params), params[0].device
        # S as AliG takes it, on the path an AliG of these parameters would take.
        path = select_path(params, foreach=True)
        present = [g for g in grads if g is not None]
        sq = as_0d(path.sum_of_squares(present, dtype, device), device, dtype)
        if isinstance(loss, list | tuple):
            total = summed_losses(
                loss,
                device,
                dtype,
                who="Extrapolation",
                step_name="Extrapolation.step",
                loss_help=_LOSS_HELP,
            )
            return params, grads, total, sq
        return params, grads, self._loss_tensor(loss, device, dtype), sq

    @staticmethod
    def _loss_tensor(loss: Any, device: torch.device, dtype: torch.dtype) -> Any:
        if loss is None:
            return None
        return loss_as_tensor(loss, device, dtype, who="Extrapolation", loss_help=_LOSS_HELP)

    def _group_value(self, key: str) -> Any:
        """A hyperparameter the core takes once: the same in every param group."""
        values = {repr(group.get(key)) for group in self.param_groups}
        if len(values) != 1 or key not in self.param_groups[0]:
            raise ValueError(
                f"lr_x=None takes the base optimizer's step size, and its param groups "
                f"disagree on {key!r} ({sorted(values)}): the displacement takes one. Pass "
                "lr_x=... (a number or a schedule) to the Extrapolation."
            )
        return self.param_groups[0][key]

    def _anchor_lr_x(self, loss: torch.Tensor | None, sq: torch.Tensor) -> Any:
        """The base's step size at the anchor (``lr_x=None``): ALI-G's, or the groups' lr."""
        if self._config.lr_x is not None:
            return None
        if not self._is_alig:
            return self._group_value("lr")
        assert loss is not None
        return anchor_step_size(
            torch,
            loss,
            sq,
            max_lr=self._group_value("lr"),  # inf (no cap) as AliG stores it: the same step
            eps=self._group_value("eps"),
            f_star=self._group_value("f_star"),
        )

    def _update_lr_x(self, stepped: bool) -> Any:
        """``"past"`` mode's base step size: the groups' lr, or the gamma ALI-G just took."""
        if self._config.mode != "past" or self._config.lr_x is not None:
            return None
        if not self._is_alig:
            return self._group_value("lr")
        assert isinstance(self.base_optimizer, AliG)
        gamma = self.base_optimizer.gamma
        return gamma if stepped and gamma is not None else 0.0  # skipped: not used

    def _any_rank(self, flag: torch.Tensor, loss: torch.Tensor | None) -> tuple[bool, Any]:
        """Under torch.distributed: (any rank's flag, the mean loss). One all-reduce."""
        import torch.distributed as dist

        zero = torch.zeros((), dtype=torch.float64, device=flag.device)
        values = torch.stack([zero if loss is None else loss.to(zero), flag.to(zero)])
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        mean = None if loss is None else (values[0] / dist.get_world_size()).to(loss)
        return bool(values[1] > 0), mean

    @torch.no_grad()
    def _extrapolate(self, loss: Any) -> bool:
        """The call at the anchor (``"gradient"`` mode, phase 0); True where skipped."""
        params, grads, loss_t, sq = self._gather(loss)
        if _world_size() > 1:
            any_skipped, mean = self._any_rank(evaluation_skipped(torch, loss_t, sq), loss_t)
            if self.anchor_gradient == "all_reduced":
                loss_t = mean
            if any_skipped:  # a non-finite value on any rank: every rank's core sees one
                sq = torch.full_like(sq, float("nan"))
        call = extrapolate(
            torch,
            self._config,
            self._core_state(params),
            params,
            grads,
            loss=loss_t,
            sq_grad_norm=sq,
            default_lr_x=self._anchor_lr_x(loss_t, sq),
        )
        return self._apply(params, call)

    @torch.no_grad()
    def _update(self, loss: Any) -> None:
        """The update: the base steps from the anchor with the gradient at ``w~_t``."""
        params, grads, loss_t, sq = self._gather(loss)
        state = self._core_state(params)
        inputs: UpdateInputs = update_inputs(
            torch,
            state,
            params,
            grads,
            loss=loss_t,
            sq_grad_norm=sq,
            linearized=self._config.linearized and self._is_alig,
        )
        if _world_size() > 1:
            any_skipped, _ = self._any_rank(inputs.skipped, None)
            inputs = inputs._replace(skipped=torch.tensor(any_skipped, device=sq.device))
        stepped = not bool(inputs.skipped)
        base_params: list[torch.Tensor] | tuple[torch.Tensor, ...] = inputs.anchor
        if stepped:
            for p, a in zip(params, inputs.anchor, strict=True):
                p.copy_(a)  # the base steps from w_t
            self._guard.stepping = True
            try:
                if isinstance(self.base_optimizer, AliG):
                    self.base_optimizer.step(loss=self._for_alig(inputs.loss, loss))
                else:
                    self.base_optimizer.step()
            finally:
                self._guard.stepping = False
            base_params = params
        noise = self.noise(self._iteration + 1) if self._config.mode == "noise" else None
        call = finish_update(
            torch,
            self._config,
            state,
            inputs,
            base_params,
            grads,
            default_lr_x=self._update_lr_x(stepped),
            noise=noise,
        )
        self._apply(params, call)

    @staticmethod
    def _for_alig(corrected: Any, given: Any) -> Any:
        """The corrected loss for AliG.step(loss=...), as many entries as losses given.

        AliG counts the backward passes that reached its parameters and wants one loss per
        pass: after k passes it gets the corrected total and k - 1 zeros (their sum is
        exactly the core's number).
        """
        if isinstance(given, list | tuple) and len(given) > 1:
            return [corrected] + [0.0] * (len(given) - 1)
        return corrected

    def _apply(self, params: list[torch.Tensor], call: ExtrapolationCall) -> bool:
        """Stores the call's state and writes its parameters; returns whether it skipped."""
        for p, a in zip(params, call.state.anchor, strict=True):
            stored = self.state[p]["anchor"]
            if a is not stored:
                stored.copy_(a)
        for p, new in zip(params, call.params, strict=True):
            if new is not p:
                p.copy_(new)
        self._phase = int(call.state.phase)
        self._iteration = int(call.state.iteration)
        self._skipped = int(call.state.skipped)
        return bool(call.skipped)
