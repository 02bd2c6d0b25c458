"""Held-out evaluation of an SAE as the paper's Tables 2 and 3 measure it, on any input stream (LM tokens, MNIST).

Inputs come in *groups* of positions: a language-model sequence (its tokens) or one MNIST digit (one position).
- `mse`: mean over inputs and dimensions of (x̂ − x)²;
- `l1`: the per-input sum of latent activations, averaged over inputs (the paper does not give its normalisation);
- `l0_percent`: the mean number of latents above 0 per input, as a percentage of d_sae;
- per latent, its *examples*: the first `max_examples` groups (in order) on which it is above 0, each at its max
  position (one per sequence, as the atlas collects); `size` is how many it has (≤ max_examples); its examples' neuron
  embeddings x ⊙ W_enc[:, j] give `max_distance` and `mean_distance`, the largest and the mean pairwise cosine
  distance (builder/cluster.py's definition). The table reports medians over latents: size over latents with at
  least one example, distances over latents with at least two.
Dead share (never active on the *training* data) comes from the trainer, not from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from builder.cluster import cosine_distances

MAX_EXAMPLES = 100  # as the atlas: up to 100 examples per unit
GROUP_CHUNK = 64  # groups encoded at once


@dataclass(frozen=True)
class LatentExamples:
    size: np.ndarray  # [d_sae] examples per latent
    max_distance: np.ndarray  # [d_sae], NaN below two examples
    mean_distance: np.ndarray  # [d_sae], NaN below two examples

    def medians(self) -> dict[str, float]:
        some, pairs = self.size >= 1, self.size >= 2
        return {"median_size": float(np.median(self.size[some])) if some.any() else float("nan"),
                "median_max_distance": float(np.median(self.max_distance[pairs])) if pairs.any() else float("nan"),
                "median_mean_distance": float(np.median(self.mean_distance[pairs])) if pairs.any() else float("nan")}


def reconstruction_metrics(x: Float[torch.Tensor, "n d_in"], f: Float[torch.Tensor, "n d_sae"],
                           x_hat: Float[torch.Tensor, "n d_in"]) -> dict[str, float]:
    x, f, x_hat = x.double(), f.double(), x_hat.double()
    return {"inputs": int(x.shape[0]), "mse": float((x_hat - x).square().mean()), "l1": float(f.sum(1).mean()),
            "l0_percent": 100.0 * float((f > 0).sum(1).double().mean()) / f.shape[1]}


def latent_examples(inputs: Float[torch.Tensor, "groups positions d_in"], encode, w_enc: np.ndarray,
                    max_examples: int = MAX_EXAMPLES) -> LatentExamples:
    """Every latent's held-out examples and their spread (see the module docstring). `encode` maps [..., d_in] to
    the latent activations [..., d_sae]; `w_enc` is [d_in, d_sae]."""
    maxima, argmax = [], []
    with torch.no_grad():
        for first in range(0, inputs.shape[0], GROUP_CHUNK):
            f = encode(inputs[first:first + GROUP_CHUNK])
            value, position = f.max(dim=1)
            maxima.append(value.cpu().numpy())
            argmax.append(position.cpu().numpy())
    group_max, group_argmax = np.concatenate(maxima), np.concatenate(argmax)  # [groups, d_sae]
    d_sae = group_max.shape[1]
    size = np.zeros(d_sae, np.int64)
    max_distance = np.full(d_sae, np.nan)
    mean_distance = np.full(d_sae, np.nan)
    vectors = inputs.cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    for j in range(d_sae):
        groups = np.flatnonzero(group_max[:, j] > 0)[:max_examples]
        size[j] = len(groups)
        if len(groups) < 2:
            continue
        embeddings = vectors[groups, group_argmax[groups, j]].astype(np.float64) * w_enc[:, j]
        distances = cosine_distances(embeddings)
        max_distance[j], mean_distance[j] = distances.max(), distances.mean()
    return LatentExamples(size, max_distance, mean_distance)
