"""Collect: one streaming pass that finds each neuron's maximum and its first qualifying examples.

The definition is two-pass (max M over the corpus, then the first `max_examples` sequences whose highest activation
reaches T = threshold · M). One pass gives the same answer: each neuron keeps a running max m ≤ M and candidates with
activation ≥ threshold · m, dropped when m rises (they cannot reach T). A candidate is also dropped when at least
`max_examples` earlier candidates have an activation at least as high: whenever it would qualify, so would they, so it
could never be among the first `max_examples`. That bounds memory without any second pass. With reference maxima, T is
fixed up front and a neuron is finished once it has `max_examples` examples.

A neuron whose maximum is ≤ 0 has no examples (it is dead at this threshold: T ≥ M would select nothing meaningful).
The pre-MLP vector depends only on (layer, sequence, position), so each is stored once and examples point to it.
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

from builder import __version__
from builder.artefacts import read_json, read_npz, write_json, write_npz
from builder.config import AtlasConfig
from builder.data import tokenise_corpus
from builder.errors import ArtefactError, ConfigError
from builder.paths import AtlasPaths
from builder.stage import begin_stage, peak_rss_mb, progress, stage_is_done

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_KIND = "collect-meta"
LAYER_KIND = "collect-layer"
CHECKPOINT_KIND = "collect-checkpoint"
TOKENS_KIND = "collect-tokens"

# Histogram edges shared by every neuron: 0 and ±0.01·2^(k/3) up to ±~650, so any activation scale reads well.
_GEOMETRIC = 0.01 * 2.0 ** (np.arange(0, 48) / 3.0)
HISTOGRAM_EDGES = np.concatenate([-_GEOMETRIC[::-1], [0.0], _GEOMETRIC]).astype(np.float32)

CANDIDATE_FIELDS = ("neuron", "seq", "pos", "act", "pre", "pre_linear", "window")


@dataclass
class LayerState:
    """One layer's running state: maxima, candidate examples, the vectors they point to, and histograms."""

    running_max: Float[np.ndarray, " d_mlp"]
    histogram: Int[np.ndarray, "d_mlp n_bins"]
    candidates: dict[str, np.ndarray]
    vector_keys: Int[np.ndarray, " n_vectors"]  # seq * context_length + pos, sorted
    vectors: Float[np.ndarray, "n_vectors d_model"]
    pending: list[dict[str, np.ndarray]] = field(default_factory=list)
    pending_vectors: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def empty(cls, d_mlp: int, d_model: int, window: int) -> "LayerState":
        candidates = {name: np.zeros(0, np.int32) for name in ("neuron", "seq", "pos")}
        candidates.update({name: np.zeros(0, np.float32) for name in ("act", "pre", "pre_linear")})
        candidates["window"] = np.zeros((0, window), np.float32)
        return cls(running_max=np.full(d_mlp, -np.inf, np.float32),
                   histogram=np.zeros((d_mlp, len(HISTOGRAM_EDGES) + 1), np.int64), candidates=candidates,
                   vector_keys=np.zeros(0, np.int64), vectors=np.zeros((0, d_model), np.float32))


def candidate_mask(seq_max: Tensor, thresholds: Tensor, maxima: Tensor) -> Tensor:
    """Which (sequence, neuron) pairs may still qualify: reach threshold·m, for neurons with a positive max."""
    return (seq_max >= thresholds) & (maxima > 0)


