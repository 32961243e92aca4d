"""Hugging Face transformers: :class:`AliGTrainer`, a ``Trainer`` that trains with ALI-G right.

``transformers.Trainer`` calls ``optimizer.step()`` with no argument, so a plain
``Trainer(optimizers=(AliG(...), None))`` gets no loss (a ``ValueError``). Its defaults
would also change ALI-G silently: ``max_grad_norm=1.0`` clips the gradient before ALI-G
takes its norm, and the default linear schedule drives the param group's ``lr`` (ALI-G's
cap ``max_lr``) to 0. :class:`AliGTrainer` hands ALI-G the loss of every backward pass
exactly as ``training_step`` backpropagated it (divided by the gradient accumulation
steps, or reduced over ``num_items_in_batch`` by the model), and refuses those defaults
with errors that name the ``TrainingArguments`` field to set. Under DeepSpeed
(``TrainingArguments(deepspeed=config)``), whose engine steps inside Trainer's backward,
the loss is handed over just before that backward pass and DeepSpeed's config is checked
(:mod:`alig_torch.integrations.deepspeed`; docs/guides/deepspeed.md)::

    from transformers import TrainingArguments
    from alig_torch.integrations.transformers import AliGTrainer

    args = TrainingArguments(
        output_dir, learning_rate=1.0,       # ALI-G's max_lr
        max_grad_norm=0.0, lr_scheduler_type="constant", gradient_accumulation_steps=4,
    )
    trainer = AliGTrainer(model=model, args=args, train_dataset=data,
                          alig_kwargs={"momentum": 0.9})
    trainer.train()
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import transformers
from transformers.trainer_utils import SchedulerType

from alig_torch._optimizer import AliG
from alig_torch.integrations._find import alig_optimizers

__all__ = ["AliGTrainer"]


def _check_arguments(trainer: AliGTrainer) -> None:
    """Refuses the TrainingArguments that would change ALI-G's step without saying so."""
    args = trainer.args
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        raise ValueError(
            f"TrainingArguments(max_grad_norm={args.max_grad_norm}) clips the gradient before "
            "the optimizer sees it (1.0 is Trainer's default), so ALI-G would take its step "
            "size from the clipped gradient's norm with the loss of the unclipped one. Set "
            "TrainingArguments(max_grad_norm=0.0): ALI-G's step is already bounded by max_lr "
            "(TrainingArguments(learning_rate=...)); to constrain the weights, use max_norm."
        )
    if trainer.lr_scheduler is None and SchedulerType(args.lr_scheduler_type) != (
        SchedulerType.CONSTANT
    ):
        raise ValueError(
            f"TrainingArguments(lr_scheduler_type={SchedulerType(args.lr_scheduler_type).value!r}) "
            "would move the param group's lr, which is ALI-G's cap max_lr (Trainer's default "
            "'linear' drives it to 0 by the end of training). Set "
            "TrainingArguments(lr_scheduler_type='constant'): ALI-G needs no schedule; to "
            "schedule the cap on purpose, pass optimizers=(AliG(...), your_scheduler)."
        )
    if args.weight_decay:
        raise ValueError(
            f"TrainingArguments(weight_decay={args.weight_decay}) is not applied by ALI-G "
            "(its learning rate is the Polyak step, so decay scaled by it would not be the "
            "decay you asked for). Set TrainingArguments(weight_decay=0.0) and constrain the "
            "weights with AliG's max_norm instead (alig_kwargs={'max_norm': r}, or "
            "AliG(..., max_norm=r)), as in the paper."
        )
    if trainer.optimizer is not None and not alig_optimizers(trainer.optimizer):
        raise ValueError(
            f"AliGTrainer trains with alig_torch.AliG, but got optimizers=("
            f"{type(trainer.optimizer).__name__}, ...). Pass an AliG, or none to have "
            "AliGTrainer create one from TrainingArguments(learning_rate=...) and alig_kwargs."
        )
    if trainer.optimizer_cls_and_kwargs is not None:
        raise ValueError(
            "AliGTrainer creates its AliG itself; optimizer_cls_and_kwargs is not used. Pass "
            "AliG's arguments as alig_kwargs={...} (max_lr is TrainingArguments(learning_rate"
            "=...)), or an optimizer as optimizers=(AliG(...), None)."
        )
    if trainer.is_deepspeed_enabled:
        _check_deepspeed_config(trainer)


def _check_deepspeed_config(trainer: AliGTrainer) -> None:
    """Refuses the DeepSpeed config sections that would replace or change ALI-G's step.

    The rest (gradient clipping, fp16, offload, ...) is checked on the engine at the first
    backward pass, by :func:`alig_torch.integrations.deepspeed.check_engine`.
    """
    hf_config = getattr(trainer.args, "hf_deepspeed_config", None)
    config = getattr(hf_config, "config", None) or {}
    for section, what in (
        ("optimizer", "DeepSpeed would create that optimizer and train with it, not ALI-G"),
        ("scheduler", "DeepSpeed's scheduler would move the lr, which is ALI-G's cap max_lr"),
    ):
        if section in config:
            raise ValueError(
                f'The DeepSpeed config has an "{section}" section ({config[section]!r}): '
                f"{what}. Remove it: AliGTrainer creates its AliG from "
                "TrainingArguments(learning_rate=...) and alig_kwargs, and ALI-G needs no "
                "schedule."
            )
    clipping = config.get("gradient_clipping", 1.0)
    if clipping != "auto" and float(clipping) > 0:
        raise ValueError(
            f'The DeepSpeed config sets "gradient_clipping": {clipping} (1.0 when the key is '
            "absent): DeepSpeed would clip the gradient before ALI-G takes its norm. Set "
            '"gradient_clipping": 0.0, or "auto" with TrainingArguments(max_grad_norm=0.0).'
        )
    if trainer.optimizer is not None:
        raise ValueError(
            "Under DeepSpeed, Trainer discards optimizers=(AliG(...), ...) and creates its "
            "optimizer again (transformers' deepspeed_init): pass AliG's arguments as "
            "AliGTrainer(alig_kwargs={...}) instead (max_lr is "
            "TrainingArguments(learning_rate=...))."
        )


