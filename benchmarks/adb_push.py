"""Pushing an 8 MiB file over ADB/TCP on loopback: this project's path vs the official `adb push`.

A device endpoint (tests/peers/adbd.py, the real ADB wire protocol) on 127.0.0.1 in each mode —
modern (256 KB payload) and legacy (an old adbd: protocol 0x01000000, 4096-byte payload); three
clients push the same file to it, interleaved, several repetitions each, median throughput:

* spvit-search: adb-shell with the TCP_NODELAY transport (profilers/adb.py), as profiling uses it;
* adb-shell as shipped (Nagle on, pure-Python checksums), for reference;
* the official `adb push` (Debian's adb), through its own adb server.

    python benchmarks/adb_push.py [--size-mb 8] [--repeats 5] [--modes modern,legacy] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from adb_shell import adb_message
from adb_shell.adb_device import AdbDeviceTcp
from adb_shell.auth.keygen import keygen
from adb_shell.auth.sign_pythonrsa import PythonRSASigner
from peers.adbd import LoopbackAdbd
from peers.net import free_port

from profilers.adb import _PURE_PYTHON_CHECKSUM, load_signer, numpy_checksum, open_device


def run_mode(legacy: bool, adb: str, env: dict, tmp: Path, payload: Path, key: Path, repeats: int) -> dict:
    """Median throughput of the three clients against one endpoint mode, interleaved."""
    home = Path(env["HOME"])
    device = LoopbackAdbd(
        tmp, authorized_keys=[Path(f"{key}.pub").read_text(), (home / ".android/adbkey.pub").read_text()],
        legacy=legacy,
    )  # fmt: skip
    out = subprocess.run([adb, "connect", device.serial], env=env, capture_output=True, text=True, check=True)
    assert "connected" in out.stdout, out.stdout
    time.sleep(0.5)

    ours = open_device(device.serial, "tcp", 30.0)
    ours.connect(rsa_keys=[load_signer(str(key))], auth_timeout_s=10)
    stock = AdbDeviceTcp("127.0.0.1", device.port, default_transport_timeout_s=30.0)
    stock.connect(rsa_keys=[PythonRSASigner.FromRSAKeyPath(str(key))], auth_timeout_s=10)

    def push_with(client, name: str) -> None:
        client.push(str(payload), str(tmp / f"{name}.bin"), read_timeout_s=120, transport_timeout_s=120)

    def push_as_shipped() -> None:
        adb_message.checksum = _PURE_PYTHON_CHECKSUM  # adb-shell's own checksum for this client only
        try:
            push_with(stock, "stock")
        finally:
            adb_message.checksum = numpy_checksum

    def push_official() -> None:
        subprocess.run([adb, "-s", device.serial, "push", str(payload), str(tmp / "official.bin")],
                       env=env, check=True, capture_output=True)  # fmt: skip

    clients = {
        "spvit-search (profilers/adb.py)": lambda: push_with(ours, "ours"),
        "adb-shell as shipped": push_as_shipped,
        "official adb push": push_official,
    }
    if legacy:  # 2 KB messages with Nagle on wait out delayed ACKs: ~20 KB/s, minutes per push (seen)
        del clients["adb-shell as shipped"]
    seconds: dict[str, list[float]] = {k: [] for k in clients}
    order = list(clients)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            clients[name]()
            seconds[name].append(time.perf_counter() - start)
    for name in ("ours", "official") if legacy else ("ours", "stock", "official"):
        assert (tmp / f"{name}.bin").read_bytes() == payload.read_bytes(), f"{name}: pushed file differs"
    ours.close()
    stock.close()
    subprocess.run([adb, "disconnect", device.serial], env=env, capture_output=True)
    device.close()
    size_mb = payload.stat().st_size / 1e6
    rate = {k: size_mb / statistics.median(v) for k, v in seconds.items()}
    official = rate["official adb push"]
    return {
        "endpoint": "legacy: protocol 0x01000000, 4096-byte payload" if legacy else
                    "modern: protocol 0x01000001, 256 KB payload",
        "mb_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio_to_official": {k: round(v / official, 2) for k, v in rate.items()},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="modern,legacy", type=lambda s: s.split(","))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    adb = shutil.which("adb")
    if adb is None:
        sys.exit("the official adb client is not installed (apt-get install adb)")

    tmp = Path(tempfile.mkdtemp(prefix="spvit-adb-push-"))
    payload = tmp / "payload.bin"
    payload.write_bytes(os.urandom(int(args.size_mb * 1024 * 1024)))
    key = tmp / "adbkey"
    keygen(str(key))
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "ANDROID_ADB_SERVER_PORT": str(free_port())}
    subprocess.run([adb, "start-server"], env=env, check=True, capture_output=True)
    modes = {m: run_mode(m == "legacy", adb, env, tmp, payload, key, args.repeats) for m in args.modes}
    subprocess.run([adb, "kill-server"], env=env, capture_output=True)
    size_mb = payload.stat().st_size / 1e6
    result = {"size_mb": round(size_mb, 2), "repeats": args.repeats, "modes": modes}
    for r in modes.values():
        print(f"pushing {size_mb:.1f} MB over ADB/TCP on loopback to the {r['endpoint']} endpoint, "
              f"median of {args.repeats}:")  # fmt: skip
        for name, value in r["mb_per_s"].items():
            print(f"  {name:40} {value:7.1f} MB/s   {r['ratio_to_official'][name]:5.2f} x official")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
