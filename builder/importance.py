"""Token importance: how much each context token matters to a unit's activation at its max token.

For every kept example and every position p in the window [m − window_before, m] before and at the max token m, the
token at p is replaced by the mask token (the model's pad token, a configured substitute, else EOS; the BOS position
is never masked) and the drop in the unit's activation at m is measured. With `importance_mode = "delete"` a token
before m is deleted instead (later tokens move one position left, and the activation is read at the max token's new
position m − 1); the max token itself is still masked. Drops are divided by the drop from masking the max token
itself and clipped to [0, 1].

When that normalising drop is zero or negative (masking the max token does not lower the activation), drops are
divided by the largest positive drop in the window instead; if no drop is positive the example's importances are all
zero. `normaliser` records which case applied: 0 max token, 1 largest drop, 2 none.

The computation is exact but shared (the naive reference in the tests re-runs the prefix per neuron, example and
position):
- masking (or deleting) p changes nothing before p (causal attention), so one changed run of a sequence serves every
  unit of every set whose max token lies in p … p + window_before;
- each changed run (a row) computes only the tokens from p to the last max token it serves (at most window + 1), on
  top of the clean key/value cache of positions before p; a sequence's rows share its one cached prefix (no copy
  per row: `SharedPrefixCache`, with a mask hiding the cached positions at or after each row's p);
- rows per forward come from a memory budget (`importance_memory_mb`, else derived from the device), so a GPU runs
  thousands at once; the results do not depend on it beyond float rounding (within 1e-6, absolute and relative, on
  the tests' models);
- the forward stops after the deepest layer any example of the forward needs.

Shards are contiguous sequence ranges (`shard_sequences`, a multiple of GROUP); sequences are batched in groups
aligned to multiples of GROUP, so any split batches the same rows together and the merged result is the unsplit one
exactly. Before any work, one cached masked run is compared with an uncached one (`check_kv_cache`): a transformers
release whose attention ignores the cache through TransformerLens' bridge would otherwise give wrong importances
silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from builder.config import SHARD_MULTIPLE, AtlasConfig
from builder.errors import AtlasError, ConfigError
from builder.paths import AtlasPaths
from builder.schema import (IMPORTANCE, IMPORTANCE_SHARD, SetExamples, collect_sets, read_collect_meta,
                            read_examples, read_tokens)
from builder.shards import run_shards, sequence_shards, shard_files
from builder.stage import StageRun, progress
from builder.subjects import SubjectSet

log = logging.getLogger(__name__)

GROUP = SHARD_MULTIPLE  # sequences whose rows are batched together, aligned to multiples of GROUP
SUPPORTED_TRANSFORMERS = "5.20.2"
# A cached masked run may differ from an uncached one by float noise only.
KV_CHECK_TOLERANCE = 1e-4
# An entry of a masked forward (one sequence's rows, one after another) holds at most this many times its
# sequence's prefix in new tokens. Each of its tokens attends to the cached positions before the forward's latest
# row start and to the whole entry (the mask hides what it must not see), so longer entries batch more rows per
# forward but spend more on hidden keys: at twice the prefix, GPT-2 small at context 1,024 spends about a third of
# its per-token work on attention (a quarter at once the prefix, with half the rows per forward), and a GPU takes
# thousands of rows per forward.
FOLD_PER_PREFIX = 2
# Peak bytes per attention-score element in one layer of the bridge's attention: it holds about three float32
# copies of the scores at once (the scores, their softmax, its NaN scrub) and a boolean; 16 leaves headroom.
SCORE_BYTES = 16
# Float32 values per token in one layer besides the scores: residual, norms, q/k/v, attention output and MLP input
# come to about ten d_model-wide values, the MLP three d_mlp-wide ones (before and after the activation, the gate).
D_MODEL_VALUES, D_MLP_VALUES = 10, 3
# The memory one forward may use when importance_memory_mb is 0: half of a GPU's memory (the model and the clean
# caches are small next to it); on a CPU an eighth of the host's memory, at most 4 GiB (other work shares it).
GPU_MEMORY_SHARE, CPU_MEMORY_SHARE, CPU_MEMORY_CAP = 2, 8, 4 << 30


def normalised_importance(clean: Float[np.ndarray, " n"], masked: Float[np.ndarray, "n w"]
                          ) -> tuple[Float[np.ndarray, "n w"], Int[np.ndarray, " n"]]:
    """Drops clean − masked divided by the max token's own drop (last column), clipped to [0, 1]; NaN stays NaN
    (positions before the sequence or at BOS). See the module docstring for a non-positive normaliser."""
    drops = clean[:, None] - masked
    own = drops[:, -1]
    largest = np.nanmax(np.where(np.isnan(drops), -np.inf, drops), axis=1)
    normaliser = np.where(own > 0, 0, np.where(largest > 0, 1, 2)).astype(np.int8)
    scale = np.where(normaliser == 0, own, np.where(normaliser == 1, largest, 1.0))
    importance = np.clip(drops / scale[:, None], 0.0, 1.0)
    importance[normaliser == 2] = np.where(np.isnan(drops[normaliser == 2]), np.nan, 0.0)
    return importance.astype(np.float32), normaliser


@dataclass(frozen=True)
class SequenceExamples:
    """The examples of one sequence across subject sets: what a shared masked run must read off."""

    set_index: Int[np.ndarray, " k"]  # position of the example's set in the atlas's list of sets
    unit: Int[np.ndarray, " k"]
    position: Int[np.ndarray, " k"]
    row: Int[np.ndarray, " k"]  # index into the set's example arrays

    def take(self, chosen: np.ndarray) -> "SequenceExamples":
        return SequenceExamples(self.set_index[chosen], self.unit[chosen], self.position[chosen], self.row[chosen])


def examples_by_sequence(examples: list[SetExamples]) -> dict[int, SequenceExamples]:
    """Every example of every set (given in atlas order), grouped by its sequence."""
    parts = [(np.full(len(e.seq), i), e.unit_of_example, e.pos, np.arange(len(e.seq)), e.seq)
             for i, e in enumerate(examples)]
    set_index, unit, position, row, seq = (np.concatenate(column) for column in zip(*parts))
    order = np.lexsort((row, set_index, seq))
    grouped = {}
    for s in np.unique(seq):
        chosen = order[seq[order] == s]
        grouped[int(s)] = SequenceExamples(set_index[chosen], unit[chosen], position[chosen], row[chosen])
    return grouped


def masked_positions(positions: np.ndarray, window: int, first_maskable: int) -> np.ndarray:
    """Every position some example's window needs masked."""
    needed = np.zeros(int(positions.max()) + 1, bool)
    for m in np.unique(positions):
        needed[max(first_maskable, m - window):m + 1] = True
    return np.flatnonzero(needed)


