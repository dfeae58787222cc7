"""ONNX and TFLite export of a (pruned) model, and checks that the runtimes agree with torch.

The token counts of a pruned model are static (``kept_count`` of the plan), so the graph has
static shapes apart from an optional dynamic batch axis. The TorchScript-based exporter is
used: on this project's graphs it exports in ~2 s and its output runs ~10% faster in ORT on
CPU than the dynamo exporter's (measured on DeiT-S, ORT 1.31, 1 thread).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import SpvitError
from .models import input_shape

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
) -> Path:
    """Write ``model`` (pruned or dense, in eval mode) to ``path`` as ONNX and return the path."""
    return _export(model, model, path, batch_size, dynamic_batch, opset)


def _export(model: nn.Module, graph: nn.Module, path: str | Path, batch_size: int, dynamic_batch: bool, opset: int,
            keep: tuple[float, ...] | None = None) -> Path:  # fmt: skip
    """Trace ``graph`` (``model`` itself, or a wrapper of it taking ``keep`` too) into ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    ref = next(model.parameters())
    inputs = [torch.randn(batch_size, *input_shape(model), device=ref.device, dtype=ref.dtype)]
    if keep is not None:
        inputs.append(torch.tensor(keep, device=ref.device, dtype=ref.dtype))
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, tuple(inputs), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME, KEEP_NAME][: len(inputs)], output_names=[OUTPUT_NAME],
                              dynamic_axes=axes)  # fmt: skip
    finally:
        model.train(was_training)
    return path


KEEP_NAME = "keep"
TIE_TOLERANCE = 1e-4  # |logit| difference below which a different top-1 is a tie broken otherwise


class RuntimeCounts(nn.Module):
    """A pruned flat ViT whose token counts are computed in the graph: from a ``keep`` input (S,)
    (one file for every density of a weight-shared checkpoint), or, without one, from each
    image's keep probabilities (adaptive counts, ``set_adaptive``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        from .pruning import pruning_state

        state = pruning_state(self.model)
        state.runtime_keep, state.runtime_adaptive = keep, keep is None
        try:
            return self.model(x)
        finally:
            state.runtime_keep, state.runtime_adaptive = None, False


def export_onnx_switchable(model: nn.Module, path: str | Path, *, batch_size: int = 1, dynamic_batch: bool = False,
                           opset: int = 17, operating_points: list[tuple[float, ...]] | None = None,
                           ) -> Path:  # fmt: skip
    """Write a pruned flat ViT as ONNX with its keep ratios as a second input (``keep``, float32
    (S,), cumulative per stage as in a plan): one file for every density, token axes dynamic.

    Each stage keeps between 1 and n - 1 of the n tokens reaching it (a stage that keeps all is
    the dense model: export that one plainly). TFLite needs static shapes: export it per density.

    With ``operating_points`` (the densities the checkpoint was trained for), the file also holds
    a static graph of each, run when ``keep`` equals it: the speed of a static export there, the
    dynamic graph for any other keep. Each graph carries its own weights, so the file is as large
    as the static exports together (:mod:`spvit_search.onnx_switch` says why).
    """
    from .pruning import family_for

    plan = getattr(model, "spvit_plan", None)
    if plan is None:
        raise SpvitError("a run-time switchable export needs a pruned model (prune it with its plan first)")
    family = family_for(model).name
    if family != "vit" or plan.method not in ("spvit", "hard", "evit"):
        raise SpvitError(f"run-time keep ratios are exported for flat ViTs pruned by spvit, hard or evit; this "
                         f"is a {family} model pruned by {plan.method}: export each density instead")  # fmt: skip
    if not operating_points:
        return _export(model, RuntimeCounts(model), path, batch_size, dynamic_batch, opset, plan.keep)
    import tempfile

    import onnx

    from .onnx_switch import branch_on_keep
    from .pruning import set_keep

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="spvit-switch-") as tmp:
        dynamic = onnx.load(_export(model, RuntimeCounts(model), Path(tmp) / "dynamic.onnx", batch_size,
                                    dynamic_batch, opset, plan.keep))  # fmt: skip
        statics = []
        try:
            for i, point in enumerate(operating_points):
                set_keep(model, point)
                file = export_onnx(model, Path(tmp) / f"p{i}.onnx", batch_size=batch_size, dynamic_batch=dynamic_batch,
                                   opset=opset)  # fmt: skip
                statics.append((tuple(point), onnx.load(file)))
        finally:
            set_keep(model, plan.keep)
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = branch_on_keep(dynamic, statics, INPUT_NAME, KEEP_NAME, OUTPUT_NAME)
        big = merged.ByteSize() > 1.8e9  # protobuf's 2 GB limit: weights beside, in <file>.data
        onnx.save(merged, str(path), save_as_external_data=big, location=f"{path.name}.data" if big else None)
    return path


def export_onnx_adaptive(model: nn.Module, path: str | Path, *, opset: int = 17) -> Path:
    """Write a pruned flat ViT with adaptive per-image counts (``set_adaptive``) as a batch-1 ONNX
    graph: each stage's count is computed from the image's keep probabilities in the graph, so the
    file runs every image at its own count (dynamic token axes; batch 1 only)."""
    from .pruning import pruning_state

    if getattr(model, "spvit_plan", None) is None or pruning_state(model).adaptive is None:
        raise SpvitError("an adaptive export needs a pruned model with set_adaptive(model, AdaptiveCount(...))")
    return _export(model, RuntimeCounts(model), path, 1, False, opset)


def onnx_session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session configured as the profilers use it (no spinning, fixed threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_max_abs_diff(model: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Largest |ORT - torch| over ``images`` (eval mode), the check behind every export."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = model(images).float().cpu().numpy()
    model.train(was_training)
    out = onnx_session(path).run(None, {INPUT_NAME: images.cpu().numpy()})[0]
    return float(np.abs(out - ref).max())


def export_tflite(model: nn.Module, path: str | Path, *, batch_size: int = 1) -> Path:
    """Write ``model`` (eval mode, static shapes) to ``path`` as a LiteRT/TFLite flatbuffer.

    Needs the optional converter: ``pip install 'spvit-search[tflite]'`` (litert-torch).
    """
    try:
        import litert_torch
    except ImportError:
        raise SpvitError("TFLite export needs the optional converter: pip install 'spvit-search[tflite]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape(model))
    try:
        litert_torch.convert(model, (x,)).export(str(path))
    finally:
        model.train(was_training)
    return path


def tflite_runner(path: str | Path, threads: int = 1):
    """A LiteRT interpreter for ``path``: returns ``run(*arrays) -> first output``."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    inputs = [d["index"] for d in interpreter.get_input_details()]
    output = interpreter.get_output_details()[0]["index"]

    def run(*arrays):
        for index, array in zip(inputs, arrays, strict=True):
            interpreter.set_tensor(index, array)
        interpreter.invoke()
        return interpreter.get_tensor(output)

    return run


