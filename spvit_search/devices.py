"""The device registry: ``devices.yaml``, validated with pydantic, ``${ENV}`` references resolved.

A device is where latency is measured: this host (``local``, always available), an Android
phone over ADB, or a Linux/FPGA board over SSH. The file holds no secrets: keys are paths,
and any value may be a ``${VAR}`` reference resolved from the environment when the device is
used (so ``spvit-search devices`` lists entries whose variables are not set).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SpvitError

ENV_VAR = "SPVIT_DEVICES"
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_WORDS = ("password", "passphrase", "secret", "token")


class DeviceError(SpvitError):
    """A device that is unknown, misconfigured or cannot be reached."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SshConfig(_Strict):
    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str
    key: str | None = None  # private key path; None: the agent / default keys are not used
    known_hosts: str = "~/.ssh/known_hosts"  # host keys are always verified against this file
    timeout_s: float = Field(10.0, gt=0)


class AdbConfig(_Strict):
    serial: str  # "host:port" for ADB over TCP, the USB serial for USB
    connection: Literal["tcp", "usb"] = "tcp"
    key: str = "~/.android/adbkey"  # RSA private key; its .pub beside it
    timeout_s: float = Field(10.0, gt=0)
    push_timeout_s: float = Field(120.0, gt=0)


class ThermalConfig(_Strict):
    max_temp_c: float = 45.0  # start a round only below this CPU temperature
    cooldown_s: float = Field(20.0, ge=0)  # wait between checks while too hot
    max_wait_s: float = Field(600.0, ge=0)  # give up (error) after this long


_RUNTIMES = {"local": {"onnxruntime", "tflite"}, "adb": {"tflite", "onnxruntime"}, "ssh": {"onnxruntime", "command"}}


class DeviceConfig(_Strict):
    name: str
    transport: Literal["local", "adb", "ssh"]
    runtime: Literal["onnxruntime", "tflite", "command"] = "onnxruntime"
    description: str = ""
    threads: int = Field(1, ge=1)
    batch: int = Field(1, ge=1)
    affinity: str | None = None  # CPU mask in hex, e.g. "f0" (big cores of many phones)
    workdir: str | None = None  # where files go on the device
    benchmark_binary: str | None = None  # adb: benchmark_model or onnxruntime_perf_test on the device
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ssh + onnxruntime: execution providers
    python: str = "python3"  # ssh + onnxruntime: the board's interpreter for the runner
    command: str | None = None  # runtime "command": template with {model} {tokens} {threads}
    parser: Literal["xdputil", "benchmark_model", "onnxruntime_perf_test"] | None = None
    model_format: Literal["onnx", "tflite"] = "onnx"  # runtime "command": files pushed per token count
    ssh: SshConfig | None = None
    adb: AdbConfig | None = None
    thermal: ThermalConfig = ThermalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> DeviceConfig:
        allowed = sorted(_RUNTIMES[self.transport])
        if self.runtime not in allowed:
            raise ValueError(f"runtime {self.runtime!r} is not available over {self.transport}; use one of {allowed}")
        if self.transport == "ssh" and self.ssh is None:
            raise ValueError("transport 'ssh' needs an 'ssh:' section (host, user, key, known_hosts)")
        if self.transport == "adb" and self.adb is None:
            raise ValueError("transport 'adb' needs an 'adb:' section (serial, key)")
        if self.transport != "local" and not self.workdir:
            raise ValueError(f"transport {self.transport!r} needs 'workdir': where files go on the device")
        if self.runtime == "command" and (not self.command or not self.parser):
            raise ValueError("runtime 'command' needs 'command' (a template using {model}) and 'parser'")
        if self.runtime == "command" and "{model}" not in (self.command or ""):
            raise ValueError("the 'command' template must contain {model}")
        if self.transport == "adb" and not self.benchmark_binary:
            raise ValueError("transport 'adb' needs 'benchmark_binary': the benchmark tool's path on the phone")
        if self.affinity is not None:
            try:
                if int(self.affinity, 16) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"affinity must be a non-zero hex CPU mask like 'f0', got {self.affinity!r}") from None
        return self

    @property
    def cpus(self) -> list[int] | None:
        """CPU indices of the affinity mask, or None for no pinning."""
        if self.affinity is None:
            return None
        mask = int(self.affinity, 16)
        return [i for i in range(mask.bit_length()) if mask >> i & 1]


LOCAL = {"transport": "local", "runtime": "onnxruntime", "threads": 1, "description": "this host, onnxruntime CPU"}


def _find_secrets(data, where: str) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if any(word in str(key).lower() for word in _SECRET_WORDS):
                raise DeviceError(f"{where}: key {key!r} looks like a secret; devices.yaml holds key paths only")
            _find_secrets(value, f"{where}.{key}")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _find_secrets(value, f"{where}[{i}]")


def _resolve_refs(data, where: str, env: dict[str, str], field: str = ""):
    if isinstance(data, dict):
        return {k: _resolve_refs(v, where, env, f"{field}.{k}".lstrip(".")) for k, v in data.items()}
    if isinstance(data, list):
        return [_resolve_refs(v, where, env, f"{field}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str):

        def sub(match: re.Match) -> str:
            var = match.group(1)
            if var not in env:
                raise DeviceError(f"{where}, {field}: environment variable {var} is not set")
            return env[var]

        return _REF.sub(sub, data)
    return data


class DeviceRegistry:
    """The devices of one ``devices.yaml`` (plus the built-in ``local``)."""

    def __init__(self, raw: dict[str, dict], source: str) -> None:
        self._raw = {"local": dict(LOCAL), **raw}
        self.source = source

    @classmethod
    def load(cls, path: str | Path | None = None) -> DeviceRegistry:
        """From ``path``, else $SPVIT_DEVICES, else ./devices.yaml, else only ``local``."""
        if path is None:
            path = os.environ.get(ENV_VAR) or ("devices.yaml" if Path("devices.yaml").is_file() else None)
        if path is None:
            return cls({}, "built-in")
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise DeviceError(f"devices file {path} does not exist") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise DeviceError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise DeviceError(f"{path}: expected a mapping of device names to settings")
        _find_secrets(data, str(path))
        registry = cls(data, str(path))
        for name in data:  # validate the shape of every entry now; ${ENV} is resolved on use
            registry._validate(name, resolve=False)
        return registry

    @property
    def names(self) -> list[str]:
        return list(self._raw)

    def raw(self, name: str) -> dict:
        return self._raw[name]

    def get(self, name: str, env: dict[str, str] | None = None) -> DeviceConfig:
        if name not in self._raw:
            raise DeviceError(f"unknown device {name!r} in {self.source}; known: {', '.join(self._raw)}")
        return self._validate(name, resolve=True, env=env)

    def _validate(self, name: str, resolve: bool, env: dict[str, str] | None = None) -> DeviceConfig:
        where = f"{self.source}: device {name!r}"
        data = self._raw[name]
        if resolve:
            data = _resolve_refs(data, where, dict(os.environ) if env is None else env)
        else:
            data = _resolve_refs(data, where, _Placeholders())
        try:
            return DeviceConfig(name=name, **data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg'].removeprefix('Value error, ')}"
                for e in err.errors()
            )
            raise DeviceError(f"{where}: {problems}") from None
        except TypeError as err:
            raise DeviceError(f"{where}: {err}") from None


class _Placeholders(dict):
    """Stands in for the environment when only the shape of entries is validated."""

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key) -> str:
        return "22" if key.endswith("PORT") else f"<{key}>"


def expand_path(path: str) -> Path:
    return Path(os.path.expanduser(path))