def keep_first_needed(neuron: np.ndarray, act: np.ndarray, max_examples: int) -> np.ndarray:
    """Mask of candidates (given in corpus order) that fewer than `max_examples` earlier candidates of the same
    neuron dominate (activation ≥ theirs). The rest can never be among a neuron's first `max_examples` qualifiers."""
    keep = np.ones(len(neuron), bool)
    order = np.argsort(neuron, kind="stable")
    sorted_neurons = neuron[order]
    starts = np.flatnonzero(np.r_[True, sorted_neurons[1:] != sorted_neurons[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        if end - start <= max_examples:
            continue
        members = order[start:end]
        group_act = act[members]
        for begin in range(0, len(members), 2048):
            block = group_act[begin:begin + 2048]
            earlier = np.arange(len(members))[None, :] < np.arange(begin, begin + len(block))[:, None]
            dominating = ((group_act[None, :] >= block[:, None]) & earlier).sum(axis=1)
            keep[members[begin:begin + len(block)]] = dominating < max_examples
    return keep


def select_examples(neuron: np.ndarray, seq: np.ndarray, act: np.ndarray, thresholds: np.ndarray,
                    max_examples: int) -> np.ndarray:
    """Indices of the final examples: per neuron, the first max_examples (by sequence) reaching its threshold,
    ordered by (neuron, sequence)."""
    qualifies = act >= thresholds[neuron]
    index = np.flatnonzero(qualifies)
    index = index[np.lexsort((seq[index], neuron[index]))]
    rank = _rank_within_group(neuron[index])
    return index[rank < max_examples]


def _rank_within_group(sorted_groups: np.ndarray) -> np.ndarray:
    if len(sorted_groups) == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(sorted_groups)), 0))
    return np.arange(len(sorted_groups)) - group_start


