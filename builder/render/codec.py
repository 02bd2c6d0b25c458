"""The one Python codec of the published data files, mirroring docs/sidecar-schema.md (and static/atlas.js)."""

from __future__ import annotations

import base64
import hashlib
import math
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson

# Each JSON file kind has its own schema version (docs/sidecar-schema.md); bump a kind only when its format changes.
SCHEMA_VERSIONS = {"neuron": 3, "similar": 2, "common": 2, "atlas": 2, "vocab": 1, "neuron-table": 4,
                   "neuron-shard": 1, "search": 2}

MISSING_U8 = 255  # quantised activation/importance: outside the sequence / not scored
QUANT_LEVELS = 254  # uint8 codes 0..254 span the range
SIMILARITY_SCALE = 10_000  # neighbour similarity stored as round(similarity * 10000)
ZLIB_LEVEL = 9  # fixed, so the same data always packs to the same bytes
RANGE_DIGITS = 5  # significant digits of an activation range's bounds
U2_LIMIT = 0xFFFF  # vocabularies below this size store token ids as u2 (its maximum marks "outside the sequence")
FILE_COPY_SUFFIX = ".json.js"  # the file:// twin of every .json data file; never published


def compress(array: np.ndarray, dtype: str) -> bytes:
    """The zlib-compressed little-endian bytes of `array` as `dtype` (u1, u2, u4, i4, f4)."""
    return zlib.compress(np.ascontiguousarray(array, dtype=np.dtype(f"<{dtype}")).tobytes(), ZLIB_LEVEL)


class Blob:
    """The binary companion `X.bin` of a data file `X.json`: each field packed into it appears in the JSON as its
    [offset, length] there. Binary rather than base64 in the JSON, which would add a third to every packed field."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def _add(self, data: bytes) -> list[int]:
        ref = [self._size, len(data)]
        self._parts.append(data)
        self._size += len(data)
        return ref

    def pack(self, array: np.ndarray, dtype: str) -> list[int]:
        return self._add(compress(array, dtype))

    def pack_json(self, document) -> list[int]:
        """Bulky text (token strings, link texts) as zlib-compressed UTF-8 JSON."""
        return self._add(zlib.compress(orjson.dumps(document), ZLIB_LEVEL))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


def unpack(blob: bytes, ref: list[int], dtype: str) -> np.ndarray:
    """Inverse of `Blob.pack` (flat array) on the bytes of the `.bin` file."""
    offset, length = ref
    return np.frombuffer(zlib.decompress(blob[offset:offset + length]), dtype=np.dtype(f"<{dtype}"))


def unpack_json(blob: bytes, ref: list[int]):
    offset, length = ref
    return orjson.loads(zlib.decompress(blob[offset:offset + length]))


def read_data_file(path: Path) -> tuple[dict, bytes]:
    """A data file's JSON and the bytes of its `.bin` companion (empty when it has none)."""
    document = orjson.loads(path.read_bytes())
    return document, (path.with_name(document["bin"]).read_bytes() if "bin" in document else b"")


def token_dtype(vocab_size: int) -> str:
    return "u2" if vocab_size < U2_LIMIT else "u4"


def round_out(value: float, up: bool, digits: int = RANGE_DIGITS) -> float:
    """`value` rounded to `digits` significant digits, away from the inside of a range (up for a maximum)."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    exponent = digits - 1 - math.floor(math.log10(abs(value)))
    scale = 10.0 ** exponent
    rounded = (math.ceil if up else math.floor)(value * scale) / scale
    if up and rounded < value:
        rounded = math.nextafter(rounded, math.inf)
    if not up and rounded > value:
        rounded = math.nextafter(rounded, -math.inf)
    return float(rounded)


def quantise_activations(window: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Codes 0..254 spanning [lo, hi] linearly; 255 where the value is NaN (outside the sequence)."""
    span = hi - lo if hi > lo else 1.0
    codes = np.rint((np.clip(window, lo, hi) - lo) / span * QUANT_LEVELS)
    return np.where(np.isnan(window), MISSING_U8, codes).astype(np.uint8)


