"""Site size at the reference scale (issue 14, item 3): a synthetic GPT-2-small-sized atlas (12 × 3,072 neurons, 100
examples per neuron, 5 or 10 features each) rendered by the real render stage, and its published bytes per neuron
measured beside the 1 GB GitHub Pages budget.

The upstream artefacts are written with the real writers (tests/render_fixtures.py's helpers), clusters come from
the real clustering code, and the token windows are real text: the embedded corpus (data/moby-dick.jsonl) tokenised
by the embedded model's tokenizer (no weights loaded), so zlib sees what it would see in a real build. Values follow
what the embedded build's artefacts show: window activations mostly near 0 with a long tail, importances mostly
near 0 with a tenth near 1, about 14 of 20 similar-feature slots filled per feature.

Rendering every neuron takes too long on this machine, so the measurement renders slices of one and two layers and
extrapolates linearly in the number of neurons (shared files fall into the intercept), showing the measured points
beside the extrapolation.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np

from builder import cluster
from builder.config import AtlasConfig
from builder.data import tokenise_corpus
from builder.models import embedded_model_folder
from builder.paths import AtlasPaths
from builder.render.codec import FILE_COPY_SUFFIX
from builder.render.inputs import load_vocabulary
from builder.render.publish import render_site
from builder.schema import CLUSTERS, EXAMPLES, HISTOGRAM_EDGES, IMPORTANCE, METRIC_NAMES, METRICS, NEIGHBOURS, \
    TOKENS, WEIGHTS
from tests import render_fixtures as fixtures

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "moby-dick.jsonl"
REFERENCE_LAYERS, REFERENCE_D_MLP, D_MODEL = 12, 3072, 768  # GPT-2 small
REFERENCE_NEURONS = REFERENCE_LAYERS * REFERENCE_D_MLP
EXAMPLES_PER_NEURON = 100
CONTEXT = 1024  # the reference workload's sequence length
FEATURE_COUNTS = (5, 10)
PAGES_BUDGET = 1_000_000_000  # GitHub Pages: a published site of at most 1 GB
NEIGHBOUR_SLOTS, NEIGHBOUR_FILL = 20, 0.68  # neighbour_count's default; the embedded build fills 13.6 of 20 slots
FEATURE_DIM = 32  # the synthetic embeddings' width: only the clustering sees them


def corpus_tokens(context: int, max_sequences: int) -> tuple[np.ndarray, list[str]]:
    """The embedded corpus packed into sequences of `context` tokens by the embedded model's tokenizer, and that
    tokenizer's vocabulary (display strings)."""
    from transformers import AutoTokenizer

    cfg = fixtures.render_config(Path("."), data_files=[str(CORPUS)], context_length=context,
                                 max_sequences=max_sequences)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_folder()))
    tokens, _ = tokenise_corpus(cfg, tokenizer)
    return tokens.astype(np.int32), load_vocabulary(cfg)


def synthetic_config(folder: Path, layers: int, max_sequences: int) -> AtlasConfig:
    """The reference workload's settings (defaults except what the tiny fixture's config sets) for `layers` layers."""
    return fixtures.render_config(folder, name="gpt2-small-synthetic", context_length=CONTEXT,
                                  max_sequences=max_sequences, max_examples=EXAMPLES_PER_NEURON, window_before=20,
                                  window_after=4, layers=list(range(layers)), neighbour_count=NEIGHBOUR_SLOTS,
                                  workers=1)


def windows(rng, act: np.ndarray, pos: np.ndarray, cfg: AtlasConfig, context: int) -> np.ndarray:
    """[n, W] activations around each max token: Laplace noise around 0 relative to the example's activation (the
    embedded build's windows: 10th percentile −0.12, median 0.002, 90th 0.24 of it), the max token exact, NaN
    outside the sequence."""
    offsets = np.arange(-cfg.window_before, cfg.window_after + 1)
    window = np.clip(rng.laplace(0.0, 0.12, (len(act), len(offsets))), -0.6, 0.95) * act[:, None]
    window[:, cfg.window_before] = act
    positions = pos[:, None] + offsets[None, :]
    window[(positions < 0) | (positions >= context)] = np.nan
    return window.astype(np.float32)


def importances(rng, pos: np.ndarray, before: int) -> np.ndarray:
    """[n, before + 1] importances: most near 0 and a tenth high (the embedded build: median 0.006, 90th
    percentile 0.72), the max token 1, NaN before the sequence and at BOS."""
    n = len(pos)
    high = rng.random((n, before + 1)) < 0.1
    scores = np.where(high, rng.uniform(0.3, 1.0, (n, before + 1)), np.minimum(rng.exponential(0.02, (n, before + 1)),
                                                                              1.0))
    scores[:, before] = 1.0
    scores[pos[:, None] + np.arange(-before, 1)[None, :] <= 0] = np.nan
    return scores.astype(np.float32)


