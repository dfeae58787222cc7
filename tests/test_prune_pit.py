"""Token pruning on timm PoolingVisionTransformer (PiT): equivalence, grid restore, plan rules, FLOPs."""

import copy

import pytest
import timm
import torch
from conftest import ContentScorer, set_fused_attn
from torch import nn

import spvit_search as sp
from spvit_search.evaluate import PlanEvaluator
from spvit_search.losses import HandedGridMSE
from spvit_search.plan import PlanError, kept_count
from spvit_search.pruning import UnsupportedModelError, family_for

MODELS = {
    "pit_s": ("pit_s_224", {}),  # grids 27² → 14² → 7², blocks 0-1 | 2-7 | 8-11
    "pit_s_distilled": ("pit_s_distilled_224", {}),  # two class tokens
    "pit_ti": ("pit_ti_224", {}),
    "pit_demo": ("pit_demo_digits", {}),  # 15² → 8² → 4², blocks 0-2 | 3-5 | 6
}
#: PiT-S: one location per stage, the ratio rising from stage 1 to 2 (each is a fraction of its own
#: grid); the demo: two locations in stage 0, then stage 1 (evit cannot prune stage 2: one block)
PIT_S_PLAN = {"locations": (1, 4, 9), "keep": (0.7, 0.5, 0.6)}
DEMO_PLAN = {"locations": (1, 2, 4), "keep": (0.6, 0.5, 0.75)}


def _make(key: str) -> nn.Module:
    name, kwargs = MODELS[key]
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def _plan(key: str, **kwargs) -> sp.PruningPlan:
    return sp.PruningPlan(**{**(DEMO_PLAN if key == "pit_demo" else PIT_S_PLAN), **kwargs})


def _image(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, *sp.models.input_shape(model))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("key", list(MODELS))
def test_keep_one_without_package_equals_unpatched(key, fused):
    model = _make(key)
    set_fused_attn(model, fused)
    reference = copy.deepcopy(model)
    x = _image(model, 2)
    with torch.no_grad():
        expected = reference(x)
        for method in ("spvit", "hard", "evit"):
            plan = _plan(key, keep=(1.0, 1.0, 1.0), method=method, package_token=False)
            out = sp.prune(model, plan)(x)
            assert (out - expected).abs().max().item() <= 1e-5, method
            assert sp.pruning_state(model).token_counts == list(plan.tokens_per_block(model))
    assert type(model).__name__ == "Pruned" + type(reference).__name__
    sp.unprune(model)
    assert type(model) is type(reference)
    assert all(type(t) is type(r) for t, r in zip(model.modules(), reference.modules(), strict=True))
    assert set(model.state_dict()) == set(reference.state_dict())


@pytest.mark.parametrize("method", ["spvit", "hard", "evit"])
@pytest.mark.parametrize("key", ["pit_s", "pit_s_distilled"])
def test_eval_is_deterministic_batch_consistent_and_counts_tokens(key, method):
    model = _make(key)
    plan = _plan(key, method=method)
    sp.prune(model, plan)
    x = _image(model, 4)
    with torch.no_grad():
        first = model(x)
        assert sp.pruning_state(model).token_counts == list(plan.tokens_per_block(model))
        second = model(x)
        alone = model(x[2:3])
    assert torch.equal(first, second)
    assert torch.allclose(alone[0], first[2], atol=1e-5, rtol=0)
    tokens = plan.tokens_per_block(model)
    prefix = model.num_tokens
    packages = 1 if plan.package_token else 0
    assert tokens[1] == prefix + kept_count(0.7, 27 * 27) + packages
    # stage 2 starts from its full grid; stage 1's package rides in with the class tokens
    assert tokens[2] == prefix + packages + 14 * 14
    assert tokens[-1] == prefix + 2 * packages + kept_count(0.6, 7 * 7) + packages


@pytest.mark.parametrize("method", ["spvit", "hard"])
@pytest.mark.parametrize("key", ["pit_s_distilled", "pit_demo"])
def test_training_masks_mean_what_inference_gathers(key, method):
    """Masked tokens in training pass later blocks as parked ones skip them (unchanged, or moved by their package):
    the masked forward (exact top-k) and the gathered one give the same logits."""
    model = _make(key)
    plan = _plan(key, method=method)
    sp.prune(model, plan)
    layout = family_for(model).layout(model)
    blocks = family_for(model).blocks(model)
    for loc, keep in zip(plan.locations, plan.keep, strict=True):  # decisions robust to float noise
        stage = layout.stage_at(loc)
        blocks[loc].token_selector.scorer = ContentScorer(stage.dim, kept_count(keep, stage.patches))
    x = _image(model, 3)
    with torch.no_grad():
        model.train()
        masked = model(x)
        model.eval()
        gathered = model(x)
    assert (masked - gathered).abs().max().item() < 1e-3


