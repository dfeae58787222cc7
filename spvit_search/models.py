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
    if not timm.is_model(name):
        names = timm.list_models()
        close = [n for n in names if name.lower() in n][:5] or difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
        raise ModelError(f"unknown model {name!r}{hint}")
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, name: str = "model") -> None:
    """Load a state dict (plain, or under 'model'/'state_dict'); mismatches name the tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"checkpoint {path} could not be read: {err}") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
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


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model was built for."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        h, w = embed.img_size
        return (embed.proj.in_channels, int(h), int(w))
    return tuple(model.pretrained_cfg["input_size"])
