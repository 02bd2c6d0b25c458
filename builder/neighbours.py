"""Similar features: for each feature cluster, its nearest features of all other units in subject sets that share
its vector space (`SubjectSet.space`: every MLP layer's neurons together; the latents of SAEs on one hook together).

Each feature is represented by its central example: by default the pre-MLP vector at that example's max token, as
the original method does (`neighbour_space = "pre_mlp"`), or the neuron embedding of that example ("embedding").
Each set's vectors are centred (its features' mean vector subtracted) before the cosine: the inputs of a layer share
a large common component (measured on the embedded atlas: the mean carries 61-63% of a central example's norm, and
two random features have median cosine 0.38-0.40, 5% above 0.5), so without centring every feature had 20
"neighbours" above 0.5 and the threshold thinned nothing. Centred, a random pair has median cosine ≈ 0 and the
threshold keeps only real matches. (Measured after centring: 47% of the remaining neighbour pairs are features whose
central examples are the very same token occurrence, similarity ≈ 1 within a layer; the others have median 0.71.
Such lists are genuinely full: the embedded corpus has 32,768 tokens for 78,904 features.)
Search is approximate nearest neighbours with PyNNDescent (cosine, fixed seed, one thread so results reproduce);
when there are too few features for a neighbour graph the search is exact. Features of the same unit are never
neighbours. Up to `neighbour_count` neighbours are kept, those with cosine similarity ≥ `neighbour_threshold`;
missing slots hold index -1 and similarity NaN.
"""

from __future__ import annotations

import logging

import numpy as np
from jaxtyping import Float, Int

from builder.paths import AtlasPaths
from builder.schema import (NEIGHBOURS, collect_sets, read_clusters, read_collect_meta, read_example_fields,
                            read_weights)
from builder.stage import StageRun, progress
from builder.subjects import SubjectIndex, SubjectSet, neuron_embeddings

log = logging.getLogger(__name__)

# Below this many features a neighbour graph is degenerate: search exactly instead.
EXACT_SEARCH_FEATURES = 64
# Queries per block of the exact search (a block × features distance matrix).
EXACT_BLOCK = 1024


def feature_table(paths: AtlasPaths, sets: list[SubjectSet], space: str
                  ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Every feature (set, unit, cluster), in that order, with its central example's search vector (one array per
    set: sets of different spaces differ in width)."""
    columns = {"feature_set": [], "feature_unit": [], "feature_cluster": []}
    vectors = []
    with progress(total=len(sets), desc="neighbours", unit="set") as bar:
        for position, s in enumerate(sets):
            examples = read_example_fields(paths, s.key, ("vectors", "vector_index"))
            clusters = read_clusters(paths, s.key)
            counts = np.diff(clusters["cluster_offsets"])
            units = np.repeat(np.arange(len(counts)), counts)
            central = clusters["cluster_central"]
            columns["feature_set"].append(np.full(len(central), position, np.int32))
            columns["feature_unit"].append(units.astype(np.int32))
            columns["feature_cluster"].append(np.concatenate([np.arange(c) for c in counts]).astype(np.int32)
                                              if len(counts) else np.zeros(0, np.int32))
            inputs = examples["vectors"][examples["vector_index"][central]]
            if space == "embedding":
                weights = read_weights(paths, s.key).weights
                width = inputs.shape[1] * (2 if weights.gated else 1)
                inputs = np.stack([neuron_embeddings(v[None], weights, n)[0] for v, n in zip(inputs, units)]) \
                    if len(central) else np.zeros((0, width))
            vectors.append(centred(inputs).astype(np.float32))
            bar.update(1)
    table = {name: np.concatenate(parts) for name, parts in columns.items()}
    return table, vectors


def centred(vectors: Float[np.ndarray, "f d"]) -> Float[np.ndarray, "f d"]:
    """`vectors` minus their mean (the common component that would make every pair similar)."""
    vectors = np.asarray(vectors, np.float64)
    return vectors - vectors.mean(axis=0) if len(vectors) else vectors


def exact_neighbours(vectors: Float[np.ndarray, "f d"], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine neighbours (self included), as (indices [f, k], distances [f, k])."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1, norms)
    indices, distances = [], []
    for start in range(0, len(unit), EXACT_BLOCK):
        distance = 1.0 - unit[start:start + EXACT_BLOCK] @ unit.T
        # The k smallest per row (argpartition), then ordered by (distance, index); only [block, k] is kept.
        nearest = np.argpartition(distance, k - 1, axis=1)[:, :k] if k < distance.shape[1] else \
            np.tile(np.arange(distance.shape[1]), (len(distance), 1))
        near = np.take_along_axis(distance, nearest, axis=1)
        order = np.take_along_axis(nearest, np.lexsort((nearest, near), axis=1), axis=1)
        indices.append(order)
        distances.append(np.take_along_axis(distance, order, axis=1))
    return np.concatenate(indices), np.concatenate(distances)


def approximate_neighbours(vectors: Float[np.ndarray, "f d"], k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PyNNDescent cosine neighbour graph (self included), or exact search when the graph would be degenerate."""
    if len(vectors) <= max(2 * k, EXACT_SEARCH_FEATURES):
        return exact_neighbours(vectors, k)
    from pynndescent import NNDescent

    index = NNDescent(vectors, metric="cosine", n_neighbors=k, random_state=seed, n_jobs=1, verbose=False)
    indices, distances = index.neighbor_graph
    return indices, distances


