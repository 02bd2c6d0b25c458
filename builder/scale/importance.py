"""Importance at the reference scale (issue 14, item 2): forwards, rows per forward and key/value bytes copied per
forward of the masked-forward engine, measured on a random-weight GPT-2-small-shaped model with 1,024-token sequences
for a slice, beside the engine before it (blocks of 4 positions, each copying its rows' prefix cache), and both
extrapolated to the reference workload (10,000 × 1,024 tokens, 12 × 3,072 neurons, 100 examples each, window 20).

The engine before is no longer runnable; its figures follow the formula of its code (named "formula" below): one
clean forward per group of 16 sequences, then one forward per block of 4 consecutive positions holding the group's
rows whose position lies in the block, each running the tokens from the block to the last max token it reaches, on
a cache built by copying every row's prefix keys and values (`keys[select, :, :p0]`), which DynamicCache copied again
into its own tensors and concatenated with the new tokens' in the forward: 3 × prefix + new tokens per row and layer.
The engine now is measured from its counters (nbytes of what it writes into the cache), and its reference figures
come from its plan (`reference_plan`), checked against the measured counters on the slice.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch

from builder import importance
from builder.importance import (GROUP, ForwardShape, SequenceExamples, SharedMasker, fold_rows, plan_forwards,
                                sequence_rows)
from builder.subjects import mlp_layer

log = logging.getLogger(__name__)

N_LAYERS, D_MODEL, N_HEADS, D_MLP, VOCAB, CONTEXT = 12, 768, 12, 3072, 50257, 1024
REFERENCE_SEQUENCES, REFERENCE_EXAMPLES, WINDOW = 10_000, 100, 20
REFERENCE_NEURONS = N_LAYERS * D_MLP
# Examples per sequence at the reference density: every example's max token lies in some sequence.
REFERENCE_PER_SEQUENCE = REFERENCE_NEURONS * REFERENCE_EXAMPLES / REFERENCE_SEQUENCES
OLD_BLOCK = 4  # positions per forward of the engine before
# A GPU's budget for the reference plan: what importance_memory_mb = 0 gives on an 80 GB H100 (half its memory).
GPU_BUDGET = 40 << 30
# Sequences per group if SHARD_MULTIPLE were raised (a choice for the lead): more rows per forward at equal cost.
WIDER_GROUP = 64
FLOAT32 = 4
# The slices: (sequences, tokens each, examples each); examples spread evenly over the sequence and the layers.
SLICES = {True: (1, 128, 4), False: (1, CONTEXT, 16)}
ISSUE_CALLS = 160_000  # the issue's count of today's forwards for the reference workload


def random_gpt2_small(folder: Path, context: int):
    """A TransformerBridge over a random-weight GPT-2 small (12 layers, d_model 768, 12 heads, d_mlp 3,072, vocab
    50,257), CPU float32, built as tests/conftest.py builds its tiny models (only the config is saved: the bridge
    reads the architecture from it)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, n_positions=max(context, CONTEXT),
                        vocab_size=VOCAB, activation_function="gelu_new")
    model = GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=model, device=torch.device("cpu"),
                                                 dtype=torch.float32)
    bridge.enable_compatibility_mode()
    bridge.eval()
    return bridge


def spread_examples(n_sequences: int, context: int, per_sequence: int) -> list[SequenceExamples]:
    """Examples at positions spread evenly over each sequence (the last at its end), units cycling through the
    layers so every sequence needs the deepest."""
    position = np.linspace(context / per_sequence, context - 1, per_sequence).astype(np.int64)
    layer = np.arange(per_sequence) % N_LAYERS
    unit = (np.arange(per_sequence) * 97) % D_MLP
    return [SequenceExamples(layer, unit, position, np.arange(per_sequence)) for _ in range(n_sequences)]


def reference_group(rng: np.random.Generator, n_sequences: int = GROUP) -> list[SequenceExamples]:
    """One group of sequences at the reference density: max tokens uniform over positions 1 … 1,023, units uniform
    over the 12 × 3,072 neurons."""
    found = []
    for _ in range(n_sequences):
        k = int(rng.poisson(REFERENCE_PER_SEQUENCE))
        found.append(SequenceExamples(rng.integers(0, N_LAYERS, k), rng.integers(0, D_MLP, k),
                                      rng.integers(1, CONTEXT, k), np.arange(k)))
    return found


