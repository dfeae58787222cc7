"""Creating timm models by name, with errors that help, and reading their input shape."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import SpvitError


class ModelError(SpvitError, ValueError):
    """An unknown model name or a checkpoint that does not fit the model."""


def create_model(name: str, checkpoint: str | Path | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` without pretrained downloads; unknown names suggest close matches."""
    _check_name(name)
    state = read_state(checkpoint) if checkpoint is not None else None
    model = _member_for(name, state, kwargs)
    if state is not None:
        apply_state(model, state, checkpoint, name)
    return model


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        names = timm.list_models()
        close = [n for n in names if name.lower() in n][:5] or difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
        raise ModelError(f"unknown model {name!r}{hint}")


def _member_for(name: str, state: dict | None, kwargs: dict) -> nn.Module:
    """``name`` built with ``kwargs`` — with the depth of ``state`` if it holds fewer or more
    blocks than ``name`` has (a shallower member of the family, from ``spvit-search shrink``)."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    depth = state_depth(state) if state is not None else None
    if depth is not None and "depth" not in kwargs and len(getattr(model, "blocks", ())) not in (0, depth):
        model = timm.create_model(name, pretrained=False, depth=depth, **kwargs)
    return model


def read_state(path: str | Path) -> dict:
    """The state dict inside a checkpoint file (plain, or under 'model'/'state_dict')."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file gets the same clear message
        raise ModelError(f"checkpoint {path} could not be read: {err}") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds no state dict")
    return state


def apply_state(model: nn.Module, state: dict, path: str | Path, name: str = "model") -> None:
    """Load ``state`` strictly; a mismatch names the tensors that do not fit."""
    own = model.state_dict()
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if bad_shape or missing or unexpected:
        parts = []
        if bad_shape:
            k = bad_shape[0]
            shapes = f"checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {k}: {shapes})")
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise ModelError(f"checkpoint {path} does not fit {name}: " + "; ".join(parts))
    model.load_state_dict(state)


def state_depth(state: dict) -> int | None:
    """Blocks of a flat ViT state dict (keys ``blocks.<i>.…``), or None for other layouts."""
    indices = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else None


def load_checkpoint(model: nn.Module, path: str | Path, name: str = "model") -> None:
    apply_state(model, read_state(path), path, name)


def build_model(
    name: str, checkpoint: str | Path | None = None, plan=None, num_classes: int | None = None
) -> nn.Module:
    """A timm model, pruned by ``plan`` if given, with a dense or fine-tuned checkpoint loaded.

    A dense checkpoint is loaded before pruning (new selectors start fresh); a fine-tuned one,
    which holds selectors, after pruning with the plan it was fine-tuned with. A flat ViT
    checkpoint with fewer blocks than ``name`` has (``spvit-search shrink``) builds that
    shallower member of the family.
    """
    from .pruning import prune

    state = read_state(checkpoint) if checkpoint is not None else None
    if num_classes is None and state is not None and "head.weight" in state:
        num_classes = state["head.weight"].shape[0]
    _check_name(name)
    model = _member_for(name, state, {} if num_classes is None else {"num_classes": num_classes})
    selectors = selector_blocks(model, state or {})
    if selectors and (plan is None or not plan.spec.learned_selector):
        raise ModelError(
            f"checkpoint {checkpoint} holds token selectors before blocks {selectors}: "
            "give the plan it was fine-tuned with"
        )
    if selectors and tuple(selectors) != tuple(plan.locations):
        raise ModelError(f"checkpoint {checkpoint} has selectors before blocks {selectors}, the plan puts them at "
                         f"{list(plan.locations)}")  # fmt: skip
    if state is not None and not selectors:
        apply_state(model, state, checkpoint, name)
    if plan is not None and (selectors or not plan.is_dense):
        prune(model, plan)
    if selectors:
        apply_state(model, state, checkpoint, f"{name} pruned by the plan")
    return model


def selector_blocks(model: nn.Module, state: dict) -> list[int]:
    """Indices (as plan locations count them) of the blocks whose selectors ``state`` holds."""
    from .pruning import UnsupportedModelError, family_for

    prefixes = {k.split(".token_selector.")[0] for k in state if ".token_selector." in k}
    if not prefixes:
        return []
    try:
        blocks = family_for(model).blocks(model)
    except UnsupportedModelError:
        return []
    index = {name: i for i, (name, _) in enumerate(_named(model, blocks))}
    return sorted(index[p] for p in prefixes if p in index)


def _named(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(b)], b) for b in blocks]


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model was built for."""
    embed = getattr(model, "patch_embed", None)
    conv = getattr(embed, "proj", None) or getattr(embed, "conv", None)  # ViT/Swin: proj; PiT: conv
    if conv is not None and getattr(embed, "img_size", None) is not None:
        h, w = embed.img_size
        return (conv.in_channels, int(h), int(w))
    return tuple(model.pretrained_cfg["input_size"])
