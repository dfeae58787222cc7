"""An ADB device endpoint on 127.0.0.1 speaking the real wire protocol: the device (adbd) side.

It is what the official ``adb`` client and adb-shell talk to in the tests, so the profiler is
proven against the protocol and not against itself:

* messages: 24-byte little-endian headers (command, arg0, arg1, length, checksum, magic);
* CNXN handshake with RSA authentication: AUTH TOKEN, SIGNATURE checked against the
  authorized keys (PKCS#1 v1.5 over the token as a SHA-1 digest, as adbd does), or
  RSAPUBLICKEY accepted like a user tapping "Allow" (``accept_new_keys``);
* streams: OPEN / OKAY / WRTE / CLSE with one unacknowledged WRTE per direction;
* two modes: a modern device (protocol 0x01000001, 256 KB payload) and ``legacy=True``, an old
  AOSP-derived one (0x01000000 with verified checksums, 4 KB payload, a pty shell with CR LF);
  a message over the announced payload drops the connection, as adbd does;
* services: ``shell:CMD`` (legacy shell: no exit code, stderr merged), ``exec:CMD``, and
  ``sync:`` (STAT, LIST, SEND, RECV, QUIT) for push and pull.

Commands run in ``/bin/sh`` on this host with the stand-in tools first on PATH. The banner
advertises no optional features, so clients use the legacy shell and sync v1.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import stat
import struct
import subprocess
import threading
from pathlib import Path

from .net import free_port


def _cmd(name: bytes) -> int:
    return int.from_bytes(name, "little")


CNXN, AUTH, OPEN, OKAY, CLSE, WRTE = (_cmd(c) for c in (b"CNXN", b"AUTH", b"OPEN", b"OKAY", b"CLSE", b"WRTE"))
VERSION = 0x01000001
MAX_PAYLOAD = 256 * 1024
TOKEN, SIGNATURE, RSAPUBLICKEY = 1, 2, 3
SHA1_DIGEST_INFO = bytes.fromhex("3021300906052b0e03021a05000414")
SYNC_DATA_MAX = 64 * 1024


def pack(command: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
    checksum = sum(data) & 0xFFFFFFFF
    return struct.pack("<6I", command, arg0, arg1, len(data), checksum, command ^ 0xFFFFFFFF) + data


def parse_android_pubkey(text: str) -> tuple[int, int]:
    """(modulus, exponent) of an ADB public key: base64 of adb's RSAPublicKey struct."""
    raw = base64.b64decode(text.strip().split()[0])
    words = struct.unpack_from("<I", raw, 0)[0]
    modulus = int.from_bytes(raw[8 : 8 + 4 * words], "little")
    exponent = struct.unpack_from("<I", raw, 8 + 8 * words)[0]
    return modulus, exponent


def verify_token(key: tuple[int, int], token: bytes, signature: bytes) -> bool:
    n, e = key
    size = (n.bit_length() + 7) // 8
    if len(signature) != size:
        return False
    message = pow(int.from_bytes(signature, "big"), e, n).to_bytes(size, "big")
    padding = size - 3 - len(SHA1_DIGEST_INFO) - len(token)
    return message == b"\x00\x01" + b"\xff" * padding + b"\x00" + SHA1_DIGEST_INFO + token


class _Stream:
    def __init__(self, conn: _Connection, local_id: int, remote_id: int) -> None:
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self._inbox = bytearray()
        self._cv = threading.Condition()
        self._acked = threading.Event()
        self._acked.set()
        self.closed = False

    # host -> device
    def deliver(self, data: bytes) -> None:
        with self._cv:
            self._inbox += data
            self._cv.notify_all()

    def read_exact(self, n: int) -> bytes:
        with self._cv:
            while len(self._inbox) < n and not self.closed:
                self._cv.wait(timeout=1)
            if len(self._inbox) < n:
                raise EOFError("stream closed")
            out = bytes(self._inbox[:n])
            del self._inbox[:n]
            return out

    # device -> host
    def write(self, data: bytes) -> None:
        step = self.conn.max_data
        for i in range(0, len(data), step):
            if not self._acked.wait(timeout=60) or self.closed:
                raise EOFError("host stopped acknowledging")
            self._acked.clear()
            self.conn.send(WRTE, self.local_id, self.remote_id, data[i : i + step])

    def acknowledged(self) -> None:
        self._acked.set()

    def close(self, notify: bool = True) -> None:
        with self._cv:
            if self.closed:
                return
            self.closed = True
            self._cv.notify_all()
        self._acked.set()
        if notify:
            self.conn.send(CLSE, self.local_id, self.remote_id)
        self.conn.streams.pop(self.local_id, None)


