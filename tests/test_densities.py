"""One weight-shared model, several operating points: set_keep, density lists, training every path."""

from __future__ import annotations

import copy
import csv
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import spvit_search as sp
from spvit_search.cli import main
from spvit_search.densities import check_densities, parse_densities, step_paths
from spvit_search.models import build_model, create_model, read_state
from spvit_search.plan import PlanError
from spvit_search.train import TrainConfig, TrainError, fit

MODEL = "vit_demo_digits"
PLAN = sp.PruningPlan(locations=(2, 3, 5), keep=(0.5, 0.25, 0.125), model=MODEL)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model(MODEL, num_classes=10).eval()


def test_density_lists_are_checked_sorted_and_named_where_wrong():
    got = parse_densities("0.5,0.25,0.125; 0.9,0.8,0.7;0.5,0.25,0.125", PLAN)
    assert got == ((0.9, 0.8, 0.7), (0.5, 0.25, 0.125))  # densest first, duplicates dropped
    with pytest.raises(PlanError, match=r"density 2 \[0.5, 0.25\] has 2 keep ratios; the plan has 3 locations"):
        parse_densities("0.9,0.8,0.7;0.5,0.25", PLAN)
    with pytest.raises(PlanError, match=r"density 1 \('0.9,x,0.7'\) is not a comma-separated list"):
        parse_densities("0.9,x,0.7", PLAN)
    with pytest.raises(PlanError, match="keep ratios must be in"):
        parse_densities("0.9,0.8,1.5", PLAN)
    with pytest.raises(PlanError, match="keeps every token"):
        parse_densities("1,1,1", PLAN)
    with pytest.raises(PlanError, match="'evit' has none"):
        check_densities(((0.9, 0.8, 0.7),), PLAN.replace(method="evit"))


def test_each_step_trains_the_dense_path_first_and_the_sparsest_always():
    ops = ((0.9, 0.8, 0.7), (0.7, 0.5, 0.3), (0.6, 0.4, 0.2), (0.5, 0.25, 0.125))
    assert step_paths(ops, 0, random.Random(0)) == [None, *ops]
    drawn = set()
    for seed in range(30):
        paths = step_paths(ops, 2, random.Random(seed))
        assert len(paths) == 3 and paths[0] is None and paths[-1] == ops[-1] and paths[1] in ops[:-1]
        drawn.add(paths[1])
    assert drawn == set(ops[:-1])  # every other density gets its turn


def test_set_keep_switches_counts_in_place_and_keep_one_is_the_dense_model():
    model = _model()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    sp.prune(model, PLAN.replace(package_token=False))
    selectors = [model.blocks[i].token_selector for i in PLAN.locations]
    with torch.no_grad():
        for keep in ((0.9, 0.8, 0.7), (0.3, 0.09, 0.027), (1.0, 1.0, 1.0), (0.5, 0.25, 0.125)):
            out = sp.set_keep(model, keep)(x)
            assert [model.blocks[i].token_selector for i in PLAN.locations] == selectors  # same modules
            plan = PLAN.replace(keep=keep, package_token=False)
            assert sp.pruning_state(model).token_counts == list(plan.tokens_per_block(model))
            fresh = sp.prune(copy.deepcopy(reference), plan)
            fresh.load_state_dict(model.state_dict())
            assert torch.allclose(out, fresh(x), atol=1e-5), keep  # equals a model pruned at that keep
            if keep == (1.0, 1.0, 1.0):
                assert (out - reference(x)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="not pruned"):
        sp.set_keep(reference, (0.5, 0.25, 0.125))


