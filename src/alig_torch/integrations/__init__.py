"""ALI-G in the trainers teams use: each module is imported only when you import it.

* :mod:`alig_torch.integrations.lightning`: :class:`~.lightning.AliGCallback`, for
  ``Trainer(accumulate_grad_batches=k)`` and fp16 AMP in automatic optimization;
* :mod:`alig_torch.integrations.accelerate`: :func:`~.accelerate.backward`, in place of
  ``accelerator.backward(loss)``, with or without ``gradient_accumulation_steps``;
* :mod:`alig_torch.integrations.transformers`: :class:`~.transformers.AliGTrainer`, a
  ``transformers.Trainer`` that hands ALI-G the loss it backpropagates.

Each hands the optimizer the loss of every backward pass (:meth:`alig_torch.AliG.add_loss`)
exactly as the trainer backpropagates it, so that the loss of a step is the loss of the
(accumulated) gradient it applies. ``import alig_torch`` imports none of these trainers.
"""

__all__: list[str] = []
