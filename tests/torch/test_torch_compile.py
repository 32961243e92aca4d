"""torch.compile(fullgraph=True) traces an ALI-G step: no graph break, no recompilation."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from alig_cases import CASES, Case, initial_params, make_sequence, max_relative_deviation
from alig_torch import AliG

COMPILED_CASES = [c for c in CASES if c.name in ("standard_projected", "adjusted_momentum")]


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: c.name)
def test_compiled_step_equals_eager_without_recompiling(case: Case, foreach: bool) -> None:
    """One eager step creates the state; then every step runs the same compiled graph.

    The loss enters the compiled step as a 1-element tensor: dynamo (torch 2.13) turns a
    0-d CPU float tensor *argument* into a Python scalar, rounded through float32 and
    guarded against NaN (see AliG's docstring). A loss computed inside the same compiled
    region, the usual case, is a graph value and is not affected.
    """
    torch._dynamo.reset()
    sequence = make_sequence(10)
    runs = {}
    counters = torch._dynamo.utils.counters
    for mode in ("eager", "compiled"):
        params = [torch.nn.Parameter(torch.tensor(p)) for p in initial_params()]
        opt = AliG(params, **case.kwargs, foreach=foreach)
        step_fn = opt.step.__wrapped__  # the undecorated body, as PyTorch's own tests do
        for t, step in enumerate(sequence):
            if mode == "compiled" and t == 1:
                counters.clear()
                step_fn = torch.compile(step_fn, fullgraph=True, backend="inductor")
            for p, g in zip(params, step.grads, strict=True):
                p.grad = torch.zeros_like(p) if g is None else torch.tensor(g)
            step_fn(opt, loss=torch.tensor([step.loss], dtype=torch.float64))
            if mode == "compiled" and t == 4:  # three compiled steps, none of them skipped
                assert counters["stats"]["unique_graphs"] == 1, "compiled more than once"
        runs[mode] = [p.detach().numpy().copy() for p in params]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # skipped steps reuse the same graph
    assert max_relative_deviation(runs["compiled"], runs["eager"]) <= 1e-12
