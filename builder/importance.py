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
- masked variants are batched in blocks of consecutive positions that share the clean key/value cache of the prefix
  before the block, so only the tokens from the block onwards are recomputed;
- the forward stops after the deepest layer any example of the sequence needs.

Shards are contiguous sequence ranges (`shard_sequences`, a multiple of GROUP); sequences are batched in groups
aligned to multiples of GROUP, so any split batches the same rows together and the merged result is the unsplit one
exactly. Before any work, one cached masked run is compared with an uncached one (`check_kv_cache`): a transformers
release whose attention ignores the cache through TransformerLens' bridge would otherwise give wrong importances
silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from builder.config import SHARD_MULTIPLE, AtlasConfig
from builder.errors import AtlasError, ConfigError
from builder.schema import (IMPORTANCE, IMPORTANCE_SHARD, SetExamples, collect_sets, read_collect_meta,
                            read_examples, read_tokens)
from builder.shards import sequence_shards, shard_files
from builder.stage import StageRun, progress
from builder.subjects import SubjectSet

log = logging.getLogger(__name__)

BLOCK = 4  # consecutive masked positions per batched forward; they share their sequence's prefix cache
GROUP = SHARD_MULTIPLE  # sequences whose blocks are batched together, aligned to multiples of GROUP
SUPPORTED_TRANSFORMERS = "5.20.2"
# A cached masked run may differ from an uncached one by float noise only.
KV_CHECK_TOLERANCE = 1e-4


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


def prefix_cache(cache, select: Tensor, p0: int, n_layers: int, config):
    """A cache holding the clean keys and values of positions < p0 of the rows `select` picks, layers 0 … n − 1."""
    from transformers import DynamicCache

    block_cache = DynamicCache(config=config)
    for index in range(n_layers):
        layer_cache = cache.layers[index]
        block_cache.update(layer_cache.keys[select, :, :p0], layer_cache.values[select, :, :p0], index)
    return block_cache


