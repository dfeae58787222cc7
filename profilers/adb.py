"""An Android phone over ADB (adb-shell): push, stock benchmark tool under taskset, parse.

* Transport: TCP (``host:port``) or USB (``adb-shell[usb]``), authenticated with the RSA key
  from ``~/.android/adbkey`` (or the configured path). adb-shell's TCP transport leaves Nagle
  on, which stalls every small ADB packet behind delayed ACKs; ours sets ``TCP_NODELAY``, and
  packet checksums are summed by numpy (see ``numpy_checksum``).
* Runtime ``tflite``: stock ``benchmark_model``, one ``.tflite`` per token count (static
  shapes). Runtime ``onnxruntime``: stock ``onnxruntime_perf_test`` on one dynamic-token
  ONNX per part (``-f tokens:N``). Both under ``taskset MASK`` with ``--num_threads`` /
  ``-x`` threads, a round of invocations per shell round trip, exit codes echoed (the legacy
  shell service reports none).
* A thermal gate before each round reads ``dumpsys thermalservice`` and waits while the CPU
  is hotter than the configured limit; governor, frequencies and temperatures are recorded.
* Pushed files are removed when the profiler closes.
"""

from __future__ import annotations

import hashlib
import shlex
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from adb_shell import adb_message
from adb_shell import constants as adb_constants
from adb_shell import exceptions as adb_errors
from adb_shell.adb_device import AdbDevice
from adb_shell.auth.sign_pythonrsa import PythonRSASigner
from adb_shell.transport.tcp_transport import TcpTransport

from spvit_search.devices import expand_path

from .base import Job, LinkLostError, MeasureSettings, ProfilerError, RemoteProfiler
from .parsers import (
    ParseError,
    cpu_temperature,
    parse_benchmark_model,
    parse_onnxruntime_perf_test,
    parse_thermalservice,
)
from .protocol import Timing
from .toolrun import ToolCall, run_tool_rounds

_ADB_ERRORS = (
    OSError, EOFError, adb_errors.AdbConnectionError, adb_errors.AdbTimeoutError, adb_errors.TcpTimeoutException,
    adb_errors.InvalidResponseError, adb_errors.InvalidCommandError, adb_errors.InvalidChecksumError,
    adb_errors.PushFailedError, adb_errors.UsbReadFailedError, adb_errors.UsbWriteFailedError,
)  # fmt: skip


# errors of the link itself (as opposed to a device answering FAIL): the connection is gone
_LINK_ERRORS = (OSError, EOFError, adb_errors.AdbConnectionError, adb_errors.TcpTimeoutException,
                adb_errors.UsbReadFailedError, adb_errors.UsbWriteFailedError)  # fmt: skip


_PURE_PYTHON_CHECKSUM = adb_message.checksum


def numpy_checksum(data) -> int:
    """ADB's message checksum (the byte sum), as adb-shell computes it, in C speed.

    adb-shell announces protocol 0x01000000, so every payload carries a checksum that the
    device verifies; its pure-Python ``sum()`` over each 192 KB sync packet caps a push near
    200 MB/s on a loopback link. Same value, ~14x faster.
    """
    if not isinstance(data, (bytes, bytearray)):
        return _PURE_PYTHON_CHECKSUM(data)
    return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


adb_message.checksum = numpy_checksum  # AdbMessage.checksum looks the function up at call time


class NoDelayTcpTransport(TcpTransport):
    """adb-shell's TCP transport with Nagle's algorithm off (as the official adb client does)."""

    def connect(self, transport_timeout_s):
        super().connect(transport_timeout_s)
        self._connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def bulk_read(self, numbytes, transport_timeout_s):
        """End of stream is an error, not "no data yet": adb-shell's TCP transport returns ``b''``
        when the device closes the link, and its reader then polls a readable, empty socket at
        100% CPU until its read timeout (300 s seen with adbd killed mid-profile)."""
        data = super().bulk_read(numbytes, transport_timeout_s)
        if not data and numbytes:
            raise ConnectionResetError(f"{self._host}:{self._port} closed the connection (end of stream)")
        return data


class FullPayloadAdbDevice(AdbDevice):
    """adb-shell's device with sync data chunks that fill the device's announced payload.

    adb-shell sends file data in chunks of half the maximum payload, one chunk per message, and
    waits for the device's OKAY after each: on an old device (4096-byte payload) that is 2 KB
    per round trip where the official client sends 4 KB (a push measured 0.59x the official
    client's throughput). A chunk of ``payload - 9`` bytes plus its 8-byte sync header fills one
    message (adb-shell flushes when the buffer would reach the payload). Devices with large
    payloads keep adb-shell's 64 KB chunks.
    """

    @property
    def max_chunk_size(self):
        return max(1, min(adb_constants.MAX_CHUNK_SIZE, self._maxdata - 9))