def similar_features(owner: Int[np.ndarray, " f"], vectors: np.ndarray, count: int, threshold: float, seed: int
                     ) -> tuple[Int[np.ndarray, "f count"], Float[np.ndarray, "f count"]]:
    """Per feature, up to `count` most similar features of other units (`owner`: each feature's unit row in the
    atlas's SubjectIndex) with similarity ≥ threshold."""
    n = len(vectors)
    result_index = np.full((n, count), -1, np.int32)
    result_similarity = np.full((n, count), np.nan, np.float32)
    if n == 0:
        return result_index, result_similarity
    per_unit = int(np.unique(owner, return_counts=True)[1].max())
    k = min(n, count + per_unit)
    indices, distances = approximate_neighbours(vectors, k, seed)
    for row in range(n):
        similarity = 1.0 - distances[row]
        keep = (owner[indices[row]] != owner[row]) & (indices[row] >= 0) & (similarity >= threshold)
        chosen = indices[row][keep][:count]
        result_index[row, :len(chosen)] = chosen
        result_similarity[row, :len(chosen)] = similarity[keep][:count]
    return result_index, result_similarity


def sets_by_space(sets: list[SubjectSet]) -> dict[str, list[int]]:
    """The positions of the sets of each input space, in set order: a space's features are searched together."""
    spaces: dict[str, list[int]] = {}
    for position, s in enumerate(sets):
        spaces.setdefault(s.space, []).append(position)
    return spaces


def feature_owners(index: SubjectIndex, table: dict[str, np.ndarray]) -> Int[np.ndarray, " f"]:
    """Each feature's unit as a row of the subject index (set offset + unit)."""
    return index.rows_of(table["feature_set"], table["feature_unit"])


def build(run: StageRun) -> dict:
    cfg, paths = run.cfg, run.paths
    sets = collect_sets(read_collect_meta(paths))
    table, vectors = feature_table(paths, sets, cfg.neighbour_space)
    owner = feature_owners(SubjectIndex(sets), table)
    n = len(owner)
    index = np.full((n, cfg.neighbour_count), -1, np.int32)
    similarity = np.full((n, cfg.neighbour_count), np.nan, np.float32)
    spaces = sets_by_space(sets)
    for space, positions in spaces.items():
        # The table lists sets in order, so a space's rows are its sets' vectors concatenated in that order.
        rows = np.flatnonzero(np.isin(table["feature_set"], positions))
        log.info("neighbours: searching %d features in %s", len(rows), space)
        found, found_similarity = similar_features(owner[rows], np.concatenate([vectors[p] for p in positions]),
                                                   cfg.neighbour_count, cfg.neighbour_threshold, cfg.seed)
        index[rows] = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
        similarity[rows] = found_similarity
    run.write_npz(NEIGHBOURS, paths.neighbours, neighbour_index=index, neighbour_similarity=similarity, **table)
    return {"n_features": int(n), "space": cfg.neighbour_space, "spaces": sorted(spaces)}
