"""What every profiler provides: one base class, one module per way of reaching a device.

A profiler measures exported parts (:class:`Artifact`) at given token counts on its device
with the protocol of :mod:`profilers.protocol`, and describes the device for the table's
metadata. Errors that the user can act on (unreachable device, refused host key, a tool that
failed or printed garbage) are :class:`ProfilerError` and name the device, file and command.
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spvit_search.blocks import InputSpec
from spvit_search.devices import DeviceConfig
from spvit_search.errors import SpvitError

from .protocol import Timing

if TYPE_CHECKING:
    import numpy as np


class ProfilerError(SpvitError):
    """Measuring on a device failed; the message says on which device, with what, and why."""


class LinkLostError(ProfilerError):
    """The link to the device went away or never came up (a dropped connection, a device that does
    not answer): unlike a missing tool or garbled output, running the command again can resume."""


@dataclass(frozen=True)
class MeasureSettings:
    warmup: int = 3
    rounds: int = 10
    runs: int = 10
    seed: int = 0


@dataclass(frozen=True)
class Artifact:
    """An exported part: one file with a free token axis (key None) or one file per token count."""

    signature: str
    inputs: tuple[InputSpec, ...]
    files: dict[int | None, Path]
    batch: int = 1

    @property
    def dynamic(self) -> bool:
        return None in self.files

    def file_for(self, tokens: int) -> Path:
        return self.files.get(tokens) or self.files[None]

    def shapes(self, tokens: int) -> list[tuple[int, ...]]:
        return [spec.shape(self.batch, tokens) for spec in self.inputs]


@dataclass(frozen=True)
class Job:
    """Token counts of one artifact to measure."""

    artifact: Artifact
    tokens: tuple[int, ...]

    def points(self) -> list[tuple[str, int]]:
        return [(self.artifact.signature, n) for n in self.tokens]


@dataclass(frozen=True)
class CheckItem:
    what: str
    ok: bool
    detail: str


class Profiler(ABC):
    """Measures parts on one device. Use as a context manager: ``with make_profiler(dev) as p:``."""

    #: file format of the artifacts this profiler runs: "onnx" or "tflite"
    artifact_format: str = "onnx"
    #: whether one file with a free token axis serves every token count
    dynamic_tokens: bool = True
    #: points measured together (interleaved) before their rows are written: larger chunks
    #: spread each point's rounds over more time, smaller ones lose less to a dropped link
    chunk_points: int = 16

    def __init__(self, device: DeviceConfig) -> None:
        self.device = device

    def open(self) -> None:  # noqa: B027 - optional hook
        """Connect (remote profilers); local ones need nothing."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect and clean up what was put on the device."""

    def __enter__(self) -> Profiler:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def runtime_version(self) -> str:
        """Name and version of the runtime that times the parts, as the device reports it."""

    @abstractmethod
    def describe(self) -> dict:
        """Facts about the device for the table's metadata (model, CPU, governor, temperatures …)."""

    @abstractmethod
    def measure(
        self,
        jobs: list[Job],
        settings: MeasureSettings,
        on_round: Callable[[int], None] | None = None,
    ) -> dict[tuple[str, int], Timing]:
        """Timing per (signature, token count) of every job, all interleaved in each round."""

    def measure_images(self, files: dict[str, Path], images: np.ndarray, repeats: int = 3,
                       warmup: int = 10) -> dict[str, np.ndarray]:  # fmt: skip
        """Each image's latency (ms, median of ``repeats``) through each single-input ONNX file,
        the files alternating image by image: for files whose work depends on the image (per-image
        token counts), where one generated input says nothing of the distribution."""
        raise ProfilerError(f"{self.where()}: per-image latency is measured on the local device only "
                            "(the board runners and phone tools time one generated input per file)")  # fmt: skip

    def check(self) -> list[CheckItem]:
        """Reachability, runtime presence and versions, CPU and thermal state."""
        items = []
        try:
            items.append(CheckItem("runtime", True, self.runtime_version()))
            facts = self.describe()
            for key in ("model", "cpu", "cores", "governor", "affinity", "temperature_c"):
                if key in facts:
                    items.append(CheckItem(key, True, str(facts[key])))
        except SpvitError as err:
            items.append(CheckItem("device", False, str(err)))
        return items

    def where(self) -> str:
        return f"device {self.device.name!r} ({self.device.transport})"


class RemoteProfiler(Profiler):
    """A profiler that copies part files into a work folder on the device before timing them."""

    workdir: str

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.workdir, *parts)

    @abstractmethod
    def upload(self, local: Path, remote: str) -> None:
        """Copy one file to ``remote`` on the device; failures are ProfilerErrors naming the file."""

    def upload_parts(self, jobs: list[Job]) -> dict[Path, str]:
        """Every distinct part file of ``jobs`` copied once into ``parts/``: local -> remote path."""
        remote: dict[Path, str] = {}
        for job in jobs:
            for n in job.tokens:
                local = job.artifact.file_for(n)
                if local not in remote:
                    remote[local] = self._path("parts", local.name)
                    self.upload(local, remote[local])
        return remote
