"""The one Python codec of the published data files, mirroring docs/sidecar-schema.md (and static/atlas.js)."""

from __future__ import annotations

import base64
import math
import zlib
from pathlib import Path

import numpy as np
import orjson

# Each JSON file kind has its own schema version (docs/sidecar-schema.md); bump a kind only when its format changes.
SCHEMA_VERSIONS = {"neuron": 2, "similar": 1, "common": 1, "atlas": 2, "vocab": 1, "neuron-table": 3, "search": 1}

MISSING_U8 = 255  # quantised activation/importance: outside the sequence / not scored
QUANT_LEVELS = 254  # uint8 codes 0..254 span the range
SIMILARITY_SCALE = 10_000  # neighbour similarity stored as round(similarity * 10000)
ZLIB_LEVEL = 9  # fixed, so the same data always packs to the same bytes
RANGE_DIGITS = 5  # significant digits of an activation range's bounds
U2_LIMIT = 0xFFFF  # vocabularies below this size store token ids as u2 (its maximum marks "outside the sequence")
FILE_COPY_SUFFIX = ".json.js"  # the file:// twin of every .json data file; never published


def pack(array: np.ndarray, dtype: str) -> str:
    """Base64 of the zlib-compressed little-endian bytes of `array` as `dtype` (u1, u2, u4, i4, f4)."""
    data = np.ascontiguousarray(array, dtype=np.dtype(f"<{dtype}")).tobytes()
    return base64.b64encode(zlib.compress(data, ZLIB_LEVEL)).decode("ascii")


def pack_json(document) -> str:
    """Base64 of the zlib-compressed UTF-8 JSON of `document`: bulky text (token strings, link texts)."""
    return base64.b64encode(zlib.compress(orjson.dumps(document), ZLIB_LEVEL)).decode("ascii")


def unpack_json(text: str):
    return orjson.loads(zlib.decompress(base64.b64decode(text)))


def unpack(text: str, dtype: str) -> np.ndarray:
    """Inverse of `pack` (flat array)."""
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.dtype(f"<{dtype}"))


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


def write_data_file(path: Path, key: str, document: dict) -> tuple[int, int]:
    """Write `path` (.json) and its file:// twin; returns (published bytes, file:// copy bytes)."""
    payload = dumps(document)
    path.write_bytes(payload + b"\n")
    twin = js_wrapper(key, payload)
    path.with_name(path.name + ".js").write_bytes(twin)
    return len(payload) + 1, len(twin)
