"""The torchvision op-schema fix: applied exactly when torchvision's own ops fail to load."""

import subprocess
import sys
import sysconfig

import pytest


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120)


def _torchvision_alone_fails() -> bool:
    # -S skips .pth hooks (ours included); site-packages is then added by hand
    purelib = sysconfig.get_paths()["purelib"]
    plain = _run(f"import sys; sys.path.insert(0, {purelib!r}); import torchvision", "-S")
    if plain.returncode != 0:
        assert "torchvision::nms does not exist" in plain.stderr, plain.stderr
    return plain.returncode != 0


@pytest.mark.parametrize("order", ["timm first", "spvit_search first"])
def test_timm_imports_in_either_order(order):
    first, second = ("timm", "spvit_search") if order == "timm first" else ("spvit_search", "timm")
    code = (
        f"import {first}, {second}, timm, torchvision.transforms;"
        "from spvit_search._compat import torchvision_fix_applied;"
        "timm.create_model('deit_tiny_patch16_224'); print(torchvision_fix_applied())"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert (result.stdout.strip() == "True") == _torchvision_alone_fails()
