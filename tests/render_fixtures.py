"""A tiny synthetic atlas for the renderer's tests: every upstream artefact written with the real writers (kinds and
schema versions from the stage modules), clusters computed by the real clustering code, and a vocabulary full of
hostile tokens. No model, no tokenizer, no network: building it takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from builder import cluster
from builder.config import AtlasConfig, config_from_dict
from builder.paths import AtlasPaths
from builder.pipeline import STAGES
from builder.schema import (CLUSTERS, EXAMPLES, HISTOGRAM_EDGES, IMPORTANCE, METRIC_NAMES, METRICS, NEIGHBOURS,
                            REPORT, TOKENS, WEIGHTS)
from builder.subjects import mlp_layer

HOSTILE = {
    "script": "</script><script>alert(1)</script>",
    "img": "\"><img src=x onerror=alert(1)>",
    "template": "{{7*7}}",
    "entity": "&amp;",
    "rtl": "\u202eevil\u202c",
    "zero_width": "zero\u200bwidth\u200d",
    "surrogate": "lone\ud800surrogate",
    "newline": "\n",
}

WORDS = [" the", " whale", " sea", " ship", " captain", " Ahab", ".", ",", " white", " harpoon", " deck", " sail",
         " wind", " wave", " crew", " boat", " line", " oil", " night", " morning", " and", " of", " a", " to"]

VOCAB = ["<s>"] + list(HOSTILE.values()) + WORDS  # id 0 is BOS; hostile tokens are ids 1..8
RANDOM_VOCAB = len(VOCAB)  # random tokens are drawn below this id
# A word split into two tokens (" Ah" + "ab"), placed once at a max token (layer 2, neuron 0, sequence 6).
SPLIT_WORD = (" Ah", "ab")
VOCAB += list(SPLIT_WORD)
SPLIT_IDS = (RANDOM_VOCAB, RANDOM_VOCAB + 1)
SPLIT_AT = (6, 10)  # sequence, position of "ab"
HOSTILE_ID = {name: 1 + i for i, name in enumerate(HOSTILE)}

LAYERS = (0, 2)
D_MLP = 5
N_SEQ = 24
CONTEXT = 16
D_MODEL = 6
K_NEIGHBOURS = 3
# Examples per neuron: a rich neuron, one with a single example, a dead neuron, two more.
EXAMPLE_COUNTS = {0: [8, 1, 0, 6, 3], 2: [7, 2, 5, 0, 4]}


def render_config(folder: Path, **overrides) -> AtlasConfig:
    raw = {
        "name": "tiny-atlas", "data_files": ["corpus.jsonl"], "context_length": CONTEXT, "max_examples": 8,
        "window_before": 6, "window_after": 3, "layers": list(LAYERS), "workers": 1, "build_date": "2024-01-01",
        "out_dir": str(folder / "build"), "site_dir": str(folder / "site"), "neighbour_count": K_NEIGHBOURS,
        "mnist_dir": str(folder / "mnist"),  # none: the repo's own build/mnist must not leak into fixtures
    }
    raw.update(overrides)
    return config_from_dict(raw)


def write_artefacts(cfg: AtlasConfig, seed: int = 0) -> None:
    """Write collect, embed, cluster, importance, neighbours and report artefacts for `cfg` into cfg.out_dir."""
    rng = np.random.default_rng(seed)
    paths = AtlasPaths.of(cfg)
    wb, wa = cfg.window_before, cfg.window_after
    tokens = rng.integers(len(HOSTILE) + 1, RANDOM_VOCAB, size=(N_SEQ, CONTEXT)).astype(np.int32)
    tokens[:, 0] = 0
    # Hostile tokens everywhere they can do harm: at max tokens and in context.
    tokens[1, 1:1 + len(HOSTILE)] = list(HOSTILE_ID.values())  # all inside the window of position 5
    tokens[3, 7] = HOSTILE_ID["script"]
    tokens[4, 2:6] = [HOSTILE_ID["img"], HOSTILE_ID["rtl"], HOSTILE_ID["template"], HOSTILE_ID["surrogate"]]
    tokens[SPLIT_AT[0], SPLIT_AT[1] - 1:SPLIT_AT[1] + 1] = SPLIT_IDS

    TOKENS.write_npz(paths.tokens, tokens=tokens, packing=np.array('{"bos_token_id": 0, "build_date": "2024-01-01"}'))
    all_clusters = {}
    for layer in LAYERS:
        counts = EXAMPLE_COUNTS[layer]
        seqs, poss, acts, windows, maxima = [], [], [], [], []
        for neuron, count in enumerate(counts):
            peak = float(rng.uniform(2.0, 9.0))
            maxima.append(peak if count else float(-rng.uniform(0.1, 1.0)))
            chosen = np.sort(rng.choice(N_SEQ, size=count, replace=False))
            if layer == 0 and neuron == 0:
                chosen[:2] = [1, 4]  # the hostile sequences
                chosen = np.sort(chosen)
            if layer == 2 and neuron == 0 and SPLIT_AT[0] not in chosen:
                chosen = np.sort(np.r_[SPLIT_AT[0], chosen[1:]])
            for seq in chosen:
                pos = {1: 5, 4: 3, 3: 7, SPLIT_AT[0]: SPLIT_AT[1]}.get(int(seq), int(rng.integers(1, CONTEXT)))
                act = peak * float(rng.uniform(0.8, 1.0)) if seq != chosen[0] else peak
                offsets = np.arange(-wb, wa + 1)
                window = rng.normal(0.0, 0.15 * peak, size=len(offsets)).astype(np.float32)
                window[wb - 2] = -0.4 * peak  # a strongly negative context token
                window[wb] = act
                window[(pos + offsets < 0) | (pos + offsets >= CONTEXT)] = np.nan
                seqs.append(seq), poss.append(pos), acts.append(act), windows.append(window)
        n_ex = len(seqs)
        offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
        vectors = rng.normal(size=(n_ex, D_MODEL)).astype(np.float32)
        EXAMPLES.write_npz(paths.set_file("collect", f"L{layer}"),
                  max_activation=np.array(maxima, np.float32), observed_max=np.array(maxima, np.float32),
                  offsets=offsets, seq=np.array(seqs, np.int32), pos=np.array(poss, np.int32),
                  act=np.array(acts, np.float32), pre=np.array(acts, np.float32),
                  pre_linear=np.zeros(n_ex, np.float32), window=np.array(windows, np.float32).reshape(n_ex, -1),
                  vector_index=np.arange(n_ex, dtype=np.int32), vector_seq=np.array(seqs, np.int32),
                  vector_pos=np.array(poss, np.int32), vectors=vectors,
                  histogram=histograms(rng, D_MLP), histogram_edges=HISTOGRAM_EDGES,
                  **interval_examples(cfg, maxima, N_SEQ, CONTEXT))
        top = rng.integers(1, RANDOM_VOCAB, size=(D_MLP, 10)).astype(np.int32)
        top[0, :5] = [HOSTILE_ID[name] for name in ("script", "img", "newline", "template", "entity")]
        bottom = rng.integers(1, RANDOM_VOCAB, size=(D_MLP, 10)).astype(np.int32)
        bottom[0, :3] = [HOSTILE_ID[name] for name in ("rtl", "zero_width", "surrogate")]
        WEIGHTS.write_npz(paths.set_file("embed", f"L{layer}"),
                  w=rng.normal(size=(D_MODEL, D_MLP)).astype(np.float32), b=np.zeros(D_MLP, np.float32),
                  logit_top_ids=top, logit_top_values=np.sort(rng.uniform(0.5, 3, (D_MLP, 10)))[:, ::-1].astype(
                      np.float32),
                  logit_bottom_ids=bottom,
                  logit_bottom_values=np.sort(rng.uniform(-3, -0.5, (D_MLP, 10))).astype(np.float32))
        results = []
        for neuron, count in enumerate(counts):
            # Two well separated directions plus noise: real clustering finds two or more features.
            centres = rng.normal(size=(2, 12))
            features = centres[np.arange(count) % 2] + rng.normal(scale=0.35, size=(count, 12))
            results.append(cluster.cluster_neuron(features, cfg.cluster_threshold))
        arrays = cluster.set_arrays(results, offsets)
        CLUSTERS.write_npz(paths.set_file("cluster", f"L{layer}"), **arrays)
        all_clusters[layer] = arrays
        scores = rng.uniform(0, 1, size=(n_ex, wb + 1)).astype(np.float32)
        scores[:, wb] = 1.0
        positions = np.array(poss)[:, None] + np.arange(-wb, 1)[None, :]
        scores[positions <= 0] = np.nan  # before the sequence, and the BOS position
        IMPORTANCE.write_npz(paths.set_file("importance", f"L{layer}"),
                  importance=scores, normaliser=np.zeros(n_ex, np.int8), clean=np.array(acts, np.float32),
                  masked=np.zeros((n_ex, wb + 1), np.float32))
    METRICS.write_npz(paths.metrics_table,
                      set_index=np.repeat(np.arange(len(LAYERS), dtype=np.int32), D_MLP),
                      unit=np.tile(np.arange(D_MLP, dtype=np.int32), len(LAYERS)),
                      max_activation=np.concatenate([np.load(paths.set_file("collect", f"L{layer}"))["max_activation"]
                                                     for layer in LAYERS]),
                      **{name: np.concatenate([all_clusters[layer][name] for layer in LAYERS])
                         for name in METRIC_NAMES})
    write_neighbours(paths, all_clusters, rng)
    write_report(paths)
    write_collect_meta(cfg, "synthetic/\"quoted\" <model>", LAYERS, 3, D_MLP, D_MODEL, N_SEQ, CONTEXT)


def write_collect_meta(cfg: AtlasConfig, model: str, layers, n_layers: int, d_mlp: int, d_model: int, n_seq: int,
                       context: int) -> None:
    """Collect's meta for MLP `layers` of a model of that shape, over n_seq sequences of `context` tokens."""
    STAGES["collect"].meta_type.write_json(AtlasPaths.of(cfg).meta("collect"), {
        "subject_sets": [mlp_layer(layer, d_mlp, d_model, False).describe() for layer in layers],
        "code_version": "0.1.0", "model": model, "model_revision": "rev-1", "n_layers": n_layers,
        "d_model": d_model, "d_mlp": d_mlp, "gated": False, "layers": list(layers), "dataset": ["corpus.jsonl"],
        "n_sequences": n_seq, "n_tokens": n_seq * context, "context_length": context,
        "packing": {"bos_token_id": 0, "build_date": "2024-01-01"}, "threshold": cfg.threshold,
        "max_examples": cfg.max_examples, "reference_maxima": False, "window_before": cfg.window_before,
        "window_after": cfg.window_after, "forwarded_sequences_last_run": n_seq, "build_date": "2024-01-01"})


