import pytest
import torch

import spvit_search  # noqa: F401  (applies the torchvision import fix before timm)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled
