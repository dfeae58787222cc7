"""The smaller-dense baseline: shallower copies of the teacher, picked by measured latency, distilled."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from spvit_search.cli import main
from spvit_search.models import build_model, create_model
from spvit_search.smaller import DepthCandidate, ShrinkError, evenly_spaced, pick_depth, shallower

MODEL = "vit_demo_digits"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    torch.save({"model": create_model(MODEL).state_dict()}, path)
    return path


def test_blocks_are_spread_evenly_first_and_last_kept():
    assert evenly_spaced(6, 6) == (0, 1, 2, 3, 4, 5)
    assert evenly_spaced(6, 3) == (0, 2, 5) and evenly_spaced(6, 2) == (0, 5) and evenly_spaced(6, 1) == (5,)
    assert evenly_spaced(12, 4) == (0, 4, 7, 11)
    with pytest.raises(ShrinkError, match="cannot keep 7 of 6"):
        evenly_spaced(6, 7)


def test_shallower_model_inherits_the_teachers_blocks(teacher):
    full = create_model(MODEL, checkpoint=teacher).eval()
    same, blocks = shallower(MODEL, teacher, 6)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same(x), full(x)) and blocks == tuple(range(6))
    small, blocks = shallower(MODEL, teacher, 3)
    assert len(small.blocks) == 3 and blocks == (0, 2, 5)
    for new, old in enumerate(blocks):
        for (name, p), (_, q) in zip(small.blocks[new].named_parameters(), full.blocks[old].named_parameters(),
                                     strict=True):  # fmt: skip
            assert torch.equal(p, q), name
    assert torch.equal(small.head.weight, full.head.weight) and torch.equal(small.pos_embed, full.pos_embed)
    # the same by hand: the stem, three of the blocks, the norm and the head
    with torch.no_grad():
        t = full.norm_pre(full._pos_embed(full.patch_embed(x)))
        for i in blocks:
            t = full.blocks[i](t)
        assert torch.allclose(small(x), full.forward_head(full.norm(t)), atol=1e-6)


def test_shrink_measures_every_depth_and_takes_the_deepest_that_fits(tmp_path, teacher):
    runner = CliRunner()
    out = tmp_path / "small.pt"
    done = runner.invoke(main, ["shrink", "--model", MODEL, "--checkpoint", str(teacher), "--target-ms", "1e6",
                                "--rounds", "3", "--runs", "5", "--out", str(out), "--json"])  # fmt: skip
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    measured = {c["depth"]: c["measured_ms"] for c in summary["candidates"]}
    assert sorted(measured) == [1, 2, 3, 4, 5, 6] and summary["depth"] == 6  # everything fits a huge budget
    assert measured[6] > 2 * measured[1]  # six blocks cost more than one (real timings, generous margin)
    cands = [DepthCandidate(c["depth"], tuple(c["blocks"]), c["gmacs"], c["measured_ms"]) for c in
             summary["candidates"]]  # fmt: skip
    budget = sorted(measured.values())[2]
    chosen = pick_depth(cands, budget)
    assert chosen.measured_ms <= budget
    assert all(c.measured_ms > budget for c in cands if c.depth > chosen.depth)
    # a budget below one block is refused with the fastest measurement; --depth takes that many blocks
    low = runner.invoke(main, ["shrink", "--model", MODEL, "--checkpoint", str(teacher), "--target-ms",
                               str(min(measured.values()) / 10), "--rounds", "2", "--runs", "3"])  # fmt: skip
    assert low.exit_code == 2 and "no depth fits" in low.output and "1 block(s), measured" in low.output
    fixed = runner.invoke(main, ["shrink", "--model", MODEL, "--checkpoint", str(teacher), "--depth", "4",
                                 "--out", str(out)])  # fmt: skip
    assert fixed.exit_code == 0, fixed.output
    assert len(build_model(MODEL, out).blocks) == 4  # the checkpoint's depth is read back
    both = runner.invoke(main, ["shrink", "--model", MODEL, "--checkpoint", str(teacher)])
    assert both.exit_code == 2 and "give --target-ms" in both.output


def test_a_shallower_model_is_distilled_and_exported(tmp_path, teacher):
    runner = CliRunner()
    small = tmp_path / "small.pt"
    assert runner.invoke(main, ["shrink", "--model", MODEL, "--checkpoint", str(teacher), "--depth", "3",
                                "--out", str(small)]).exit_code == 0  # fmt: skip
    out = tmp_path / "distilled"
    done = runner.invoke(main, ["train", "--model", MODEL, "--checkpoint", str(small), "--teacher", str(teacher),
                                "--out", str(out), "--epochs", "1", "--train-subset", "256", "--lr", "2e-4",
                                "--warmup-epochs", "0"])  # fmt: skip
    assert done.exit_code == 0, done.output
    with (out / "metrics.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["distill"]) > 0 and float(row["tokens"]) > 0  # logits and patch tokens distilled
    trained = build_model(MODEL, out / "model.pt")
    assert len(trained.blocks) == 3
    assert not torch.equal(trained.blocks[0].attn.qkv.weight, build_model(MODEL, small).blocks[0].attn.qkv.weight)
    exported = runner.invoke(main, ["export", "--model", MODEL, "--checkpoint", str(out / "model.pt"),
                                    "--out", str(tmp_path / "small.onnx")])  # fmt: skip
    assert exported.exit_code == 0 and "same top-1 on 400/400 images" in exported.output, exported.output