def default_memory_bytes(device: torch.device) -> int:
    """The memory budget of one forward when the config leaves it to the device (see GPU_MEMORY_SHARE)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // GPU_MEMORY_SHARE
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(CPU_MEMORY_CAP, host // CPU_MEMORY_SHARE)


@dataclass(frozen=True)
class ForwardShape:
    """The model sizes one forward's memory depends on."""

    n_heads: int
    kv_width: int  # keys (or values) of one token in one layer: key/value heads × head size
    d_model: int
    d_mlp: int

    @classmethod
    def of(cls, bridge) -> "ForwardShape":
        cfg = bridge.cfg
        kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        return cls(int(cfg.n_heads), int(kv_heads * cfg.d_head), int(cfg.d_model), int(cfg.d_mlp))


def forward_bytes(shape: ForwardShape, entries: int, new_tokens: int, keys: int, cache_tokens: int, layers: int,
                  captured_width: int) -> int:
    """An upper estimate of the bytes one forward holds at its peak: `entries` entries of `new_tokens` tokens
    attending to `keys` keys each, beside the group's cache buffer of `cache_tokens` tokens per entry for `layers`
    layers, with the hooks keeping `captured_width` float32 values per token."""
    tokens = entries * new_tokens
    scores = tokens * shape.n_heads * keys * SCORE_BYTES
    mask = tokens * keys * 5  # the boolean mask and the bridge's float32 copy of it
    values = tokens * (D_MODEL_VALUES * shape.d_model + D_MLP_VALUES * shape.d_mlp + captured_width) * 4
    cache = layers * 2 * entries * cache_tokens * shape.kv_width * 4
    return scores + mask + values + cache


def largest_fitting(low: int, high: int, fits) -> int:
    """The largest n in [low, high] with fits(n), for fits true up to some n and false after; low if none fits."""
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


@dataclass(frozen=True)
class ForwardPlan:
    """How the forwards of one group are sized under a memory budget."""

    fold: int  # new tokens per entry of a masked forward
    chunk: int  # clean tokens per entry of a clean forward


