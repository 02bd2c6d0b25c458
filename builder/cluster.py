"""Cluster: each neuron's examples grouped into feature clusters by their neuron embeddings.

Per neuron: cosine distance between example embeddings, average-linkage agglomerative clustering (scipy), cut at
`cluster_threshold`. Kept: the full linkage matrix (pages draw and re-cut the dendrogram), each example's cluster, each
cluster's central example, and polysemanticity metrics.

Defined outcomes for the edge cases:
- no examples (dead at this threshold): no clusters, n_clusters 0, every distance metric NaN;
- one example: one cluster holding it, empty linkage, distance metrics NaN, largest share 1;
- identical embeddings: distance 0, so always in the same cluster;
- an all-zero embedding (cosine undefined): distance 0 to another all-zero embedding and 1 (orthogonal) to any other;
- a non-finite value in an artefact: a one-line error naming the layer and neuron.

Cluster ids are ranked by size, ties broken by first appearance in corpus order, so the same inputs give the same ids.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from builder import __version__
from builder.artefacts import read_npz, write_json, write_npz
from builder.collect import read_collect_meta, read_layer_examples
from builder.config import AtlasConfig
from builder.embed import neuron_embeddings, read_layer_weights
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.stage import begin_stage, peak_rss_mb, progress, stage_is_done, worker_count

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_KIND = "cluster-meta"
LAYER_KIND = "cluster-layer"
METRICS_KIND = "cluster-metrics"
METRIC_NAMES = ("n_examples", "n_clusters", "max_distance", "mean_distance", "intra_distance", "inter_distance",
                "largest_share")


def cosine_distances(features: Float[np.ndarray, "n d"]) -> Float[np.ndarray, " n_pairs"]:
    """Condensed cosine distances in [0, 2], with all-zero rows defined as above."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1)
    zero = norms == 0
    safe = np.where(zero[:, None], 1.0, features / np.where(zero, 1.0, norms)[:, None])
    distances = np.clip(1.0 - safe @ safe.T, 0.0, 2.0)
    distances[zero[:, None] != zero[None, :]] = 1.0
    distances[zero[:, None] & zero[None, :]] = 0.0
    np.fill_diagonal(distances, 0.0)
    return squareform(distances, checks=False)


@dataclass(frozen=True)
class NeuronClusters:
    labels: Int[np.ndarray, " n"]  # cluster id per example, 0 = largest
    linkage: Float[np.ndarray, "n_minus_1 4"]
    central: Int[np.ndarray, " k"]  # index (within the neuron's examples) of each cluster's central example
    sizes: Int[np.ndarray, " k"]
    metrics: dict[str, float]


def ranked_labels(raw: Int[np.ndarray, " n"]) -> Int[np.ndarray, " n"]:
    """Renumber clusters 0..k-1 by size (largest first), ties by first appearance in corpus order."""
    ids, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    return rank[np.searchsorted(ids, raw)].astype(np.int32)


def central_examples(square: Float[np.ndarray, "n n"], labels: Int[np.ndarray, " n"], k: int) -> np.ndarray:
    """Per cluster, the member with the highest mean cosine similarity to the other members (first on ties)."""
    central = np.zeros(k, np.int32)
    for cluster in range(k):
        members = np.flatnonzero(labels == cluster)
        if len(members) > 1:
            within = square[np.ix_(members, members)]
            central[cluster] = members[np.argmin(within.sum(axis=1))]
        else:
            central[cluster] = members[0]
    return central


def cluster_neuron(features: Float[np.ndarray, "n d"], threshold: float) -> NeuronClusters:
    n = len(features)
    if n == 0:
        metrics = dict.fromkeys(METRIC_NAMES, float("nan"))
        metrics.update(n_examples=0, n_clusters=0)
        return NeuronClusters(np.zeros(0, np.int32), np.zeros((0, 4)), np.zeros(0, np.int32),
                              np.zeros(0, np.int32), metrics)
    if n == 1:
        metrics = dict.fromkeys(METRIC_NAMES, float("nan"))
        metrics.update(n_examples=1, n_clusters=1, largest_share=1.0)
        return NeuronClusters(np.zeros(1, np.int32), np.zeros((0, 4)), np.zeros(1, np.int32),
                              np.ones(1, np.int32), metrics)
    condensed = cosine_distances(features)
    tree = linkage(condensed, method="average")
    labels = ranked_labels(fcluster(tree, t=threshold, criterion="distance"))
    k = int(labels.max()) + 1
    square = squareform(condensed)
    sizes = np.bincount(labels, minlength=k).astype(np.int32)
    return NeuronClusters(labels, tree, central_examples(square, labels, k), sizes,
                          polysemanticity_metrics(condensed, labels, sizes))


