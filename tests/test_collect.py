"""Collect: the one-pass Collector against a naive two-pass definition, and collect.run on real (tiny) models."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from builder import collect
from builder.schema import read_collect_meta, read_examples, read_tokens
from builder.stage import run_stage
from builder.collect import Collector, keep_first_needed, load_reference_maxima
from builder.schema import HISTOGRAM_EDGES
from builder.subjects import Readout, mlp_layer
from builder.config import config_from_dict
from builder.errors import ConfigError
from builder.paths import AtlasPaths
from conftest import CORPUS_PARAGRAPHS, ROOT, assert_equal_arrays, expect_error, tiny_config_dict

CTX = 8
D_MODEL = 5
WINDOW_BEFORE, WINDOW_AFTER = 3, 2


# --------------------------------------------------------------------------------------------------------------------
# The definition, written the slow obvious way


def naive_examples(post: np.ndarray, pre: np.ndarray, pre_linear: np.ndarray | None, normalized: np.ndarray,
                   threshold: float, max_examples: int, window_before: int, window_after: int,
                   reference: np.ndarray | None = None) -> dict:
    """Two passes: M = max over everything (or the reference), T = threshold·M; then per neuron walk the sequences
    in corpus order, keep each whose max reaches T (at its first argmax) until max_examples are kept. M ≤ 0: none."""
    n_seq, ctx, d_mlp = post.shape
    maxima = post.max(axis=(0, 1)) if reference is None else reference
    out = {name: [] for name in ("neuron", "seq", "pos", "act", "pre", "pre_linear", "window", "vector")}
    for neuron in range(d_mlp):
        if maxima[neuron] <= 0:
            continue
        limit = np.float32(threshold) * np.float32(maxima[neuron])
        kept = 0
        for seq in range(n_seq):
            values = post[seq, :, neuron]
            if values.max() < limit:
                continue
            pos = int(np.argmax(values))  # first position holding the max
            window = [values[p] if 0 <= p < ctx else np.nan for p in range(pos - window_before, pos + window_after + 1)]
            out["neuron"].append(neuron)
            out["seq"].append(seq)
            out["pos"].append(pos)
            out["act"].append(values.max())
            out["pre"].append(pre[seq, pos, neuron])
            out["pre_linear"].append(0.0 if pre_linear is None else pre_linear[seq, pos, neuron])
            out["window"].append(window)
            out["vector"].append(normalized[seq, pos])
            kept += 1
            if kept == max_examples:
                break
    result = {name: np.asarray(out[name], dtype=np.int64) for name in ("neuron", "seq", "pos")}
    result.update({name: np.asarray(out[name], dtype=np.float32) for name in ("act", "pre", "pre_linear")})
    result["window"] = np.asarray(out["window"], np.float32).reshape(-1, window_before + 1 + window_after)
    result["vector"] = np.asarray(out["vector"], np.float32).reshape(-1, normalized.shape[-1])
    return result


def naive_bin(value: float) -> int:
    """The stored edges' convention, literally: above zero bin i holds (edge[i-1], edge[i]], below zero
    [edge[i-1], edge[i]) (a value on an edge counts in the bin nearer zero), ±0 the bin ending at 0."""
    side = "left" if value >= 0 else "right"
    return int(np.searchsorted(HISTOGRAM_EDGES, value, side=side))


def naive_histogram(post: np.ndarray) -> np.ndarray:
    """Per neuron, counts of activations per bin, one value at a time."""
    d_mlp = post.shape[-1]
    flat = post.reshape(-1, d_mlp)
    counts = np.zeros((d_mlp, len(HISTOGRAM_EDGES) + 1), np.int64)
    for n in range(d_mlp):
        for value in flat[:, n]:
            counts[n, naive_bin(value)] += 1
    return counts


def assert_matches_naive(result: dict, expected: dict, post: np.ndarray, normalized: np.ndarray,
                         reference: np.ndarray | None = None) -> None:
    d_mlp = post.shape[-1]
    observed = post.max(axis=(0, 1))
    np.testing.assert_array_equal(result["observed_max"], observed)
    np.testing.assert_array_equal(result["max_activation"], observed if reference is None else reference)
    counts = np.bincount(expected["neuron"], minlength=d_mlp)
    np.testing.assert_array_equal(result["offsets"], np.r_[0, np.cumsum(counts)])
    np.testing.assert_array_equal(result["seq"], expected["seq"])
    np.testing.assert_array_equal(result["pos"], expected["pos"])
    np.testing.assert_array_equal(result["act"], expected["act"])
    np.testing.assert_array_equal(result["pre"], expected["pre"])
    np.testing.assert_array_equal(result["pre_linear"], expected["pre_linear"])
    np.testing.assert_array_equal(result["window"], expected["window"])  # NaN outside the sequence, equal as NaN
    # Vector rows: each example points at the pre-MLP vector of its own (sequence, position)...
    np.testing.assert_array_equal(result["vectors"][result["vector_index"]], expected["vector"])
    np.testing.assert_array_equal(result["vectors"][result["vector_index"]],
                                  normalized[result["seq"], result["pos"]])
    np.testing.assert_array_equal(result["vector_seq"][result["vector_index"]], result["seq"])
    np.testing.assert_array_equal(result["vector_pos"][result["vector_index"]], result["pos"])
    # ...and each (sequence, position) is stored once, with no unused rows.
    keys = result["vector_seq"].astype(np.int64) * post.shape[1] + result["vector_pos"]
    assert len(np.unique(keys)) == len(keys) == len(result["vectors"])
    assert set(result["vector_index"].tolist()) == set(range(len(keys)))
    np.testing.assert_array_equal(result["histogram"], naive_histogram(post))


# --------------------------------------------------------------------------------------------------------------------
# Synthetic activation streams


def make_config(threshold=0.75, max_examples=3, reference_maxima="", interval_count=5, interval_examples=2):
    return config_from_dict({"data_files": ["unused.jsonl"], "threshold": threshold, "max_examples": max_examples,
                             "window_before": WINDOW_BEFORE, "window_after": WINDOW_AFTER,
                             "reference_maxima": reference_maxima, "interval_count": interval_count,
                             "interval_examples": interval_examples})


def random_stream(seed: int, n_seq: int = 40, d_mlp: int = 10, gated: bool = True):
    """Random hook values with varied scales per neuron (a few mostly negative), in float32."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 3.0, size=d_mlp).astype(np.float32)
    shift = rng.uniform(-1.0, 0.5, size=d_mlp).astype(np.float32)
    post = (rng.standard_normal((n_seq, CTX, d_mlp)).astype(np.float32) ** 3 * scale + shift).astype(np.float32)
    pre = rng.standard_normal((n_seq, CTX, d_mlp)).astype(np.float32)
    pre_linear = rng.standard_normal((n_seq, CTX, d_mlp)).astype(np.float32) if gated else None
    normalized = rng.standard_normal((n_seq, CTX, D_MODEL)).astype(np.float32)
    return post, pre, pre_linear, normalized


