"""Window pruning on timm SwinTransformer: equivalence, carried windows, plan rules, FLOPs, export."""

import copy

import pytest
import timm
import torch
from conftest import set_fused_attn
from torch import nn

import spvit_search as sp
from spvit_search.evaluate import PlanEvaluator
from spvit_search.plan import PlanError, kept_count
from spvit_search.pruning import UnsupportedModelError, family_for

MODELS = {
    # Swin-T at 224: grids 56², 28², 14², 7² = 64, 16, 4, 1 windows of 7×7; blocks 0-1 | 2-3 | 4-9 | 10-11
    "swin_t": ("swin_tiny_patch4_window7_224", {}),
    # a window-12 Swin at 384 (Swin-T's layout, narrower so the test stays fast): 64, 16, 4, 1 windows of 12×12
    "swin_w12_384": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 384, "window_size": 12, "embed_dim": 32, "num_heads": (1, 2, 4, 8), "depths": (2, 2, 2, 2)},
    ),
    # 16², 8² = 16, 4 windows of 4×4; blocks 0-3 | 4-5
    "swin_demo": ("swin_demo_digits", {}),
    # windows of 5 on grids 16² and 8²: padded to 20² (16 windows) and 10² (4 windows)
    "swin_padded": ("swin_demo_digits", {"window_size": 5}),
}
SWIN_T_PLAN = {"locations": (0, 3, 4, 7), "keep": (0.6, 0.5, 0.75, 0.5)}
W12_PLAN = {"locations": (1, 2, 4), "keep": (0.5, 0.5, 0.5)}
DEMO_PLAN = {"locations": (1, 4), "keep": (0.5, 0.5)}
PLANS = {"swin_t": SWIN_T_PLAN, "swin_w12_384": W12_PLAN, "swin_demo": DEMO_PLAN, "swin_padded": DEMO_PLAN}


def _make(key: str) -> nn.Module:
    name, kwargs = MODELS[key]
    return timm.create_model(name, num_classes=10, drop_path_rate=0.0, **kwargs).eval()


def _plan(key: str, **kwargs) -> sp.PruningPlan:
    return sp.PruningPlan(**{**PLANS[key], **kwargs})


def _image(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, *sp.models.input_shape(model))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("key", list(MODELS))
def test_keep_one_equals_unpatched(key, fused):
    model = _make(key)
    set_fused_attn(model, fused)
    reference = copy.deepcopy(model)
    x = _image(model, 2)
    with torch.no_grad():
        expected = reference(x)
        for method in ("spvit", "norm"):
            plan = _plan(key, keep=(1.0,) * len(PLANS[key]["keep"]), method=method, package_token=False)
            out = sp.prune(model, plan)(x)
            assert (out - expected).abs().max().item() <= 1e-5, method
            assert sp.pruning_state(model).token_counts == list(plan.tokens_per_block(model))
    assert type(model).__name__ == "Pruned" + type(reference).__name__
    sp.unprune(model)
    assert type(model) is type(reference)
    assert all(type(t) is type(r) for t, r in zip(model.modules(), reference.modules(), strict=True))
    assert set(model.state_dict()) == set(reference.state_dict())


@pytest.mark.parametrize("method", ["spvit", "norm"])
@pytest.mark.parametrize("key", ["swin_t", "swin_w12_384", "swin_padded"])
def test_eval_is_deterministic_batch_consistent_and_counts_tokens(key, method):
    model = _make(key)
    plan = _plan(key, method=method)
    sp.prune(model, plan)
    x = _image(model, 3)
    with torch.no_grad():
        first = model(x)
        counts = sp.pruning_state(model).token_counts
        second = model(x)
        alone = model(x[1:2])
    assert counts == list(plan.tokens_per_block(model))
    assert torch.equal(first, second)
    assert torch.allclose(alone[0], first[1], atol=1e-5, rtol=0)
    if key == "swin_t":  # keep is a fraction of the stage's windows of 49 tokens; it applies until the next location
        assert counts[:2] == [kept_count(0.6, 64) * 49] * 2
        assert counts[2] == 16 * 49 and counts[3] == kept_count(0.5, 16) * 49
        assert counts[4:7] == [kept_count(0.75, 4) * 49] * 3 and counts[7:10] == [kept_count(0.5, 4) * 49] * 3
        assert counts[10:] == [49, 49]


@pytest.mark.parametrize("key", ["swin_demo", "swin_w12_384", "swin_padded"])
def test_training_masks_mean_what_inference_gathers(key):
    """In training every window is computed and a pruned one's output replaced by its input; a window's
    attention stays inside it, so the masked forward equals the gathered one, and the selector learns."""
    model = _make(key)
    sp.prune(model, _plan(key, method="spvit"))
    x = _image(model, 3)
    model.train()
    masked = model(x)
    state = sp.pruning_state(model)
    assert len(state.decisions) == len(PLANS[key]["locations"])
    layout = family_for(model).layout(model)
    for decision, loc, keep in zip(state.decisions, PLANS[key]["locations"], PLANS[key]["keep"], strict=True):
        assert decision.sum(dim=1).tolist() == [kept_count(keep, layout.stage_at(loc).patches)] * 3
    masked.sum().backward()
    grads = [blk.token_selector.scorer.in_proj[0].weight.grad for blk in family_for(model).blocks(model)
             if "token_selector" in blk._modules]  # fmt: skip
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        gathered = model(x)
    assert (masked - gathered).abs().max().item() < 1e-4


