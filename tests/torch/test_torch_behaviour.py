"""alig_torch.AliG as a torch.optim citizen: loss plumbing, state, schedulers, errors."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from alig_cases import CASES
from alig_torch import AliG, project_onto_ball
from torch_training import cross_entropy_closure


def _model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def _data(seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=generator, dtype=dtype), torch.randint(
        0, 3, (32,), generator=generator
    )


# ---------------------------------------------------------------- how the loss arrives


def test_closure_and_loss_keyword_give_the_same_step() -> None:
    x, y = _data()
    results = []
    for use_closure in (True, False):
        model = _model()
        opt = AliG(model.parameters(), max_lr=0.5, momentum=0.9)
        for _ in range(5):
            closure = cross_entropy_closure(model, opt, x, y)
            if use_closure:
                returned = opt.step(closure)
            else:
                loss = closure()
                returned = opt.step(loss=loss)
            assert isinstance(returned, torch.Tensor)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_closure_is_called_with_grad_enabled() -> None:
    model = _model()
    opt = AliG(model.parameters(), max_lr=0.1)
    x, y = _data()
    seen = []

    def closure() -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return cross_entropy_closure(model, opt, x, y)()

    with torch.no_grad():
        opt.step(closure)
    assert seen == [True]


def test_missing_loss_shows_both_ways() -> None:
    opt = AliG(_model().parameters(), max_lr=0.1)
    with pytest.raises(ValueError, match="got no loss") as info:
        opt.step()
    assert "step(closure)" in str(info.value)
    assert "step(loss=loss)" in str(info.value)


def test_closure_and_loss_together_is_an_error() -> None:
    opt = AliG(_model().parameters(), max_lr=0.1)
    with pytest.raises(ValueError, match="both a closure and loss="):
        opt.step(lambda: 1.0, loss=1.0)


@pytest.mark.parametrize(
    ("bad_loss", "message"),
    [
        (torch.ones(4), "scalar"),
        ("0.5", "float or a 0-d tensor"),
        (torch.tensor(1.0 + 1.0j), "real-valued"),
        (True, "float or a 0-d tensor"),
    ],
)
def test_bad_loss_is_a_clear_error(bad_loss: object, message: str) -> None:
    model = _model()
    opt = AliG(model.parameters(), max_lr=0.1)
    x, y = _data()
    cross_entropy_closure(model, opt, x, y)()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        opt.step(loss=bad_loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------- skipped steps


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "nan_grad", "inf_grad"])
@pytest.mark.parametrize("adjusted", [False, True])
def test_skipped_step_leaves_params_buffers_and_records_untouched(
    bad: str, foreach: bool, adjusted: bool
) -> None:
    def make_opt(model: torch.nn.Module) -> AliG:
        return AliG(
            model.parameters(),
            max_lr=0.5,
            momentum=0.9,
            adjusted_momentum=adjusted,
            max_norm=3.0,
            foreach=foreach,
        )

    model = _model()
    opt = make_opt(model)
    x, y = _data()
    for _ in range(3):
        opt.step(cross_entropy_closure(model, opt, x, y))
    snapshot = copy.deepcopy(opt.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]

    loss = cross_entropy_closure(model, opt, x, y)()
    first = next(iter(model.parameters()))
    if bad == "nan_loss":
        loss = torch.tensor(math.nan)
    elif bad == "inf_loss":
        loss = torch.tensor(math.inf)
    elif bad == "nan_grad":
        first.grad[0, 0] = math.nan
    else:
        first.grad[0, 0] = -math.inf
    opt.step(loss=loss)

    for a, b in zip(params_before, model.parameters(), strict=True):
        assert a.numpy().tobytes() == b.detach().numpy().tobytes()
    after = opt.state_dict()
    for key, value in snapshot["state"].items():
        assert torch.equal(value["momentum_buffer"], after["state"][key]["momentum_buffer"])
    for name in ("gamma", "gamma_hat", "capped", "steps_taken"):
        assert torch.equal(snapshot["param_groups"][0][name], after["param_groups"][0][name])
    assert int(opt.steps_skipped) == 1

    # The next normal step trains as if the bad one never happened.
    reference = _model()
    reference_opt = make_opt(reference)
    reference.load_state_dict(model.state_dict())
    reference_opt.load_state_dict(snapshot)
    opt.step(cross_entropy_closure(model, opt, x, y))
    reference_opt.step(cross_entropy_closure(reference, reference_opt, x, y))
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_zero_and_missing_gradients_are_no_ops() -> None:
    model = _model()
    opt = AliG(model.parameters(), max_lr=0.1, momentum=0.9, eps=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(loss=1.0)  # S + eps == 0: gamma = 0, buffers stay zero
    assert float(opt.gamma) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt.zero_grad(set_to_none=True)
    opt.step(loss=1.0)  # no gradient at all: nothing to update
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------- param groups, schedulers


def test_param_groups_share_one_global_norm_and_keep_their_own_cap() -> None:
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = AliG([{"params": [a], "max_lr": 0.01}, {"params": [b]}], max_lr=10.0, eps=0.0)
    a.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step(loss=1.0)  # S = 2 over both groups: gamma_hat = 0.5
    assert float(opt.param_groups[0]["gamma_hat"]) == 0.5
    assert float(opt.param_groups[0]["gamma"]) == 0.01
    assert float(opt.param_groups[1]["gamma"]) == 0.5
    assert torch.allclose(a, torch.tensor([0.99, 2.0], dtype=torch.float64))
    assert torch.allclose(b, torch.tensor([2.5], dtype=torch.float64))


def test_add_param_group_after_construction() -> None:
    a = torch.nn.Parameter(torch.ones(2))
    opt = AliG([a], max_lr=0.1, momentum=0.5)
    b = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [b], "max_lr": 0.2, "momentum": 0.0})
    assert opt.param_groups[1]["lr"] == 0.2
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step(loss=100.0)
    assert float(opt.param_groups[1]["gamma"]) == pytest.approx(0.2)
    assert "momentum_buffer" not in opt.state[b]
    with pytest.raises(ValueError, match="Invalid momentum"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "momentum": 1.0})


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
    ],
    ids=["StepLR", "LinearLR", "OneCycleLR", "ReduceLROnPlateau"],
)
def test_lr_schedulers_drive_the_cap(make_scheduler) -> None:
    model = _model()
    opt = AliG(model.parameters(), max_lr=0.05, momentum=0.9)
    scheduler = make_scheduler(opt)
    x, y = _data()
    for _ in range(6):
        loss = opt.step(cross_entropy_closure(model, opt, x, y))
        cap = opt.param_groups[0]["lr"]
        assert float(opt.gamma) <= cap + 1e-15  # the cap in force for that step
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)  # a metric that never improves: the cap halves
        else:
            scheduler.step()
    assert opt.param_groups[0]["lr"] != 0.05
    assert math.isfinite(float(loss.detach()))


def test_max_lr_none_means_no_cap_stored_as_inf() -> None:
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = AliG([p], eps=0.0)
    assert opt.param_groups[0]["lr"] == math.inf
    p.grad = torch.tensor([1e-3], dtype=torch.float64)
    opt.step(loss=1.0)
    assert float(opt.gamma) == pytest.approx(1e6)
    assert not bool(opt.capped)


# ---------------------------------------------------------------- state


def _train(model, opt, steps, x, y) -> None:
    for _ in range(steps):
        opt.step(cross_entropy_closure(model, opt, x, y))


@pytest.mark.parametrize("case", [c for c in CASES if c.kwargs.get("momentum")], ids=str)
def test_state_dict_round_trip_resumes_bitwise(case, tmp_path) -> None:
    x, y = _data()
    kwargs = {k: v for k, v in case.kwargs.items()}
    model = _model()
    opt = AliG(model.parameters(), **kwargs)
    _train(model, opt, 10, x, y)

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    resumed = _model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = AliG(resumed.parameters(), **kwargs)
    resumed_opt.load_state_dict(checkpoint["opt"])

    _train(model, opt, 10, x, y)
    _train(resumed, resumed_opt, 10, x, y)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()
    assert torch.equal(opt.steps_taken, resumed_opt.steps_taken)


def test_checkpoint_of_the_other_momentum_convention_is_refused() -> None:
    model = _model()
    opt = AliG(model.parameters(), max_lr=0.1, momentum=0.9, adjusted_momentum=True)
    x, y = _data()
    _train(model, opt, 2, x, y)
    other = AliG(_model().parameters(), max_lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="adjusted_momentum=True to resume"):
        other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["adjusted_momentum"] is False


def test_deepcopy_and_repr() -> None:
    model = _model()
    opt = AliG(model.parameters(), max_lr=0.1, momentum=0.9, max_norm=10.0)
    x, y = _data()
    _train(model, opt, 2, x, y)
    clone = copy.deepcopy(opt)
    assert clone.max_norm == 10.0
    assert torch.equal(clone.gamma, opt.gamma)
    text = repr(opt)
    assert text.startswith("AliG (")
    assert "momentum: 0.9" in text
    assert "max_norm: 10.0" in text


def test_old_state_dict_without_new_keys_still_loads() -> None:
    """A checkpoint without the ``momentum_convention`` marker or ``foreach`` (filled in by
    ``__setstate__``) loads and resumes bit for bit; one without a key that says what its
    state means (``adjusted_momentum``, ``eps``, ``f_star``) is refused."""
    x, y = _data()
    model = _model()
    opt = AliG(model.parameters(), max_lr=0.1, momentum=0.9)
    _train(model, opt, 3, x, y)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["momentum_convention"], group["foreach"]
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": state}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = _model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = AliG(resumed.parameters(), max_lr=0.1, momentum=0.9)
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert resumed_opt.param_groups[0]["foreach"] is None
    _train(model, opt, 3, x, y)
    _train(resumed, resumed_opt, 3, x, y)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()

    for key, message in (
        ("adjusted_momentum", "has no 'adjusted_momentum': its momentum convention cannot be"),
        ("eps", r"is not an AliG one: it lacks \['eps'\]"),
        ("f_star", r"is not an AliG one: it lacks \['f_star'\]"),
    ):
        stripped = copy.deepcopy(checkpoint["opt"])
        del stripped["param_groups"][0][key]
        other = AliG(_model().parameters(), max_lr=0.1, momentum=0.9)
        with pytest.raises(ValueError, match=message):
            other.load_state_dict(stripped)
        assert len(other.state) == 0


# ---------------------------------------------------------------- dtypes and errors


def test_bf16_parameters_accumulate_the_norm_in_float32() -> None:
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    opt = AliG([p], max_lr=10.0, eps=0.0)
    p.grad = torch.full((4096,), 0.01, dtype=torch.bfloat16)
    opt.step(loss=1.0)
    expected_sq_norm = 4096 * float(torch.tensor(0.01, dtype=torch.bfloat16)) ** 2
    assert opt.gamma.dtype == torch.float32
    assert float(opt.gamma) == pytest.approx(1.0 / expected_sq_norm, rel=1e-5)
    assert p.dtype == torch.bfloat16


def test_autocast_training_runs() -> None:
    model = _model(dtype=torch.float32)
    opt = AliG(model.parameters(), max_lr=0.5, momentum=0.9)
    x, y = _data(dtype=torch.float32)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_grad_scaler_with_unscaled_loss_equals_plain_training() -> None:
    x, y = _data(dtype=torch.float32)
    results = []
    for use_scaler in (False, True):
        model = _model(dtype=torch.float32)
        opt = AliG(model.parameters(), max_lr=0.5, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt, loss=loss)
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_grad_scaler_without_loss_raises() -> None:
    model = _model(dtype=torch.float32)
    opt = AliG(model.parameters(), max_lr=0.5)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _data(dtype=torch.float32)
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match="got no loss"):
        scaler.step(opt)


def test_sparse_gradients_are_a_clear_error() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = AliG(embedding.parameters(), max_lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step(loss=1.0)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_complex_and_integer_parameters_are_a_clear_error(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="real floating-point parameters"):
        AliG([torch.zeros(2, dtype=dtype)], max_lr=0.1)


def test_invalid_hyperparameters_raise_the_core_errors() -> None:
    with pytest.raises(ValueError, match="Invalid max_lr"):
        AliG(_model().parameters(), max_lr=-1.0)
    with pytest.raises(ValueError, match="Invalid eps"):
        AliG(_model().parameters(), eps=math.nan)
    with pytest.raises(ValueError, match="Invalid max_norm"):
        AliG(_model().parameters(), max_norm=0.0)


def test_empty_parameter_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        AliG([], max_lr=0.1)


# ---------------------------------------------------------------- projection


def test_projection_helper_and_step_keep_params_in_the_ball() -> None:
    model = _model()
    project_onto_ball(model.parameters(), 1.0)
    norm = math.sqrt(sum(float(p.detach().square().sum()) for p in model.parameters()))
    assert norm == pytest.approx(1.0)
    opt = AliG(model.parameters(), max_lr=1.0, momentum=0.9, max_norm=1.0)
    x, y = _data()
    for _ in range(5):
        opt.step(cross_entropy_closure(model, opt, x, y))
        norm = math.sqrt(sum(float(p.detach().square().sum()) for p in model.parameters()))
        assert norm <= 1.0 + 1e-12


def test_construction_never_changes_parameters() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    AliG(model.parameters(), max_lr=0.1, max_norm=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert np.isfinite(before[0].numpy()).all()


@pytest.mark.parametrize("path", ["single_tensor", "foreach", "compiled"])
def test_the_norm_of_a_large_float32_gradient_is_accurate(path: str) -> None:
    """float32 gradients of ResNet-18 size: the squared norm within SPEC's float32 1e-5
    (compiled, ``_foreach_norm`` was 7e-5 off: the compiled step sums tensor by tensor)."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((512, 512, 3, 3), (1000, 512))]
    exact = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)
    params = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.from_numpy(g)
    opt = AliG(params, max_lr=None, eps=0.0, foreach=path != "single_tensor")
    if path == "compiled":
        torch.compile(opt.step.__wrapped__, fullgraph=True)(opt, loss=torch.tensor(1.0))
    else:
        opt.step(loss=1.0)
    assert abs(float(opt.gamma) * exact - 1.0) <= 1e-5  # gamma = loss / S with eps = 0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("adjusted", [False, True])