def plan_forwards(budget: int, shape: ForwardShape, entries: int, prefix: int, layers: int, captured_width: int,
                  window: int) -> ForwardPlan:
    """The largest masked fold (at least one row of window + 1 tokens, at most FOLD_PER_PREFIX × the prefix) and
    then the largest clean chunk (at least one token) whose forwards fit in `budget` bytes."""
    def fits(new_tokens: int, keys: int, fold: int) -> bool:
        return forward_bytes(shape, entries, new_tokens, keys, prefix + fold, layers, captured_width) <= budget

    shortest = window + 1
    fold = largest_fitting(shortest, max(shortest, FOLD_PER_PREFIX * prefix), lambda t: fits(t, prefix + t, t))
    return ForwardPlan(fold, largest_fitting(1, prefix, lambda c: fits(c, prefix, fold)))


@dataclass(frozen=True)
class SequenceRows:
    """The changed runs (rows) of one sequence: row r masks (or deletes) the token at start[r] and runs the tokens
    from there to the last position one of its examples is read at, on top of the clean cache of positions before
    start[r]."""

    start: Int[np.ndarray, " r"]
    deleted: Bool[np.ndarray, " r"]
    length: Int[np.ndarray, " r"]  # tokens it runs
    pair_row: Int[np.ndarray, " q"]  # (row, example) pairs: the row gives the example's value at start − m + window
    pair_example: Int[np.ndarray, " q"]


def sequence_rows(position: Int[np.ndarray, " k"], window: int, first_maskable: int, delete: bool) -> SequenceRows:
    """Every row the examples of one sequence (max tokens at `position`) need, and which examples each serves.
    Masking p serves the examples at p ≤ m ≤ p + window; deleting p those at p < m ≤ p + window, read one position
    left. Deleting, each max token is masked as well, serving itself only (its own score and the normaliser: a max
    token cannot be deleted and still be read). Rows come latest start first (see SharedMasker)."""
    start = masked_positions(position, window, first_maskable)
    deleted = np.full(len(start), delete)
    if delete:
        peaks = np.unique(position[position >= first_maskable])
        start, deleted = np.concatenate([start, peaks]), np.concatenate([deleted, np.zeros(len(peaks), bool)])
    p, m, d = start[:, None], position[None, :], deleted[:, None]
    serves = (p <= m) & (m <= p + window) & np.where(d, p < m, (p == m) | (not delete))
    used = serves.any(axis=1)  # a deleted position only its own max token needs serves nothing
    order = np.flatnonzero(used)[np.argsort(-start[used], kind="stable")]
    start, deleted, serves = start[order], deleted[order], serves[order]
    last = np.where(serves, m, -1).max(axis=1)
    pair_row, pair_example = np.nonzero(serves)
    return SequenceRows(start, deleted, last - start + 1 - deleted, pair_row, pair_example)


def fold_rows(length: Int[np.ndarray, " r"], fold: int) -> Int[np.ndarray, " r"]:
    """Rows cut in order into folds of at most `fold` tokens: each row's fold (its sequence's entry in the fold-th
    masked forward of the group)."""
    index, used, current = np.empty(len(length), np.int64), 0, 0
    for r, n in enumerate(length.tolist()):
        if used + n > fold:
            current, used = current + 1, 0
        index[r], used = current, used + n
    return index


class SharedPrefixCache:
    """The key/value cache of one group's forwards, read by the bridge's attention through `update`: per layer one
    buffer [sequence, key/value head, capacity, head size] holding each sequence's clean keys and values at their
    positions, with room after the prefix for one forward's new tokens. `update` writes only the new tokens (from
    `write_at` on) and hands back a view of the buffer up to them, so every row of a sequence reads its sequence's
    one clean prefix, never a copy of it; the attention mask says which cached positions each token sees."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.write_at = 0
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.bytes_written = 0  # the new tokens' keys and values, measured from the tensors written
        self.bytes_allocated = 0  # the buffers, allocated once per group

    def update(self, keys: Float[Tensor, "b h t d"], values: Float[Tensor, "b h t d"], layer: int
               ) -> tuple[Float[Tensor, "b h k d"], Float[Tensor, "b h k d"]]:
        if layer not in self.keys:
            shape = (*keys.shape[:2], self.capacity, keys.shape[3])
            self.keys[layer], self.values[layer] = keys.new_empty(shape), values.new_empty(shape)
            self.bytes_allocated += self.keys[layer].nbytes + self.values[layer].nbytes
        stop = self.write_at + keys.shape[2]
        self.keys[layer][:, :, self.write_at:stop] = keys
        self.values[layer][:, :, self.write_at:stop] = values
        self.bytes_written += keys.nbytes + values.nbytes
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]


@dataclass
class ForwardCounters:
    """What a shard's forwards cost, counted as they run (the meta sums them over shards: `counters_meta`)."""

    forward_calls: int = 0  # clean and masked forwards
    masked_forward_calls: int = 0
    masked_rows: int = 0  # rows over all masked forwards
    masked_rows_max: int = 0  # in one masked forward
    cache_bytes_copied: int = 0  # key/value bytes written into caches, all forwards
    cache_bytes_copied_max: int = 0  # in one forward
    cache_bytes_allocated: int = 0  # cache buffers, once per group
    mask_bytes_max: int = 0  # the attention mask of one forward

    def record(self, rows: int | None, copied: int, mask_bytes: int) -> None:
        """One forward: `rows` changed runs (None: a clean forward), `copied` cache bytes written."""
        self.forward_calls += 1
        self.cache_bytes_copied += copied
        self.cache_bytes_copied_max = max(self.cache_bytes_copied_max, copied)
        self.mask_bytes_max = max(self.mask_bytes_max, mask_bytes)
        if rows is not None:
            self.masked_forward_calls += 1
            self.masked_rows += rows
            self.masked_rows_max = max(self.masked_rows_max, rows)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {name: np.array(value, np.int64) for name, value in asdict(self).items()}


