"""`make bench`: speed, memory and size figures, each as a ratio against a baseline measured in the same run.

Reads the embedded atlas built by `make site` (for importance, neighbours and render figures) and re-measures
collection and clustering from scratch. Prints a table; nothing here is asserted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch

from builder.cli import quiet_libraries
from builder.config import AtlasConfig, load_config
from builder.paths import AtlasPaths
from builder.pipeline import STAGES
from builder.stage import peak_rss_mb

log = logging.getLogger("bench")

# The reference workload: GPT-2 small (12 layers × 3,072 neurons), 100 examples per neuron, context 1,024.
GPT2_NEURONS = 36_864
GPT2_CONTEXT = 1024
GPT2_SEQUENCES = 10_000  # about one 1,024-token sequence per OpenWebText document
GPT2_D_MODEL = 768
GPT2_EXAMPLES = 100  # examples per neuron at the reference scale
BENCH_SEQUENCES = 128  # sequences the collect benchmark forwards
SLICE_EXAMPLES = 12  # examples of one sequence the importance slice scores both ways
TRAIN_BENCH_STEPS = 40  # batches of 1,024 tokens the training benchmark uses...
TRAIN_SETTLE_STEPS = 25  # ...the first of which (a dense code, L0 falling from half the latents) are not timed
WARMUP_FEATURES = 2000  # PyNNDescent compiles with numba on first use: warm it on a small slice
# Both engines collect and score the build's own sequences (the embedded build's 512: its collect and importance as
# `make site` runs them)...
ENGINE_SHARDS = 8  # ...in this many shards (work for both of 2 Ray actors)
ENGINE_WORKERS = 2  # Ray actors, against the local engine's one process on the same cores


def line(name: str, value: str) -> None:
    click.echo(f"{name:<58} {value}")


def bench_collect(cfg: AtlasConfig) -> None:
    from builder.collect import Collector, collect_batch
    from builder.data import tokenise_corpus
    from builder.models import load_model, selected_layers
    from builder.subjects import model_subject_sets

    model = load_model(cfg)
    layers = selected_layers(cfg, model.n_layers)
    sets = model_subject_sets(model, layers)
    tokens, _ = tokenise_corpus(cfg, model.tokenizer)
    tokens = tokens[:BENCH_SEQUENCES]
    batches = [torch.as_tensor(tokens[i:i + cfg.batch_size], dtype=torch.long)
               for i in range(0, len(tokens), cfg.batch_size)]
    stop = max(layers) + 1

    def bare() -> None:
        with torch.no_grad():
            for batch in batches:
                model.bridge(batch, return_type=None, stop_at_layer=stop)

    def collect() -> None:
        collector = Collector.for_config(sets, cfg)
        for index, batch in enumerate(batches):
            collect_batch(collector, model.bridge, batch, index * cfg.batch_size)
        for s in sets:
            collector.finish(s.key)

    bare()  # warm-up
    # Alternate the two so a busy machine slows both alike; keep each one's best.
    rounds = [(_timed(bare), _timed(collect)) for _ in range(2)]
    bare_s, collect_s = min(r[0] for r in rounds), min(r[1] for r in rounds)
    n_tokens = tokens.size
    line(f"collect: tokens measured ({len(tokens)} seq × {cfg.context_length}, layers {layers})", f"{n_tokens:,}")
    line("collect: bare forward to the deepest layer (baseline)", f"{bare_s:.2f} s, {n_tokens / bare_s:,.0f} tok/s")
    line("collect: one-pass collection", f"{collect_s:.2f} s, {n_tokens / collect_s:,.0f} tok/s")
    line("collect: collection / bare forward (target ≤ 1.5)", f"{collect_s / bare_s:.2f}×")
    line("collect: peak RSS of this process", f"{peak_rss_mb():,.0f} MiB")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _synthetic_neurons(count: int, seed: int) -> int:
    from builder.cluster import cluster_neuron

    rng = np.random.default_rng(seed)
    for _ in range(count):
        centres = rng.normal(size=(4, GPT2_D_MODEL))
        features = (centres[rng.integers(0, 4, GPT2_EXAMPLES)]
                    + 0.3 * rng.normal(size=(GPT2_EXAMPLES, GPT2_D_MODEL)))
        cluster_neuron(features, 0.5)
    return count


def bench_cluster(workers: int) -> None:
    from builder.cluster import single_threaded_blas

    per_task, tasks = GPT2_EXAMPLES, 2 * workers
    one = _timed(lambda: _synthetic_neurons(per_task * 2, 0)) / (per_task * 2)
    with ProcessPoolExecutor(workers, initializer=single_threaded_blas) as pool:
        sum(pool.map(_synthetic_neurons, [2] * workers, range(workers)))  # start the workers before timing
        start = time.perf_counter()
        done = sum(pool.map(_synthetic_neurons, [per_task] * tasks, range(tasks)))
        many = (time.perf_counter() - start) / done
    line(f"cluster: neurons/s, 1 worker ({GPT2_EXAMPLES} examples × {GPT2_D_MODEL} dims)", f"{1 / one:,.0f}")
    line(f"cluster: neurons/s, {workers} workers", f"{1 / many:,.0f} ({one / many:.2f}× one worker)")
    line(f"cluster: projected reference workload ({GPT2_NEURONS:,} neurons)", f"{GPT2_NEURONS * many / 60:.1f} min")


def bench_importance(cfg: AtlasConfig) -> None:
    from builder.importance import SharedMasker, examples_by_sequence, mask_token_id
    from builder.models import load_model
    from builder.schema import collect_sets, read_collect_meta, read_examples, read_tokens

    paths = AtlasPaths.of(cfg)
    meta = read_collect_meta(paths)
    sets = collect_sets(meta)
    model = load_model(cfg)
    tokens = read_tokens(paths)
    grouped = examples_by_sequence([read_examples(paths, s.key) for s in sets])
    first = 1 if meta["packing"]["bos_token_id"] is not None else 0
    mask = mask_token_id(cfg, model.tokenizer)
    window = cfg.window_before
    # Slice: the first examples (all sets) of the first sequence holding examples.
    seq = sorted(grouped)[0]
    take = np.arange(min(SLICE_EXAMPLES, len(grouped[seq].set_index)))
    found = grouped[seq].take(take)
    masker = SharedMasker(model.bridge, sets, window, mask, first)
    start = time.perf_counter()
    masker.group(tokens[[seq]], [found], model.device)
    shared_s, shared_tokens = time.perf_counter() - start, masker.forward_tokens
    naive_tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for set_index, m in zip(found.set_index, found.position):
            for p in [None] + list(range(max(first, m - window), m + 1)):
                row = torch.as_tensor(tokens[seq, :m + 1], dtype=torch.long)[None].clone()
                if p is not None:
                    row[0, p] = mask
                model.bridge.run_with_hooks(row, return_type=None, stop_at_layer=sets[set_index].layer + 1)
                naive_tokens += row.numel()
    naive_s = time.perf_counter() - start
    line(f"importance: slice ({len(take)} examples of sequence {seq})", "")
    line("importance: naive forward tokens / wall (baseline)", f"{naive_tokens:,} / {naive_s:.1f} s")
    line("importance: shared forward tokens / wall", f"{shared_tokens:,} / {shared_s:.1f} s")
    line("importance: slice ratio naive / shared (tokens, wall)",
         f"{naive_tokens / shared_tokens:.1f}×, {naive_s / shared_s:.1f}×")
    stats = STAGES["importance"].meta_type.read_json(paths.meta("importance"))
    line("importance: whole atlas forward tokens, naive / shared (target ≥ 20)",
         f"{stats['naive_forward_tokens']:,} / {stats['forward_tokens']:,} = "
         f"{stats['naive_forward_tokens'] / stats['forward_tokens']:.0f}×")
    # Reference projection: every position of every sequence is needed once neurons are many; each masked position
    # costs at most window + 1 tokens on the shared path, and (mean prefix) per example and position on the naive path.
    shared = GPT2_SEQUENCES * (GPT2_CONTEXT + GPT2_CONTEXT * (window + 1))
    naive = GPT2_NEURONS * GPT2_EXAMPLES * (window + 2) * (GPT2_CONTEXT / 2)
    line("importance: projected reference forward tokens, naive / shared", f"{naive:.2e} / {shared:.2e} = "
         f"{naive / shared:.0f}×")


def bench_neighbours(cfg: AtlasConfig) -> None:
    from builder.neighbours import approximate_neighbours, exact_neighbours, feature_table, sets_by_space
    from builder.schema import collect_sets, read_collect_meta

    paths = AtlasPaths.of(cfg)
    sets = collect_sets(read_collect_meta(paths))
    _, per_set = feature_table(paths, sets, cfg.neighbour_space)
    # The neighbours stage searches each input space's features together: time the largest space's search.
    vectors = max((np.concatenate([per_set[p] for p in positions]) for positions in sets_by_space(sets).values()),
                  key=len)
    k = cfg.neighbour_count + 1
    approximate_neighbours(vectors[:WARMUP_FEATURES], k, cfg.seed)  # JIT warm-up
    found = {}
    build = _timed(lambda: found.update(approx=approximate_neighbours(vectors, k, cfg.seed)[0]))
    exact_s = _timed(lambda: found.update(exact=exact_neighbours(vectors, k)[0]))
    approx, exact = found["approx"], found["exact"]
    recall = np.mean([len(set(a[1:]) & set(e[1:])) / (k - 1) for a, e in zip(approx, exact)])
    line(f"neighbours: features indexed ({vectors.shape[1]} dims)", f"{len(vectors):,}")
    line("neighbours: exact brute force (baseline)", f"{exact_s:.2f} s, {len(vectors) / exact_s:,.0f} queries/s")
    line("neighbours: PyNNDescent graph build (all queries)", f"{build:.2f} s, {len(vectors) / build:,.0f} queries/s")
    line(f"neighbours: recall@{k - 1} vs exact", f"{recall:.3f}")


def bench_render_and_memory(cfg: AtlasConfig) -> None:
    from builder.errors import ArtefactError

    paths = AtlasPaths.of(cfg)
    metas = {}
    for name, stage in STAGES.items():
        try:
            metas[name] = stage.meta_type.read_json(paths.meta(name))
        except ArtefactError:
            continue
    if "render" in metas:
        stats = metas["render"]
        per_neuron = stats["bytes_per_neuron"]
        line("render: bytes per neuron (target ≤ 27 KB)", f"{per_neuron / 1000:.1f} KB")
        projections = stats.get("projected_bytes_per_neuron_at_100_examples", {})
        for clusters, projected in sorted(projections.items(), key=lambda item: int(item[0])):
            line(f"render: projected GPT-2-small site, {GPT2_EXAMPLES} examples, {clusters} clusters/neuron "
                 "(limit 1 GB)",
                 f"{projected / 1000:.1f} KB/neuron, {projected * GPT2_NEURONS / 1e9:.2f}× of 1 GB")
        budget = {"5": 26_800, "10": 39_600}  # issue 11's bounds at 100 examples (bytes per neuron)
        for clusters, limit in budget.items():
            if clusters in projections:
                line(f"render: projection at {clusters} clusters against its bound ({limit / 1000:.1f} KB)",
                     f"{projections[clusters] / limit:.3f}× of the bound")
        if "search_bytes_per_feature" in stats:
            line("render: word search index per feature (budget 200 B)", f"{stats['search_bytes_per_feature']:.0f} B")
        rate = stats["neurons"] / stats["seconds"]
        line("render: throughput", f"{rate:,.0f} neurons/s")
        line("render: projected reference render (target < 10 min)", f"{GPT2_NEURONS / rate / 60:.1f} min")
    for name, meta in metas.items():
        line(f"stage wall time: {name} (last run)", f"{meta['wall_seconds']:.1f} s")
    peaks = [meta["peak_rss_mb"] for meta in metas.values()]
    if peaks:
        line("memory: peak RSS of the embedded build (limit 8 GiB)", f"{max(peaks):,.0f} MiB "
             f"({max(peaks) / 8192:.2f}× of 8 GiB)")


SAE_BENCH_SEQUENCES = 64  # sequences of the latents-vs-neurons comparison
SAE_BENCH_LAYER = 3


def bench_sae_cost(cfg: AtlasConfig) -> None:
    """Each stage's wall time for a layer's SAE latents relative to that layer's neurons: the same corpus slice, one
    build atlasing the neurons and one atlasing a random JumpReLU SAE with as many latents on their activations."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from builder.config import SaeSpec
    from builder.models import load_model
    from builder.sae import write_sae
    from builder.stage import run_stage

    model = load_model(cfg)
    rng = np.random.default_rng(0)
    d_in = d_sae = model.d_mlp
    w_enc = rng.normal(size=(d_in, d_sae)).astype(np.float32)
    tensors = {"W_enc": w_enc / np.linalg.norm(w_enc, axis=0), "b_enc": rng.normal(0, 0.05, d_sae),
               "W_dec": rng.normal(0, 0.02, (d_sae, d_in)), "b_dec": np.zeros(d_in), "threshold": np.full(d_sae, 0.05)}
    walls = {}
    with tempfile.TemporaryDirectory() as folder:
        sae = write_sae(Path(folder) / "sae", {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae,
                                               "apply_b_dec_to_input": True, "normalize_activations": "none",
                                               "metadata": {"hook_name": f"blocks.{SAE_BENCH_LAYER}.mlp.hook_post"}},
                        tensors)
        for kind, overrides in (("neurons", {"sae": ()}),
                                ("latents", {"atlas_neurons": False, "sae": (SaeSpec(path=str(sae), slug="bench"),)})):
            # No [[train_sae]]: training is not what this compares (and would run twice).
            run_cfg = dataclasses.replace(cfg, layers=(SAE_BENCH_LAYER,), max_sequences=SAE_BENCH_SEQUENCES,
                                          out_dir=str(Path(folder) / kind / "build"), train_sae=(),
                                          site_dir=str(Path(folder) / kind / "site"), **overrides)
            # Stages the config does not use (train_sae; evaluate without SAEs) return no wall time.
            walls[kind] = {name: meta["wall_seconds"] for name in STAGES
                           if "wall_seconds" in (meta := run_stage(name, run_cfg))}
    for name, latents in walls["latents"].items():
        neurons = walls["neurons"].get(name)
        label = f"SAE: {name}, {d_sae} latents vs {model.d_mlp} neurons of layer {SAE_BENCH_LAYER}"
        if name == "evaluate" or neurons is None:  # only SAEs are evaluated: there is no neuron baseline
            line(label, f"{latents:.1f} s (latents only)")
        else:
            line(label, f"{latents:.1f} s / {neurons:.1f} s = {latents / max(neurons, 1e-9):.2f}×")