def blocked_formula(found: list[SequenceExamples], kv_width: int, first_maskable: int = 1) -> list[tuple[int, int]]:
    """The engine before, per forward: (rows, key/value bytes its cache copied), following its code's loops."""
    end = max(int(f.position.max()) for f in found) + 1
    layers = max(int(f.set_index.max()) for f in found) + 1
    per_token = 2 * kv_width * FLOAT32  # keys and values of one token in one layer
    calls = [(0, len(found) * end * layers * per_token)]  # the clean forward: DynamicCache copies the new tokens
    needed = [importance.masked_positions(f.position, WINDOW, first_maskable) for f in found]
    for p0 in range(first_maskable, end, OLD_BLOCK):
        rows = sum(int(((n >= p0) & (n < p0 + OLD_BLOCK)).sum()) for n in needed)
        if not rows:
            continue
        reach = [(f.position >= p0) & (f.position <= p0 + OLD_BLOCK - 1 + WINDOW) for f in found]
        last = max(int(f.position[r].max()) for f, r in zip(found, reach) if r.any())
        deepest = max(int(f.set_index[r].max()) for f, r in zip(found, reach) if r.any())
        # keys[select, :, :p0] (a copy), DynamicCache.update of it (cat with an empty cache: a copy), and the
        # forward's update (cat with the new tokens: prefix + new)
        calls.append((rows, rows * (3 * p0 + last - p0 + 1) * (deepest + 1) * per_token))
    return calls


def reference_plan(found: list[SequenceExamples], budget: int, shape: ForwardShape) -> list[tuple[int, int]]:
    """The engine now on one group, per forward: (rows, key/value bytes written into the cache), from its plan: what
    SharedMasker.group runs (checked against its counters on the slice)."""
    end = max(int(f.position.max()) for f in found) + 1
    layers = max(int(f.set_index.max()) for f in found) + 1
    captured = len({int(i) for f in found for i in f.set_index}) * D_MLP
    plan = plan_forwards(budget, shape, len(found), end, layers, captured, WINDOW)
    per_token = 2 * shape.kv_width * FLOAT32
    calls = [(0, len(found) * (min(end, s + plan.chunk) - s) * layers * per_token) for s in range(0, end, plan.chunk)]
    rows = [sequence_rows(f.position, WINDOW, 1, False) for f in found]
    folds = [fold_rows(r.length, plan.fold) for r in rows]
    for k in range(max(int(f.max()) + 1 for f in folds if len(f))):
        chosen = [f == k for f in folds]
        width = max(1, max(int(r.length[c].sum()) for r, c in zip(rows, chosen)))
        deepest = max(int(f.set_index[r.pair_example[c[r.pair_row]]].max(initial=0))
                      for f, r, c in zip(found, rows, chosen))
        calls.append((sum(int(c.sum()) for c in chosen), len(found) * width * (deepest + 1) * per_token))
    return calls


def summary(calls: list[tuple[int, int]]) -> dict:
    masked = [rows for rows, _ in calls if rows]
    copied = [b for _, b in calls]
    return {"forward_calls": len(calls), "rows_per_call_mean": float(np.mean(masked)),
            "rows_per_call_max": int(max(masked)), "bytes_copied_per_call_mean": float(np.mean(copied)),
            "bytes_copied_per_call_max": int(max(copied)), "rows": int(sum(masked)),
            "bytes_copied": int(sum(copied))}


def figure(name: str, value, unit: str, target=None, met: bool | None = None) -> dict:
    entry = {"name": name, "value": value, "unit": unit}
    if target is not None:
        entry.update(target=target, met=bool(met))
    return entry


