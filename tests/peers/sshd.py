"""A real OpenSSH server on 127.0.0.1 for the tests: random port, temporary keys, known_hosts."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

from .net import free_port, wait_listening

SSHD = "/usr/sbin/sshd"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


class OpenSshServer:
    def __init__(self, root: Path) -> None:
        if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
            raise RuntimeError("openssh-server is not installed (apt-get install openssh-server)")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.host_key = root / "host_ed25519"
        self.client_key = root / "client_ed25519"
        _keygen(self.host_key)
        _keygen(self.client_key)
        (root / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.user = getpass.getuser()
        self.port = free_port()
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPubkeyAuthentication yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            # keys under /tmp fail sshd's ownership checks without StrictModes no
            f"StrictModes no\nUsePAM no\nPidFile {root / 'sshd.pid'}\nSubsystem sftp internal-sftp\n"
            "LogLevel ERROR\nMaxStartups 100\n"
        )
        self.process: subprocess.Popen | None = None
        self.start()

    def known_hosts_line(self, port: int | None = None) -> str:
        return f"[127.0.0.1]:{port or self.port} {self.host_key.with_suffix('.pub').read_text().strip()}\n"

    def start(self) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_listening(self.port)
        except TimeoutError:
            self.process.kill()
            raise RuntimeError(f"sshd did not start: {self.process.stderr.read().decode()[-500:]}") from None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
