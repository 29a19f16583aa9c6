"""The packed engine's graph as a specification (``onebit.engine.graph``).

What an attribute may hold, what :func:`validate` refuses (naming the node or tensor), the ranks
and packed layouts along edges, and each op's float semantics ``OPS[op].fn`` against plain torch
on the documented bit convention (bit set = -1, sign(0) = +1, channel ``c`` in word ``c // 64`` at
bit ``c % 64``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import sign_reference
from onebit.engine import graph as G
from onebit.engine import ops
from onebit.engine.graph import schema as S
from onebit.engine.graph.quantized import DerivedWeights
from onebit.engine.graph.ranks import expected_layout, layouts_match, output_rank, produced_layout

BACKENDS = ["reference"] + (["native"] if ops.native_available() else [])


# ---------------------------------------------------------------------------
# independent references: the bit convention written out naively


def naive_words(bits: torch.Tensor) -> torch.Tensor:
    """bool ``[..., C]`` -> int64 ``[..., ceil(C / 64)]``, channel by channel."""
    channels = bits.shape[-1]
    out = torch.zeros(*bits.shape[:-1], (channels + 63) // 64, dtype=torch.int64)
    for c in range(channels):
        out[..., c // 64] |= bits[..., c].to(torch.int64) << (c % 64)
    return out


def naive_pack(signs: torch.Tensor, padding=(0, 0), pad_value: float = 0.0, groups: int = 1) -> torch.Tensor:
    """+-1 (or any float) ``[N, C, H, W]`` -> ``[N, H + 2 ph, W + 2 pw, G, Wg]``: padded taps are -1 for a
    pad value of -1, else +1 (zero padding is the conv's correction, not the packing's)."""
    n, c, h, w = signs.shape
    ph, pw = padding
    padded = F.pad(sign_reference(signs), (pw, pw, ph, ph), value=-1.0 if pad_value < 0 else 1.0)
    bits = (padded < 0).permute(0, 2, 3, 1).reshape(n, h + 2 * ph, w + 2 * pw, groups, c // groups)
    return naive_words(bits)


def conv_weight_words(w: torch.Tensor) -> torch.Tensor:
    """float ``[C_out, C_in / G, KH, KW]`` -> the kernel form ``[C_out, KH, KW, Wg]`` of its signs."""
    return naive_words(w.permute(0, 2, 3, 1) < 0)


def pm1_conv(x, w, pad_value, padding, stride, dilation, groups) -> torch.Tensor:
    """The exact accumulators ``sum sign(x) sign(w)`` of the padded input, in float64."""
    xs = F.pad(sign_reference(x).double(), (padding[1], padding[1], padding[0], padding[0]), value=pad_value)
    return F.conv2d(xs, sign_reference(w).double(), None, stride, 0, dilation, groups)


def naive_thresholded(acc: torch.Tensor, thresholds: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """+-1 of each element: -1 iff ``acc < thr`` (direction +1) or ``acc > thr`` (direction -1), one by one."""
    out = torch.ones(acc.shape, dtype=torch.float32)
    for index in torch.cartesian_prod(*[torch.arange(s) for s in acc.shape]).reshape(-1, acc.dim()).tolist():
        value, c = acc[tuple(index)].item(), index[1]
        thr, d = thresholds[c].item(), direction[c].item()
        out[tuple(index)] = -1.0 if (value < thr if d > 0 else value > thr) else 1.0
    return out


def call(op: str, tensors: dict, attrs: dict, *inputs):
    """``OPS[op].fn`` on attributes checked as a graph node's are."""
    checked = G.attrs({"name": op, "op": op, "attrs": attrs})
    return G.OPS[op].fn(tensors, checked, *inputs)


# ---------------------------------------------------------------------------
# attribute checkers


@pytest.mark.parametrize(
    "check,value,normalised",
    [
        (S.integer(0, 5), 0, 0),
        (S.integer(0, 5), 5, 5),
        (S.pair(1, 4), [1, 4], [1, 4]),
        (S.number, 3, 3.0),
        (S.number, -2.5, -2.5),
        (S.non_negative, 0, 0.0),
        (S.positive, 1e-30, 1e-30),
        (S.optional_positive, None, None),
        (S.optional_positive, 2, 2.0),
        (S.boolean, False, False),
        (S.padding_value, 0, 0.0),
        (S.padding_value, 1, 1.0),
        (S.padding_value, -1.0, -1.0),
        (S.choice("zeros", "reflect"), "reflect", "reflect"),
        (S.optional(S.integer(1)), None, None),
        (S.optional(S.integer(1)), 3, 3),
        (S.int_list, [2, -1, 3], [2, -1, 3]),
        (S.conv_padding, "same", "same"),
        (S.conv_padding, "valid", "valid"),
        (S.conv_padding, [1, 2], [1, 2]),
    ],
)
def test_attribute_checkers_accept_and_normalise(check, value, normalised):
    got = check(value)
    assert got == normalised and type(got) is type(normalised)


