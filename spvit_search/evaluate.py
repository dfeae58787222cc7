"""Accuracy of pruning plans on calibration images, fast enough for a search's inner loop.

* What enters the first block that any plan can change is computed once and cached (for EViT
  that is the block before the first location: its attention scores the tokens); the model's
  family says how to compute it and how to run the rest.
* A plan already scored is not scored again.
* Scoring is staged: a first subset of the images gives an early estimate that the search can
  use to stop hopeless trials, then the rest.

The objective is top-1 accuracy against the labels, or, without labels (``agreement``), the
share of images whose top-1 matches the dense model's — a label-free proxy for any checkpoint.

With ``adaptive`` (per-image counts, :mod:`spvit_search.pruning.adaptive`) every plan runs with a
count per image, and the counts each image kept are kept too (``counts``): the latency of an
adaptive plan is a distribution over the images, predicted from them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .plan import PruningPlan
from .pruning import AdaptiveCount, family_for, prune, pruning_state, set_adaptive


def plan_key(plan: PruningPlan) -> str:
    keep = ",".join(f"{k:.4f}" for k in plan.keep)
    return f"{plan.method}|{','.join(map(str, plan.locations))}|{keep}|{plan.package_token}"


class PlanEvaluator:
    """Scores plans of one model on fixed calibration images."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        first_block: int,
        batch_size: int = 64,
        early_fraction: float = 0.25,
        adaptive: AdaptiveCount | None = None,
    ) -> None:
        self.model = model.eval()
        self.adaptive = adaptive
        self.family = family_for(model)
        self.batch_size = batch_size
        self.first_block = max(0, first_block)
        with torch.no_grad():
            if labels is None:  # agreement with the dense model
                labels = torch.cat([model(chunk).argmax(dim=1) for chunk in images.split(batch_size)])
            self.labels = labels
            self.prefix = torch.cat([self._embed(chunk) for chunk in images.split(batch_size)])
        self.early = max(1, int(len(labels) * early_fraction))
        self.cache: dict[str, float] = {}
        self.counts: dict[str, np.ndarray] = {}  # adaptive: (images, stages) patch tokens kept, per plan key
        self._batch_counts: list[np.ndarray] = []
        self.evaluations = 0

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """What enters block ``first_block`` (the dense stem and blocks before it)."""
        return self.family.embed(self.model, images, self.first_block)

    def _correct(self, tokens: torch.Tensor, labels: torch.Tensor) -> int:
        correct = 0
        for start in range(0, len(tokens), self.batch_size):
            x = tokens[start : start + self.batch_size]
            logits = self.family.forward_from(self.model, x, self.first_block)
            if self.adaptive is not None:
                acted = pruning_state(self.model).adaptive_counts
                self._batch_counts.append(torch.stack(acted, dim=1).numpy() if acted else np.zeros((len(x), 0), int))
            correct += int((logits.argmax(dim=1) == labels[start : start + len(x)]).sum())
        return correct

    def evaluate(self, plan: PruningPlan, report: Callable[[float], bool] | None = None) -> float:
        """Top-1 (%) of ``plan``; ``report(early_accuracy)`` returning True stops early (returns that)."""
        key = plan_key(plan)
        if key in self.cache:
            return self.cache[key]
        prune(self.model, plan)
        if self.adaptive is not None:
            set_adaptive(self.model, self.adaptive)
        self.model.eval()
        self.evaluations += 1
        self._batch_counts = []
        with torch.no_grad():
            early = self._correct(self.prefix[: self.early], self.labels[: self.early])
            early_acc = 100.0 * early / self.early
            if report is not None and report(early_acc):
                return early_acc
            rest = self._correct(self.prefix[self.early :], self.labels[self.early :])
        accuracy = 100.0 * (early + rest) / len(self.labels)
        self.cache[key] = accuracy
        if self.adaptive is not None:
            self.counts[key] = self._stage_counts(plan, np.concatenate(self._batch_counts))
        return accuracy

    def _stage_counts(self, plan: PruningPlan, acted: np.ndarray) -> np.ndarray:
        """(images, stages) counts from those of the stages that acted: a stage whose keep does not
        fall below the one before removes nothing, and its images keep what entered it."""
        num_patches = pruning_state(self.model).num_patches
        columns, previous, j = [], np.full(len(acted), num_patches), 0
        for keep, before in zip(plan.keep, self.family.layout(self.model).previous_keep(plan), strict=True):
            if keep < before:
                previous, j = acted[:, j], j + 1
            columns.append(previous)
        return np.stack(columns, axis=1)
