"""Feature clusters: the cut, the ids, the central example, the metrics and the edge cases; and the components method
(the original app's connected components, as single-linkage HAC) against a literal connected-components reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from builder import cluster, neighbours
from builder.cluster import cluster_neuron, cosine_distances, ranked_labels, set_arrays
from builder.config import config_from_dict
from builder.errors import ArtefactError, ConfigError
from builder.paths import AtlasPaths
from builder.pipeline import STAGES
from builder.schema import read_clusters, read_examples, read_metrics_table, read_report, read_weights
from builder.stage import Keys, run_stage, statuses
from builder.subjects import neuron_embeddings
from conftest import expect_error, stage_meta


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


# ---------------------------------------------------------------------------------------------------------------
# cluster_method = "components": the original feature-clusters app


def literal_components(features, threshold: float) -> set[frozenset[int]]:
    """The app's clusters, written plainly: connected components (union-find over every pair) of the graph joining
    two examples whose cosine similarity is at least 1 − threshold. At least, not above: a pair exactly at the cut
    joins, as fcluster's distance criterion joins at merge distance ≤ t."""
    rows = [[float(x) for x in row] for row in features]
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            dot = sum(a * b for a, b in zip(rows[i], rows[j]))
            similarity = dot / (math.sqrt(sum(a * a for a in rows[i])) * math.sqrt(sum(b * b for b in rows[j])))
            if similarity >= 1 - threshold:
                parent[root(i)] = root(j)
    groups: dict[int, set[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(root(i), set()).add(i)
    return {frozenset(group) for group in groups.values()}


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == label).tolist()) for label in np.unique(labels)}


def signs(rng, n: int, d: int = 16) -> np.ndarray:
    """±1 vectors of length 16: their cosine distance is exactly (differing signs) / 8, so cuts at multiples of 1/8
    meet exact ties, in the code's float64 and in the reference's."""
    return rng.choice([-1.0, 1.0], size=(n, d))


def test_components_join_a_chain_that_average_linkage_splits():
    # Unit vectors 12 degrees apart along a half circle: each is close to the next (distance 1 − cos 12° ≈ 0.022),
    # the ends are opposite. Connected components chain them into one feature; average linkage cannot.
    angles = np.radians(np.arange(0, 181, 12))
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    components = cluster_neuron(features, 0.05, "components")
    assert partition(components.labels) == literal_components(features, 0.05) == {frozenset(range(len(angles)))}
    assert cluster_neuron(features, 0.05, "average").metrics["n_clusters"] > 1


def test_a_pair_exactly_at_one_minus_the_threshold_joins_and_one_just_past_it_does_not():
    # Differing in 2 of 16 signs: similarity exactly 0.75, distance exactly 0.25. a–b and b–c at the cut, a–c at 0.5.
    a = np.ones(16)
    b, c = a.copy(), a.copy()
    b[:2] = -1
    c[:4] = -1
    features = np.stack([a, b, c])
    assert cosine_distances(features).tolist() == [0.25, 0.5, 0.25]
    assert partition(cluster_neuron(features, 0.25, "components").labels) == {frozenset({0, 1, 2})}
    assert partition(cluster_neuron(features, 0.25 - 1e-12, "components").labels) == {frozenset({0}), frozenset({1}),
                                                                                         frozenset({2})}
    # Average linkage joins a and b (or b and c) at 0.25, then the third at (0.25 + 0.5) / 2 > 0.25.
    assert cluster_neuron(features, 0.25, "average").metrics["n_clusters"] == 2


@pytest.mark.parametrize("seed", range(4))
def test_components_are_the_literal_connected_components_with_ties_and_without(seed):
    rng = np.random.default_rng(seed)
    tied = signs(rng, 40)  # distances on a grid of 1/8: every cut below meets exact ties
    for threshold in (0.125, 0.25, 0.375, 0.5, 0.625):
        result = cluster_neuron(tied, threshold, "components")
        assert partition(result.labels) == literal_components(tied, threshold), threshold
    centres = rng.normal(size=(3, 8))
    loose = centres[rng.integers(0, 3, 50)] + rng.normal(scale=0.6, size=(50, 8))
    for threshold in (0.1, 0.3, 0.5, 0.9):
        result = cluster_neuron(loose, threshold, "components")
        assert partition(result.labels) == literal_components(loose, threshold), threshold
        assert result.sizes.tolist() == sorted(result.sizes.tolist(), reverse=True)


def test_components_keep_the_single_linkage_matrix_so_a_recut_gives_the_components_at_that_cut():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(30, 6)) + rng.normal(size=(1, 6))
    result = cluster_neuron(features, 0.5, "components")
    np.testing.assert_allclose(result.linkage, linkage(pdist(features, "cosine"), "single"), atol=1e-9)
    for cut in (0.2, 0.4, 0.7):  # what the browser's slider does: fcluster on the kept linkage
        recut = fcluster(result.linkage, t=cut, criterion="distance")
        assert partition(recut) == literal_components(features, cut)


def test_an_unknown_cluster_method_is_one_line():
    expect_error(ConfigError, lambda: config_from_dict({"data_files": ["corpus.jsonl"], "cluster_method": "single"}),
                 "cluster_method must be average or components", "single")


def test_components_change_the_cluster_key_and_build_on_the_tiny_model(tiny_models, make_config, monkeypatch):
    # Exact neighbour search instead of PyNNDescent, whose compilation would be most of this test's time.
    monkeypatch.setattr(neighbours, "EXACT_SEARCH_FEATURES", 1 << 20)
    average = make_config(tiny_models["gpt2"], workers=1, max_sequences=32)
    components = make_config(tiny_models["gpt2"], workers=1, max_sequences=32, cluster_method="components")
    for stage in ("collect", "embed", "cluster"):
        run_stage(stage, average)
    before, after = Keys(average, STAGES), Keys(components, STAGES)
    assert before.key("collect") == after.key("collect") and before.key("embed") == after.key("embed")
    assert before.key("cluster") != after.key("cluster") and before.key("report") != after.key("report")
    state = {s.name: s for s in statuses(components)}
    assert state["embed"].state == "done"  # the same out_dir: only cluster on needs a re-run
    assert state["cluster"].state == "stale" and "cluster_method changed ('average' → 'components')" in \
        state["cluster"].reason
    for stage in ("cluster", "importance", "neighbours", "report", "evaluate", "render"):
        run_stage(stage, components)
    paths = AtlasPaths.of(components)
    assert stage_meta(components, "cluster")["cluster_method"] == "components"
    assert read_report(paths)["cluster_method"] == "components"
    examples, weights, clusters = read_examples(paths, "L0"), read_weights(paths, "L0"), read_clusters(paths, "L0")
    checked = 0
    for unit in range(len(examples.offsets) - 1):
        part = examples.unit_slice(unit)
        if part.stop - part.start < 2:
            continue
        embeddings = neuron_embeddings(examples.unit_vectors(unit), weights.weights, unit)
        assert partition(clusters["labels"][part]) == literal_components(embeddings, components.cluster_threshold)
        checked += 1
    assert checked > 10
    assert (paths.site / components.name / "L0" / "N0" / "neuron.json").is_file()