@pytest.mark.parametrize(
    "check,value,message",
    [
        (S.integer(0, 5), -1, r"expected an integer in \[0, 5\], got -1"),
        (S.integer(0, 5), 6, r"expected an integer in \[0, 5\], got 6"),
        (S.integer(0, 5), True, r"expected an integer in \[0, 5\], got True"),
        (S.integer(0, 5), 2.0, r"expected an integer in \[0, 5\], got 2.0"),
        (S.integer(0, 5), "3", r"expected an integer in \[0, 5\], got '3'"),
        (S.pair(1, 4), (1, 2), r"expected a pair of integers, got \(1, 2\)"),
        (S.pair(1, 4), [1], r"expected a pair of integers, got \[1\]"),
        (S.pair(1, 4), [1, 2, 3], r"expected a pair of integers, got \[1, 2, 3\]"),
        (S.pair(1, 4), [0, 1], r"expected an integer in \[1, 4\], got 0"),
        (S.number, True, "expected a finite number, got True"),
        (S.number, math.nan, "expected a finite number, got nan"),
        (S.number, -math.inf, "expected a finite number, got -inf"),
        (S.number, "1", "expected a finite number, got '1'"),
        (S.number, None, "expected a finite number, got None"),
        (S.non_negative, -0.5, "expected a non-negative number, got -0.5"),
        (S.positive, 0, "expected a positive number, got 0.0"),
        (S.optional_positive, -1, "expected a positive number, got -1.0"),
        (S.boolean, 1, "expected true or false, got 1"),
        (S.boolean, "true", "expected true or false, got 'true'"),
        (S.padding_value, 0.5, "pad_value must be 0, 1 or -1, got 0.5"),
        (S.padding_value, 2, "pad_value must be 0, 1 or -1, got 2.0"),
        (S.padding_value, True, "expected a finite number, got True"),
        (S.choice("zeros", "reflect"), "wrap", r"expected one of \['zeros', 'reflect'\], got 'wrap'"),
        (S.optional(S.integer(1)), 0, r"expected an integer in \[1, 1073741824\], got 0"),
        (S.int_list, [], r"expected a list of integers, got \[\]"),
        (S.int_list, [1] * 9, r"expected a list of integers, got \[1, 1, 1"),
        (S.int_list, [4, -2], r"expected an integer in \[-1, 1073741824\], got -2"),
        (S.conv_padding, "full", "expected a pair of integers, got 'full'"),
    ],
)
def test_attribute_checkers_refuse_with_the_value_named(check, value, message):
    with pytest.raises(G.GraphError, match=f"^{message}"):
        check(value)


POOL = {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "ceil_mode": False}


def conv_attrs(cin: int, cout: int, *, k=3, padding=1, pad_value=0.0, groups=1, stride=1, dilation=1) -> dict:
    return {
        "in_channels": cin,
        "out_channels": cout,
        "kernel_size": [k, k],
        "stride": [stride, stride],
        "padding": [padding, padding],
        "dilation": [dilation, dilation],
        "groups": groups,
        "pad_value": pad_value,
    }


def test_a_nodes_attributes_are_checked_against_its_op_and_errors_name_the_node():
    assert G.attrs({"name": "a", "op": "leaky_relu", "attrs": {"negative_slope": 1}}) == {"negative_slope": 1.0}
    assert G.attrs({"name": "q", "op": "qlinear", "attrs": {"in_features": 3, "out_features": 2}}) == {
        "in_features": 3,
        "out_features": 2,
        "input_divisor": None,  # the op's default
    }
    cases = [
        ({"name": "a", "op": "gelu"}, r"^graph node 'a': unknown op 'gelu'$"),
        (
            {"name": "a", "op": "relu", "attrs": {"inplace": True}},
            "graph node 'a': unknown attribute 'inplace' for op relu",
        ),
        ({"name": "a", "op": "relu", "attrs": [1]}, "graph node 'a': attrs must be an object"),
        ({"name": "a", "op": "flatten", "attrs": {"start_dim": 1}}, "graph node 'a': missing attribute 'end_dim'"),
        (
            {"name": "p", "op": "pack", "attrs": {"padding": [1, 1], "pad_value": 0.5, "groups": 1}},
            "graph node 'p': attribute 'pad_value': pad_value must be 0, 1 or -1, got 0.5",
        ),
        (
            {"name": "h", "op": "hardtanh", "attrs": {"min_val": 1, "max_val": -1}},
            "graph node 'h': min_val 1.0 is greater than max_val -1.0",
        ),
        (
            {"name": "r", "op": "reshape", "attrs": {"shape": [-1, 2, -1]}},
            r"graph node 'r': shape \[-1, 2, -1\] has more than one -1",
        ),
        (
            {"name": "c", "op": "binary_conv2d", "attrs": dict(conv_attrs(6, 4), groups=4)},
            "graph node 'c': 6 -> 4 channels are not divisible by groups=4",
        ),
        (
            {"name": "m", "op": "max_pool2d", "attrs": {**POOL, "padding": [2, 2]}},
            r"graph node 'm': padding \[2, 2\] is more than half the kernel \[3, 3\]",
        ),
    ]
    for node, message in cases:
        with pytest.raises(G.GraphError, match=message):
            G.attrs(node)


# ---------------------------------------------------------------------------
# validate: a well-formed graph, then one defect at a time


def conv_graph() -> tuple[dict, dict]:
    """x [N, 4, H, W] -> pack (padding 1) -> binary_conv2d 4 -> 3 (3 x 3, scale) -> relu."""
    graph = {
        "input": {"name": "x", "rank": 4, "channels": 4, "dtype": "float32"},
        "nodes": [
            {"name": "xp", "op": "pack", "inputs": ["x"], "attrs": {"padding": [1, 1], "pad_value": 0.0, "groups": 1}},
            {
                "name": "conv",
                "op": "binary_conv2d",
                "inputs": ["xp"],
                "attrs": conv_attrs(4, 3),
                "tensors": {"weight": "conv.weight", "scale": "conv.scale"},
            },
            {"name": "y", "op": "relu", "inputs": ["conv"]},
        ],
        "outputs": ["y"],
    }
    tensors = {"conv.weight": conv_weight_words(torch.randn(3, 4, 3, 3)), "conv.scale": torch.rand(3)}
    return graph, tensors


