"""Model configs this project registers with timm: small ViTs, PiTs and Swins for the embedded data.

Registered like timm's own entries (a ``default_cfgs`` entry, ``@register_model``, built by
``build_model_with_cfg``), so ``timm.create_model("vit_demo_digits")`` works once
``spvit_search`` is imported, and everything that takes a timm model takes it.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.pit import PoolingVisionTransformer
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

_DIGITS = {"input_size": (3, 32, 32), "num_classes": 10, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "crop_pct": 1.0, "interpolation": "bilinear"}  # fmt: skip
_FASHION = {"input_size": (1, 32, 32), "num_classes": 10, "mean": (0.2860,), "std": (0.3530,), "crop_pct": 1.0,
            "interpolation": "bilinear"}  # fmt: skip
_VIT = {"first_conv": "patch_embed.proj", "classifier": "head"}
_PIT = {"first_conv": "patch_embed.conv", "classifier": "head"}
_SWIN = {"first_conv": "patch_embed.proj", "classifier": "head.fc"}
default_cfgs = generate_default_cfgs(
    {
        "vit_demo_digits": {**_DIGITS, **_VIT},
        "vit_demo_fashion": {**_FASHION, **_VIT},
        "pit_demo_digits": {**_DIGITS, **_PIT},
        "pit_demo_fashion": {**_FASHION, **_PIT},
        "swin_demo_digits": {**_DIGITS, **_SWIN},
        "swin_demo_fashion": {**_FASHION, **_SWIN},
    }
)


@register_model
def vit_demo_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for the embedded demo data: 32×32 images, 4×4 patches (64 + class token), 6 blocks of
    width 96 with 3 heads. Small enough to train from scratch in minutes on two CPU cores, deep
    enough for three pruning stages (DeiT's layout at half depth)."""
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 3.0,
            "num_classes": 10}  # fmt: skip
    return build_model_with_cfg(VisionTransformer, "vit_demo_digits", pretrained, **dict(args, **kwargs))


@register_model
def vit_demo_fashion(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for Fashion-MNIST (``--data fashion``): one grayscale channel, 28×28 padded to 32×32,
    4×4 patches (64 + class token), 6 blocks of width 96 with 3 heads — ``vit_demo_digits`` with
    one input channel, so the two data sets share block signatures and latency tables."""
    args = {"img_size": 32, "patch_size": 4, "in_chans": 1, "embed_dim": 96, "depth": 6, "num_heads": 3,
            "mlp_ratio": 3.0, "num_classes": 10}  # fmt: skip
    return build_model_with_cfg(VisionTransformer, "vit_demo_fashion", pretrained, **dict(args, **kwargs))


#: 32×32 input, 4×4 patches at stride 2: grids 15² → 8² → 4² (an odd first grid, like PiT-S's
#: 27²), widths 48 → 96 → 192 with 2 → 4 → 8 heads, 3 + 3 + 1 blocks: about the multiply-adds
#: of ``vit_demo_digits``, most of them in the first stage's attention. Three blocks on the
#: first grid, not two: a selector there acts until pooling restores the grid, and with 2 + 3 + 2
#: it covered one block, whose saving its own cost (30% of that block) ate; no `spvit` plan then
#: reached 85% of dense (README, equal-latency section).
_PIT_DEMO = {"img_size": 32, "patch_size": 4, "stride": 2, "base_dims": (24, 24, 24), "depth": (3, 3, 1),
             "heads": (2, 4, 8), "mlp_ratio": 3.0, "num_classes": 10}  # fmt: skip


@register_model
def pit_demo_digits(pretrained: bool = False, **kwargs) -> PoolingVisionTransformer:
    """PiT for the embedded demo data: a pooling transformer small enough to train here."""
    return build_model_with_cfg(PoolingVisionTransformer, "pit_demo_digits", pretrained, **dict(_PIT_DEMO, **kwargs))


@register_model
def pit_demo_fashion(pretrained: bool = False, **kwargs) -> PoolingVisionTransformer:
    """``pit_demo_digits`` with one input channel, for Fashion-MNIST (``--data fashion``)."""
    args = dict(_PIT_DEMO, in_chans=1, **kwargs)
    return build_model_with_cfg(PoolingVisionTransformer, "pit_demo_fashion", pretrained, **args)


#: 32×32 input, 2×2 patches, windows of 4×4: grids 16² → 8² with 16 and 4 windows of 16 tokens,
#: widths 48 → 96 with 2 → 4 heads, 4 + 2 blocks: about the multiply-adds of ``vit_demo_digits``.
#: Two stages, not Swin-T's four: on a model this small a last stage that is one window (which
#: window pruning cannot touch) held half of the latency, and no plan could reach 70% of dense.
#: Most blocks on the first grid: a window carried past a block of the *last* grid reaches the
#: average-pooling head unprocessed (on Swin-T the last grid is one window, never pruned, and it
#: processes every carried window). With 2 + 4 blocks a ≥ 30% saving had to prune the last grid,
#: and every plan that did lost 13–28 points on Fashion-MNIST; with 4 + 2 the first grid holds 65%
#: of the MACs (the numbers are in the README's equal-latency section).
#: Stochastic depth off: these train for minutes, where it only slows them down.
_SWIN_DEMO = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 48, "depths": (4, 2),
              "num_heads": (2, 4), "mlp_ratio": 3.0, "num_classes": 10, "drop_path_rate": 0.0}  # fmt: skip


@register_model
def swin_demo_digits(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin for the embedded demo data: a hierarchical window transformer small enough to train here."""
    return build_model_with_cfg(SwinTransformer, "swin_demo_digits", pretrained, **dict(_SWIN_DEMO, **kwargs))


@register_model
def swin_demo_fashion(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """``swin_demo_digits`` with one input channel, for Fashion-MNIST (``--data fashion``)."""
    args = dict(_SWIN_DEMO, in_chans=1, **kwargs)
    return build_model_with_cfg(SwinTransformer, "swin_demo_fashion", pretrained, **args)