def neuron_clusters(rng, features: int, threshold: float) -> cluster.NeuronClusters:
    """The real clustering of 100 synthetic embeddings drawn around `features` well separated directions, with
    Zipf-like sizes (every feature present), so the cut finds exactly `features` clusters."""
    labels = rng.choice(features, EXAMPLES_PER_NEURON, p=(w := 1.0 / np.arange(1, features + 1)) / w.sum())
    labels[rng.choice(EXAMPLES_PER_NEURON, features, replace=False)] = np.arange(features)
    # Orthogonal directions (cosine distance 1 between features), each far longer than the noise (≈ 0.02 within).
    centres = np.linalg.qr(rng.normal(size=(FEATURE_DIM, features)))[0].T * np.sqrt(FEATURE_DIM)
    vectors = centres[labels] + rng.normal(scale=0.15, size=(EXAMPLES_PER_NEURON, FEATURE_DIM))
    return cluster.cluster_neuron(vectors, threshold)


def write_layer(cfg: AtlasConfig, rng, layer: int, tokens: np.ndarray, vocab_size: int, d_mlp: int,
                features: int) -> dict[str, np.ndarray]:
    """Collect, embed, cluster and importance artefacts of one layer; returns its cluster arrays."""
    paths = AtlasPaths.of(cfg)
    n_seq, context = tokens.shape
    n_ex = d_mlp * EXAMPLES_PER_NEURON
    maxima = np.exp(rng.normal(np.log(2.0), 0.5, d_mlp)).astype(np.float32)
    seq = np.concatenate([np.sort(rng.choice(n_seq, EXAMPLES_PER_NEURON, replace=False)) for _ in range(d_mlp)])
    pos = rng.integers(1, context, n_ex)
    owner = np.repeat(np.arange(d_mlp), EXAMPLES_PER_NEURON)
    act = maxima[owner] * rng.uniform(cfg.threshold, 1.0, n_ex)
    act[np.arange(d_mlp) * EXAMPLES_PER_NEURON + rng.integers(0, EXAMPLES_PER_NEURON, d_mlp)] = maxima
    act = act.astype(np.float32)
    offsets = np.arange(d_mlp + 1, dtype=np.int64) * EXAMPLES_PER_NEURON
    EXAMPLES.write_npz(paths.set_file("collect", f"L{layer}"), max_activation=maxima, observed_max=maxima,
                       offsets=offsets, seq=seq.astype(np.int32), pos=pos.astype(np.int32), act=act, pre=act,
                       pre_linear=np.zeros(n_ex, np.float32), window=windows(rng, act, pos, cfg, context),
                       vector_index=np.zeros(n_ex, np.int32), vector_seq=np.zeros(1, np.int32),
                       vector_pos=np.zeros(1, np.int32), vectors=np.zeros((1, D_MODEL), np.float32),
                       histogram=fixtures.histograms(rng, d_mlp), histogram_edges=HISTOGRAM_EDGES,
                       **fixtures.interval_examples(cfg, maxima.tolist(), n_seq, context))
    WEIGHTS.write_npz(paths.set_file("embed", f"L{layer}"), w=np.zeros((D_MODEL, d_mlp), np.float32),
                      b=np.zeros(d_mlp, np.float32),
                      logit_top_ids=rng.integers(0, vocab_size, (d_mlp, 10)).astype(np.int32),
                      logit_top_values=np.sort(rng.uniform(0.5, 3, (d_mlp, 10)))[:, ::-1].astype(np.float32),
                      logit_bottom_ids=rng.integers(0, vocab_size, (d_mlp, 10)).astype(np.int32),
                      logit_bottom_values=np.sort(rng.uniform(-3, -0.5, (d_mlp, 10))).astype(np.float32))
    arrays = cluster.set_arrays([neuron_clusters(rng, features, cfg.cluster_threshold) for _ in range(d_mlp)],
                                offsets)
    found = np.diff(arrays["cluster_offsets"])
    if not np.all(found == features):
        log.warning("site scale: %d of %d neurons clustered into other than %d features",
                    int((found != features).sum()), d_mlp, features)
    CLUSTERS.write_npz(paths.set_file("cluster", f"L{layer}"), **arrays)
    IMPORTANCE.write_npz(paths.set_file("importance", f"L{layer}"), importance=importances(rng, pos, cfg.window_before),
                         normaliser=np.zeros(n_ex, np.int8), clean=act,
                         masked=np.zeros((n_ex, cfg.window_before + 1), np.float32))
    return {**arrays, "max_activation": maxima}


