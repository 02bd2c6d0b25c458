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
max + int32 position), e.g. GPT-2 small's 3,072 neurons × 10,000 sequences = 246 MB per layer, all sets held together
while merging (2.9 GB for 12 layers); acceptable next to the forward pass. `interval_examples = 0` records nothing.
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
from builder.schema import COLLECT_SHARD, EXAMPLES, HISTOGRAM_EDGES, TOKENS
from builder.shards import sequence_shards, shard_files
from builder.stage import StageRun, progress
from builder.subjects import MlpLayer, Readout, SubjectSet

log = logging.getLogger(__name__)

CANDIDATE_FIELDS = ("unit", "seq", "pos", "act", "pre", "pre_linear", "window")
# Candidates compared at once by keep_first_needed: the block's dominance matrix is DOMINANCE_BLOCK × group size.
DOMINANCE_BLOCK = 2048
# Sequences whose interval indices are computed at once by select_interval_examples (float64 temporaries of
# INDEX_BLOCK × units).
INDEX_BLOCK = 512


@dataclass
class SetState:
    """One subject set's running state: maxima, candidate examples, the vectors they point to, and histograms."""

    running_max: Float[np.ndarray, " n_units"]
    histogram: Int[np.ndarray, "n_units n_bins"]
    candidates: dict[str, np.ndarray]
    vector_keys: Int[np.ndarray, " n_vectors"]  # seq * context_length + pos, sorted
    vectors: Float[np.ndarray, "n_vectors d_input"]
    pending: list[dict[str, np.ndarray]] = field(default_factory=list)
    pending_vectors: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    # Per-sequence maxima for the interval examples, in chunks: (sequence ids [n], max [n, units], argmax [n, units]).
    sequences: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def empty(cls, n_units: int, d_input: int, window: int) -> "SetState":
        candidates = {name: np.zeros(0, np.int32) for name in ("unit", "seq", "pos")}
        candidates.update({name: np.zeros(0, np.float32) for name in ("act", "pre", "pre_linear")})
        candidates["window"] = np.zeros((0, window), np.float32)
        return cls(running_max=np.full(n_units, -np.inf, np.float32),
                   histogram=np.zeros((n_units, len(HISTOGRAM_EDGES) + 1), np.int64), candidates=candidates,
                   vector_keys=np.zeros(0, np.int64), vectors=np.zeros((0, d_input), np.float32))

    def sequence_table(self) -> tuple[Int[np.ndarray, " n_seq"], Float[np.ndarray, "n_seq n_units"],
                                      Int[np.ndarray, "n_seq n_units"]]:
        """Every recorded sequence's id, per-unit max and its first position, concatenated (once) in arrival order."""
        if len(self.sequences) != 1:
            n_units = len(self.running_max)
            chunks = [(np.zeros(0, np.int32), np.zeros((0, n_units), np.float32), np.zeros((0, n_units), np.int32))]
            chunks += self.sequences
            self.sequences = [tuple(np.concatenate([c[i] for c in chunks]) for i in range(3))]
        return self.sequences[0]


def candidate_mask(seq_max: Tensor, thresholds: Tensor, maxima: Tensor) -> Tensor:
    """Which (sequence, unit) pairs may still qualify: reach threshold·m, for units with a positive max."""
    return (seq_max >= thresholds) & (maxima > 0)


