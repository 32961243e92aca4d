"""torch.optim's generic optimizer invariants, run on AliG with torch's own harness.

``torch.testing._internal.common_optimizers`` describes an optimizer to torch's generic
tests with an :class:`OptimizerInfo` (its inputs, the inputs that must raise, its
schedulers); ``@optims`` runs a test over each info and dtype, ``instantiate_device_type_tests``
over each device. :data:`ALIG_INFO` registers AliG there; the tests below are this
project's own statements of what torch promises of every optimizer, restricted to what
applies to one that needs the loss (each step gets it: ``step(closure)``, ``step(loss)``).
The departures from torch's habits are pinned in ``test_torch_contract.py`` and listed in
``docs/framework-contracts.md`` ("PyTorch").

Each model holds a tensor of 65,536 entries, so that the CPU step's one-tensor-at-a-time
update (``alig_torch._functional._SMALL_TENSOR``) runs under every invariant too.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import expecttest  # noqa: F401  (torch's harness needs it: an ImportError here says so)
import pytest
import torch
from torch.optim.lr_scheduler import (
    ExponentialLR,
    LinearLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
    optims,
)
from torch.testing._internal.common_utils import TestCase

from alig_torch import AliG
from alig_torch._functional import _SMALL_TENSOR

close = torch.testing.assert_close

LARGE = (256, 256)
"""A weight of 65,536 entries (``_SMALL_TENSOR``): the CPU step updates it on its own."""


def alig_inputs(device: Any, dtype: Any = None) -> list[OptimizerInput]:
    """AliG's configurations, as torch's harness lists an optimizer's (params are the test's)."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default: no cap"),
        OptimizerInput(params=None, kwargs={"lr": 0.05}, desc="cap given as lr"),
        OptimizerInput(params=None, kwargs={"max_lr": torch.tensor(0.05)}, desc="tensor cap"),
        OptimizerInput(params=None, kwargs={"max_lr": 0.05, "momentum": 0.9}, desc="momentum"),
        OptimizerInput(
            params=None,
            kwargs={"max_lr": 0.05, "momentum": 0.9, "adjusted_momentum": True},
            desc="adjusted momentum",
        ),
        OptimizerInput(
            params=None, kwargs={"max_lr": 0.05, "momentum": 0.5, "max_norm": 30.0}, desc="ball"
        ),
        OptimizerInput(
            params=None, kwargs={"max_lr": 0.1, "eps": 0.0, "f_star": -0.5}, desc="f_star, eps"
        ),
    ]


