"""Profiling a phone over ADB, against a device endpoint that speaks the real ADB wire protocol.

The same endpoint is driven by the official ``adb`` client (Debian's package) to prove it is a
real peer: if only our client understood it, these tests would prove nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from adb_shell.auth.keygen import keygen
from click.testing import CliRunner
from peers import standin_tools
from peers.adbd import LoopbackAdbd
from peers.net import CuttableProxy, free_port

from profilers import ProfilerError, make_profiler
from spvit_search.cli import main
from spvit_search.devices import DeviceRegistry
from spvit_search.latency import COLUMNS, LatencyTable

MODEL = "deit_tiny_patch16_224"
FAST = ["--rounds", "2", "--runs", "3"]
NASTY = "phone dir $(touch pwned); 'q'"


@pytest.fixture(scope="module")
def adb_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adbkey") / "adbkey"
    keygen(str(path))
    return path


def _phone(tmp_path: Path, adb_key: Path, *, env=None, runtime="onnxruntime", accept_new_keys=False,
           legacy=False, **entry):  # fmt: skip
    bin_dir = standin_tools.install(tmp_path / "phone-bin")
    device = LoopbackAdbd(
        tmp_path, bin_dir, authorized_keys=[Path(f"{adb_key}.pub").read_text()], accept_new_keys=accept_new_keys,
        env=env, legacy=legacy,
    )  # fmt: skip
    tool = "benchmark_model" if runtime == "tflite" else "onnxruntime_perf_test"
    port = entry.pop("port", device.port)
    spec = {
        "transport": "adb", "runtime": runtime, "threads": 1, "affinity": "1", "workdir": str(tmp_path / NASTY),
        "benchmark_binary": str(bin_dir / tool),
        "adb": {"serial": f"127.0.0.1:{port}", "key": str(adb_key), "timeout_s": 10},
        "thermal": {"max_temp_c": 45, "cooldown_s": 0.2, "max_wait_s": 1},
        **entry,
    }  # fmt: skip
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({"phone": spec}))
    return device, path


def _profile(devices: Path, out: Path, *extra: str):
    args = ["profile", "--device", "phone", "--model", MODEL, "--out", str(out), "--devices", str(devices)]
    return CliRunner().invoke(main, [*args, *FAST, *extra])


def test_profile_over_adb_gives_a_table_of_the_local_schema(tmp_path, adb_key):
    device, devices = _phone(tmp_path, adb_key)
    result = _profile(devices, tmp_path / "tables")
    assert result.exit_code == 0, result.output
    phone = LatencyTable.open(tmp_path / "tables" / "phone" / "onnxruntime-t1-b1.csv")
    local = CliRunner().invoke(main, ["profile", "--model", MODEL, "--out", str(tmp_path / "tables"), *FAST])
    assert local.exit_code == 0, local.output
    here = LatencyTable.open(tmp_path / "tables" / "local" / "onnxruntime-t1-b1.csv")
    assert list(phone.rows.columns) == list(COLUMNS)
    assert set(zip(phone.rows.signature, phone.rows.tokens, strict=True)) == set(
        zip(here.rows.signature, here.rows.tokens, strict=True)
    )
    assert (phone.rows.median_ms > 0).all() and (phone.rows.runs == 2 * 3).all()
    facts = phone.meta["sessions"][-1]["device_before"]
    assert facts["model"] == "Loopback Phone" and facts["temperature_c"] == pytest.approx(42.1)
    workdir = tmp_path / NASTY
    assert workdir.is_dir() and not (workdir / "parts").exists()  # pushed files were cleaned up
    assert not list(tmp_path.rglob("pwned*"))
    device.close()


def test_tflite_runtime_with_benchmark_model(tmp_path, adb_key):
    device, devices = _phone(tmp_path, adb_key, runtime="tflite")
    result = _profile(devices, tmp_path / "tables", "--methods", "evit", "--tokens", "70,197")
    assert result.exit_code == 0, result.output
    table = LatencyTable.open(tmp_path / "tables" / "phone" / "tflite-t1-b1.csv")
    assert len(table.rows) == 1 + 2 + 2 + 2 and (table.rows.runtime == "tflite").all()
    assert table.rows.runtime_version.iloc[0].startswith("benchmark_model")
    device.close()


def test_garbled_output_names_device_command_and_file(tmp_path, adb_key):
    device, devices = _phone(tmp_path, adb_key, env={"SPVIT_STANDIN_GARBLE": "1"})
    result = _profile(devices, tmp_path / "tables")
    assert result.exit_code == 2
    assert "device 'phone' (adb 127.0.0.1:" in result.output
    assert "onnxruntime_perf_test" in result.output and ".onnx" in result.output
    assert "no 'Average inference time cost' line" in result.output
    device.close()


def test_missing_benchmark_tool_is_reported(tmp_path, adb_key):
    device, devices = _phone(tmp_path, adb_key, benchmark_binary="/data/local/tmp/no such tool")
    result = _profile(devices, tmp_path / "tables")
    assert result.exit_code == 2
    assert "benchmark tool /data/local/tmp/no such tool not found on the phone" in result.output
    # rerunning cannot help a missing tool: no resume hint, the cause to fix instead
    assert "again to resume" not in result.output and "fix the cause above" in result.output
    device.close()


def test_thermal_gate_waits_then_gives_up(tmp_path, adb_key):
    temp = tmp_path / "cpu_temp"
    temp.write_text("60.0")
    device, devices = _phone(tmp_path, adb_key, env={"SPVIT_STANDIN_CPU_TEMP": str(temp)})
    dev = DeviceRegistry.load(devices).get("phone")
    with make_profiler(dev) as profiler:
        with pytest.raises(ProfilerError, match=r"CPU still at 60\.6 °C after 1 s of cooldown \(limit 45\.0 °C\)"):
            profiler.thermal_gate()
        threading.Timer(0.5, lambda: temp.write_text("40.0")).start()
        start = time.monotonic()
        profiler.thermal_gate()
        assert time.monotonic() - start >= 0.4
    device.close()


def _rerun_resumes(table: Path, devices: Path, tmp_path: Path, proxy: CuttableProxy) -> None:
    """After a cut: some rows were kept, and with the link back the same command measures the rest."""
    kept = len(LatencyTable.open(table).rows)
    assert 0 < kept < 25
    proxy.restore()
    second = _profile(devices, tmp_path / "tables")
    assert second.exit_code == 0, second.output
    assert f"{25 - kept} points measured, {kept} already there" in second.output
    proxy.close()


def test_dropped_connection_keeps_rows_and_rerun_resumes(tmp_path, adb_key):
    device, _ = _phone(tmp_path, adb_key)
    proxy = CuttableProxy(device.port)
    device2, devices = _phone(tmp_path, adb_key, port=proxy.port)
    device2.close()
    table = tmp_path / "tables" / "phone" / "onnxruntime-t1-b1.csv"

    watcher = proxy.cut_once_rows_written(table)
    first = _profile(devices, tmp_path / "tables")
    watcher.join()
    assert first.exit_code == 2, first.output
    assert "connection lost" in first.output and "run the same command again to resume" in first.output
    _rerun_resumes(table, devices, tmp_path, proxy)
    device.close()


def test_a_link_cut_while_waiting_for_output_is_reported_at_once(tmp_path, adb_key):
    """The cut lands while the toolkit reads (the device's tool is busy): adb-shell's reader used
    to poll the closed socket at 100% CPU until its 300 s read timeout."""
    stall = tmp_path / "stall"
    device, _ = _phone(tmp_path, adb_key, env={"SPVIT_STANDIN_STALL_FILE": str(stall)})
    proxy = CuttableProxy(device.port)
    device2, devices = _phone(tmp_path, adb_key, port=proxy.port)
    device2.close()
    table = tmp_path / "tables" / "phone" / "onnxruntime-t1-b1.csv"
    watcher, cut_at = proxy.cut_while_stalled(table, stall)
    first = _profile(devices, tmp_path / "tables")
    wall, cpu = time.monotonic() - cut_at["wall"], time.process_time() - cut_at["cpu"]
    watcher.join()
    stall.unlink()
    assert first.exit_code == 2, first.output
    assert "device 'phone'" in first.output and "connection lost" in first.output, first.output
    assert "end of stream" in first.output
    assert wall < 5.0 and cpu <= 1.0, (wall, cpu)  # noticed at once, without spinning
    _rerun_resumes(table, devices, tmp_path, proxy)
    device.close()


@pytest.fixture
def official_adb(tmp_path):
    """Debian's adb client with its own server port and HOME; its server makes its own key."""
    adb = shutil.which("adb")
    if adb is None:
        pytest.fail("the official adb client is not installed (apt-get install adb)")
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "ANDROID_ADB_SERVER_PORT": str(port)}

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([adb, *args], env=env, capture_output=True, text=True, timeout=timeout)

    started = run("start-server")
    assert started.returncode == 0, started.stderr
    run.public_key = (home / ".android" / "adbkey.pub").read_text()
    yield run
    run("kill-server", timeout=20)


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy-4k"])
def test_official_adb_client_accepts_the_same_endpoint(tmp_path, adb_key, official_adb, legacy):
    device, _ = _phone(tmp_path, adb_key, legacy=legacy)
    device.authorize(official_adb.public_key)  # a phone that already allowed this computer
    connected = official_adb("connect", device.serial)
    assert f"connected to {device.serial}" in connected.stdout, connected.stdout + connected.stderr
    for _ in range(50):  # the transport goes online once the signature is checked
        if f"{device.serial}\tdevice" in official_adb("devices").stdout:
            break
        time.sleep(0.1)
    shell = official_adb("-s", device.serial, "shell", "echo hello from $(getprop ro.product.model)")
    assert shell.stdout.strip() == "hello from Loopback Phone", shell.stderr
    payload = os.urandom(300_000)
    (tmp_path / "up.bin").write_bytes(payload)
    target = tmp_path / "phone files" / "up.bin"
    pushed = official_adb("-s", device.serial, "push", str(tmp_path / "up.bin"), str(target))
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert target.read_bytes() == payload
    pulled = official_adb("-s", device.serial, "pull", str(target), str(tmp_path / "down.bin"))
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert (tmp_path / "down.bin").read_bytes() == payload
    device.close()


