"""Collect at the reference scale (issue 14, item 1): the collector's own work per token per layer, before and after
issue 14, on synthetic hook streams with GPT-2 small's shapes, and its memory over a full 10,000 × 1,024-token stream
for one layer, extrapolated to 12.

No model is involved: `SyntheticStream` draws GELU-shaped, heavy-tailed activations (3,072 units, d_model 768,
batches of 16 × 1,024 tokens) from a seeded generator, cheaply (rows of a fixed pool of GELU values scaled by a
log-normal factor per sequence and unit, so maxima keep rising late in the stream), and only the collector's calls are
timed. `BaselineCollector` is the collector as it was before issue 14 (numpy state on the host, `bucketize` for the
histogram, compaction on the host when a shard ends), kept here unchanged so "before" is measured in the same run
as "after"; it is not used anywhere else.

The full stream runs in a child process (`python -m builder.scale.collector --stream …`) so its peak RSS is its own.
"""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from builder.collect import CANDIDATE_FIELDS, Collector, candidate_mask, histogram_counters, scan_batch
from builder.schema import COLLECT_SHARD, HISTOGRAM_EDGES
from builder.subjects import Readout, SubjectSet, mlp_layer

log = logging.getLogger(__name__)

D_MLP, D_MODEL, SEQUENCES, CONTEXT = 3072, 768, 16, 1024  # GPT-2 small's layer, batches of 16 × 1,024 tokens
REFERENCE_LAYERS, REFERENCE_SEQUENCES = 12, 10_000
THRESHOLD, MAX_EXAMPLES, WINDOW_BEFORE, WINDOW_AFTER = 0.75, 100, 20, 4  # collect's defaults
INTERVAL_COUNT, INTERVAL_EXAMPLES = 5, 2
SPEEDUP_TARGET = 10
MEMORY_TARGET = 32 * 2 ** 30  # the whole reference workload in 32 GB of RAM
POOL_ROWS = 8192  # positions of the synthetic pool that every batch draws from
KEY = "L0"


@dataclass(frozen=True)
class SyntheticStream:
    """Seeded GPT-2-small-shaped hook values: post = GELU(z) · s, pre = z · s and input vectors for rows of a fixed
    pool (z ~ N(μ_u, σ_u²) per unit, σ_u log-normal), s = exp(τ_u · N(0, 1)) per (sequence, unit) with τ_u
    log-uniform in [0.05, 1]: heavy-tailed sequence maxima whose running max keeps rising, from units where nearly
    every sequence qualifies (the most candidates) to units where few do. The batch tensors are reused (the collector
    keeps copies of what it needs)."""

    seed: int = 0
    n_units: int = D_MLP
    d_model: int = D_MODEL
    sequences: int = SEQUENCES
    context: int = CONTEXT
    pools: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        generator = torch.Generator().manual_seed(self.seed)
        scale = torch.exp(0.5 * torch.randn(self.n_units, generator=generator))
        shift = -0.5 + 0.3 * torch.randn(self.n_units, generator=generator)
        pre = torch.randn(POOL_ROWS, self.n_units, generator=generator) * scale + shift
        spread = torch.exp(torch.empty(self.n_units).uniform_(np.log(0.05), 0.0, generator=generator))
        tokens = self.sequences * self.context
        self.pools.update(pre=pre, post=torch.nn.functional.gelu(pre), spread=spread,
                          input=torch.randn(POOL_ROWS, self.d_model, generator=generator),
                          out_post=torch.empty(tokens, self.n_units), out_pre=torch.empty(tokens, self.n_units),
                          out_input=torch.empty(tokens, self.d_model))

    def batch(self, index: int) -> Readout:
        pools = self.pools
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        rows = torch.randint(POOL_ROWS, (self.sequences * self.context,), generator=generator)
        factor = torch.exp(pools["spread"] * torch.randn(self.sequences, 1, self.n_units, generator=generator))
        shape = (self.sequences, self.context, self.n_units)
        post = torch.index_select(pools["post"], 0, rows, out=pools["out_post"]).view(shape).mul_(factor)
        pre = torch.index_select(pools["pre"], 0, rows, out=pools["out_pre"]).view(shape).mul_(factor)
        inputs = torch.index_select(pools["input"], 0, rows, out=pools["out_input"])
        return Readout(post=post, pre=pre, pre_linear=None,
                       input=inputs.view(self.sequences, self.context, self.d_model))


