"""Token scorers: the learned multi-head token selector (SPViT) and class-token attention (EViT).

Every scorer maps the current patch tokens ``(B, n, C)`` to log-probabilities ``(B, n, 2)``
of ``[drop, keep]``. The stage logic (top-k, Gumbel masks, package token) lives in
``reducer.py`` and is the same for every scorer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadTokenSelector(nn.Module):
    """SPViT's multi-head token selector (MHTS).

    The channels of each token are split like the attention heads. Each head's slice goes
    through a small MLP shared by the heads; half of its hidden features stay local, the
    other half are averaged over the tokens still kept (weighted by the previous keep mask,
    so training and inference see the same global context). A per-token squeeze-excitation
    branch weighs the heads, and the heads' keep distributions are mixed with those weights.
    Heads attend to different things, so one token may matter to some heads only; the mixture
    keeps such tokens unless the heads that care about them carry little weight.
    """

    learned = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden_ratio: float = 1.0,
        se_ratio: float = 0.0625,
        prior_keep: float = 0.5,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        hidden = max(8, 2 * round(head_dim * hidden_ratio / 2))
        se_hidden = max(4, round(dim * se_ratio))
        self.in_norm = nn.LayerNorm(head_dim)
        self.in_proj = nn.Sequential(nn.Linear(head_dim, hidden), nn.GELU())
        self.out = nn.Sequential(
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
            nn.Linear(hidden // 2, max(2, hidden // 4)),
            nn.GELU(),
            nn.Linear(max(2, hidden // 4), 2),
        )
        self.head_weights = nn.Sequential(nn.Linear(dim, se_hidden), nn.GELU(), nn.Linear(se_hidden, num_heads))
        # Start at the stage's keep ratio: the ratio loss then holds the count instead of first
        # having to find it, and training sees the token counts inference will use.
        p = min(max(prior_keep, 1e-3), 1 - 1e-3)
        with torch.no_grad():
            self.out[-1].bias.copy_(torch.tensor([0.0, math.log(p / (1 - p))]))

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        normed = self.in_norm(x.reshape(b, n, self.num_heads, c // self.num_heads))
        h = self.in_proj(normed)
        local, glob = h.chunk(2, dim=-1)
        if policy is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            w = policy[:, :, None, None].to(glob.dtype)
            glob = (glob * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        h = torch.cat([local, glob.expand_as(local)], dim=-1)
        head_logp = F.log_softmax(self.out(h), dim=-1)  # (B, n, H, 2)
        head_logw = F.log_softmax(self.head_weights(normed.reshape(b, n, c)), dim=-1)  # (B, n, H)
        return torch.logsumexp(head_logp + head_logw[..., None], dim=2)

    def keep_logp(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)[..., 1]`` at inference (every token counts), in about half the graph.

        On small models a stage's cost is mostly per-node overhead, paid on the device at every
        stage (on vit_demo_fashion at 65 tokens, ORT CPU: 0.20 → 0.17 ms). Same values: the
        first layer's weight is split into its local and global columns, so the global half is
        projected once per image instead of being expanded to every token and concatenated;
        only the keep channel of each head is computed (``log σ(l_keep − l_drop)`` equals the
        head's log-softmax keep entry).
        """
        b, n, c = x.shape
        normed = self.in_norm(x.reshape(b, n, self.num_heads, c // self.num_heads))
        local, glob = self.in_proj(normed).chunk(2, dim=-1)
        first, last = self.out[0], self.out[-1]
        half = local.shape[-1]
        glob = F.linear(glob.mean(dim=1, keepdim=True), first.weight[:, half:], first.bias)  # once per image
        h = F.linear(local, first.weight[:, :half]) + glob
        for layer in self.out[1:-1]:
            h = layer(h)
        margin = F.linear(h, last.weight[1:] - last.weight[:1], last.bias[1:] - last.bias[:1])[..., 0]  # (B, n, H)
        head_logw = F.log_softmax(self.head_weights(normed.reshape(b, n, c)), dim=-1)
        return torch.logsumexp(head_logw - F.softplus(-margin), dim=2)


class PreviousQkv(nn.Module):
    """Keeps the ``qkv`` projection the previous block's attention computed, for a stage to read.

    A forward hook on that block's ``qkv`` (fused attention never exposes the attention
    matrix, but its projection is an ``nn.Linear`` in every timm ViT). The attention module
    is held without registering it: its weights belong to the block.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_attn", attn)
        self._qkv: torch.Tensor | None = None
        self._hook = attn.qkv.register_forward_hook(self._keep_qkv)

    def _keep_qkv(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._qkv = output

    def remove(self) -> None:
        self._hook.remove()
        self._qkv = None

    def take_qkv(self, reader: str) -> torch.Tensor:
        """The kept projection (B, N, 3C), released so a stale one is never read twice."""
        qkv, self._qkv = self._qkv, None
        if qkv is None:
            raise RuntimeError(f"{reader} ran before the previous block's attention")
        return qkv


class ClsAttentionScorer(PreviousQkv):
    """EViT's score: how much the class token attends to each patch, averaged over heads.

    Read from the attention of the block *before* the selector location: a forward hook on
    that block's ``qkv`` projection keeps its output, and only the class-token row of the
    attention is recomputed (O(N·C), negligible). Works with fused attention, qk-norm and
    LayerScale because it uses the installed attention module's own fields.
    """

    learned = False

    def __init__(self, attn: nn.Module, num_prefix: int) -> None:
        super().__init__(attn)
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        a = self.class_attention(x.shape[1])
        return torch.stack([torch.log1p(-a), torch.log(a)], dim=-1)

    def keep_logp(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)[..., 1]``: only the keep channel, which is all a stage reads at inference."""
        return torch.log(self.class_attention(x.shape[1]))

    def class_attention(self, n: int) -> torch.Tensor:
        """Class-token attention (B, n) to the ``n`` patches after the prefix, clamped inside (0, 1)."""
        qkv, attn = self.take_qkv("EViT scorer"), self._attn
        b, n_all, _ = qkv.shape
        h, d = attn.num_heads, attn.head_dim
        q = qkv[:, :1, : h * d].reshape(b, 1, h, d).transpose(1, 2)  # class token only: (B, H, 1, d)
        k = qkv[:, :, h * d : 2 * h * d].reshape(b, n_all, h, d).transpose(1, 2)  # (B, H, N, d)
        q, k = attn.q_norm(q), attn.k_norm(k)
        cls_attn = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[:, 0]  # (B, N)
        return cls_attn[:, self.num_prefix : self.num_prefix + n].clamp(1e-12, 1 - 1e-6)