def test_pruned_tokens_reenter_the_grid_unchanged():
    model = _make("pit_demo")
    dense = copy.deepcopy(model)
    # prune before block 1 of stage 0 (blocks 0-2): a parked token skips blocks 1 and 2
    sp.prune(model, sp.PruningPlan(locations=(1,), keep=(0.4,), method="hard"))
    seen = {}

    def keep_stage_output(module, args, output):
        seen["grid"] = output[0]
        seen["parked"] = [pos.clone() for _, pos in sp.pruning_state(model).parked]

    model.transformers[0].register_forward_hook(keep_stage_output)
    x = _image(model, 2)
    with torch.no_grad():
        model(x)
        after_block0 = family_for(dense).embed(dense, x, 1)[:, 1:]  # (B, 225, C), grid order
    grid = seen["grid"].flatten(2).transpose(1, 2)
    (positions,) = seen["parked"]
    assert positions.shape == (2, 225 - kept_count(0.4, 225))
    for b in range(2):
        parked = positions[b]
        assert torch.equal(grid[b, parked], after_block0[b, parked])
        kept = torch.tensor(sorted(set(range(225)) - set(parked.tolist())))
        assert (grid[b, kept] - after_block0[b, kept]).abs().amax(dim=1).min() > 1e-3  # went through blocks 1-2


@pytest.mark.parametrize("method", ["spvit", "evit"])
def test_a_learned_selector_s_pruned_tokens_reenter_moved_by_their_package(method):
    """SPViT's parked tokens come back plus what the skipped blocks added to their package token;
    EViT's fused token leaves its members unchanged."""
    model = _make("pit_demo")
    dense = copy.deepcopy(model)
    sp.prune(model, sp.PruningPlan(locations=(1,), keep=(0.4,), method=method))
    seen = {}

    def keep_stage_output(module, args, output):
        state = sp.pruning_state(model)
        seen["grid"], seen["packages"] = output[0], output[1][:, model.num_tokens :]
        seen["parked"] = [pos.clone() for _, pos in state.parked]
        seen["folded"] = [f[1].clone() for f in state.parked_packages if f is not None]

    model.transformers[0].register_forward_hook(keep_stage_output)
    x = _image(model, 2)
    with torch.no_grad():
        model(x)
        after_block0 = family_for(dense).embed(dense, x, 1)[:, 1:]
    grid = seen["grid"].flatten(2).transpose(1, 2)
    (positions,) = seen["parked"]
    index = positions[..., None].expand(-1, -1, grid.shape[-1])
    moved = grid.gather(1, index) - after_block0.gather(1, index)
    if method == "evit":
        assert seen["folded"] == [] and moved.abs().max().item() == 0.0
        return
    (folded,) = seen["folded"]
    update = seen["packages"][:, :1] - folded  # (B, 1, C): blocks 1 and 2 on the package token
    assert update.abs().max().item() > 1e-2
    torch.testing.assert_close(moved, update.expand_as(moved), atol=1e-5, rtol=0)


def test_grid_distillation_matches_the_grids_handed_to_pooling_and_trains_the_selector():
    """PiT's token distillation: zero for a student that computes what the teacher does; for a
    pruned student in training, the grids entering the pooling layers differ and the loss's gradient
    reaches the selector (through the mask) and the pruned stage's blocks."""
    teacher = _make("pit_demo")
    student = copy.deepcopy(teacher)
    twin = HandedGridMSE(family_for(student).handed_grids(student), family_for(teacher).handed_grids(teacher))
    x = _image(teacher, 4)
    twin.start()
    with torch.no_grad():
        teacher(x), student(x)
    assert twin.loss().item() == 0.0
    twin.remove()

    sp.prune(student, sp.PruningPlan(locations=(1, 4), keep=(0.5, 0.5), method="spvit")).train()
    grids = HandedGridMSE(family_for(student).handed_grids(student), family_for(teacher).handed_grids(teacher))
    grids.start()
    with torch.no_grad():
        teacher(x)
    student(x)
    loss = grids.loss()
    assert loss.item() > 1e-4
    loss.backward()
    blocks = family_for(student).blocks(student)
    selector = blocks[1].token_selector
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in selector.parameters())
    assert blocks[2].mlp.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="2 student and 0 teacher grids"):
        grids.start()
        student(x)
        grids.loss()


