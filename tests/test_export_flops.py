"""ONNX export of pruned models, and FLOPs that count attention and the real token counts."""

import json

import pytest
import timm
import torch
from click.testing import CliRunner

import spvit_search as sp
from spvit_search.cli import main
from spvit_search.export import onnx_max_abs_diff, onnx_session

PLAN = {"locations": (3, 6, 9), "keep": (0.7, 0.49, 0.343)}


@pytest.mark.parametrize("method", ["spvit", "hard", "evit", "tome"])
def test_onnx_of_pruned_deit_small_matches_torch(tmp_path, method):
    model = timm.create_model("deit_small_patch16_224").eval()
    sp.prune(model, sp.PruningPlan(**PLAN, method=method))
    path = sp.export_onnx(model, tmp_path / f"{method}.onnx")
    images = torch.randn(1, 3, 224, 224)
    assert onnx_max_abs_diff(model, path, images) <= 1e-4


def test_onnx_dynamic_batch(tmp_path):
    model = timm.create_model("deit_tiny_patch16_224").eval()
    sp.prune(model, sp.PruningPlan(**PLAN))
    path = sp.export_onnx(model, tmp_path / "m.onnx", dynamic_batch=True)
    images = torch.randn(3, 3, 224, 224)
    assert onnx_max_abs_diff(model, path, images) <= 1e-4
    assert onnx_session(path).get_inputs()[0].shape[0] == "batch"


def _block_macs(n: int, c: int, mlp_ratio: float = 4.0) -> int:
    return n * (3 * c * c + c * c + 2 * int(mlp_ratio * c) * c) + 2 * n * n * c


def test_dense_flops_count_attention():
    model = timm.create_model("deit_small_patch16_224")
    c, n = 384, 197
    expected = 12 * _block_macs(n, c) + 196 * (3 * 16 * 16) * c + c * 1000
    assert sp.count_flops(model).macs == expected  # 4.599 GMACs, the paper's 4.6 "GFLOPs"


def test_evit_flops_follow_the_plan_token_counts():
    model = timm.create_model("deit_small_patch16_224")
    plan = sp.PruningPlan(**PLAN, method="evit")
    sp.prune(model, plan)
    c, tokens = 384, plan.tokens_per_block(model)
    blocks = sum(_block_macs(n, c) for n in tokens)
    # per stage: the class-token attention row over the previous block's tokens, and the
    # fused (package) token: a weighted sum over the patches pruned at that stage
    scored = [tokens[loc - 1] - 1 - i for i, loc in enumerate(plan.locations)]
    kept = [tokens[loc] - 1 - (i + 1) for i, loc in enumerate(plan.locations)]
    extras = sum(tokens[loc - 1] * c + (n - k) * c for loc, n, k in zip(plan.locations, scored, kept, strict=True))
    expected = blocks + extras + 196 * 768 * c + c * 1000
    assert sp.count_flops(model).macs == expected


def test_flops_cli_json_and_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["flops", "--model", "deit_tiny_patch16_224", "--keep", "0.7,0.49,0.343", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["locations"] == [3, 6, 9] and data["method"] == "spvit"
    assert 1.4 < data["reduction"] < 1.7
    bad = runner.invoke(main, ["flops", "--model", "resnet18", "--keep", "0.5"])
    assert bad.exit_code == 2 and "not supported" in bad.output and "VisionTransformer" in bad.output
    bad = runner.invoke(main, ["flops", "--model", "deit_tiny_patch16_224", "--keep", "0.5,0.6"])
    assert bad.exit_code == 2 and "must not increase" in bad.output
    bad = runner.invoke(main, ["flops", "--model", "deit_tiny_patch16_224", "--keep", "0.5,x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output


@pytest.mark.parametrize("method", ["spvit", "tome"])
def test_tflite_of_pruned_deit_tiny_matches_torch(tmp_path, method):
    from spvit_search.export import export_tflite, tflite_runner

    model = timm.create_model("deit_tiny_patch16_224").eval()
    sp.prune(model, sp.PruningPlan(**PLAN, method=method))
    path = export_tflite(model, tmp_path / "m.tflite")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(images).numpy()
    out = tflite_runner(path)(images.numpy())
    assert abs(out - expected).max() <= 1e-4
