"""Token importance: how much each context token matters to a neuron's activation at its max token.

For every kept example and every position p in the window [m − window_before, m] before and at the max token m, the
token at p is replaced by the mask token (the model's pad token, a configured substitute, else EOS; the BOS position
is never masked) and the drop in the neuron's activation at m is measured. Drops are divided by the drop from masking
the max token itself and clipped to [0, 1].

When that normalising drop is zero or negative (masking the max token does not lower the activation), drops are
divided by the largest positive drop in the window instead; if no drop is positive the example's importances are all
zero. `normaliser` records which case applied: 0 max token, 1 largest drop, 2 none.

The computation is exact but shared (the naive reference in the tests re-runs the prefix per neuron, example and
position):
- masking p changes nothing before p (causal attention), so one masked run of a sequence serves every neuron of every
  layer whose max token lies in p … p + window_before;
- masked variants are batched in blocks of consecutive positions that share the clean key/value cache of the prefix
  before the block, so only the tokens from the block onwards are recomputed;
- the forward stops after the deepest layer any example of the sequence needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from builder import __version__
from builder.artefacts import read_npz, write_json, write_npz
from builder.collect import read_collect_meta, read_layer_examples, read_tokens
from builder.config import AtlasConfig
from builder.errors import ArtefactError, ConfigError
from builder.paths import AtlasPaths
from builder.stage import begin_stage, peak_rss_mb, progress, stage_is_done

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_KIND = "importance-meta"
LAYER_KIND = "importance-layer"
CHECKPOINT_KIND = "importance-checkpoint"
BLOCK = 4  # consecutive masked positions per batched forward; they share their sequence's prefix cache
GROUP = 16  # sequences whose blocks are batched together
CHECKPOINT_SEQUENCES = 32  # a multiple of GROUP


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
    """The examples of one sequence across layers: what a shared masked run must read off."""

    layer: Int[np.ndarray, " k"]
    neuron: Int[np.ndarray, " k"]
    position: Int[np.ndarray, " k"]
    row: Int[np.ndarray, " k"]  # index into the layer's example arrays


def examples_by_sequence(layers: list[int], examples: dict) -> dict[int, SequenceExamples]:
    parts = []
    for layer in layers:
        e = examples[layer]
        neurons = np.repeat(np.arange(len(e.offsets) - 1), np.diff(e.offsets))
        parts.append((np.full(len(e.seq), layer), neurons, e.pos, np.arange(len(e.seq)), e.seq))
    layer, neuron, position, row, seq = (np.concatenate(column) for column in zip(*parts))
    order = np.lexsort((row, layer, seq))
    grouped = {}
    for s in np.unique(seq):
        chosen = order[seq[order] == s]
        grouped[int(s)] = SequenceExamples(layer[chosen], neuron[chosen], position[chosen], row[chosen])
    return grouped


def masked_positions(positions: np.ndarray, window: int, first_maskable: int) -> np.ndarray:
    """Every position some example's window needs masked."""
    needed = np.zeros(int(positions.max()) + 1, bool)
    for m in np.unique(positions):
        needed[max(first_maskable, m - window):m + 1] = True
    return np.flatnonzero(needed)