class SharedMasker:
    """Runs the shared masked forwards for a group of sequences and reads off every example's masked activation."""

    def __init__(self, bridge, sets: list[SubjectSet], window: int, mask_id: int, first_maskable: int,
                 mode: str = "mask"):
        self.bridge = bridge
        self.sets = sets
        self.window = window
        self.mask_id = mask_id
        self.first_maskable = first_maskable
        self.delete = mode == "delete"
        self.forward_tokens = 0

    def _run(self, tokens: Tensor, set_indices: list[int], cache) -> dict[int, Tensor]:
        captured: dict[int, Tensor] = {}

        def keeper(index: int):
            def keep(value: Tensor, hook) -> None:
                captured[index] = self.sets[index].activation_of(value.detach())
            return keep

        hooks = [(self.sets[i].activation_hook(), keeper(i)) for i in set_indices]
        with torch.no_grad():
            self.bridge.run_with_hooks(tokens, return_type=None, fwd_hooks=hooks, past_key_values=cache,
                                       stop_at_layer=max(self.sets[i].layer for i in set_indices) + 1)
        self.forward_tokens += tokens.numel()
        return captured

    def group(self, tokens: Int[np.ndarray, "g ctx"], found: list[SequenceExamples], device
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: (clean activation [k], masked activations [k, window + 1]) of its examples; NaN where a
        window position is before the sequence start or is the unmaskable BOS."""
        from transformers import DynamicCache

        needed_sets = sorted({int(i) for f in found for i in f.set_index})
        end = max(int(f.position.max()) for f in found) + 1
        prefix = torch.as_tensor(tokens[:, :end], dtype=torch.long, device=device)
        cache = DynamicCache(config=self.bridge.original_model.config)
        clean_post = self._run(prefix, needed_sets, cache)
        results = []
        for g, f in enumerate(found):
            clean = np.empty(len(f.set_index), np.float32)
            for i in set(f.set_index.tolist()):
                mine = f.set_index == i
                clean[mine] = clean_post[i][g, f.position[mine], f.unit[mine]].float().cpu().numpy()
            results.append((clean, np.full((len(f.set_index), self.window + 1), np.nan, np.float32)))
        needed = [masked_positions(f.position, self.window, self.first_maskable) for f in found]
        # Deleting: every needed position is deleted, and each max token is masked as well (its own score and the
        # normaliser: a max token cannot be deleted and still be read).
        peaks = [np.unique(f.position[f.position >= self.first_maskable]) for f in found] if self.delete else None
        for p0 in range(self.first_maskable, end, BLOCK):
            rows = [(g, int(p), self.delete) for g, positions in enumerate(needed) for p in positions
                    if p0 <= p < p0 + BLOCK]
            if self.delete:
                rows += [(g, int(p), False) for g, positions in enumerate(peaks) for p in positions
                         if p0 <= p < p0 + BLOCK]
            if rows:
                self._block(prefix, cache, p0, rows, found, results)
        return results

    def _block(self, prefix: Tensor, cache, p0: int, rows: list[tuple[int, int, bool]],
               found: list[SequenceExamples], results: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Rows (sequence, position, deleted) of one block: masked rows replace the token at the position by the mask
        token; deleted rows drop it, so later tokens move one position left (the row ends with a repeat of its
        last token, read by nothing: attention is causal)."""
        row_seq = np.array([g for g, _, _ in rows])
        row_pos = np.array([p for _, p, _ in rows])
        row_del = np.array([d for _, _, d in rows], bool)
        reach = [(f.position >= p0) & (f.position <= p0 + BLOCK - 1 + self.window) for f in found]
        last = max(int(f.position[r].max()) for f, r in zip(found, reach) if r.any())
        tokens = prefix[torch.as_tensor(row_seq), p0:last + 1].clone()
        masked = np.flatnonzero(~row_del)
        tokens[torch.as_tensor(masked), torch.as_tensor(row_pos[masked] - p0)] = self.mask_id
        for r in np.flatnonzero(row_del):
            at = int(row_pos[r] - p0)
            tokens[r, at:-1] = tokens[r, at + 1:].clone()
        needed_sets = sorted({int(i) for f, r in zip(found, reach) for i in f.set_index[r]})
        select = torch.as_tensor(row_seq, device=prefix.device)
        deepest = max(self.sets[i].layer for i in needed_sets)
        block_cache = prefix_cache(cache, select, p0, deepest + 1, self.bridge.original_model.config)
        post = self._run(tokens, needed_sets, block_cache)
        for g, (f, r) in enumerate(zip(found, reach)):
            my_rows = np.flatnonzero(row_seq == g)
            for i in set(f.set_index[r].tolist()):
                mine = np.flatnonzero(r & (f.set_index == i))
                m = f.position[mine]
                p = row_pos[my_rows]
                deleted = row_del[my_rows][:, None]
                # pairs (row changing p, example at m): masked rows serve p <= m <= p + window (only m = p when
                # deleting), deleted rows p < m <= p + window, read one position left
                within = (p[:, None] <= m[None, :]) & (m[None, :] <= p[:, None] + self.window)
                serves = np.where(deleted, within & (p[:, None] < m[None, :]),
                                  within & ((p[:, None] == m[None, :]) if self.delete else True))
                a, e = np.nonzero(serves)
                values = post[i][torch.as_tensor(my_rows[a]), torch.as_tensor(m[e] - p0 - row_del[my_rows[a]]),
                                 torch.as_tensor(f.unit[mine][e])]
                results[g][1][mine[e], p[a] - m[e] + self.window] = values.float().cpu().numpy()

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
    """Clean and masked activations of every example whose sequence lies in `shard`, as a shard artefact."""
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
    return arrays


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


def build(run: StageRun) -> dict:
    from builder.models import load_model

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
    if todo:  # only shards still to run need the model (and the cache check)
        model = load_model(cfg)
        mask_id = mask_token_id(cfg, model.tokenizer)
        masker = SharedMasker(model.bridge, sets, cfg.window_before, mask_id, first_maskable, cfg.importance_mode)
        if grouped:
            first = min(grouped)
            deepest = grouped[first].take(np.array([np.argmax(grouped[first].position)]))
            check_kv_cache(masker, tokens[first], deepest, model.device)
    with_examples = np.array(sorted(grouped), np.int64)

    def count(ranges: list[range]) -> int:
        return int(sum(((with_examples >= r.start) & (with_examples < r.stop)).sum() for r in ranges))

    with progress(total=len(grouped), initial=len(grouped) - count(todo), desc="importance", unit="seq") as bar:
        for shard in todo:
            before = masker.forward_tokens
            arrays = importance_shard(masker, tokens, grouped, sets, shard, model.device, bar)
            IMPORTANCE_SHARD.write_npz(files[shard], forward_tokens=np.array(masker.forward_tokens - before),
                                       mask_token_id=np.array(mask_id), **arrays)
    parts = [IMPORTANCE_SHARD.read_npz(files[r]) for r in shards]
    for s, (clean, masked) in merge_shards(parts, sets, examples, cfg.window_before).items():
        importance, normaliser = normalised_importance(clean, masked)
        run.write_npz(IMPORTANCE, paths.set_file("importance", s), importance=importance, normaliser=normaliser,
                      clean=clean, masked=masked)
    forward_tokens = sum(int(p["forward_tokens"]) for p in parts)
    mask_ids = {int(p["mask_token_id"]) for p in parts}
    return {"window": cfg.window_before, "mask_token_id": mask_ids.pop() if len(mask_ids) == 1 else None,
            "forward_tokens": forward_tokens,
            "forward_tokens_last_run": masker.forward_tokens if todo else 0,
            "sequences_processed_last_run": count(todo),
            "shards_run_last_run": len(todo),
            "naive_forward_tokens": naive_token_count(examples, cfg.window_before, first_maskable)}
