"""The smaller-dense baseline: the same model with fewer blocks, the one that fits a target.

What a practitioner tries before pruning tokens. A shallower copy keeps the teacher's stem,
final norm and head and an evenly spaced subset of its blocks (the first and the last among
them), so it starts near the teacher and is then distilled from it with the same budget as the
token-pruning fine-tunes (``spvit-search train --checkpoint SMALL --teacher TEACHER``).
Narrower widths are not candidates: their weights cannot be inherited (the channels of the
residual stream do not come apart), so each would need the teacher's whole recipe from scratch.

Which depth fits is decided by measurement: every depth is exported and timed end to end on
the device, interleaved in one session, and the deepest one measured within the target wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .devices import DeviceConfig
from .errors import SpvitError
from .flops import count_flops
from .models import create_model, read_state, state_depth


class ShrinkError(SpvitError):
    """No shallower model fits, or the model is not a flat ViT with a block sequence."""


def evenly_spaced(depth: int, keep: int) -> tuple[int, ...]:
    """``keep`` block indices of ``0..depth-1`` spread evenly, the first and (for keep > 1) the last included."""
    if not 1 <= keep <= depth:
        raise ShrinkError(f"cannot keep {keep} of {depth} blocks")
    if keep == 1:
        return (depth - 1,)  # the block that feeds the final norm and head
    return tuple(round(i * (depth - 1) / (keep - 1)) for i in range(keep))


def shallower_state(state: dict, blocks: tuple[int, ...]) -> dict:
    """``state`` with only ``blocks`` (renumbered 0..len-1); every other tensor as it was."""
    renumber = {old: new for new, old in enumerate(blocks)}
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            if index not in renumber:
                continue
            key = f"blocks.{renumber[index]}." + key.split(".", 2)[2]
        out[key] = value
    return out


def shallower(model_name: str, checkpoint: str | Path, depth: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The ``depth``-block model initialised from ``checkpoint``'s blocks; (model, blocks taken)."""
    state = read_state(checkpoint)
    full = state_depth(state)
    if full is None:
        raise ShrinkError(f"{checkpoint} is not a flat ViT checkpoint (no blocks.<i> tensors): cannot drop blocks")
    blocks = evenly_spaced(full, depth)
    classes = state["head.weight"].shape[0] if "head.weight" in state else None
    model = create_model(model_name, depth=depth, **({} if classes is None else {"num_classes": classes}))
    model.load_state_dict(shallower_state(state, blocks))
    return model.eval(), blocks


@dataclass
class DepthCandidate:
    depth: int
    blocks: tuple[int, ...]
    gmacs: float
    measured_ms: float | None = None

    def as_dict(self) -> dict:
        return {"depth": self.depth, "blocks": list(self.blocks), "gmacs": round(self.gmacs, 6),
                "measured_ms": None if self.measured_ms is None else round(self.measured_ms, 4)}  # fmt: skip


def measure_depths(device: DeviceConfig, model_name: str, checkpoint: str | Path, settings=None,
                   depths: list[int] | None = None) -> list[DepthCandidate]:  # fmt: skip
    """Every depth (all by default, the full model included) exported and measured, interleaved."""
    from .measure import measure_models

    full = state_depth(read_state(checkpoint))
    if full is None:
        raise ShrinkError(f"{checkpoint} is not a flat ViT checkpoint (no blocks.<i> tensors): cannot drop blocks")
    depths = depths or list(range(1, full + 1))
    models, candidates = {}, []
    for depth in depths:
        model, blocks = shallower(model_name, checkpoint, depth)
        models[f"depth{depth}"] = model
        candidates.append(DepthCandidate(depth, blocks, count_flops(model).gmacs))
    timings, _ = measure_models(device, models, settings)
    for c in candidates:
        c.measured_ms = timings[f"depth{c.depth}"].median_ms
    return candidates


def pick_depth(candidates: list[DepthCandidate], target_ms: float) -> DepthCandidate:
    """The deepest candidate measured within ``target_ms`` (deeper: more capacity at equal budget)."""
    fits = [c for c in candidates if c.measured_ms is not None and c.measured_ms <= target_ms]
    if not fits:
        fastest = min(candidates, key=lambda c: c.measured_ms or float("inf"))
        raise ShrinkError(f"no depth fits {target_ms:g} ms: the fastest, {fastest.depth} block(s), measured "
                          f"{fastest.measured_ms:.3f} ms")  # fmt: skip
    return max(fits, key=lambda c: c.depth)


def save_shallower(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path
