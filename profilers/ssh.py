"""A Linux or FPGA board over SSH (paramiko): SFTP, the board runner, or a command + parser.

Host keys are always verified against the configured known_hosts file (an unknown or changed
key is refused, never added); authentication is by key file only. Every remote path and
argument is quoted for the board's POSIX shell. A round trip costs ~0.1 s, so work is batched:
``onnxruntime`` sends one job per chunk of parts to ``board_runner.py``; ``command`` sends one
shell script per round.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import time
from pathlib import Path

import paramiko

from spvit_search.devices import expand_path

from .base import Job, LinkLostError, MeasureSettings, ProfilerError, RemoteProfiler
from .parsers import PARSERS
from .protocol import Timing
from .toolrun import ToolCall, run_tool_rounds

_HERE = Path(__file__).parent
RUNNER_FILES = ("board_runner.py", "protocol.py")
RESULT = "@@result "


class SshProfiler(RemoteProfiler):
    chunk_points = 16

    def __init__(self, device) -> None:
        super().__init__(device)
        self.cfg = device.ssh
        self.artifact_format = device.model_format if device.runtime == "command" else "onnx"
        self.dynamic_tokens = device.runtime == "onnxruntime"
        self.workdir = device.workdir.removeprefix("~/")  # SFTP and exec both start in the home folder
        self.client: paramiko.SSHClient | None = None
        self.sftp: paramiko.SFTPClient | None = None
        self._facts: dict | None = None

    def where(self) -> str:
        return f"device {self.device.name!r} (ssh {self.cfg.user}@{self.cfg.host}:{self.cfg.port})"

    # -- connection -----------------------------------------------------------------------------
    def open(self) -> None:
        known = expand_path(self.cfg.known_hosts)
        if not known.is_file():
            raise ProfilerError(
                f"{self.where()}: known_hosts file {known} does not exist; host keys are always verified"
            )
        client = paramiko.SSHClient()
        client.load_host_keys(str(known))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key = str(expand_path(self.cfg.key)) if self.cfg.key else None
        if key is not None and not Path(key).is_file():
            raise ProfilerError(f"{self.where()}: private key {key} does not exist")
        try:
            client.connect(
                self.cfg.host, port=self.cfg.port, username=self.cfg.user, key_filename=key,
                look_for_keys=False, allow_agent=False, timeout=self.cfg.timeout_s,
                banner_timeout=self.cfg.timeout_s, auth_timeout=self.cfg.timeout_s,
            )  # fmt: skip
        except paramiko.BadHostKeyException as err:
            raise ProfilerError(
                f"{self.where()}: the host key ({err.key.get_name()}) differs from the one in {known}; "
                "refusing to connect (it changed, or someone is in between)"
            ) from None
        except paramiko.AuthenticationException as err:
            raise ProfilerError(f"{self.where()}: authentication with key {key} failed: {err}") from None
        except paramiko.SSHException as err:
            if "known_hosts" in str(err):
                hostspec = self.cfg.host if self.cfg.port == 22 else f"[{self.cfg.host}]:{self.cfg.port}"
                raise ProfilerError(
                    f"{self.where()}: host key of {hostspec} is not in {known}; refusing an unverified host. "
                    f"Check its fingerprint, then add it: ssh-keyscan -p {self.cfg.port} {self.cfg.host} >> {known}"
                ) from None
            raise ProfilerError(f"{self.where()}: SSH failed: {err}") from None
        except (OSError, EOFError) as err:
            raise LinkLostError(f"{self.where()}: cannot connect: {err}") from None
        self.client = client
        self.sftp = client.open_sftp()
        self._run(f"mkdir -p {shlex.quote(self._path('parts'))}", "creating the work folder")
        if self.device.runtime == "onnxruntime":
            for name in RUNNER_FILES:
                self.upload(_HERE / name, self._path(name))

    def close(self) -> None:
        try:
            if self.client is not None and self.client.get_transport() and self.client.get_transport().is_active():
                self._run(f"rm -rf {shlex.quote(self._path('parts'))}", "cleaning up")
        except ProfilerError:
            pass
        finally:
            if self.sftp is not None:
                self.sftp.close()
            if self.client is not None:
                self.client.close()
            self.client = self.sftp = None

    def upload(self, local: Path, remote: str) -> None:
        try:
            self.sftp.put(str(local), remote)
        except (OSError, EOFError, paramiko.SSHException) as err:
            transport = self.client.get_transport() if self.client is not None else None
            gone = transport is None or not transport.is_active()
            error = LinkLostError if gone else ProfilerError
            lost = "connection lost while " if gone else ""
            raise error(f"{self.where()}: {lost}copying {local.name} to {remote} failed: {err}") from None

    def _run(self, command: str, doing: str, on_line=None, timeout: float | None = None) -> tuple[int, str]:
        """Run ``command`` (already quoted) in the board's shell; stdout+stderr and exit code."""
        if self.client is None:
            raise ProfilerError(f"{self.where()}: not connected")
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise LinkLostError(f"{self.where()}: connection lost before {doing}")
        lines: list[str] = []
        try:
            channel = transport.open_session(timeout=self.cfg.timeout_s)
            channel.set_combine_stderr(True)
            channel.settimeout(timeout)
            channel.exec_command(command)
            buffer = b""
            while True:
                chunk = channel.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace")
                    lines.append(line)
                    if on_line is not None:
                        on_line(line)
            if buffer:
                lines.append(buffer.decode(errors="replace"))
            if not channel.exit_status_ready() and not transport.is_active():
                raise EOFError("connection closed")
            rc = channel.recv_exit_status()
        except (TimeoutError, OSError, EOFError, paramiko.SSHException) as err:
            raise LinkLostError(f"{self.where()}: connection lost while {doing}: {err or type(err).__name__}") from None
        if rc == -1:
            raise LinkLostError(f"{self.where()}: connection lost while {doing} (no exit status)")
        return rc, "\n".join(lines)

    # -- facts ----------------------------------------------------------------------------------
    def describe(self) -> dict:
        if self.device.runtime == "onnxruntime":
            facts = self._runner_result([self.device.python, self._path("board_runner.py"), "--describe"],
                                        "describing the board")  # fmt: skip
        else:
            facts = self._shell_facts()
        facts["affinity"] = self.device.affinity or "all cores"
        self._facts = facts
        return facts

    def _shell_facts(self) -> dict:
        script = (
            "echo model=$(cat /proc/device-tree/model 2>/dev/null | tr -d '\\0' || hostname); "
            "echo cpu=$(grep -m1 -E '^(model name|Hardware)' /proc/cpuinfo | cut -d: -f2); "
            "echo cores=$(nproc 2>/dev/null); "
            "echo governor=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null); "
            "echo temps=$(cat /sys/class/thermal/thermal_zone*/temp 2>/dev/null)"
        )
        _, out = self._run(script, "describing the board")
        kv = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        temps = [int(t) / 1000 for t in kv.get("temps", "").split() if t.lstrip("-").isdigit()]
        return {
            "model": kv.get("model", "").strip() or "unknown",
            "cpu": kv.get("cpu", "").strip() or "unknown",
            "cores": int(kv["cores"]) if kv.get("cores", "").isdigit() else None,
            "governor": kv.get("governor", "").strip() or "unknown (no cpufreq)",
            "temperature_c": max(temps) if temps else None,
            "runtime": f"command: {self.device.command.split()[0]}",
        }

    def runtime_version(self) -> str:
        facts = self._facts or self.describe()
        if "runtime_error" in facts:
            raise ProfilerError(f"{self.where()}: {facts['runtime_error']}")
        return facts["runtime"]

    def _runner_result(self, argv: list[str], doing: str, on_round=None) -> dict:
        command = f"cd {shlex.quote(self.workdir)} && " + " ".join(shlex.quote(a) for a in argv)
        result_line: list[str] = []

        def on_line(line: str) -> None:
            if line.startswith(RESULT):
                result_line.append(line[len(RESULT) :])
            elif line.startswith("@@round ") and on_round is not None:
                on_round(int(line.split()[1]))

        rc, out = self._run(command, doing, on_line)
        if not result_line:
            raise ProfilerError(f"{self.where()}: `{command}` exited with {rc} and printed no result: {out[-400:]}")
        try:
            result = json.loads(result_line[-1])
        except json.JSONDecodeError as err:
            raise ProfilerError(f"{self.where()}: garbled result from `{command}`: {err}") from None
        if "error" in result:
            raise ProfilerError(f"{self.where()}: the board runner failed while {doing}: {result['error']}")
        return result

    # -- measuring ------------------------------------------------------------------------------
    def measure(self, jobs: list[Job], settings: MeasureSettings, on_round=None) -> dict[tuple[str, int], Timing]:
        remote = self.upload_parts(jobs)
        if self.device.runtime == "command":
            return self._measure_command(jobs, remote, settings, on_round)
        items = [
            {"key": f"{sig}|{n}", "model": posixpath.relpath(remote[job.artifact.file_for(n)], self.workdir),
             "inputs": [{"name": s.name, "shape": list(shape)}
                        for s, shape in zip(job.artifact.inputs, job.artifact.shapes(n), strict=True)]}
            for job in jobs for sig, n in job.points()
        ]  # fmt: skip
        spec = {"threads": self.device.threads, "providers": list(self.device.providers), "cpus": self.device.cpus,
                "warmup": settings.warmup, "rounds": settings.rounds, "runs": settings.runs, "seed": settings.seed,
                "items": items}  # fmt: skip
        job_file = Path(self._local_tmp()) / "job.json"
        job_file.write_text(json.dumps(spec))
        self.upload(job_file, self._path("parts", "job.json"))
        start = time.perf_counter()
        result = self._runner_result(
            [self.device.python, "board_runner.py", posixpath.join("parts", "job.json")],
            f"measuring {len(items)} points", on_round,
        )  # fmt: skip
        self.last_seconds = time.perf_counter() - start
        out = {}
        for key, t in result["timings"].items():
            sig, n = key.rsplit("|", 1)
            out[(sig, int(n))] = Timing(**t)
        return out

    def _local_tmp(self) -> str:
        import tempfile

        if not hasattr(self, "_tmpdir"):
            self._tmpdir = tempfile.TemporaryDirectory(prefix="spvit-ssh-")
        return self._tmpdir.name

    def _measure_command(self, jobs, remote, settings, on_round) -> dict[tuple[str, int], Timing]:
        parser = PARSERS[self.device.parser]
        threads = self.device.threads
        parse = (lambda text: parser(text, threads=threads)) if self.device.parser == "xdputil" else parser
        calls = []
        for job in jobs:
            for sig, n in job.points():
                path = remote[job.artifact.file_for(n)]
                command = self.device.command.format(
                    model=shlex.quote(posixpath.relpath(path, self.workdir)), tokens=n, threads=threads
                )
                calls.append(ToolCall((sig, n), command, path, parse))
        return run_tool_rounds(
            calls, settings.rounds, lambda script: self._run(f"sh -c {shlex.quote(script)}", "running a round")[1],
            self.workdir, self.where(), settings.seed, on_round=on_round,
        )  # fmt: skip
