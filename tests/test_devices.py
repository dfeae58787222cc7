"""devices.yaml: validation with clear errors, ${ENV} references, no secrets, the CLI."""

import pytest
from click.testing import CliRunner

from spvit_search.cli import main
from spvit_search.devices import DeviceError, DeviceRegistry

BOARD = """
board:
  transport: ssh
  runtime: onnxruntime
  workdir: /tmp/spvit board
  ssh: {host: "${BOARD_HOST}", port: "${BOARD_PORT}", user: root, key: ~/.ssh/id_ed25519}
"""


def _write(tmp_path, text):
    path = tmp_path / "devices.yaml"
    path.write_text(text)
    return path


def test_shipped_registry_is_valid_and_local_is_built_in(tmp_path):
    registry = DeviceRegistry.load("devices.yaml")
    assert {"local", "pixel", "zcu102", "zcu102-dpu"} <= set(registry.names)
    assert DeviceRegistry.load(_write(tmp_path, "")).get("local").transport == "local"


def test_env_references_resolve_on_use(tmp_path):
    registry = DeviceRegistry.load(_write(tmp_path, BOARD))
    with pytest.raises(DeviceError, match=r"device 'board', ssh.host: environment variable BOARD_HOST is not set"):
        registry.get("board", env={})
    dev = registry.get("board", env={"BOARD_HOST": "127.0.0.1", "BOARD_PORT": "2222"})
    assert dev.ssh.host == "127.0.0.1" and dev.ssh.port == 2222 and dev.workdir == "/tmp/spvit board"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x:\n  transport: serial\n", "transport"),
        ("x:\n  transport: ssh\n  workdir: /w\n", "needs an 'ssh:' section"),
        ("x:\n  transport: local\n  runtime: command\n", "not available over local"),
        ("x:\n  transport: local\n  threads: 0\n", "threads"),
        ("x:\n  transport: local\n  thread: 2\n", "thread: Extra inputs are not permitted"),
        ("x:\n  transport: local\n  affinity: zz\n", "hex CPU mask"),
        ("x:\n  transport: adb\n  workdir: /w\n  adb: {serial: a}\n", "benchmark_binary"),
        (
            "x:\n  transport: ssh\n  runtime: command\n  workdir: /w\n  command: run\n  parser: xdputil\n"
            "  ssh: {host: h, user: u}\n",
            "must contain {model}",
        ),
        ("x:\n  transport: ssh\n  workdir: /w\n  ssh: {host: h, user: u, password: hunter2}\n", "looks like a secret"),
        ("x: [1, 2\n", "not valid YAML at line"),
        ("- a\n- b\n", "mapping of device names"),
    ],
)
def test_invalid_entries_say_what_and_where(tmp_path, text, message):
    with pytest.raises(DeviceError, match=message.replace("{", r"\{").replace("}", r"\}")):
        DeviceRegistry.load(_write(tmp_path, text))


def test_unknown_device_lists_known_ones(tmp_path):
    registry = DeviceRegistry.load(_write(tmp_path, BOARD))
    with pytest.raises(DeviceError, match=r"unknown device 'phone'.*known: local, board"):
        registry.get("phone")


def test_cli_lists_devices_and_checks_local(tmp_path):
    runner = CliRunner()
    listing = runner.invoke(main, ["devices", "--devices", str(_write(tmp_path, BOARD))])
    assert listing.exit_code == 0 and "board" in listing.output and "root@${BOARD_HOST}" in listing.output
    check = runner.invoke(main, ["devices", "check", "local"])
    assert check.exit_code == 0, check.output
    assert "onnxruntime" in check.output and "cpu" in check.output
    missing = runner.invoke(main, ["devices", "--devices", str(_write(tmp_path, BOARD)), "check", "board"])
    assert missing.exit_code == 2 and "BOARD_HOST is not set" in missing.output
    after = runner.invoke(main, ["devices", "check", "board", "--devices", str(_write(tmp_path, BOARD))])
    assert after.exit_code == 2 and "BOARD_HOST is not set" in after.output  # as every other command takes it