def crafted_stream(seed: int = 0):
    """Hand-made neurons over 30 sequences, on top of small negative noise:

    0: early sequences reach ~1, then sequence 17 reaches 10: every earlier candidate must be pruned; later
       sequences 20, 22, 25, 28 reach 8, 7.5 (exactly T), 7.4 (just below T) and 9.
    1: steadily rising maxima (every sequence is a candidate when seen, almost all pruned later).
    2: steadily falling maxima: many qualify (> max_examples), the first ones win.
    3: every sequence has the same max 2.0 (ties across sequences): the first max_examples sequences.
    4: all activations negative: no examples.
    5: all activations exactly 0 (a dead ReLU): no examples.
    6: ties within a sequence: the max 5.0 appears at several positions; the first one is the example's position.
    7: maximum at the first and last positions (windows run off both ends of the sequence).
    8: one large spike in the last sequence only.
    9: random noise (mixed signs).
    """
    rng = np.random.default_rng(seed)
    n_seq, d_mlp = 30, 10
    post = (-rng.uniform(0.01, 0.5, size=(n_seq, CTX, d_mlp))).astype(np.float32)
    post[:, :, 0] = rng.uniform(0.0, 1.0, size=(n_seq, CTX))
    post[17, 3, 0] = 10.0
    post[20, 5, 0] = 8.0
    post[22, 0, 0] = 7.5
    post[25, 7, 0] = 7.4
    post[28, 2, 0] = 9.0
    for seq in range(n_seq):
        post[seq, seq % CTX, 1] = 1.0 + 0.1 * seq
        post[seq, (3 * seq) % CTX, 2] = 10.0 - 0.05 * seq
        post[seq, (seq + 2) % CTX, 3] = 2.0
    post[:, :, 5] = 0.0
    post[4, [2, 5, 6], 6] = 5.0
    post[9, [0, 7], 6] = 5.0
    post[11, 4, 6] = 4.9
    post[3, 0, 7] = 6.0
    post[8, CTX - 1, 7] = 6.0
    post[15, 1, 7] = 5.5
    post[n_seq - 1, 4, 8] = 3.0
    post[:, :, 9] = rng.standard_normal((n_seq, CTX))
    pre = rng.standard_normal((n_seq, CTX, d_mlp)).astype(np.float32)
    pre_linear = rng.standard_normal((n_seq, CTX, d_mlp)).astype(np.float32)
    normalized = rng.standard_normal((n_seq, CTX, D_MODEL)).astype(np.float32)
    return post.astype(np.float32), pre, pre_linear, normalized


def batch_bounds(n_seq: int, sizes: list[int]):
    start, i = 0, 0
    while start < n_seq:
        size = sizes[i % len(sizes)]
        yield start, min(start + size, n_seq)
        start += size
        i += 1


def readout(stream, start: int, end: int) -> Readout:
    post, pre, pre_linear, normalized = stream
    return Readout(post=torch.from_numpy(post[start:end]), pre=torch.from_numpy(pre[start:end]),
                   pre_linear=None if pre_linear is None else torch.from_numpy(pre_linear[start:end]),
                   input=torch.from_numpy(normalized[start:end]))


def feed(collector: Collector, layer: int, stream, sizes=(4, 1, 7, 3), compact_after=(), first: int = 0,
         end: int | None = None) -> None:
    """Feed sequences first … end − 1 of `stream` (all by default) in batches of the given sizes."""
    end = len(stream[0]) if end is None else end
    for index, (start, stop) in enumerate(batch_bounds(end - first, list(sizes))):
        collector.update(f"L{layer}", first + start, readout(stream, first + start, first + stop))
        if compact_after == "always" or index in compact_after:
            collector.compact()


def stream_collector(stream, cfg, layers=(0,), reference=None) -> Collector:
    sets = [mlp_layer(layer, stream[0].shape[-1], D_MODEL, gated=stream[2] is not None) for layer in layers]
    return Collector(sets, CTX, cfg.threshold, cfg.max_examples, cfg.window_before, cfg.window_after,
                     None if reference is None else {s.key: reference for s in sets},
                     interval_count=cfg.interval_count, interval_examples=cfg.interval_examples)


def collect_stream(stream, cfg, layer=0, reference=None, **feed_args) -> dict:
    collector = stream_collector(stream, cfg, (layer,), reference)
    feed(collector, layer, stream, **feed_args)
    return collector.finish(f"L{layer}")


def expected_for(stream, cfg, reference=None) -> dict:
    post, pre, pre_linear, normalized = stream
    return naive_examples(post, pre, pre_linear, normalized, cfg.threshold, cfg.max_examples, cfg.window_before,
                          cfg.window_after, reference)


def test_crafted_stream_selects_first_n_qualifying_sequences_like_the_two_pass_definition():
    stream = crafted_stream()
    cfg = make_config(threshold=0.75, max_examples=3)
    result = collect_stream(stream, cfg)
    assert_matches_naive(result, expected_for(stream, cfg), stream[0], stream[3])


def test_late_larger_maximum_prunes_earlier_candidates():
    stream = crafted_stream()
    cfg = make_config(threshold=0.75, max_examples=3)
    result = collect_stream(stream, cfg)
    first, last = result["offsets"][0], result["offsets"][1]
    # Max 10 at sequence 17 → T = 7.5: 17, 20 (8.0) and 22 (exactly 7.5); 25 (7.4) misses, 28 would be 4th.
    assert result["seq"][first:last].tolist() == [17, 20, 22]
    assert result["act"][first:last].tolist() == [10.0, 8.0, 7.5]
    assert result["pos"][first:last].tolist() == [3, 5, 0]
    assert result["max_activation"][0] == 10.0


def test_many_qualifying_sequences_keep_only_the_first_max_examples_in_corpus_order():
    stream = crafted_stream()
    cfg = make_config(threshold=0.75, max_examples=3)
    result = collect_stream(stream, cfg)
    falling = slice(result["offsets"][2], result["offsets"][3])
    assert result["seq"][falling].tolist() == [0, 1, 2]
    equal = slice(result["offsets"][3], result["offsets"][4])
    assert result["seq"][equal].tolist() == [0, 1, 2]
    rising = slice(result["offsets"][1], result["offsets"][2])
    # Rising 1.0 + 0.1·seq up to 3.9: T = 2.925, reached first at sequence 20 (the top three would be 27, 28, 29).
    assert result["seq"][rising].tolist() == [20, 21, 22]


def test_first_n_not_top_n_when_later_sequences_are_higher():
    # Sequences 0..5 reach 6, 8, 7.6, 9, 10, 9.5; T = 7.5 → the first three qualifiers 1, 2, 3, not the top three
    # 4, 5, 3.
    post = np.full((6, CTX, 1), -1.0, np.float32)
    for seq, value in enumerate([6.0, 8.0, 7.6, 9.0, 10.0, 9.5]):
        post[seq, seq, 0] = value
    stream = (post, post.copy(), None, np.arange(6 * CTX * D_MODEL, dtype=np.float32).reshape(6, CTX, D_MODEL))
    cfg = make_config(threshold=0.75, max_examples=3)
    result = collect_stream(stream, cfg, sizes=(1,))
    assert result["seq"].tolist() == [1, 2, 3]
    assert result["pos"].tolist() == [1, 2, 3]
    assert_matches_naive(result, expected_for(stream, cfg), stream[0], stream[3])


def test_neurons_with_maximum_at_or_below_zero_have_no_examples():
    stream = crafted_stream()
    result = collect_stream(stream, make_config())
    for neuron in (4, 5):
        assert result["offsets"][neuron] == result["offsets"][neuron + 1]
    assert result["max_activation"][5] == 0.0 and result["max_activation"][4] < 0


def test_ties_within_a_sequence_use_the_first_position_of_the_maximum():
    stream = crafted_stream()
    result = collect_stream(stream, make_config(threshold=0.75, max_examples=5))
    part = slice(result["offsets"][6], result["offsets"][7])
    assert result["seq"][part].tolist() == [4, 9, 11]
    assert result["pos"][part].tolist() == [2, 0, 4]


def test_windows_are_nan_outside_the_sequence():
    stream = crafted_stream()
    result = collect_stream(stream, make_config(threshold=0.75, max_examples=5))
    part = slice(result["offsets"][7], result["offsets"][8])
    assert result["seq"][part].tolist() == [3, 8, 15]
    at_start, at_end = result["window"][part][0], result["window"][part][1]
    assert np.isnan(at_start[:WINDOW_BEFORE]).all() and at_start[WINDOW_BEFORE] == 6.0
    assert not np.isnan(at_start[WINDOW_BEFORE:]).any()
    assert at_end[WINDOW_BEFORE] == 6.0 and np.isnan(at_end[WINDOW_BEFORE + 1:]).all()
    np.testing.assert_array_equal(at_end[:WINDOW_BEFORE], stream[0][8, CTX - 1 - WINDOW_BEFORE:CTX - 1, 7])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold,max_examples", [(0.75, 1), (0.75, 4), (0.3, 6), (1.0, 2)])
