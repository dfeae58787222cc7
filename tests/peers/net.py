"""Loopback helpers: free ports, waiting for a listener, and a proxy that can cut connections."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class CuttableProxy:
    """Forwards 127.0.0.1:port to a target; ``cut()`` drops every connection (a pulled cable)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._refusing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self, refuse_new: bool = True) -> None:
        self._refusing = refuse_new
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()

    def cut_once_rows_written(self, table, timeout: float = 120.0) -> threading.Thread:
        """Cut the link as soon as the latency table ``table`` holds its first row (mid-profile).

        Returns the watching thread; join it after the profile run.
        """

        def watch() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if table.exists() and len(table.read_text().splitlines()) > 1:
                    self.cut()
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        return watcher

    def cut_while_stalled(self, table, stall, timeout: float = 120.0) -> tuple[threading.Thread, dict]:
        """Once ``table`` holds its first row, create ``stall`` (the stand-in tool then hangs, so the
        toolkit sits waiting for its output), wait 1.5 s, and cut the link while it reads.

        Returns the watching thread and a dict that gets the ``wall`` and ``cpu`` (process) time
        of the cut, to time how fast the toolkit notices.
        """
        cut_at: dict[str, float] = {}

        def watch() -> None:
            deadline = time.monotonic() + timeout
            while not (table.exists() and len(table.read_text().splitlines()) > 1) and time.monotonic() < deadline:
                time.sleep(0.02)
            stall.touch()
            time.sleep(1.5)
            cut_at["wall"], cut_at["cpu"] = time.monotonic(), time.process_time()
            self.cut()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        return watcher, cut_at

    def restore(self) -> None:
        self._refusing = False

    def close(self) -> None:
        self.cut()
        self._listener.close()