def test_new_key_is_accepted_only_when_allowed(tmp_path, adb_key):
    """adb-shell sends its public key when its signature is unknown; the phone may allow it."""
    other = tmp_path / "newkey"
    keygen(str(other))
    for allow in (False, True):
        device, devices = _phone(tmp_path, adb_key, accept_new_keys=allow)
        dev = DeviceRegistry.load(devices).get("phone")
        dev = dev.model_copy(update={"adb": dev.adb.model_copy(update={"key": str(other), "timeout_s": 2.0})})
        profiler = make_profiler(dev)
        if allow:
            profiler.open()
            assert "Loopback" in profiler.shell("getprop ro.product.model", "asking")
            profiler.close()
        else:
            with pytest.raises(ProfilerError, match="device 'phone'"):
                profiler.open()
        device.close()


@pytest.mark.parametrize("data", [b"", b"\x00\xff" * 7, os.urandom(200_003), bytearray(os.urandom(65536)), "é ascii"])
def test_numpy_checksum_equals_adb_shells(data):
    from profilers.adb import _PURE_PYTHON_CHECKSUM, numpy_checksum

    assert numpy_checksum(data) == _PURE_PYTHON_CHECKSUM(data)


def test_measure_on_the_adb_phone(tmp_path, adb_key):
    device, devices = _phone(tmp_path, adb_key)
    assert _profile(devices, tmp_path / "tables").exit_code == 0
    args = ["measure", "--device", "phone", "--devices", str(devices), "--model", MODEL, "--keep", "0.7,0.49,0.343",
            "--tables", str(tmp_path / "tables"), "--rounds", "3", "--runs", "3", "--json"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.output)
    assert data["runtime_version"].startswith("onnxruntime_perf_test") and data["measured"]["median_ms"] > 0
    assert data["prediction"]["predicted_ms"] > 0 and abs(data["error_pct"]) < 50
    device.close()


