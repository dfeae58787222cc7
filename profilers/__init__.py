"""Ways of reaching a device to measure latency: one module per transport, one base class."""

from __future__ import annotations

from spvit_search.devices import DeviceConfig

from .base import Artifact, CheckItem, Job, LinkLostError, MeasureSettings, Profiler, ProfilerError
from .protocol import Timing, measure_interleaved


def make_profiler(device: DeviceConfig) -> Profiler:
    """The profiler for ``device``'s transport (imports only what that transport needs)."""
    if device.transport == "local":
        from .local import LocalProfiler

        return LocalProfiler(device)
    if device.transport == "ssh":
        from .ssh import SshProfiler

        return SshProfiler(device)
    if device.transport == "adb":
        from .adb import AdbProfiler

        return AdbProfiler(device)
    raise ProfilerError(f"no profiler for transport {device.transport!r}")


__all__ = [
    "Artifact",
    "CheckItem",
    "Job",
    "LinkLostError",
    "MeasureSettings",
    "Profiler",
    "ProfilerError",
    "Timing",
    "make_profiler",
    "measure_interleaved",
]
