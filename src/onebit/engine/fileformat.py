"""The packed model file: one safetensors file, the graph as JSON in its metadata.

This module reads and writes ``(graph, tensors)`` (:func:`read`, :func:`write`); building a
:class:`~onebit.engine.PackedModel` from them is :func:`onebit.engine.load`'s.

Layout::

    safetensors header metadata:
        "format":         "onebit.packed"
        "format_version": "1"
        "graph":          the graph (see onebit.engine.graph), JSON
    tensors, by the keys the graph's nodes name:
        binary weights    uint8 [C_out, ceil(K / 8)]: bit j of byte b is element 8 b + j of the
                          flattened weight w[c_out].flatten() (torch order C_in/G, KH, KW), set where
                          w < 0 (-1); K = C_in/G * KH * KW (conv) or in_features (linear)
        thresholds        int32 [C_out];  direction int8 [C_out] (+1 / -1)
        float parameters  float32, as in the model (stem, BatchNorm, scales, classifier)

Loading needs no pickle and executes nothing from the file. Before any tensor data is
read: the file must be a regular file; its header size is checked against the file size
and parsed as JSON; every tensor's dtype, shape and byte range is checked, the ranges must
tile the data section exactly, and the file must be exactly as long as the header says
(no shorter, no longer); the graph may only name the ops of a fixed whitelist, and its
attributes, value ranks and every tensor's dtype and shape are checked against it. Only
then is the data read (memory bounded by what the checked header declares), and the
tensors' values are checked (thresholds' directions, unused bits). Any malformed file
raises :class:`FormatError` (a ``ValueError``) naming the problem, and the graph node
where there is one.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct

import torch

from onebit import io
from onebit.engine import graph as G
from onebit.engine import ops

__all__ = [
    "FormatError",
    "read",
    "write",
    "compact_weight",
    "expand_weight",
    "format_error",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "onebit.packed"
FORMAT_VERSION = "1"
_MAX_HEADER = 64 << 20
_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "F32": torch.float32}


class FormatError(ValueError):
    """The file is not a valid onebit packed model (empty, truncated, foreign or tampered with)."""


def compact_weight(wp: torch.Tensor, attrs: dict) -> torch.Tensor:
    """Kernel-layout packed weight (of a node with attributes ``attrs``) -> its file form: uint8 bits
    in torch weight order, ``[C_out, ceil(K / 8)]`` (see the layout above)."""
    shifts = torch.arange(64, dtype=torch.int64)
    bits = ((wp.unsqueeze(-1) >> shifts) & 1).bool()
    if "kernel_size" in attrs:
        co, kh, kw, wg = wp.shape
        cg = attrs["in_channels"] // attrs["groups"]
        bits = bits.reshape(co, kh, kw, wg * 64)[..., :cg].permute(0, 3, 1, 2).reshape(co, -1)
    else:
        bits = bits.reshape(wp.shape[0], -1)[:, : attrs["in_features"]]
    k = bits.shape[1]
    nbytes = (k + 7) // 8
    bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - k)).reshape(-1, nbytes, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8).contiguous()


def expand_weight(compact: torch.Tensor, attrs: dict) -> torch.Tensor:
    """A binary weight's file form -> its kernel-layout packed weight (inverse of :func:`compact_weight`)."""
    co = compact.shape[0]
    bits = ((compact.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool().reshape(co, -1)
    if "kernel_size" in attrs:
        cg = attrs["in_channels"] // attrs["groups"]
        kh, kw = attrs["kernel_size"]
        signs = torch.where(bits[:, : cg * kh * kw], -1.0, 1.0).reshape(co, cg, kh, kw)
        return ops.pack_weights(signs, attrs["groups"])
    signs = torch.where(bits[:, : attrs["in_features"]], -1.0, 1.0)
    return ops.pack_weights(signs)


def _binary_roles(node: dict) -> list[str]:
    spec = G.OPS[node["op"]]
    return [role for role, ts in spec.tensors.items() if ts.binary and role in node.get("tensors", {})]


def file_tensors(graph: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as stored in a file (binary weights compact)."""
    tensors = dict(tensors)
    for node in graph["nodes"]:
        attrs = G.attrs(node)
        for role in _binary_roles(node):
            key = node["tensors"][role]
            tensors[key] = compact_weight(tensors[key], attrs)
    return tensors


def write(path: str | os.PathLike, graph: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a graph and its tensors (binary weights in kernel layout) to ``path`` atomically."""
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graph": json.dumps(graph, separators=(",", ":"), sort_keys=True),
    }
    io.save_tensors(path, file_tensors(graph, tensors), metadata)


def format_error(path, why: str) -> FormatError:
    """The error of a file that is no valid packed model, naming the file and why."""
    return FormatError(f"{os.fspath(path)}: not a valid onebit packed model file: {why}")


def _header_tensors(path, header: dict, data_size: int) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Check every tensor entry of the header: dtype, shape, and byte ranges that tile the
    ``data_size`` bytes of the data section exactly. Returns ``{key: (dtype, shape)}``."""
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise format_error(
                path,
                f"tensor {key!r} has an unsupported dtype {info.get('dtype') if isinstance(info, dict) else info!r}",
            )
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_plain_int(d) and 0 <= d < 1 << 40 for d in shape)):
            raise format_error(path, f"tensor {key!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_plain_int(o) and 0 <= o for o in offsets)):
            raise format_error(path, f"tensor {key!r} has bad data offsets")
        dtype = _DTYPES[info["dtype"]]
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise format_error(
                path,
                f"tensor {key!r} of shape {shape} ({info['dtype']}) needs {nbytes} bytes, "
                f"its data offsets span {offsets[1] - offsets[0]}",
            )
        entries.append((offsets[0], offsets[1], key, dtype, shape))
    entries.sort()
    end = 0
    for begin, stop, key, _, _ in entries:
        if begin != end:
            raise format_error(
                path, f"tensor {key!r} starts at byte {begin} of the data, expected {end} (gaps or overlaps)"
            )
        end = stop
    if end != data_size:
        raise format_error(
            path,
            f"the data section holds {data_size} bytes, the header describes {end}"
            + (" (the file is longer than it claims)" if data_size > end else " (truncated)"),
        )
    return {key: (dtype, shape) for _, _, key, dtype, shape in entries}


def _plain_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check a file: ``(graph, tensors)`` with binary weights expanded to kernel layout."""
    from safetensors import safe_open

    if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening a pipe would wait for a writer
        raise format_error(path, "not a regular file (a directory, device, pipe or socket)")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise format_error(path, "not a regular file (a directory, device, pipe or socket)")
        size = info.st_size
        if size == 0:
            raise format_error(path, "the file is empty")
        head = f.read(min(size, 9))
        if head[:4] == b"PK\x03\x04":
            raise format_error(path, "it is a zip archive (a torch.save checkpoint?), not safetensors")
        pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        if size < 8:
            raise format_error(
                path, "it looks like a pickle, which onebit never loads" if pickled else f"truncated ({size} bytes)"
            )
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len < 2 or header_len > _MAX_HEADER or 8 + header_len > size or head[8:9] != b"{":
            if pickled:
                raise format_error(path, "it looks like a pickle, which onebit never loads")
            raise format_error(path, f"bad header size {header_len} for a file of {size} bytes (truncated or foreign)")
        f.seek(8)
        raw_header = f.read(header_len)
    if len(raw_header) != header_len:
        raise format_error(path, "the file changed while it was read")
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError: JSON, or a 5,000-digit number
        raise format_error(path, f"the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise format_error(path, "the header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise format_error(path, f"no {FORMAT!r} format tag in the metadata (a plain safetensors file?)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise format_error(
            path, f"unsupported format version {meta.get('format_version')!r} (this onebit reads {FORMAT_VERSION})"
        )
    declared = _header_tensors(path, header, size - 8 - header_len)
    try:
        graph = json.loads(meta.get("graph", ""))
    except (ValueError, TypeError, RecursionError) as error:
        raise format_error(path, f"the graph is not JSON ({error})") from None
    try:  # the graph against the declared dtypes and shapes, before any data is read
        shapes = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (dtype, shape) in declared.items()}
        G.validate(graph, shapes, compact=True)
    except G.GraphError as error:
        raise format_error(path, str(error)) from None
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            # each tensor copied into an allocation of its own: the file's tensors lie at any byte
            # offset, and torch's float kernels round differently on unaligned operands (the
            # loaded model would not be bit-identical to the one saved)
            tensors = {key: f.get_tensor(key).clone() for key in declared}
    except MemoryError:
        raise MemoryError(
            f"{os.fspath(path)}: not enough memory for its {size - 8 - header_len} bytes of tensors"
        ) from None
    except Exception as error:  # safetensors raises its own error types on malformed data
        raise format_error(path, f"safetensors could not read the tensors ({error})") from None
    try:
        G.validate(graph, tensors, compact=True)
        for node in graph["nodes"]:
            attrs = G.attrs(node)
            for role in _binary_roles(node):
                key = node["tensors"][role]
                tensors[key] = expand_weight(tensors[key], attrs)
    except G.GraphError as error:
        raise format_error(path, str(error)) from None
    return graph, tensors