def test_random_streams_match_the_two_pass_definition(seed, threshold, max_examples):
    stream = random_stream(seed, gated=seed % 2 == 0)
    cfg = make_config(threshold=threshold, max_examples=max_examples)
    result = collect_stream(stream, cfg, sizes=(seed + 1, 5, 2))
    assert_matches_naive(result, expected_for(stream, cfg), stream[0], stream[3])


@pytest.mark.parametrize("before,after", [(0, 0), (0, 3), (5, 0), (12, 10)])
def test_windows_of_any_width_match_the_two_pass_definition(before, after):
    stream = random_stream(21)
    cfg = config_from_dict({"data_files": ["unused.jsonl"], "max_examples": 4, "window_before": before,
                            "window_after": after})
    result = collect_stream(stream, cfg)
    assert result["window"].shape == (len(result["seq"]), before + 1 + after)
    assert_matches_naive(result, expected_for(stream, cfg), stream[0], stream[3])


def test_plain_mlp_stream_records_zero_pre_linear():
    stream = random_stream(11, gated=False)
    result = collect_stream(stream, make_config(max_examples=4))
    assert len(result["seq"]) > 0
    assert (result["pre_linear"] == 0).all()


def test_one_example_per_neuron_and_sequence():
    # Several positions above T in the same sequence (and many sequences) still give one example per sequence.
    stream = random_stream(7, n_seq=30)
    post = stream[0]
    # Neuron 2 lies in [5, 6) everywhere, so with threshold 0.5 every position of every sequence qualifies.
    post[:, :, 2] = 5.0 + np.random.default_rng(0).uniform(0.0, 1.0, size=post.shape[:2])
    cfg = make_config(threshold=0.5, max_examples=50)
    result = collect_stream(stream, cfg)
    neurons = np.repeat(np.arange(post.shape[-1]), np.diff(result["offsets"]))
    pairs = set(zip(neurons.tolist(), result["seq"].tolist()))
    assert len(pairs) == len(result["seq"])
    part = slice(result["offsets"][2], result["offsets"][3])
    assert result["seq"][part].tolist() == list(range(30))
    assert_matches_naive(result, expected_for(stream, cfg), stream[0], stream[3])


def test_examples_are_grouped_by_neuron_in_corpus_order():
    stream = random_stream(3)
    result = collect_stream(stream, make_config(threshold=0.3, max_examples=6))
    for neuron in range(stream[0].shape[-1]):
        seqs = result["seq"][result["offsets"][neuron]:result["offsets"][neuron + 1]]
        assert (np.diff(seqs) > 0).all()


@pytest.mark.parametrize("schedule", ["always", (0,), (1, 2, 5), (3, 4, 6, 7, 9)])
def test_compaction_schedule_does_not_change_the_result(schedule):
    for stream in (crafted_stream(), random_stream(5), random_stream(6, gated=False)):
        cfg = make_config(threshold=0.6, max_examples=3)
        never = collect_stream(stream, cfg, compact_after=())
        other = collect_stream(stream, cfg, compact_after=schedule)
        assert_equal_arrays(never, other)
        assert_matches_naive(other, expected_for(stream, cfg), stream[0], stream[3])


def test_batch_sizes_do_not_change_the_result():
    stream = random_stream(8)
    cfg = make_config(threshold=0.5, max_examples=4)
    assert_equal_arrays(collect_stream(stream, cfg, sizes=(1,)), collect_stream(stream, cfg, sizes=(40,)))


def test_layers_keep_separate_state():
    first, second = random_stream(1), random_stream(2)
    cfg = make_config(max_examples=3)
    collector = stream_collector(first, cfg, (0, 3))
    feed(collector, 0, first)
    feed(collector, 3, second)
    assert_matches_naive(collector.finish("L0"), expected_for(first, cfg), first[0], first[3])
    assert_matches_naive(collector.finish("L3"), expected_for(second, cfg), second[0], second[3])


def late_maximum_stream(seed: int):
    """A random stream whose last sequences hold a much larger maximum for every other neuron."""
    stream = random_stream(seed, n_seq=36)
    post = stream[0]
    post[33, 2, ::2] = post.max(axis=(0, 1))[::2] * 4 + 1
    return stream


def sharded_result(stream, cfg, bounds: list[int], reference=None, reverse: bool = False,
                   order: tuple[int, ...] | None = None) -> dict:
    """Each shard (sequences bounds[i] … bounds[i + 1] − 1) collected by its own collector and stored as state
    arrays, then absorbed by a fresh collector (in corpus order, reversed, or in the given order of shards)."""
    states = []
    for first, end in zip(bounds[:-1], bounds[1:]):
        shard = stream_collector(stream, cfg, reference=reference)
        feed(shard, 0, stream, first=first, end=end)
        states.append({name: value.copy() for name, value in shard.state_arrays().items()})
    merged = stream_collector(stream, cfg, reference=reference)
    if order is not None:
        states = [states[i] for i in order]
    for state in (states[::-1] if reverse else states):
        merged.absorb(state)
    return merged.finish("L0")


SPLITS = {1: [0, 36], 2: [0, 20, 36], 3: [0, 11, 30, 36]}


@pytest.mark.parametrize("n_shards", [1, 2, 3])
@pytest.mark.parametrize("reverse", [False, True])
def test_merging_shards_equals_the_unsplit_pass_even_with_a_late_larger_maximum(n_shards, reverse):
    for seed, (threshold, max_examples) in enumerate([(0.5, 3), (0.75, 1), (0.3, 6)]):
        stream = late_maximum_stream(seed)
        cfg = make_config(threshold=threshold, max_examples=max_examples)
        unsplit = collect_stream(stream, cfg)
        merged = sharded_result(stream, cfg, SPLITS[n_shards], reverse=reverse)
        assert_equal_arrays(merged, unsplit)
        assert_matches_naive(merged, expected_for(stream, cfg), stream[0], stream[3])
        # The late maximum really is late: the last shard raises every even neuron's maximum.
        if n_shards > 1:
            early = stream[0][:SPLITS[n_shards][-2]].max(axis=(0, 1))
            assert (merged["max_activation"][::2] > early[::2]).all()


@pytest.mark.parametrize("n_shards", [2, 3])
def test_merging_shards_with_reference_maxima_equals_the_unsplit_pass(n_shards):
    stream = late_maximum_stream(7)
    reference = (stream[0].max(axis=(0, 1)) * 0.9).astype(np.float32)
    cfg = make_config(threshold=0.5, max_examples=3)
    merged = sharded_result(stream, cfg, SPLITS[n_shards], reference=reference)
    assert_equal_arrays(merged, collect_stream(stream, cfg, reference=reference))


# --------------------------------------------------------------------------------------------------------------------
# keep_first_needed: the pruning rule on its own


def brute_keep_first_needed(neuron, act, max_examples):
    keep = np.ones(len(neuron), bool)
    for i in range(len(neuron)):
        dominating = sum(1 for j in range(i) if neuron[j] == neuron[i] and act[j] >= act[i])
        keep[i] = dominating < max_examples
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_keep_first_needed_drops_exactly_candidates_dominated_by_max_examples_earlier_ones(seed):
    rng = np.random.default_rng(seed)
    n = 300
    neuron = rng.integers(0, 4, size=n).astype(np.int32)
    act = rng.integers(0, 12, size=n).astype(np.float32)  # many exact ties
    for max_examples in (1, 3, 10):
        np.testing.assert_array_equal(keep_first_needed(torch.from_numpy(neuron), torch.from_numpy(act),
                                                        max_examples).numpy(),
                                      brute_keep_first_needed(neuron, act, max_examples))


def test_keep_first_needed_handles_groups_longer_than_its_block_size():
    rng = np.random.default_rng(0)
    n = 5000
    neuron = np.zeros(n, np.int32)
    act = rng.standard_normal(n).astype(np.float32)
    keep = keep_first_needed(torch.from_numpy(neuron), torch.from_numpy(act), 3).numpy()
    # Brute force in O(n log n): dominating count = number of earlier values ≥ this one.
    counts = np.array([(act[:i] >= act[i]).sum() for i in range(n)])
    np.testing.assert_array_equal(keep, counts < 3)


# --------------------------------------------------------------------------------------------------------------------
# Reference maxima