def layer_set(n_units: int = D_MLP, d_model: int = D_MODEL) -> SubjectSet:
    return mlp_layer(0, n_units, d_model, gated=False)


def new_collector(cls=Collector, n_units: int = D_MLP, d_model: int = D_MODEL):
    return cls([layer_set(n_units, d_model)], CONTEXT, THRESHOLD, MAX_EXAMPLES, WINDOW_BEFORE, WINDOW_AFTER,
               interval_count=INTERVAL_COUNT, interval_examples=INTERVAL_EXAMPLES)


# --------------------------------------------------------------------------------------------------------------------
# The baseline: collect's Collector before issue 14, unchanged but for names (update, compact, state_arrays)

BASELINE_DOMINANCE_BLOCK = 2048


@dataclass
class BaselineSetState:
    running_max: np.ndarray
    histogram: np.ndarray
    candidates: dict[str, np.ndarray]
    vector_keys: np.ndarray
    vectors: np.ndarray
    pending: list = field(default_factory=list)
    pending_vectors: list = field(default_factory=list)
    sequences: list = field(default_factory=list)

    @classmethod
    def empty(cls, n_units: int, d_input: int, window: int) -> "BaselineSetState":
        candidates = {name: np.zeros(0, np.int32) for name in ("unit", "seq", "pos")}
        candidates.update({name: np.zeros(0, np.float32) for name in ("act", "pre", "pre_linear")})
        candidates["window"] = np.zeros((0, window), np.float32)
        return cls(running_max=np.full(n_units, -np.inf, np.float32),
                   histogram=np.zeros((n_units, len(HISTOGRAM_EDGES) + 1), np.int64), candidates=candidates,
                   vector_keys=np.zeros(0, np.int64), vectors=np.zeros((0, d_input), np.float32))

    def sequence_table(self):
        if len(self.sequences) != 1:
            n_units = len(self.running_max)
            chunks = [(np.zeros(0, np.int32), np.zeros((0, n_units), np.float32), np.zeros((0, n_units), np.int32))]
            chunks += self.sequences
            self.sequences = [tuple(np.concatenate([c[i] for c in chunks]) for i in range(3))]
        return self.sequences[0]


def baseline_keep_first_needed(unit: np.ndarray, act: np.ndarray, max_examples: int) -> np.ndarray:
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
        for begin in range(0, len(members), BASELINE_DOMINANCE_BLOCK):
            block = group_act[begin:begin + BASELINE_DOMINANCE_BLOCK]
            earlier = np.arange(len(members))[None, :] < np.arange(begin, begin + len(block))[:, None]
            dominating = ((group_act[None, :] >= block[:, None]) & earlier).sum(axis=1)
            keep[members[begin:begin + len(block)]] = dominating < max_examples
    return keep


class BaselineCollector:
    """collect.Collector before issue 14 (no reference maxima: the measured configuration)."""

    def __init__(self, sets: list[SubjectSet], context_length: int, threshold: float, max_examples: int,
                 window_before: int, window_after: int, *, interval_count: int, interval_examples: int):
        self.context_length = context_length
        self.threshold = threshold
        self.max_examples = max_examples
        self.interval_examples = interval_examples
        self.window_before = window_before
        self.window_after = window_after
        self.states = {s.key: BaselineSetState.empty(s.size, s.d_input, window_before + 1 + window_after)
                       for s in sets}

    def update(self, key: str, first_seq: int, readout: Readout) -> None:
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

        maxima_t = torch.as_tensor(state.running_max, device=post.device)
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

    def compact(self) -> None:
        for key, state in self.states.items():
            if not state.pending:
                continue
            merged = {name: np.concatenate([state.candidates[name]] + [c[name] for c in state.pending])
                      for name in CANDIDATE_FIELDS}
            state.pending.clear()
            order = np.lexsort((merged["seq"], merged["unit"]))
            merged = {name: values[order] for name, values in merged.items()}
            alive = merged["act"] >= self.threshold * state.running_max[merged["unit"]]
            merged = {name: values[alive] for name, values in merged.items()}
            keep = baseline_keep_first_needed(merged["unit"], merged["act"], self.max_examples)
            state.candidates = {name: values[keep] for name, values in merged.items()}
            all_keys = np.concatenate([state.vector_keys] + [k for k, _ in state.pending_vectors])
            all_vectors = np.concatenate([state.vectors] + [v for _, v in state.pending_vectors])
            state.pending_vectors.clear()
            needed = np.unique(state.candidates["seq"].astype(np.int64) * self.context_length
                               + state.candidates["pos"])
            unique_keys, first = np.unique(all_keys, return_index=True)
            take = first[np.isin(unique_keys, needed)]
            state.vector_keys, state.vectors = all_keys[take], all_vectors[take]

    def state_arrays(self) -> dict[str, np.ndarray]:
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


