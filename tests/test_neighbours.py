"""Similar features: other neurons only, thresholded, reproducible, and sane at the edges."""

from __future__ import annotations

import numpy as np

from builder.neighbours import centred, exact_neighbours, feature_owners, similar_features
from builder.paths import AtlasPaths
from builder.schema import read_clusters, read_neighbours
from builder.stage import run_stage
from builder.subjects import SubjectIndex, mlp_layer

# Two subject sets of different sizes: a unit is (set, unit), its owner row comes from the index's offsets.
INDEX = SubjectIndex([mlp_layer(0, 2000, 4, False), mlp_layer(2, 7, 4, False), mlp_layer(3, 3, 4, False)])


def table_of(owners: list[tuple[int, int]]) -> np.ndarray:
    """Owner rows of features given as (set position, unit)."""
    sets, units = zip(*owners) if owners else ((), ())
    return feature_owners(INDEX, {"feature_set": np.array(sets, np.int64), "feature_unit": np.array(units, np.int32)})


def test_feature_owners_are_rows_of_the_subject_index():
    owners = table_of([(0, 5), (1, 0), (1, 6), (2, 2)])
    assert owners.tolist() == [5, 2000, 2006, 2009]
    assert [INDEX.unit(int(r)) for r in owners] == [("L0", 5), ("L2", 0), ("L2", 6), ("L3", 2)]


def test_a_single_feature_has_no_neighbours():
    index, similarity = similar_features(table_of([(0, 0)]), np.ones((1, 4), np.float32), 20, 0.0, 0)
    assert (index == -1).all() and np.isnan(similarity).all()


def test_no_features_gives_empty_tables():
    index, similarity = similar_features(table_of([]), np.zeros((0, 4), np.float32), 20, 0.0, 0)
    assert index.shape == (0, 20) and similarity.shape == (0, 20)


def test_fewer_features_than_twenty_fill_what_exists_and_pad_with_minus_one():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 8)).astype(np.float32)
    index, similarity = similar_features(table_of([(0, i) for i in range(5)]), vectors, 20, -1.0, 0)
    assert (index[:, :4] >= 0).all() and (index[:, 4:] == -1).all()
    assert all(row not in index[row] for row in range(5))
    assert (np.diff(similarity[:, :4], axis=1) <= 1e-6).all()  # best first


def test_features_of_the_same_neuron_are_never_neighbours_and_threshold_applies():
    vectors = np.array([[1, 0], [1, 0.01], [0.9, 0.1], [0, 1]], np.float32)
    owners = [(0, 1), (0, 1), (1, 5), (2, 0)]
    index, similarity = similar_features(table_of(owners), vectors, 20, 0.5, 0)
    assert index[0].tolist()[:1] == [2] and index[0, 1] == -1  # its twin (same neuron) and the orthogonal one excluded
    assert (similarity[np.isfinite(similarity)] >= 0.5).all()


def test_pynndescent_is_reproducible_and_close_to_exact_search():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(30, 32))
    vectors = (centres[rng.integers(0, 30, 1500)] + 0.3 * rng.normal(size=(1500, 32))).astype(np.float32)
    owners = [(0, i) for i in range(1500)]
    first = similar_features(table_of(owners), vectors, 10, -1.0, seed=7)
    second = similar_features(table_of(owners), vectors, 10, -1.0, seed=7)
    np.testing.assert_array_equal(first[0], second[0])
    exact, _ = exact_neighbours(vectors, 11)
    recall = np.mean([len(set(a) & set(e[1:])) / 10 for a, e in zip(first[0], exact)])
    assert recall > 0.9


def test_neighbours_stage_indexes_every_feature_of_every_layer(tiny_models, make_config):
    cfg = make_config(tiny_models["llama"], max_sequences=32, neighbour_threshold=-1.0)
    for stage in ("collect", "embed", "cluster", "neighbours"):
        run_stage(stage, cfg)
    paths = AtlasPaths.of(cfg)
    result = read_neighbours(paths)
    n_features = sum(len(read_clusters(paths, f"L{layer}")["cluster_central"]) for layer in (0, 1))
    assert len(result["feature_set"]) == n_features
    assert set(result["feature_set"].tolist()) == {0, 1}
    valid = result["neighbour_index"] >= 0
    rows = np.nonzero(valid)[0]
    other = result["neighbour_index"][valid]
    same_neuron = ((result["feature_set"][rows] == result["feature_set"][other])
                   & (result["feature_unit"][rows] == result["feature_unit"][other]))
    assert valid.any() and not same_neuron.any()


def test_centring_removes_a_shared_component_so_the_threshold_thins_unrelated_features():
    # A large common direction plus independent noise: raw cosines are all high, centred ones are not.
    rng = np.random.default_rng(3)
    vectors = 5.0 * np.ones((40, 16)) + rng.normal(size=(40, 16))
    owners = table_of([(0, i) for i in range(40)])
    raw, _ = similar_features(owners, vectors.astype(np.float32), 20, 0.5, 0)
    thinned, similarity = similar_features(owners, centred(vectors).astype(np.float32), 20, 0.5, 0)
    assert (raw >= 0).sum(axis=1).min() == 20
    assert (thinned >= 0).sum() < 0.2 * thinned.size
    assert np.allclose(centred(vectors).mean(axis=0), 0.0)
    assert (similarity[np.isfinite(similarity)] >= 0.5).all()


def test_exact_search_in_blocks_matches_a_literal_full_sort(monkeypatch):
    import builder.neighbours as neighbours

    monkeypatch.setattr(neighbours, "EXACT_BLOCK", 7)  # several blocks, the last one partial
    vectors = np.random.default_rng(5).normal(size=(30, 8)).astype(np.float32)
    indices, distances = exact_neighbours(vectors, 6)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    literal = [sorted(range(30), key=lambda j: (1.0 - float(unit[i] @ unit[j]), j))[:6] for i in range(30)]
    assert indices.tolist() == literal
    assert np.allclose(distances, [[1.0 - float(unit[i] @ unit[j]) for j in row] for i, row in enumerate(literal)],
                       atol=1e-5)