class _Connection:
    def __init__(self, sock: socket.socket, server: LoopbackAdbd) -> None:
        self.sock, self.server = sock, server
        self.max_data = min(4096, server.max_payload)
        self.streams: dict[int, _Stream] = {}
        self._send_lock = threading.Lock()
        self._next_id = 1
        self._token = b""
        self._online = False

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        with self._send_lock:
            self.sock.sendall(pack(command, arg0, arg1, data))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _banner(self) -> bytes:
        props = ";".join(f"{k}={v}" for k, v in self.server.props.items())
        return f"device::{props};features=".encode() + b"\0"

    def _go_online(self) -> None:
        self._online = True
        self.send(CNXN, self.server.version, self.server.max_payload, self._banner())

    def _challenge(self) -> None:
        self._token = os.urandom(20)
        self.send(AUTH, TOKEN, 0, self._token)

    def serve(self) -> None:
        try:
            while True:
                command, arg0, arg1, length, checksum, magic = struct.unpack("<6I", self._recv_exact(24))
                if magic != command ^ 0xFFFFFFFF:
                    return  # not ADB: drop the connection like adbd does
                if length > self.server.max_payload:
                    return  # over the announced maximum payload: adbd drops the connection
                data = self._recv_exact(length) if length else b""
                if self.server.version < 0x01000001 and checksum != sum(data) & 0xFFFFFFFF:
                    return  # an old adbd verifies every payload's checksum
                self._dispatch(command, arg0, arg1, data)
        except (EOFError, OSError):
            pass
        finally:
            for stream in list(self.streams.values()):
                stream.close(notify=False)
            with contextlib.suppress(OSError):
                self.sock.close()

    def _dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        server = self.server
        if command == CNXN:
            self.max_data = min(arg1, server.max_payload)
            if server.require_auth:
                self._challenge()
            else:
                self._go_online()
        elif command == AUTH and arg0 == SIGNATURE:
            if any(verify_token(k, self._token, data) for k in server.authorized()):
                self._go_online()
            else:
                self._challenge()
        elif command == AUTH and arg0 == RSAPUBLICKEY:
            if server.accept_new_keys:
                server.authorize(data.rstrip(b"\0").decode())
                self._go_online()
        elif not self._online:
            return
        elif command == OPEN:
            server.opens += 1
            if server.drop_after_opens is not None and server.opens > server.drop_after_opens:
                raise EOFError("fault injection: connection dropped")
            local_id, self._next_id = self._next_id, self._next_id + 1
            stream = _Stream(self, local_id, arg0)
            self.streams[local_id] = stream
            service = data.rstrip(b"\0").decode(errors="replace")
            self.send(OKAY, local_id, arg0)
            threading.Thread(target=self._service, args=(stream, service), daemon=True).start()
        elif command == WRTE:
            stream = self.streams.get(arg1)
            if stream is not None:
                stream.deliver(data)
                self.send(OKAY, arg1, arg0)
        elif command == OKAY:
            stream = self.streams.get(arg1)
            if stream is not None:
                stream.acknowledged()
        elif command == CLSE:
            stream = self.streams.get(arg1)
            if stream is not None:
                stream.close(notify=True)

    def _service(self, stream: _Stream, service: str) -> None:
        try:
            if service.startswith(("shell:", "exec:")):
                kind, _, command = service.partition(":")
                if command:
                    self._run(stream, command, merge_stderr=kind == "shell")
            elif service == "sync:":
                self._sync(stream)
        except (EOFError, OSError):
            pass
        finally:
            stream.close()

    def _run(self, stream: _Stream, command: str, merge_stderr: bool) -> None:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command], cwd=self.server.root, env=self.server.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                if self.server.pty and merge_stderr:  # an old device's shell runs on a pty: CR LF line ends
                    chunk = chunk.replace(b"\n", b"\r\n")
                stream.write(chunk)
        finally:
            proc.stdout.close()
            proc.wait()

    def _sync(self, stream: _Stream) -> None:
        while True:
            ident, length = struct.unpack("<4sI", stream.read_exact(8))
            if ident == b"QUIT":
                return
            path = stream.read_exact(length).decode()
            if ident == b"STAT":
                try:
                    st = os.stat(path)
                    stream.write(b"STAT" + struct.pack("<III", st.st_mode, st.st_size, int(st.st_mtime)))
                except OSError:
                    stream.write(b"STAT" + struct.pack("<III", 0, 0, 0))
            elif ident == b"LIST":
                with contextlib.suppress(OSError):
                    for name in os.listdir(path):
                        st = os.lstat(os.path.join(path, name))
                        encoded = name.encode()
                        stream.write(b"DENT" + struct.pack("<IIII", st.st_mode, st.st_size, int(st.st_mtime),
                                                           len(encoded)) + encoded)  # fmt: skip
                stream.write(b"DONE" + bytes(16))
            elif ident == b"SEND":
                self._receive_file(stream, path)
            elif ident == b"RECV":
                try:
                    with open(path, "rb") as fh:
                        while chunk := fh.read(SYNC_DATA_MAX):
                            stream.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
                    stream.write(b"DONE" + struct.pack("<I", 0))
                except OSError as err:
                    message = str(err).encode()
                    stream.write(b"FAIL" + struct.pack("<I", len(message)) + message)
            else:
                message = f"unknown sync request {ident!r}".encode()
                stream.write(b"FAIL" + struct.pack("<I", len(message)) + message)
                return

    @staticmethod
    def _receive_file(stream: _Stream, spec: str) -> None:
        path, _, mode = spec.rpartition(",")
        error = None
        fh = None
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "wb")  # noqa: SIM115 - closed below, after the DONE packet
        except OSError as err:
            error = str(err)
        while True:
            ident, length = struct.unpack("<4sI", stream.read_exact(8))
            if ident == b"DATA":
                data = stream.read_exact(length)
                if fh is not None:
                    fh.write(data)
            elif ident == b"DONE":
                if fh is not None:
                    fh.close()
                    os.utime(path, (length, length))
                    with contextlib.suppress(ValueError, OSError):
                        os.chmod(path, stat.S_IMODE(int(mode)))
                break
            else:
                error = f"unexpected {ident!r} during SEND"
                break
        if error:
            message = error.encode()
            stream.write(b"FAIL" + struct.pack("<I", len(message)) + message)
        else:
            stream.write(b"OKAY" + struct.pack("<I", 0))


