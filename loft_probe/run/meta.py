"""meta.json's schema: every field's type, depth, length and uniqueness, checked before anything reads it.

A run directory is untrusted input (it may come from anyone): :func:`check_meta` turns every violation into
one :class:`~loft_probe.run.files.RunDirError`-style message naming the field, so that no reader meets a
list where it expects a dict, a null scale, a 200,000-character name or two layers with one name.
Unknown fields (``extra_meta``) are allowed, within the same depth and length bounds.
"""

from __future__ import annotations

import math
from typing import Any

MAX_META_BYTES = 8 << 20  # the layer table of 10,000 layers with their fingerprints takes ~2.5 MB
MAX_DEPTH = 16  # nesting of lists and dicts (the format itself needs 4: task.options.* inside meta)
MAX_STRING = 4096  # any string value or key, except the few bounded tighter below
MAX_RUN_NAME = 256  # run names label tables, legends and file names in reports
MAX_LAYER_NAME = 1024  # a qualified module name of a very deep model is a few hundred characters
MAX_LAYERS = 100_000
MAX_ITEMS = 100_000  # entries of any one list or dict
METHODS = ("full", "lora", "loft", "other")
RESERVED = ("format", "version", "name", "method", "optimizer", "hyperparameters", "seed", "data_order",
            "fingerprint", "layers", "schedule", "snapshots", "snapshot_k", "shadow", "capture_grad", "torch",
            "created", "world_size", "closed", "last_step")  # what the probe writes itself


class SchemaError(ValueError):
    """``field``: what is wrong with it (the caller adds the file)."""


def check_meta(meta: Any) -> None:
    """Raise :class:`SchemaError` naming the first field of a meta.json document that breaks the schema."""
    if not isinstance(meta, dict):
        raise SchemaError(f"the document is a {type(meta).__name__}, expected an object")
    check_json_value(meta, "meta")
    _field(meta, "method", lambda v: v in METHODS, f"one of {list(METHODS)}", required=True)
    _field(meta, "name", lambda v: v is None or _text(v, MAX_RUN_NAME), f"a string of at most {MAX_RUN_NAME} "
           "characters or null")
    for key in ("optimizer", "schedule", "snapshots", "torch", "created", "data_order", "fingerprint"):
        _field(meta, key, lambda v: v is None or _text(v, MAX_RUN_NAME), f"a string of at most {MAX_RUN_NAME} "
               "characters or null")
    _field(meta, "seed", lambda v: v is None or _int(v), "an integer or null")
    for key, low in (("snapshot_k", 1), ("world_size", 1), ("last_step", 0)):
        _field(meta, key, lambda v, low=low: _int(v) and v >= low, f"an integer >= {low}")
    for key in ("shadow", "capture_grad", "closed"):
        _field(meta, key, lambda v: isinstance(v, bool), "true or false")
    _field(meta, "hyperparameters", _hyperparameters, "an object of numbers, booleans, short strings, nulls "
           "and lists of numbers")
    _field(meta, "task", lambda v: isinstance(v, dict), "an object")
    _check_layers(meta)


def check_json_value(value: Any, where: str) -> None:
    """Depth, string lengths and container sizes of a parsed JSON value (iterative: no recursion to exhaust)."""
    stack = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SchemaError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            if len(item) > MAX_STRING:
                raise SchemaError(f"{path}: a string of {len(item)} characters, at most {MAX_STRING} allowed")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise SchemaError(f"{path}: {item} is not a finite number")
        elif isinstance(item, (list, dict)):
            if len(item) > MAX_ITEMS:
                raise SchemaError(f"{path}: {len(item)} entries, at most {MAX_ITEMS} allowed")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str) and len(key) > MAX_STRING:
                    raise SchemaError(f"{path}: a key of {len(key)} characters, at most {MAX_STRING} allowed")
                stack.append((child, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]", depth + 1))


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads(object_pairs_hook=...)``: an object naming a key twice is ambiguous, not "the last wins"."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SchemaError(f"key {key[:80]!r} appears twice in one object")
        out[key] = value
    return out


def _check_layers(meta: dict[str, Any]) -> None:
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SchemaError("field 'layers' missing or not a non-empty list")
    if len(layers) > MAX_LAYERS:
        raise SchemaError(f"field 'layers': {len(layers)} entries, at most {MAX_LAYERS} allowed")
    seen: set[str] = set()
    for i, entry in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(entry, dict):
            raise SchemaError(f"{where} is not an object")
        name = entry.get("name")
        if not _text(name, MAX_LAYER_NAME) or not name:
            raise SchemaError(f"{where}.name must be a non-empty string of at most {MAX_LAYER_NAME} characters")
        if name in seen:
            raise SchemaError(f"{where}.name {name[:80]!r} names a layer twice")
        seen.add(name)
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_int(d) and 0 < d < 2**31 for d in shape)):
            raise SchemaError(f"{where}.shape must be [m, n], two integers >= 1, got {str(shape)[:80]}")
        if entry.get("kind") not in ("lora", "full"):
            raise SchemaError(f"{where}.kind must be 'lora' or 'full', got {str(entry.get('kind'))[:80]!r}")
        rank = entry.get("rank")
        if not (rank is None or (_int(rank) and 1 <= rank <= min(shape))):
            raise SchemaError(f"{where}.rank must be null or an integer in [1, {min(shape)}], got {str(rank)[:80]}")
        if (entry["kind"] == "lora") != (rank is not None):
            raise SchemaError(f"{where}.rank must be an integer for a 'lora' layer and null for a 'full' one, got "
                              f"{rank} for {entry['kind']!r}")
        scale = entry.get("scale")
        if entry["kind"] == "lora" and not (_number(scale) and scale > 0):
            raise SchemaError(f"{where}.scale must be a number > 0 for a 'lora' layer, got {str(scale)[:80]}")
        if not (scale is None or (_number(scale) and scale > 0)):
            raise SchemaError(f"{where}.scale must be null or a number > 0, got {str(scale)[:80]}")
        if not (entry.get("fingerprint") is None or _text(entry["fingerprint"], 128)):
            raise SchemaError(f"{where}.fingerprint must be a string of at most 128 characters")


def _field(meta: dict[str, Any], key: str, valid, allowed: str, required: bool = False) -> None:
    if key not in meta:
        if required:
            raise SchemaError(f"field {key!r} missing; it must be {allowed}")
        return
    if not valid(meta[key]):
        raise SchemaError(f"field {key!r} must be {allowed}, got {_show(meta[key])}")


def _hyperparameters(value: Any) -> bool:
    def scalar(v: Any) -> bool:
        return v is None or isinstance(v, bool) or _number(v) or _text(v, MAX_RUN_NAME)

    return isinstance(value, dict) and all(
        scalar(v) or (isinstance(v, list) and len(v) <= 16 and all(_number(x) for x in v)) for v in value.values())


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (_int(value) or isinstance(value, float)) and math.isfinite(value)


def _text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
