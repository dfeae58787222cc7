import pytest
import torch
from torch import nn

import spvit_search  # noqa: F401  (applies the torchvision import fix before timm)


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