def bench_train_sae(cfg: AtlasConfig) -> None:
    """The neuron-embedding loss's cost: an NE step against a standard step on the same batches, and L_N on the
    active pairs against the same sums from dense products, on the embedded build's layer-3 MLP activations of the
    training corpus once the code has become sparse (after the first steps)."""
    import dataclasses

    from builder.models import load_model
    from builder.train_sae import capture, settings_for
    from builder.train_sae import loss as ne_loss
    from builder.train_sae.trainer import SaeTrainer

    if not cfg.train_sae:
        line("train_sae: no [[train_sae]] in this config", "skipped")
        return
    from builder.data import tokenise_corpus

    spec = cfg.train_sae[0]
    model = load_model(cfg)
    corpus = dataclasses.replace(cfg, data_files=cfg.train_data_files, max_sequences=TRAIN_BENCH_STEPS * 17)
    tokens, _ = tokenise_corpus(corpus, model.tokenizer)
    x = torch.cat([capture(model.bridge, spec.hook, torch.as_tensor(tokens[i:i + 16], dtype=torch.long))
                   for i in range(0, len(tokens), 16)]).reshape(-1, model.d_mlp)[:TRAIN_BENCH_STEPS * 1024]
    batches = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))].split(1024)
    settings = dataclasses.replace(settings_for(spec, x.shape[1]), warmup_steps=0)
    ne_weight = max([s.ne for s in cfg.train_sae if s.ne > 0] or [3e-4])  # the config's NE SAE's λ2
    timed = {}
    for name, ne in (("standard", 0.0), ("ne", ne_weight)):
        trainer = SaeTrainer(dataclasses.replace(settings, ne=ne))
        for batch in batches[:TRAIN_SETTLE_STEPS]:
            trainer.step(batch)
        timed[name] = _timed(lambda: [trainer.step(b) for b in batches[TRAIN_SETTLE_STEPS:]])
        l0 = trainer.log["l0"][-1]
    line(f"train_sae: NE step / standard step (L0 {l0:.0f} of {settings.d_sae})",
         f"{timed['ne'] / timed['standard']:.2f}×")
    f = trainer.encode(batches[-1]).detach()
    pairs = ne_loss.ActivePairs.of(f)

    def both_ways():
        w = trainer.params["W_enc"].detach().clone().requires_grad_(True)
        ne_loss.neuron_embedding_loss(w, batches[-1], trainer.h_avg, trainer.initialised, pairs).backward()

    sparse = _timed(both_ways)
    dense_share, ne_loss.DENSE_SHARE = ne_loss.DENSE_SHARE, 0.0
    try:
        dense = _timed(both_ways)
    finally:
        ne_loss.DENSE_SHARE = dense_share
    line("train_sae: L_N on active pairs / dense products (fwd+bwd)", f"{sparse / dense:.2f}×")