class Collector:
    """Streams batches of hook values into per-layer state. Pure numpy/torch: no model, no files."""

    def __init__(self, layers: list[int], d_mlp: int, d_model: int, context_length: int, cfg: AtlasConfig,
                 reference_maxima: np.ndarray | None = None):
        self.layers = layers
        self.context_length = context_length
        self.threshold = cfg.threshold
        self.max_examples = cfg.max_examples
        self.window_before = cfg.window_before
        self.window_after = cfg.window_after
        self.reference = reference_maxima
        self.states = {layer: LayerState.empty(d_mlp, d_model, self.window_width) for layer in layers}

    @property
    def window_width(self) -> int:
        return self.window_before + 1 + self.window_after

    def update(self, layer: int, first_seq: int, post: Float[Tensor, "batch pos d_mlp"],
               pre: Float[Tensor, "batch pos d_mlp"], pre_linear: Float[Tensor, "batch pos d_mlp"] | None,
               normalized: Float[Tensor, "batch pos d_model"]) -> None:
        state = self.states[layer]
        seq_max, argmax = post.max(dim=1)
        batch_max = seq_max.max(dim=0).values.float().cpu().numpy()
        state.running_max = np.maximum(state.running_max, batch_max)
        bins = torch.bucketize(post.float(), torch.as_tensor(HISTOGRAM_EDGES, device=post.device))
        d_mlp = post.shape[-1]
        flat = (bins + torch.arange(d_mlp, device=post.device) * (len(HISTOGRAM_EDGES) + 1)).reshape(-1)
        state.histogram += torch.bincount(flat, minlength=state.histogram.size).reshape(
            state.histogram.shape).cpu().numpy()

        maxima = self.reference[layer] if self.reference is not None else state.running_max
        maxima_t = torch.as_tensor(maxima, device=post.device)
        mask = candidate_mask(seq_max, self.threshold * maxima_t, maxima_t)
        rows, neurons = torch.nonzero(mask, as_tuple=True)
        if len(rows) == 0:
            return
        positions = argmax[rows, neurons]
        offsets = torch.arange(-self.window_before, self.window_after + 1, device=post.device)
        window_pos = positions[:, None] + offsets[None, :]
        inside = (window_pos >= 0) & (window_pos < post.shape[1])
        window = post[rows[:, None], window_pos.clamp(0, post.shape[1] - 1), neurons[:, None]]
        window = torch.where(inside, window, torch.full_like(window, float("nan")))
        chunk = {
            "neuron": neurons.cpu().numpy().astype(np.int32),
            "seq": (rows + first_seq).cpu().numpy().astype(np.int32),
            "pos": positions.cpu().numpy().astype(np.int32),
            "act": seq_max[rows, neurons].float().cpu().numpy(),
            "pre": pre[rows, positions, neurons].float().cpu().numpy(),
            "pre_linear": (pre_linear[rows, positions, neurons].float().cpu().numpy() if pre_linear is not None
                           else np.zeros(len(rows), np.float32)),
            "window": window.float().cpu().numpy(),
        }
        keys = chunk["seq"].astype(np.int64) * self.context_length + chunk["pos"]
        unique_keys, first = np.unique(keys, return_index=True)
        vectors = normalized[rows[first], positions[first]].float().cpu().numpy()
        state.pending.append(chunk)
        state.pending_vectors.append((unique_keys, vectors))

    def compact(self) -> None:
        """Merge pending candidates and drop every one that can no longer be selected, and unused vectors."""
        for layer, state in self.states.items():
            if not state.pending:
                continue
            merged = {name: np.concatenate([state.candidates[name]] + [c[name] for c in state.pending])
                      for name in CANDIDATE_FIELDS}
            state.pending.clear()
            order = np.lexsort((merged["seq"], merged["neuron"]))
            merged = {name: values[order] for name, values in merged.items()}
            maxima = self.reference[layer] if self.reference is not None else state.running_max
            alive = merged["act"] >= self.threshold * maxima[merged["neuron"]]
            merged = {name: values[alive] for name, values in merged.items()}
            if self.reference is not None:
                keep = _rank_within_group(merged["neuron"]) < self.max_examples
            else:
                keep = keep_first_needed(merged["neuron"], merged["act"], self.max_examples)
            state.candidates = {name: values[keep] for name, values in merged.items()}
            all_keys = np.concatenate([state.vector_keys] + [k for k, _ in state.pending_vectors])
            all_vectors = np.concatenate([state.vectors] + [v for _, v in state.pending_vectors])
            state.pending_vectors.clear()
            needed = np.unique(state.candidates["seq"].astype(np.int64) * self.context_length
                               + state.candidates["pos"])
            unique_keys, first = np.unique(all_keys, return_index=True)
            take = first[np.isin(unique_keys, needed)]
            state.vector_keys, state.vectors = all_keys[take], all_vectors[take]

    def finish(self, layer: int) -> dict[str, np.ndarray]:
        """The layer's final artefact arrays: examples grouped by neuron in corpus order."""
        self.compact()
        state = self.states[layer]
        observed = state.running_max
        maxima = self.reference[layer] if self.reference is not None else observed
        thresholds = np.where(maxima > 0, self.threshold * maxima, np.inf).astype(np.float32)
        c = state.candidates
        chosen = select_examples(c["neuron"], c["seq"], c["act"], thresholds, self.max_examples)
        d_mlp = len(maxima)
        counts = np.bincount(c["neuron"][chosen], minlength=d_mlp)
        keys = c["seq"][chosen].astype(np.int64) * self.context_length + c["pos"][chosen]
        vector_keys, vector_index = np.unique(keys, return_inverse=True)
        lookup = np.searchsorted(state.vector_keys, vector_keys)
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
        }

    # Checkpoints hold the compacted state of every layer under prefixed names.
    def state_arrays(self) -> dict[str, np.ndarray]:
        self.compact()
        arrays = {}
        for layer, state in self.states.items():
            arrays[f"L{layer}.running_max"] = state.running_max
            arrays[f"L{layer}.histogram"] = state.histogram
            arrays[f"L{layer}.vector_keys"] = state.vector_keys
            arrays[f"L{layer}.vectors"] = state.vectors
            for name in CANDIDATE_FIELDS:
                arrays[f"L{layer}.c.{name}"] = state.candidates[name]
        return arrays

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for layer, state in self.states.items():
            state.running_max = arrays[f"L{layer}.running_max"]
            state.histogram = arrays[f"L{layer}.histogram"]
            state.vector_keys = arrays[f"L{layer}.vector_keys"]
            state.vectors = arrays[f"L{layer}.vectors"]
            state.candidates = {name: arrays[f"L{layer}.c.{name}"] for name in CANDIDATE_FIELDS}