def write_neighbours(paths: AtlasPaths, layers: list[dict[str, np.ndarray]], rng) -> None:
    """Similar features: each feature fills a binomial share of the slots with features of other neurons, chosen
    uniformly, most similar first."""
    counts = np.concatenate([np.diff(arrays["cluster_offsets"]) for arrays in layers])
    feature_unit = np.repeat(np.arange(len(counts)), counts)  # a unit's row across layers
    first = np.r_[0, np.cumsum(counts)]
    f, units = len(feature_unit), len(counts)
    other = (feature_unit[:, None] + 1 + rng.integers(0, units - 1, (f, NEIGHBOUR_SLOTS))) % units
    index = first[other] + (rng.random((f, NEIGHBOUR_SLOTS)) * counts[other]).astype(np.int64)
    filled = np.arange(NEIGHBOUR_SLOTS)[None, :] < rng.binomial(NEIGHBOUR_SLOTS, NEIGHBOUR_FILL, f)[:, None]
    similarity = -np.sort(-rng.uniform(0.5, 1.0, (f, NEIGHBOUR_SLOTS)), axis=1)
    d_mlp = len(layers[0]["max_activation"])
    NEIGHBOURS.write_npz(paths.neighbours, feature_set=(feature_unit // d_mlp).astype(np.int32),
                         feature_unit=(feature_unit % d_mlp).astype(np.int32),
                         feature_cluster=np.concatenate([np.arange(c) for c in counts]).astype(np.int32),
                         neighbour_index=np.where(filled, index, -1),
                         neighbour_similarity=np.where(filled, similarity, 0.0).astype(np.float32))


def write_atlas(cfg: AtlasConfig, tokens: np.ndarray, vocab_size: int, d_mlp: int, features: int,
                seed: int = 0) -> None:
    """Every artefact render reads, for cfg.layers layers of d_mlp neurons with `features` features each."""
    rng = np.random.default_rng(seed)
    paths = AtlasPaths.of(cfg)
    TOKENS.write_npz(paths.tokens, tokens=tokens, packing=np.array('{"bos_token_id": 1}'))
    layers = [write_layer(cfg, rng, layer, tokens, vocab_size, d_mlp, features) for layer in cfg.layers]
    METRICS.write_npz(paths.metrics_table,
                      set_index=np.repeat(np.arange(len(layers), dtype=np.int32), d_mlp),
                      unit=np.tile(np.arange(d_mlp, dtype=np.int32), len(layers)),
                      max_activation=np.concatenate([arrays["max_activation"] for arrays in layers]),
                      **{name: np.concatenate([arrays[name] for arrays in layers]) for name in METRIC_NAMES})
    write_neighbours(paths, layers, rng)
    fixtures.write_report(paths)
    fixtures.write_collect_meta(cfg, "synthetic GPT-2 small (embedded tokenizer, Moby-Dick)", cfg.layers,
                                REFERENCE_LAYERS, d_mlp, D_MODEL, len(tokens), tokens.shape[1])


# Features are sections of their unit's page (builder/render/pages.py), so unit pages carry them.
FILE_KINDS = (("unit pages", re.compile(r"/N\d+/index\.html$")),
              ("neuron sidecars", re.compile(r"/N\d+/neuron\.(json|bin)$")),
              ("similar sidecars", re.compile(r"/N\d+/similar\.(json|bin)$")),
              ("search index", re.compile(r"/data/search/")), ("unit table", re.compile(r"/data/neurons")))


def published_breakdown(site_dir: Path) -> dict[str, int]:
    """Published bytes (file:// twins left out) by kind of file; the rest (static files, shared data, model pages)
    as "shared"."""
    totals = dict.fromkeys([name for name, _ in FILE_KINDS] + ["shared"], 0)
    for path in site_dir.rglob("*"):
        if path.is_file() and not path.name.endswith(FILE_COPY_SUFFIX):
            name = next((name for name, pattern in FILE_KINDS if pattern.search(path.as_posix())), "shared")
            totals[name] += path.stat().st_size
    return totals


def release_bytes(site_dir: Path) -> dict[str, int]:
    """What a release adds to the published site (builder/release.py): its compressed manifest (every data file's
    path, bytes and sha256; the bulk files, a few per subject set, left out) and the growth of every page's stamped
    regions from "unreleased" to the release id and the manifest's sha256."""
    import gzip

    from builder.release import DATA, GZIP_LEVEL, ID_HEX, REGION, entries, manifest_bytes, site_files

    found = site_files(site_dir)
    files = entries(site_dir, list(found.data), DATA, "manifest")
    manifest = len(gzip.compress(manifest_bytes({"files": files}), compresslevel=GZIP_LEVEL, mtime=0))
    stamped = {b"release": len("2026-01-01-") + ID_HEX, b"manifest": 64}
    growth = 0
    for page in found.pages:
        for match in REGION.finditer((site_dir / page).read_bytes()):
            text = match.group(0).split(b"-->", 1)[1].split(b"<!--", 1)[0]
            growth += stamped[match.group(1)] - len(text)
    return {"release manifest": manifest, "page stamps": growth}


def render_slice(folder: Path, tokens: np.ndarray, vocabulary: list[str], layers: int, d_mlp: int,
                 features: int) -> dict:
    """Write and render a synthetic atlas of `layers` × d_mlp neurons; its render figures."""
    shutil.rmtree(folder, ignore_errors=True)
    cfg = synthetic_config(folder, layers, len(tokens))
    write_atlas(cfg, tokens, len(vocabulary), d_mlp, features)
    started = time.perf_counter()
    stats = render_site(cfg, vocabulary=vocabulary)
    seconds = time.perf_counter() - started
    breakdown = {**published_breakdown(Path(cfg.site_dir)), **release_bytes(Path(cfg.site_dir))}
    shutil.rmtree(folder, ignore_errors=True)
    n = stats["neurons"]
    published = stats["total_bytes"] + breakdown["release manifest"] + breakdown["page stamps"]
    return {"layers": layers, "neurons": stats["neurons"], "mean_clusters": stats["mean_clusters"],
            "mean_examples": stats["mean_examples"], "published_bytes": published,
            "bytes_per_neuron": round(published / n, 1), "render_seconds": round(seconds, 2),
            "neurons_per_second": round(n / seconds, 1),
            "bytes_per_neuron_by_kind": {name: round(total / n, 1) for name, total in breakdown.items()}}


def extrapolate(points: list[dict], key: str, neurons: int) -> float:
    """`key` at `neurons` from the straight line through the measured points (least squares on neurons)."""
    x = np.array([p["neurons"] for p in points], np.float64)
    y = np.array([p[key] for p in points], np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept + slope * neurons)


def measure(out_dir: Path, quick: bool) -> dict:
    """Bytes per neuron of the published site and render time, at 5 and 10 features per neuron, measured on slices
    of 1 and 2 layers (quick: 1 and 2 slices of 128 neurons) and extrapolated to GPT-2 small's 36,864 neurons."""
    d_mlp = 128 if quick else REFERENCE_D_MLP
    tokens, vocabulary = corpus_tokens(CONTEXT, 0)
    budget = PAGES_BUDGET / REFERENCE_NEURONS
    figures = {"neurons_reference": REFERENCE_NEURONS, "examples_per_neuron": EXAMPLES_PER_NEURON,
               "corpus_sequences": len(tokens), "context": CONTEXT, "quick": quick}
    for features in FEATURE_COUNTS:
        points = [render_slice(Path(out_dir) / f"site-{features}", tokens, vocabulary, layers, d_mlp, features)
                  for layers in (1, 2)]
        total = extrapolate(points, "published_bytes", REFERENCE_NEURONS)
        seconds = extrapolate(points, "render_seconds", REFERENCE_NEURONS)
        figures[f"features_{features}"] = {
            "measured": points,
            "bytes_per_neuron": {"name": f"published bytes per neuron at {features} features (extrapolated to "
                                         f"{REFERENCE_NEURONS} neurons)", "value": round(total / REFERENCE_NEURONS, 1),
                                 "unit": "B", "target": round(budget, 1), "met": bool(total <= PAGES_BUDGET)},
            "site_bytes": {"name": "published site", "value": round(total), "unit": "B", "target": PAGES_BUDGET,
                           "met": bool(total <= PAGES_BUDGET)},
            "render_seconds": {"name": f"render time for {REFERENCE_NEURONS} neurons on one worker (extrapolated)",
                               "value": round(seconds, 1), "unit": "s"},
        }
    return figures


if __name__ == "__main__":
    import json
    import sys

    logging.basicConfig(level=logging.INFO)
    folders = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(json.dumps(measure(Path(folders[0] if folders else "build/scale"), "--quick" in sys.argv), indent=1))