def test_reference_maxima_fix_the_threshold_and_stop_each_neuron_at_max_examples():
    stream = random_stream(4, n_seq=40)
    d_mlp = stream[0].shape[-1]
    observed = stream[0].max(axis=(0, 1))
    # Some below, some above the observed max, one negative and one zero reference.
    reference = (observed * np.linspace(0.4, 1.6, d_mlp)).astype(np.float32)
    reference[1], reference[2] = -1.0, 0.0
    cfg = make_config(threshold=0.75, max_examples=4)
    result = collect_stream(stream, cfg, layer=1, reference=reference)
    expected = naive_examples(*stream, cfg.threshold, cfg.max_examples, cfg.window_before, cfg.window_after,
                              reference)
    assert_matches_naive(result, expected, stream[0], stream[3], reference=reference)
    counts = np.diff(result["offsets"])
    assert counts.max() == cfg.max_examples
    assert counts[1] == counts[2] == 0
    for neuron in range(d_mlp):
        part = slice(result["offsets"][neuron], result["offsets"][neuron + 1])
        assert (result["act"][part] >= np.float32(0.75) * reference[neuron]).all()


def test_reference_above_every_activation_gives_no_examples():
    stream = random_stream(4)
    reference = stream[0].max(axis=(0, 1)) * 2 + 1
    result = collect_stream(stream, make_config(), reference=reference.astype(np.float32))
    assert len(result["seq"]) == 0 and (result["offsets"] == 0).all()


# --------------------------------------------------------------------------------------------------------------------
# Interval examples: the first sequences of each interval below the threshold


def naive_interval_examples(post: np.ndarray, threshold: float, n_intervals: int, per_interval: int,
                            reference: np.ndarray | None = None) -> dict:
    """Two passes: M and T = threshold·M as for the examples; then per neuron walk the sequences in corpus order and
    put each whose max v lies in [0, T) into interval floor(v·n / T) (float64, at most n − 1) until it holds
    per_interval. M ≤ 0: none."""
    n_seq, _, d_mlp = post.shape
    maxima = post.max(axis=(0, 1)) if reference is None else reference
    shape = (d_mlp, n_intervals, per_interval)
    out = {"interval_seq": np.full(shape, -1, np.int32), "interval_pos": np.full(shape, -1, np.int32),
           "interval_act": np.full(shape, np.nan, np.float32)}
    for neuron in range(d_mlp):
        if maxima[neuron] <= 0:
            continue
        limit = np.float32(threshold) * np.float32(maxima[neuron])
        filled = [0] * n_intervals
        for seq in range(n_seq):
            values = post[seq, :, neuron]
            value = values.max()
            if value < 0 or value >= limit:
                continue
            interval = int(min(np.floor(np.float64(value) * n_intervals / np.float64(limit)), n_intervals - 1))
            if filled[interval] == per_interval:
                continue
            slot = filled[interval]
            out["interval_seq"][neuron, interval, slot] = seq
            out["interval_pos"][neuron, interval, slot] = int(np.argmax(values))
            out["interval_act"][neuron, interval, slot] = value
            filled[interval] += 1
    return out


def assert_intervals_match_naive(result: dict, stream, cfg, reference=None) -> None:
    expected = naive_interval_examples(stream[0], cfg.threshold, cfg.interval_count, cfg.interval_examples, reference)
    for name, values in expected.items():
        assert result[name].dtype == values.dtype, name
        np.testing.assert_array_equal(result[name], values, err_msg=name)  # NaN where empty, equal as NaN


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold,n_intervals,per_interval", [(0.75, 5, 2), (0.5, 1, 3), (0.3, 7, 1), (1.0, 3, 4)])
def test_interval_examples_match_the_two_pass_definition(seed, threshold, n_intervals, per_interval):
    cfg = make_config(threshold=threshold, interval_count=n_intervals, interval_examples=per_interval)
    for stream in (random_stream(seed, gated=seed % 2 == 0), crafted_stream(seed), late_maximum_stream(seed)):
        result = collect_stream(stream, cfg, sizes=(seed + 1, 5, 2))
        assert result["interval_seq"].shape == (stream[0].shape[-1], n_intervals, per_interval)
        assert_intervals_match_naive(result, stream, cfg)
        assert_matches_naive(result, expected_for(stream, cfg), stream[0], stream[3])


def test_interval_examples_are_chosen_against_the_late_larger_maximum():
    # Neuron 0: early sequences reach at most 1 until 17 reaches 10 (T = 7.5, intervals of 1.5). The early ones all
    # land in [0, 1.5); 25 (7.4) in [6, 7.5); 22 (exactly T) is an example, not an interval example.
    stream = crafted_stream()
    result = collect_stream(stream, make_config(threshold=0.75, interval_count=5, interval_examples=2))
    assert result["interval_seq"][0].tolist() == [[0, 1], [-1, -1], [-1, -1], [-1, -1], [25, -1]]
    assert result["interval_pos"][0, 4, 0] == 7 and result["interval_act"][0, 4, 0] == np.float32(7.4)
    np.testing.assert_array_equal(result["interval_act"][0, 0], stream[0][[0, 1], :, 0].max(axis=1))
    # Neurons whose maximum is ≤ 0 have no interval examples either.
    assert (result["interval_seq"][[4, 5]] == -1).all() and np.isnan(result["interval_act"][[4, 5]]).all()


def test_interval_boundaries_belong_to_the_upper_interval_and_the_threshold_to_none():
    # One neuron, M = 10, threshold 0.5: T = 5 and intervals [0, 1), [1, 2), … [4, 5). Values exactly on an edge go up;
    # 5.0 (= T) and negative maxima are excluded; 0.0 is included.
    values = [10.0, 0.0, 1.0, 0.999, 2.0, 5.0, -0.5, 4.9999, 3.0, 1.5, 0.5]
    post = np.full((len(values), CTX, 1), -1.0, np.float32)
    for seq, value in enumerate(values):
        post[seq, seq % CTX, 0] = value
    stream = (post, post.copy(), None, np.zeros((len(values), CTX, D_MODEL), np.float32))
    cfg = make_config(threshold=0.5, interval_count=5, interval_examples=3)
    result = collect_stream(stream, cfg, sizes=(2,))
    assert result["interval_seq"][0].tolist() == [[1, 3, 10], [2, 9, -1], [4, -1, -1], [8, -1, -1], [7, -1, -1]]
    assert_intervals_match_naive(result, stream, cfg)


def test_interval_examples_with_reference_maxima_match_the_two_pass_definition():
    stream = late_maximum_stream(4)
    observed = stream[0].max(axis=(0, 1))
    reference = (observed * np.linspace(0.4, 1.6, len(observed))).astype(np.float32)
    reference[1], reference[2] = -1.0, 0.0
    cfg = make_config(threshold=0.75, interval_count=4, interval_examples=3)
    result = collect_stream(stream, cfg, reference=reference)
    assert_intervals_match_naive(result, stream, cfg, reference)
    assert (result["interval_seq"][[1, 2]] == -1).all()
    filled = result["interval_seq"] >= 0
    assert filled.any()
    units = np.nonzero(filled)[0]
    assert (result["interval_act"][filled] < np.float32(0.75) * reference[units]).all()  # T from the reference


@pytest.mark.parametrize("n_shards,order", [(1, None), (2, None), (2, "reversed"), (3, None), (3, "reversed"),
                                            (3, (1, 0, 2)), (3, (2, 0, 1))])