def pooled_threshold_graph() -> tuple[dict, dict]:
    """x [N, 6, H, W] -> pack -> binary_conv2d_threshold 6 -> 5 -> max_pool_bits (2 x 2, out padding 1)
    -> binary_conv2d 5 -> 2."""
    threshold = {"out_padding": [0, 0], "out_pad_value": 0.0, "out_groups": 1}
    pool = {
        "channels": 5,
        "kernel_size": [2, 2],
        "stride": [2, 2],
        "padding": [0, 0],
        "dilation": [1, 1],
        "ceil_mode": False,
        "out_padding": [1, 1],
        "out_pad_value": 0.0,
        "out_groups": 1,
    }
    graph = {
        "input": {"name": "x", "rank": 4, "channels": 6, "dtype": "float32"},
        "nodes": [
            {"name": "xp", "op": "pack", "inputs": ["x"], "attrs": {"padding": [0, 0], "pad_value": 0.0, "groups": 1}},
            {
                "name": "c1",
                "op": "binary_conv2d_threshold",
                "inputs": ["xp"],
                "attrs": {**conv_attrs(6, 5, padding=0), **threshold},
                "tensors": {"weight": "c1.weight", "thresholds": "c1.thresholds", "direction": "c1.direction"},
            },
            {
                "name": "pool",
                "op": "max_pool_bits",
                "inputs": ["c1"],
                "attrs": pool,
                "tensors": {"or_mask": "pool.or_mask", "pad_words": "pool.pad_words"},
            },
            {
                "name": "c2",
                "op": "binary_conv2d",
                "inputs": ["pool"],
                "attrs": conv_attrs(5, 2),
                "tensors": {"weight": "c2.weight"},
            },
        ],
        "outputs": ["c2"],
    }
    direction = torch.tensor([1, -1, 1, 1, -1], dtype=torch.int8)
    tensors = {
        "c1.weight": conv_weight_words(torch.randn(5, 6, 3, 3)),
        "c1.thresholds": torch.tensor([0, 3, -3, 10, 1], dtype=torch.int32),
        "c1.direction": direction,
        "pool.or_mask": naive_words((direction < 0).view(1, 5)),
        "pool.pad_words": torch.zeros(1, 1, dtype=torch.int64),
        "c2.weight": conv_weight_words(torch.randn(2, 5, 3, 3)),
    }
    return graph, tensors


def test_the_example_graphs_are_valid_and_run():
    for build, x in ((conv_graph, torch.randn(2, 4, 5, 5)), (pooled_threshold_graph, torch.randn(1, 6, 8, 8))):
        graph, tensors = build()
        G.validate(graph, tensors)
        env = {"x": x}
        for node in graph["nodes"]:
            roles = {role: tensors[key] for role, key in node.get("tensors", {}).items()}
            env[node["name"]] = G.OPS[node["op"]].fn(roles, G.attrs(node), *[env[i] for i in node["inputs"]])
        assert env[graph["outputs"][0]].dtype == torch.float32


def _set(path, value):
    """A defect: ``graph[path...] = value`` (a path into the graph dict)."""

    def apply(graph, tensors):
        target = graph
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


def _tensor(key, value):
    def apply(graph, tensors):
        tensors[key] = value

    return apply


