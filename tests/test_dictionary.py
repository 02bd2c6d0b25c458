"""Dictionary tools: neuron alignment on a hand-built decoder, and MCS against a brute-force double loop."""

from __future__ import annotations

import math

import numpy as np

from builder.dictionary import latents_of_neurons, max_cosine_similarity, neuron_alignment


def test_neuron_alignment_ranks_neurons_by_decoder_weight_times_the_latents_maximum():
    # Latent 0 writes mostly to neuron 2 (negatively) then neuron 0; latent 1 only to neuron 1; latent 2 never fires.
    w_dec = np.array([[0.5, 0.0, -2.0, 0.1],
                      [0.0, 3.0, 0.0, 0.0],
                      [9.0, 9.0, 9.0, 9.0]], np.float32)
    maxima = np.array([2.0, 0.5, 0.0], np.float32)
    ids, weights = neuron_alignment(w_dec, maxima, k=3)
    assert ids.tolist() == [[2, 0, 3], [1, -1, -1], [-1, -1, -1]]
    np.testing.assert_allclose(weights[0], [-4.0, 1.0, 0.2])
    np.testing.assert_allclose(weights[1], [1.5, 0.0, 0.0])
    per_neuron, per_weight = latents_of_neurons(w_dec, maxima, k=2)
    assert per_neuron.tolist() == [[0, -1], [1, -1], [0, -1], [0, -1]]
    np.testing.assert_allclose(per_weight[:, 0], [1.0, 1.5, -4.0, 0.2])


def test_ties_in_alignment_go_to_the_lower_neuron():
    ids, _ = neuron_alignment(np.array([[1.0, -1.0, 1.0]], np.float32), np.ones(1, np.float32), k=3)
    assert ids.tolist() == [[0, 1, 2]]


def test_max_cosine_similarity_matches_a_brute_force_loop():
    rng = np.random.default_rng(0)
    ours, theirs = rng.normal(size=(37, 9)), rng.normal(size=(23, 9))
    theirs[5] = 3 * ours[4]  # a latent found again, at another scale
    ours[6] = 0.0  # a dead decoder row
    best, match = max_cosine_similarity(ours, theirs)
    for i, a in enumerate(ours):
        scores = []
        for b in theirs:
            na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
            scores.append(sum(x * y for x, y in zip(a, b)) / (na * nb) if na and nb else 0.0)
        assert abs(best[i] - max(scores)) < 1e-6 and match[i] == scores.index(max(scores))
    assert match[4] == 5 and abs(best[4] - 1) < 1e-6 and best[6] == 0