def test_merged_shards_give_the_two_pass_interval_examples_even_with_a_late_larger_maximum(n_shards, order):
    for seed, (threshold, n_intervals, per_interval) in enumerate([(0.5, 5, 2), (0.75, 3, 1), (0.3, 6, 3)]):
        stream = late_maximum_stream(seed)
        cfg = make_config(threshold=threshold, interval_count=n_intervals, interval_examples=per_interval)
        merged = sharded_result(stream, cfg, SPLITS[n_shards], reverse=order == "reversed",
                                order=order if isinstance(order, tuple) else None)
        assert_equal_arrays(merged, collect_stream(stream, cfg))
        assert_intervals_match_naive(merged, stream, cfg)
        assert_matches_naive(merged, expected_for(stream, cfg), stream[0], stream[3])


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_merged_shards_with_reference_maxima_give_the_two_pass_interval_examples(n_shards):
    stream = late_maximum_stream(7)
    reference = (stream[0].max(axis=(0, 1)) * 0.9).astype(np.float32)
    cfg = make_config(threshold=0.5, interval_count=5, interval_examples=2)
    merged = sharded_result(stream, cfg, SPLITS[n_shards], reference=reference, reverse=True)
    assert_intervals_match_naive(merged, stream, cfg, reference)
    assert_equal_arrays(merged, collect_stream(stream, cfg, reference=reference))


def test_shard_state_records_every_sequences_max_and_first_position():
    stream = random_stream(2)
    cfg = make_config()
    shard = stream_collector(stream, cfg)
    feed(shard, 0, stream, first=11, end=30, sizes=(4, 7))
    state = shard.state_arrays()
    np.testing.assert_array_equal(state["L0.seq_ids"], np.arange(11, 30))
    np.testing.assert_array_equal(state["L0.seq_max"], stream[0][11:30].max(axis=1))
    np.testing.assert_array_equal(state["L0.seq_argmax"], stream[0][11:30].argmax(axis=1))
    assert state["L0.seq_max"].dtype == np.float32 and state["L0.seq_argmax"].dtype == np.int32


def test_zero_interval_examples_records_nothing_and_gives_empty_arrays():
    stream = random_stream(3)
    cfg = make_config(interval_count=4, interval_examples=0)
    collector = stream_collector(stream, cfg)
    feed(collector, 0, stream)
    assert collector.state_arrays()["L0.seq_max"].shape == (0, stream[0].shape[-1])
    result = collector.finish("L0")
    assert result["interval_seq"].shape == result["interval_act"].shape == (stream[0].shape[-1], 4, 0)
    assert_matches_naive(result, expected_for(stream, cfg), stream[0], stream[3])


# --------------------------------------------------------------------------------------------------------------------
# The histogram, the first maximum, insertion-time pruning and device discipline


def edge_case_values() -> np.ndarray:
    """Every edge, the floats just beside each, ±0, subnormals, the extremes and heavy-tailed random values."""
    edges = HISTOGRAM_EDGES
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-39, -1e-39, 1.2e-38, -1.2e-38, np.inf, -np.inf,
                        np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e6, -1e6], np.float32)
    beside = np.concatenate([np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(-np.inf))])
    rng = np.random.default_rng(0)
    heavy = (rng.standard_t(2, size=2000) * np.exp(rng.normal(0, 2, size=2000))).astype(np.float32)
    return np.concatenate([edges, beside, special, heavy]).astype(np.float32)