def load_signer(key_path: str) -> PythonRSASigner:
    path = expand_path(key_path)
    if not path.is_file() or not Path(f"{path}.pub").is_file():
        raise ProfilerError(
            f"ADB key {path} (and {path}.pub) not found: run `adb keygen {path}` once, or set adb.key in devices.yaml"
        )
    return PythonRSASigner.FromRSAKeyPath(str(path))


def open_device(serial: str, connection: str, timeout_s: float) -> AdbDevice:
    if connection == "usb":
        try:
            from adb_shell.adb_device import AdbDeviceUsb

            return AdbDeviceUsb(serial=serial, default_transport_timeout_s=timeout_s)
        except adb_errors.InvalidTransportError as err:
            raise ProfilerError(f"ADB over USB needs: pip install 'adb-shell[usb]' ({err})") from None
    host, _, port = serial.rpartition(":")
    if not host or not port.isdigit():
        host, port = serial, "5555"
    return FullPayloadAdbDevice(NoDelayTcpTransport(host, int(port)), default_transport_timeout_s=timeout_s)


class AdbProfiler(RemoteProfiler):
    chunk_points = 8

    def __init__(self, device) -> None:
        super().__init__(device)
        self.cfg = device.adb
        self.artifact_format = "tflite" if device.runtime == "tflite" else "onnx"
        self.dynamic_tokens = device.runtime == "onnxruntime"
        self.workdir = device.workdir
        self.adb: AdbDevice | None = None
        self._facts: dict | None = None

    def where(self) -> str:
        return f"device {self.device.name!r} (adb {self.cfg.serial})"

    def open(self) -> None:
        signer = load_signer(self.cfg.key)
        self.adb = open_device(self.cfg.serial, self.cfg.connection, self.cfg.timeout_s)
        try:
            self.adb.connect(rsa_keys=[signer], transport_timeout_s=self.cfg.timeout_s,
                             auth_timeout_s=self.cfg.timeout_s, read_timeout_s=self.cfg.timeout_s)  # fmt: skip
        except adb_errors.DeviceAuthError as err:
            raise ProfilerError(f"{self.where()}: the phone refused key {self.cfg.key}: {err}") from None
        except _ADB_ERRORS as err:
            raise LinkLostError(
                f"{self.where()}: cannot connect ({err or type(err).__name__}); if the phone shows an "
                "'Allow USB debugging' prompt, accept it and retry"
            ) from None
        self.shell(f"mkdir -p {shlex.quote(self._path('parts'))}", "creating the work folder")

    def close(self) -> None:
        if self.adb is None:
            return
        try:
            if self.adb.available:
                self.shell(f"rm -rf {shlex.quote(self._path('parts'))}", "cleaning up")
        except ProfilerError:
            pass
        finally:
            self.adb.close()
            self.adb = None

    def shell(self, command: str, doing: str, timeout_s: float | None = None) -> str:
        if self.adb is None or not self.adb.available:
            raise ProfilerError(f"{self.where()}: not connected ({doing})")
        if len(f"shell:{command}".encode()) + 1 > self._max_payload():
            command = self._as_script(command, doing)
        try:
            return self.adb.shell(command, read_timeout_s=timeout_s or max(self.cfg.timeout_s, 300.0))
        except _ADB_ERRORS as err:
            raise LinkLostError(f"{self.where()}: connection lost while {doing}: {err or type(err).__name__}") from None

    def _max_payload(self) -> int:
        """The largest message the device accepts, as it announced in CNXN (4096 on old adbd):
        a longer one makes adbd drop the connection. adb-shell keeps it, without a public name."""
        return int(getattr(self.adb, "_maxdata", 4096) or 4096)

    def _as_script(self, command: str, doing: str) -> str:
        """A command too long for one message, pushed as a script (sync splits it into messages
        the device accepts) and run by a short one."""
        digest = hashlib.sha1(command.encode()).hexdigest()[:12]
        remote = self._path("parts", f"cmd-{digest}.sh")
        with tempfile.TemporaryDirectory(prefix="spvit-adb-") as tmp:
            script = Path(tmp) / "cmd.sh"
            script.write_text(command + "\n")
            try:
                self.adb.push(str(script), remote, read_timeout_s=self.cfg.push_timeout_s,
                              transport_timeout_s=self.cfg.push_timeout_s)  # fmt: skip
            except _ADB_ERRORS as err:
                raise LinkLostError(f"{self.where()}: connection lost while {doing} (pushing the "
                                    f"{len(command)}-byte command as a script): {err}") from None  # fmt: skip
        return f"sh {shlex.quote(remote)}"

    def upload(self, local: Path, remote: str) -> None:
        try:
            self.adb.push(str(local), remote, read_timeout_s=self.cfg.push_timeout_s,
                          transport_timeout_s=self.cfg.push_timeout_s)  # fmt: skip
        except _ADB_ERRORS as err:
            gone = isinstance(err, _LINK_ERRORS)
            error, lost = (LinkLostError, "connection lost while ") if gone else (ProfilerError, "")
            raise error(f"{self.where()}: {lost}pushing {local.name} to {remote} failed: {err}") from None

    # -- facts ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        marker = "@@spvit-thermal"
        out = self.shell(
            "echo model=$(getprop ro.product.model); echo soc=$(getprop ro.soc.model); "
            "echo platform=$(getprop ro.board.platform); echo android=$(getprop ro.build.version.release); "
            "echo cores=$(nproc 2>/dev/null); "
            "echo governor=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null); "
            "echo freqs=$(cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq 2>/dev/null); "
            f"echo maxfreqs=$(cat /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq 2>/dev/null); echo {marker}; "
            "dumpsys thermalservice 2>/dev/null",
            "describing the phone",
        )  # fmt: skip
        head, _, thermal = out.partition(marker)
        kv = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
        facts = {
            "model": kv.get("model", "").strip() or "unknown",
            "soc": (kv.get("soc", "").strip() or kv.get("platform", "").strip()) or "unknown",
            "android": kv.get("android", "").strip(),
            "cores": int(kv["cores"]) if kv.get("cores", "").strip().isdigit() else None,
            "governor": kv.get("governor", "").strip() or "unknown",
            "frequencies_khz": [int(f) for f in kv.get("freqs", "").split() if f.isdigit()] or None,
            "max_frequencies_khz": [int(f) for f in kv.get("maxfreqs", "").split() if f.isdigit()] or None,
            "affinity": self.device.affinity or "all cores",
            "runtime": self.runtime_version(),
        }
        try:
            facts["temperature_c"] = cpu_temperature(parse_thermalservice(thermal))
        except ParseError:
            facts["temperature_c"] = None
        self._facts = facts
        return facts

    def runtime_version(self) -> str:
        binary = self.device.benchmark_binary
        tool = "benchmark_model" if self.device.runtime == "tflite" else "onnxruntime_perf_test"
        out = self.shell(f"ls -l {shlex.quote(binary)} 2>&1; echo @@rc $?", "looking for the benchmark tool")
        if "@@rc 0" not in out:
            raise ProfilerError(f"{self.where()}: benchmark tool {binary} not found on the phone: {out.strip()[:200]}")
        return f"{tool} ({binary})"

    def _temperature(self) -> float | None:
        try:
            return cpu_temperature(parse_thermalservice(self.shell("dumpsys thermalservice", "reading temperatures")))
        except ParseError:
            return None

    def thermal_gate(self, _round: int = 0) -> None:
        """Wait while the CPU is hotter than the limit; give up after ``max_wait_s``."""
        limit = self.device.thermal
        deadline = time.monotonic() + limit.max_wait_s
        while True:
            temp = self._temperature()
            if temp is None or temp <= limit.max_temp_c:
                return
            if time.monotonic() >= deadline:
                raise ProfilerError(
                    f"{self.where()}: CPU still at {temp:.1f} °C after {limit.max_wait_s:.0f} s of cooldown "
                    f"(limit {limit.max_temp_c:.1f} °C)"
                )
            time.sleep(limit.cooldown_s)

    # -- measuring ------------------------------------------------------------------------------
    def _command(self, remote: str, tokens: int | None, settings: MeasureSettings) -> str:
        binary = shlex.quote(self.device.benchmark_binary)
        threads = self.device.threads
        if self.device.runtime == "tflite":
            args = [f"--graph={remote}", f"--num_threads={threads}", f"--num_runs={settings.runs}",
                    f"--warmup_runs={settings.warmup}"]  # fmt: skip
        else:
            args = ["-e", "cpu", "-m", "times", "-r", str(settings.runs), "-x", str(threads), "-I"]
            if tokens is not None:  # a free token axis: fix it for this run
                args += ["-f", f"tokens:{tokens}"]
            args.append(remote)
        command = f"{binary} {' '.join(shlex.quote(a) for a in args)}"
        if self.device.affinity:
            command = f"taskset {shlex.quote(self.device.affinity)} {command}"
        return command

    def measure(self, jobs: list[Job], settings: MeasureSettings, on_round=None) -> dict[tuple[str, int], Timing]:
        remote = self.upload_parts(jobs)
        parse = parse_benchmark_model if self.device.runtime == "tflite" else parse_onnxruntime_perf_test
        calls = []  # commands name files relative to the work folder: an OPEN payload is size-limited
        for job in jobs:
            for sig, n in job.points():
                local = job.artifact.file_for(n)
                calls.append(
                    ToolCall(
                        (sig, n),
                        self._command(f"parts/{local.name}", n if job.artifact.dynamic else None, settings),
                        remote[local],
                        parse,
                    )
                )
        return run_tool_rounds(
            calls, settings.rounds, lambda script: self.shell(script, "running a round of benchmarks"),
            self.workdir, self.where(), settings.seed, before_round=self.thermal_gate, on_round=on_round,
        )  # fmt: skip
