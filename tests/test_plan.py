import pytest
import timm

from spvit_search import PlanError, PruningPlan
from spvit_search.plan import default_locations, kept_count


def test_defaults_and_method_package_token():
    assert PruningPlan().package_token is True
    assert PruningPlan(method="hard").package_token is False
    assert PruningPlan(method="evit").package_token is True
    assert PruningPlan(method="spvit", package_token=False).package_token is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"locations": (6, 3, 9)}, "strictly increasing"),
        ({"locations": (3, 3, 9)}, "strictly increasing"),
        ({"locations": (-1, 3, 9)}, ">= 0"),
        ({"keep": (0.7, 0.0, 0.0)}, "(0, 1]"),
        ({"keep": (1.2, 0.5, 0.3)}, "(0, 1]"),
        ({"keep": (0.7, 0.5)}, "one keep ratio per location"),
        ({"method": "tome2"}, "supported: spvit, hard, evit"),
        ({"method": "hard", "package_token": True}, "no package token"),
        ({"locations": (), "keep": ()}, "at least one"),
        ({"keep": ("a", 0.5, 0.3)}, "list of numbers"),
    ],
)
def test_invalid_plans_say_why(kwargs, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PruningPlan(**kwargs)


def test_location_outside_depth():
    model = timm.create_model("deit_tiny_patch16_224")
    with pytest.raises(PlanError, match="outside the model: it has 12 blocks"):
        PruningPlan(locations=(3, 6, 12)).tokens_per_block(model)


def test_keep_rising_on_one_grid_is_refused_with_the_model():
    """Whether a ratio may rise depends on the model's grids (a PiT stage starts again), so the
    family checks it when the plan meets the model."""
    plan = PruningPlan(keep=(0.7, 0.8, 0.3))
    with pytest.raises(PlanError, match=r"must not increase \(pruning is monotone\)"):
        plan.tokens_per_block(timm.create_model("deit_tiny_patch16_224"))


def test_tokens_per_block_deit():
    model = timm.create_model("deit_small_patch16_224")
    plan = PruningPlan(locations=(3, 6, 9), keep=(0.7, 0.49, 0.343))
    assert [kept_count(k, 196) for k in plan.keep] == [137, 96, 67]
    assert plan.tokens_per_block(model) == (197,) * 3 + (1 + 137 + 1,) * 3 + (1 + 96 + 2,) * 3 + (1 + 67 + 3,) * 3
    hard = plan.replace(method="hard", package_token=None)
    assert hard.tokens_per_block(model)[-1] == 1 + 67


def test_yaml_round_trip(tmp_path):
    plan = PruningPlan(
        locations=(2, 4),
        keep=(0.6, 0.36),
        method="evit",
        model="deit_tiny_patch16_224",
        device="local",
        target_ms=12.5,
        predicted_ms=12.1,
        lut={"path": "x.csv", "sha256": "ab"},
        block_tokens=(197, 197, 119),
    )
    path = plan.save(tmp_path / "plan.yaml")
    text = path.read_text()
    assert "tokens_per_block:" in text and "block_tokens" not in text
    assert PruningPlan.load(path) == plan
    assert PruningPlan.load(path).block_tokens == (197, 197, 119)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("locations: [3, 6, 9]\nkeep: [0.7, 0.5\nmethod: spvit\n")
    with pytest.raises(PlanError, match=r"bad\.yaml: not valid YAML at line \d+"):
        PruningPlan.load(path)


def test_unknown_keys_and_wrong_types_are_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("locations: [3, 6, 9]\nkeep: [0.7, 0.5, 0.3]\nkeep_ratio: 0.5\n")
    with pytest.raises(PlanError, match=r"p\.yaml: unknown keys \['keep_ratio'\]"):
        PruningPlan.load(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(PlanError, match="mapping"):
        PruningPlan.load(path)
    path.write_text("locations: 3\nkeep: [0.5]\n")
    with pytest.raises(PlanError, match="locations must be a list of integers"):
        PruningPlan.load(path)
    with pytest.raises(PlanError, match="does not exist"):
        PruningPlan.load(tmp_path / "missing.yaml")


def test_default_locations():
    assert default_locations(12, 3) == (3, 6, 9)
    assert default_locations(12, 1) == (6,)
    with pytest.raises(PlanError):
        default_locations(3, 3)


def test_without_idle_stages():
    plan = PruningPlan(locations=(2, 3, 5), keep=(0.5, 0.5, 0.25), method="spvit", model="m")
    trimmed = plan.without_idle_stages()
    assert trimmed.locations == (2, 5) and trimmed.keep == (0.5, 0.25) and trimmed.model == "m"
    assert PruningPlan(keep=(0.7, 0.49, 0.343)).without_idle_stages() == PruningPlan(keep=(0.7, 0.49, 0.343))
    dense = PruningPlan(keep=(1.0, 1.0, 1.0))
    assert dense.without_idle_stages() is dense