def interval_examples(cfg: AtlasConfig, maxima: list[float], n_seq: int, context: int) -> dict[str, np.ndarray]:
    """Collect's interval-example arrays: for a live unit, one sequence in the middle of each interval (the second
    slot left empty), none for a dead unit."""
    shape = (len(maxima), cfg.interval_count, cfg.interval_examples)
    seq, pos = np.full(shape, -1, np.int32), np.full(shape, -1, np.int32)
    act = np.full(shape, np.nan, np.float32)
    for unit, peak in enumerate(maxima):
        if peak <= 0 or cfg.interval_examples == 0:
            continue
        for i in range(cfg.interval_count):
            seq[unit, i, 0], pos[unit, i, 0] = (3 * i + unit + 2) % n_seq, 2 + (i + unit) % (context - 2)
            act[unit, i, 0] = (i + 0.5) / cfg.interval_count * cfg.threshold * peak
    return {"interval_seq": seq, "interval_pos": pos, "interval_act": act}


def histograms(rng, n_units: int) -> np.ndarray:
    n_bins = len(HISTOGRAM_EDGES) + 1
    centre = n_bins // 2
    counts = np.zeros((n_units, n_bins), np.int32)
    for neuron in range(n_units):
        spread = np.arange(centre - 20, centre + 25)
        counts[neuron, spread] = rng.integers(0, 2000, size=len(spread)) // (1 + np.abs(spread - centre))
    return counts