def test_an_old_small_packet_device_profiles_measures_and_takes_long_commands(tmp_path, adb_key):
    """Protocol 0x01000000, 4 KB maximum payload, a pty shell: profile, measure, an 8 MiB push
    and pull, and a command longer than one message (a longer message drops the link)."""
    device, devices = _phone(tmp_path, adb_key, legacy=True)
    profiled = _profile(devices, tmp_path / "tables")
    assert profiled.exit_code == 0, profiled.output
    assert len(LatencyTable.open(tmp_path / "tables" / "phone" / "onnxruntime-t1-b1.csv").rows) == 25
    measured = CliRunner().invoke(main, ["measure", "--device", "phone", "--devices", str(devices), "--model", MODEL,
                                         "--keep", "0.7,0.49,0.343", "--tables", str(tmp_path / "tables"),
                                         "--rounds", "2", "--runs", "3"])  # fmt: skip
    assert measured.exit_code == 0, measured.output
    profiler = make_profiler(DeviceRegistry.load(devices).get("phone"))
    profiler.open()
    try:
        assert profiler._max_payload() == 4096
        payload = os.urandom(8 * 1024 * 1024)
        (tmp_path / "big.bin").write_bytes(payload)
        remote = str(tmp_path / "on phone" / "big.bin")
        profiler.upload(tmp_path / "big.bin", remote)
        assert Path(remote).read_bytes() == payload
        profiler.adb.pull(remote, str(tmp_path / "back.bin"))
        assert (tmp_path / "back.bin").read_bytes() == payload
        words = [f"w{i:04d}" for i in range(900)]  # ~5.4 KB of command: over one 4 KB message
        out = profiler.shell("echo " + " ".join(words) + " | wc -w", "counting words")
        assert out.strip() == "900"
        assert profiler.shell("echo still; echo connected", "checking the link") == "still\r\nconnected\r\n"  # pty
    finally:
        profiler.close()
    device.close()