def alig_error_inputs(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    """torch's errors of every optimizer, then AliG's own (a ``ValueError`` naming the fix)."""
    own = [
        (dict(lr=0.01, momentum=-0.5), "Invalid momentum: got -0.5"),
        (dict(lr=0.01, weight_decay=1e-4), "weight_decay=0.0001.*pass max_norm=r"),
        (dict(lr=0.01, momentum=0.9, nesterov=True), "nesterov=True.*adjusted_momentum"),
        (dict(lr=0.01, max_lr=0.02), "both max_lr=0.02 .* and lr=0.01"),
        (dict(lr=-0.01), "Invalid max_lr: got -0.01"),
    ]
    step_errors = [(dict(lr=0.01), "got no loss")]
    return (
        get_error_inputs_for_all_optims(device, dtype)
        + [
            ErrorOptimizerInput(
                OptimizerInput(params=None, kwargs=kwargs, desc=regex),
                error_type=ValueError,
                error_regex=regex,
            )
            for kwargs, regex in own
        ]
        + [
            ErrorOptimizerInput(
                OptimizerInput(params=None, kwargs=kwargs, desc=regex),
                error_on=OptimizerErrorEnum.STEP_ERROR,
                error_type=ValueError,
                error_regex=regex,
            )
            for kwargs, regex in step_errors
        ]
    )


ALIG_INFO = OptimizerInfo(
    AliG,
    optim_inputs_func=alig_inputs,
    optim_error_inputs_func=alig_error_inputs,
    scheduler_inputs=(
        [lambda opt: StepLR(opt, gamma=0.9, step_size=2)],
        [lambda opt: LinearLR(opt, start_factor=0.5, total_iters=4)],
        [
            lambda opt: ExponentialLR(opt, gamma=0.9),
            lambda opt: ReduceLROnPlateau(opt, factor=0.5, patience=0),
        ],
        [lambda opt: OneCycleLR(opt, max_lr=0.05, total_steps=20)],
    ),
    supported_impls=("foreach",),  # no fused kernel; the step is not differentiable
    supports_complex=False,  # ALI-G steps real parameters (view_as_real for complex ones)
    supports_sparse=False,
    step_requires_closure=False,  # a closure, or the loss itself
)
"""AliG as torch's generic optimizer tests see it."""


class Problem:
    """A least-squares model with a 65,536-entry weight, a small one and a bias."""

    def __init__(self, device: Any, dtype: torch.dtype, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)

        def leaf(*shape: int, scale: float = 0.1) -> torch.nn.Parameter:
            value = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
            return torch.nn.Parameter(value.to(device=device, dtype=dtype))

        self.large = leaf(*LARGE, scale=0.01)
        self.small = leaf(LARGE[1], 3)
        self.bias = leaf(3)
        self.x = torch.randn(8, LARGE[0], generator=generator).to(device=device, dtype=dtype)
        self.y = torch.randn(8, 3, generator=generator).to(device=device, dtype=dtype)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.large, self.small, self.bias]

    def loss(self) -> torch.Tensor:
        prediction = torch.tanh(self.x @ self.large) @ self.small + self.bias
        return torch.nn.functional.mse_loss(prediction.float(), self.y.float())

    def closure(self, opt: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = self.loss()
            loss.backward()
            return loss

        return closure

    def train(self, opt: torch.optim.Optimizer, steps: int, schedulers: tuple = ()) -> list[float]:
        losses = []
        for _ in range(steps):
            losses.append(float(opt.step(self.closure(opt)).detach()))
            for scheduler in schedulers:
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(losses[-1])
                else:
                    scheduler.step()
        return losses


def _with_cap(kwargs: dict[str, Any]) -> dict[str, Any]:
    """An input with a finite cap (schedulers need one: a schedule of no cap is refused)."""
    return kwargs if "lr" in kwargs or "max_lr" in kwargs else {**kwargs, "max_lr": 0.05}


class TestAliGGenericInvariants(TestCase):
    """What torch.optim's own generic tests ask of every optimizer, asked of AliG."""

    @optims([ALIG_INFO], dtypes=[torch.float32, torch.float64])
    def test_every_input_goes_downhill(self, device, dtype, optim_info) -> None:
        for optim_input in optim_info.optim_inputs_func(device, dtype):
            problem = Problem(device, dtype)
            opt = optim_info.optim_cls(problem.params, **optim_input.kwargs)
            losses = problem.train(opt, 8)
            assert losses[-1] < losses[0], optim_input.desc
            assert all(p.dtype == dtype for p in problem.params)

    @optims([ALIG_INFO], dtypes=[torch.float32])
    def test_every_input_goes_downhill_under_each_scheduler(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device, dtype):
            for make_schedulers in optim_info.scheduler_inputs:
                problem = Problem(device, dtype)
                opt = optim_info.optim_cls(problem.params, **_with_cap(optim_input.kwargs))
                schedulers = tuple(make(opt) for make in make_schedulers)
                losses = problem.train(opt, 8, schedulers)
                assert losses[-1] < losses[0], optim_input.desc

    @optims([ALIG_INFO], dtypes=[torch.float32, torch.float64])
    def test_foreach_matches_the_for_loop(self, device, dtype, optim_info) -> None:
        for optim_input in optim_info.optim_inputs_func(device, dtype):
            runs = []
            for foreach in (False, True):
                problem = Problem(device, dtype)
                opt = optim_info.optim_cls(problem.params, foreach=foreach, **optim_input.kwargs)
                problem.train(opt, 5)
                runs.append(
                    [p.detach().clone() for p in problem.params]
                    + [s["momentum_buffer"] for s in opt.state.values() if s]
                )
            tolerance = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {}
            close(runs[0], runs[1], msg=optim_input.desc, **tolerance)

    @optims([ALIG_INFO], dtypes=[torch.float32])
    def test_state_dict_round_trip_resumes_the_same_steps(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device, dtype):
            problem = Problem(device, dtype)
            opt = optim_info.optim_cls(problem.params, **optim_input.kwargs)
            problem.train(opt, 3)
            saved = opt.state_dict()
            close(saved, opt.state_dict(), atol=0, rtol=0)  # deterministic
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            buffer.seek(0)
            resumed_problem = Problem(device, dtype)
            with torch.no_grad():
                for mine, theirs in zip(resumed_problem.params, problem.params, strict=True):
                    mine.copy_(theirs)
            resumed = optim_info.optim_cls(resumed_problem.params, **optim_input.kwargs)
            resumed.load_state_dict(torch.load(buffer, weights_only=True))
            for state in resumed.state.values():  # a copy, never the saved tensors
                for value in state.values():
                    assert not any(value is s for st in opt.state.values() for s in st.values())
            problem.train(opt, 3)
            resumed_problem.train(resumed, 3)
            close(problem.params, resumed_problem.params, atol=0, rtol=0)

    @optims([ALIG_INFO])
    def test_state_dict_and_load_hooks_run(self, device, dtype, optim_info) -> None:
        problem = Problem(device, dtype)
        opt = optim_info.optim_cls(problem.params, max_lr=0.05, momentum=0.9)
        problem.train(opt, 2)
        calls: list[str] = []
        opt.register_state_dict_pre_hook(lambda o: calls.append("save pre"))
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "kept"})
        saved = opt.state_dict()
        assert saved["note"] == "kept"
        target = optim_info.optim_cls(Problem(device, dtype).params, max_lr=0.05, momentum=0.9)
        target.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
        target.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
        target.load_state_dict(saved)
        assert calls == ["save pre", "load pre", "load post"]

    @optims([ALIG_INFO])
    def test_step_hooks_see_every_step(self, device, dtype, optim_info) -> None:
        problem = Problem(device, dtype)
        opt = optim_info.optim_cls(problem.params, max_lr=0.05)
        seen: list[Any] = []
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", args, kwargs)))
        opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post",)))
        loss = problem.loss()
        opt.zero_grad()
        loss.backward()
        opt.step(loss)  # the loss positionally: hooks see it as the step's argument
        opt.step(loss=loss.detach())
        assert [s[0] for s in seen] == ["pre", "post", "pre", "post"]
        assert seen[0][1][-1] is loss  # args: (the optimizer, the loss)
        assert "loss" in seen[2][2]

    @optims([ALIG_INFO])
    def test_a_param_group_added_later_is_stepped(self, device, dtype, optim_info) -> None:
        problem = Problem(device, dtype)
        opt = optim_info.optim_cls([problem.large, problem.small], max_lr=0.05)
        problem.train(opt, 2)
        before = problem.bias.detach().clone()
        opt.add_param_group({"params": [problem.bias], "lr": 0.01, "momentum": 0.5})
        assert opt.param_groups[1]["adjusted_momentum"] is False  # the defaults
        problem.train(opt, 2)
        assert not torch.equal(problem.bias, before)
        assert "momentum_buffer" in opt.state[problem.bias]
        assert int(opt.param_groups[1]["steps_taken"]) == 2

    @optims([ALIG_INFO])
    def test_zero_grad_sets_to_none_or_zeroes(self, device, dtype, optim_info) -> None:
        problem = Problem(device, dtype)
        opt = optim_info.optim_cls(problem.params, max_lr=0.05)
        for set_to_none in (True, False):
            problem.loss().backward()
            opt.zero_grad(set_to_none=set_to_none)
            for p in problem.params:
                if set_to_none:
                    assert p.grad is None
                else:
                    close(p.grad, torch.zeros_like(p), atol=0, rtol=0)

    @optims([ALIG_INFO])
    def test_no_gradient_and_zero_gradients_change_nothing(self, device, dtype, optim_info):
        problem = Problem(device, dtype)
        opt = optim_info.optim_cls(problem.params, max_lr=0.05, momentum=0.9)
        before = [p.detach().clone() for p in problem.params]
        opt.step(loss=1.0)  # no parameter has a gradient
        for p in problem.params:
            p.grad = torch.zeros_like(p)
        opt.step(loss=1.0)
        close(problem.params, before, atol=0, rtol=0)

    @optims([ALIG_INFO])
    def test_deepcopy_and_pickle_keep_every_public_attribute(self, device, dtype, optim_info):
        problem = Problem(device, dtype)
        opt = optim_info.optim_cls(problem.params, max_lr=0.05, momentum=0.9, max_norm=30.0)
        problem.train(opt, 2)
        public = {k: v for k, v in vars(opt).items() if not k.startswith("_")}
        for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
            copied_public = {k: v for k, v in vars(copied).items() if not k.startswith("_")}
            assert sorted(public) == sorted(copied_public)
            close(copied.defaults, opt.defaults, atol=0, rtol=0)
            close(copied.state_dict(), opt.state_dict(), atol=0, rtol=0)

    @optims([ALIG_INFO], dtypes=[torch.float32, torch.float64, torch.bfloat16])
    def test_parameters_keep_their_dtype(self, device, dtype, optim_info) -> None:
        problem = Problem(device, dtype)
        opt = optim_info.optim_cls(problem.params, max_lr=0.05, momentum=0.9)
        problem.train(opt, 2)
        assert all(p.dtype == dtype for p in problem.params)
        buffers = [s["momentum_buffer"] for s in opt.state.values()]
        assert all(b.dtype == dtype for b in buffers)

    @optims([ALIG_INFO])
    def test_mixed_dtypes_in_one_optimizer(self, device, dtype, optim_info) -> None:
        mixed = Problem(device, torch.float64)
        mixed.bias.data = mixed.bias.data.float()
        opt = optim_info.optim_cls(mixed.params, max_lr=0.05)
        losses = mixed.train(opt, 4)
        assert mixed.bias.dtype == torch.float32
        assert losses[-1] < losses[0]

    @optims([ALIG_INFO], dtypes=[torch.float64])
    def test_a_tensor_lr_steps_as_the_float(self, device, dtype, optim_info) -> None:
        runs = []
        as_float64 = {"dtype": torch.float64}  # torch.tensor(0.05) would be float32: another cap
        for cap in (0.05, torch.tensor(0.05, **as_float64), torch.tensor([0.05], **as_float64)):
            problem = Problem(device, dtype)
            opt = optim_info.optim_cls(problem.params, lr=cap, momentum=0.9)
            scheduler = StepLR(opt, step_size=1, gamma=0.5)  # fills a tensor lr in place
            problem.train(opt, 4, (scheduler,))
            runs.append([p.detach().clone() for p in problem.params])
        close(runs[0], runs[1], atol=0, rtol=0)
        close(runs[0], runs[2], atol=0, rtol=0)

    @optims([ALIG_INFO])
    def test_named_parameters_are_kept_in_the_state_dict(self, device, dtype, optim_info):
        problem = Problem(device, dtype)
        named = list(zip(("large", "small", "bias"), problem.params, strict=True))
        opt = optim_info.optim_cls(named, max_lr=0.05)
        problem.train(opt, 1)
        assert opt.state_dict()["param_groups"][0]["param_names"] == [n for n, _ in named]

    @optims([ALIG_INFO])
    def test_can_be_printed(self, device, dtype, optim_info) -> None:
        opt = optim_info.optim_cls(Problem(device, dtype).params, lr=0.05)
        text = repr(opt)
        assert text.startswith("AliG ("), text
        assert "lr: 0.05" in text

    @optims([ALIG_INFO])
    def test_errors_are_the_ones_listed(self, device, dtype, optim_info) -> None:
        a = torch.nn.Parameter(torch.randn(2, 2, device=device, dtype=dtype))
        for error_input in optim_info.optim_error_inputs_func(device, dtype):
            optim_input = error_input.optimizer_error_input
            params = [a] if optim_input.params is None else optim_input.params

            def build(params=params, optim_input=optim_input):
                return optim_info.optim_cls(params, **optim_input.kwargs)

            if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
                opt = build()
                a.grad = torch.ones_like(a)
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    opt.step()
            elif issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    build()
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    build()

    def test_the_problem_reaches_the_one_tensor_at_a_time_update(self) -> None:
        assert LARGE[0] * LARGE[1] >= _SMALL_TENSOR


instantiate_device_type_tests(TestAliGGenericInvariants, globals(), only_for=("cpu", "cuda"))