def test_the_branch_free_accelerator_path_equals_the_reference(momentum, adjusted) -> None:
    """The foreach path used on accelerators (no host sync: a skipped step is undone by
    zeroed gradients and identity coefficients) runs on CPU tensors too: it must equal the
    single-tensor reference on a taken step and change nothing on a skipped one."""
    from alig_core import step_size
    from alig_torch._functional import GroupTensors
    from alig_torch._functional import _foreach_update as _device_multi_tensor_alig
    from alig_torch._functional import _single_tensor_update as _single_tensor_alig

    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), ()]
    params = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    buffers = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    for loss, bad_grad in ((0.7, False), (0.7, True), (math.nan, False)):
        grads = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
        if bad_grad:
            grads[0][1, 2] = math.inf
        sq_norm = sum(g.square().sum() for g in grads)
        size = step_size(
            torch, torch.tensor(loss, dtype=torch.float64), sq_norm, max_lr=0.1, eps=1e-5,
            f_star=0.0,
        )  # fmt: skip
        ours = ([p.clone() for p in params], [b.clone() for b in buffers])
        reference = ([p.clone() for p in params], [b.clone() for b in buffers])
        kwargs = {"momentum": momentum, "adjusted": adjusted}
        _device_multi_tensor_alig(
            GroupTensors(ours[0], grads, ours[1] if momentum else []), size, **kwargs
        )
        _single_tensor_alig(
            GroupTensors(reference[0], grads, reference[1] if momentum else []), size, **kwargs
        )
        for a, b in zip(ours[0] + ours[1], reference[0] + reference[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
        if bool(size.skipped):
            for a, b in zip(ours[0] + ours[1], params + buffers, strict=True):
                assert a.numpy().tobytes() == b.numpy().tobytes()
        else:
            assert any(not torch.equal(a, b) for a, b in zip(ours[0], params, strict=True))
