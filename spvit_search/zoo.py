"""Model configs this project registers with timm (one family: small ViTs for the embedded data).

Registered like timm's own entries (a ``default_cfgs`` entry, ``@register_model``, built by
``build_model_with_cfg``), so ``timm.create_model("vit_demo_digits")`` works once
``spvit_search`` is imported, and everything that takes a timm model takes it.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

default_cfgs = generate_default_cfgs(
    {
        "vit_demo_digits": {
            "input_size": (3, 32, 32),
            "num_classes": 10,
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "vit_demo_fashion": {
            "input_size": (1, 32, 32),
            "num_classes": 10,
            "mean": (0.2860,),
            "std": (0.3530,),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
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
