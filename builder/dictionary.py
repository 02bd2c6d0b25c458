"""Dictionary tools for SAE latents (pure maths; the embed stage writes their results).

- **Neuron alignment** (an SAE on an MLP's activations): latent j writes W_dec[j, i] to neuron i's activation per unit
  of its own activation, so at its maximum it moves neuron i by W_dec[j, i] · max_j. A latent's page lists the
  neurons with the largest |W_dec[j, i] · max_j|; a neuron's page lists the latents with the largest value for it.
  Latents never active (max ≤ 0) weigh nothing.
- **Two dictionaries compared** (SAEs on one hook): each latent's maximum cosine similarity (MCS) between its decoder
  vector and the other dictionary's, and which latent attains it: the dictionary-learning evidence that a feature is
  found again by a separately trained SAE.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int

ALIGNMENT_COUNT = 10  # neurons listed per latent, and latents per neuron and SAE
MCS_BLOCK = 2048  # latents per block of the MCS search (a block × d_sae similarity matrix)


def _top_by_magnitude(scores: Float[np.ndarray, "rows cols"], k: int
                      ) -> tuple[Int[np.ndarray, "rows k"], Float[np.ndarray, "rows k"]]:
    """Per row, the k columns of largest |score| (ties: lower column), largest first; -1 / 0 where the score is 0."""
    k = min(k, scores.shape[1])
    magnitude = np.abs(scores)
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -magnitude), axis=1)[:, :k]
    weights = np.take_along_axis(scores, order, axis=1)
    return np.where(weights != 0, order, -1).astype(np.int32), weights.astype(np.float32)


def neuron_alignment(w_dec: Float[np.ndarray, "d_sae d_mlp"], max_activation: Float[np.ndarray, " d_sae"],
                     k: int = ALIGNMENT_COUNT):
    """Per latent, the neurons it moves most at its maximum: (neuron ids [d_sae, k], W_dec · max [d_sae, k])."""
    return _top_by_magnitude(w_dec * np.maximum(max_activation, 0)[:, None], k)


def latents_of_neurons(w_dec: Float[np.ndarray, "d_sae d_mlp"], max_activation: Float[np.ndarray, " d_sae"],
                       k: int = ALIGNMENT_COUNT):
    """Per neuron, the latents that move it most at their maxima: (latent ids [d_mlp, k], weights [d_mlp, k])."""
    return _top_by_magnitude((w_dec * np.maximum(max_activation, 0)[:, None]).T, k)


def max_cosine_similarity(ours: Float[np.ndarray, "n d"], theirs: Float[np.ndarray, "m d"]
                          ) -> tuple[Float[np.ndarray, " n"], Int[np.ndarray, " n"]]:
    """Each of our decoder vectors' highest cosine similarity to theirs, and the index attaining it (lowest on
    ties). A zero vector has similarity 0 to everything."""
    def unit(vectors):
        vectors = np.asarray(vectors, np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1, norms)

    a, b = unit(ours), unit(theirs)
    best = np.empty(len(a), np.float32)
    match = np.empty(len(a), np.int32)
    for start in range(0, len(a), MCS_BLOCK):
        similarity = a[start:start + MCS_BLOCK] @ b.T
        match[start:start + MCS_BLOCK] = similarity.argmax(axis=1)
        best[start:start + MCS_BLOCK] = similarity.max(axis=1)
    return best, match
