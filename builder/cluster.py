"""Cluster: each unit's examples grouped into feature clusters by their neuron embeddings.

Per unit: cosine distance between example embeddings, agglomerative clustering (scipy), cut at `cluster_threshold`
like `fcluster(criterion="distance")`. `cluster_method` picks the linkage: "average" (the paper's HAC) or
"components", the original feature-clusters app's connected components of the graph joining two examples whose
cosine similarity is at least 1 − cluster_threshold. Components are exactly single-linkage HAC cut at the same
distance (a single-linkage merge height is the distance of the closest pair across, and fcluster joins at ≤ t, so a
pair at exactly 1 − threshold joins), so they are computed as that: the linkage matrix, the dendrogram, the browser's
re-cut and every page stay the same machinery. Kept: the full linkage matrix (pages draw and re-cut the dendrogram),
each example's cluster, each cluster's central example, and polysemanticity metrics.

Defined outcomes for the edge cases:
- no examples (dead at this threshold): no clusters, n_clusters 0, every distance metric NaN;
- one example: one cluster holding it, empty linkage, distance metrics NaN, largest share 1;
- identical embeddings: distance 0, so always in the same cluster;
- an all-zero embedding (cosine undefined): distance 0 to another all-zero embedding and 1 (orthogonal) to any other;
- a non-finite value in an artefact: a one-line error naming the subject set and unit.

Cluster ids are ranked by size, ties broken by first appearance in corpus order, so the same inputs give the same ids.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from builder.config import AtlasConfig
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.schema import (CLUSTERS, METRIC_NAMES, METRICS, collect_sets, read_clusters, read_collect_meta,
                            read_example_fields, read_examples, read_weights)
from builder.shards import unit_executor, unit_ranges
from builder.stage import StageRun, progress, worker_count
from builder.subjects import SubjectSet, neuron_embeddings

log = logging.getLogger(__name__)

# Most units one task clusters: small enough to balance a layer across workers, large enough to amortise a task.
MAX_UNITS_PER_TASK = 256

# scipy's linkage method for each `cluster_method`; see the module docstring for why components are single linkage.
LINKAGE_METHODS = {"average": "average", "components": "single"}


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


def cluster_neuron(features: Float[np.ndarray, "n d"], threshold: float, method: str = "average") -> NeuronClusters:
    """Cluster one unit's examples with `method` (a key of LINKAGE_METHODS), cut at cosine distance `threshold`."""
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
    tree = linkage(condensed, method=LINKAGE_METHODS[method])
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


def check_finite(features: np.ndarray, set_key: str, unit: int) -> None:
    if not np.isfinite(features).all():
        raise ArtefactError(f"{set_key} unit {unit} has non-finite values in its examples; the collect "
                            "artefact is corrupt or the model overflowed: re-run collect (try dtype = \"float32\")")


def single_threaded_blas() -> None:
    """Workers already use every core; a multi-threaded BLAS inside each would fight them for it."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


@dataclass(frozen=True)
class ClusterTask:
    """One unit range of one subject set, with everything needed to read its inputs from files."""

    root: str
    set_key: str
    units: range
    space: str  # "embedding" (neuron embeddings) or "pre_mlp" (the raw input vectors)
    threshold: float
    method: str  # cluster_method


@functools.lru_cache(maxsize=1)
def _set_inputs(root: str, set_key: str, space: str, stamp: tuple[int, int]):
    """A set's examples (and weights, for embeddings), read once per process for its consecutive tasks. `stamp`
    (the collect file's size and modification time) keeps a rewritten file from being served from the cache."""
    paths = AtlasPaths(root=Path(root), site=Path(root))
    weights = read_weights(paths, set_key).weights if space == "embedding" else None
    return read_examples(paths, set_key), weights


def unit_features(examples, weights, unit: int, space: str) -> np.ndarray:
    vectors = examples.unit_vectors(unit)
    return neuron_embeddings(vectors, weights, unit) if space == "embedding" else vectors


def cluster_units(task: ClusterTask) -> list[NeuronClusters]:
    stat = os.stat(AtlasPaths(Path(task.root), Path(task.root)).set_file("collect", task.set_key))
    examples, weights = _set_inputs(task.root, task.set_key, task.space, (stat.st_size, stat.st_mtime_ns))
    results = []
    for unit in task.units:
        features = unit_features(examples, weights, unit, task.space)
        check_finite(features, task.set_key, unit)
        results.append(cluster_neuron(features, task.threshold, task.method))
    return results


def cluster_set(cfg: AtlasConfig, subject: SubjectSet, space: str, bar: progress | None = None
                ) -> list[NeuronClusters]:
    """Cluster every unit of a set in `space`, as unit-range tasks across the config's workers (or Ray tasks)."""
    paths, workers = AtlasPaths.of(cfg), worker_count(cfg)
    tasks = [ClusterTask(str(paths.root.resolve()), subject.key, units, space, cfg.cluster_threshold,
                         cfg.cluster_method) for units in unit_ranges(subject.size, workers, MAX_UNITS_PER_TASK)]
    # Only workers of their own give up their BLAS threads (all of them on Ray).
    pooled = cfg.engine == "ray" or workers > 1 and len(tasks) > 1
    executor = unit_executor(cfg, workers, initializer=single_threaded_blas if pooled else None)
    results: list[NeuronClusters] = []
    for part in executor.map(cluster_units, tasks):
        results.extend(part)
        if bar is not None:
            bar.update(len(part))
    return results


def set_arrays(results: list[NeuronClusters], offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Flatten per-unit results; cluster centrals become indices into the set's example arrays."""
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


def build(run: StageRun) -> dict:
    paths, cfg = run.paths, run.cfg
    sets = collect_sets(read_collect_meta(paths))
    todo = [s for s in sets if not CLUSTERS.is_readable(paths.set_file("cluster", s.key))]
    with progress(total=sum(s.size for s in sets), initial=sum(s.size for s in sets if s not in todo),
                  desc="cluster", unit="unit") as bar:
        for s in todo:
            offsets = read_example_fields(paths, s.key, ("offsets",))["offsets"]
            results = cluster_set(cfg, s, "embedding", bar)
            CLUSTERS.write_npz(paths.set_file("cluster", s.key), **set_arrays(results, offsets))
    tables = []
    for s in sets:
        run.record(paths.set_file("cluster", s.key), CLUSTERS)
        tables.append(read_clusters(paths, s.key))
    run.write_npz(METRICS, paths.metrics_table,
                  set_index=np.repeat(np.arange(len(sets), dtype=np.int32), [s.size for s in sets]),
                  unit=np.concatenate([np.arange(s.size, dtype=np.int32) for s in sets]),
                  max_activation=np.concatenate([read_example_fields(paths, s.key, ("max_activation",))
                                                 ["max_activation"] for s in sets]),
                  **{name: np.concatenate([t[name] for t in tables]) for name in METRIC_NAMES})
    return {"cluster_threshold": cfg.cluster_threshold, "cluster_method": cfg.cluster_method,
            "sets": [s.key for s in sets], "sets_clustered_last_run": [s.key for s in todo]}