def write_neighbours(paths: AtlasPaths, clusters: dict, rng) -> None:
    """The similar-features artefact with random but well-formed neighbours."""
    layer_ids, neuron_ids, cluster_ids = [], [], []
    for position, layer in enumerate(LAYERS):
        offsets = clusters[layer]["cluster_offsets"]
        for neuron in range(D_MLP):
            k = int(offsets[neuron + 1] - offsets[neuron])
            layer_ids += [position] * k
            neuron_ids += [neuron] * k
            cluster_ids += list(range(k))
    f = len(layer_ids)
    index = np.full((f, K_NEIGHBOURS), -1, np.int64)
    similarity = np.zeros((f, K_NEIGHBOURS), np.float32)
    for row in range(f):
        others = rng.permutation(np.delete(np.arange(f), row))[:int(rng.integers(0, K_NEIGHBOURS + 1))]
        index[row, :len(others)] = others
        similarity[row, :len(others)] = np.sort(rng.uniform(0.5, 1.0, len(others)))[::-1]
    NEIGHBOURS.write_npz(paths.neighbours, feature_set=np.array(layer_ids, np.int32),
                         feature_unit=np.array(neuron_ids, np.int32), feature_cluster=np.array(cluster_ids, np.int32),
                         neighbour_index=index, neighbour_similarity=similarity)


def write_report(paths: AtlasPaths) -> None:
    REPORT.write_json(paths.report, {
        "spaces": {"pre_mlp": {"median_intra": 0.35, "median_inter": 0.6, "n_neurons_intra": 6, "n_neurons_inter": 5},
                   "embedding": {"median_intra": None, "median_inter": 0.71, "n_neurons_intra": 0,
                                 "n_neurons_inter": 4}},
        "paper": {"pre_mlp": {"median_intra": 0.31, "median_inter": 0.63},
                  "embedding": {"median_intra": 0.21, "median_inter": 0.73}}})


def build_site(folder: Path, **overrides) -> AtlasConfig:
    """Synthetic artefacts plus a rendered site under `folder`; returns the config."""
    from builder import render

    cfg = render_config(folder, **overrides)
    write_artefacts(cfg)
    render.render_site(cfg, vocabulary=VOCAB)
    return cfg