def test_several_devices_profile_at_once_and_one_failing_does_not_stop_the_others(tmp_path, adb_key):
    good, good_devices = _phone(tmp_path / "good", adb_key)
    bad, bad_devices = _phone(tmp_path / "bad", adb_key, benchmark_binary="/data/local/tmp/no such tool")
    both = {**yaml.safe_load(good_devices.read_text()), **{"phone2": yaml.safe_load(bad_devices.read_text())["phone"]}}
    devices = tmp_path / "devices.yaml"
    devices.write_text(yaml.safe_dump(both))
    args = ["profile", "--device", "phone,phone2", "--model", MODEL, "--out", str(tmp_path / "tables"),
            "--devices", str(devices), *FAST]  # fmt: skip
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 2, first.output
    assert "phone: " in first.output and "25 points measured" in first.output  # the healthy one finished
    assert "phone2: FAILED" in first.output and "no such tool not found on the phone" in first.output
    assert "1 of 2 devices failed: phone2" in first.output
    assert len(LatencyTable.open(tmp_path / "tables" / "phone" / "onnxruntime-t1-b1.csv").rows) == 25
    again = CliRunner().invoke(main, ["profile", "--device", "phone", *args[3:]])
    assert again.exit_code == 0 and "0 points measured, 25 already there" in again.output  # its own table resumes
    check = CliRunner().invoke(main, ["devices", "check", "phone,phone2", "--devices", str(devices)])
    assert check.exit_code == 2 and "phone:" in check.output and "phone2:" in check.output
    assert "failed: phone2" in check.output
    local = CliRunner().invoke(main, ["profile", "--device", "local,local", "--model", MODEL])
    assert local.exit_code == 2 and "disturb each other" in local.output
    good.close()
    bad.close()
