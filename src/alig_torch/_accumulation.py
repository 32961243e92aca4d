"""The loss of an accumulated gradient: the losses handed over, the backward passes counted.

With gradient accumulation, ``.grad`` holds the sum of what several ``backward()`` calls
produced, so the loss ALI-G needs is the sum of the losses that were backpropagated. This
module keeps, per optimizer, the losses added since the last step (:meth:`AliG.add_loss`)
and counts the backward passes that reached the optimizer's parameters, so that a step
handed a single micro-batch's loss for a gradient of several is an error, not a silent
wrong step.

The count comes from a post-accumulate-grad hook on each parameter. A hook holds the
counter only, never the optimizer, and the optimizer removes its hooks when it is
garbage-collected. Hooks are not copied by ``deepcopy`` or pickling: the optimizer
registers them again on its (new) parameters in ``__setstate__``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["INTEGRATIONS_HELP", "Accumulation", "count_mismatch_message"]

INTEGRATIONS_HELP = (
    "Lightning with accumulate_grad_batches or fp16 AMP: Trainer(callbacks=[alig_torch."
    "integrations.lightning.AliGCallback()]); accelerate: "
    "alig_torch.integrations.accelerate.backward(accelerator, loss, optimizer) in place of "
    "accelerator.backward(loss); Hugging Face transformers: "
    "alig_torch.integrations.transformers.AliGTrainer in place of Trainer; DeepSpeed: "
    "alig_torch.integrations.deepspeed.backward(engine, loss) in place of "
    "engine.backward(loss)."
)
"""The integrations that hand every backpropagated loss over, named in the errors."""

_graph_task_id: Callable[[], int] | None = getattr(torch._C, "_current_graph_task_id", None)
"""The id of the running backward pass (torch >= 2.1; private, so optional)."""


class _BackwardCounter:
    """How many backward passes reached each parameter since the last reset.

    A parameter whose ``.grad`` is another tensor than after the previous pass (set to
    ``None`` by ``model.zero_grad()`` in between) starts again at one. ``distinct`` counts
    the backward passes seen (by their id, when torch gives it): the hooks of one pass
    run one after the other, so a change of id is a new pass. It is an int, not a set of
    ids, so that a compiled step does not guard on ids that change every step.
    """

    __slots__ = ("counts", "distinct", "grads", "last_pass")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.grads: dict[int, weakref.ref[torch.Tensor]] = {}
        self.distinct = 0
        self.last_pass: int | None = None

    def record(self, key: int, param: torch.Tensor) -> None:
        grad = param.grad
        previous = self.grads.get(key)
        same = previous is not None and grad is not None and previous() is grad
        self.counts[key] = self.counts.get(key, 0) + 1 if same else 1
        if grad is not None:
            self.grads[key] = weakref.ref(grad)
        if _graph_task_id is not None:
            current = _graph_task_id()
            if current != self.last_pass:
                self.last_pass = current
                self.distinct += 1

    def reset(self) -> None:
        if self.counts:
            self.counts.clear()
            self.grads.clear()
            self.distinct = 0
            self.last_pass = None


class _CountBackward:
    """The post-accumulate-grad hook of one parameter: it tells the counter, nothing else."""

    __slots__ = ("counter", "key")

    def __init__(self, counter: _BackwardCounter, key: int) -> None:
        self.counter = counter
        self.key = key

    def __call__(self, param: torch.Tensor) -> None:
        self.counter.record(self.key, param)


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class Accumulation:
    """One optimizer's pending losses and backward-pass counter (never pickled).

    Attributes:
      total: the sum of the losses added since the last step, a detached 0-d tensor, or
        ``None`` when none was added.
      added: how many losses were added.
    """

    def __init__(self, owner: Any) -> None:
        self.total: torch.Tensor | None = None
        self.added = 0
        self._counter = _BackwardCounter()
        self._hooked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._handles: list[RemovableHandle] = []
        self._waiting: list[weakref.ref[torch.Tensor]] = []
        weakref.finalize(owner, _remove, self._handles)

    def watch(self, params: list[torch.Tensor]) -> None:
        """Registers the counting hook on each of ``params`` not yet watched.

        A parameter that does not require a gradient cannot carry the hook: it is tried
        again at the next step or ``zero_grad()`` (it may have been unfrozen by then).
        """
        for param in params:
            if param in self._hooked:
                continue
            if not param.requires_grad:
                self._waiting.append(weakref.ref(param))
                continue
            try:
                handle = param.register_post_accumulate_grad_hook(
                    _CountBackward(self._counter, id(param))
                )
            except RuntimeError:  # a tensor type without autograd hooks: it is not counted
                self._hooked[param] = None
                continue
            self._hooked[param] = handle
            self._handles.append(handle)

    def add(self, loss: torch.Tensor) -> None:
        """Adds a checked, detached 0-d loss (already in the accumulation dtype)."""
        self.total = loss if self.total is None else self.total + loss
        self.added += 1

    def forget(self) -> None:
        """Drops the pending losses and the count: the gradient they belong to is gone."""
        self.total = None
        self.added = 0
        self._counter.reset()
        if self._waiting:
            waiting = [p for ref in self._waiting if (p := ref()) is not None]
            self._waiting = []
            self.watch(waiting)

    def backward_passes(self) -> tuple[int, int | None]:
        """``(most, distinct)``: how many backward passes reached the parameters.

        ``most`` is the most that reached one parameter, ``distinct`` the number of
        distinct backward passes that reached any (``None`` when unknown). ``most`` is 0
        when no hook fired (e.g. FSDP1 flat parameters, whose gradients FSDP writes, or
        parameters swapped into the param groups): then nothing is known and nothing is
        checked.
        """
        counts = self._counter.counts
        if not counts:
            return 0, None
        distinct = self._counter.distinct
        return max(counts.values()), (distinct if distinct else None)


def count_mismatch_message(
    given: int, how: str, most: int, distinct: int | None, step: str = "AliG.step"
) -> str | None:
    """The error for ``given`` losses handed over (``how``), or ``None`` if they can match.

    At least ``most`` backward passes contributed to the gradient (that many reached one
    parameter) and at most ``distinct`` did (when known): the losses handed over must be
    one per backward pass. ``step`` names the method handed them.
    """
    if most == 0:
        return None
    why = (
        f"{most} backward passes reached this optimizer's parameters since its last step or "
        "zero_grad(), and .grad holds the sum of their gradients, so ALI-G's loss must be "
        f"the sum of the {most} losses that were backpropagated (each exactly as it was "
        "backpropagated, e.g. already divided by the number of micro-batches)."
    )
    ways = (
        "Hand them over one per backward(): opt.add_loss(loss) after each backward() and then "
        "opt.step(), or all at once: opt.step(loss=[loss_1, ..., loss_k]). "
    )
    zeroed = (
        "If you zeroed the gradients in between by other means than opt.zero_grad() (e.g. "
        "model.zero_grad(set_to_none=False) or p.grad.zero_()), call opt.zero_grad() "
        "instead. "
    )
    if given < most:
        got = "one loss" if given == 1 else f"{given} losses"
        return (
            f"{step}() got {got} ({how}), but {why} {ways}{zeroed}In a trainer: {INTEGRATIONS_HELP}"
        )
    if distinct is not None and given > distinct:
        return (
            f"{step}() got {given} losses ({how}), but only {distinct} backward passes "
            "reached this optimizer's parameters since its last step or zero_grad(): each "
            "loss must be that of one backward pass. Was a loss added twice (e.g. by an "
            "integration such as AliGCallback and by hand)? Add each backpropagated loss "
            "once."
        )
    return None
