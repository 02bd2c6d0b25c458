"""The collector's per-value work on a CPU in one compiled pass (numba, a PyNNDescent dependency): every value
counted into its histogram bin, and each sequence's first maximum per unit.

Imported only by `builder.collect.scan_batch` for CPU tensors, so numba loads when a CPU collects. With torch ops the
same work is a pass for the maxima, another for their first positions and four for the keys (subtract, shift, add,
scatter), and the scatter alone sets the floor; here each value is read once and its bin is a table lookup away
(a value's bin is a function of its top bits: `builder.collect.histogram_key_bins`). Counting bins rather than keys
keeps the counters a unit's row of bins touches within the core's cache (98 bins × 3,072 units × 4 bytes = 1.2 MB,
against 2,048 keys' 25 MB), which halves this pass's time on GPT-2-small-shaped batches. Other devices keep the torch
ops, which run at device speed there; tests/test_collect.py checks both against literal references.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def scan_values(values: np.ndarray, bits: np.ndarray, bin_of_key: np.ndarray, counts: np.ndarray,
                seq_max: np.ndarray, first: np.ndarray, key_shift: int) -> None:
    """For `values` [n_seq, n_pos, n_units] (float32; `bits` the same memory as int32):
    counts[bin, unit] += 1 for every value, bin = bin_of_key[((bits − 1) mod 2³²) >> key_shift] (the unsigned key:
    the signed key of `builder.collect` less N_KEYS / 2, modulo N_KEYS, so −0.0 and +0.0 wrap as they do there);
    and seq_max[s, u], first[s, u] = each sequence's max over positions and the first position holding it (a NaN
    makes the max NaN at position 0, as torch's amax and equality give)."""
    n_seq, n_pos, n_units = values.shape
    for seq in range(n_seq):
        best = np.full(n_units, -np.inf, np.float32)
        where = np.zeros(n_units, np.int64)
        nan = np.zeros(n_units, np.bool_)
        for pos in range(n_pos):
            for unit in range(n_units):
                value = values[seq, pos, unit]
                # in int64, masked to 32 bits: numba widens uint32 arithmetic to 64 bits, where 0 − 1 wraps far
                key = ((np.int64(bits[seq, pos, unit]) - 1) & 0xFFFFFFFF) >> key_shift
                counts[bin_of_key[key], unit] += 1
                if value > best[unit]:
                    best[unit] = value
                    where[unit] = pos
                elif value != value:
                    nan[unit] = True
        for unit in range(n_units):
            seq_max[seq, unit] = np.nan if nan[unit] else best[unit]
            first[seq, unit] = 0 if nan[unit] else where[unit]
