"""SPViT pruning on timm VisionTransformer models: equivalence, determinism, training signals."""

import copy
import math

import pytest
import timm
import torch
from conftest import ContentScorer, set_fused_attn
from torch import nn

import spvit_search as sp
from spvit_search.losses import ratio_loss
from spvit_search.plan import kept_count
from spvit_search.pruning.selector import MultiHeadTokenSelector

MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}),
    "layerscale": ("deit3_small_patch16_224", {}),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
}


def _make(key: str) -> nn.Module:
    name, kwargs = MODELS[key]
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():  # LayerScale starts near 0: give it weight so blocks really matter
        for m in model.modules():
            if hasattr(m, "gamma") and isinstance(m.gamma, nn.Parameter):
                m.gamma.uniform_(0.2, 1.0)
    return model.eval()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("key", list(MODELS))
def test_keep_one_without_package_equals_unpatched(key, fused):
    model = _make(key)
    set_fused_attn(model, fused)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
        for method in ("spvit", "hard", "evit", "tome"):
            plan = sp.PruningPlan(keep=(1.0, 1.0, 1.0), method=method, package_token=False)
            out = sp.prune(model, plan)(x)
            assert (out - expected).abs().max().item() <= 1e-5, method
            assert sp.pruning_state(model).token_counts == list(plan.tokens_per_block(model))
    assert type(model).__name__ == "Pruned" + type(reference).__name__
    sp.unprune(model)
    assert type(model) is type(reference)
    assert set(model.state_dict()) == set(reference.state_dict())


@pytest.mark.parametrize("method", ["spvit", "hard", "evit", "tome"])
@pytest.mark.parametrize("key", ["deit_small", "deit_distilled", "registers"])
def test_eval_is_deterministic_batch_consistent_and_counts_tokens(key, method):
    model = _make(key)
    plan = sp.PruningPlan(locations=(3, 6, 9), keep=(0.7, 0.49, 0.343), method=method)
    sp.prune(model, plan)
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        first = model(x)
        assert sp.pruning_state(model).token_counts == list(plan.tokens_per_block(model))
        second = model(x)
        alone = model(x[3:4])
    assert torch.equal(first, second)
    assert torch.allclose(alone[0], first[3], atol=1e-5, rtol=0)
    n_patches = model.patch_embed.num_patches
    last = plan.tokens_per_block(model)[-1]
    assert last == model.num_prefix_tokens + kept_count(0.343, n_patches) + (3 if plan.package_token else 0)


def test_training_masks_equal_inference_gather_for_the_same_decisions():
    """Masked training forward == gathered inference forward: one package-token definition."""
    model = _make("deit_tiny")
    plan = sp.PruningPlan(locations=(3, 6, 9), keep=(0.7, 0.49, 0.343), method="spvit")
    sp.prune(model, plan)
    for loc, keep in zip(plan.locations, plan.keep, strict=True):
        model.blocks[loc].token_selector.scorer = ContentScorer(model.embed_dim, kept_count(keep, 196))
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        gathered = model.eval()(x)
        masked = model.train()(x)
    state = sp.pruning_state(model)
    assert [int(d.sum(1)[0]) for d in state.decisions] == [137, 96, 67]
    assert state.policy.shape == (4, 1 + 196 + 3)
    assert (masked - gathered).abs().max().item() < 1e-3


