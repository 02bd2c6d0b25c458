"""Collect: one streaming pass that finds each unit's maximum and its first qualifying examples, for every subject
set at once.

The definition is two-pass (max M over the corpus, then the first `max_examples` sequences whose highest activation
reaches T = threshold · M). One pass gives the same answer: each unit keeps a running max m ≤ M and candidates with
activation ≥ threshold · m, dropped when m rises (they cannot reach T). A candidate is also dropped when at least
`max_examples` earlier candidates have an activation at least as high: whenever it would qualify, so would they, so it
could never be among the first `max_examples`. That bounds memory without any second pass. With reference maxima, T is
fixed up front and a unit is finished once it has `max_examples` examples.

Shards: the corpus is cut into ranges of `shard_sequences`; each shard keeps candidates by these rules on its own and is
stored as one artefact. Its running max m_s ≤ M, so no global qualifier is pruned inside a shard, and a candidate
dominated by `max_examples` earlier ones in its shard is dominated by the same ones globally. The merge concatenates
the shards' candidates, takes the max of the maxima, sums histograms and compacts as one process would: the result is
the unsplit one exactly, for any split and any order of arrival.

A unit whose maximum is ≤ 0 has no examples (it is dead at this threshold: T ≥ M would select nothing meaningful).
The input vector depends only on (set, sequence, position), so each is stored once and examples point to it.

Interval examples (below the threshold): [0, T) is cut into `interval_count` equal intervals, and interval i of a unit
holds the first `interval_examples` sequences in corpus order whose max falls in [i·T/n, (i+1)·T/n) (the index is
`interval_index`, one formula). Which interval a sequence lands in depends on the final M, and any sequence can be
among the first of its interval, so nothing can be pruned before M is known. Instead every set records the max and
its first position of every (sequence, unit) pair (what the batch's `max(dim=1)` already gives), shards store these
tables, the merge concatenates them and `finish` picks the interval examples against the final maxima: exact by
construction, with no second pass over the corpus. The price is memory: units × sequences × 8 bytes per set (float32
max + int32 position), e.g. GPT-2 small's 3,072 neurons × 10,000 sequences = 246 MB per layer, merged one set at a
time (a shard holds its own sequences' rows of every set); acceptable next to the forward pass. `interval_examples = 0`
records nothing.

Cost (issue 14): every per-batch step is a torch op on the hook values' device, and nothing goes to the host until
`state_arrays`/`finish` (tests/test_collect.py counts the transfers). The histogram needs no search: the edges lie on
float32 values with 2 mantissa bits, so a value's bin is a function of its top 11 bits (`histogram_key_bins`). On a CPU
one compiled pass counts each value's bin by a table lookup and finds the sequence maxima with it
(builder/histogram_kernel.py); elsewhere `count_histogram_keys` counts the keys (one shift and one scatter per value)
and `fold_histogram` maps keys to bins. Each sequence's first maximum
comes from maxima of blocks of positions (`sequence_maxima`). The dominance rule is applied as a batch arrives, against
the `max_examples` largest sequence maxima fed before it (any earlier sequence that reaches a candidate's activation is
a candidate itself, or dominated by as many): a candidate, once stored, is only ever dropped by a rising maximum, so the
candidates kept stay near max_examples · (1 + ln(qualifiers / max_examples)) per unit, and compaction is a sort, a
threshold and a vector lookup, also on the device. Batches out of corpus order and absorbed shards are checked by
`keep_first_needed` at compaction instead.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from builder.config import AtlasConfig
from builder.data import tokenise_corpus
from builder.errors import ArtefactError, ConfigError
from builder.paths import AtlasPaths
from builder.schema import COLLECT_SHARD, EXAMPLES, HISTOGRAM_EDGES, TOKENS
from builder.shards import run_shards, sequence_shards, shard_files
from builder.stage import StageRun, progress
from builder.subjects import MlpLayer, Readout, SubjectSet

log = logging.getLogger(__name__)

CANDIDATE_FIELDS = ("unit", "seq", "pos", "act", "pre", "pre_linear", "window")
# Queries × group width compared at once by keep_first_needed (bool and gathered-float temporaries of this size).
DOMINANCE_BLOCK = 1 << 22
# Sequences whose interval indices are computed at once by select_interval_examples (float64 temporaries of
# INDEX_BLOCK × units).
INDEX_BLOCK = 512
# Hook values whose histogram keys are formed at once: an int32 buffer of 16 MB, small enough to stay in cache.
HISTOGRAM_BLOCK = 1 << 22
# Positions reduced at once when finding each sequence's first maximum (`sequence_maxima`).
POSITION_BLOCK = 32
# Sequences of a batch checked against each other at once by the dominance rule (a rows² × units comparison).
DOMINANCE_ROWS = 16
# Vectors copied at once by compaction (`_needed_vectors`): a temporary of VECTOR_BLOCK × d_input floats, small
# enough for the allocator to reuse it (fresh pages cost more than the copy).
VECTOR_BLOCK = 1 << 12
# Pending candidates that make `update`/`absorb` compact (or a quarter of those kept, if more): bounds the pending
# vectors while keeping compactions rare (their cost grows with the candidates kept).
COMPACT_PENDING = 1 << 16
# How a CPU counts histogram keys and finds each sequence's first maximum: "compiled" (builder/histogram_kernel.py,
# one pass over the values) or "torch" (the ops every other device runs; tests run both on a CPU).
HISTOGRAM_KERNEL = "compiled"
# A float32's histogram key is its bits − 1 shifted right by KEY_SHIFT: the sign, the exponent and 2 mantissa bits.
KEY_SHIFT = 21
N_KEYS = 1 << (32 - KEY_SHIFT)
_INT32_MAX = (1 << 31) - 1
FOLD_EVERY = _INT32_MAX  # values counted into int32 counters before they are folded into the histogram
_SEQ_SPAN = 1 << 31  # (unit, sequence) sort key: unit · _SEQ_SPAN + sequence


def histogram_key_bins(edges: np.ndarray) -> Int[np.ndarray, " n_keys"]:
    """The histogram bin of every key k = ((float32 bits − 1) >> KEY_SHIFT) + N_KEYS / 2 (schema.HISTOGRAM_EDGES'
    convention: above zero bin b holds (edges[b − 1], edges[b]], below zero [edges[b − 1], edges[b]), ±0 the bin
    ending at 0).

    Every edge has at most 2 mantissa bits, so edges lie on key boundaries; subtracting 1 from the bits moves a value
    exactly on a boundary into the key nearer zero (for either sign), and ±0 into the keys of the NaNs whose top bits
    are all ones. So all values of one key share one bin, read here off the key's last value. NaN's bin is
    unspecified."""
    edges = np.asarray(edges, np.float32)
    if (edges.view(np.int32) & ((1 << KEY_SHIFT) - 1)).any():
        raise ValueError("histogram edges must be float32 values with at most 2 mantissa bits")
    last_bits = (np.arange(N_KEYS, dtype=np.int64) - N_KEYS // 2 + 1) << KEY_SHIFT
    values = (last_bits & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return np.where(values >= 0, np.searchsorted(edges, values, side="left"),
                    np.searchsorted(edges, values, side="right")).astype(np.int64)


KEY_BINS = histogram_key_bins(HISTOGRAM_EDGES)
# The same table indexed by the unsigned key (uint32(bits) − 1) >> KEY_SHIFT, which is the key − N_KEYS / 2 modulo
# N_KEYS: the compiled pass computes that one (no sign to handle).
UNSIGNED_KEY_BINS = np.roll(KEY_BINS, -(N_KEYS // 2)).astype(np.uint8)


def count_histogram_keys(values: Float[Tensor, "rows n_units"], counts: Int[Tensor, " keys_by_units"]) -> None:
    """Add every float32 value's histogram key to `counts`, laid out key-major (key · n_units + unit, so the units of
    one row hit neighbouring counters), in blocks of rows that stay in cache. `fold_histogram` turns keys into bins."""
    n_units = values.shape[-1]
    bits = values.reshape(-1, n_units).view(torch.int32)
    rows = max(1, min(HISTOGRAM_BLOCK // n_units, len(bits)))
    wide = N_KEYS * n_units > _INT32_MAX
    column = torch.arange(n_units, device=values.device, dtype=torch.int64 if wide else torch.int32)
    column += (N_KEYS // 2) * n_units
    buffer = torch.empty((rows, n_units), dtype=torch.int32, device=values.device)
    ones = torch.ones((), dtype=counts.dtype, device=values.device).expand(buffer.numel())
    for start in range(0, len(bits), rows):
        keys = buffer[:min(rows, len(bits) - start)]
        torch.sub(bits[start:start + len(keys)], 1, out=keys)  # wraps -0.0 (INT32_MIN) to INT32_MAX
        keys.bitwise_right_shift_(KEY_SHIFT)
        index = keys.long() if wide else keys
        torch.add(column, index, alpha=n_units, out=index)
        counts.index_add_(0, index.view(-1), ones[:index.numel()])


def compiled_scan(device: torch.device) -> bool:
    """Whether batches on `device` are scanned by the compiled pass (a CPU) rather than torch ops."""
    return device.type == "cpu" and HISTOGRAM_KERNEL == "compiled"


def histogram_counters(n_units: int, device: torch.device
                       ) -> tuple[Int[Tensor, " rows_by_units"], Int[Tensor, " rows"]]:
    """Zeroed counters that `scan_batch` counts a device's values into, row-major (row · n_units + unit, so the units
    of one position hit neighbouring counters), and each row's histogram bin, which `SetState.fold_histogram` adds it
    to: one row per bin for the compiled pass (it looks a value's bin up), one per histogram key for torch ops (a key
    is one shift of the value's bits away; KEY_BINS maps keys to bins)."""
    rows = torch.arange(len(HISTOGRAM_EDGES) + 1) if compiled_scan(device) else torch.as_tensor(KEY_BINS)
    wide = len(rows) * n_units > _INT32_MAX  # counters indexed by an int64
    counts = torch.zeros(len(rows) * n_units, dtype=torch.int64 if wide else torch.int32, device=device)
    return counts, rows.to(device)


def scan_batch(post: Float[Tensor, "batch pos n_units"], counts: Int[Tensor, " rows_by_units"]
               ) -> tuple[Float[Tensor, "batch n_units"], Int[Tensor, "batch n_units"]]:
    """Count every value into `counts` (from `histogram_counters` for post's device) and return each sequence's max
    per unit and the first position holding it: on a CPU in one compiled pass (builder/histogram_kernel.py),
    elsewhere with torch ops."""
    if compiled_scan(post.device):
        from builder.histogram_kernel import scan_values

        n_seq, _, n_units = post.shape
        seq_max = torch.empty((n_seq, n_units), dtype=torch.float32)
        first = torch.empty((n_seq, n_units), dtype=torch.int64)
        # numpy views of the same memory: nothing is copied.
        scan_values(post.numpy(), post.view(torch.int32).numpy(), UNSIGNED_KEY_BINS,
                    counts.view(-1, n_units).numpy(), seq_max.numpy(), first.numpy(), KEY_SHIFT)
        return seq_max, first
    seq_max, first = sequence_maxima(post)
    count_histogram_keys(post, counts)
    return seq_max, first


def sequence_maxima(post: Float[Tensor, "batch pos n_units"]) -> tuple[Float[Tensor, "batch n_units"],
                                                                       Int[Tensor, "batch n_units"]]:
    """Each sequence's max per unit and the first position holding it. Reducing blocks of positions first keeps this
    to one pass over the values (argmax along positions costs ~10 of them on a CPU) and makes "first" explicit
    (torch.max's index is not guaranteed to be the first on every device)."""
    n_seq, n_pos, n_units = post.shape
    width = next(w for w in range(min(POSITION_BLOCK, n_pos), 0, -1) if n_pos % w == 0)
    block_max = post.view(n_seq, n_pos // width, width, n_units).amax(dim=2)
    seq_max = block_max.amax(dim=1)
    first_block = (block_max == seq_max[:, None]).to(torch.uint8).argmax(dim=1)  # argmax: first of equal values
    positions = first_block[:, None] * width + torch.arange(width, device=post.device)[None, :, None]
    inside = (post.gather(1, positions) == seq_max[:, None]).to(torch.uint8).argmax(dim=1)
    return seq_max, first_block * width + inside


@dataclass
class SetState:
    """One subject set's running state, as tensors on the device of its hook values: maxima, histogram counts,
    candidate examples and the vectors they point to. Nothing leaves the device until `state_arrays`/`finish`."""

    running_max: Float[Tensor, " n_units"]
    reference: Float[Tensor, " n_units"] | None
    counts: Int[Tensor, " rows_by_units"]  # values counted since the last fold, by `histogram_counters`' rows
    counter_bins: Int[Tensor, " rows"]  # the histogram bin of each row of `counts`
    histogram: Int[Tensor, "n_units n_bins"]
    candidates: dict[str, Tensor]  # CANDIDATE_FIELDS, sorted by (unit, sequence)
    vector_keys: Int[Tensor, " n_vectors"]  # seq * context_length + pos, sorted
    vectors: Float[Tensor, "n_vectors d_input"]
    # The dominance rule at insertion (see `Collector._needed`): without reference maxima, the max_examples largest
    # sequence maxima fed so far per unit, ascending; with them, how many fed sequences reached the threshold.
    leaders: Float[Tensor, "n_units max_examples"]
    qualified: Int[Tensor, " n_units"]
    pending: list[dict[str, Tensor]] = field(default_factory=list)
    pending_vectors: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    # Per-sequence maxima for the interval examples, in chunks: (sequence ids [n], max [n, units], argmax [n, units]).
    sequences: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    n_pending: int = 0
    counted: int = 0  # values counted into `counts` (each counter holds at most this many)
    next_seq: int = 0  # one past the last sequence `update` was fed
    needs_dominance: bool = False  # pending holds candidates the dominance rule has not seen (absorbed, out of order)

    @classmethod
    def empty(cls, n_units: int, d_input: int, window: int, max_examples: int,
              reference: np.ndarray | None) -> "SetState":
        candidates = {name: torch.zeros(0, dtype=torch.int32) for name in ("unit", "seq", "pos")}
        candidates.update({name: torch.zeros(0) for name in ("act", "pre", "pre_linear")})
        candidates["window"] = torch.zeros((0, window))
        counts, counter_bins = histogram_counters(n_units, torch.device("cpu"))
        return cls(running_max=torch.full((n_units,), -torch.inf),
                   reference=None if reference is None else torch.as_tensor(reference, dtype=torch.float32),
                   counts=counts, counter_bins=counter_bins,
                   histogram=torch.zeros((n_units, len(HISTOGRAM_EDGES) + 1), dtype=torch.int64),
                   candidates=candidates, vector_keys=torch.zeros(0, dtype=torch.int64),
                   vectors=torch.zeros((0, d_input)), leaders=torch.full((n_units, max_examples), -torch.inf),
                   qualified=torch.zeros(n_units, dtype=torch.int64))

    @property
    def device(self) -> torch.device:
        return self.running_max.device

    def to(self, device: torch.device) -> None:
        """Move every tensor of the state to `device` (once, when the first batch arrives there), with counters laid
        out for that device's scan."""
        self.fold_histogram()
        for name, value in vars(self).items():
            setattr(self, name, _moved(value, device))
        self.counts, self.counter_bins = histogram_counters(len(self.running_max), device)

    def fold_histogram(self) -> None:
        """Add the counted values into the per-bin histogram (exact: every key lies inside one bin)."""
        if self.counted == 0:
            return
        n_units = len(self.running_max)
        # Whole rows of counters into rows of bins, in the counters' dtype: a unit's counts sum to at most `counted`.
        by_bin = torch.zeros((self.histogram.shape[1], n_units), dtype=self.counts.dtype, device=self.device)
        by_bin.index_add_(0, self.counter_bins, self.counts.view(-1, n_units))
        self.histogram += by_bin.T
        self.counts.zero_()
        self.counted = 0

    def sequence_table(self) -> tuple[Int[np.ndarray, " n_seq"], Float[np.ndarray, "n_seq n_units"],
                                      Int[np.ndarray, "n_seq n_units"]]:
        """Every recorded sequence's id, per-unit max and its first position, concatenated (once) in arrival order."""
        if len(self.sequences) != 1:
            n_units, device = len(self.running_max), self.device
            chunks = [(torch.zeros(0, dtype=torch.int32, device=device), torch.zeros((0, n_units), device=device),
                       torch.zeros((0, n_units), dtype=torch.int32, device=device))] + self.sequences
            self.sequences = [tuple(torch.cat([c[i] for c in chunks]) for i in range(3))]
        return tuple(_host(t) for t in self.sequences[0])


def _moved(value, device: torch.device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {name: _moved(v, device) for name, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value


def _host(tensor: Tensor) -> np.ndarray:
    return tensor.cpu().numpy()


def candidate_mask(seq_max: Tensor, thresholds: Tensor, maxima: Tensor) -> Tensor:
    """Which (sequence, unit) pairs may still qualify: reach threshold·m, for units with a positive max."""
    return (seq_max >= thresholds) & (maxima > 0)


def _group_rank(sorted_groups: Tensor) -> Tensor:
    """Each element's index within its run of equal values (0 for the first)."""
    index = torch.arange(len(sorted_groups), device=sorted_groups.device)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=0).values


def keep_first_needed(unit: Int[Tensor, " n"], act: Float[Tensor, " n"], max_examples: int) -> Tensor:
    """Mask of candidates (given in corpus order) that fewer than `max_examples` earlier candidates of the same
    unit dominate (activation ≥ theirs). The rest can never be among a unit's first `max_examples` qualifiers.

    Compares each candidate with at least max_examples earlier ones against all of them, in blocks of candidates
    padded to the longest group: n × width work, on the candidates' device."""
    keep = torch.ones(len(unit), dtype=torch.bool, device=unit.device)
    order = torch.argsort(unit, stable=True)
    rank = _group_rank(unit[order])
    queries = torch.nonzero(rank >= max_examples).flatten()
    if len(queries) == 0:
        return keep
    sorted_act = act[order]
    width = int(rank.max())
    offsets = torch.arange(width, device=unit.device)
    step = max(1, DOMINANCE_BLOCK // width)
    for begin in range(0, len(queries), step):
        query = queries[begin:begin + step]
        members = (query - rank[query])[:, None] + offsets[None, :]  # the group's first `width` members
        earlier = offsets[None, :] < rank[query, None]
        members = torch.where(earlier, members, query[:, None])
        dominating = ((sorted_act[members] >= sorted_act[query, None]) & earlier).sum(dim=1)
        keep[order[query]] = dominating < max_examples
    return keep


def select_examples(unit: np.ndarray, seq: np.ndarray, act: np.ndarray, thresholds: np.ndarray,
                    max_examples: int) -> np.ndarray:
    """Indices of the final examples: per unit, the first max_examples (by sequence) reaching its threshold,
    ordered by (unit, sequence)."""
    qualifies = act >= thresholds[unit]
    index = np.flatnonzero(qualifies)
    index = index[np.lexsort((seq[index], unit[index]))]
    rank = _rank_within_group(unit[index])
    return index[rank < max_examples]


def interval_index(values: np.ndarray, limits: np.ndarray, n: int) -> np.ndarray:
    """Interval of each value when [0, limit) is cut into n equal intervals: floor(v·n / limit) in float64, clipped to
    n − 1 (rounding can reach n just below the limit); -1 where v < 0, v ≥ limit or the limit is not positive."""
    v, t = values.astype(np.float64), np.asarray(limits, np.float64)
    inside = (v >= 0) & (v < t) & (t > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        index = np.minimum(np.floor(v * n / t), n - 1)
    return np.where(inside, index, -1).astype(np.int32)


def select_interval_examples(seq_ids: np.ndarray, seq_max: np.ndarray, seq_argmax: np.ndarray, limits: np.ndarray,
                             n_intervals: int, per_interval: int) -> dict[str, np.ndarray]:
    """Per unit and interval of [0, limit), the first `per_interval` sequences (by id) whose max falls in it:
    interval_seq/pos [units, n, k] (-1 where fewer) and interval_act (NaN)."""
    n_units = seq_max.shape[1]
    shape = (n_units, n_intervals, per_interval)
    out = {"interval_seq": np.full(shape, -1, np.int32), "interval_pos": np.full(shape, -1, np.int32),
           "interval_act": np.full(shape, np.nan, np.float32)}
    if per_interval == 0 or len(seq_ids) == 0:
        return out
    order = np.argsort(seq_ids, kind="stable")
    # Interval of every (unit, sequence in id order), units as rows so the scans below run along contiguous memory;
    # built in blocks of sequences to bound the float64 temporaries. The smallest integer type holding -1 … n − 1.
    index = np.empty((n_units, len(order)), np.min_scalar_type(-n_intervals))
    for start in range(0, len(order), INDEX_BLOCK):
        rows = order[start:start + INDEX_BLOCK]
        index[:, start:start + len(rows)] = interval_index(seq_max[rows], limits[None, :], n_intervals).T
    for interval in range(n_intervals):
        hit = index == interval
        rank = np.cumsum(hit, axis=1, dtype=np.int32)  # 1 for a unit's first hit in corpus order, 2 for its second…
        units, columns = np.nonzero(hit & (rank <= per_interval))
        slot, rows = rank[units, columns] - 1, order[columns]
        out["interval_seq"][units, interval, slot] = seq_ids[rows]
        out["interval_pos"][units, interval, slot] = seq_argmax[rows, units]
        out["interval_act"][units, interval, slot] = seq_max[rows, units]
    return out


def _rank_within_group(sorted_groups: np.ndarray) -> np.ndarray:
    if len(sorted_groups) == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(sorted_groups)), 0))
    return np.arange(len(sorted_groups)) - group_start


class Collector:
    """Streams batches of hook values into per-set state. Pure torch: no model, no files.

    All per-batch work runs in torch on the device of the hook values (state moves there with the first batch), with
    no transfer to the host until `state_arrays`/`finish`. A collector sees any contiguous or non-contiguous part of
    the corpus (a shard); `absorb` merges another collector's state exactly (see the module docstring and
    docs/architecture.md)."""

    def __init__(self, sets: list[SubjectSet], context_length: int, threshold: float, max_examples: int,
                 window_before: int, window_after: int, reference_maxima: dict[str, np.ndarray] | None = None, *,
                 interval_count: int, interval_examples: int):
        self.sets = {s.key: s for s in sets}
        self.context_length = context_length
        self.threshold = threshold
        self.max_examples = max_examples
        self.interval_count = interval_count
        self.interval_examples = interval_examples
        self.window_before = window_before
        self.window_after = window_after
        self.reference = reference_maxima
        self.states = {s.key: SetState.empty(s.size, s.d_input, self.window_width, max_examples,
                                             None if reference_maxima is None else reference_maxima[s.key])
                       for s in sets}

    @classmethod
    def for_config(cls, sets: list[SubjectSet], cfg: AtlasConfig,
                   reference_maxima: dict[str, np.ndarray] | None = None) -> "Collector":
        return cls(sets, cfg.context_length, cfg.threshold, cfg.max_examples, cfg.window_before, cfg.window_after,
                   reference_maxima, interval_count=cfg.interval_count, interval_examples=cfg.interval_examples)

    @property
    def window_width(self) -> int:
        return self.window_before + 1 + self.window_after

    def _maxima(self, key: str) -> np.ndarray:
        return self.reference[key] if self.reference is not None else _host(self.states[key].running_max)

    @staticmethod
    def _maxima_t(state: SetState) -> Tensor:
        return state.running_max if state.reference is None else state.reference

    def update(self, key: str, first_seq: int, readout: Readout) -> None:
        """Feed one batch of sequences (corpus indices first_seq …) of subject set `key`."""
        state = self.states[key]
        post = readout.post.float().contiguous()
        if post.device != state.device:
            state.to(post.device)
        n_seq, n_pos, n_units = post.shape
        if state.counted + n_seq * n_pos > FOLD_EVERY and state.counts.dtype == torch.int32:
            state.fold_histogram()
        seq_max, argmax = scan_batch(post, state.counts)
        state.counted += n_seq * n_pos
        if self.interval_examples > 0:
            state.sequences.append((torch.arange(first_seq, first_seq + n_seq, dtype=torch.int32, device=post.device),
                                    seq_max, argmax.int()))
        torch.maximum(state.running_max, seq_max.amax(dim=0), out=state.running_max)

        maxima = self._maxima_t(state)
        mask = candidate_mask(seq_max, self.threshold * maxima, maxima)
        mask &= self._needed(state, first_seq, seq_max, mask)
        rows, units = torch.nonzero(mask, as_tuple=True)
        if len(rows) == 0:
            return
        positions = argmax[rows, units]
        offsets = torch.arange(-self.window_before, self.window_after + 1, device=post.device)
        window_pos = positions[:, None] + offsets[None, :]
        inside = (window_pos >= 0) & (window_pos < n_pos)
        window = post[rows[:, None], window_pos.clamp(0, n_pos - 1), units[:, None]]
        chunk = {
            "unit": units.int(), "seq": (rows + first_seq).int(), "pos": positions.int(),
            "act": seq_max[rows, units],
            "pre": readout.pre[rows, positions, units].float(),
            "pre_linear": (readout.pre_linear[rows, positions, units].float() if readout.pre_linear is not None
                           else torch.zeros(len(rows), device=post.device)),
            "window": torch.where(inside, window, torch.full_like(window, float("nan"))),
        }
        keys = chunk["seq"].long() * self.context_length + positions
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        # Any candidate of each (sequence, position): they all point to the same vector.
        pick = torch.empty(len(unique_keys), dtype=torch.long, device=post.device).scatter_(
            0, inverse, torch.arange(len(keys), device=post.device))
        state.pending.append(chunk)
        state.pending_vectors.append((unique_keys, readout.input[rows[pick], positions[pick]].float()))
        state.n_pending += len(rows)
        if state.n_pending >= max(COMPACT_PENDING, len(state.candidates["unit"]) // 4):
            self._compact(state)

    def _needed(self, state: SetState, first_seq: int, seq_max: Float[Tensor, "batch n_units"],
                qualifies: Tensor) -> Tensor:
        """Which (sequence, unit) pairs of the batch fewer than max_examples earlier fed sequences dominate: reach at
        least the pair's max (any such sequence is itself a candidate, or dominated by as many; so this is
        `keep_first_needed`'s rule, applied before the pair is stored); with reference maxima, reach the threshold
        before it. A batch from before the last one fed may be dominated by later sequences: it is kept whole and
        compaction applies the rule; its maxima still count for the batches after it."""
        n = self.max_examples
        if state.reference is not None:
            counts = qualifies.long()
            before = state.qualified + torch.cumsum(counts, dim=0) - counts
            state.qualified += counts.sum(dim=0)
            needed = before < n
        else:
            needed = torch.empty_like(qualifies)
            for start in range(0, len(seq_max), DOMINANCE_ROWS):
                rows = seq_max[start:start + DOMINANCE_ROWS]
                earlier = n - torch.searchsorted(state.leaders, rows.T.contiguous(), side="left").T
                within = (rows[None, :, :] >= rows[:, None, :]) & torch.ones(
                    len(rows), len(rows), dtype=torch.bool, device=rows.device).tril(-1)[:, :, None]
                needed[start:start + len(rows)] = earlier + within.sum(dim=1) < n
                state.leaders = torch.sort(torch.cat([state.leaders, rows.T], dim=1), dim=1).values[:, -n:].contiguous()
        in_order = first_seq >= state.next_seq
        state.next_seq = max(state.next_seq, first_seq + len(seq_max))
        if not in_order:
            state.needs_dominance = True
            return torch.ones_like(qualifies)
        return needed

    def absorb(self, arrays: dict[str, np.ndarray]) -> None:
        """Merge another collector's `state_arrays()` (a shard) into this one. Exact in any order: compaction sorts
        by (unit, sequence) and applies the dominance rule, maxima combine by max, histograms by sum, and
        per-sequence maxima are kept (sorted by sequence in `finish`)."""
        for key, state in self.states.items():
            def tensor(name: str) -> Tensor:
                return torch.as_tensor(arrays[f"{key}.{name}"], device=state.device)

            torch.maximum(state.running_max, tensor("running_max"), out=state.running_max)
            state.histogram += tensor("histogram")
            state.pending.append({name: tensor(f"c.{name}") for name in CANDIDATE_FIELDS})
            state.pending_vectors.append((tensor("vector_keys"), tensor("vectors")))
            state.sequences.append((tensor("seq_ids"), tensor("seq_max"), tensor("seq_argmax")))
            state.n_pending += len(arrays[f"{key}.c.unit"])
            state.needs_dominance = True
            if state.n_pending >= max(COMPACT_PENDING, len(state.candidates["unit"]) // 4):
                self._compact(state)

    def compact(self) -> None:
        """Merge pending candidates and drop every one that can no longer be selected, and unused vectors."""
        for state in self.states.values():
            self._compact(state)

    def _compact(self, state: SetState) -> None:
        if not state.pending:
            return
        merged = {name: torch.cat([state.candidates[name]] + [c[name] for c in state.pending])
                  for name in CANDIDATE_FIELDS}
        state.pending.clear()
        state.n_pending = 0
        order = torch.argsort(merged["unit"].long() * _SEQ_SPAN + merged["seq"].long())
        alive = merged["act"][order] >= self.threshold * self._maxima_t(state)[merged["unit"][order].long()]
        merged = {name: values[order[alive]] for name, values in merged.items()}
        if state.needs_dominance:
            if state.reference is not None:
                keep = _group_rank(merged["unit"]) < self.max_examples
            else:
                keep = keep_first_needed(merged["unit"], merged["act"], self.max_examples)
            merged = {name: values[keep] for name, values in merged.items()}
            state.needs_dominance = False
        state.candidates = merged
        parts = [(state.vector_keys, state.vectors)] + state.pending_vectors
        state.pending_vectors = []
        state.vector_keys, state.vectors = _needed_vectors(
            parts, merged["seq"].long() * self.context_length + merged["pos"])

    def finish(self, key: str) -> dict[str, np.ndarray]:
        """The set's final artefact arrays: examples grouped by unit in corpus order, and interval examples."""
        self.compact()
        state = self.states[key]
        state.fold_histogram()
        observed = _host(state.running_max)
        maxima = self._maxima(key)
        thresholds = np.where(maxima > 0, self.threshold * maxima, np.inf).astype(np.float32)
        c = {name: _host(values) for name, values in state.candidates.items()}
        chosen = select_examples(c["unit"], c["seq"], c["act"], thresholds, self.max_examples)
        counts = np.bincount(c["unit"][chosen], minlength=len(maxima))
        keys = c["seq"][chosen].astype(np.int64) * self.context_length + c["pos"][chosen]
        vector_keys, vector_index = np.unique(keys, return_inverse=True)
        lookup = torch.searchsorted(state.vector_keys, torch.as_tensor(vector_keys, device=state.device))
        limits = np.where(maxima > 0, self.threshold * maxima, 0).astype(np.float32)
        intervals = select_interval_examples(*state.sequence_table(), limits, self.interval_count,
                                             self.interval_examples)
        return {
            "max_activation": maxima.astype(np.float32),
            "observed_max": observed.astype(np.float32),
            "offsets": np.r_[0, np.cumsum(counts)].astype(np.int64),
            "seq": c["seq"][chosen], "pos": c["pos"][chosen], "act": c["act"][chosen],
            "pre": c["pre"][chosen], "pre_linear": c["pre_linear"][chosen], "window": c["window"][chosen],
            "vector_index": vector_index.astype(np.int32),
            "vector_seq": (vector_keys // self.context_length).astype(np.int32),
            "vector_pos": (vector_keys % self.context_length).astype(np.int32),
            "vectors": _host(state.vectors[lookup]),
            "histogram": _host(state.histogram).astype(np.int32),
            "histogram_edges": HISTOGRAM_EDGES,
            **intervals,
        }

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The compacted state of every set under `{key}.`-prefixed names: a shard's artefact."""
        self.compact()
        arrays = {}
        for key, state in self.states.items():
            state.fold_histogram()
            # copies: the state updates these two in place
            arrays[f"{key}.running_max"] = _host(state.running_max).copy()
            arrays[f"{key}.histogram"] = _host(state.histogram).copy()
            arrays[f"{key}.vector_keys"] = _host(state.vector_keys)
            arrays[f"{key}.vectors"] = _host(state.vectors)
            arrays[f"{key}.seq_ids"], arrays[f"{key}.seq_max"], arrays[f"{key}.seq_argmax"] = state.sequence_table()
            for name in CANDIDATE_FIELDS:
                arrays[f"{key}.c.{name}"] = _host(state.candidates[name])
        return arrays


def _needed_vectors(parts: list[tuple[Tensor, Tensor]], needed: Int[Tensor, " n"]
                    ) -> tuple[Int[Tensor, " n_vectors"], Float[Tensor, "n_vectors d_input"]]:
    """The vectors whose keys are `needed`, once each and sorted by key, from parts of (keys, vectors). Copied into
    one new tensor part by part and in blocks, so the peak is the old parts plus the kept rows (not a concatenation
    of everything first)."""
    keys = torch.cat([k for k, _ in parts])
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    source = torch.empty(len(unique_keys), dtype=torch.long, device=keys.device).scatter_(
        0, inverse, torch.arange(len(keys), device=keys.device))  # any copy of a key: they are equal
    wanted = torch.isin(unique_keys, needed)
    source, kept_keys = source[wanted], unique_keys[wanted]
    vectors = parts[0][1]
    out = torch.empty((len(source), vectors.shape[1]), dtype=vectors.dtype, device=vectors.device)
    start = 0
    for _, part in parts:
        rows = torch.nonzero((source >= start) & (source < start + len(part))).flatten()
        for begin in range(0, len(rows), VECTOR_BLOCK):
            block = rows[begin:begin + VECTOR_BLOCK]
            # whole-row copies: index_select/index_copy_ beat `out[block] = part[…]` (index_put_) on a CPU
            out.index_copy_(0, block, part.index_select(0, source[block] - start))
        start += len(part)
    return kept_keys, out


def forward_with_hooks(bridge, tokens: Tensor, sets: list[SubjectSet]) -> dict[str, Tensor]:
    """One forward pass that stops after the deepest block any set reads, keeping only the hooks the sets need."""
    captured: dict[str, Tensor] = {}

    def keeper(name: str):
        # Keyed by the name asked for: the bridge may call an alias (hook_resid_post) by its own name (hook_out).
        def keep(value: Tensor, hook) -> None:
            captured[name] = value.detach()
        return keep

    hooks = [(name, keeper(name)) for name in dict.fromkeys(n for s in sets for n in s.hooks())]
    with torch.no_grad():
        bridge.run_with_hooks(tokens, return_type=None, stop_at_layer=max(s.layer for s in sets) + 1,
                              fwd_hooks=hooks)
    return captured


def collect_batch(collector: Collector, bridge, batch: Tensor, first_seq: int) -> None:
    """Forward one batch of sequences (starting at corpus index first_seq) and feed every set's hooks."""
    sets = list(collector.sets.values())
    captured = forward_with_hooks(bridge, batch, sets)
    for s in sets:
        collector.update(s.key, first_seq, s.read(captured))


def load_reference_maxima(cfg: AtlasConfig, sets: list[SubjectSet], n_layers: int
                          ) -> dict[str, np.ndarray] | None:
    """Reference maxima per set: an .npz with an array per set key, or (MLP layers) an .npy [n_layers, d_mlp]."""
    if not cfg.reference_maxima:
        return None
    sizes = {s.key: s.size for s in sets}
    fix = (f"give an .npz with one array per subject set ({', '.join(f'{k}: [{n}]' for k, n in sizes.items())}) "
           f"or an .npy of shape [{n_layers}, {max(sizes.values())}]")
    try:
        loaded = np.load(cfg.reference_maxima, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            if any(s.kind != MlpLayer.kind for s in sets) or loaded.ndim != 2 \
                    or loaded.shape != (n_layers, max(sizes.values())):
                raise ConfigError(f"reference_maxima has shape {loaded.shape!r}; {fix}")
            maxima = {s.key: loaded[s.layer] for s in sets}
        else:
            with loaded:
                missing = [k for k in sizes if k not in loaded.files]
                if missing:
                    raise ConfigError(f"reference_maxima has no array {missing[0]!r}; {fix}")
                maxima = {k: loaded[k] for k in sizes}
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read reference_maxima {cfg.reference_maxima!r} ({error}); {fix}") from None
    for key, values in maxima.items():
        if values.shape != (sizes[key],) or not np.isfinite(values).all():
            raise ConfigError(f"reference_maxima for {key} must be finite with shape [{sizes[key]}], got "
                              f"{values.shape!r}; regenerate it for this model")
    return {key: values.astype(np.float32) for key, values in maxima.items()}


class CollectShards:
    """Collect's ShardWorker for one group of subject sets (`set_groups`, `collect_groups`): the model and the packed
    tokens once, then each shard's batches fed to a fresh Collector of the group's sets, whose state is the shard's
    artefact. Pickled without the model (another process loads its own in `setup`)."""

    stage = "collect"

    def __init__(self, cfg: AtlasConfig, model=None, group: tuple[str, ...] = (), name: str = ""):
        self.cfg = cfg
        self.model = model
        self.group = group  # the keys of the sets this worker collects
        self.name = name  # the group's shard folder (paths.shard); "" when every set is in one group

    def __getstate__(self) -> dict:
        return {**vars(self), "model": None}

    def setup(self) -> None:
        from builder.models import load_model

        if self.model is None:
            self.model = load_model(self.cfg)
        self.sets = [s for s in atlas_sets(self.cfg, self.model) if s.key in self.group]
        self.reference = load_reference_maxima(self.cfg, self.sets, self.model.n_layers)
        self.tokens = TOKENS.read_npz(AtlasPaths.of(self.cfg).tokens)["tokens"]

    def run(self, shard: range, bar) -> dict:
        collector = Collector.for_config(self.sets, self.cfg, self.reference)
        for first in range(shard.start, shard.stop, self.cfg.batch_size):
            end = min(shard.stop, first + self.cfg.batch_size)
            batch = torch.as_tensor(self.tokens[first:end], dtype=torch.long, device=self.model.device)
            collect_batch(collector, self.model.bridge, batch, first)
            bar.update(end - first)
        COLLECT_SHARD.write_npz(AtlasPaths.of(self.cfg).shard("collect", shard.start, shard.stop, self.name),
                                **collector.state_arrays())
        return {"forwarded_sequences": len(shard)}


def set_groups(sets: list[SubjectSet], n_groups: int) -> list[list[SubjectSet]]:
    """`sets` in at most n_groups groups of consecutive sets by layer (hook order within a layer kept), as equal in
    number as they divide: the first group forwards the fewest layers."""
    ordered = sorted(sets, key=lambda s: s.layer)
    n_groups = min(n_groups, len(ordered))
    if n_groups == 0:
        return []
    size, extra = divmod(len(ordered), n_groups)
    groups, start = [], 0
    for index in range(n_groups):
        end = start + size + (index < extra)
        groups.append(ordered[start:end])
        start = end
    return groups


def atlas_sets(cfg: AtlasConfig, model) -> list[SubjectSet]:
    """The subject sets a config atlases on a loaded model: its selected MLP layers, then its SAEs."""
    from builder.models import selected_layers
    from builder.subjects import model_subject_sets

    layers = selected_layers(cfg, model.n_layers)
    return model_subject_sets(model, layers if cfg.atlas_neurons else [], cfg.atlased_saes, cfg.model)


def build(run: StageRun) -> dict:
    """The collect stage: tokenise once, run every sequence shard not yet done (with the config's engine), merge the
    shards exactly."""
    from builder.models import load_model, selected_layers

    cfg, paths = run.cfg, run.paths
    model = load_model(cfg)
    layers = selected_layers(cfg, model.n_layers)
    sets = atlas_sets(cfg, model)
    reference = load_reference_maxima(cfg, sets, model.n_layers)
    tokens, packing = _load_or_tokenise(run, model)
    shards = sequence_shards(len(tokens), cfg.shard_sequences)
    groups = set_groups(sets, cfg.collect_groups)
    names = [f"{index + 1}of{len(groups)}" if len(groups) > 1 else "" for index in range(len(groups))]
    files = {name: shard_files(paths, "collect", shards, name) for name in names}
    _remove_other_groupings(paths, names)
    todo = {name: [r for r in shards if not COLLECT_SHARD.is_readable(files[name][r])] for name in names}
    done = sum(len(shards) - len(t) for t in todo.values())
    if done:
        log.info("collect: %d of %d shards already done", done, len(shards) * len(groups))
    counters = []
    with progress(total=len(tokens) * len(groups), desc="collect", unit="seq",
                  initial=sum(len(tokens) - sum(len(r) for r in t) for t in todo.values())) as bar:
        for group, name in zip(groups, names):
            worker = CollectShards(cfg, model, tuple(s.key for s in group), name)
            counters += run_shards(cfg, worker, todo[name], bar)
    # One set at a time, reading only its arrays from its group's shards: the driver holds one set's merged state,
    # not all of them (a GPT-2-small layer's is ≈ 1.5 GB after 10M tokens).
    for group, name in zip(groups, names):
        for s in group:
            merged = Collector.for_config([s], cfg, None if reference is None else {s.key: reference[s.key]})
            for shard in shards:
                merged.absorb(COLLECT_SHARD.read_npz(files[name][shard], prefix=f"{s.key}."))
            run.write_npz(EXAMPLES, paths.set_file("collect", s.key), **merged.finish(s.key))
    return {"model": cfg.model, "model_revision": model.revision, "n_layers": model.n_layers,
            "d_model": model.d_model, "d_mlp": model.d_mlp, "gated": model.gated, "layers": layers,
            "subject_sets": [s.describe() for s in sets],
            "dataset": [Path(f).name for f in cfg.data_files] if cfg.data_files else cfg.dataset,
            "n_sequences": int(len(tokens)), "n_tokens": int(tokens.size), "context_length": cfg.context_length,
            "packing": packing, "threshold": cfg.threshold, "max_examples": cfg.max_examples,
            "interval_count": cfg.interval_count, "interval_examples": cfg.interval_examples,
            "reference_maxima": bool(cfg.reference_maxima), "window_before": cfg.window_before,
            "window_after": cfg.window_after, "n_shards": len(shards), "collect_groups": len(groups),
            "shards_run_last_run": sum(len(t) for t in todo.values()),
            "forwarded_sequences_last_run": sum(c["forwarded_sequences"] for c in counters),
            "build_date": packing["build_date"]}


def _remove_other_groupings(paths: AtlasPaths, names: list[str]) -> None:
    """Remove shard folders of another `collect_groups` (a machine setting): this grouping's shards replace them."""
    import shutil

    keep = {paths.shard("collect", 0, 0, name).parent for name in names}
    for folder in paths.shard("collect", 0, 0).parent.parent.glob("shards*"):
        if folder.is_dir() and folder not in keep:
            shutil.rmtree(folder)


def _load_or_tokenise(run: StageRun, model) -> tuple[np.ndarray, dict]:
    """The packed tokens and how they were packed (with the build date), tokenising only on the first run."""
    cfg, path = run.cfg, run.paths.tokens
    try:
        arrays = TOKENS.read_npz(path)
        tokens, packing = arrays["tokens"], json.loads(str(arrays["packing"]))
    except (ArtefactError, KeyError, ValueError):
        tokens, packing = tokenise_corpus(cfg, model.tokenizer)
        packing = {**packing, "build_date": datetime.date.today().isoformat()}
        TOKENS.write_npz(path, tokens=tokens, packing=np.array(json.dumps(packing, sort_keys=True)))
    run.record(path, TOKENS)
    return tokens, packing
