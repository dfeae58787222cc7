"""The search's fast evaluator agrees with plain evaluation of the pruned model."""

import pytest
import torch

import spvit_search as sp
from spvit_search.data import build_dataset
from spvit_search.evaluate import PlanEvaluator
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
