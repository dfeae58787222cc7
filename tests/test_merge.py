"""Token merging (method ``tome``): the matching, the size-weighted merge, proportional attention."""

import pytest
import timm
import torch
import torch.nn.functional as F

import spvit_search as sp
from spvit_search.plan import PlanError, kept_count
from spvit_search.pruning.merge import bipartite_merge, merge_rounds, tome_schedule


def _merge_by_loops(x, size, metric, r):
    """One image at a time, token by token: what bipartite soft matching is defined to do."""
    out_x, out_size = [], []
    for img in range(x.shape[0]):
        m = F.normalize(metric[img], dim=-1)
        a, b = list(range(0, x.shape[1], 2)), list(range(1, x.shape[1], 2))
        best = {i: max(b, key=lambda j, i=i: float(m[i] @ m[j])) for i in a}
        ranked = sorted(a, key=lambda i: -float(m[i] @ m[best[i]]))
        sums = {j: x[img, j] * size[img, j] for j in b}
        sizes = {j: size[img, j].clone() for j in b}
        for i in ranked[:r]:
            sums[best[i]] = sums[best[i]] + x[img, i] * size[img, i]
            sizes[best[i]] = sizes[best[i]] + size[img, i]
        rows = [x[img, i] for i in ranked[r:]] + [sums[j] / sizes[j] for j in b]
        out_x.append(torch.stack(rows))
        out_size.append(torch.stack([size[img, i] for i in ranked[r:]] + [sizes[j] for j in b]))
    return torch.stack(out_x), torch.stack(out_size)


def test_bipartite_merge_is_the_size_weighted_matching_it_defines():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 8, generator=gen)
    size = torch.randint(1, 4, (3, 11, 1), generator=gen).float()
    metric = torch.randn(3, 11, 5, generator=gen)
    for r in (1, 3, 5):
        merged, merged_size, _ = bipartite_merge(x, size, metric, r)
        expected, expected_size = _merge_by_loops(x, size, metric, r)
        assert merged.shape == (3, 11 - r, 8)
        assert torch.allclose(merged, expected, atol=1e-6)
        assert torch.equal(merged_size, expected_size)
        assert torch.equal(merged_size.sum(dim=1), size.sum(dim=1))  # every patch is still counted once


def test_merged_twins_with_proportional_attention_equal_the_unmerged_sequence():
    """A token that stands for s identical patches must weigh in attention as those s patches did."""
    block = timm.create_model("deit_tiny_patch16_224").blocks[0].eval()
    gen = torch.Generator().manual_seed(1)
    twins = torch.randn(2, 8, 192, generator=gen).repeat_interleave(2, dim=1)  # a0 b0 a1 b1 …: a_i == b_i
    cls = torch.randn(2, 1, 192, generator=gen)
    merged, size, _ = bipartite_merge(twins, torch.ones(2, 16, 1), twins, r=8)
    assert torch.equal(size, torch.full((2, 8, 1), 2.0))
    full = torch.cat([cls, twins], dim=1)
    halved = torch.cat([cls, merged], dim=1)
    bias = torch.log(torch.cat([torch.ones(2, 1, 1), size], dim=1))[:, None, None, :, 0]
    with torch.no_grad():
        expected = block(full)[:, 0]
        got = block(halved, attn_mask=bias)[:, 0]
        without = block(halved)[:, 0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(without, expected, atol=1e-3)  # the bias is what makes them equal


def test_a_stage_below_half_merges_in_rounds_to_the_plans_count():
    assert merge_rounds(196, 40) == [98, 49, 9]
    assert merge_rounds(10, 10) == []
    model = timm.create_model("deit_tiny_patch16_224", img_size=112).eval()
    plan = sp.PruningPlan(locations=(0, 5), keep=(0.2, 0.1), method="tome")
    sp.prune(model, plan)
    with torch.no_grad():
        model(torch.randn(2, 3, 112, 112))
    state = sp.pruning_state(model)
    assert state.token_counts == list(plan.tokens_per_block(model))
    assert state.token_counts[-1] == 1 + kept_count(0.1, 49)
    assert torch.equal(state.token_size.sum(dim=1), torch.full((2, 1), 50.0))


def test_merging_is_fine_tunable_and_the_same_in_train_and_eval():
    model = timm.create_model("deit_tiny_patch16_224", img_size=112, drop_rate=0.0, drop_path_rate=0.0)
    sp.prune(model, sp.PruningPlan(locations=(3, 6), keep=(0.6, 0.3), method="tome"))
    x = torch.randn(2, 3, 112, 112)
    model.train()
    out = model(x)
    out.sum().backward()
    assert model.blocks[10].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the merges
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), out, atol=1e-5)


def test_average_pooled_models_weigh_merged_tokens_by_their_patches():
    model = timm.create_model("vit_small_patch16_224", class_token=False, global_pool="avg", img_size=96).eval()
    sp.prune(model, sp.PruningPlan(locations=(2,), keep=(0.5,), method="tome"))
    seen = {}
    model.norm.register_forward_hook(lambda m, args, out: seen.update(tokens=out))
    model.fc_norm.register_forward_hook(lambda m, args, out: seen.update(pooled=args[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 96))
    size = sp.pruning_state(model).token_size
    assert size.shape == (1, 18, 1) and size.sum() == 36 and size.max() > 1
    weighted = (seen["tokens"] * size).sum(dim=1) / size.sum(dim=1)
    assert torch.allclose(seen["pooled"], weighted, atol=1e-6)
    assert not torch.allclose(seen["pooled"], seen["tokens"].mean(dim=1), atol=1e-4)


def test_the_canonical_schedule_removes_r_tokens_before_every_block():
    model = timm.create_model("deit_tiny_patch16_224", img_size=112).eval()
    plan = tome_schedule(len(model.blocks), 49, r=4)
    sp.prune(model, plan)
    with torch.no_grad():
        model(torch.randn(1, 3, 112, 112))
    assert sp.pruning_state(model).token_counts == [1 + 49 - 4 * i for i in range(12)]
    with pytest.raises(PlanError, match="does not fit"):
        tome_schedule(12, 49, r=5)  # 49 − 11·5 < 1