class _ForgetLossesOfSkippedSteps(transformers.TrainerCallback):
    """At the start of each optimizer step, drops losses left over from the one before.

    ``AliG.step`` consumes the losses of its step; they are left over only when the step
    did not run (under fp16 the GradScaler skips a step with an overflowed gradient), and
    Trainer zeroes the gradients with ``model.zero_grad()``, which AliG does not see.
    """

    def __init__(self, trainer: AliGTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer()
        if trainer is not None:
            for optimizer in alig_optimizers(trainer.optimizer):
                optimizer._accumulation.forget()


class AliGTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose ALI-G step gets the loss of the gradient it applies.

    ``training_step`` returns the loss it backpropagated (already divided by the gradient
    accumulation steps, or reduced over ``num_items_in_batch``); this subclass adds it to
    the AliG optimizer (:meth:`alig_torch.AliG.add_loss`), and ``optimizer.step()`` then
    uses the sum over the micro-batches of the step.

    Without ``optimizers=``, it creates ``AliG(trainable parameters,
    max_lr=args.learning_rate, **alig_kwargs)``.

    Args:
      *args: as for ``transformers.Trainer``.
      alig_kwargs: keyword arguments of the AliG it creates (``momentum``,
        ``adjusted_momentum``, ``eps``, ``f_star``, ``max_norm``, ...); ``max_lr`` is
        ``TrainingArguments(learning_rate=...)``.
      **kwargs: as for ``transformers.Trainer``.

    Raises:
      ValueError: for ``max_grad_norm > 0`` (Trainer's default 1.0 clips), a
        ``lr_scheduler_type`` other than ``"constant"`` without a scheduler of your own
        (the default ``"linear"`` drives ``max_lr`` to 0), ``weight_decay > 0``, an
        optimizer that is not an AliG, ``optimizer_cls_and_kwargs``, ``max_lr`` in
        ``alig_kwargs``; under DeepSpeed, an ``"optimizer"`` or ``"scheduler"`` section or
        ``"gradient_clipping"`` above 0 in its config, an optimizer of your own (Trainer
        would replace it), and the modes that
        :func:`alig_torch.integrations.deepspeed.check_engine` refuses (at the first
        backward pass, on every rank).
    """

    optimizer: Any  # Trainer's attribute (transformers publishes no types)

    def __init__(self, *args: Any, alig_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.alig_kwargs = dict(alig_kwargs or {})
        if "max_lr" in self.alig_kwargs:
            raise ValueError(
                f"alig_kwargs sets max_lr={self.alig_kwargs['max_lr']}; AliGTrainer takes "
                "ALI-G's max_lr from TrainingArguments(learning_rate=...): set it there."
            )
        _check_arguments(self)
        self.add_callback(_ForgetLossesOfSkippedSteps(self))

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Creates ``AliG(trainable parameters, max_lr=args.learning_rate, **alig_kwargs)``."""
        if self.optimizer is None:
            model = self.model if model is None else model
            if model is None:
                raise ValueError("AliGTrainer.create_optimizer() needs a model.")
            params = [p for p in model.parameters() if p.requires_grad]
            kwargs = dict(self.alig_kwargs)
            if self.is_deepspeed_enabled:  # ZeRO stages 1-3 hand each rank its partition
                stage = self.accelerator.state.deepspeed_plugin.zero_stage or 0
                kwargs.setdefault("partitioned", stage >= 1)
            self.optimizer = AliG(params, max_lr=self.args.learning_rate, **kwargs)
        return self.optimizer

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Trainer's training step, then the loss it backpropagated to ALI-G.

        Under DeepSpeed, whose engine steps inside ``accelerator.backward``, the loss is
        handed over (and DeepSpeed's config checked) just before that backward pass, by
        :func:`alig_torch.integrations.deepspeed.hand_over_loss`.
        """
        if self.is_deepspeed_enabled:
            return self._deepspeed_training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)
        for optimizer in alig_optimizers(self.optimizer):
            optimizer.add_loss(loss)
        return loss

    def _deepspeed_training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        from alig_torch.integrations.deepspeed import hand_over_loss

        accelerator = self.accelerator
        engine = accelerator.deepspeed_engine_wrapped.engine
        original = accelerator.backward

        def backward(loss: torch.Tensor, **kwargs: Any) -> Any:
            scale = kwargs.get("scale_wrt_gas", True)
            hand_over_loss(engine, loss, self.optimizer, scale_wrt_gas=scale)
            return original(loss, **kwargs)

        accelerator.backward = backward  # this step only: Trainer calls it inside
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del accelerator.backward  # the class's method again