def measure(out_dir: Path, quick: bool) -> dict:
    """The figures (see the module docstring); quick: one 128-token sequence."""
    torch.set_num_threads(1)
    n_sequences, context, per_sequence = SLICES[quick]
    bridge = random_gpt2_small(Path(out_dir) / "gpt2-small-random", context)
    shape = ForwardShape.of(bridge)
    sets = [mlp_layer(layer, D_MLP, D_MODEL, False) for layer in range(N_LAYERS)]
    masker = SharedMasker(bridge, sets, WINDOW, mask_id=VOCAB - 1, first_maskable=1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (n_sequences, context))
    found = spread_examples(n_sequences, context, per_sequence)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux
    start = time.perf_counter()
    masker.group(tokens, found, torch.device("cpu"))
    wall = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    measured = masker.counters
    planned = summary(reference_plan(found, masker.memory_bytes, shape))
    before = summary(blocked_formula(found, shape.kv_width))
    plan_matches = (planned["forward_calls"] == measured.forward_calls and planned["rows"] == measured.masked_rows
                    and planned["bytes_copied"] == measured.cache_bytes_copied)

    group = reference_group(np.random.default_rng(1))
    reference_before = summary(blocked_formula(group, shape.kv_width))
    reference_cpu = summary(reference_plan(group, masker.memory_bytes, shape))
    reference_gpu = summary(reference_plan(group, GPU_BUDGET, shape))
    reference_wider = summary(reference_plan(reference_group(np.random.default_rng(2), WIDER_GROUP), GPU_BUDGET,
                                             shape))
    rows_per_sequence = reference_cpu["rows"] / GROUP
    seconds_per_row = wall / measured.masked_rows
    now = {"forward_calls": measured.forward_calls, "rows_per_call_mean": measured.masked_rows /
           measured.masked_forward_calls, "rows_per_call_max": measured.masked_rows_max,
           "bytes_copied_per_call_mean": measured.cache_bytes_copied / measured.forward_calls,
           "bytes_copied_per_call_max": measured.cache_bytes_copied_max,
           "bytes_copied": measured.cache_bytes_copied, "rows": measured.masked_rows}
    cut = f"slice ({n_sequences} × {context} tokens, {per_sequence} examples each)"
    figures = {}
    for key, label, counts in (("slice_before", f"{cut}, before (formula)", before),
                               ("slice_now", f"{cut}, now (measured)", now),
                               ("reference_before", "reference, before (formula)", reference_before),
                               ("reference_cpu", f"reference, now on a CPU (plan, {masker.memory_bytes >> 20} MiB)",
                                reference_cpu),
                               ("reference_gpu", f"reference, now on a GPU (plan, {GPU_BUDGET >> 20} MiB)",
                                reference_gpu),
                               ("reference_gpu_wider", f"reference, now on a GPU, groups of {WIDER_GROUP} (plan)",
                                reference_wider)):
        scale = 1 if key.startswith("slice") else REFERENCE_SEQUENCES / (WIDER_GROUP if key.endswith("wider")
                                                                         else GROUP)
        target = {"reference_before": (f"≈ {ISSUE_CALLS:,} (the issue's count)",
                                       abs(counts["forward_calls"] * scale - ISSUE_CALLS) < 0.1 * ISSUE_CALLS)}
        figures[f"{key}.forward_calls"] = figure(f"{label}: forwards", counts["forward_calls"] * scale, "calls",
                                                 *target.get(key, (None, None)))
        gpu = key == "reference_gpu"
        figures[f"{key}.rows_per_call_mean"] = figure(f"{label}: rows per masked forward, mean",
                                                      counts["rows_per_call_mean"], "rows",
                                                      "thousands on a GPU" if gpu else None,
                                                      counts["rows_per_call_mean"] >= 1000 if gpu else None)
        figures[f"{key}.rows_per_call_max"] = figure(f"{label}: rows per masked forward, max",
                                                     counts["rows_per_call_max"], "rows")
        figures[f"{key}.bytes_copied_per_call_mean"] = figure(f"{label}: key/value bytes copied per forward, mean",
                                                              counts["bytes_copied_per_call_mean"], "B")
        figures[f"{key}.bytes_copied_per_call_max"] = figure(f"{label}: key/value bytes copied per forward, max",
                                                             counts["bytes_copied_per_call_max"], "B")
        figures[f"{key}.bytes_copied_per_row"] = figure(f"{label}: key/value bytes copied per row",
                                                        counts["bytes_copied"] / counts["rows"], "B")
    figures.update({
        "slice_now.plan_matches": figure(f"{cut}: the plan gives the measured forwards, rows and bytes",
                                         plan_matches, "", True, plan_matches),
        "slice_now.cache_allocated": figure(f"{cut}, now: cache buffers allocated per group",
                                            measured.cache_bytes_allocated, "B"),
        "slice_now.peak_rss": figure(f"{cut}, now: process peak RSS after the slice (before: {rss_before >> 20} MiB, "
                                     "the model loaded)", rss_after, "B"),
        "slice_now.wall_per_sequence": figure(f"{cut}, now: wall per sequence (CPU, 1 thread)", wall / n_sequences,
                                              "s"),
        "reference.rows_per_sequence": figure("reference: rows per sequence (before and now)", rows_per_sequence,
                                              "rows"),
        "reference.wall_per_sequence": figure("reference, now: wall per sequence on this CPU (1 thread; the slice's "
                                              "seconds per row × rows)", seconds_per_row * rows_per_sequence, "s"),
        "reference.wall": figure("reference, now: wall for 10,000 sequences on this CPU (1 thread, extrapolated)",
                                 seconds_per_row * rows_per_sequence * REFERENCE_SEQUENCES / 3600, "h"),
    })
    for entry in figures.values():
        log.info("%s: %s %s", entry["name"], entry["value"], entry["unit"])
    return figures