CONV_DEFECTS = {
    "unknown op": (_set(["nodes", 2, "op"], "gelu"), r"^graph node 'y': unknown op 'gelu'$"),
    "duplicate name": (_set(["nodes", 2, "name"], "conv"), r"^graph node 'conv': duplicate value name$"),
    "a node named as the input": (_set(["nodes", 0, "name"], "x"), r"^graph node 'x': duplicate value name$"),
    "nameless node": (_set(["nodes", 1, "name"], ""), r"^graph node 1 has no name$"),
    "undefined input": (
        _set(["nodes", 2, "inputs"], ["later"]),
        r"^graph node 'y': input 'later' is not defined before it$",
    ),
    "input defined after": (
        _set(["nodes", 1, "inputs"], ["y"]),
        r"^graph node 'conv': input 'y' is not defined before it$",
    ),
    "float into a binary conv": (
        _set(["nodes", 1, "inputs"], ["x"]),
        r"^graph node 'conv': op binary_conv2d expects a packed input, 'x' is float$",
    ),
    "packed into relu": (
        _set(["nodes", 2, "inputs"], ["xp"]),
        r"^graph node 'y': op relu expects a float input, 'xp' is packed$",
    ),
    "too many inputs": (
        _set(["nodes", 2, "inputs"], ["conv", "conv"]),
        r"^graph node 'y': op relu takes 1 inputs, got 2$",
    ),
    "packed with another padding": (
        _set(["nodes", 0, "attrs", "padding"], [0, 0]),
        r"^graph node 'conv': packed input 'xp' has a different layout than binary_conv2d expects$",
    ),
    "packed with another pad value": (
        _set(["nodes", 0, "attrs", "pad_value"], -1.0),
        r"^graph node 'conv': packed input 'xp' has a different layout than binary_conv2d expects$",
    ),
    "packed in other groups": (
        _set(["nodes", 0, "attrs", "groups"], 2),
        r"^graph node 'conv': packed input 'xp' has a different layout than binary_conv2d expects$",
    ),
    "float weight": (
        _tensor("conv.weight", torch.zeros(3, 3, 3, 1)),
        r"^graph node 'conv': tensor 'conv.weight' must be torch.int64, got torch.float32$",
    ),
    "weight shape": (
        _tensor("conv.weight", torch.zeros(3, 3, 3, 2, dtype=torch.int64)),
        r"^graph node 'conv': tensor 'conv.weight' must have shape \[3, 3, 3, 1\], got \[3, 3, 3, 2\]$",
    ),
    "scale shape": (
        _tensor("conv.scale", torch.ones(4)),
        r"^graph node 'conv': tensor 'conv.scale' must have shape \[3\], got \[4\]$",
    ),
    "missing weight": (
        _set(["nodes", 1, "tensors"], {"scale": "conv.scale"}),
        r"^graph node 'conv': missing tensor 'weight'$",
    ),
    "tensor not in the file": (
        _set(["nodes", 1, "tensors", "weight"], "nope"),
        r"^graph node 'conv': tensor 'weight' refers to 'nope', which is not in the file$",
    ),
    "unknown tensor role": (
        _set(["nodes", 1, "tensors", "gain"], "conv.scale"),
        r"^graph node 'conv': op binary_conv2d has no tensor 'gain'$",
    ),
    "unused tensor": (
        _tensor("extra", torch.zeros(2)),
        r"^tensors not used by the graph: \['extra'\]$",
    ),
    "packed output": (_set(["outputs"], ["xp"]), r"^graph output 'xp' is a packed value$"),
    "output is the input": (
        _set(["outputs"], ["x"]),
        r"^graph output 'x' is the graph's input itself, not computed by any of its nodes$",
    ),
    "undefined output": (_set(["outputs"], ["z"]), r"^graph output 'z' is not a defined value$"),
    "no outputs": (_set(["outputs"], []), r"^graph outputs must be a non-empty list of value names$"),
    "layout flag": (_set(["nodes", 1, "conv1d"], 1), r"^graph node 'conv': 'conv1d' must be true or false$"),
    "input rank": (_set(["input", "rank"], 1), r"^graph input: expected an integer in \[2, 8\], got 1$"),
    "input channel dim": (
        _set(["input", "channel_dim"], 2),
        r"^graph input: expected one of \[1, -1\], got 2$",
    ),
    "input dtype": (_set(["input", "dtype"], "float64"), r"^graph input dtype must be float32, got 'float64'$"),
    "output kind": (_set(["output_kind"], "set"), r"^unknown output_kind 'set'$"),
    "fallbacks": (
        _set(["fallbacks"], [{"module": "conv"}]),
        r"^graph fallbacks must be a list of \{module, reason\} strings$",
    ),
}


@pytest.mark.parametrize("defect", list(CONV_DEFECTS))
def test_validate_refuses_each_defect_naming_the_node_or_tensor(defect):
    graph, tensors = conv_graph()
    G.validate(graph, tensors)
    apply, message = CONV_DEFECTS[defect]
    apply(graph, tensors)
    with pytest.raises(G.GraphError, match=message):
        G.validate(graph, tensors)


THRESHOLD_DEFECTS = {
    "a direction of 0": (
        _tensor("c1.direction", torch.tensor([1, -1, 0, 1, -1], dtype=torch.int8)),
        r"^graph node 'c1': tensor 'c1.direction': direction must hold only \+1 and -1, got direction\[2\] = 0$",
    ),
    "a direction of 2": (
        _tensor("c1.direction", torch.tensor([1, -1, 1, 2, -1], dtype=torch.int8)),
        r"^graph node 'c1': tensor 'c1.direction': direction must hold only \+1 and -1, got direction\[3\] = 2$",
    ),
    "thresholds as int64": (
        _tensor("c1.thresholds", torch.zeros(5, dtype=torch.int64)),
        r"^graph node 'c1': tensor 'c1.thresholds' must be torch.int32, got torch.int64$",
    ),
    "or_mask bit beyond the channels": (
        _tensor("pool.or_mask", torch.tensor([[0b10_0010]], dtype=torch.int64)),
        r"^graph node 'pool': tensor 'pool.or_mask' has bits set beyond the 5 channels of a group$",
    ),
    "pad_words with the top bit": (
        _tensor("pool.pad_words", torch.tensor([[-(1 << 63)]], dtype=torch.int64)),
        r"^graph node 'pool': tensor 'pool.pad_words' has bits set beyond the 5 channels of a group$",
    ),
    "threshold channels unlike the reader's": (
        _set(["nodes", 3, "attrs", "in_channels"], 4),  # the packed value carries 5 channels
        r"^graph node 'c2': packed input 'pool' has a different layout than binary_conv2d expects$",
    ),
    "pool padding unlike the reader's": (
        _set(["nodes", 2, "attrs", "out_padding"], [0, 0]),
        r"^graph node 'c2': packed input 'pool' has a different layout than binary_conv2d expects$",
    ),
    "pool reading padded bits": (
        _set(["nodes", 1, "attrs", "out_padding"], [1, 1]),
        r"^graph node 'pool': packed input 'c1' has a different layout than max_pool_bits expects$",
    ),
}


@pytest.mark.parametrize("defect", list(THRESHOLD_DEFECTS))
def test_validate_refuses_bad_thresholds_directions_and_masks(defect):
    graph, tensors = pooled_threshold_graph()
    G.validate(graph, tensors)
    apply, message = THRESHOLD_DEFECTS[defect]
    apply(graph, tensors)
    with pytest.raises(G.GraphError, match=message):
        G.validate(graph, tensors)


