"""The collector's per-value work on a CPU in one compiled pass (numba, a PyNNDescent dependency): every value's
histogram key counted, and each sequence's first maximum per unit.

Imported only by `builder.collect.scan_batch` for CPU tensors, so numba loads when a CPU collects. With torch ops the
same work is a pass for the maxima, another for their first positions and four for the keys (subtract, shift, add,
scatter), and the scatter alone sets the floor; here each value is read once. Other devices keep the torch ops, which
run at device speed there; tests/test_collect.py checks both against literal references.
"""

from __future__ import annotations

import numba
import numpy as np

_INT32_SPAN = 1 << 32


@numba.njit(nogil=True, cache=True)
def scan_values(values: np.ndarray, bits: np.ndarray, counts: np.ndarray, seq_max: np.ndarray, first: np.ndarray,
                key_shift: int, half_keys: int) -> None:
    """For `values` [n_seq, n_pos, n_units] (float32; `bits` the same memory as int32):
    counts[key · n_units + unit] += 1 for every value, key = ((bits − 1) >> key_shift) + half_keys, the subtraction
    wrapping in int32 as torch's does (−0.0's INT32_MIN becomes INT32_MAX, the keys at the top); and seq_max[s, u],
    first[s, u] = each sequence's max over positions and the first position holding it (a NaN makes the max NaN at
    position 0, as torch's amax and equality give)."""
    n_seq, n_pos, n_units = values.shape
    for seq in range(n_seq):
        best = np.full(n_units, -np.inf, np.float32)
        where = np.zeros(n_units, np.int64)
        nan = np.zeros(n_units, np.bool_)
        for pos in range(n_pos):
            for unit in range(n_units):
                value = values[seq, pos, unit]
                below = np.int64(bits[seq, pos, unit]) - 1
                if below < -(_INT32_SPAN >> 1):
                    below += _INT32_SPAN
                counts[((below >> key_shift) + half_keys) * n_units + unit] += 1
                if value > best[unit]:
                    best[unit] = value
                    where[unit] = pos
                elif value != value:
                    nan[unit] = True
        for unit in range(n_units):
            seq_max[seq, unit] = np.nan if nan[unit] else best[unit]
            first[seq, unit] = 0 if nan[unit] else where[unit]