def polysemanticity_metrics(condensed: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> dict[str, float]:
    n = len(labels)
    i, j = np.triu_indices(n, k=1)  # squareform's condensed order
    same = labels[i] == labels[j]
    return {
        "n_examples": n,
        "n_clusters": len(sizes),
        "max_distance": float(condensed.max()),
        "mean_distance": float(condensed.mean()),
        "intra_distance": float(condensed[same].mean()) if same.any() else float("nan"),
        "inter_distance": float(condensed[~same].mean()) if (~same).any() else float("nan"),
        "largest_share": float(sizes.max() / n),
    }


def check_finite(features: np.ndarray, layer: int, neuron: int) -> None:
    if not np.isfinite(features).all():
        raise ArtefactError(f"layer {layer} neuron {neuron} has non-finite values in its examples; the collect "
                            "artefact is corrupt or the model overflowed: re-run collect (try dtype = \"float32\")")


# Workers read the layer's artefacts once (files, not globals passed around) and cluster a range of neurons.
_worker: dict = {}


def single_threaded_blas() -> None:
    """Workers already use every core; a multi-threaded BLAS inside each would fight them for it."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def _init_worker(root: str, site: str, layer: int, space: str, threshold: float, parallel: bool) -> None:
    if parallel:
        single_threaded_blas()
    paths = AtlasPaths(root=Path(root), site=Path(site))
    _worker.update(examples=read_layer_examples(paths, layer), layer=layer, space=space, threshold=threshold,
                   weights=read_layer_weights(paths, layer) if space == "embedding" else None)


def neuron_features(examples, weights, neuron: int, space: str) -> np.ndarray:
    vectors = examples.neuron_vectors(neuron)
    return neuron_embeddings(vectors, weights, neuron) if space == "embedding" else vectors


def _cluster_range(neurons: range) -> list[NeuronClusters]:
    results = []
    for neuron in neurons:
        features = neuron_features(_worker["examples"], _worker["weights"], neuron, _worker["space"])
        check_finite(features, _worker["layer"], neuron)
        results.append(cluster_neuron(features, _worker["threshold"]))
    return results


def cluster_layer(paths: AtlasPaths, layer: int, d_mlp: int, space: str, threshold: float, workers: int,
                  bar: progress | None = None) -> list[NeuronClusters]:
    """Cluster every neuron of a layer in `space` ("embedding" or "pre_mlp"), across `workers` processes."""
    init = (str(paths.root), str(paths.site), layer, space, threshold, workers > 1)
    chunk = max(1, min(256, d_mlp // (workers * 4) or 1))
    ranges = [range(start, min(d_mlp, start + chunk)) for start in range(0, d_mlp, chunk)]
    results: list[NeuronClusters] = []
    if workers == 1:
        _init_worker(*init)
        parts = map(_cluster_range, ranges)
    else:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=init)
        parts = pool.map(_cluster_range, ranges)
    try:
        for part in parts:
            results.extend(part)
            if bar is not None:
                bar.update(len(part))
    finally:
        if workers != 1:
            pool.shutdown(cancel_futures=True)
    return results


def layer_arrays(results: list[NeuronClusters], offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Flatten per-neuron results; cluster centrals become indices into the layer's example arrays."""
    n_clusters = np.array([len(r.sizes) for r in results])
    n_links = np.array([len(r.linkage) for r in results])
    return {
        "labels": np.concatenate([r.labels for r in results]).astype(np.int32),
        "cluster_offsets": np.r_[0, np.cumsum(n_clusters)].astype(np.int64),
        "cluster_central": np.concatenate([r.central + offsets[i] for i, r in enumerate(results)]).astype(np.int64),
        "cluster_size": np.concatenate([r.sizes for r in results]).astype(np.int32),
        "linkage_offsets": np.r_[0, np.cumsum(n_links)].astype(np.int64),
        "linkage": np.concatenate([r.linkage for r in results]).astype(np.float64),
        **{name: np.array([r.metrics[name] for r in results], np.float64) for name in METRIC_NAMES},
    }


def run(cfg: AtlasConfig) -> None:
    paths = AtlasPaths.of(cfg)
    if stage_is_done(paths.cluster_meta, META_KIND, SCHEMA_VERSION, cfg):
        log.info("cluster: up to date")
        return
    meta = read_collect_meta(paths, cfg)
    begin_stage(paths.stage("cluster"), cfg)
    layers, d_mlp = meta["layers"], meta["d_mlp"]
    todo = [layer for layer in layers if not _layer_done(paths, layer)]
    with progress(total=len(layers) * d_mlp, initial=(len(layers) - len(todo)) * d_mlp, desc="cluster",
              unit="neuron") as bar:
        for layer in todo:
            examples = read_layer_examples(paths, layer)
            results = cluster_layer(paths, layer, d_mlp, "embedding", cfg.cluster_threshold, worker_count(cfg),
                                    bar)
            write_npz(paths.layer_clusters(layer), LAYER_KIND, SCHEMA_VERSION,
                      **layer_arrays(results, examples.offsets))
    tables = [read_layer_clusters(paths, layer) for layer in layers]
    write_npz(paths.metrics_table, METRICS_KIND, SCHEMA_VERSION,
              layer=np.repeat(np.array(layers, np.int32), d_mlp),
              neuron=np.tile(np.arange(d_mlp, dtype=np.int32), len(layers)),
              max_activation=np.concatenate([read_layer_examples(paths, layer).max_activation for layer in layers]),
              **{name: np.concatenate([t[name] for t in tables]) for name in METRIC_NAMES})
    write_json(paths.cluster_meta, {"kind": META_KIND, "schema_version": SCHEMA_VERSION,
                                    "config_hash": cfg.config_hash(), "code_version": __version__, "peak_rss_mb": peak_rss_mb(),
                                    "cluster_threshold": cfg.cluster_threshold, "layers": layers,
                                    "layers_clustered_last_run": todo})


def _layer_done(paths: AtlasPaths, layer: int) -> bool:
    try:
        read_layer_clusters(paths, layer)
    except ArtefactError:
        return False
    return True


def read_layer_clusters(paths: AtlasPaths, layer: int) -> dict[str, np.ndarray]:
    return read_npz(paths.layer_clusters(layer), LAYER_KIND, SCHEMA_VERSION)


def read_metrics_table(paths: AtlasPaths) -> dict[str, np.ndarray]:
    return read_npz(paths.metrics_table, METRICS_KIND, SCHEMA_VERSION)