def test_validate_refuses_a_graph_that_is_not_an_object_or_lacks_an_entry():
    with pytest.raises(G.GraphError, match="^the graph must be a JSON object$"):
        G.validate([], {})
    for key in ("input", "nodes", "outputs"):
        graph, tensors = conv_graph()
        del graph[key]
        with pytest.raises(G.GraphError, match=f"^the graph has no '{key}' entry$"):
            G.validate(graph, tensors)


def test_meta_tensors_get_the_dtype_and_shape_checks_but_not_the_value_checks():
    graph, tensors = pooled_threshold_graph()
    meta = {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in tensors.items()}
    G.validate(graph, meta)  # a direction of 0 would be refused, but a meta tensor has no values
    meta["c1.direction"] = torch.empty(4, dtype=torch.int8, device="meta")
    with pytest.raises(G.GraphError, match=r"tensor 'c1.direction' must have shape \[5\], got \[4\]"):
        G.validate(graph, meta)


# ---------------------------------------------------------------------------
# binary weight shapes: in memory (int64 words) and in files (compact uint8 bits)


@pytest.mark.parametrize(
    "attrs,kernel_shape,file_shape",
    [
        (conv_attrs(4, 3), (3, 3, 3, 1), (3, 5)),  # 4 * 9 = 36 bits: 5 bytes
        (conv_attrs(70, 20, groups=2), (20, 3, 3, 1), (20, 40)),  # 35 * 9 = 315 bits: 40 bytes
        (conv_attrs(130, 2, k=1, padding=0), (2, 1, 1, 3), (2, 17)),  # 130 bits: 3 words, 17 bytes
        ({"in_features": 100, "out_features": 7}, None, (7, 13)),
    ],
)
def test_binary_weight_shapes_in_memory_and_in_files(attrs, kernel_shape, file_shape):
    assert S.compact_shape(attrs) == file_shape
    if kernel_shape is not None:
        assert S.binary_weight_shape(attrs) == kernel_shape


def test_compact_true_checks_binary_weights_in_their_file_form():
    graph, tensors = conv_graph()
    compact = dict(tensors, **{"conv.weight": torch.zeros(3, 5, dtype=torch.uint8)})
    G.validate(graph, compact, compact=True)
    with pytest.raises(G.GraphError, match="tensor 'conv.weight' must be torch.uint8, got torch.int64"):
        G.validate(graph, tensors, compact=True)
    with pytest.raises(G.GraphError, match="tensor 'conv.weight' must be torch.int64, got torch.uint8"):
        G.validate(graph, compact)
    compact["conv.weight"] = torch.zeros(3, 4, dtype=torch.uint8)
    with pytest.raises(G.GraphError, match=r"tensor 'conv.weight' must have shape \[3, 5\], got \[3, 4\]"):
        G.validate(graph, compact, compact=True)
    compact["conv.weight"] = torch.zeros(3, 5, dtype=torch.uint8)
    compact["conv.scale"] = torch.zeros(3, dtype=torch.uint8)  # only binary weights change form
    with pytest.raises(G.GraphError, match="tensor 'conv.scale' must be torch.float32, got torch.uint8"):
        G.validate(graph, compact, compact=True)


# ---------------------------------------------------------------------------
# ranks along the edges


def chain(rank: int, channels: int, *nodes: dict) -> dict:
    """A float graph: an input of ``rank``, ``nodes`` in a row (each reading the one before)."""
    previous, out = "x", []
    for i, node in enumerate(nodes):
        out.append({"name": f"n{i}", "inputs": [previous], **node})
        previous = f"n{i}"
    return {
        "input": {"name": "x", "rank": rank, "channels": channels, "dtype": "float32"},
        "nodes": out,
        "outputs": [previous],
    }


FLOAT_CONV = {
    "op": "conv2d",
    "attrs": {
        **conv_attrs(2, 2, k=1, padding=0),
        "padding": [0, 0],
        "explicit_padding": [0, 0, 0, 0],
        "padding_mode": "zeros",
    },
    "tensors": {"weight": "w"},
}
CONV_TENSORS = {"w": torch.zeros(2, 2, 1, 1)}


def flatten(start: int, end: int) -> dict:
    return {"op": "flatten", "attrs": {"start_dim": start, "end_dim": end}}


def reshape(*shape: int) -> dict:
    return {"op": "reshape", "attrs": {"shape": list(shape)}}


def test_ranks_follow_the_input_and_a_2d_value_into_a_conv_is_refused():
    G.validate(chain(4, 2, FLOAT_CONV), CONV_TENSORS)
    with pytest.raises(
        G.GraphError, match=r"^graph node 'n0': op conv2d takes a rank-4 \[N, C, H, W\] input, got rank 2$"
    ):
        G.validate(chain(2, 2, FLOAT_CONV), CONV_TENSORS)
    with pytest.raises(G.GraphError, match=r"^graph node 'n0': op pack takes a rank-4 .* got rank 3$"):
        G.validate(chain(3, 2, {"op": "pack", "attrs": {"padding": [0, 0], "pad_value": 0.0, "groups": 1}}), {})
    # flatten(1, -1) of [N, C, H, W] is [N, C H W]; flatten(2, 3) is [N, C, H W]
    with pytest.raises(G.GraphError, match="^graph node 'n1': .* got rank 2$"):
        G.validate(chain(4, 2, flatten(1, -1), FLOAT_CONV), CONV_TENSORS)
    with pytest.raises(G.GraphError, match="^graph node 'n1': .* got rank 3$"):
        G.validate(chain(4, 2, flatten(2, 3), FLOAT_CONV), CONV_TENSORS)
    G.validate(chain(4, 2, flatten(3, 3), FLOAT_CONV), CONV_TENSORS)  # one dimension flattened: rank kept
    # reshape keeps the batch: [N] + shape
    G.validate(chain(2, 8, reshape(2, 2, 2), FLOAT_CONV), CONV_TENSORS)
    with pytest.raises(G.GraphError, match="^graph node 'n1': .* got rank 3$"):
        G.validate(chain(2, 8, reshape(2, -1), FLOAT_CONV), CONV_TENSORS)