class SharedMasker:
    """Runs the shared masked forwards for a group of sequences and reads off every example's masked activation."""

    def __init__(self, bridge, window: int, mask_id: int, first_maskable: int):
        self.bridge = bridge
        self.window = window
        self.mask_id = mask_id
        self.first_maskable = first_maskable
        self.forward_tokens = 0

    def _run(self, tokens: Tensor, layers: list[int], cache) -> dict[int, Tensor]:
        captured: dict[int, Tensor] = {}

        def keeper(layer: int):
            def keep(value: Tensor, hook) -> None:
                captured[layer] = value.detach()
            return keep

        hooks = [(f"blocks.{layer}.mlp.hook_post", keeper(layer)) for layer in layers]
        with torch.no_grad():
            self.bridge.run_with_hooks(tokens, return_type=None, stop_at_layer=max(layers) + 1, fwd_hooks=hooks,
                                       past_key_values=cache)
        self.forward_tokens += tokens.numel()
        return captured

    def group(self, tokens: Int[np.ndarray, "g ctx"], found: list[SequenceExamples], device
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: (clean activation [k], masked activations [k, window + 1]) of its examples; NaN where a
        window position is before the sequence start or is the unmaskable BOS."""
        from transformers import DynamicCache

        layers = sorted({int(layer) for f in found for layer in f.layer})
        end = max(int(f.position.max()) for f in found) + 1
        prefix = torch.as_tensor(tokens[:, :end], dtype=torch.long, device=device)
        cache = DynamicCache(config=self.bridge.original_model.config)
        clean_post = self._run(prefix, layers, cache)
        results = []
        for g, f in enumerate(found):
            clean = np.empty(len(f.layer), np.float32)
            for layer in set(f.layer.tolist()):
                mine = f.layer == layer
                clean[mine] = clean_post[layer][g, f.position[mine], f.neuron[mine]].float().cpu().numpy()
            results.append((clean, np.full((len(f.layer), self.window + 1), np.nan, np.float32)))
        needed = [masked_positions(f.position, self.window, self.first_maskable) for f in found]
        for p0 in range(self.first_maskable, end, BLOCK):
            rows = [(g, int(p)) for g, positions in enumerate(needed) for p in positions if p0 <= p < p0 + BLOCK]
            if rows:
                self._block(prefix, cache, p0, rows, found, results)
        return results

    def _block(self, prefix: Tensor, cache, p0: int, rows: list[tuple[int, int]], found: list[SequenceExamples],
               results: list[tuple[np.ndarray, np.ndarray]]) -> None:
        from transformers import DynamicCache

        row_seq = np.array([g for g, _ in rows])
        row_pos = np.array([p for _, p in rows])
        reach = [(f.position >= p0) & (f.position <= p0 + BLOCK - 1 + self.window) for f in found]
        last = max(int(f.position[r].max()) for f, r in zip(found, reach) if r.any())
        tokens = prefix[torch.as_tensor(row_seq), p0:last + 1].clone()
        tokens[torch.arange(len(rows)), torch.as_tensor(row_pos - p0)] = self.mask_id
        layers = sorted({int(layer) for f, r in zip(found, reach) for layer in f.layer[r]})
        select = torch.as_tensor(row_seq, device=prefix.device)
        block_cache = DynamicCache(config=self.bridge.original_model.config)
        for index in range(max(layers) + 1):
            layer_cache = cache.layers[index]
            block_cache.update(layer_cache.keys[select, :, :p0], layer_cache.values[select, :, :p0], index)
        post = self._run(tokens, layers, block_cache)
        for g, (f, r) in enumerate(zip(found, reach)):
            my_rows = np.flatnonzero(row_seq == g)
            for layer in set(f.layer[r].tolist()):
                mine = np.flatnonzero(r & (f.layer == layer))
                m = f.position[mine]
                p = row_pos[my_rows]
                # pairs (row masking p, example at m) with p <= m <= p + window
                a, e = np.nonzero((p[:, None] <= m[None, :]) & (m[None, :] <= p[:, None] + self.window))
                values = post[layer][torch.as_tensor(my_rows[a]), torch.as_tensor(m[e] - p0),
                                     torch.as_tensor(f.neuron[mine][e])]
                results[g][1][mine[e], p[a] - m[e] + self.window] = values.float().cpu().numpy()


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


def naive_token_count(examples: dict, window: int, first_maskable: int) -> int:
    """Forward tokens the naive method needs: per example, one clean and one masked run of the prefix per position."""
    total = 0
    for e in examples.values():
        valid = e.pos - np.maximum(first_maskable, e.pos - window) + 1
        total += int(((valid + 1) * (e.pos + 1)).sum())
    return total


def run(cfg: AtlasConfig) -> None:
    from builder.models import load_model

    paths = AtlasPaths.of(cfg)
    if stage_is_done(paths.importance_meta, META_KIND, SCHEMA_VERSION, cfg):
        log.info("importance: up to date")
        return
    meta = read_collect_meta(paths, cfg)
    begin_stage(paths.stage("importance"), cfg)
    layers = meta["layers"]
    examples = {layer: read_layer_examples(paths, layer) for layer in layers}
    tokens = read_tokens(paths)
    model = load_model(cfg)
    first_maskable = 1 if meta["packing"]["bos_token_id"] is not None else 0
    masker = SharedMasker(model.bridge, cfg.window_before, mask_token_id(cfg, model.tokenizer), first_maskable)
    grouped = examples_by_sequence(layers, examples)
    sequences = sorted(grouped)
    state = _initial_state(paths, layers, examples, cfg.window_before)
    done = int(state.pop("next_index"))
    masker.forward_tokens = int(state.pop("forward_tokens"))
    with progress(total=len(sequences), initial=done, desc="importance", unit="seq") as bar:
        for index in range(done, len(sequences), GROUP):
            chosen = sequences[index:index + GROUP]
            found = [grouped[s] for s in chosen]
            for f, (clean, masked) in zip(found, masker.group(tokens[chosen], found, model.device)):
                for layer in set(f.layer.tolist()):
                    mine = f.layer == layer
                    state[f"L{layer}.clean"][f.row[mine]] = clean[mine]
                    state[f"L{layer}.masked"][f.row[mine]] = masked[mine]
            bar.update(len(chosen))
            finished = index + len(chosen)
            if finished % CHECKPOINT_SEQUENCES == 0 and finished < len(sequences):
                write_npz(paths.importance_checkpoint, CHECKPOINT_KIND, SCHEMA_VERSION, next_index=np.array(finished),
                          forward_tokens=np.array(masker.forward_tokens), **state)
    for layer in layers:
        importance, normaliser = normalised_importance(state[f"L{layer}.clean"], state[f"L{layer}.masked"])
        write_npz(paths.layer_importance(layer), LAYER_KIND, SCHEMA_VERSION, importance=importance,
                  normaliser=normaliser, clean=state[f"L{layer}.clean"], masked=state[f"L{layer}.masked"])
    write_json(paths.importance_meta, {
        "kind": META_KIND, "schema_version": SCHEMA_VERSION, "config_hash": cfg.config_hash(),
        "code_version": __version__, "peak_rss_mb": peak_rss_mb(), "window": cfg.window_before, "mask_token_id": masker.mask_id,
        "forward_tokens": masker.forward_tokens, "sequences_processed_last_run": len(sequences) - done,
        "naive_forward_tokens": naive_token_count(examples, cfg.window_before, first_maskable)})
    paths.importance_checkpoint.unlink(missing_ok=True)


def _initial_state(paths: AtlasPaths, layers: list[int], examples: dict, window: int) -> dict[str, np.ndarray]:
    if paths.importance_checkpoint.is_file():
        try:
            state = read_npz(paths.importance_checkpoint, CHECKPOINT_KIND, SCHEMA_VERSION)
            log.info("importance: resuming after %d sequences", int(state["next_index"]))
            return state
        except ArtefactError:
            log.warning("importance: checkpoint unreadable, starting over")
    state = {"next_index": np.array(0), "forward_tokens": np.array(0)}
    for layer in layers:
        n = len(examples[layer].seq)
        state[f"L{layer}.clean"] = np.full(n, np.nan, np.float32)
        state[f"L{layer}.masked"] = np.full((n, window + 1), np.nan, np.float32)
    return state


def read_layer_importance(paths: AtlasPaths, layer: int) -> dict[str, np.ndarray]:
    return read_npz(paths.layer_importance(layer), LAYER_KIND, SCHEMA_VERSION)