# --------------------------------------------------------------------------------------------------------------------
# Measurements


def timed_slice(cls, stream: SyntheticStream, n_batches: int) -> dict:
    """Feed batches 0 … n_batches − 1 to a fresh collector and take its state: seconds in `update` and in the final
    `state_arrays` (compaction and the transfer to the host), generation excluded. CPU time of this process, so other
    load on a shared machine does not count (wall time beside it)."""
    collector = new_collector(cls, stream.n_units, stream.d_model)
    # The compiled pass loads (or compiles, once per machine) at a process's first batch: a start-up cost like
    # loading the model, not work per token.
    scan_batch(torch.zeros(1, 1, 1), histogram_counters(1, torch.device("cpu"))[0])
    update = wall = 0.0
    for index in range(n_batches):
        readout = stream.batch(index)
        start, start_wall = time.process_time(), time.perf_counter()
        collector.update(KEY, index * stream.sequences, readout)
        update += time.process_time() - start
        wall += time.perf_counter() - start_wall
    start, start_wall = time.process_time(), time.perf_counter()
    arrays = collector.state_arrays()
    compaction = time.process_time() - start
    wall += time.perf_counter() - start_wall
    per = 1e6 / (n_batches * stream.sequences * stream.context)
    return {"update_us": round(update * per, 2), "compaction_us": round(compaction * per, 2),
            "total_us": round((update + compaction) * per, 2), "wall_us": round(wall * per, 2),
            "candidates": int(len(arrays[f"{KEY}.c.unit"]))}


def compare_speed(n_batches: int, repeats: int = 3) -> dict:
    """Both collectors on the same stream, alternately, `repeats` times; each one's fastest run counts (as timeit
    takes the minimum: other load on a shared machine only ever adds time; here runs of one collector vary by ±20%),
    with every run beside it."""
    stream = SyntheticStream()
    runs = {"before": [], "after": []}
    for _ in range(repeats):
        runs["before"].append(timed_slice(BaselineCollector, stream, n_batches))
        runs["after"].append(timed_slice(Collector, stream, n_batches))
        if runs["before"][-1]["candidates"] != runs["after"][-1]["candidates"]:
            raise AssertionError(f"baseline and collector keep different candidates: {runs}")
    before, after = (min(runs[name], key=lambda run: run["total_us"]) for name in ("before", "after"))
    ratio = before["total_us"] / after["total_us"]
    return {
        "slice": {"batches": n_batches, "tokens": n_batches * SEQUENCES * CONTEXT, "units": D_MLP,
                  "torch_threads": torch.get_num_threads(), "repeats": repeats, "before": before, "after": after,
                  "runs_us": {name: [run["total_us"] for run in runs[name]] for name in runs}},
        "before_us_per_token": {"name": "collector work per token per layer before issue 14 (update + compaction)",
                                "value": before["total_us"], "unit": "µs"},
        "after_us_per_token": {"name": "collector work per token per layer after (update + compaction)",
                               "value": after["total_us"], "unit": "µs"},
        "speedup": {"name": "collector speed-up, before / after, same stream and run", "value": round(ratio, 1),
                    "unit": "×", "target": SPEEDUP_TARGET, "met": bool(ratio >= SPEEDUP_TARGET)},
    }


def state_bytes(collector: Collector) -> int:
    """Bytes of every tensor the collector's state holds (candidates, vectors, pending, tables, histogram)."""
    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.nbytes
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0
    return sum(size(vars(state)) for state in collector.states.values())


