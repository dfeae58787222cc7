import pytest
import torch
from click.testing import CliRunner
from torch import nn

import spvit_search as sp  # (applies the torchvision import fix before timm)
from spvit_search.cli import main
from spvit_search.devices import DeviceRegistry
from spvit_search.models import build_model
from spvit_search.predictor import PlanLatency


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled


class ContentScorer(nn.Module):
    """Test double of a learned scorer with decisions fixed by token content.

    It keeps the top-k tokens (by a fixed projection) among those still kept, with log-probs
    so sharp that Gumbel noise cannot flip them (P ~ 2e-9), and distinct keep probabilities
    for the pruned tokens so the package token's weighting is exercised.
    """

    learned = True

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.register_buffer("w", torch.randn(dim))

    def forward(self, x, policy=None):
        s = x @ self.w
        if policy is not None:
            s = s.masked_fill(policy <= 0, float("-inf"))
        keep = torch.zeros_like(s, dtype=torch.bool).scatter(1, s.topk(self.k, dim=1).indices, True)
        shade = 3 * torch.sigmoid(s.nan_to_num(neginf=0.0) / 10)
        logp_keep = torch.where(keep, torch.zeros_like(s), -20.0 - shade)
        logp_drop = torch.where(keep, -20.0 - shade, torch.zeros_like(s))
        return torch.stack([logp_drop, logp_keep], dim=-1)


DEMO_MODEL = "vit_demo_digits"


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A briefly trained demo model and its profiled, calibrated local table (the searches' tests)."""
    root = tmp_path_factory.mktemp("demo")
    runner = CliRunner()
    for args in (
        ["train", "--out", str(root / "dense"), "--epochs", "4", "--no-augment"],
        ["profile", "--model", DEMO_MODEL, "--out", str(root / "tables"), "--rounds", "4", "--runs", "5"],
        ["calibrate", "--model", DEMO_MODEL, "--tables", str(root / "tables"), "--points", "3", "--rounds", "4"],
    ):
        done = runner.invoke(main, args)
        assert done.exit_code == 0, done.output
    device = DeviceRegistry.load().get("local")
    latency = PlanLatency.for_device(device, build_model(DEMO_MODEL), DEMO_MODEL, root=root / "tables")
    dense_ms = latency.predict(sp.PruningPlan(locations=(2,), keep=(1.0,))).total_ms
    return {"root": root, "checkpoint": root / "dense" / "model.pt", "tables": root / "tables", "dense_ms": dense_ms}
