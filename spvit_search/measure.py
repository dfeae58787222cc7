"""End-to-end latency of whole (pruned) models on a device, with the profilers' protocol.

A model is exported in the device's runtime format (ONNX, or TFLite for LiteRT and
``benchmark_model``) and timed as one part with an image input; several models are measured
in one session, interleaved, so they share the device's state.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from torch import nn

from .blocks import InputSpec
from .devices import DeviceConfig
from .errors import SpvitError
from .export import export_onnx, export_tflite
from .models import input_shape


def _image_spec(model: nn.Module) -> tuple[InputSpec, ...]:
    return (InputSpec("image", input_shape(model), image=True),)


def onnx_inputs(path: Path) -> tuple[InputSpec, ...]:
    """Input specs of an ONNX file (the batch axis first; free dimensions are refused)."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as err:  # any unreadable file: say which and why
        raise SpvitError(f"{path} is not a readable ONNX model: {err}") from None
    initializers = {i.name for i in graph.initializer}
    specs = []
    for i in graph.input:
        if i.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        if any(d is None for d in dims[1:]):
            raise SpvitError(f"{path}: input {i.name!r} has free dimensions {dims}; export it with static shapes")
        specs.append(InputSpec(i.name, tuple(dims[1:]), image=True))
    return tuple(specs)


def measure_models(device: DeviceConfig, models: dict[str, nn.Module | Path], settings=None, on_round=None):
    """Timing of each model (or ONNX file) on ``device``, all interleaved in one session."""
    from profilers import Artifact, Job, MeasureSettings, make_profiler

    settings = settings or MeasureSettings()
    with make_profiler(device) as profiler, tempfile.TemporaryDirectory(prefix="spvit-measure-") as tmp:
        jobs = []
        for name, model in models.items():
            if isinstance(model, Path):
                if profiler.artifact_format != "onnx":
                    raise SpvitError(
                        f"device {device.name!r} runs {device.runtime}: it needs a model, not an ONNX file"
                    )
                files, inputs = {0: model}, onnx_inputs(model)
            elif profiler.artifact_format == "tflite":
                files, inputs = {0: export_tflite(model, Path(tmp) / f"{name}.tflite")}, _image_spec(model)
            else:
                files, inputs = {0: export_onnx(model, Path(tmp) / f"{name}.onnx")}, _image_spec(model)
            jobs.append(Job(Artifact(name, inputs, files, device.batch), (0,)))
        timings = profiler.measure(jobs, settings, on_round=on_round)
        version = profiler.runtime_version()
    return {name: timings[(name, 0)] for name in models}, version


def calibrate(device: DeviceConfig, model_name: str, root: str | Path = "latency_tables", count: int = 5,
              settings=None, checkpoint: str | None = None):  # fmt: skip
    """Measure ``calibration_plans`` end to end and store this model's calibration in the table."""
    from .models import create_model
    from .predictor import PlanLatency, calibration_plans
    from .pruning import prune

    base = create_model(model_name, checkpoint=checkpoint).eval()
    latency = PlanLatency.for_device(device, base, model_name, root=root)
    plans = calibration_plans(base, model_name, count)
    models = {}
    for i, plan in enumerate(plans):
        model = create_model(model_name, checkpoint=checkpoint).eval()
        # the dense plan too (nothing acts): a Swin then runs with exact-zero shift masks, as its
        # pruned plans do and as its measured parts do (pruning/swin.py, _exact_zero_mask)
        models[f"cal{i}"] = prune(model, plan)
    timings, version = measure_models(device, models, settings)
    measured = [(plan, timings[f"cal{i}"].median_ms) for i, plan in enumerate(plans)]
    calibration = latency.add_calibration_points(measured, replace=True)
    return latency, measured, calibration, version