def verify_export(model: nn.Module, path: str | Path, data: str) -> dict:
    """Top-1 of torch and of the exported file on the test split of ``data``, and their agreement."""
    from torch.utils.data import DataLoader

    from .data import build_dataset

    path = Path(path)
    dataset = build_dataset(data, "test", model)
    model.eval()
    if path.suffix == ".tflite":
        run = tflite_runner(path)
    else:
        session = onnx_session(path)
        fixed_batch = session.get_inputs()[0].shape[0]
        # a switchable file (export_onnx_switchable) is checked at the model's own keep ratios
        plan = getattr(model, "spvit_plan", None)
        extra = {KEEP_NAME: np.asarray(plan.keep, np.float32)} if len(session.get_inputs()) == 2 and plan else {}

        def run(x):
            return session.run(None, {INPUT_NAME: x, **extra})[0]

    torch_top, export_top, labels, gaps = [], [], [], []
    batch = 1 if path.suffix == ".tflite" or isinstance(fixed_batch, int) else 100
    with torch.no_grad():
        for images, target in DataLoader(dataset, batch_size=batch):
            ref = model(images)
            out = torch.from_numpy(np.asarray(run(images.numpy())))
            torch_top.append(ref.argmax(dim=1))
            export_top.append(out.argmax(dim=1))
            gaps.append((out.float() - ref.float()).abs().amax(dim=1))
            labels.append(target)
    t, e, y, gap = torch.cat(torch_top), torch.cat(export_top), torch.cat(labels), torch.cat(gaps)
    # a near tie: the runtimes agree on every logit to 1e-4 and only break a tie between two
    # classes differently (seen on a barely trained model: 1 of 400 images)
    ties = int(((t != e) & (gap <= TIE_TOLERANCE)).sum())
    return {
        "images": len(y),
        "torch_acc": 100.0 * (t == y).float().mean().item(),
        "export_acc": 100.0 * (e == y).float().mean().item(),
        "agree": int((t == e).sum()),
        "ties": ties,
    }