def bench_collector_scale() -> None:
    """The collector's own work on a synthetic GPT-2-small-sized layer (3,072 neurons, d_model 768, batches of
    16 × 1,024 tokens): today's collector against the pre-issue-14 one, kept as the baseline in
    builder/scale/collector.py; same stream, same run."""
    from builder.scale.collector import compare_speed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the per-core cost; both collectors alike
    try:
        result = compare_speed(8)
    finally:
        torch.set_num_threads(threads)
    line("collect: collector µs per token per layer, before → after", f"{result['before_us_per_token']['value']:.1f} → "
         f"{result['after_us_per_token']['value']:.1f} µs")
    line(f"collect: collector speed-up (target ≥ {result['speedup']['target']}×)", f"{result['speedup']['value']}×")


def _toml(cfg: AtlasConfig, **overrides) -> str:
    """A config as TOML (its [[sae]] and [[train_sae]] tables last), with `overrides`."""
    import dataclasses

    def value(v) -> str:
        return json.dumps(list(v) if isinstance(v, tuple) else v)

    raw = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **overrides}
    tables = {name: [dataclasses.asdict(spec) for spec in raw.pop(name)] for name in ("sae", "train_sae")}
    lines = [f"{key} = {value(v)}" for key, v in raw.items()]
    for name, specs in tables.items():
        for spec in specs:
            lines += ["", f"[[{name}]]"] + [f"{key} = {value(v)}" for key, v in spec.items()]
    return "\n".join(lines) + "\n"


