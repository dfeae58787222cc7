"""benchmarks/speedup.py's selection-free baselines build, export and run: the overhead figures
of the README subtract them, so a baseline that no longer fits the pruned model's bookkeeping
(as when PiT's parked tokens gained their package's update) must fail here, not mid-benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import spvit_search as sp
from spvit_search.export import INPUT_NAME, onnx_session
from spvit_search.models import create_model, input_shape

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speedup.py"
PLANS = {
    "pit_demo_digits": ((1, 4), (0.5, 0.5)),  # two grids: parked tokens, restored before pooling
    "vit_demo_digits": ((1, 3), (0.7, 0.49)),  # one grid: sliced
}


@pytest.mark.parametrize("method", ["spvit", "evit"])
@pytest.mark.parametrize("model_name", list(PLANS))
def test_the_baseline_keeps_the_plans_token_counts_and_runs_in_onnx(tmp_path, monkeypatch, model_name, method):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import speedup

    locations, keep = PLANS[model_name]
    plan = sp.PruningPlan(locations=locations, keep=keep, method=method)
    model = sp.prune(create_model(model_name).eval(), plan)
    image = torch.randn(2, *input_shape(model))
    with torch.no_grad():
        pruned = model(image)
    baseline = speedup._slice_baseline(model, plan)
    with torch.no_grad():
        sliced = baseline(image)
    assert sp.pruning_state(baseline).token_counts == list(plan.tokens_per_block(baseline))
    assert sliced.shape == pruned.shape
    path = speedup._export_baseline(baseline, tmp_path / "noselect.onnx", 2)
    (out,) = onnx_session(path, threads=1).run(None, {INPUT_NAME: image.numpy()})
    assert out.shape == tuple(pruned.shape) and np.isfinite(out).all()
