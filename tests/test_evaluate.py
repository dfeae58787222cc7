"""The search's fast evaluator agrees with plain evaluation of the pruned model."""

import pytest
import torch

import spvit_search as sp
from spvit_search.data import build_dataset
from spvit_search.evaluate import PlanEvaluator, plan_key
from spvit_search.models import create_model


@pytest.mark.parametrize("method", ["evit", "spvit"])
def test_evaluator_equals_plain_evaluation(method):
    model = create_model("vit_demo_digits").eval()
    data = build_dataset("demo", "calib")
    images, labels = data.images[:120], data.labels[:120]
    with torch.no_grad():  # labels the random model gets ~half right, so errors show
        labels = torch.where(torch.arange(120) % 2 == 0, model(images).argmax(1), labels)
    evaluator = PlanEvaluator(model, images, labels, first_block=1, batch_size=32)
    for keep in [(1.0, 1.0, 1.0), (0.7, 0.5, 0.3), (0.9, 0.4, 0.2)]:
        plan = sp.PruningPlan(locations=(2, 3, 5), keep=keep, method=method)
        fast = evaluator.evaluate(plan)
        sp.prune(model, plan)
        with torch.no_grad():
            plain = 100.0 * (model(images).argmax(1) == labels).float().mean().item()
        assert fast == pytest.approx(plain), keep
        assert evaluator.evaluate(plan) == fast  # cached
    stopped = evaluator.evaluate(sp.PruningPlan(locations=(2, 3, 5), keep=(0.5, 0.3, 0.3), method=method),
                                 report=lambda early: True)  # fmt: skip
    assert 0.0 <= stopped <= 100.0 and evaluator.evaluations == 4


def test_adaptive_counts_cover_every_stage_even_one_that_removes_nothing():
    """--percentile predicts each image from a count per stage; a stage whose keep equals the one
    before removes nothing and records no count, so its images keep what entered it (a CI run's
    chosen plan had two stages at 0.25 and the per-image prediction indexed past the counts)."""
    from spvit_search.pruning import AdaptiveCount, pruning_state, set_adaptive

    torch.manual_seed(0)
    model = create_model("vit_demo_digits").eval()
    images = build_dataset("demo", "calib").images[:48]
    adaptive = AdaptiveCount(scale=1.0)
    evaluator = PlanEvaluator(model, images, None, first_block=1, batch_size=16, adaptive=adaptive)
    plan = sp.PruningPlan(locations=(2, 3, 5), keep=(0.5, 0.5, 0.25), method="spvit")
    evaluator.evaluate(plan)
    counts = evaluator.counts[plan_key(plan)]
    sp.prune(model, plan)
    set_adaptive(model, adaptive)
    acted = []
    with torch.no_grad():  # plain inference, batch by batch as the evaluator runs it
        for chunk in images.split(16):
            model(chunk)
            acted.append(torch.stack(pruning_state(model).adaptive_counts, dim=1))
    acted = torch.cat(acted).numpy()
    assert acted.shape == (48, 2) and counts.shape == (48, 3)
    assert (counts[:, 0] == acted[:, 0]).all() and (counts[:, 1] == counts[:, 0]).all()
    assert (counts[:, 2] == acted[:, 1]).all() and (counts[:, 2] < counts[:, 1]).all()