def bench_ray_engine(cfg: AtlasConfig) -> None:
    """The build's collect and importance, once with the local engine and once with the Ray engine (2 actors), each
    as the `atlas` commands a user runs: start-up, Ray's cluster and model loading included."""
    import shutil
    import subprocess
    import sys

    from builder.config import SHARD_MULTIPLE

    try:
        import ray  # noqa: F401 - only to know whether the extra is installed
    except ImportError:
        line("ray engine: collect + importance, ray / local wall time", "skipped (pip install -r requirements-ray.txt)")
        return
    root = Path("bench-out") / "engines"
    shutil.rmtree(root, ignore_errors=True)
    trained = AtlasPaths.of(cfg).stage("train_sae")
    seconds, artefacts = {}, {}
    sequences = cfg.max_sequences
    if sequences <= 0:
        line("ray engine: collect + importance, ray / local wall time", "skipped (the config reads every sequence)")
        return
    shard = -(-sequences // ENGINE_SHARDS // SHARD_MULTIPLE) * SHARD_MULTIPLE
    for engine in ("local", "ray"):
        folder = (root / engine).resolve()
        config = folder / "atlas.toml"
        folder.mkdir(parents=True)
        config.write_text(_toml(cfg, out_dir=str(folder / "build"), site_dir=str(folder / "site"),
                                max_sequences=sequences, shard_sequences=shard, workers=ENGINE_WORKERS,
                                engine=engine))
        if trained.is_dir():  # the SAEs make site trained, reused: training is not what this compares
            shutil.copytree(trained, folder / "build" / "train_sae")
        started = time.perf_counter()
        for stage in ("collect", "importance"):
            result = subprocess.run([str(Path(sys.executable).parent / "atlas"), stage, "--config", str(config)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise click.ClickException(f"{engine} {stage} failed: {result.stderr.strip().splitlines()[-1:]}")
        seconds[engine] = time.perf_counter() - started
        artefacts[engine] = {p.relative_to(folder / "build").as_posix(): p.read_bytes()
                             for stage in ("collect", "importance") for p in (folder / "build" / stage).glob("*.npz")}
    same = "identical" if artefacts["local"] == artefacts["ray"] else "DIFFERENT"
    line(f"ray engine: collect + importance, {sequences} seq, local wall time", f"{seconds['local']:.1f} s")
    line(f"ray engine: the same with {ENGINE_WORKERS} Ray actors ({same} artefacts)", f"{seconds['ray']:.1f} s")
    line("ray engine: ray / local wall time (target ≤ 1.15)", f"{seconds['ray'] / seconds['local']:.2f}×")


@click.command()
@click.option("--config", default="configs/embedded.toml")
def main(config: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    cfg = load_config(config)
    click.echo(f"Neuron Atlas bench — {cfg.model}, {os.cpu_count()} cores, torch {torch.__version__}")
    bench_collect(cfg)
    bench_collector_scale()
    bench_cluster(os.cpu_count() or 1)
    bench_importance(cfg)
    bench_neighbours(cfg)
    bench_render_and_memory(cfg)
    bench_sae_cost(cfg)
    bench_train_sae(cfg)
    bench_ray_engine(cfg)


if __name__ == "__main__":
    main()