def run_stream(n_batches: int, artefact: Path) -> dict:
    """The child's side: the new collector over n_batches batches, with checkpoints at 1/16 … 1 of the stream; the
    state written as a collect shard artefact."""
    stream = SyntheticStream()
    collector = new_collector()
    checkpoints = {max(1, n_batches >> shift) for shift in range(5)}
    points, seconds, wall, started = [], 0.0, 0.0, time.perf_counter()
    for index in range(n_batches):
        readout = stream.batch(index)
        start, start_wall = time.process_time(), time.perf_counter()
        collector.update(KEY, index * stream.sequences, readout)
        if index + 1 in checkpoints:
            collector.compact()
        seconds += time.process_time() - start
        wall += time.perf_counter() - start_wall
        if index + 1 in checkpoints:
            state = collector.states[KEY]
            points.append({"tokens": (index + 1) * stream.sequences * stream.context,
                           "candidates": int(len(state.candidates["unit"])), "vectors": int(len(state.vectors)),
                           "state_bytes": state_bytes(collector),
                           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    start, start_wall = time.process_time(), time.perf_counter()
    arrays = collector.state_arrays()
    seconds += time.process_time() - start
    wall += time.perf_counter() - start_wall
    COLLECT_SHARD.write_npz(artefact, **arrays)
    tokens = n_batches * stream.sequences * stream.context
    return {"tokens": tokens, "collector_seconds": seconds, "collector_wall_seconds": wall,
            "wall_seconds": time.perf_counter() - started,
            "collector_us_per_token": 1e6 * seconds / tokens, "points": points,
            "artefact_bytes": artefact.stat().st_size,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def full_stream(out_dir: Path, n_batches: int) -> dict:
    """The full stream in a child process; its own report, and the peak RSS as the parent sees it."""
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        artefact = Path(scratch) / "collect-shard.npz"
        done = subprocess.run([sys.executable, "-m", "builder.scale.collector", "--stream", str(n_batches),
                               str(artefact), str(torch.get_num_threads())], capture_output=True, text=True,
                              check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["peak_rss_bytes_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return report


def measure(out_dir: Path, quick: bool) -> dict:
    """Collector µs per token per layer before and after on one stream slice (quick: 2 batches, else 16); with
    quick=False also the full 10,000 × 1,024-token stream for one layer in a child process: peak RSS, artefact
    bytes, candidates and vectors kept, and the extrapolation to 12 layers beside the 32 GB target."""
    figures = compare_speed(2 if quick else 16, repeats=1 if quick else 3)
    if not quick:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        figures.update(memory_figures(full_stream(out_dir, REFERENCE_SEQUENCES // SEQUENCES)))
    return figures


def memory_figures(report: dict) -> dict:
    """The full stream's figures, and the extrapolation from one layer to 12."""
    last = report["points"][-1]
    # 12 layers hold 12 states; everything else in the process (the hook tensors of a batch, the pools here, the
    # interpreter) is there once. The upper bound counts the one-layer process 12 times.
    overhead = report["peak_rss_bytes"] - last["state_bytes"]
    total = REFERENCE_LAYERS * last["state_bytes"] + overhead
    return {
        "stream": {"tokens": report["tokens"], "points": report["points"], "units": D_MLP,
                   "collector_us_per_token": round(report["collector_us_per_token"], 2),
                   "collector_seconds": round(report["collector_seconds"], 1)},
        "stream_wall_seconds": {"name": "full one-layer stream, wall time (generation included)",
                                "value": round(report["wall_seconds"], 1), "unit": "s"},
        "peak_rss_one_layer": {"name": "peak RSS, one layer, 10M tokens", "value": report["peak_rss_bytes"],
                               "unit": "B"},
        "artefact_bytes_one_layer": {"name": "collect state artefact (npz), one layer, 10M tokens",
                                     "value": report["artefact_bytes"], "unit": "B"},
        "candidates_one_layer": {"name": "candidates kept after 10M tokens", "value": last["candidates"]},
        "vectors_one_layer": {"name": "distinct input vectors kept after 10M tokens", "value": last["vectors"]},
        "memory_12_layers": {"name": "peak memory, 12 layers × 10M tokens (12 states + one process's overhead)",
                             "value": total, "unit": "B", "target": MEMORY_TARGET, "met": bool(total <= MEMORY_TARGET)},
        "memory_12_layers_upper": {"name": "upper bound: 12 × the one-layer peak RSS",
                                   "value": REFERENCE_LAYERS * report["peak_rss_bytes"], "unit": "B",
                                   "target": MEMORY_TARGET,
                                   "met": bool(REFERENCE_LAYERS * report["peak_rss_bytes"] <= MEMORY_TARGET)},
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stream"]:
        torch.set_num_threads(int(sys.argv[4]))
        print(json.dumps(run_stream(int(sys.argv[2]), Path(sys.argv[3]))))
    else:
        logging.basicConfig(level=logging.INFO)
        quick = "--quick" in sys.argv
        print(json.dumps(measure(Path(tempfile.mkdtemp()), quick), indent=1))
