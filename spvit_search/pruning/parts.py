"""Measured parts shared by families whose blocks are timm ViT ``Block``s (ViT, PiT).

A family lists its own stem, downsampling layers and head; the blocks of one signature and
the selectors of one width are built here the same way for all of them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..blocks import (
    BLOCK_FRACTIONS,
    SELECTOR_FRACTIONS,
    SELECTOR_PART_KEEP,
    InputSpec,
    Part,
    PlainBlock,
    ProportionalBlock,
    block_signature,
    selector_signature,
    token_grid,
)
from ..plan import METHODS
from .layout import Stage
from .merge import KeyReader, TokenMerger
from .reducer import TokenReducer
from .selector import ClsAttentionScorer, MultiHeadTokenSelector, PreviousQkv
from .state import PruneState


class SelectorPart(nn.Module):
    """One pruning or merging stage at inference, on a sequence of prefix + patch tokens."""

    def __init__(self, reducer: TokenReducer | TokenMerger, num_prefix: int) -> None:
        super().__init__()
        self.reducer = reducer.eval()
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor, qkv: torch.Tensor | None = None) -> torch.Tensor:
        if qkv is not None:  # EViT and ToMe read the previous block's qkv projection
            next(m for m in self.reducer.modules() if isinstance(m, PreviousQkv))._qkv = qkv
        return self.reducer(x, PruneState(num_prefix=self.num_prefix))


def stage_block_parts(blocks: list[nn.Module], stage: Stage, methods: tuple[str, ...], seen: set[str]) -> list[Part]:
    """One part per block signature of ``stage`` not in ``seen`` (plus its size-biased twin for ToMe)."""
    token_input = (InputSpec("x", (stage.dim,)),)
    grid = token_grid(stage.prefix, stage.patches, BLOCK_FRACTIONS)
    parts = []
    for block in blocks[stage.start : stage.stop]:
        sig = block_signature(block)
        if sig in seen:
            continue
        seen.add(sig)
        parts.append(Part("block", sig, PlainBlock(block), token_input, grid, dynamic=True))
        if "tome" in methods:  # blocks after a merge run with the size bias
            inputs = (*token_input, InputSpec("size", (1,), positive=True))
            biased = block_signature(block, proportional=True)
            parts.append(Part("block", biased, ProportionalBlock(block), inputs, grid, dynamic=True))
    return parts


def stage_selector_parts(stage: Stage, attn: nn.Module, has_class_token: bool, methods: tuple[str, ...],
                         seen: set[str]) -> list[Part]:  # fmt: skip
    """The selector of each method at the width of ``stage`` (``attn``: a block's attention there,
    copied for the scorers that read the previous block's qkv)."""
    dim, heads, prefix = stage.dim, stage.heads, stage.prefix
    token_input = (InputSpec("x", (dim,)),)
    qkv_input = InputSpec("qkv", (attn.qkv.out_features,))
    grid = token_grid(prefix, stage.patches, SELECTOR_FRACTIONS)
    parts = []
    for method in methods:
        signature = selector_signature(method, dim, heads, prefix)
        if signature in seen:
            continue
        spec = METHODS[method]
        if method == "tome":
            module: nn.Module = TokenMerger(SELECTOR_PART_KEEP, KeyReader(copy.deepcopy(attn)))
            inputs = (*token_input, qkv_input)
        elif spec.learned_selector:
            module = TokenReducer(MultiHeadTokenSelector(dim, heads), SELECTOR_PART_KEEP, spec.package_token_default)
            inputs = token_input
        elif has_class_token:
            scorer = ClsAttentionScorer(copy.deepcopy(attn), prefix)
            module = TokenReducer(scorer, SELECTOR_PART_KEEP, spec.package_token_default)
            inputs = (*token_input, qkv_input)
        else:
            continue
        seen.add(signature)
        parts.append(Part("selector", signature, SelectorPart(module, prefix), inputs, grid, dynamic=False))
    return parts