def test_dims_out_of_range_and_flatten_order_are_refused_naming_the_node():
    softmax = {"op": "softmax", "attrs": {"dim": -2}}
    G.validate(chain(2, 3, softmax), {})
    with pytest.raises(G.GraphError, match="^graph node 'n0': dim 2 is out of range for a value of rank 2$"):
        G.validate(chain(2, 3, {"op": "softmax", "attrs": {"dim": 2}}), {})
    with pytest.raises(G.GraphError, match="^graph node 'n1': dim -3 is out of range for a value of rank 2$"):
        G.validate(chain(4, 3, flatten(1, 3), {"op": "roll", "attrs": {"shifts": 1, "dim": -3}}), {})
    with pytest.raises(
        G.GraphError, match="^graph node 'n0': start_dim 3 comes after end_dim 1 for a value of rank 4$"
    ):
        G.validate(chain(4, 3, flatten(3, 1)), {})
    bn = {
        "op": "batch_norm",
        "attrs": {"num_features": 1, "eps": 1e-5},
        "tensors": {"running_mean": "m", "running_var": "v"},
    }
    with pytest.raises(G.GraphError, match=r"^graph node 'n1': op batch_norm takes an input with a channel dimension"):
        G.validate(chain(2, 3, flatten(0, 1), bn), {"m": torch.zeros(1), "v": torch.ones(1)})


@pytest.mark.parametrize(
    "op,attrs,ranks,rank",
    [
        ("flatten", {"start_dim": 1, "end_dim": -1}, [4], 2),
        ("flatten", {"start_dim": 0, "end_dim": 2}, [5], 3),
        ("reshape", {"shape": [3, -1]}, [2], 3),
        ("add", {}, [4, 2], 4),  # broadcasting: the larger rank
        ("relu", {}, [3], 3),
        ("conv2d", {}, [4], 4),
        ("pack", {}, [4], None),  # packed: no float rank
        ("binary_conv2d", {}, [None], 4),
        ("binary_linear", {}, [None], 2),
        ("bitplane_conv2d", {"kernel_size": [1, 1]}, [2], 2),
        ("twist_mix", {}, [4, 4, 4], None),  # not in the table: later checks skip it
    ],
)
def test_output_rank(op, attrs, ranks, rank):
    assert output_rank(op, attrs, ranks) == rank


def test_output_rank_refuses_inputs_of_several_ranks_into_cat_and_a_2d_bitplane_conv_with_a_kernel():
    with pytest.raises(G.GraphError, match=r"^op cat takes inputs of one rank, got ranks \[4, 2\]$"):
        output_rank("cat", {"dim": 1}, [4, 2])
    with pytest.raises(G.GraphError, match="op bitplane_conv2d takes a rank-4 input"):
        output_rank("bitplane_conv2d", {"kernel_size": [3, 3]}, [2])


def test_packed_layouts_are_padding_pad_value_groups_and_channels():
    pack = {"op": "pack", "attrs": {"padding": [1, 2], "pad_value": -1.0, "groups": 2}}
    thresholded = {
        "op": "binary_conv2d_threshold",
        "attrs": {"out_padding": [1, 2], "out_pad_value": -1.0, "out_groups": 2, "out_channels": 6},
    }
    assert produced_layout(pack) == ((1, 2), -1.0, 2, None)  # a pack of any channel count
    assert produced_layout(thresholded) == ((1, 2), -1.0, 2, 6)
    assert produced_layout({"op": "pack_features", "attrs": {"features": 9}}) == ("features", 9)
    assert produced_layout({"op": "relu", "attrs": {}}) is None
    reader = {
        "op": "binary_conv2d",
        "attrs": {**conv_attrs(6, 4, padding=1, pad_value=-1.0, groups=2), "padding": [1, 2]},
    }
    assert expected_layout(reader) == ((1, 2), -1.0, 2, 6)
    assert layouts_match(produced_layout(pack), expected_layout(reader))
    assert layouts_match(produced_layout(thresholded), expected_layout(reader))
    assert not layouts_match(((1, 2), -1.0, 2, 4), expected_layout(reader))  # 4 channels where 6 are read
    assert not layouts_match(((1, 2), 0.0, 2, None), expected_layout(reader))
    linear = {"op": "binary_linear", "attrs": {"in_features": 9, "out_features": 2}}
    assert layouts_match(("features", 9), expected_layout(linear))
    assert not layouts_match(("features", 8), expected_layout(linear))
    assert not layouts_match(((0, 0), 0.0, 1, None), expected_layout(linear))


# ---------------------------------------------------------------------------
# each op's float semantics against plain torch