@pytest.mark.parametrize("kernel", ["compiled", "torch"])
@pytest.mark.parametrize("variant", ["plain", "folding every batch", "int64 keys"])
def test_histogram_matches_a_literal_per_value_reference(monkeypatch, variant, kernel):
    monkeypatch.setattr(collect, "HISTOGRAM_KERNEL", kernel)  # a CPU's compiled loop, and every other device's ops
    if variant == "folding every batch":
        monkeypatch.setattr(collect, "FOLD_EVERY", CTX)  # int32 counters folded before every batch
    if variant == "int64 keys":
        monkeypatch.setattr(collect, "_INT32_MAX", 500)  # int64 indices and counters, as for > 1M units (both kernels)
    values = edge_case_values()
    d_mlp = 7
    n_seq = -(-len(values) // (CTX * d_mlp))
    post = np.resize(values, (n_seq, CTX, d_mlp)).astype(np.float32)
    post[0, 0, :] = 1.0  # every unit has a positive maximum: the histogram must not depend on that
    stream = (post, np.zeros_like(post), None, np.zeros((n_seq, CTX, D_MODEL), np.float32))
    result = collect_stream(stream, make_config(), sizes=(1, 2))
    np.testing.assert_array_equal(result["histogram"], naive_histogram(post))
    assert result["histogram"].sum() == post.size
    np.testing.assert_array_equal(result["histogram_edges"], HISTOGRAM_EDGES)


def test_histogram_key_bins_need_edges_on_key_boundaries():
    assert np.array_equal(collect.histogram_key_bins(HISTOGRAM_EDGES), collect.KEY_BINS)
    with pytest.raises(ValueError, match="2 mantissa bits"):
        collect.histogram_key_bins(np.array([-0.01, 0.0, 0.01], np.float32))


@pytest.mark.parametrize("kernel", ["compiled", "torch"])
@pytest.mark.parametrize("context", [8, 37, 64, 96])
def test_sequence_maxima_give_the_first_position_of_the_maximum(monkeypatch, context, kernel):
    monkeypatch.setattr(collect, "HISTOGRAM_KERNEL", kernel)
    rng = np.random.default_rng(context)
    post = rng.integers(0, 4, size=(5, context, 6)).astype(np.float32)  # many ties, across position blocks too
    post[1, :, 2] = 3.0
    post[2, [0, context - 1], 3] = 9.0
    post[3, :, 4] = -np.inf
    post[4, context // 2, 5] = np.nan  # NaN's max is NaN at position 0, as torch gives
    counts, _ = collect.histogram_counters(6, torch.device("cpu"))
    seq_max, argmax = collect.scan_batch(torch.from_numpy(post), counts)
    expected = post.max(axis=1)
    np.testing.assert_array_equal(seq_max.numpy(), expected)  # NaN equals NaN here
    first = post.argmax(axis=1)  # numpy: the first maximal position
    first[np.isnan(expected)] = 0
    np.testing.assert_array_equal(argmax.numpy(), first)
    assert argmax.dtype == torch.int64 and int(counts.sum()) == post.size


@pytest.mark.parametrize("reference", [False, True])
def test_batches_out_of_corpus_order_give_the_two_pass_result(reference):
    """Batches fed out of order cannot be pruned against earlier ones when they arrive: compaction applies the rule
    (and must still give the two-pass definition, intervals included)."""
    stream = late_maximum_stream(3)
    ref = (stream[0].max(axis=(0, 1)) * 0.8).astype(np.float32) if reference else None
    cfg = make_config(threshold=0.5, max_examples=3)
    collector = stream_collector(stream, cfg, reference=ref)
    bounds = list(batch_bounds(len(stream[0]), [5, 3, 7]))
    for start, stop in [bounds[i] for i in np.random.default_rng(0).permutation(len(bounds))]:
        collector.update("L0", start, readout(stream, start, stop))
    result = collector.finish("L0")
    assert_matches_naive(result, expected_for(stream, cfg, ref), stream[0], stream[3], reference=ref)
    assert_intervals_match_naive(result, stream, cfg, ref)
    assert_equal_arrays(result, collect_stream(stream, cfg, reference=ref))


def test_compaction_inside_update_and_absorb_does_not_change_the_result(monkeypatch):
    stream = late_maximum_stream(5)
    cfg = make_config(threshold=0.5, max_examples=2)
    expected = collect_stream(stream, cfg)
    monkeypatch.setattr(collect, "COMPACT_PENDING", 1)  # compact after every batch and every absorbed shard
    assert_equal_arrays(collect_stream(stream, cfg), expected)
    assert_equal_arrays(sharded_result(stream, cfg, SPLITS[3], reverse=True), expected)


def test_insertion_pruning_stores_only_candidates_that_compaction_would_keep():
    """The dominance rule applied as batches arrive leaves nothing for compaction to drop but what a rising maximum
    prunes: the kept candidates equal those of pruning everything at the end."""
    stream = random_stream(9, n_seq=60)
    cfg = make_config(threshold=0.3, max_examples=2)
    collector = stream_collector(stream, cfg)
    feed(collector, 0, stream)
    state = collector.states["L0"]
    stored = sum(len(c["unit"]) for c in state.pending)
    collector.compact()
    kept = collector.state_arrays()
    unit, seq = kept["L0.c.unit"], kept["L0.c.seq"]
    post = stream[0]
    maxima = post.max(axis=(0, 1))
    seq_max = post.max(axis=1)  # [seq, unit]
    alive = (seq_max >= np.float32(cfg.threshold) * maxima) & (maxima > 0)
    earlier_dominating = np.array([[(seq_max[:s, u] >= seq_max[s, u]).sum() for u in range(post.shape[-1])]
                                   for s in range(len(post))])
    expected = np.argwhere((alive & (earlier_dominating < cfg.max_examples)).T)  # (unit, seq), sorted
    np.testing.assert_array_equal(np.stack([unit, seq], axis=1), expected)
    assert stored < len(post) * post.shape[-1] // 2  # most pairs never stored


TRANSFERS = ("cpu", "numpy", "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__array__")


def transfers_per_update(monkeypatch, d_mlp: int) -> tuple[list[int], int]:
    """Device-to-host transfers (every Tensor method that yields host data) during each `update`, and during
    `state_arrays`, for a stream with d_mlp units."""
    stream = random_stream(4, n_seq=40, d_mlp=d_mlp)
    collector = stream_collector(stream, make_config(threshold=0.5, max_examples=3))
    calls = [0]
    with monkeypatch.context() as patch:
        for name in TRANSFERS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, **kwargs):
                calls[0] += 1
                return _original(self, *args, **kwargs)
            patch.setattr(torch.Tensor, name, counted)
        per_batch = []
        for start, stop in batch_bounds(len(stream[0]), [4, 1, 7, 3]):
            batch = readout(stream, start, stop)
            calls[0] = 0
            collector.update("L0", start, batch)
            per_batch.append(calls[0])
        calls[0] = 0
        collector.state_arrays()
        at_end = calls[0]
    return per_batch, at_end


def test_update_makes_a_constant_number_of_host_transfers_independent_of_the_number_of_units(monkeypatch):
    # The torch ops a GPU runs (a CPU's compiled histogram loop takes numpy views of CPU memory, which copy nothing).
    monkeypatch.setattr(collect, "HISTOGRAM_KERNEL", "torch")
    few, few_end = transfers_per_update(monkeypatch, 8)
    many, many_end = transfers_per_update(monkeypatch, 96)
    assert few == many and len(set(few)) == 1 and few[0] <= 2, (few, many)
    # The counter sees real transfers: taking the state moves it to the host, a constant number of times.
    assert few_end == many_end > 0


TWO_LAYERS = [mlp_layer(0, 7, D_MODEL, False), mlp_layer(1, 7, D_MODEL, False)]


@pytest.mark.parametrize("shape", [(7,), (7, 2), (3, 7), (2, 8), (1, 2, 7)])
def test_load_reference_maxima_rejects_a_wrong_shape(tmp_path, shape):
    path = tmp_path / "maxima.npy"
    np.save(path, np.ones(shape, np.float32))
    cfg = config_from_dict({"data_files": ["x.jsonl"], "reference_maxima": str(path)})
    expect_error(ConfigError, lambda: load_reference_maxima(cfg, TWO_LAYERS, n_layers=2), "shape [2, 7]",
                 "L0: [7]")


def test_load_reference_maxima_rejects_non_finite_values(tmp_path):
    path = tmp_path / "maxima.npy"
    values = np.ones((2, 7), np.float32)
    values[1, 3] = np.nan
    np.save(path, values)
    cfg = config_from_dict({"data_files": ["x.jsonl"], "reference_maxima": str(path)})
    expect_error(ConfigError, lambda: load_reference_maxima(cfg, TWO_LAYERS, n_layers=2), "finite")


def test_load_reference_maxima_reads_one_array_per_subject_set_from_an_npz(tmp_path):
    path = tmp_path / "maxima.npz"
    np.savez(path, L0=np.arange(7.0), L1=np.arange(7.0) + 10, L5=np.zeros(3))
    cfg = config_from_dict({"data_files": ["x.jsonl"], "reference_maxima": str(path)})
    loaded = load_reference_maxima(cfg, TWO_LAYERS, n_layers=2)
    assert sorted(loaded) == ["L0", "L1"] and loaded["L1"].dtype == np.float32
    np.testing.assert_array_equal(loaded["L1"], np.arange(7.0) + 10)


@pytest.mark.parametrize("arrays, phrase", [({"L0": np.ones(7)}, "no array 'L1'"),
                                            ({"L0": np.ones(7), "L1": np.ones(6)}, "L1 must be finite"),
                                            ({"maxima": np.ones((2, 7))}, "no array 'L0'")])
def test_load_reference_maxima_npz_must_hold_every_set_with_its_size(tmp_path, arrays, phrase):
    path = tmp_path / "maxima.npz"
    np.savez(path, **arrays)
    cfg = config_from_dict({"data_files": ["x.jsonl"], "reference_maxima": str(path)})
    expect_error(ConfigError, lambda: load_reference_maxima(cfg, TWO_LAYERS, n_layers=2), phrase)


def test_load_reference_maxima_rejects_a_missing_file(tmp_path):
    cfg = config_from_dict({"data_files": ["x.jsonl"], "reference_maxima": str(tmp_path / "nope.npy")})
    expect_error(ConfigError, lambda: load_reference_maxima(cfg, TWO_LAYERS, n_layers=2), "reference_maxima")


def test_load_reference_maxima_reads_a_matching_array_and_none_when_unset(tmp_path):
    path = tmp_path / "maxima.npy"
    values = np.arange(14, dtype=np.float64).reshape(2, 7)
    np.save(path, values)
    cfg = config_from_dict({"data_files": ["x.jsonl"], "reference_maxima": str(path)})
    loaded = load_reference_maxima(cfg, TWO_LAYERS, n_layers=2)
    assert loaded["L0"].dtype == np.float32
    np.testing.assert_array_equal(loaded["L1"], values[1])
    assert load_reference_maxima(config_from_dict({"data_files": ["x.jsonl"]}), TWO_LAYERS, 2) is None


# --------------------------------------------------------------------------------------------------------------------
# The collect stage on the tiny models


def read_set_npz(out_dir: Path, layer: int) -> dict[str, np.ndarray]:
    with np.load(Path(out_dir) / "collect" / f"L{layer}.npz", allow_pickle=False) as bundle:
        return {name: bundle[name] for name in bundle.files}


def all_hooks(model, tokens: np.ndarray, layers: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {hook: values for every sequence}} from one full forward pass with the bridge's run_with_cache (all
    sequences in one batch, all layers, no stop_at_layer: nothing shared with collect's hooked pass)."""
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))
    out = {}
    for layer in layers:
        out[layer] = {hook: cache[f"blocks.{layer}.{hook}"].float().numpy()
                      for hook in ("mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear", "ln2.hook_normalized")
                      if f"blocks.{layer}.{hook}" in cache}
    return out


