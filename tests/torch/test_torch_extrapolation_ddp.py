"""Extrapolation under DDP (2 gloo processes) against its one-process equivalents.

- ``anchor_gradient="all_reduced"``: the anchor pass is an ordinary DDP backward; two ranks
  on half batches equal the wrapper in one process on the whole batch.
- ``anchor_gradient="local"``: the anchor pass runs under ``no_sync``; each rank
  extrapolates along its own gradient. The one-process equivalent is written out here by
  hand: per half batch, its own ``w~_r``; the base steps from the anchor with the mean of
  the ``g_r(w~_r)`` (ALI-G: with the mean of ``l_r(w~_r) + <g, w - w~_r>``).

In both, rank 1 alone hands over a NaN loss once at the anchor and once at the update:
both ranks skip those iterations (no hang, no divergence).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from alig_cases import max_relative_deviation
from torch_training import share
from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("extrapolation_ddp_worker.py")
TOL = 1e-10
pytestmark = pytest.mark.slow  # the worker runs every configuration on two processes


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("extrapolation_ddp")
    run_script(WORKER, out, timeout=240)
    return torch.load(out / "extrapolation_ddp.pt", weights_only=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_relative_deviation([a], [b])


def local_reference(name: str) -> dict[str, Any]:
    """Two ranks' local extrapolation, simulated in one process (the documented semantics)."""
    from alig_torch import project_onto_ball

    worker = import_script(WORKER)
    config = worker.CONFIGS[name]
    model = worker.make_model()
    project_onto_ball(model.parameters(), 2.0)
    params = list(model.parameters())
    base = worker.make_base(config["base"], params)
    evaluator = worker.make_model()
    x, y = worker.make_data()

    def loss_grad(point: list[torch.Tensor], t: int, r: int) -> tuple[float, list[torch.Tensor]]:
        with torch.no_grad():
            for q, value in zip(evaluator.parameters(), point, strict=True):
                q.copy_(value)
        evaluator.zero_grad()
        xs, ys = share(x, y, t, r, 2)
        loss = torch.nn.functional.cross_entropy(evaluator(xs), ys)
        loss.backward()
        return float(loss.detach()), [q.grad.clone() for q in evaluator.parameters()]

    def anchor() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    def base_step(grads: list[torch.Tensor], loss: float | None) -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if loss is None:
            base.step()
        else:
            base.step(loss=loss)

    def mean(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(u + v) / 2 for u, v in zip(a, b, strict=True)]

    points: list[list[torch.Tensor]] = [[], []]
    anchors, skipped, pending = [], 0, None
    for t in range(worker.CALLS):
        w = anchor()
        if config["form"] == "same_batch" or pending is None:  # the anchor pass
            evals = [loss_grad(w, t, r) for r in (0, 1)]
            if (t, "anchor") in worker.NAN_AT:
                skipped += 1
                anchors.append(worker.flat(w))
                continue
            lr = worker.SGD_KWARGS["lr"]
            tildes = []
            for loss, grads in evals:
                if config["base"] == "alig":  # ALI-G's local step size at the anchor
                    sq = sum(float(g.square().sum()) for g in grads)
                    lr = min(max(loss / (sq + 1e-5), 0.0), worker.ALIG_KWARGS["max_lr"])
                tildes.append([p - lr * g for p, g in zip(w, grads, strict=True)])
            pending = tildes
            if config["form"] == "alternating":
                anchors.append(worker.flat(w))
                continue
        tildes, pending = pending, None
        evals = [loss_grad(tildes[r], t, r) for r in (0, 1)]
        for r in (0, 1):
            points[r].append(worker.flat(tildes[r]))
        if (t, "update") in worker.NAN_AT:
            skipped += 1
            anchors.append(worker.flat(w))
            continue
        g = mean(evals[0][1], evals[1][1])
        loss = None
        if config["base"] == "alig":
            corrected = [
                evals[r][0]
                + sum(float((gi * (wi - ti)).sum()) for gi, wi, ti in zip(g, w, tilde, strict=True))
                for r, tilde in enumerate(tildes)
            ]
            loss = (corrected[0] + corrected[1]) / 2
        base_step(g, loss)
        anchors.append(worker.flat(anchor()))
    return {
        "params": worker.flat(params),
        "anchors": anchors,
        "points": points,
        "skipped": skipped,
    }


def check_ranks_follow(
    ranks: list[dict[str, Any]], anchors: list[torch.Tensor], points: list[list[torch.Tensor]]
) -> None:
    """The anchor is the same on both ranks after every call, and so are the counters; the
    anchors follow ``anchors``, and rank r's extrapolated points follow ``points[r]``."""
    for a, b in zip(ranks[0]["anchors"], ranks[1]["anchors"], strict=True):
        assert torch.equal(a, b)
    assert ranks[0]["counters"] == ranks[1]["counters"]
    assert ranks[0]["counters"][1] == 2  # both NaN events skipped, on both ranks
    for ours, theirs in zip(ranks[0]["anchors"], anchors, strict=True):
        assert relative(ours, theirs) <= TOL
    for r in (0, 1):
        assert len(ranks[r]["points"]) == len(points[r])
        for ours, theirs in zip(ranks[r]["points"], points[r], strict=True):
            assert relative(ours, theirs) <= TOL


@pytest.mark.parametrize("name", ["alig-all_reduced", "sgd-all_reduced"])
def test_the_all_reduced_anchor_gradient_equals_one_process_on_the_whole_batch(
    ddp: dict[str, Any], name: str
) -> None:
    worker = import_script(WORKER)
    single = worker.train(worker.make_model(), rank=0, world=1, name=name)
    # every rank extrapolated to the same point, the one-process one
    check_ranks_follow(ddp[name], single["anchors"], [single["points"], single["points"]])
    assert ddp[name][0]["counters"] == single["counters"]
    assert relative(single["params"], single["anchors"][0]) > 1e-2  # training moved


@pytest.mark.parametrize("name", ["alig-local", "sgd-local"])
def test_the_local_anchor_gradient_equals_its_one_process_simulation(
    ddp: dict[str, Any], name: str
) -> None:
    reference = local_reference(name)
    ranks = ddp[name]
    # each rank evaluated the update at its own w~_r
    check_ranks_follow(ranks, reference["anchors"], reference["points"])
    assert ranks[0]["counters"][1] == reference["skipped"]
    # the ranks' extrapolated points differ: the anchor gradient was local
    assert any(
        relative(a, b) > 1e-3 for a, b in zip(ranks[0]["points"], ranks[1]["points"], strict=True)
    )
    # and local differs from all-reduced
    all_reduced = ddp[name.replace("local", "all_reduced")][0]["params"]
    assert relative(ranks[0]["params"], all_reduced) > 1e-6


@pytest.mark.parametrize("name", ["alig-all_reduced", "alig-local", "sgd-all_reduced", "sgd-local"])
def test_one_collective_per_evaluation(ddp: dict[str, Any], name: str) -> None:
    """Each evaluation handed to the wrapper makes one collective, the update around ALI-G
    included (AliG's agreement on the linearised loss and S, not a second one of its own);
    in one process, none."""
    for rank in ddp[name]:
        assert rank["evaluations"] >= 12  # one per call, two where a closure runs twice
        assert rank["collectives"] == rank["evaluations"]
    worker = import_script(WORKER)
    assert worker.train(worker.make_model(), rank=0, world=1, name=name)["collectives"] == 0
