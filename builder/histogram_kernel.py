"""The collector's histogram keys counted in one compiled loop on a CPU (numba, already PyNNDescent's dependency).

Imported only by `builder.collect.count_histogram_keys` for CPU tensors, so numba loads when a CPU collects. With torch
ops a key costs four passes over the values (subtract, shift, add, scatter) and the scatter alone sets the floor;
here each value is read once and its counter incremented in the same step, about twice as fast per value. Other
devices keep the torch ops, which run at device speed there.
"""

from __future__ import annotations

import numba
import numpy as np

_INT32_SPAN = 1 << 32


@numba.njit(nogil=True, cache=True)
def count_keys(bits: np.ndarray, counts: np.ndarray, key_shift: int, half_keys: int) -> None:
    """counts[key · n_units + unit] += 1 for every value of `bits` ([rows, n_units] float32 bits as int32), key =
    ((bits − 1) >> key_shift) + half_keys, the subtraction wrapping in int32 as torch's does (−0.0's INT32_MIN becomes
    INT32_MAX, the keys at the top)."""
    rows, n_units = bits.shape
    for row in range(rows):
        for unit in range(n_units):
            below = np.int64(bits[row, unit]) - 1
            if below < -(_INT32_SPAN >> 1):
                below += _INT32_SPAN
            counts[((below >> key_shift) + half_keys) * n_units + unit] += 1