@pytest.fixture(scope="module")
def collected(tmp_path_factory, tiny_models, corpus_file):
    """The collect stage on both tiny models (plain and gated), with the loaded model for independent
    recomputation."""
    from builder.models import load_model

    runs = {}
    for kind, folder in tiny_models.items():
        cfg = config_from_dict(tiny_config_dict(folder, corpus_file, tmp_path_factory.mktemp(f"collect-{kind}")))
        run_stage("collect", cfg)
        model = load_model(cfg)
        tokens = read_tokens(AtlasPaths.of(cfg))
        runs[kind] = (cfg, model, tokens, all_hooks(model, tokens, [0, 1]))
    return runs


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_run_records_act_as_max_over_positions_of_hook_post(collected, kind):
    cfg, model, tokens, hooks = collected[kind]
    assert model.gated == (kind == "llama")
    meta = read_collect_meta(AtlasPaths.of(cfg))
    assert meta["gated"] == model.gated and meta["layers"] == [0, 1]
    assert [s["key"] for s in meta["subject_sets"]] == ["L0", "L1"]
    assert meta["n_sequences"] == len(tokens) > 50
    for layer in (0, 1):
        examples = read_examples(AtlasPaths.of(cfg), f"L{layer}")
        post = hooks[layer]["mlp.hook_post"]
        assert len(examples.seq) > 0
        neurons = np.repeat(np.arange(model.d_mlp), np.diff(examples.offsets))
        np.testing.assert_allclose(examples.act, post[examples.seq, :, neurons].max(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(examples.act, post[examples.seq, examples.pos, neurons], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(examples.pre, hooks[layer]["mlp.hook_pre"][examples.seq, examples.pos, neurons],
                                   rtol=1e-5, atol=1e-5)
        if model.gated:
            np.testing.assert_allclose(examples.pre_linear,
                                       hooks[layer]["mlp.hook_pre_linear"][examples.seq, examples.pos, neurons],
                                       rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(examples.vectors[examples.vector_index],
                                   hooks[layer]["ln2.hook_normalized"][examples.seq, examples.pos],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(examples.max_activation, post.max(axis=(0, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_run_selects_the_same_examples_as_the_two_pass_definition_on_recomputed_hooks(collected, kind):
    cfg, model, tokens, hooks = collected[kind]
    assert len(tokens) > 2 * cfg.shard_sequences  # the stage really merged several shards
    for layer in (0, 1):
        examples = read_examples(AtlasPaths.of(cfg), f"L{layer}")
        h = hooks[layer]
        expected = naive_examples(h["mlp.hook_post"], h["mlp.hook_pre"], h.get("mlp.hook_pre_linear"),
                                  h["ln2.hook_normalized"], cfg.threshold, cfg.max_examples, cfg.window_before,
                                  cfg.window_after)
        np.testing.assert_array_equal(np.diff(examples.offsets), np.bincount(expected["neuron"],
                                                                             minlength=model.d_mlp))
        np.testing.assert_array_equal(examples.seq, expected["seq"])
        np.testing.assert_array_equal(examples.pos, expected["pos"])
        np.testing.assert_allclose(examples.window, expected["window"], rtol=1e-5, atol=1e-6)
        assert np.diff(examples.offsets).max() == cfg.max_examples


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_run_records_interval_examples_in_their_intervals_at_the_sequence_maximum(collected, kind):
    cfg, model, tokens, hooks = collected[kind]
    n, k = cfg.interval_count, cfg.interval_examples
    assert read_collect_meta(AtlasPaths.of(cfg))["interval_count"] == n
    for layer in (0, 1):
        examples = read_examples(AtlasPaths.of(cfg), f"L{layer}")
        post = hooks[layer]["mlp.hook_post"]
        assert examples.interval_seq.shape == examples.interval_pos.shape == examples.interval_act.shape \
            == (model.d_mlp, n, k)
        assert examples.interval_seq.dtype == examples.interval_pos.dtype == np.int32
        assert examples.interval_act.dtype == np.float32
        filled = examples.interval_seq >= 0
        assert filled.any() and (filled == (examples.interval_pos >= 0)).all()
        assert (filled == ~np.isnan(examples.interval_act)).all()
        units, intervals, _ = np.nonzero(filled)
        seq, pos, act = examples.interval_seq[filled], examples.interval_pos[filled], examples.interval_act[filled]
        limit = np.float32(cfg.threshold) * examples.max_activation[units]
        assert (examples.max_activation[units] > 0).all()
        assert ((act >= 0) & (act < limit)).all()
        in_interval = np.minimum(np.floor(act.astype(np.float64) * n / limit.astype(np.float64)), n - 1)
        np.testing.assert_array_equal(in_interval, intervals)
        np.testing.assert_allclose(act, post[seq, pos, units], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(act, post[seq, :, units].max(axis=1), rtol=1e-5, atol=1e-6)
        # Per unit and interval: filled from the first slot, distinct sequences in corpus order.
        assert (filled[..., :-1] >= filled[..., 1:]).all()
        assert (np.diff(examples.interval_seq, axis=2)[filled[..., 1:]] > 0).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_run_hook_pre_matches_the_hugging_face_model_directly(collected, kind):
    """hook_pre/hook_pre_linear as recorded equal the HF model's own MLP input projections (no TransformerLens)."""
    from transformers import AutoModelForCausalLM

    cfg, model, tokens, _ = collected[kind]
    hf = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
    for layer in (0, 1):
        if kind == "gpt2":
            modules = {"pre": hf.transformer.h[layer].mlp.c_fc}
        else:
            modules = {"pre": hf.model.layers[layer].mlp.gate_proj, "pre_linear": hf.model.layers[layer].mlp.up_proj}
        captured = {}
        handles = [module.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out))
                   for key, module in modules.items()]
        with torch.no_grad():
            hf(torch.as_tensor(tokens, dtype=torch.long))
        for handle in handles:
            handle.remove()
        examples = read_examples(AtlasPaths.of(cfg), f"L{layer}")
        neurons = np.repeat(np.arange(model.d_mlp), np.diff(examples.offsets))
        for key, values in captured.items():
            np.testing.assert_allclose(getattr(examples, key), values.numpy()[examples.seq, examples.pos, neurons],
                                       rtol=1e-4, atol=1e-5)


def test_run_records_packing_and_provenance(collected, tokenizer):
    cfg, model, tokens, _ = collected["gpt2"]
    meta = read_collect_meta(AtlasPaths.of(cfg))
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert tokens.shape[1] == cfg.context_length == meta["context_length"]
    assert meta["packing"]["separator_token_id"] == tokenizer.eos_token_id
    assert meta["packing"]["n_documents"] == len(CORPUS_PARAGRAPHS)
    assert meta["forwarded_sequences_last_run"] == len(tokens)
    assert meta["n_shards"] == -(-len(tokens) // cfg.shard_sequences)
    # the date collection first ran; the config's build_date is render's (a display setting, not collect's key)
    assert meta["build_date"] == datetime.date.today().isoformat()
    shards = sorted((Path(cfg.out_dir) / "collect" / "shards").glob("*.npz"))
    assert len(shards) == meta["n_shards"]  # kept: a damaged output is rebuilt from them without a forward pass


def test_run_skips_when_up_to_date(collected, monkeypatch):
    import builder.models

    cfg = collected["gpt2"][0]
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.out_dir, "collect").iterdir()}

    def no_load(_cfg):
        raise AssertionError("collect reloaded the model although its artefacts are up to date")

    monkeypatch.setattr(builder.models, "load_model", no_load)
    run_stage("collect", cfg)
    assert {p: p.stat().st_mtime_ns for p in Path(cfg.out_dir, "collect").iterdir()} == before


# --------------------------------------------------------------------------------------------------------------------
# Resume after a kill: the shard is the unit of resume

SHARD = 16
KILL_AT = 2 * SHARD + 8  # inside the third shard, after two shards were written
KILLER = """
import json, sys
from builder.config import config_from_dict
from builder.stage import run_stage
run_stage("collect", config_from_dict(json.loads(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_gpt2, corpus_file):
    """An uninterrupted collect, and one SIGKILLed inside its third shard and then re-run (resumed)."""
    raw = dict(shard_sequences=SHARD, batch_size=8)
    clean_cfg = config_from_dict(tiny_config_dict(tiny_gpt2, corpus_file, tmp_path_factory.mktemp("clean"), **raw))
    run_stage("collect", clean_cfg)
    killed_raw = tiny_config_dict(tiny_gpt2, corpus_file, tmp_path_factory.mktemp("killed"), **raw)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATLAS_FAULT": f"collect:{KILL_AT}"}
    killed = subprocess.run([sys.executable, "-c", KILLER, json.dumps(killed_raw)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    cfg = config_from_dict(killed_raw)
    paths = AtlasPaths.of(cfg)
    state_after_kill = {"returncode": killed.returncode, "stderr": killed.stderr,
                        "shards": sorted(p.name for p in (paths.stage("collect") / "shards").glob("*.npz")),
                        "sets_written": sorted(p.name for p in paths.stage("collect").glob("L*.npz")),
                        "meta_written": paths.meta("collect").is_file()}
    forwarded = []
    real_forward = collect.forward_with_hooks

    def counting_forward(bridge, tokens, sets):
        forwarded.append(len(tokens))
        return real_forward(bridge, tokens, sets)

    collect.forward_with_hooks = counting_forward
    try:
        run_stage("collect", cfg)
    finally:
        collect.forward_with_hooks = real_forward
    return {"clean": clean_cfg, "resumed": cfg, "kill": state_after_kill, "forwarded": sum(forwarded)}


def test_killed_run_leaves_its_finished_shards_and_no_finished_artefacts(resumed):
    kill = resumed["kill"]
    assert kill["returncode"] == -signal.SIGKILL, kill["stderr"][-2000:]
    assert kill["shards"] == [f"{0:09d}-{SHARD:09d}.npz", f"{SHARD:09d}-{2 * SHARD:09d}.npz"]
    assert kill["sets_written"] == [] and not kill["meta_written"]


def test_resume_after_kill_gives_the_same_arrays_as_an_uninterrupted_run(resumed):
    clean, again = resumed["clean"], resumed["resumed"]
    for layer in (0, 1):
        assert_equal_arrays(read_set_npz(clean.out_dir, layer), read_set_npz(again.out_dir, layer))
    np.testing.assert_array_equal(read_tokens(AtlasPaths.of(clean)), read_tokens(AtlasPaths.of(again)))


def test_resumed_run_forwards_only_the_sequences_of_unfinished_shards(resumed):
    n_sequences = len(read_tokens(AtlasPaths.of(resumed["resumed"])))
    assert n_sequences > 2 * SHARD
    assert resumed["forwarded"] == n_sequences - 2 * SHARD


def test_resumed_run_meta_reports_the_sequences_forwarded_in_that_run(resumed):
    clean_meta = read_collect_meta(AtlasPaths.of(resumed["clean"]))
    meta = read_collect_meta(AtlasPaths.of(resumed["resumed"]))
    assert clean_meta["forwarded_sequences_last_run"] == meta["n_sequences"]
    assert meta["forwarded_sequences_last_run"] == meta["n_sequences"] - 2 * SHARD
    assert meta["shards_run_last_run"] == meta["n_shards"] - 2


def test_shard_size_is_a_machine_setting_that_does_not_change_the_result(resumed, tmp_path, tiny_gpt2,
                                                                         corpus_file):
    """Shards of 48 and 16 sequences (and a partly finished run of another split) merge to the same artefacts."""
    clean = resumed["clean"]
    cfg = config_from_dict(tiny_config_dict(tiny_gpt2, corpus_file, tmp_path, shard_sequences=48, batch_size=8))
    run_stage("collect", cfg)
    for layer in (0, 1):
        assert_equal_arrays(read_set_npz(clean.out_dir, layer), read_set_npz(cfg.out_dir, layer))


def test_partial_work_from_another_config_is_discarded(tmp_path, tiny_gpt2, make_config, monkeypatch):
    """Shards collected with threshold 0.75 must not leak into a run with threshold 0.5 in the same out_dir."""
    first = make_config(tiny_gpt2, "shared", shard_sequences=16, batch_size=8)

    class Interrupted(Exception):
        pass

    real, written = collect.COLLECT_SHARD, []

    class StopAfterFirstShard:
        def __getattr__(self, name):
            return getattr(real, name)

        def write_npz(self, path, **arrays):
            real.write_npz(path, **arrays)
            written.append(path)
            raise Interrupted

    monkeypatch.setattr(collect, "COLLECT_SHARD", StopAfterFirstShard())
    with pytest.raises(Interrupted):
        run_stage("collect", first)
    monkeypatch.undo()
    assert written and written[0].is_file()
    second = dataclasses.replace(first, threshold=0.5)
    run_stage("collect", second)
    fresh = dataclasses.replace(second, out_dir=str(tmp_path / "fresh"))
    run_stage("collect", fresh)
    for layer in (0, 1):
        assert_equal_arrays(read_set_npz(second.out_dir, layer), read_set_npz(fresh.out_dir, layer))
    assert read_collect_meta(AtlasPaths.of(second))["threshold"] == 0.5


def test_a_damaged_set_file_is_rebuilt_from_the_shards_without_a_forward_pass(tiny_gpt2, make_config):
    cfg = make_config(tiny_gpt2, "damaged", max_sequences=32)
    run_stage("collect", cfg)
    before = read_set_npz(cfg.out_dir, 1)
    damaged = Path(cfg.out_dir) / "collect" / "L1.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    run_stage("collect", cfg)
    meta = read_collect_meta(AtlasPaths.of(cfg))
    assert meta["forwarded_sequences_last_run"] == 0 and meta["shards_run_last_run"] == 0
    assert_equal_arrays(read_set_npz(cfg.out_dir, 1), before)


def test_the_merge_holds_one_set_at_a_time_and_reads_only_its_arrays(tiny_gpt2, make_config, monkeypatch):
    """The driver's merge builds one set's state from every shard, writes it, then the next: memory for one set."""
    cfg = make_config(tiny_gpt2, "per-set", max_sequences=32, shard_sequences=16)
    run_stage("collect", cfg)
    before = {layer: read_set_npz(cfg.out_dir, layer) for layer in (0, 1)}
    absorbed, real_absorb = [], Collector.absorb

    def recording_absorb(self, arrays):
        absorbed.append((tuple(self.states), {name.split(".")[0] for name in arrays}))
        return real_absorb(self, arrays)

    monkeypatch.setattr(Collector, "absorb", recording_absorb)
    for layer in (0, 1):
        (Path(cfg.out_dir) / "collect" / f"L{layer}.npz").unlink()
    run_stage("collect", cfg)
    assert absorbed == [(("L0",), {"L0"})] * 2 + [(("L1",), {"L1"})] * 2
    for layer in (0, 1):
        assert_equal_arrays(read_set_npz(cfg.out_dir, layer), before[layer])


def test_set_groups_are_consecutive_layers_as_equal_in_number_as_they_divide():
    sets = [mlp_layer(layer, 4, D_MODEL, False) for layer in (6, 0, 9, 3, 1)]
    groups = collect.set_groups(sets, 2)
    assert [[s.layer for s in group] for group in groups] == [[0, 1, 3], [6, 9]]
    assert [[s.layer for s in group] for group in collect.set_groups(sets, 9)] == [[0], [1], [3], [6], [9]]
    assert [[s.layer for s in group] for group in collect.set_groups(sets, 1)] == [[0, 1, 3, 6, 9]]


def test_collecting_each_group_of_sets_in_its_own_pass_gives_the_same_artefacts(tiny_gpt2, make_config, monkeypatch):
    """collect_groups = 2: one pass per layer, each forward stopping after its own layer; then back to 1 group."""
    one = make_config(tiny_gpt2, "one", max_sequences=32)
    run_stage("collect", one)
    deepest, real_forward = [], collect.forward_with_hooks

    def recording_forward(bridge, tokens, sets):
        deepest.append(max(s.layer for s in sets))
        return real_forward(bridge, tokens, sets)

    monkeypatch.setattr(collect, "forward_with_hooks", recording_forward)
    two = make_config(tiny_gpt2, "two", max_sequences=32, collect_groups=2)
    run_stage("collect", two)
    batches = len(deepest) // 2
    assert batches > 0 and deepest == [0] * batches + [1] * batches
    for layer in (0, 1):
        assert_equal_arrays(read_set_npz(one.out_dir, layer), read_set_npz(two.out_dir, layer))
    shards = Path(two.out_dir) / "collect"
    assert sorted(p.name for p in shards.glob("shards*")) == ["shards-1of2", "shards-2of2"]
    meta = read_collect_meta(AtlasPaths.of(two))
    assert meta["collect_groups"] == 2 and meta["forwarded_sequences_last_run"] == 2 * meta["n_sequences"]
    # Back to one group in the same out_dir: the other grouping's shards go, the artefacts stay the same.
    for layer in (0, 1):
        (shards / f"L{layer}.npz").unlink()
    again = dataclasses.replace(two, collect_groups=1)
    run_stage("collect", again)
    assert sorted(p.name for p in shards.glob("shards*")) == ["shards"]
    for layer in (0, 1):
        assert_equal_arrays(read_set_npz(one.out_dir, layer), read_set_npz(again.out_dir, layer))

