"""Feature clusters: the cut, the ids, the central example, the metrics and the edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from builder import cluster
from builder.cluster import cluster_neuron, cosine_distances, ranked_labels, set_arrays
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.schema import read_clusters, read_metrics_table
from builder.stage import run_stage, statuses
from conftest import stage_meta


def planted(rng, sizes: list[int], dim: int = 64, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(len(sizes), dim))
    truth = np.concatenate([np.full(size, i) for i, size in enumerate(sizes)])
    rng.shuffle(truth)
    return centres[truth] + noise * rng.normal(size=(len(truth), dim)), truth


def test_planted_clusters_are_recovered():
    features, truth = planted(np.random.default_rng(0), [30, 20, 10])
    result = cluster_neuron(features, 0.5)
    assert result.metrics["n_clusters"] == 3
    # same partition up to renaming; and ids rank clusters by size
    pairs = {(int(t), int(label)) for t, label in zip(truth, result.labels)}
    assert len(pairs) == 3
    assert result.sizes.tolist() == [30, 20, 10]


def test_cut_matches_scipy_fcluster_at_the_threshold():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(60, 16)) + rng.normal(size=(1, 16))
    for threshold in (0.3, 0.5, 0.8):
        result = cluster_neuron(features, threshold)
        reference = fcluster(linkage(pdist(features, "cosine"), "average"), t=threshold, criterion="distance")
        # identical partitions: a one-to-one map between our ids and scipy's
        assert len({(a, b) for a, b in zip(result.labels, reference)}) == len(set(reference)) == len(result.sizes)
        np.testing.assert_allclose(result.linkage, linkage(pdist(features, "cosine"), "average"), atol=1e-9)


def test_central_example_has_the_highest_mean_similarity_in_its_cluster():
    features, _ = planted(np.random.default_rng(2), [12, 9, 5], noise=0.4)
    result = cluster_neuron(features, 0.5)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    for k, central in enumerate(result.central):
        members = np.flatnonzero(result.labels == k)
        assert result.labels[central] == k
        if len(members) > 1:
            similarity = unit[members] @ unit[members].T
            mean_to_others = (similarity.sum(axis=1) - 1) / (len(members) - 1)
            assert mean_to_others[list(members).index(central)] == pytest.approx(mean_to_others.max())


def test_metrics_match_hand_computed_values_on_four_points():
    # two tight pairs at right angles: distances within a pair 0, across pairs 1
    features = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    result = cluster_neuron(features, 0.5)
    assert result.metrics == pytest.approx({
        "n_examples": 4, "n_clusters": 2, "max_distance": 1.0, "mean_distance": 4 / 6,
        "intra_distance": 0.0, "inter_distance": 1.0, "largest_share": 0.5})
    assert result.labels.tolist() == [0, 0, 1, 1]  # equal sizes: first appearance wins


def test_cluster_ids_rank_by_size_then_first_appearance():
    assert ranked_labels(np.array([7, 3, 3, 9, 7, 7, 9, 3, 5])).tolist() == [0, 1, 1, 2, 0, 0, 2, 1, 3]
    features, _ = planted(np.random.default_rng(3), [8, 8, 4])
    first, second = cluster_neuron(features, 0.5), cluster_neuron(features.copy(), 0.5)
    np.testing.assert_array_equal(first.labels, second.labels)


def test_dead_neuron_has_no_clusters_and_undefined_distances():
    result = cluster_neuron(np.zeros((0, 8)), 0.5)
    assert result.metrics["n_clusters"] == 0 and len(result.central) == 0
    assert np.isnan(result.metrics["intra_distance"]) and np.isnan(result.metrics["max_distance"])


def test_single_example_is_its_own_central_cluster():
    result = cluster_neuron(np.ones((1, 8)), 0.5)
    assert result.labels.tolist() == [0] and result.central.tolist() == [0] and result.linkage.shape == (0, 4)
    assert result.metrics["largest_share"] == 1.0 and np.isnan(result.metrics["mean_distance"])


def test_identical_embeddings_share_a_cluster():
    features = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-3.0, 0.5, 0.0]])
    result = cluster_neuron(features, 0.5)
    assert result.labels[0] == result.labels[1] != result.labels[2]
    assert cosine_distances(features)[0] == 0.0


def test_all_zero_embedding_is_orthogonal_to_others_and_equal_to_zeros():
    features = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.1]])
    distances = cosine_distances(features)
    assert np.isfinite(distances).all()
    result = cluster_neuron(features, 0.5)
    assert result.labels[0] == result.labels[2] != result.labels[1] == result.labels[3]
    assert cosine_distances(features[:2])[0] == 1.0


def test_non_finite_values_name_the_set_and_unit():
    with pytest.raises(ArtefactError, match="L3 unit 7"):
        cluster.check_finite(np.array([[1.0, np.nan]]), "L3", 7)


def test_set_arrays_point_each_units_centrals_at_its_own_rows_of_the_set_wide_examples():
    rng = np.random.default_rng(4)
    sizes = (3, 0, 4, 2)
    results = [cluster_neuron(rng.normal(size=(n, 5)), 0.5) for n in sizes]
    offsets = np.r_[0, np.cumsum(sizes)]
    arrays = set_arrays(results, offsets)
    assert arrays["cluster_offsets"][-1] == len(arrays["cluster_central"])
    assert arrays["labels"].shape == (offsets[-1],)
    for unit, result in enumerate(results):
        clusters = slice(arrays["cluster_offsets"][unit], arrays["cluster_offsets"][unit + 1])
        central = arrays["cluster_central"][clusters]
        # shifted by the unit's offset, so a missing offset would point unit 2's centrals at unit 0's rows
        np.testing.assert_array_equal(central, result.central + offsets[unit])
        assert ((central >= offsets[unit]) & (central < offsets[unit + 1])).all()
    assert (arrays["cluster_central"][arrays["cluster_offsets"][2]:] >= 3).all()


def test_cluster_stage_is_identical_with_one_or_many_workers_and_resumes(tiny_models, make_config):
    runs = {}
    for workers in (1, 2):
        cfg = make_config(tiny_models["gpt2"], subdir=f"w{workers}", workers=workers, max_sequences=32)
        run_stage("collect", cfg)
        run_stage("embed", cfg)
        run_stage("cluster", cfg)
        runs[workers] = AtlasPaths.of(cfg)
    for layer in (0, 1):
        one, many = read_clusters(runs[1], f"L{layer}"), read_clusters(runs[2], f"L{layer}")
        for name in one:
            np.testing.assert_array_equal(one[name], many[name], err_msg=name)
    table = read_metrics_table(runs[1])
    assert len(table["unit"]) == 2 * 128 and table["set_index"].tolist() == [0] * 128 + [1] * 128


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_missing_or_corrupt_set_file_reruns_just_that_set(tiny_models, make_config, damage):
    """The loop the issue found: truncate cluster/L1.npz and the stage must notice (its meta alone is not enough)
    and rebuild that one file identically, keeping the other set's file."""
    cfg = make_config(tiny_models["gpt2"], subdir=damage, workers=1, max_sequences=32)
    for stage in ("collect", "embed", "cluster"):
        run_stage(stage, cfg)
    paths = AtlasPaths.of(cfg)
    kept = paths.set_file("cluster", "L0").stat().st_mtime_ns
    before = read_clusters(paths, "L1")
    damaged = paths.set_file("cluster", "L1")
    if damage == "delete":
        damaged.unlink()
    else:
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    state = {s.name: s for s in statuses(cfg)}["cluster"]
    assert state.state == "stale" and "L1.npz" in state.reason
    run_stage("cluster", cfg)
    assert paths.set_file("cluster", "L0").stat().st_mtime_ns == kept
    assert stage_meta(cfg, "cluster")["sets_clustered_last_run"] == ["L1"]
    after = read_clusters(paths, "L1")
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert {s.name: s.state for s in statuses(cfg)}["cluster"] == "done"
