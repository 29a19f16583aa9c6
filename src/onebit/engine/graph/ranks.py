"""What flows along a graph's edges: the rank of each float value and the layout of each packed one."""

from __future__ import annotations

from onebit.engine.graph.schema import GraphError

_IMAGE_OPS = {
    "pack",
    "threshold_pack",
    "conv2d",
    "qconv2d",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
}


_SAME_RANK = {
    "relu",
    "relu6",
    "leaky_relu",
    "hardtanh",
    "prelu",
    "sigmoid",
    "tanh",
    "sign",
    "dorefa",
    "dorefa_sym",
    "quantize_int",
    "identity",
    "div",
}


def _dim(dim: int, rank: int, what: str) -> int:
    if not -rank <= dim < rank:
        raise GraphError(f"{what} {dim} is out of range for a value of rank {rank}")
    return dim % rank


def output_rank(op: str, a: dict, ranks: list[int | None]) -> int | None:
    """The rank of a node's float output from its inputs' ranks (None: packed, or not known);
    raises :class:`GraphError` when an input's rank does not suit the op."""
    if any(r is None for r in ranks) or not ranks:
        return 4 if op in ("binary_conv2d",) else 2 if op == "binary_linear" else None
    r = ranks[0]
    if op in _IMAGE_OPS:
        if r != 4:
            raise GraphError(f"op {op} takes a rank-4 [N, C, H, W] input, got rank {r}")
        return None if op in ("pack", "threshold_pack") else 4
    if op in ("batch_norm", "sign_threshold") and r < 2:
        raise GraphError(f"op {op} takes an input with a channel dimension (rank >= 2), got rank {r}")
    if op == "softmax":
        _dim(a["dim"], r, "dim")
    if op == "roll":
        _dim(a["dim"], r, "dim")
    if op == "flatten":
        start, end = _dim(a["start_dim"], r, "start_dim"), _dim(a["end_dim"], r, "end_dim")
        if start > end:
            raise GraphError(f"start_dim {a['start_dim']} comes after end_dim {a['end_dim']} for a value of rank {r}")
        return r - (end - start)
    if op == "reshape":
        return 1 + len(a["shape"])
    if op == "cat":
        if len(set(ranks)) != 1:
            raise GraphError(f"op cat takes inputs of one rank, got ranks {ranks}")
        _dim(a["dim"], r, "dim")
    if op in ("add", "mul"):
        return max(ranks)
    if op == "pack_features":
        return None
    if op == "bitplane_conv2d":  # a conv on [N, C, H, W], or a linear layer on [N, F]
        if r not in (2, 4) or (r == 2 and a["kernel_size"] != [1, 1]):
            raise GraphError(f"op bitplane_conv2d takes a rank-4 input (rank 2 for a 1 x 1 linear form), got rank {r}")
        return r
    if op in _SAME_RANK or op in ("batch_norm", "sign_threshold", "softmax", "roll", "cat", "linear", "qlinear"):
        return r
    return None  # an op whose output rank this table does not know: later checks skip it


def produced_layout(node: dict) -> tuple | None:
    """(padding, pad_value, groups, channels or None) of a packed value."""
    a = node["attrs"]
    if node["op"] == "pack":
        return (tuple(a["padding"]), a["pad_value"], a["groups"], None)
    if node["op"] in ("binary_conv2d_threshold", "threshold_pack"):
        return (tuple(a["out_padding"]), a["out_pad_value"], a["out_groups"], a["out_channels"])
    if node["op"] == "max_pool_bits":
        return (tuple(a["out_padding"]), a["out_pad_value"], a["out_groups"], a["channels"])
    if node["op"] == "pack_features":
        return ("features", a["features"])
    if node["op"] == "binary_linear_threshold":
        return ("features", a["out_features"])
    return None


def expected_layout(node: dict) -> tuple:
    a = node["attrs"]
    if node["op"] in ("binary_linear", "binary_linear_threshold"):
        return ("features", a["in_features"])
    if node["op"] == "max_pool_bits":  # thresholded bits, unpadded, in the output's groups
        return ((0, 0), 0.0, a["out_groups"], a["channels"])
    return (tuple(a["padding"]), a["pad_value"], a["groups"], a["in_channels"])


def layouts_match(produced: tuple, expected: tuple) -> bool:
    if produced[0] == "features" or expected[0] == "features":
        return produced == expected
    return produced[:3] == expected[:3] and (produced[3] is None or produced[3] == expected[3])