def counters_meta(parts: list[dict[str, np.ndarray]]) -> dict:
    """The stage meta's forward counters from its shard artefacts: totals, and per forward the mean and maximum."""
    total = {name: sum(int(p[name]) for p in parts) for name in ("forward_calls", "masked_forward_calls",
                                                                  "masked_rows", "cache_bytes_copied",
                                                                  "cache_bytes_allocated")}
    peak = {name: max((int(p[name]) for p in parts), default=0) for name in ("masked_rows_max",
                                                                             "cache_bytes_copied_max",
                                                                             "mask_bytes_max")}
    return {"forward_calls": total["forward_calls"], "masked_forward_calls": total["masked_forward_calls"],
            "rows_per_masked_call_mean": total["masked_rows"] / max(1, total["masked_forward_calls"]),
            "rows_per_masked_call_max": peak["masked_rows_max"],
            "cache_bytes_copied_per_call_mean": total["cache_bytes_copied"] / max(1, total["forward_calls"]),
            "cache_bytes_copied_per_call_max": peak["cache_bytes_copied_max"],
            "cache_bytes_allocated": total["cache_bytes_allocated"],
            "mask_bytes_per_call_max": peak["mask_bytes_max"]}


@dataclass(frozen=True)
class GroupExamples:
    """The examples of a group's sequences, flat (sequence g's are rows offsets[g] … offsets[g + 1] − 1)."""

    entry: Int[np.ndarray, " n"]  # the sequence's entry in the group's forwards
    set_index: Int[np.ndarray, " n"]
    unit: Int[np.ndarray, " n"]
    position: Int[np.ndarray, " n"]
    offsets: Int[np.ndarray, " g+1"]

    @classmethod
    def of(cls, found: list[SequenceExamples]) -> "GroupExamples":
        return cls(np.repeat(np.arange(len(found)), [len(f.set_index) for f in found]),
                   np.concatenate([f.set_index for f in found]), np.concatenate([f.unit for f in found]),
                   np.concatenate([f.position for f in found]),
                   np.concatenate([[0], np.cumsum([len(f.set_index) for f in found])]))