def dequantise_activations(codes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo if hi > lo else 1.0
    values = lo + codes.astype(np.float64) / QUANT_LEVELS * span
    return np.where(codes == MISSING_U8, np.nan, values)


def quantise_importance(importance: np.ndarray) -> np.ndarray:
    codes = np.rint(np.clip(importance, 0.0, 1.0) * QUANT_LEVELS)
    return np.where(np.isnan(importance), MISSING_U8, codes).astype(np.uint8)


def dequantise_importance(codes: np.ndarray) -> np.ndarray:
    return np.where(codes == MISSING_U8, np.nan, codes.astype(np.float64) / QUANT_LEVELS)


def activation_range(window: np.ndarray, max_activation: float) -> tuple[float, float]:
    """[lo, hi] for a unit's quantised windows: lo = min(0, smallest value), hi = max(unit max, largest value),
    rounded outwards to 5 significant digits so the JSON numbers are short and still bound every value."""
    finite = window[np.isfinite(window)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = max(float(max_activation), float(finite.max()) if finite.size else 0.0)
    lo, hi = round_out(lo, up=False), round_out(hi, up=True)
    return lo, (hi if hi > lo else lo + 1.0)


def dumps(document) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def js_wrapper(key: str, payload: bytes) -> bytes:
    """The JSON as a script, for pages opened over file://: `(window.ATLAS_DATA=...)["key"]=<json>;`."""
    return b'(window.ATLAS_DATA=window.ATLAS_DATA||{})["' + key.encode() + b'"]=' + payload + b";\n"


class Written(NamedTuple):
    """What `write_data_file` wrote: its published bytes (.json and .bin), its file:// twin's bytes, and the sha256
    of the .json (which pins the .bin through `bin_sha256`): the hash a page's citation names."""

    published: int
    twin: int
    sha256: str


def write_data_file(path: Path, key: str, document: dict, blob: Blob | None = None) -> Written:
    """Write `path` (.json), its `.bin` companion when `blob` is given (named by `bin`, pinned by its sha256 in
    `bin_sha256`, so the one hash of the .json covers both), and its file:// twin, which carries the companion as
    base64 (`bin_base64`: a page on file:// can only load scripts)."""
    published = 0
    if blob is not None:
        data = blob.getvalue()
        document = {**document, "bin": path.with_suffix(".bin").name, "bin_sha256": hashlib.sha256(data).hexdigest()}
        path.with_suffix(".bin").write_bytes(data)
        published += len(data)
    payload = dumps(document) + b"\n"
    path.write_bytes(payload)
    twin_document = document if blob is None else {**document, "bin_base64": base64.b64encode(data).decode("ascii")}
    twin = js_wrapper(key, dumps(twin_document))
    path.with_name(path.name + ".js").write_bytes(twin)
    return Written(published + len(payload), len(twin), hashlib.sha256(payload).hexdigest())


def read_unit_table(data_dir: Path) -> tuple[dict, dict[str, list]]:
    """The unit table as static/index.js reads it: `neurons.json` (the manifest) and every column over all rows,
    from each set's shard (floats as Python floats, None where undefined; counts as ints; descriptions)."""
    manifest = orjson.loads((data_dir / "neurons.json").read_bytes())
    columns: dict[str, list] = {}
    for shard in manifest["shards"]:
        document, blob = read_data_file(data_dir / shard["file"])
        for name, field in document["columns"].items():
            values = (unpack_json(blob, field["data"]) if field["dtype"] == "json" else
                      [None if isinstance(v, float) and math.isnan(v) else v
                       for v in unpack(blob, field["data"], field["dtype"]).tolist()])
            columns.setdefault(name, []).extend(values)
    return manifest, columns