def test_train_mode_gradients_reach_selector():
    model = _make("deit_tiny").train()
    sp.prune(model, sp.PruningPlan(keep=(0.7, 0.49, 0.343)))
    x, y = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))
    logits = model(x)
    state = sp.pruning_state(model)
    assert len(state.decisions) == 3 and state.policy.shape == (4, 1 + 196 + 3)
    loss = nn.functional.cross_entropy(logits, y) + ratio_loss(state)
    loss.backward()
    for loc in (3, 6, 9):
        grads = [p.grad for p in model.blocks[loc].token_selector.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0


def test_ratio_loss_moves_kept_fraction_toward_target():
    model = timm.create_model("deit_tiny_patch16_224", img_size=112).train()
    plan = sp.PruningPlan(keep=(0.8, 0.64, 0.5))
    sp.prune(model, plan)
    sp.pruning_state(model).train_count = "sampled"  # the count then follows the selector, steered by the loss
    with torch.no_grad():  # start far from the targets: keep 25% per stage
        for loc in plan.locations:
            model.blocks[loc].token_selector.scorer.out[-1].bias.copy_(torch.tensor([0.0, math.log(0.25 / 0.75)]))
    selector_params = [p for n, p in model.named_parameters() if "token_selector" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("token_selector" in n)
    opt = torch.optim.Adam(selector_params, lr=5e-3)
    x = torch.randn(16, 3, 112, 112)

    def gap() -> float:
        with torch.no_grad():
            model(x)
        st = sp.pruning_state(model)
        return sum(abs(f.mean().item() - t) for f, t in zip(st.kept_fraction, st.targets, strict=True))

    before = sum(gap() for _ in range(3)) / 3
    for _ in range(50):
        model(x)
        loss = ratio_loss(sp.pruning_state(model))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sum(gap() for _ in range(3)) / 3
    assert before > 0.3
    assert after < 0.5 * before


def test_reprune_same_layout_keeps_trained_selectors():
    model = _make("deit_tiny")
    sp.prune(model, sp.PruningPlan(keep=(0.7, 0.49, 0.343)))
    selector = model.blocks[3].token_selector
    sp.prune(model, sp.PruningPlan(keep=(0.9, 0.8, 0.7)))
    assert model.blocks[3].token_selector is selector and selector.keep == 0.9
    sp.prune(model, sp.PruningPlan(locations=(2, 5, 8), keep=(0.9, 0.8, 0.7)))
    assert "token_selector" not in model.blocks[3]._modules
    assert set(n.split(".")[1] for n, _ in model.named_parameters() if "token_selector" in n) == {"2", "5", "8"}


def test_unsupported_models_name_what_is_supported():
    with pytest.raises(sp.UnsupportedModelError, match=r"ResNet is not supported.*VisionTransformer"):
        sp.prune(timm.create_model("resnet18"), sp.PruningPlan())
    no_cls = timm.create_model("vit_small_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(sp.UnsupportedModelError, match="no class token"):
        sp.prune(no_cls, sp.PruningPlan(method="evit"))
    sp.prune(no_cls, sp.PruningPlan(method="spvit"))  # avg pooling without a class token works
    with torch.no_grad():
        assert no_cls.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(TypeError, match="PruningPlan"):
        sp.prune(no_cls, {"keep": [0.5]})


@pytest.mark.parametrize("count", ["exact", "sampled"])
def test_selectors_start_at_their_stage_keep_ratio(count):
    model = timm.create_model("deit_tiny_patch16_224", img_size=112).train()
    plan = sp.PruningPlan(keep=(0.7, 0.49, 0.343))
    sp.prune(model, plan)
    state = sp.pruning_state(model)
    state.train_count = count
    with torch.no_grad():
        fractions = [0.0, 0.0, 0.0]
        for _ in range(4):
            model(torch.randn(16, 3, 112, 112))
            for i, f in enumerate(state.differentiable_fraction):
                fractions[i] += f.mean().item() / 4
    assert fractions == pytest.approx(plan.keep, abs=0.05)


@pytest.mark.parametrize("method", ["spvit", "hard"])
def test_exact_training_keeps_the_inference_tokens(method):
    """Train mode keeps exactly the plan's count per image — the same tokens inference gathers."""
    torch.manual_seed(0)  # not the order the suite happens to run in
    model = timm.create_model("deit_tiny_patch16_224", img_size=112, drop_rate=0.0)
    plan = sp.PruningPlan(keep=(0.7, 0.49, 0.343), method=method)
    sp.prune(model, plan)
    # A fresh selector's scores are nearly tied: spread them so float noise cannot flip ranks, but
    # not so far that log σ saturates (at 200× the first stage's gap between its k-th and next
    # score fell to 6e-8 at seed 0, and a rank flipped between the masked and the gathered path;
    # at 20× the gap is 1e-3, and seeds 0-99 held).
    with torch.no_grad():
        for loc in plan.locations:
            model.blocks[loc].token_selector.scorer.out[-1].weight.mul_(20.0)
    x = torch.randn(6, 3, 112, 112)
    with torch.no_grad():
        gathered = model.eval()(x)
        masked = model.train()(x)
    state = sp.pruning_state(model)
    counts = [kept_count(k, 49) for k in plan.keep]
    assert [d.sum(dim=1).tolist() for d in state.decisions] == [[float(c)] * 6 for c in counts]
    assert [f.tolist() for f in state.kept_fraction] == [pytest.approx([c / 49] * 6) for c in counts]
    assert (masked - gathered).abs().max().item() < 1e-3  # same tokens, same package token, same logits


def test_exact_training_straight_through_reorders_the_ranking():
    """The selector learns which tokens to keep without the count moving: gradients reach it and
    a few steps on a loss that wants token-norm ranking change which tokens are kept."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=112).train()
    sp.prune(model, sp.PruningPlan(locations=(3,), keep=(0.5,)))
    for n, p in model.named_parameters():
        p.requires_grad_("token_selector" in n)
    x = torch.randn(8, 3, 112, 112)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def chosen() -> torch.Tensor:
        with torch.no_grad():
            model(x)
        return sp.pruning_state(model).decisions[0].detach().clone()

    before = chosen()
    for _ in range(10):
        logits = model(x)
        loss = -logits.logsumexp(dim=-1).mean()  # any loss that depends on which tokens are kept
        opt.zero_grad()
        loss.backward()
        assert model.blocks[3].token_selector.scorer.out[-1].weight.grad.abs().sum() > 0
        opt.step()
    after = chosen()
    assert (after.sum(dim=1) == before.sum(dim=1)).all() and (after.sum(dim=1) == kept_count(0.5, 49)).all()
    assert (after != before).any()


@pytest.mark.parametrize(("dim", "heads"), [(96, 3), (384, 6)])
def test_selector_lean_inference_path_equals_its_forward(dim, heads):
    """The stage reads ``keep_logp`` at inference; it must rank and weigh exactly as ``forward``."""
    torch.manual_seed(0)
    selector = MultiHeadTokenSelector(dim, heads).eval()
    with torch.no_grad():
        for p in selector.parameters():
            p.normal_(0, 0.5)
        x = 3 * torch.randn(4, 50, dim)
        assert (selector(x)[..., 1] - selector.keep_logp(x)).abs().max().item() < 1e-5