def test_plan_rules_per_grid():
    model = _make("pit_s")
    with pytest.raises(PlanError, match="must not increase within stage 1"):
        sp.prune(model, sp.PruningPlan(locations=(3, 5), keep=(0.5, 0.7)))
    sp.prune(model, sp.PruningPlan(locations=(1, 3), keep=(0.3, 0.9)))  # another grid: allowed
    with pytest.raises(PlanError, match="first block of the stage"):
        sp.prune(model, sp.PruningPlan(locations=(2,), keep=(0.5,), method="evit"))
    with pytest.raises(UnsupportedModelError, match="'tome' is not supported on PiT"):
        sp.prune(model, sp.PruningPlan(locations=(3,), keep=(0.5,), method="tome"))
    with pytest.raises(PlanError, match="it has 12 blocks"):
        sp.prune(model, sp.PruningPlan(locations=(12,), keep=(0.5,)))
    plan = sp.PruningPlan(locations=(1, 3, 5, 9), keep=(0.5, 0.8, 0.8, 0.5))
    assert plan.without_idle_stages(model).locations == (1, 3, 9)  # stage 1's second location keeps no fewer
    assert plan.without_idle_stages().locations == (1, 9)  # read as one grid, stage 1 would be lost


def _block_macs(n: int, c: int, mlp_ratio: float) -> int:
    return n * (3 * c * c + c * c + 2 * int(mlp_ratio * c) * c) + 2 * n * n * c


def test_flops_equal_an_analytic_count():
    model = _make("pit_demo")  # 3×32×32, 4×4 patches at stride 2, widths 48/96/192, MLP ratio 3
    dims, grids, depth = (48, 96, 192), (15, 8, 4), (3, 3, 1)
    stem = 48 * 3 * 4 * 4 * 15 * 15
    pools = sum(dims[i + 1] * 3 * 3 * grids[i + 1] ** 2 + dims[i] * dims[i + 1] for i in range(2))  # conv + fc
    head = 192 * 10
    stage_of = [s for s in range(3) for _ in range(depth[s])]
    dense = sum(_block_macs(1 + grids[s] ** 2, dims[s], 3.0) for s in stage_of)
    assert sp.count_flops(model).macs == stem + pools + head + dense

    plan = sp.PruningPlan(locations=(2, 4), keep=(0.5, 0.75), method="evit")  # one location per grid it prunes
    sp.prune(model, plan)
    tokens = plan.tokens_per_block(model)
    blocks = sum(_block_macs(n, dims[s], 3.0) for n, s in zip(tokens, stage_of, strict=True))
    # each stage: the class-token attention row over the tokens entering it, and the fused
    # (package) token, a weighted sum of the patches it prunes; packages ride with the class
    # tokens through the pooling layer's fc
    extras, carried = 0, 0
    for loc in plan.locations:
        s = stage_of[loc]
        prefix = 1 + carried
        n_in = tokens[loc - 1] - prefix
        kept = tokens[loc] - prefix - 1
        extras += tokens[loc - 1] * dims[s] + (n_in - kept) * dims[s]
        if s < 2:
            extras += dims[s] * dims[s + 1] * (carried + 1)  # this stage's class tokens through fc
            carried += 1
    assert sp.count_flops(model).macs == stem + pools + head + blocks + extras


@pytest.mark.parametrize("key", ["pit_demo", "pit_s_distilled"])
def test_search_cache_and_rest_give_the_full_forward(key):
    """The evaluator's cached prefix (family.embed) and the rest (family.forward_from) are the model,
    whether the cache ends at a stage's first block or inside a stage."""
    model = _make(key)
    locations, keep = ((4, 5), (0.5, 0.25)) if key == "pit_demo" else ((4, 9), (0.5, 0.6))
    plan = sp.PruningPlan(locations=locations, keep=keep, method="evit")
    images = _image(model, 6)
    sp.prune(model, plan)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    for first_block in (0, locations[0] - 1):
        evaluator = PlanEvaluator(sp.unprune(copy.deepcopy(model)), images, labels, first_block, batch_size=4)
        assert evaluator.evaluate(plan) == 100.0, first_block


@pytest.mark.parametrize("method", ["spvit", "evit"])
def test_onnx_and_tflite_of_pruned_pit_s_match_torch(tmp_path, method):
    from spvit_search.export import export_tflite, onnx_max_abs_diff, tflite_runner

    model = _make("pit_s")
    sp.prune(model, _plan("pit_s", method=method))
    images = _image(model, 1)
    assert onnx_max_abs_diff(model, sp.export_onnx(model, tmp_path / "m.onnx"), images) <= 1e-4
    if method == "spvit":  # one TFLite conversion: about a minute on two cores
        with torch.no_grad():
            expected = model(images).numpy()
        out = tflite_runner(export_tflite(model, tmp_path / "m.tflite"))(images.numpy())
        assert abs(out - expected).max() <= 1e-4