class SharedMasker:
    """Runs the shared masked forwards for a group of sequences and reads off every example's masked activation.

    A group's forwards share one cache (`SharedPrefixCache`): clean forwards fill it with the sequences' prefixes,
    `chunk` tokens at a time; then each masked forward runs, per sequence, a fold of its rows one after another (at
    most `fold` tokens), each row attending to the cached positions before its start and to its own tokens only.
    Both sizes come from the memory budget (`plan_forwards`), so rows per forward grow with the device.

    Rows run latest start first, and a masked forward writes its new tokens into the cache from its latest row start
    w on, so its attention spans w + its tokens rather than the whole prefix: the clean positions from w on that it
    overwrites no later row sees, as every later row of every sequence starts at or before w."""

    def __init__(self, bridge, sets: list[SubjectSet], window: int, mask_id: int, first_maskable: int,
                 mode: str = "mask", memory_bytes: int = 0):
        self.bridge = bridge
        self.sets = sets
        self.window = window
        self.mask_id = mask_id
        self.first_maskable = first_maskable
        self.delete = mode == "delete"
        self.shape = ForwardShape.of(bridge)
        # 0: derived from the device the model is on
        self.memory_bytes = memory_bytes or default_memory_bytes(next(bridge.original_model.parameters()).device)
        self.forward_tokens = 0
        self.counters = ForwardCounters()

    def _run(self, tokens: Int[Tensor, "b t"], positions: Int[Tensor, "b t"], mask: Bool[Tensor, "b 1 t k"],
             set_indices: list[int], layers: int, cache: SharedPrefixCache) -> dict[int, Tensor]:
        captured: dict[int, Tensor] = {}

        def keeper(index: int):
            def keep(value: Tensor, hook) -> None:
                captured[index] = self.sets[index].activation_of(value.detach())
            return keep

        hooks = [(self.sets[i].activation_hook(), keeper(i)) for i in set_indices]
        with torch.no_grad():
            self.bridge.run_with_hooks(tokens, return_type=None, fwd_hooks=hooks, past_key_values=cache,
                                       position_ids=positions, attention_mask=mask, stop_at_layer=layers)
        self.forward_tokens += tokens.numel()
        return captured

    def group(self, tokens: Int[np.ndarray, "g ctx"], found: list[SequenceExamples], device
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: (clean activation [k], masked activations [k, window + 1]) of its examples; NaN where a
        window position is before the sequence start or is the unmaskable BOS."""
        examples = GroupExamples.of(found)
        needed_sets = sorted(set(examples.set_index.tolist()))
        end = int(examples.position.max()) + 1
        layers = max(self.sets[i].layer for i in needed_sets) + 1
        plan = plan_forwards(self.memory_bytes, self.shape, len(found), end, layers,
                             sum(self.sets[i].size for i in needed_sets), self.window)
        cache = SharedPrefixCache(end + plan.fold)
        clean = np.full(len(examples.entry), np.nan, np.float32)
        masked = np.full((len(examples.entry), self.window + 1), np.nan, np.float32)
        prefix = torch.as_tensor(tokens[:, :end], dtype=torch.long, device=device)
        for start in range(0, end, plan.chunk):
            self._clean(prefix, cache, start, min(end, start + plan.chunk), examples, layers, clean)
        rows = [sequence_rows(f.position, self.window, self.first_maskable, self.delete) for f in found]
        folds = [fold_rows(r.length, plan.fold) for r in rows]
        for k in range(max((int(f.max()) + 1 for f in folds if len(f)), default=0)):
            self._masked(tokens[:, :end], prefix.device, cache, rows, [f == k for f in folds], examples, masked)
        self.counters.cache_bytes_allocated += cache.bytes_allocated
        return [(clean[a:b], masked[a:b]) for a, b in zip(examples.offsets[:-1], examples.offsets[1:])]

    def _forward(self, tokens: Tensor, positions: Tensor, mask: Tensor, set_indices: list[int], layers: int,
                 cache: SharedPrefixCache, rows: int | None) -> dict[int, Tensor]:
        written = cache.bytes_written
        captured = self._run(tokens, positions, mask, set_indices, layers, cache)
        self.counters.record(rows, cache.bytes_written - written, mask.untyped_storage().nbytes())
        return captured

    def _clean(self, prefix: Int[Tensor, "g end"], cache: SharedPrefixCache, start: int, stop: int,
               examples: GroupExamples, layers: int, clean: np.ndarray) -> None:
        """The clean forward of prefix positions start … stop − 1 (through every layer the group needs, filling the
        cache), reading the clean activation of every example whose max token lies there."""
        device = prefix.device
        positions = torch.arange(start, stop, device=device)
        mask = torch.arange(stop, device=device)[None, :] <= positions[:, None]
        here = np.flatnonzero((examples.position >= start) & (examples.position < stop))
        set_indices = sorted(set(examples.set_index[here].tolist()))
        cache.write_at = start
        captured = self._forward(prefix[:, start:stop], positions.expand(len(prefix), -1),
                                 mask.expand(len(prefix), 1, -1, -1), set_indices, layers, cache, None)
        for i in set_indices:
            mine = here[examples.set_index[here] == i]
            values = captured[i][torch.as_tensor(examples.entry[mine], device=device),
                                 torch.as_tensor(examples.position[mine] - start, device=device),
                                 torch.as_tensor(examples.unit[mine], device=device)]
            clean[mine] = values.float().cpu().numpy()

    def _masked(self, tokens: Int[np.ndarray, "g end"], device, cache: SharedPrefixCache, rows: list[SequenceRows],
                chosen: list[np.ndarray], examples: GroupExamples, masked: np.ndarray) -> None:
        """One masked forward: entry g runs the rows `chosen[g]` of sequence g one after another (masked rows
        replace the token at their start by the mask token; deleted rows drop it, so later tokens move one position
        left), each seeing the cached positions before its start and its own tokens; reads every example the rows
        serve."""
        width = max(1, max(int(r.length[c].sum()) for r, c in zip(rows, chosen)))
        written_from = max(int(r.start[c].max(initial=0)) for r, c in zip(rows, chosen))
        # Padding tokens sit at position 0 and see only padding (themselves at least: a softmax needs a visible
        # key); no row reads them and no row sees them.
        token_ids = np.full((len(rows), width), self.mask_id, np.int64)
        positions = np.zeros((len(rows), width), np.int64)
        row_of_token = np.full((len(rows), width), -1, np.int64)
        sees_before = np.zeros((len(rows), width), np.int64)
        token_of = []  # per entry: (example, window column, token index) of every pair its rows serve
        for g, (r, c) in enumerate(zip(rows, chosen)):
            start, deleted, length = r.start[c], r.deleted[c], r.length[c]
            offset = np.cumsum(length) - length
            row = np.repeat(np.arange(len(start)), length)
            step = np.arange(len(row)) - offset[row]
            token_ids[g, :len(row)] = tokens[g, start[row] + step + deleted[row]]
            token_ids[g, offset[~deleted]] = self.mask_id
            positions[g, :len(row)] = start[row] + step
            row_of_token[g, :len(row)] = row
            sees_before[g, :len(row)] = start[row]
            local = np.cumsum(c) - 1  # a chosen row's index among the chosen
            pairs = c[r.pair_row]
            pair_row, example = local[r.pair_row[pairs]], r.pair_example[pairs]
            m = examples.position[examples.offsets[g] + example]
            token_of.append((examples.offsets[g] + example, start[pair_row] - m + self.window,
                             offset[pair_row] + m - start[pair_row] - deleted[pair_row]))
        example, column, token = (np.concatenate(part) for part in zip(*token_of))
        set_indices = sorted(set(examples.set_index[example].tolist()))
        row_of_token, sees_before = torch.as_tensor(row_of_token, device=device), torch.as_tensor(sees_before,
                                                                                                  device=device)
        own = (row_of_token[:, :, None] == row_of_token[:, None, :]) & torch.ones(
            width, width, dtype=torch.bool, device=device).tril()
        mask = torch.cat([torch.arange(written_from, device=device) < sees_before[:, :, None], own], dim=2)[:, None]
        cache.write_at = written_from
        captured = self._forward(torch.as_tensor(token_ids, device=device), torch.as_tensor(positions, device=device),
                                 mask, set_indices, max(self.sets[i].layer for i in set_indices) + 1, cache,
                                 sum(int(c.sum()) for c in chosen))
        for i in set_indices:
            mine = examples.set_index[example] == i
            values = captured[i][torch.as_tensor(examples.entry[example[mine]], device=device),
                                 torch.as_tensor(token[mine], device=device),
                                 torch.as_tensor(examples.unit[example[mine]], device=device)]
            masked[example[mine], column[mine]] = values.float().cpu().numpy()

    def naive_masked(self, tokens: Int[np.ndarray, " ctx"], set_index: int, unit: int, position: int, device
                     ) -> np.ndarray:
        """The reference: one uncached run of the whole prefix per changed position (window + 1 values); deleting
        re-runs the prefix without the token and reads one position earlier (the max token is masked)."""
        values = np.full(self.window + 1, np.nan, np.float32)
        subject = self.sets[set_index]
        hook = subject.activation_hook()
        for p in range(max(self.first_maskable, position - self.window), position + 1):
            row = torch.as_tensor(tokens[:position + 1], dtype=torch.long, device=device)[None].clone()
            read = position
            if self.delete and p < position:
                row, read = torch.cat([row[:, :p], row[:, p + 1:]], dim=1), position - 1
            else:
                row[0, p] = self.mask_id
            captured = {}
            with torch.no_grad():
                self.bridge.run_with_hooks(row, return_type=None,
                                           stop_at_layer=self.sets[set_index].layer + 1,
                                           fwd_hooks=[(hook, lambda v, hook: captured.update(v=v.detach()))])
            values[p - position + self.window] = float(subject.activation_of(captured["v"])[0, read, unit])
        return values


def check_kv_cache(masker: SharedMasker, tokens: Int[np.ndarray, " ctx"], example: SequenceExamples, device) -> None:
    """Stop with one line unless a cached masked run of `example` (one example) equals uncached re-runs."""
    import transformers

    set_index, unit, position = int(example.set_index[0]), int(example.unit[0]), int(example.position[0])
    reference = masker.naive_masked(tokens, set_index, unit, position, device)
    forward_tokens = masker.forward_tokens
    try:
        _, masked = masker.group(tokens[None], [example], device)[0]
        difference = float(np.nanmax(np.abs(masked[0] - reference))) if np.isfinite(reference).any() else 0.0
        consistent = np.array_equal(np.isnan(masked[0]), np.isnan(reference))
    except torch.cuda.OutOfMemoryError:
        raise
    except (IndexError, KeyError, AttributeError, TypeError, RuntimeError, ValueError):  # an empty or misshapen cache
        difference, consistent = float("inf"), False
    masker.forward_tokens = forward_tokens
    scale = max(1.0, float(np.nanmax(np.abs(reference), initial=0.0)))
    if not consistent or not difference <= KV_CHECK_TOLERANCE * scale:
        raise AtlasError(f"exact importance needs the key/value cache, but with transformers "
                         f"{transformers.__version__} a cached masked run differs from an uncached one "
                         f"({difference:.3g}); install transformers=={SUPPORTED_TRANSFORMERS}, the supported pin")


def mask_token_id(cfg: AtlasConfig, tokenizer) -> int:
    if cfg.mask_token:
        token_id = tokenizer.convert_tokens_to_ids(cfg.mask_token)
        if token_id is None or token_id == tokenizer.unk_token_id and cfg.mask_token != tokenizer.unk_token:
            raise ConfigError(f"mask_token {cfg.mask_token!r} is not a single token of this tokenizer; choose another")
        return int(token_id)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ConfigError("the tokenizer has neither a pad nor an EOS token; set mask_token")


def naive_token_count(examples: list[SetExamples], window: int, first_maskable: int) -> int:
    """Forward tokens the naive method needs: per example, one clean and one masked run of the prefix per position."""
    total = 0
    for e in examples:
        valid = e.pos - np.maximum(first_maskable, e.pos - window) + 1
        total += int(((valid + 1) * (e.pos + 1)).sum())
    return total


def sequence_groups(sequences: list[int], shard: range) -> list[list[int]]:
    """The sequences (with examples) of a shard, batched in groups aligned to multiples of GROUP."""
    groups: dict[int, list[int]] = {}
    for s in sequences:
        if shard.start <= s < shard.stop:
            groups.setdefault(s // GROUP, []).append(s)
    return [groups[g] for g in sorted(groups)]


def importance_shard(masker: SharedMasker, tokens: np.ndarray, grouped: dict[int, SequenceExamples],
                     sets: list[SubjectSet], shard: range, device, bar=None) -> dict[str, np.ndarray]:
    """Clean and masked activations of every example whose sequence lies in `shard`, and the forward counters of
    computing them (`ForwardCounters`, keys without a dot), as a shard artefact."""
    masker.counters = ForwardCounters()
    rows = {i: [] for i in range(len(sets))}
    clean_parts = {i: [] for i in range(len(sets))}
    masked_parts = {i: [] for i in range(len(sets))}
    for chosen in sequence_groups(sorted(grouped), shard):
        found = [grouped[s] for s in chosen]
        for f, (clean, masked) in zip(found, masker.group(tokens[chosen], found, device)):
            for i in set(f.set_index.tolist()):
                mine = f.set_index == i
                rows[i].append(f.row[mine])
                clean_parts[i].append(clean[mine])
                masked_parts[i].append(masked[mine])
        if bar is not None:
            bar.update(len(chosen))
    arrays = {}
    for i, s in enumerate(sets):
        arrays[f"{s.key}.row"] = np.concatenate(rows[i] or [np.zeros(0, np.int64)]).astype(np.int64)
        arrays[f"{s.key}.clean"] = np.concatenate(clean_parts[i] or [np.zeros(0, np.float32)])
        arrays[f"{s.key}.masked"] = np.concatenate(masked_parts[i] or [np.zeros((0, masker.window + 1),
                                                                                np.float32)])
    return {**arrays, **masker.counters.as_arrays()}


def merge_shards(parts: list[dict[str, np.ndarray]], sets: list[SubjectSet], examples: list[SetExamples],
                 window: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per set: (clean [n], masked [n, window + 1]) with every example's row filled from its shard."""
    merged = {}
    for s, e in zip(sets, examples):
        clean = np.full(len(e.seq), np.nan, np.float32)
        masked = np.full((len(e.seq), window + 1), np.nan, np.float32)
        for part in parts:
            clean[part[f"{s.key}.row"]] = part[f"{s.key}.clean"]
            masked[part[f"{s.key}.row"]] = part[f"{s.key}.masked"]
        merged[s.key] = (clean, masked)
    return merged


class ImportanceShards:
    """Importance's ShardWorker: the model, the masker (its key/value cache checked against an uncached run) and the
    examples once, then each shard's masked runs stored as the shard's artefact. Pickled without the model."""

    stage = "importance"

    def __init__(self, cfg: AtlasConfig):
        self.cfg = cfg

    def setup(self) -> None:
        from builder.models import load_model

        cfg, paths = self.cfg, AtlasPaths.of(self.cfg)
        meta = read_collect_meta(paths)
        self.sets = collect_sets(meta)
        self.grouped = examples_by_sequence([read_examples(paths, s.key) for s in self.sets])
        self.tokens = read_tokens(paths)
        self.model = load_model(cfg)
        self.mask_id = mask_token_id(cfg, self.model.tokenizer)
        first_maskable = 1 if meta["packing"]["bos_token_id"] is not None else 0
        self.masker = SharedMasker(self.model.bridge, self.sets, cfg.window_before, self.mask_id, first_maskable,
                                   cfg.importance_mode, memory_bytes=cfg.importance_memory_mb << 20)
        if self.grouped:
            first = min(self.grouped)
            deepest = self.grouped[first].take(np.array([np.argmax(self.grouped[first].position)]))
            check_kv_cache(self.masker, self.tokens[first], deepest, self.model.device)

    def run(self, shard: range, bar) -> dict:
        before = self.masker.forward_tokens
        arrays = importance_shard(self.masker, self.tokens, self.grouped, self.sets, shard, self.model.device, bar)
        forward_tokens = self.masker.forward_tokens - before
        IMPORTANCE_SHARD.write_npz(AtlasPaths.of(self.cfg).shard("importance", shard.start, shard.stop),
                                   forward_tokens=np.array(forward_tokens), mask_token_id=np.array(self.mask_id),
                                   **arrays)
        return {"forward_tokens": int(forward_tokens)}


def build(run: StageRun) -> dict:
    """The importance stage: every sequence shard not yet done (with the config's engine), then the merge."""
    cfg, paths = run.cfg, run.paths
    meta = read_collect_meta(paths)
    sets = collect_sets(meta)
    examples = [read_examples(paths, s.key) for s in sets]
    tokens = read_tokens(paths)
    first_maskable = 1 if meta["packing"]["bos_token_id"] is not None else 0
    grouped = examples_by_sequence(examples)
    shards = sequence_shards(len(tokens), cfg.shard_sequences)
    files = shard_files(paths, "importance", shards)
    todo = [r for r in shards if not IMPORTANCE_SHARD.is_readable(files[r])]
    with_examples = np.array(sorted(grouped), np.int64)

    def count(ranges: list[range]) -> int:
        return int(sum(((with_examples >= r.start) & (with_examples < r.stop)).sum() for r in ranges))

    # Only shards still to run need the model: the worker loads it in its setup (each Ray actor its own).
    with progress(total=len(grouped), initial=len(grouped) - count(todo), desc="importance", unit="seq") as bar:
        counters = run_shards(cfg, ImportanceShards(cfg), todo, bar)
    parts = [IMPORTANCE_SHARD.read_npz(files[r]) for r in shards]
    for s, (clean, masked) in merge_shards(parts, sets, examples, cfg.window_before).items():
        importance, normaliser = normalised_importance(clean, masked)
        run.write_npz(IMPORTANCE, paths.set_file("importance", s), importance=importance, normaliser=normaliser,
                      clean=clean, masked=masked)
    forward_tokens = sum(int(p["forward_tokens"]) for p in parts)
    mask_ids = {int(p["mask_token_id"]) for p in parts}
    return {"window": cfg.window_before, "mask_token_id": mask_ids.pop() if len(mask_ids) == 1 else None,
            "forward_tokens": forward_tokens,
            "forward_tokens_last_run": sum(c["forward_tokens"] for c in counters),
            "sequences_processed_last_run": count(todo),
            "shards_run_last_run": len(todo),
            "naive_forward_tokens": naive_token_count(examples, cfg.window_before, first_maskable),
            **counters_meta(parts)}