@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
def test_pack_is_the_bit_convention_over_padded_channels_in_groups(pad_value):
    x = torch.randn(2, 140, 3, 4)
    x[x.abs() < 0.2] = 0.0  # sign(0) = +1: bit clear
    x[0, 5, 1, 1] = -0.0
    attrs = {"padding": [1, 2], "pad_value": pad_value, "groups": 2}
    got = call("pack", {}, attrs, x)
    assert got.shape == (2, 5, 8, 2, 2)  # 70 channels a group: 2 words
    assert torch.equal(got, naive_pack(x, (1, 2), pad_value, 2))
    assert torch.equal(call("pack", {}, attrs, x.contiguous(memory_format=torch.channels_last)), got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
def test_binary_conv2d_is_the_conv_of_the_signs_times_scale_plus_bias(backend, pad_value):
    cin, cout, groups = 132, 6, 2  # 66 channels a group: two words, the second one partly used
    x, w = torch.randn(2, cin, 6, 7), torch.randn(cout, cin // groups, 3, 2)
    x[x.abs() < 0.1] = 0.0
    scale, bias = torch.rand(cout) + 0.5, torch.randn(cout)
    attrs = {**conv_attrs(cin, cout, pad_value=pad_value, groups=groups, stride=2), "kernel_size": [3, 2]}
    attrs.update(padding=[1, 2], dilation=[1, 2])
    acc = pm1_conv(x, w, pad_value, (1, 2), (2, 2), (1, 2), groups)
    tensors = {"weight": conv_weight_words(w), "scale": scale, "bias": bias}
    with ops.use_backend(backend):
        xp = call("pack", {}, {"padding": [1, 2], "pad_value": pad_value, "groups": groups}, x)
        got = call("binary_conv2d", tensors, attrs, xp)
        bare = call("binary_conv2d", {"weight": tensors["weight"]}, attrs, xp)
    assert torch.equal(got, acc.float() * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    assert torch.equal(bare, acc.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_conv2d_threshold_packs_the_thresholded_accumulators_for_the_next_layer(backend):
    cin, cout = 10, 70
    x, w = torch.randn(2, cin, 5, 5), torch.randn(cout, cin, 3, 3)
    acc = pm1_conv(x, w, -1.0, (1, 1), (1, 1), (1, 1), 1)
    thresholds = torch.randint(-12, 13, (cout,), dtype=torch.int32)
    direction = torch.where(torch.rand(cout) < 0.5, 1, -1).to(torch.int8)
    attrs = {
        **conv_attrs(cin, cout, pad_value=-1.0),
        "out_padding": [1, 0],
        "out_pad_value": -1.0,
        "out_groups": 2,
    }
    tensors = {"weight": conv_weight_words(w), "thresholds": thresholds, "direction": direction}
    with ops.use_backend(backend):
        xp = call("pack", {}, {"padding": [1, 1], "pad_value": -1.0, "groups": 1}, x)
        got = call("binary_conv2d_threshold", tensors, attrs, xp)
    signs = naive_thresholded(acc, thresholds, direction)
    assert torch.equal(got, naive_pack(signs, (1, 0), -1.0, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_pack_and_sign_threshold_compare_as_the_direction_says(backend):
    acc = torch.randint(-4, 5, (2, 5, 3, 3)).float()  # integer accumulators: ties with the thresholds
    thresholds = torch.tensor([0, 2, -1, 4, 0], dtype=torch.int32)
    direction = torch.tensor([1, -1, -1, 1, -1], dtype=torch.int8)
    t = {"thresholds": thresholds, "direction": direction}
    expected = naive_thresholded(acc, thresholds, direction)
    attrs = {"out_channels": 5, "out_padding": [1, 1], "out_pad_value": 1.0, "out_groups": 1}
    with ops.use_backend(backend):
        packed = call("threshold_pack", t, attrs, acc)
    assert torch.equal(packed, naive_pack(expected, (1, 1), 1.0, 1))
    assert torch.equal(call("sign_threshold", t, {"channels": 5}, acc), expected)
    as_int = call("sign_threshold", t, {"channels": 5}, acc.to(torch.int32))
    assert as_int.dtype == torch.int32 and torch.equal(as_int, expected.to(torch.int32))
    rows = acc[:, :, 0, 0]  # [N, C]: channels in dimension 1 for any rank
    assert torch.equal(call("sign_threshold", t, {"channels": 5}, rows), expected[:, :, 0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_bits_is_the_max_pool_of_the_accumulators_thresholded(backend):
    acc = torch.randint(-6, 7, (2, 5, 6, 7)).float()
    thresholds = torch.tensor([0, 1, -2, 3, 0], dtype=torch.int32)
    direction = torch.tensor([1, -1, 1, -1, -1], dtype=torch.int8)
    pool = {"kernel_size": [3, 2], "stride": [2, 2], "padding": [1, 0], "dilation": [1, 1], "ceil_mode": True}
    attrs = {**pool, "channels": 5, "out_padding": [1, 1], "out_pad_value": -1.0, "out_groups": 1}
    tensors = {
        "or_mask": naive_words((direction < 0).view(1, 5)),
        "pad_words": naive_words(torch.ones(1, 5, dtype=torch.bool)),  # pad value -1: every channel's bit
    }
    bits = naive_pack(naive_thresholded(acc, thresholds, direction))
    with ops.use_backend(backend):
        got = call("max_pool_bits", tensors, attrs, bits)
    pooled = F.max_pool2d(acc, [3, 2], [2, 2], [1, 0], ceil_mode=True)
    assert torch.equal(got, naive_pack(naive_thresholded(pooled, thresholds, direction), (1, 1), -1.0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_linear_and_its_thresholds_on_packed_features(backend):
    features, out = 70, 66
    x, w = torch.randn(3, features), torch.randn(out, features)
    x[0, :5] = 0.0
    scale, bias = torch.rand(out), torch.randn(out)
    acc = F.linear(sign_reference(x).double(), sign_reference(w).double())
    weight = naive_words(w < 0)
    thresholds = torch.randint(-8, 9, (out,), dtype=torch.int32)
    direction = torch.where(torch.rand(out) < 0.5, 1, -1).to(torch.int8)
    attrs = {"in_features": features, "out_features": out}
    with ops.use_backend(backend):
        xp = call("pack_features", {}, {"features": features}, x)
        y = call("binary_linear", {"weight": weight, "scale": scale, "bias": bias}, attrs, xp)
        bits = call(
            "binary_linear_threshold", {"weight": weight, "thresholds": thresholds, "direction": direction}, attrs, xp
        )
    assert torch.equal(xp, naive_words(x < 0))
    assert torch.equal(y, acc.float() * scale + bias)
    assert torch.equal(bits, naive_words(naive_thresholded(acc, thresholds, direction) < 0))


def test_pack_features_takes_rows_of_any_rank_and_names_a_wrong_feature_count():
    x = torch.randn(2, 3, 70)
    assert torch.equal(call("pack_features", {}, {"features": 70}, x), naive_words(x.reshape(6, 70) < 0))
    with pytest.raises(ValueError, match=r"expected 70 input features, got shape \[2, 3, 69\]"):
        call("pack_features", {}, {"features": 70}, torch.randn(2, 3, 69))


def test_qconv2d_and_qlinear_from_weight_bits_are_the_float_layer_of_the_signs():
    x, w = torch.randn(2, 6, 5, 5), torch.randn(4, 3, 3, 3)
    scale, bias = torch.rand(4), torch.randn(4)
    attrs = {
        **conv_attrs(6, 4, pad_value=-1.0, groups=2),
        "padding": [0, 0],
        "explicit_padding": [1, 1, 1, 1],
        "padding_mode": "zeros",
        "input_divisor": 3.0,
    }
    t = {"weight_bits": conv_weight_words(w), "scale": scale, "bias": bias}
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), sign_reference(w), None, 1, 0, 1, 2) / 3.0
    expected = expected * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    assert torch.equal(call("qconv2d", t, attrs, x), expected)
    assert torch.equal(call("qconv2d", {"weight": sign_reference(w), "scale": scale, "bias": bias}, attrs, x), expected)
    xl, wl = torch.randn(3, 70), torch.randn(5, 70)
    tl = {"weight_bits": naive_words(wl < 0), "bias": bias[:1].repeat(5)}
    got = call("qlinear", tl, {"in_features": 70, "out_features": 5}, xl)
    assert torch.equal(got, F.linear(xl, sign_reference(wl)) + tl["bias"])


def test_derived_weights_are_made_once_per_write_of_the_weight():
    weight, made = torch.arange(600, dtype=torch.int64), []

    def derive(bits):
        made.append(1)
        return bits * 2

    derived = DerivedWeights()
    first = derived.get(weight, derive)
    assert derived.get(weight, derive) is first and len(made) == 1
    weight[3] += 1  # a write the version counter sees
    assert torch.equal(derived.get(weight, derive), weight * 2) and len(made) == 2
    weight.data[-1] = -5  # a write behind the version counter, in a sampled word (the last)
    assert torch.equal(derived.get(weight, derive), weight * 2) and len(made) == 3
    assert derived.get(weight.clone(), derive) is not None and len(made) == 4  # another tensor: another address


def test_sign_dorefa_add_and_reshape_by_hand():
    x = torch.tensor([[-1.5, -0.0, 0.0, 2.0, -1e-30]])
    assert torch.equal(call("sign", {}, {}, x), torch.tensor([[-1.0, 1.0, 1.0, 1.0, -1.0]]))
    # 2 bits: 3 levels; clamp to [0, 1], * 3, round half to even, / 3
    d = call("dorefa", {}, {"bits": 2}, torch.tensor([-1.0, 0.2, 0.5, 0.9, 2.0]))
    assert torch.equal(d, torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0]) / 3)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(call("add", {}, {"other": 0.0, "alpha": 1.0}, a, b), a + b)
    assert torch.equal(call("add", {}, {"other": 0.0, "alpha": 2.0}, a, b), a + 2 * b)  # 2 b is exact
    assert torch.equal(call("add", {}, {"other": 0.5, "alpha": 1.0}, a), a + 0.5)
    assert torch.equal(call("mul", {}, {"other": 4.0}, a), a * 4)


def test_reshape_keeps_the_batch_and_infers_minus_one_also_in_an_empty_batch():
    x = torch.randn(3, 2, 3, 4)
    assert torch.equal(call("reshape", {}, {"shape": [-1, 4]}, x), x.view(3, 6, 4))
    assert torch.equal(call("reshape", {}, {"shape": [2, -1, 2]}, x), x.view(3, 2, 6, 2))
    empty = torch.randn(0, 2, 3, 4)
    with pytest.raises(RuntimeError):  # torch alone cannot infer the -1 of zero elements
        empty.reshape(0, -1, 4)
    assert call("reshape", {}, {"shape": [-1, 4]}, empty).shape == (0, 6, 4)
    assert call("reshape", {}, {"shape": [2, -1, 2]}, empty).shape == (0, 2, 6, 2)
    assert call("reshape", {}, {"shape": [24]}, empty).shape == (0, 24)


def test_validate_does_not_change_the_graph():
    graph, tensors = pooled_threshold_graph()
    before = copy.deepcopy(graph)
    G.validate(graph, tensors)
    assert graph == before
