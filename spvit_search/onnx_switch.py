"""One ONNX file that branches on its ``keep`` input: static graphs for the trained operating
points, the dynamic-count graph for any other keep.

Why: a graph whose token axes are dynamic costs 0.11-0.17 ms more on the 0.8 ms demo model
(11-22%), and 2-7% on DeiT-Ti (``benchmarks/switchable.py``). That is dynamic-shape kernels
and counts computed in the graph. An ``If`` on ``keep`` that runs a static export of the
operating point costs a few small nodes and the ``If``.

Each branch keeps its own copy of the weights, so the file holds them once per operating point
and once more for the dynamic graph. Shared ones (every initializer hoisted to the main graph by
its content: tried, not kept) ran the branches 1.01-1.17× slower than the static exports on
DeiT-Ti (1.06-1.26× on the demo model), the more the deeper the ``If`` is nested: onnxruntime
appears not to pre-pack weights that come from an outer scope. With their own weights the
branches ran at 0.96-1.00× the static exports.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import SpvitError

MATCH_TOLERANCE = 1e-6  # |keep − an operating point| under which its static branch runs


def branch_on_keep(dynamic: onnx.ModelProto, statics: list[tuple[tuple[float, ...], onnx.ModelProto]],
                   image: str, keep: str, output: str) -> onnx.ModelProto:  # fmt: skip
    """Merge ``dynamic`` (inputs ``image`` and ``keep``) and static exports of operating points
    (input ``image``) into one model with ``dynamic``'s inputs and output: keep equal to an
    operating point (within ``MATCH_TOLERANCE``) runs its static graph, any other the dynamic one."""
    branches = [_as_branch(m, f"p{i}", image, output) for i, (_, m) in enumerate(statics)]
    graph_out = dynamic.graph.output[0]
    initializers = [
        numpy_helper.from_array(np.asarray([p for p, _ in statics], np.float32), "points"),  # (P, S)
        numpy_helper.from_array(np.float32(MATCH_TOLERANCE), "match_tolerance"),
    ]
    nodes = [  # which operating point keep is, as few nodes as possible: each costs µs at run time
        helper.make_node("Sub", [keep, "points"], ["offsets"]),
        helper.make_node("Abs", ["offsets"], ["abs_offsets"]),
        helper.make_node("ReduceMax", ["abs_offsets"], ["max_offsets"], axes=[1], keepdims=0),
        helper.make_node("Less", ["max_offsets", "match_tolerance"], ["matches"]),
    ]
    for i in range(len(statics)):
        initializers.append(numpy_helper.from_array(np.int64(i), f"point_index{i}"))
        nodes.append(helper.make_node("Gather", ["matches", f"point_index{i}"], [f"is{i}"], axis=0))
    inner = _as_branch(dynamic, "dyn", image, output, keep)
    for i in reversed(range(len(statics))):
        node = helper.make_node("If", [f"is{i}"], [f"out{i}" if i else output], then_branch=branches[i],
                                else_branch=inner)  # fmt: skip
        if i == 0:
            nodes.append(node)
        else:
            inner = helper.make_graph([node], f"else{i}", [], [_value_like(graph_out, f"out{i}")])
    main = helper.make_graph(nodes, "switchable", list(dynamic.graph.input), [graph_out], initializer=initializers)
    merged = helper.make_model(main, opset_imports=dynamic.opset_import, producer_name="spvit-search")
    merged.ir_version = dynamic.ir_version
    onnx.checker.check_model(merged)
    return merged


def _value_like(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = name
    return copy


def _as_branch(model: onnx.ModelProto, prefix: str, image: str, output: str, *outer: str) -> onnx.GraphProto:
    """``model``'s graph as an ``If`` branch: no inputs (``image`` and the ``outer`` names come from
    the main graph), every other name, its weights' included, prefixed so branches cannot collide."""
    rename = {name: name for name in (image, *outer, "")}
    weights = []
    for init in model.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename[init.name] = f"{prefix}/{init.name}"
        weights.append(copy)
    nodes = []
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise SpvitError(f"{node.op_type} node {node.name!r} holds a subgraph: cannot branch on keep over it")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}/{node.name}"
        for names in (copy.input, copy.output):
            for j, name in enumerate(names):
                names[j] = rename.setdefault(name, f"{prefix}/{name}")
        nodes.append(copy)
    out = model.graph.output[0]
    if out.name != output:
        raise SpvitError(f"branch output {out.name!r}, expected {output!r}")
    return helper.make_graph(nodes, prefix, [], [_value_like(out, rename[output])], initializer=weights)
