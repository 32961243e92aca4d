"""Hugging Face transformers: ``AliGTrainer`` with gradient_accumulation_steps 1 and 2, and
with a model that reduces over ``num_items_in_batch``, against one step on the union of the
micro-batches (float64, 1e-10, gamma moving); Trainer's clipping, default schedule and
weight decay refused; the plain Trainer's missing-loss error names the integration."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from accelerate.state import AcceleratorState, GradientState
from transformers.loss.loss_utils import fixed_cross_entropy

from alig_cases import max_relative_deviation
from alig_torch import AliG
from alig_torch.integrations.transformers import AliGTrainer
from torch_accumulation import BATCH, KWARGS, STEPS, Run, assert_same_run, data, net

IGNORED = -100
"""Trainer's label for an item that does not count (it counts the others in num_items_in_batch)."""


class TinyConfig(transformers.PretrainedConfig):
    model_type = "alig-tiny-classifier"


class TinyClassifier(transformers.PreTrainedModel):
    """The shared float64 classifier behind Trainer's model interface (mean loss)."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.net = net()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # keep net()'s initial weights

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels, ignore_index=IGNORED), "logits": logits}


class ItemSumClassifier(TinyClassifier):
    """Reduces over Trainer's ``num_items_in_batch`` (a ``**kwargs`` forward, as causal LMs):
    the sum of the micro-batch's item losses divided by the items of the whole step."""

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        total = F.cross_entropy(logits, labels, ignore_index=IGNORED, reduction="sum")
        return {"loss": total / kwargs["num_items_in_batch"], "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """Trainer builds an Accelerator, whose state is process-wide: one per test."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _labels(ignore_some: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared data; with ``ignore_some``, labels of unequal numbers of items per
    micro-batch are ignored (so a mean of micro-batch means is not the union's mean)."""
    x, y = data()
    if ignore_some:
        y = y.clone()
        y[torch.arange(len(y)) % 7 < 3] = IGNORED
    return x, y


def _union_reference(ignore_some: bool) -> Run:
    """One ``step(loss=...)`` per union batch: mean over the batch's counted items."""
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    x, y = _labels(ignore_some)
    gammas = []
    for t in range(STEPS):
        rows = slice(t * BATCH, (t + 1) * BATCH)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[rows]), y[rows], ignore_index=IGNORED)
        loss.backward()
        opt.step(loss=loss)
        gammas.append(float(opt.gamma))
    return Run([p.detach().numpy().copy() for p in model.parameters()], gammas)


def _args(tmp_path: Path, ga: int, **overrides: Any) -> transformers.TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": BATCH // ga,
        "gradient_accumulation_steps": ga,
        "max_steps": STEPS,
        "learning_rate": KWARGS["max_lr"],  # AliG's max_lr
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "train_sampling_strategy": "sequential",
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class _Gammas(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.gammas: list[float] = []
        self.alig: AliG | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        alig = kwargs["optimizer"].optimizer  # Trainer's AcceleratedOptimizer wraps it
        self.alig = alig
        self.gammas.append(float(alig.gamma))


def _train(trainer: transformers.Trainer, model: torch.nn.Module, gammas: _Gammas) -> Run:
    trainer.train()
    assert gammas.alig is not None
    assert int(gammas.alig.steps_taken) == STEPS
    return Run([p.detach().numpy().copy() for p in model.net.parameters()], gammas.gammas)


@pytest.mark.parametrize("ga", [1, 2, 4])
@pytest.mark.parametrize("model_class", [TinyClassifier, ItemSumClassifier], ids=["mean", "items"])
def test_aligtrainer_equals_one_step_on_the_union(
    tmp_path: Path, model_class: type[TinyClassifier], ga: int
) -> None:
    """AliGTrainer creates AliG from learning_rate (max_lr) and alig_kwargs."""
    ignore_some = model_class is ItemSumClassifier
    model = model_class(TinyConfig())
    gammas = _Gammas()
    trainer = AliGTrainer(
        model=model,
        args=_args(tmp_path, ga),
        train_dataset=Rows(*_labels(ignore_some)),
        callbacks=[gammas],
        alig_kwargs={"momentum": KWARGS["momentum"]},
    )
    assert trainer.model_accepts_loss_kwargs is ignore_some
    assert_same_run(_train(trainer, model, gammas), _union_reference(ignore_some))


def test_aligtrainer_with_an_alig_of_your_own(tmp_path: Path) -> None:
    model = TinyClassifier(TinyConfig())
    gammas = _Gammas()
    trainer = AliGTrainer(
        model=model,
        args=_args(tmp_path, 2),
        train_dataset=Rows(*_labels(False)),
        callbacks=[gammas],
        optimizers=(AliG(model.parameters(), **KWARGS), None),
    )
    assert_same_run(_train(trainer, model, gammas), _union_reference(False))


def test_a_step_that_did_not_run_leaves_no_loss_to_the_next(tmp_path: Path) -> None:
    """Under fp16 the GradScaler skips an overflowed step (AliG.step never runs) and Trainer
    zeroes the gradients with model.zero_grad(): the next step uses its own losses only."""
    model = TinyClassifier(TinyConfig())
    alig = AliG(model.parameters(), **KWARGS)
    original_step = alig.step
    calls = []

    def skip_the_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return None if len(calls) == 1 else original_step(*args, **kwargs)

    alig.step = skip_the_first  # type: ignore[method-assign]
    trainer = AliGTrainer(
        model=model,
        args=_args(tmp_path, 2, max_steps=STEPS + 1),
        train_dataset=Rows(*(torch.cat([d[:BATCH], d]) for d in _labels(False))),
        optimizers=(alig, None),
    )
    trainer.train()
    assert int(alig.steps_taken) == STEPS
    reference = _union_reference(False)
    actual = [p.detach().numpy() for p in model.net.parameters()]
    assert max_relative_deviation(actual, reference.params) <= 1e-10


def test_plain_trainer_missing_loss_names_the_integration(tmp_path: Path) -> None:
    model = TinyClassifier(TinyConfig())
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, 1),
        train_dataset=Rows(*_labels(False)),
        optimizers=(AliG(model.parameters(), **KWARGS), None),
    )
    with pytest.raises(ValueError, match="got no loss") as e:
        trainer.train()
    assert "alig_torch.integrations.transformers.AliGTrainer in place of Trainer" in str(e.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"max_grad_norm": 1.0}, ("TrainingArguments(max_grad_norm=1.0)", "max_grad_norm=0.0")),
        (
            {"lr_scheduler_type": "linear"},
            ("TrainingArguments(lr_scheduler_type='linear')", "lr_scheduler_type='constant'"),
        ),
        (
            {"lr_scheduler_type": "cosine"},
            ("lr_scheduler_type='cosine'", "optimizers=(AliG(...), your_scheduler)"),
        ),
        ({"weight_decay": 0.01}, ("TrainingArguments(weight_decay=0.01)", "max_norm")),
    ],
    ids=["clipping", "linear_schedule", "cosine_schedule", "weight_decay"],
)
def test_aligtrainer_refuses_what_would_change_the_step(
    tmp_path: Path, override: dict[str, Any], words: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=re.escape(words[0])) as e:
        AliGTrainer(
            model=TinyClassifier(TinyConfig()),
            args=_args(tmp_path, 1, **override),
            train_dataset=Rows(*_labels(False)),
        )
    for word in words:
        assert word in str(e.value)