def test_pruned_windows_are_carried_unchanged():
    """A pruned window skips the block: its tokens leave it as they came; kept windows changed.

    At stage 1's first block (not shifted; the patch merging's projection gives tokens of
    varied norms — the stem's LayerNorm would make every norm the same)."""
    model = _make("swin_demo")
    sp.prune(model, sp.PruningPlan(locations=(4,), keep=(0.5,), method="norm"))  # 2 of 4 windows of 4×4
    block = model.layers[1].blocks[0]
    seen = {}
    block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(_image(model, 3))
    x, y = seen["x"], seen["y"]
    same = (x - y).abs().reshape(3, 2, 4, 2, 4, -1).amax(dim=(2, 4, 5)).reshape(3, 4) == 0  # per window
    assert same.sum(dim=1).tolist() == [2, 2, 2]
    norms = x.norm(dim=-1).reshape(3, 2, 4, 2, 4).mean(dim=(2, 4)).reshape(3, 4)
    kept = norms.topk(2, dim=1).indices
    assert not same.gather(1, kept).any()  # the two windows of largest mean norm went through the block


def test_plan_rules():
    model = _make("swin_t")
    with pytest.raises(PlanError, match="must not increase within stage 2"):
        sp.prune(model, sp.PruningPlan(locations=(4, 6), keep=(0.5, 0.75)))
    sp.prune(model, sp.PruningPlan(locations=(3, 4), keep=(0.25, 0.75)))  # another grid: allowed
    with pytest.raises(PlanError, match="single window"):
        sp.prune(model, sp.PruningPlan(locations=(10,), keep=(0.5,)))
    for method, why in (("evit", "no class token"), ("hard", "carried unchanged"), ("tome", "merged token")):
        with pytest.raises(UnsupportedModelError, match=why):
            sp.prune(model, sp.PruningPlan(locations=(3,), keep=(0.5,), method=method))
    with pytest.raises(UnsupportedModelError, match="'norm' is not supported on vit"):
        sp.prune(timm.create_model("vit_demo_digits"), sp.PruningPlan(locations=(3,), keep=(0.5,), method="norm"))


def _block_macs(n: int, c: int, area: int, mlp_ratio: float) -> int:
    """n tokens in windows of ``area``: qkv, proj, MLP per token; q·kᵀ and attn·v within each window."""
    return n * (4 * c * c + 2 * int(mlp_ratio * c) * c) + 2 * n * area * c


def test_flops_equal_an_analytic_count():
    model = _make("swin_demo")  # 3×32×32, 2×2 patches, windows 4×4, widths 48/96, MLP ratio 3
    dims, grids, depth, area = (48, 96), (16, 8), (4, 2), 16
    stem = 48 * 3 * 2 * 2 * 16 * 16
    merges = grids[1] ** 2 * 4 * dims[0] * dims[1]
    head = 96 * 10
    stage_of = [s for s in range(2) for _ in range(depth[s])]
    dense = sum(_block_macs(grids[s] ** 2, dims[s], area, 3.0) for s in stage_of)
    assert sp.count_flops(model).macs == stem + merges + head + dense

    plan = sp.PruningPlan(locations=(0, 1, 4, 5), keep=(0.5, 0.25, 0.5, 0.25), method="norm")  # no matmul in norm
    sp.prune(model, plan)
    tokens = plan.tokens_per_block(model)
    assert tokens == (8 * 16, 4 * 16, 4 * 16, 4 * 16, 2 * 16, 16)
    blocks = sum(_block_macs(n, dims[s], area, 3.0) for n, s in zip(tokens, stage_of, strict=True))
    assert sp.count_flops(model).macs == stem + merges + head + blocks


@pytest.mark.parametrize("first_block", [0, 3, 4])
def test_search_cache_and_rest_give_the_full_forward(first_block):
    model = _make("swin_demo")
    plan = sp.PruningPlan(locations=(4,), keep=(0.5,), method="norm") if first_block == 4 else \
        sp.PruningPlan(locations=(3, 4), keep=(0.75, 0.5), method="norm")  # fmt: skip
    images = _image(model, 6)
    sp.prune(model, plan)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    evaluator = PlanEvaluator(sp.unprune(copy.deepcopy(model)), images, labels, first_block, batch_size=4)
    assert evaluator.evaluate(plan) == 100.0


def test_fine_tuned_checkpoint_loads_back(tmp_path):
    model = _make("swin_demo")
    plan = _plan("swin_demo", method="spvit")
    sp.prune(model, plan)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = sp.models.build_model("swin_demo_digits", tmp_path / "m.pt", plan=plan).eval()
    x = _image(model, 2)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(sp.models.ModelError, match=r"selectors before blocks \[1, 4\]"):
        sp.models.build_model(
            "swin_demo_digits", tmp_path / "m.pt", plan=sp.PruningPlan(locations=(1, 3), keep=(0.5, 0.5))
        )


@pytest.mark.parametrize("method", ["spvit", "norm"])
def test_onnx_and_tflite_of_pruned_swin_t_match_torch(tmp_path, method):
    from spvit_search.export import export_tflite, onnx_max_abs_diff, tflite_runner

    model = _make("swin_t")
    # the stem ends in a LayerNorm: at random init every token's norm is the same, so 'norm' starts at block 1
    sp.prune(model, _plan("swin_t", method=method, **({"locations": (1, 3, 4, 7)} if method == "norm" else {})))
    images = _image(model, 1)
    assert onnx_max_abs_diff(model, sp.export_onnx(model, tmp_path / "m.onnx"), images) <= 1e-4
    if method == "spvit":  # one TFLite conversion: about a minute on two cores
        with torch.no_grad():
            expected = model(images).numpy()
        out = tflite_runner(export_tflite(model, tmp_path / "m.tflite"))(images.numpy())
        assert abs(out - expected).max() <= 1e-4