def test_weight_shared_fine_tune_trains_every_path_and_saves_the_plans_point(tmp_path):
    teacher = _model(1)
    ops = ((0.8, 0.64, 0.512), (0.5, 0.25, 0.125))
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, train_subset=64, augment=False, densities=ops,
                      ratio_weight=5.0, selector_hint_weight=1.0)  # fmt: skip
    student = sp.prune(copy.deepcopy(teacher), PLAN)
    before = copy.deepcopy(student.state_dict())
    result = fit(student, "demo", cfg, tmp_path / "shared", model_name=MODEL, plan=PLAN, teacher=teacher,
                 progress=False)  # fmt: skip
    assert student.spvit_plan.keep == PLAN.keep  # left at the plan's own operating point
    with (tmp_path / "shared" / "metrics.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert [round(float(k), 2) for k in row["kept"].split("/")] == [0.5, 0.25, 0.12]  # the sparsest path logged
    assert all(float(row[k]) > 0 for k in ("distill", "tokens", "hint"))  # the hint on every sparse path
    assert float(row["ratio"]) == 0  # no ratio loss in weight-shared training (densities.py says why)
    saved = torch.load(result.model_file, weights_only=True)
    assert [tuple(k) for k in saved["config"]["densities"]] == list(ops)
    moved = [k for k, v in read_state(result.model_file).items() if not torch.equal(v, before[k])]
    assert any(".token_selector." in k for k in moved) and any(k.startswith("blocks.0.") for k in moved)
    # the checkpoint serves each density through the same selectors
    loaded = build_model(MODEL, result.model_file, PLAN).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for keep in ops:
            assert torch.isfinite(sp.set_keep(loaded, keep)(x)).all()
    with pytest.raises(TrainError, match="learned selectors"):
        fit(sp.prune(_model(), PLAN.replace(method="evit")), "demo", cfg, tmp_path / "evit", model_name=MODEL,
            plan=PLAN.replace(method="evit"), progress=False)  # fmt: skip


def test_finetune_cli_takes_densities_and_refuses_bad_ones(tmp_path):
    runner = CliRunner()
    dense = tmp_path / "dense.pt"
    torch.save({"model": _model().state_dict()}, dense)
    plan_file = tmp_path / "plan.yaml"
    PLAN.save(plan_file)
    args = ["finetune", "--plan", str(plan_file), "--checkpoint", str(dense), "--out", str(tmp_path / "ft"),
            "--epochs", "1", "--train-subset", "64", "--batch-size", "32", "--no-augment"]  # fmt: skip
    bad = runner.invoke(main, [*args, "--densities", "0.9,0.8"])
    assert bad.exit_code != 0 and "density 1 [0.9, 0.8] has 2 keep ratios" in bad.output
    done = runner.invoke(main, [*args, "--densities", "0.9,0.8,0.7"])
    assert done.exit_code == 0, done.output
    assert "the dense path and 2 densities each step" in done.output  # the plan's own keep is added


def test_one_onnx_file_serves_every_density_and_matches_torch(tmp_path):
    from spvit_search.errors import SpvitError
    from spvit_search.export import export_onnx_switchable, onnx_session

    model = sp.prune(_model(), PLAN)
    path = export_onnx_switchable(model, tmp_path / "switchable.onnx", dynamic_batch=True)
    session = onnx_session(path)
    x = torch.randn(3, 3, 32, 32)
    for keep in ((0.9, 0.8, 0.7), (0.5, 0.25, 0.125), (0.3, 0.09, 0.027), (0.75, 0.6, 0.3)):
        with torch.no_grad():
            expected = sp.set_keep(model, keep)(x).numpy()
        out = session.run(None, {"image": x.numpy(), "keep": torch.tensor(keep).numpy()})[0]
        assert out.shape == expected.shape and abs(out - expected).max() <= 1e-4, keep
    assert model.spvit_plan.keep == (0.75, 0.6, 0.3)  # the export left the model as it was
    with pytest.raises(SpvitError, match="needs a pruned model"):
        export_onnx_switchable(_model(), tmp_path / "dense.onnx")
    with pytest.raises(SpvitError, match="pruned by tome: export each density instead"):
        export_onnx_switchable(sp.prune(_model(), PLAN.replace(method="tome", package_token=False)), tmp_path / "t")


def test_the_switchable_file_runs_a_static_graph_at_each_operating_point(tmp_path):
    import onnx

    from spvit_search.export import export_onnx, export_onnx_switchable, onnx_session

    model = sp.prune(_model(), PLAN)
    points = [(0.9, 0.8, 0.7), (0.5, 0.25, 0.125)]
    path = export_onnx_switchable(model, tmp_path / "branched.onnx", operating_points=points)
    plain = export_onnx_switchable(model, tmp_path / "dynamic.onnx")
    graph = onnx.load(path).graph
    assert [n.op_type for n in graph.node].count("If") == 1  # nested: one If per point, the dynamic graph last
    # each graph with its own weights (onnxruntime runs shared ones slower): three exports' worth
    assert 2.5 * plain.stat().st_size < path.stat().st_size < 3.5 * plain.stat().st_size
    session = onnx_session(path)
    x = torch.randn(1, 3, 32, 32)
    for keep in (*points, (0.75, 0.6, 0.3)):
        with torch.no_grad():
            expected = sp.set_keep(model, keep)(x).numpy()
        out = session.run(None, {"image": x.numpy(), "keep": np.asarray(keep, np.float32)})[0]
        assert abs(out - expected).max() <= 1e-4, keep
    # at an operating point the branch is that point's static export: the same graph, node for node
    sp.set_keep(model, points[1])
    static = onnx.load(export_onnx(model, tmp_path / "static.onnx")).graph
    second_if = next(a.g for a in graph.node[-1].attribute if a.name == "else_branch").node[0]
    branch = next(a.g for a in second_if.attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == [n.op_type for n in static.node]
    sp.set_keep(model, PLAN.keep)


def test_export_cli_writes_the_switchable_file_and_verifies_it(tmp_path):
    ckpt = tmp_path / "pruned.pt"
    model = sp.prune(_model(), PLAN)
    torch.save({"model": model.state_dict()}, ckpt)
    plan_file = tmp_path / "plan.yaml"
    PLAN.save(plan_file)
    runner = CliRunner()
    out = tmp_path / "sw.onnx"
    done = runner.invoke(main, ["export", "--plan", str(plan_file), "--checkpoint", str(ckpt), "--switchable",
                                "--out", str(out)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "input 'keep' takes 3 cumulative keep ratios" in done.output and "same top-1 on 400/400" in done.output
    branched = runner.invoke(main, ["export", "--plan", str(plan_file), "--checkpoint", str(ckpt), "--switchable",
                                    "--operating-points", "0.9,0.8,0.7;0.75,0.6,0.3", "--out", str(out)])  # fmt: skip
    assert branched.exit_code == 0, branched.output
    assert "static graphs for 2 of them" in branched.output and "same top-1 on 400/400" in branched.output
    tflite = runner.invoke(main, ["export", "--plan", str(plan_file), "--checkpoint", str(ckpt), "--switchable",
                                  "--format", "tflite", "--out", str(tmp_path / "sw.tflite")])  # fmt: skip
    assert tflite.exit_code != 0 and "TFLite needs static shapes" in tflite.output