def hook_names(layer: int, gated: bool) -> list[str]:
    names = [f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"]
    return names + ([f"blocks.{layer}.mlp.hook_pre_linear"] if gated else [])


def forward_with_hooks(bridge, tokens: Tensor, layers: list[int], gated: bool) -> dict[str, Tensor]:
    """One forward pass that stops after the deepest selected layer, keeping only the hooks collect needs."""
    captured: dict[str, Tensor] = {}

    def keep(value: Tensor, hook) -> None:
        captured[hook.name] = value.detach()

    hooks = [(name, keep) for layer in layers for name in hook_names(layer, gated)]
    with torch.no_grad():
        bridge.run_with_hooks(tokens, return_type=None, stop_at_layer=max(layers) + 1, fwd_hooks=hooks)
    return captured


def collect_batch(collector: Collector, bridge, batch: Tensor, first_seq: int, gated: bool) -> None:
    """Forward one batch of sequences (starting at corpus index first_seq) and feed every layer's hooks."""
    captured = forward_with_hooks(bridge, batch, collector.layers, gated)
    for layer in collector.layers:
        collector.update(layer, first_seq, captured[f"blocks.{layer}.mlp.hook_post"],
                         captured[f"blocks.{layer}.mlp.hook_pre"],
                         captured.get(f"blocks.{layer}.mlp.hook_pre_linear"),
                         captured[f"blocks.{layer}.ln2.hook_normalized"])


def load_reference_maxima(cfg: AtlasConfig, n_layers: int, d_mlp: int) -> np.ndarray | None:
    if not cfg.reference_maxima:
        return None
    try:
        maxima = np.load(cfg.reference_maxima, allow_pickle=False)
        if not isinstance(maxima, np.ndarray):
            raise ValueError("an .npz archive, not a single array")
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read reference_maxima {cfg.reference_maxima!r} ({error}); give a .npy file of "
                          f"shape [{n_layers}, {d_mlp}]") from None
    if maxima.shape != (n_layers, d_mlp) or not np.isfinite(maxima).all():
        raise ConfigError(f"reference_maxima must be a finite array of shape [{n_layers}, {d_mlp}], got "
                          f"{maxima.shape!r}; regenerate it for this model")
    return maxima.astype(np.float32)


def run(cfg: AtlasConfig) -> None:
    from builder.models import load_model, selected_layers

    paths = AtlasPaths.of(cfg)
    if stage_is_done(paths.collect_meta, META_KIND, SCHEMA_VERSION, cfg):
        log.info("collect: up to date")
        return
    model = load_model(cfg)
    layers = selected_layers(cfg, model.n_layers)
    begin_stage(paths.stage("collect"), cfg)
    tokens, packing = _load_or_tokenise(cfg, paths, model)
    reference = load_reference_maxima(cfg, model.n_layers, model.d_mlp)
    collector = Collector(layers, model.d_mlp, model.d_model, cfg.context_length, cfg, reference)
    next_seq, forwarded = 0, 0
    if paths.collect_checkpoint.is_file():
        try:
            arrays = read_npz(paths.collect_checkpoint, CHECKPOINT_KIND, SCHEMA_VERSION)
            collector.load_state_arrays(arrays)
            next_seq = int(arrays["next_seq"])
            log.info("collect: resuming at sequence %d of %d", next_seq, len(tokens))
        except (ArtefactError, KeyError):
            log.warning("collect: checkpoint unreadable, starting over")
            collector = Collector(layers, model.d_mlp, model.d_model, cfg.context_length, cfg, reference)
    since_checkpoint = 0
    with progress(total=len(tokens), initial=next_seq, desc="collect", unit="seq") as bar:
        while next_seq < len(tokens):
            batch = torch.as_tensor(tokens[next_seq:next_seq + cfg.batch_size], dtype=torch.long,
                                    device=model.device)
            collect_batch(collector, model.bridge, batch, next_seq, model.gated)
            next_seq += len(batch)
            forwarded += len(batch)
            since_checkpoint += len(batch)
            bar.update(len(batch))
            if since_checkpoint >= cfg.checkpoint_every and next_seq < len(tokens):
                write_npz(paths.collect_checkpoint, CHECKPOINT_KIND, SCHEMA_VERSION, next_seq=np.array(next_seq),
                          **collector.state_arrays())
                since_checkpoint = 0
    for layer in layers:
        write_npz(paths.layer_examples(layer), LAYER_KIND, SCHEMA_VERSION, **collector.finish(layer))
    write_json(paths.collect_meta, collect_meta(cfg, model, layers, tokens, packing, forwarded))
    paths.collect_checkpoint.unlink(missing_ok=True)


