"""Similar features: for each feature cluster, its nearest features of all other neurons, in all layers.

Each feature is represented by its central example: by default the pre-MLP vector at that example's max token, as
the original method does (`neighbour_space = "pre_mlp"`), or the neuron embedding of that example ("embedding").
Search is approximate nearest neighbours with PyNNDescent (cosine, fixed seed, one thread so results reproduce);
when there are too few features for a neighbour graph the search is exact. Features of the same neuron are never
neighbours. Up to `neighbour_count` neighbours are kept, those with cosine similarity ≥ `neighbour_threshold`;
missing slots hold index -1 and similarity NaN.
"""

from __future__ import annotations

import logging

import numpy as np
from jaxtyping import Float, Int

from builder import __version__
from builder.artefacts import read_npz, write_json, write_npz
from builder.cluster import read_layer_clusters
from builder.collect import read_collect_meta, read_layer_examples
from builder.config import AtlasConfig
from builder.embed import neuron_embeddings, read_layer_weights
from builder.paths import AtlasPaths
from builder.stage import begin_stage, peak_rss_mb, progress, stage_is_done

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "neighbours"
META_KIND = "neighbours-meta"


def feature_table(paths: AtlasPaths, layers: list[int], space: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every feature (layer, neuron, cluster), ordered so, with its central example's search vector."""
    columns = {"feature_layer": [], "feature_neuron": [], "feature_cluster": []}
    vectors = []
    with progress(total=len(layers), desc="neighbours", unit="layer") as bar:
        for layer in layers:
            examples = read_layer_examples(paths, layer)
            clusters = read_layer_clusters(paths, layer)
            counts = np.diff(clusters["cluster_offsets"])
            neurons = np.repeat(np.arange(len(counts)), counts)
            central = clusters["cluster_central"]
            columns["feature_layer"].append(np.full(len(central), layer, np.int32))
            columns["feature_neuron"].append(neurons.astype(np.int32))
            columns["feature_cluster"].append(np.concatenate([np.arange(c) for c in counts]).astype(np.int32)
                                              if len(counts) else np.zeros(0, np.int32))
            pre_mlp = examples.vectors[examples.vector_index[central]]
            if space == "embedding":
                weights = read_layer_weights(paths, layer)
                pre_mlp = np.stack([neuron_embeddings(v[None], weights, n)[0] for v, n in zip(pre_mlp, neurons)]) \
                    if len(central) else np.zeros((0, 2 * pre_mlp.shape[1] if weights.gated else pre_mlp.shape[1]))
            vectors.append(pre_mlp.astype(np.float32))
            bar.update(1)
    table = {name: np.concatenate(parts) for name, parts in columns.items()}
    return table, np.concatenate(vectors)


def exact_neighbours(vectors: Float[np.ndarray, "f d"], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine neighbours (self included), as (indices [f, k], distances [f, k])."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1, norms)
    indices, distances = [], []
    for start in range(0, len(unit), 1024):
        distance = 1.0 - unit[start:start + 1024] @ unit.T
        order = np.argsort(distance, axis=1, kind="stable")[:, :k]
        indices.append(order)
        distances.append(np.take_along_axis(distance, order, axis=1))
    return np.concatenate(indices), np.concatenate(distances)


def approximate_neighbours(vectors: Float[np.ndarray, "f d"], k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PyNNDescent cosine neighbour graph (self included), or exact search when the graph would be degenerate."""
    if len(vectors) <= max(2 * k, 64):
        return exact_neighbours(vectors, k)
    from pynndescent import NNDescent

    index = NNDescent(vectors, metric="cosine", n_neighbors=k, random_state=seed, n_jobs=1, verbose=False)
    indices, distances = index.neighbor_graph
    return indices, distances


def similar_features(table: dict[str, np.ndarray], vectors: np.ndarray, count: int, threshold: float, seed: int
                     ) -> tuple[Int[np.ndarray, "f count"], Float[np.ndarray, "f count"]]:
    """Per feature, up to `count` most similar features of other neurons with similarity ≥ threshold."""
    n = len(vectors)
    result_index = np.full((n, count), -1, np.int32)
    result_similarity = np.full((n, count), np.nan, np.float32)
    if n == 0:
        return result_index, result_similarity
    owner = table["feature_layer"].astype(np.int64) * 1_000_000 + table["feature_neuron"]
    per_neuron = int(np.unique(owner, return_counts=True)[1].max())
    k = min(n, count + per_neuron)
    indices, distances = approximate_neighbours(vectors, k, seed)
    for row in range(n):
        similarity = 1.0 - distances[row]
        keep = (owner[indices[row]] != owner[row]) & (indices[row] >= 0) & (similarity >= threshold)
        chosen = indices[row][keep][:count]
        result_index[row, :len(chosen)] = chosen
        result_similarity[row, :len(chosen)] = similarity[keep][:count]
    return result_index, result_similarity


def run(cfg: AtlasConfig) -> None:
    paths = AtlasPaths.of(cfg)
    if stage_is_done(paths.neighbours_meta, META_KIND, SCHEMA_VERSION, cfg):
        log.info("neighbours: up to date")
        return
    layers = read_collect_meta(paths, cfg)["layers"]
    begin_stage(paths.stage("neighbours"), cfg)
    table, vectors = feature_table(paths, layers, cfg.neighbour_space)
    log.info("neighbours: searching %d features", len(vectors))
    index, similarity = similar_features(table, vectors, cfg.neighbour_count, cfg.neighbour_threshold, cfg.seed)
    write_npz(paths.neighbours, KIND, SCHEMA_VERSION, neighbour_index=index, neighbour_similarity=similarity,
              **table)
    write_json(paths.neighbours_meta, {"kind": META_KIND, "schema_version": SCHEMA_VERSION,
                                       "config_hash": cfg.config_hash(), "code_version": __version__, "peak_rss_mb": peak_rss_mb(),
                                       "n_features": int(len(vectors)), "space": cfg.neighbour_space})


def read_neighbours(paths: AtlasPaths) -> dict[str, np.ndarray]:
    return read_npz(paths.neighbours, KIND, SCHEMA_VERSION)
