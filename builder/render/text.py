"""Text at the boundary: dataset and tokenizer strings are untrusted and may not even be encodable."""

from __future__ import annotations

import math
import re

import numpy as np

BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_PICTURES = {**{i: chr(0x2400 + i) for i in range(32)}, 0x7F: "\u2421", 0x0A: "\u21b5", 0x09: "\u21e5"}


def clean_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (valid pairs are joined), so it can be UTF-8 encoded."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def display_token(text: str) -> str:
    """How a token reads on a page: newline as ↵, tab as ⇥, other control characters as control pictures. The same
    mapping lives in static/atlas.js (displayToken); everything else, including RTL and zero-width characters, stays
    literal."""
    return text.translate(_CONTROL_PICTURES)


def has_bidi(text: str) -> bool:
    return bool(BIDI_CONTROLS.search(text))


def number(value, digits: int = 6):
    """A float for JSON: `digits` significant digits, None for NaN/inf."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def fmt(value, digits: int = 3) -> str:
    """A number for a page: `digits` significant digits, an en dash for NaN/None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)) or float(value).is_integer() and abs(value) >= 10 ** digits:
        return f"{int(value):,}"
    return f"{float(value):.{digits}g}"


def bibtex_escape(text: str) -> str:
    return re.sub(r"([\\{}%&$#_^~])", lambda m: "\\" + m.group(1) if m.group(1) not in "\\^~" else
                  {"\\": r"\textbackslash{}", "^": r"\^{}", "~": r"\~{}"}[m.group(1)], text)