def _load_or_tokenise(cfg: AtlasConfig, paths: AtlasPaths, model) -> tuple[np.ndarray, dict]:
    """The packed tokens and how they were packed (with the build date), tokenising only on the first run."""
    if paths.tokens.is_file():
        arrays = read_npz(paths.tokens, TOKENS_KIND, SCHEMA_VERSION)
        return arrays["tokens"], json.loads(str(arrays["packing"]))
    tokens, packing = tokenise_corpus(cfg, model.tokenizer)
    packing = {**packing, "build_date": cfg.build_date or datetime.date.today().isoformat()}
    write_npz(paths.tokens, TOKENS_KIND, SCHEMA_VERSION, tokens=tokens,
              packing=np.array(json.dumps(packing, sort_keys=True)))
    return tokens, packing


def collect_meta(cfg: AtlasConfig, model, layers: list[int], tokens: np.ndarray, packing: dict,
                 forwarded: int) -> dict:
    return {
        "kind": META_KIND, "schema_version": SCHEMA_VERSION, "config_hash": cfg.config_hash(),
        "code_version": __version__, "peak_rss_mb": peak_rss_mb(), "model": cfg.model, "model_revision": model.revision,
        "n_layers": model.n_layers, "d_model": model.d_model, "d_mlp": model.d_mlp, "gated": model.gated,
        "layers": layers, "dataset": [Path(f).name for f in cfg.data_files] if cfg.data_files else cfg.dataset,
        "n_sequences": int(len(tokens)), "n_tokens": int(tokens.size), "context_length": cfg.context_length,
        "packing": packing, "threshold": cfg.threshold, "max_examples": cfg.max_examples,
        "reference_maxima": bool(cfg.reference_maxima), "window_before": cfg.window_before,
        "window_after": cfg.window_after, "forwarded_sequences_last_run": forwarded,
        "build_date": packing["build_date"],
    }


@dataclass(frozen=True)
class LayerExamples:
    """The collect artefact of one layer, read back. Examples are grouped by neuron (offsets) in corpus order."""

    max_activation: Float[np.ndarray, " d_mlp"]
    offsets: Int[np.ndarray, " d_mlp_plus_1"]
    seq: Int[np.ndarray, " n_examples"]
    pos: Int[np.ndarray, " n_examples"]
    act: Float[np.ndarray, " n_examples"]
    pre: Float[np.ndarray, " n_examples"]
    pre_linear: Float[np.ndarray, " n_examples"]
    window: Float[np.ndarray, "n_examples window"]
    vector_index: Int[np.ndarray, " n_examples"]
    vectors: Float[np.ndarray, "n_vectors d_model"]
    vector_seq: Int[np.ndarray, " n_vectors"]
    vector_pos: Int[np.ndarray, " n_vectors"]
    observed_max: Float[np.ndarray, " d_mlp"]
    histogram: Int[np.ndarray, "d_mlp n_bins"]
    histogram_edges: Float[np.ndarray, " n_edges"]

    def neuron_slice(self, neuron: int) -> slice:
        return slice(int(self.offsets[neuron]), int(self.offsets[neuron + 1]))

    def neuron_vectors(self, neuron: int) -> Float[np.ndarray, "n_examples d_model"]:
        return self.vectors[self.vector_index[self.neuron_slice(neuron)]]


def read_layer_examples(paths: AtlasPaths, layer: int) -> LayerExamples:
    arrays = read_npz(paths.layer_examples(layer), LAYER_KIND, SCHEMA_VERSION)
    try:
        examples = LayerExamples(**arrays)
    except TypeError:
        raise ArtefactError(f"{paths.layer_examples(layer)} lacks expected arrays; delete it and re-run collect") \
            from None
    if examples.offsets[-1] != len(examples.seq):
        raise ArtefactError(f"{paths.layer_examples(layer)} is inconsistent; delete it and re-run collect")
    return examples


def read_collect_meta(paths: AtlasPaths, cfg: AtlasConfig | None = None) -> dict:
    """The collect meta; given the current config, also refuse artefacts collected under another one."""
    meta = read_json(paths.collect_meta, META_KIND, SCHEMA_VERSION)
    if cfg is not None and meta.get("config_hash") != cfg.config_hash():
        raise ArtefactError(f"the collect artefacts in {paths.stage('collect')} were made with another config "
                            "(model, data or selection); run `atlas collect` (or `atlas build`) again")
    return meta


def read_tokens(paths: AtlasPaths) -> np.ndarray:
    return read_npz(paths.tokens, TOKENS_KIND, SCHEMA_VERSION)["tokens"]
