"""A pickle-free encoding of nested data holding tensors: a replica's state, a worker's result.

Unpickling runs code chosen by whoever wrote the bytes, and even ``torch.load(weights_only=True)``
parses them with a pickle machine; so what moetion reads from the wire or a pipe uses the window
format's idea instead (:mod:`moetion.snapshot.image`): a JSON manifest plus one blob of raw tensor
bytes, a checksum per tensor, every offset and size checked before anything is read.

Layout: ``MAGIC`` (8 bytes), the manifest's length (8 bytes, little-endian), the manifest JSON,
padding to :data:`~moetion.snapshot.image.ALIGN`, the blob. The manifest holds the tree, where a
tensor is ``{"tensor": i}``, bytes ``{"bytes": i}`` (a uint8 tensor), a list ``{"list": [...]}``, a tuple ``{"tuple": [...]}``, a dict
``{"dict": [[key, value], ...]}`` (keys are trees too, so int and tuple keys survive), and
``None``, bools, ints, floats and strings are themselves.
"""
from __future__ import annotations

import json
import struct
from typing import Any

import torch

from moetion.errors import MoetionError
from moetion.snapshot.image import aligned, checksum, dtype_name, tensor_dtype

MAGIC = b"MOETREE1"
FORMAT = "moetion-tree/1"
_PREFIX = struct.Struct("<8sQ")
MAX_MANIFEST_BYTES = 64 << 20
_SCALARS = (type(None), bool, int, float, str)


class TreeFormatError(MoetionError):
    """Bytes that are not a valid, intact tensor tree."""


def encode(tree: Any) -> bytes:
    """The tree as one buffer; raises TypeError naming a value of a type the format cannot hold."""
    tensors: list[torch.Tensor] = []
    node = _node(tree, tensors, path="")
    entries, offset = [], 0
    for tensor in tensors:
        offset = aligned(offset)
        nbytes = tensor.numel() * tensor.element_size()
        entries.append({"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "offset": offset,
                         "nbytes": nbytes, "checksum": checksum(_raw(tensor))})
        offset += nbytes
    manifest = json.dumps({"format": FORMAT, "tree": node, "tensors": entries, "blob_bytes": offset}).encode()
    blob_start = aligned(_PREFIX.size + len(manifest))
    out = bytearray(blob_start + offset)
    _PREFIX.pack_into(out, 0, MAGIC, len(manifest))
    out[_PREFIX.size : _PREFIX.size + len(manifest)] = manifest
    view = torch.frombuffer(out, dtype=torch.uint8) if out else torch.empty(0, dtype=torch.uint8)
    for tensor, entry in zip(tensors, entries):
        start = blob_start + entry["offset"]
        view[start : start + entry["nbytes"]] = _raw(tensor)
    return bytes(out)


def decode(data: bytes | bytearray | memoryview, *, source: str) -> Any:
    """The tree :func:`encode` wrote; TreeFormatError naming ``source`` for anything else.

    Tensors are views of ``data`` when it is writable (no copy), else copies.
    """
    buffer = memoryview(data).cast("B")
    if buffer.nbytes < _PREFIX.size:
        raise TreeFormatError(f"{source}: {buffer.nbytes} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, length = _PREFIX.unpack_from(buffer, 0)
    if magic != MAGIC or length > min(MAX_MANIFEST_BYTES, buffer.nbytes - _PREFIX.size):
        raise TreeFormatError(f"{source}: not a tensor tree (magic {magic!r}, manifest of {length} bytes "
                              f"in {buffer.nbytes})")
    try:
        manifest = json.loads(bytes(buffer[_PREFIX.size : _PREFIX.size + length]))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TreeFormatError(f"{source}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                                  f"expected {FORMAT!r}")
        blob_start = aligned(_PREFIX.size + length)
        blob = buffer[blob_start:]
        if buffer.readonly:
            blob = bytearray(blob)
        raw = torch.frombuffer(blob, dtype=torch.uint8) if len(blob) else torch.empty(0, dtype=torch.uint8)
        tensors = [_tensor(raw, entry, index, source) for index, entry in enumerate(manifest["tensors"])]
        return _tree(manifest["tree"], tensors)
    except TreeFormatError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as error:
        raise TreeFormatError(f"{source}: not a valid tensor tree ({type(error).__name__}: {error})") from None


def _node(value: Any, tensors: list[torch.Tensor], *, path: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu().contiguous())
        return {"tensor": len(tensors) - 1}
    if type(value) in _SCALARS:
        return value
    if isinstance(value, (bytes, bytearray)):
        tensors.append(torch.frombuffer(bytearray(value), dtype=torch.uint8) if value else torch.empty(0, dtype=torch.uint8))
        return {"bytes": len(tensors) - 1}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [_node(item, tensors, path=f"{path}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": [[_node(k, tensors, path=path), _node(v, tensors, path=f"{path}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"value at {path or '<root>'} is a {type(value).__name__}; a tensor tree holds only tensors, "
                    "None, bools, numbers, strings, bytes, lists, tuples and dicts")


def _tree(node: Any, tensors: list[torch.Tensor]) -> Any:
    if type(node) in _SCALARS:
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise TreeFormatError(f"unknown node {str(node)[:80]}")
    ((kind, body),) = node.items()
    if kind == "tensor" and type(body) is int:
        return tensors[body]
    if kind == "bytes" and type(body) is int and tensors[body].dtype == torch.uint8:
        return tensors[body].numpy().tobytes()
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_tree(item, tensors) for item in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and isinstance(body, list):
        return {_tree(key, tensors): _tree(value, tensors) for key, value in body}
    raise TreeFormatError(f"unknown node {kind!r}")


def _tensor(raw: torch.Tensor, entry: dict, index: int, source: str) -> torch.Tensor:
    dtype = tensor_dtype(entry["dtype"], source=source)
    shape = [int(d) for d in entry["shape"]]
    offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    numel = 1
    for d in shape:
        if d < 0:
            raise TreeFormatError(f"{source}: tensor {index} has shape {shape}")
        numel *= d
    if nbytes != numel * torch.empty((), dtype=dtype).element_size() or offset < 0 or offset + nbytes > raw.numel() \
            or offset % torch.empty((), dtype=dtype).element_size():
        raise TreeFormatError(f"{source}: tensor {index} spans bytes {offset}..{offset + nbytes} ({shape} {dtype}) "
                              f"outside a blob of {raw.numel()}")
    bytes_ = raw[offset : offset + nbytes]
    if checksum(bytes_) != entry["checksum"]:
        raise TreeFormatError(f"{source}: checksum mismatch in tensor {index}; the bytes were corrupted on the way")
    return bytes_.view(dtype).reshape(shape)


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
