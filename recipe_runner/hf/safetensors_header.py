"""Parse and check one safetensors file's header, without torch (plan time reads every source header
on each build, warm no-op builds included, where importing torch would cost more than all the rest).

The checks follow the format's rules as the safetensors library enforces them (its Rust crate:
`SafeTensors::read_metadata` and `Metadata::validate`), so a file we accept is one `safe_open`
accepts too, and a header the library refuses is refused here before any stage runs:
  - 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON, then the data region;
  - N <= 100_000_000 (the library's MAX_HEADER_SIZE);
  - the JSON is an object: tensor name -> {dtype, shape, data_offsets}, plus an optional
    `__metadata__` that maps strings to strings;
  - data_offsets [begin, end] are relative to the data region, with end >= begin and
    end - begin == prod(shape) * dtype size;
  - sorted by offsets, the tensors tile the data region: each begins where the previous one ends
    (no gap, no overlap), the first at 0, and the last ends at the end of the file.
Duplicate JSON keys (which serde silently collapses to the last one) are refused as well: which
of two entries for one tensor is meant cannot be told.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_runner.errors import SourceModelError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE
METADATA_KEY = "__metadata__"
# dtype code -> (size in bytes, torch dtype name): the codes the reader maps to torch dtypes
# (trtllm.safetensors_writer.CODE_TO_DTYPE; a test keeps the two tables equal).
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "torch.bool"), "U8": (1, "torch.uint8"), "I8": (1, "torch.int8"),
    "F8_E5M2": (1, "torch.float8_e5m2"), "F8_E4M3": (1, "torch.float8_e4m3fn"),
    "I16": (2, "torch.int16"), "U16": (2, "torch.uint16"), "F16": (2, "torch.float16"),
    "BF16": (2, "torch.bfloat16"), "I32": (4, "torch.int32"), "U32": (4, "torch.uint32"),
    "F32": (4, "torch.float32"), "F64": (8, "torch.float64"), "I64": (8, "torch.int64"),
    "U64": (8, "torch.uint64"),
}
FLOAT_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})
_FETCH = "the file is corrupt — fetch it again"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header; begin/end are offsets into the data region."""

    name: str
    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # file offset of the data region (8 + header length)
    tensors: dict[str, HeaderEntry]


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is refused instead of the last one winning."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # Python's json accepts NaN / Infinity / -Infinity; JSON does not


def loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses duplicate keys (_DuplicateKey) and NaN/Infinity (ValueError)."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)


def truncated(path: Path, needed: int, actual: int) -> SourceModelError:
    return SourceModelError(
        f"{path} is truncated: its header describes {needed} bytes but the file has {actual}; "
        "the download or copy is incomplete — fetch this file again"
    )


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """(header JSON bytes, file size), checking the length prefix against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise truncated(path, 8, size)
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise SourceModelError(f"{path} is not a valid safetensors file (header length {n} exceeds "
                                       f"the format's limit of {MAX_HEADER_BYTES} bytes); fetch this file again")
            if 8 + n > size:
                raise truncated(path, 8 + n, size)
            return f.read(n), size
    except OSError as e:
        raise SourceModelError(f"{path} cannot be read: {e.strerror or e}") from None


def _parse_json(path: Path, blob: bytes) -> dict[str, Any]:
    try:
        header = loads_strict(blob.decode("utf-8"))
    except _DuplicateKey as e:
        raise SourceModelError(f"{path}: the safetensors header names '{e.key}' twice; {_FETCH}") from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise SourceModelError(f"{path} has a corrupt safetensors header; fetch this file again") from None
    if not isinstance(header, dict):
        raise SourceModelError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an "
                               f"object; {_FETCH}")
    return header


def _check_metadata(path: Path, metadata: Any) -> None:
    # rule: __metadata__ is an optional map of string -> string
    if not isinstance(metadata, dict):
        raise SourceModelError(f"{path}: the safetensors header's {METADATA_KEY} is not an object of strings; "
                               f"{_FETCH}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise SourceModelError(f"{path}: the safetensors header's {METADATA_KEY} entry '{key}' is "
                                   f"{value!r}, not a string; {_FETCH}")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, raw: Any) -> HeaderEntry:
    """One tensor entry: a known dtype, a shape of counts, data_offsets [begin, end] that fit it."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(raw, dict):
        raise SourceModelError(f"{where}: its header entry is not an object; {_FETCH}")
    code, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if code not in DTYPES:
        raise SourceModelError(f"{where} has unsupported dtype {code!r}; supported: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SourceModelError(f"{where} has shape {shape!r}, not a list of non-negative integers; {_FETCH}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise SourceModelError(f"{where} has data_offsets {offsets!r}, not [begin, end] as two non-negative "
                               f"integers; {_FETCH}")
    begin, end = offsets
    if end < begin:  # rule: end >= begin
        raise SourceModelError(f"{where} has data_offsets [{begin}, {end}]: end before begin; {_FETCH}")
    nbytes = math.prod(shape) * DTYPES[code][0]
    if end - begin != nbytes:  # rule: the byte range holds exactly prod(shape) elements of dtype
        raise SourceModelError(f"{where} has data_offsets [{begin}, {end}] ({end - begin} bytes), but shape "
                               f"{shape} of {code} needs {nbytes} bytes; {_FETCH}")
    return HeaderEntry(name, code, tuple(shape), begin, end)


def _check_layout(path: Path, entries: list[HeaderEntry], data_start: int, size: int) -> None:
    """Rule: sorted by offsets, the tensors tile [0, data length) with no gap and no overlap."""
    previous: HeaderEntry | None = None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        expected = previous.end if previous is not None else 0
        if previous is not None and entry.begin < expected:
            raise SourceModelError(
                f"{path}: tensor '{entry.name}' has data_offsets [{entry.begin}, {entry.end}], overlapping "
                f"tensor '{previous.name}' [{previous.begin}, {previous.end}]; tensors must not share bytes — {_FETCH}")
        if entry.begin > expected:
            raise SourceModelError(
                f"{path}: tensor '{entry.name}' begins at data offset {entry.begin}, but the tensors before it "
                f"end at {expected}; the format allows no gap between tensors — {_FETCH}")
        previous = entry
    data_end = data_start + (previous.end if previous is not None else 0)
    if data_end > size:
        raise truncated(path, data_end, size)
    if data_end < size:  # rule: the last tensor ends at the end of the file
        raise SourceModelError(f"{path} has {size - data_end} bytes after its last tensor (the header describes "
                               f"{data_end} bytes, the file has {size}); {_FETCH}")


def parse_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check one safetensors file's header (no tensor data is read)."""
    blob, size = _read_header_bytes(path)
    header = _parse_json(path, blob)
    data_start = 8 + len(blob)
    tensors: dict[str, HeaderEntry] = {}
    for name, raw in header.items():
        if name == METADATA_KEY:
            _check_metadata(path, raw)
        else:
            tensors[name] = _entry(path, name, raw)
    _check_layout(path, list(tensors.values()), data_start, size)
    return SafetensorsHeader(path, data_start, tensors)
