"""Adaptive per-image token counts: bounds, batch = batch 1, the exported graph, predicted distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spvit_search as sp
from spvit_search.export import export_onnx_adaptive, onnx_session
from spvit_search.models import create_model
from spvit_search.pruning import AdaptiveCount, UnsupportedModelError, pruning_state, set_adaptive

MODEL = "vit_demo_digits"
PLAN = sp.PruningPlan(locations=(2, 3, 5), keep=(0.5, 0.25, 0.125), model=MODEL)


def _model(scatter: float = 0.5):
    """A pruned demo model whose selectors disagree between images (trained ones do; fresh ones
    start at the plan's ratio for every token)."""
    torch.manual_seed(0)
    model = sp.prune(create_model(MODEL, num_classes=10).eval(), PLAN)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "token_selector" in name:
                p.add_(torch.randn_like(p) * scatter)
    return model


def _images(n: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, 32, 32) * torch.linspace(0.3, 3.0, n)[:, None, None, None]


def test_counts_vary_per_image_within_bounds_and_a_batch_equals_each_image_alone():
    model = set_adaptive(_model(), AdaptiveCount(scale=1.0, min_factor=0.5, max_factor=1.5))
    x = _images(12)
    with torch.no_grad():
        batched = model(x)
        counts = torch.stack(pruning_state(model).adaptive_counts, dim=1)  # (B, S)
        alone = []
        for i in range(len(x)):
            alone.append(model(x[i : i + 1]))
            assert torch.equal(torch.stack(pruning_state(model).adaptive_counts, dim=1)[0], counts[i])
            # class token + its own count + the package: no padding alone
            assert pruning_state(model).token_counts[PLAN.locations[0]] == 2 + int(counts[i, 0])
    assert (torch.cat(alone) - batched).abs().max().item() <= 1e-4
    assert len(set(counts[:, 0].tolist())) > 1  # the images kept different counts
    for s, keep in enumerate(PLAN.keep):
        lo, hi = AdaptiveCount(min_factor=0.5, max_factor=1.5).bounds(keep, 64)
        assert counts[:, s].min() >= lo and counts[:, s].max() <= hi
    # a larger scale keeps more; fixed counts come back with None
    with torch.no_grad():
        set_adaptive(model, AdaptiveCount(scale=1.3))(x)
        assert torch.stack(pruning_state(model).adaptive_counts, dim=1).sum() > counts.sum()
        set_adaptive(model, None)(x)
    assert pruning_state(model).token_counts == list(PLAN.tokens_per_block(model))


def test_every_stage_acts_even_below_the_plans_next_count():
    """An image that kept few tokens at one stage still gets the next stage's own count (the
    plan's count there may exceed what it has left), and a batch still equals each image alone."""
    model = set_adaptive(_model(), AdaptiveCount(scale=0.4, min_factor=0.1, max_factor=1.5))
    sp.set_keep(model, (0.5, 0.45, 0.4))
    x = _images(8)
    with torch.no_grad():
        batched = model(x)
        counts = torch.stack(pruning_state(model).adaptive_counts, dim=1)
        assert counts.shape == (8, 3) and bool((counts[:, 0] < 0.45 * 64).any())
        alone = torch.cat([model(x[i : i + 1]) for i in range(8)])
    assert torch.isfinite(batched).all() and (alone - batched).abs().max().item() <= 1e-4


def test_the_exported_graph_runs_each_image_at_its_own_count(tmp_path):
    model = set_adaptive(_model(), AdaptiveCount())
    path = export_onnx_adaptive(model, tmp_path / "adaptive.onnx")
    session = onnx_session(path)
    seen = set()
    for i in range(6):
        x = _images(6)[i : i + 1]
        with torch.no_grad():
            expected = model(x).numpy()
        seen.add(int(pruning_state(model).adaptive_counts[0]))
        out = session.run(None, {"image": x.numpy()})[0]
        assert np.abs(out - expected).max() <= 1e-4
    assert len(seen) > 1


def test_predicted_distribution_follows_the_counts(tmp_path):
    from test_predictor import _synthetic_table

    from spvit_search.latency import LatencyTable
    from spvit_search.predictor import PlanLatency

    model = create_model(MODEL)
    latency = PlanLatency(LatencyTable.open(_synthetic_table(tmp_path, model)), model, MODEL)
    counts = np.array([[32, 16, 8], [48, 24, 4], [20, 10, 5]])
    ms = latency.predict_counts(PLAN, counts)
    for row, got in zip(counts, ms, strict=True):
        assert got == pytest.approx(latency.predict(PLAN.replace(keep=tuple(row / 64))).total_ms)
    assert ms[1] > ms[0] > ms[2]


def test_the_session_distribution_carries_the_calibration_images_ratios():
    from spvit_search.predictor import CountsLatency

    rng = np.random.default_rng(0)
    jitter = rng.lognormal(0.0, 0.04, 400)  # the device's: the same counts, another time each run
    session = CountsLatency.fit(np.full(400, 0.7), 0.7 * 1.15 * jitter)  # the graph costs 15% more
    predicted = np.array([0.7, 0.75, 0.8])
    got = session.percentiles(predicted)
    expected = np.outer(predicted, 1.15 * jitter).ravel()
    assert got["p50"] == pytest.approx(np.percentile(expected, 50)) and got["mean"] == pytest.approx(expected.mean())
    assert got["p95"] > 1.15 * 0.8 > got["p50"] > 1.15 * 0.7  # the spread of the counts and of the device
    with pytest.raises(ValueError, match="one measurement per prediction"):
        CountsLatency.fit(np.ones(3), np.ones(2))


def test_adaptive_counts_are_refused_where_they_do_not_apply(tmp_path):
    with pytest.raises(ValueError, match="not pruned"):
        set_adaptive(create_model(MODEL), AdaptiveCount())
    evit = sp.prune(create_model(MODEL), PLAN.replace(method="evit"))
    with pytest.raises(UnsupportedModelError, match="learned selectors"):
        set_adaptive(evit, AdaptiveCount())
    with pytest.raises(ValueError, match="min_factor"):
        AdaptiveCount(min_factor=1.5)
    with pytest.raises(sp.SpvitError, match="set_adaptive"):
        export_onnx_adaptive(_model(), tmp_path / "fixed.onnx")