class LoopbackAdbd:
    """The device: ``serial`` is ``127.0.0.1:PORT``; ``close()`` stops it."""

    def __init__(
        self,
        root: Path,
        bin_dir: Path | None = None,
        *,
        authorized_keys: list[str] = (),
        accept_new_keys: bool = True,
        require_auth: bool = True,
        env: dict[str, str] | None = None,
        legacy: bool = False,
    ) -> None:
        """``legacy``: an old, AOSP-derived adbd — protocol 0x01000000 (checksums verified), 4 KB
        maximum payload (a larger message drops the connection), shell on a pty (CR LF)."""
        self.root = str(root)
        self.version, self.max_payload = (0x01000000, 4096) if legacy else (VERSION, MAX_PAYLOAD)
        self.pty = legacy
        self.env = {**os.environ, **(env or {})}
        if bin_dir is not None:
            self.env["PATH"] = f"{bin_dir}:{self.env.get('PATH', '/usr/bin:/bin')}"
        self._keys = [parse_android_pubkey(k) for k in authorized_keys]
        self.accept_new_keys = accept_new_keys
        self.require_auth = require_auth
        self.props = {"ro.product.name": "loopback", "ro.product.model": "Loopback_Phone", "ro.product.device": "lb"}
        self.drop_after_opens: int | None = None
        self.opens = 0
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"

    def authorized(self) -> list[tuple[int, int]]:
        return list(self._keys)

    def authorize(self, pubkey: str) -> None:
        self._keys.append(parse_android_pubkey(pubkey))

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as adbd does
            threading.Thread(target=_Connection(sock, self).serve, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