def test_trainer_defaults_are_the_refused_ones(tmp_path: Path) -> None:
    """Trainer's own defaults clip at 1.0 and decay the lr linearly: refused as they are."""
    defaults = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert defaults.max_grad_norm == 1.0
    assert defaults.lr_scheduler_type == "linear"
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0"):
        AliGTrainer(model=TinyClassifier(TinyConfig()), args=defaults)


def test_a_schedule_of_your_own_is_accepted(tmp_path: Path) -> None:
    model = TinyClassifier(TinyConfig())
    alig = AliG(model.parameters(), **KWARGS)
    schedule = torch.optim.lr_scheduler.LambdaLR(alig, lambda step: 1.0)
    AliGTrainer(
        model=model,
        args=_args(tmp_path, 1, lr_scheduler_type="linear"),
        optimizers=(alig, schedule),
    )


def test_aligtrainer_refuses_another_optimizer_and_max_lr_in_alig_kwargs(tmp_path: Path) -> None:
    model = TinyClassifier(TinyConfig())
    with pytest.raises(ValueError, match=r"AliGTrainer trains with alig_torch\.AliG"):
        AliGTrainer(
            model=model,
            args=_args(tmp_path, 1),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
    with pytest.raises(ValueError, match=r"TrainingArguments\(learning_rate=\.\.\.\)"):
        AliGTrainer(model=model, args=_args(tmp_path, 1), alig_kwargs={"max_lr": 1.0})


def _causal_lm_loss_in_float64(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | None = None,
    ignore_index: int = IGNORED,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` without its upcast of the logits to float32."""
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return fixed_cross_entropy(
        logits.reshape(-1, vocab_size), shift_labels.reshape(-1), num_items_in_batch, ignore_index
    )


def test_a_tiny_gpt2_from_its_config_trains_with_accumulation(tmp_path: Path) -> None:
    """A real transformers model (GPT-2, one layer, built from its config: nothing
    downloads) reduces its loss over num_items_in_batch; with gradient_accumulation_steps=2
    Trainer's two micro-batches equal one step on their union with that union's
    num_items_in_batch (as Trainer counts it: for GPT2LMHeadModel, whose loss_type it does
    not recognise, over the unshifted labels)."""
    config = transformers.GPT2Config(
        vocab_size=16,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    model.loss_function = _causal_lm_loss_in_float64
    reference_model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (2 * 4, 8), generator=generator)
    labels = ids.clone()
    labels[:3, :5] = IGNORED  # unequal numbers of counted tokens per micro-batch

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": labels[i]}

    max_lr, momentum = 50.0, 0.9
    gammas = _Gammas()
    trainer = AliGTrainer(
        model=model,
        args=_args(tmp_path, 2, per_device_train_batch_size=2, max_steps=2, learning_rate=max_lr),
        train_dataset=Tokens(),
        callbacks=[gammas],
        alig_kwargs={"momentum": momentum},
    )
    assert trainer.model_accepts_loss_kwargs
    trainer.train()

    opt = AliG(reference_model.parameters(), max_lr=max_lr, momentum=momentum)
    reference_gammas = []
    for step in range(2):
        rows = slice(4 * step, 4 * step + 4)
        opt.zero_grad()
        items = labels[rows].ne(IGNORED).sum()
        loss = reference_model(
            input_ids=ids[rows], labels=labels[rows], num_items_in_batch=items
        ).loss
        loss.backward()
        opt.step(loss=loss)
        reference_gammas.append(float(opt.gamma))
    actual = Run([p.detach().numpy().copy() for p in model.parameters()], gammas.gammas)
    expected = Run(
        [p.detach().numpy().copy() for p in reference_model.parameters()], reference_gammas
    )
    assert_same_run(actual, expected, max_lr=max_lr)