def keep_first_needed(unit: np.ndarray, act: np.ndarray, max_examples: int) -> np.ndarray:
    """Mask of candidates (given in corpus order) that fewer than `max_examples` earlier candidates of the same
    unit dominate (activation ≥ theirs). The rest can never be among a unit's first `max_examples` qualifiers."""
    keep = np.ones(len(unit), bool)
    order = np.argsort(unit, kind="stable")
    sorted_units = unit[order]
    starts = np.flatnonzero(np.r_[True, sorted_units[1:] != sorted_units[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        if end - start <= max_examples:
            continue
        members = order[start:end]
        group_act = act[members]
        for begin in range(0, len(members), DOMINANCE_BLOCK):
            block = group_act[begin:begin + DOMINANCE_BLOCK]
            earlier = np.arange(len(members))[None, :] < np.arange(begin, begin + len(block))[:, None]
            dominating = ((group_act[None, :] >= block[:, None]) & earlier).sum(axis=1)
            keep[members[begin:begin + len(block)]] = dominating < max_examples
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
    """Streams batches of hook values into per-set state. Pure numpy/torch: no model, no files.

    A collector sees any contiguous or non-contiguous part of the corpus (a shard); `absorb` merges another
    collector's state exactly (see the module docstring and docs/architecture.md)."""

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
        self.states = {s.key: SetState.empty(s.size, s.d_input, self.window_width) for s in sets}

    @classmethod
    def for_config(cls, sets: list[SubjectSet], cfg: AtlasConfig,
                   reference_maxima: dict[str, np.ndarray] | None = None) -> "Collector":
        return cls(sets, cfg.context_length, cfg.threshold, cfg.max_examples, cfg.window_before, cfg.window_after,
                   reference_maxima, interval_count=cfg.interval_count, interval_examples=cfg.interval_examples)

    @property
    def window_width(self) -> int:
        return self.window_before + 1 + self.window_after

    def _maxima(self, key: str) -> np.ndarray:
        return self.reference[key] if self.reference is not None else self.states[key].running_max

    def update(self, key: str, first_seq: int, readout: Readout) -> None:
        """Feed one batch of sequences (corpus indices first_seq …) of subject set `key`."""
        state = self.states[key]
        post, pre, pre_linear = readout.post, readout.pre, readout.pre_linear
        seq_max, argmax = post.max(dim=1)
        if self.interval_examples > 0:
            state.sequences.append((np.arange(first_seq, first_seq + len(seq_max), dtype=np.int32),
                                    seq_max.float().cpu().numpy(), argmax.int().cpu().numpy()))
        batch_max = seq_max.max(dim=0).values.float().cpu().numpy()
        state.running_max = np.maximum(state.running_max, batch_max)
        bins = torch.bucketize(post.float(), torch.as_tensor(HISTOGRAM_EDGES, device=post.device))
        n_units = post.shape[-1]
        flat = (bins + torch.arange(n_units, device=post.device) * (len(HISTOGRAM_EDGES) + 1)).reshape(-1)
        state.histogram += torch.bincount(flat, minlength=state.histogram.size).reshape(
            state.histogram.shape).cpu().numpy()

        maxima_t = torch.as_tensor(self._maxima(key), device=post.device)
        mask = candidate_mask(seq_max, self.threshold * maxima_t, maxima_t)
        rows, units = torch.nonzero(mask, as_tuple=True)
        if len(rows) == 0:
            return
        positions = argmax[rows, units]
        offsets = torch.arange(-self.window_before, self.window_after + 1, device=post.device)
        window_pos = positions[:, None] + offsets[None, :]
        inside = (window_pos >= 0) & (window_pos < post.shape[1])
        window = post[rows[:, None], window_pos.clamp(0, post.shape[1] - 1), units[:, None]]
        window = torch.where(inside, window, torch.full_like(window, float("nan")))
        chunk = {
            "unit": units.cpu().numpy().astype(np.int32),
            "seq": (rows + first_seq).cpu().numpy().astype(np.int32),
            "pos": positions.cpu().numpy().astype(np.int32),
            "act": seq_max[rows, units].float().cpu().numpy(),
            "pre": pre[rows, positions, units].float().cpu().numpy(),
            "pre_linear": (pre_linear[rows, positions, units].float().cpu().numpy() if pre_linear is not None
                           else np.zeros(len(rows), np.float32)),
            "window": window.float().cpu().numpy(),
        }
        keys = chunk["seq"].astype(np.int64) * self.context_length + chunk["pos"]
        unique_keys, first = np.unique(keys, return_index=True)
        vectors = readout.input[rows[first], positions[first]].float().cpu().numpy()
        state.pending.append(chunk)
        state.pending_vectors.append((unique_keys, vectors))

    def absorb(self, arrays: dict[str, np.ndarray]) -> None:
        """Merge another collector's `state_arrays()` (a shard) into this one. Exact in any order: compaction sorts
        by (unit, sequence), maxima combine by max, histograms by sum, and per-sequence maxima are kept (sorted by
        sequence in `finish`)."""
        for key, state in self.states.items():
            state.running_max = np.maximum(state.running_max, arrays[f"{key}.running_max"])
            state.histogram = state.histogram + arrays[f"{key}.histogram"]
            state.pending.append({name: arrays[f"{key}.c.{name}"] for name in CANDIDATE_FIELDS})
            state.pending_vectors.append((arrays[f"{key}.vector_keys"], arrays[f"{key}.vectors"]))
            state.sequences.append((arrays[f"{key}.seq_ids"], arrays[f"{key}.seq_max"], arrays[f"{key}.seq_argmax"]))
        self.compact()

    def compact(self) -> None:
        """Merge pending candidates and drop every one that can no longer be selected, and unused vectors."""
        for key, state in self.states.items():
            if not state.pending:
                continue
            merged = {name: np.concatenate([state.candidates[name]] + [c[name] for c in state.pending])
                      for name in CANDIDATE_FIELDS}
            state.pending.clear()
            order = np.lexsort((merged["seq"], merged["unit"]))
            merged = {name: values[order] for name, values in merged.items()}
            alive = merged["act"] >= self.threshold * self._maxima(key)[merged["unit"]]
            merged = {name: values[alive] for name, values in merged.items()}
            if self.reference is not None:
                keep = _rank_within_group(merged["unit"]) < self.max_examples
            else:
                keep = keep_first_needed(merged["unit"], merged["act"], self.max_examples)
            state.candidates = {name: values[keep] for name, values in merged.items()}
            all_keys = np.concatenate([state.vector_keys] + [k for k, _ in state.pending_vectors])
            all_vectors = np.concatenate([state.vectors] + [v for _, v in state.pending_vectors])
            state.pending_vectors.clear()
            needed = np.unique(state.candidates["seq"].astype(np.int64) * self.context_length
                               + state.candidates["pos"])
            unique_keys, first = np.unique(all_keys, return_index=True)
            take = first[np.isin(unique_keys, needed)]
            state.vector_keys, state.vectors = all_keys[take], all_vectors[take]

    def finish(self, key: str) -> dict[str, np.ndarray]:
        """The set's final artefact arrays: examples grouped by unit in corpus order, and interval examples."""
        self.compact()
        state = self.states[key]
        observed = state.running_max
        maxima = self._maxima(key)
        thresholds = np.where(maxima > 0, self.threshold * maxima, np.inf).astype(np.float32)
        c = state.candidates
        chosen = select_examples(c["unit"], c["seq"], c["act"], thresholds, self.max_examples)
        counts = np.bincount(c["unit"][chosen], minlength=len(maxima))
        keys = c["seq"][chosen].astype(np.int64) * self.context_length + c["pos"][chosen]
        vector_keys, vector_index = np.unique(keys, return_inverse=True)
        lookup = np.searchsorted(state.vector_keys, vector_keys)
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
            "vectors": state.vectors[lookup],
            "histogram": state.histogram.astype(np.int32),
            "histogram_edges": HISTOGRAM_EDGES,
            **intervals,
        }

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The compacted state of every set under `{key}.`-prefixed names: a shard's artefact."""
        self.compact()
        arrays = {}
        for key, state in self.states.items():
            arrays[f"{key}.running_max"] = state.running_max
            arrays[f"{key}.histogram"] = state.histogram
            arrays[f"{key}.vector_keys"] = state.vector_keys
            arrays[f"{key}.vectors"] = state.vectors
            arrays[f"{key}.seq_ids"], arrays[f"{key}.seq_max"], arrays[f"{key}.seq_argmax"] = state.sequence_table()
            for name in CANDIDATE_FIELDS:
                arrays[f"{key}.c.{name}"] = state.candidates[name]
        return arrays


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


def build(run: StageRun) -> dict:
    """The collect stage: tokenise once, run every sequence shard not yet done, merge the shards exactly."""
    from builder.models import load_model, selected_layers
    from builder.subjects import model_subject_sets

    cfg, paths = run.cfg, run.paths
    model = load_model(cfg)
    layers = selected_layers(cfg, model.n_layers)
    sets = model_subject_sets(model, layers if cfg.atlas_neurons else [], cfg.atlased_saes, cfg.model)
    reference = load_reference_maxima(cfg, sets, model.n_layers)
    tokens, packing = _load_or_tokenise(run, model)
    shards = sequence_shards(len(tokens), cfg.shard_sequences)
    files = shard_files(paths, "collect", shards)
    todo = [r for r in shards if not COLLECT_SHARD.is_readable(files[r])]
    if len(todo) < len(shards):
        log.info("collect: %d of %d shards already done", len(shards) - len(todo), len(shards))
    forwarded = 0
    with progress(total=len(tokens), initial=len(tokens) - sum(len(r) for r in todo), desc="collect",
                  unit="seq") as bar:
        for shard in todo:
            collector = Collector.for_config(sets, cfg, reference)
            for first in range(shard.start, shard.stop, cfg.batch_size):
                end = min(shard.stop, first + cfg.batch_size)
                batch = torch.as_tensor(tokens[first:end], dtype=torch.long, device=model.device)
                collect_batch(collector, model.bridge, batch, first)
                forwarded += end - first
                bar.update(end - first)
            COLLECT_SHARD.write_npz(files[shard], **collector.state_arrays())
    merged = Collector.for_config(sets, cfg, reference)
    for shard in shards:
        merged.absorb(COLLECT_SHARD.read_npz(files[shard]))
    for s in sets:
        run.write_npz(EXAMPLES, paths.set_file("collect", s.key), **merged.finish(s.key))
    return {"model": cfg.model, "model_revision": model.revision, "n_layers": model.n_layers,
            "d_model": model.d_model, "d_mlp": model.d_mlp, "gated": model.gated, "layers": layers,
            "subject_sets": [s.describe() for s in sets],
            "dataset": [Path(f).name for f in cfg.data_files] if cfg.data_files else cfg.dataset,
            "n_sequences": int(len(tokens)), "n_tokens": int(tokens.size), "context_length": cfg.context_length,
            "packing": packing, "threshold": cfg.threshold, "max_examples": cfg.max_examples,
            "interval_count": cfg.interval_count, "interval_examples": cfg.interval_examples,
            "reference_maxima": bool(cfg.reference_maxima), "window_before": cfg.window_before,
            "window_after": cfg.window_after, "n_shards": len(shards), "shards_run_last_run": len(todo),
            "forwarded_sequences_last_run": forwarded, "build_date": packing["build_date"]}


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
