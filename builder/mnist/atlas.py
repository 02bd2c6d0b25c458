"""The MNIST atlas of one seed: per unit (an MLP hidden neuron or an SAE latent), what it reads in pixel space, what
it does to the logits, its examples among the test digits and their feature clusters (builder/mnist/schema.py has
the arrays). Definitions, for a digit x (784 pixels in [0, 1]) and h(x) = ReLU(W1 x + b1) the MLP's hidden layer:

- **pre-activation** pre(x): MLP neuron j: (W1 x + b1)_j; SAE latent j: (W_encᵀ h(x) + b_enc)_j. The unit's
  **activation** is ReLU(pre(x)); a digit *activates* the unit when its activation is > 0.
- **pixel contribution** c_p(x) = x_p · ∂pre/∂x_p (gradient × input): for an MLP neuron exactly x_p · W1[j, p]; for a
  latent x_p · Σ_i W_enc[i, j] · 1[h_i(x) > 0] · W1[i, p] (the ReLU's derivative taken as 0 at 0, as autograd does).
- **activation map**: per pixel, the largest |c_p(x)| over the unit's activating test digits (0 if there are none).
- **importance map**: the mean activating test digit ⊙ the activation map / the map's largest value: where the unit's
  digits have ink and the unit is sensitive to it (all 0 for a unit no test digit activates).
- **logit effects**: the unit's direct effect on each digit's logit: W2[:, j] for an MLP neuron, W2 · W_dec[j] (its
  decoder direction through the output layer) for a latent.
- **random examples**: up to 16 activating test digits drawn at random (seeded), by activation, highest first.
- **examples**: the first ≤100 activating test digits in test order (the split's shuffled order); their neuron
  embeddings (MLP neuron: x ⊙ W1[j, :], in pixel space; latent: h(x) ⊙ W_enc[:, j], in hidden space) are clustered
  with builder/cluster.py (average linkage on cosine distance, cut at 0.5), clusters ranked by size.
Padding: −1 for indices, clusters and centrals, 0 for the activations beside a −1 index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from builder.cluster import cluster_neuron
from builder.mnist.model import Mlp
from builder.schema import METRIC_NAMES

MAX_EXAMPLES = 100  # the contract's example slots per unit, as the language-model atlas
RANDOM_EXAMPLES = 16  # the contract's R
PAIR_CHUNK = 8192  # (digit, unit) pairs whose pixel contributions are held at once: 8192 × 784 floats, 26 MB


class Units(Protocol):
    """One set of units: the maths the atlas needs, for any digits."""

    def pre(self, x: Float[Tensor, "n 784"]) -> Float[Tensor, "n units"]: ...

    def pixel_gradient(self, x: Float[Tensor, "pairs 784"], unit: Int[Tensor, " pairs"]) -> Float[Tensor, "pairs 784"]:
        """∂pre_unit/∂x at each x, for one unit per row."""

    def embeddings(self, x: Float[Tensor, "n 784"], unit: int) -> Float[Tensor, "n d"]: ...

    def logit_effects(self) -> Float[Tensor, "units 10"]: ...


@dataclass(frozen=True)
class MlpNeurons:
    mlp: Mlp

    def pre(self, x):
        return self.mlp.pre(x)

    def pixel_gradient(self, x, unit):
        return self.mlp.w1[unit]

    def embeddings(self, x, unit):
        return x * self.mlp.w1[unit]

    def logit_effects(self):
        return self.mlp.w2.T


@dataclass(frozen=True)
class SaeLatents:
    mlp: Mlp
    w_enc: Float[Tensor, "hidden d_sae"]
    b_enc: Float[Tensor, " d_sae"]
    w_dec: Float[Tensor, "d_sae hidden"]

    def pre(self, x):
        return self.mlp.hidden(x) @ self.w_enc + self.b_enc

    def pixel_gradient(self, x, unit):
        through = self.w_enc.T[unit] * (self.mlp.pre(x) > 0)  # [pairs, hidden]: W_enc[i, j] · 1[h_i > 0]
        return through @ self.mlp.w1

    def embeddings(self, x, unit):
        return self.mlp.hidden(x) * self.w_enc[:, unit]

    def logit_effects(self):
        return self.w_dec @ self.mlp.w2.T


def pixel_contributions(units: Units, x: Float[Tensor, "pairs 784"],
                        unit: Int[Tensor, " pairs"]) -> Float[Tensor, "pairs 784"]:
    """c_p(x) = x_p · ∂pre/∂x_p, one (digit, unit) pair per row."""
    return x * units.pixel_gradient(x, unit)


@torch.no_grad()
def pixel_maps(units: Units, x: Float[Tensor, "n 784"],
               activation: Float[Tensor, "n units"]) -> tuple[np.ndarray, np.ndarray]:
    """The activation and importance maps [units, 784], from the activating (digit, unit) pairs only."""
    n_units = activation.shape[1]
    digit, unit = torch.nonzero(activation.T > 0, as_tuple=True)[::-1]  # pairs grouped by unit
    activation_map = torch.zeros(n_units, x.shape[1], dtype=x.dtype)
    ink = torch.zeros(n_units, x.shape[1], dtype=x.dtype)
    for first in range(0, len(digit), PAIR_CHUNK):
        d, u = digit[first:first + PAIR_CHUNK], unit[first:first + PAIR_CHUNK]
        activation_map.index_reduce_(0, u, pixel_contributions(units, x[d], u).abs(), "amax")
        ink.index_add_(0, u, x[d])
    counts = torch.bincount(unit, minlength=n_units).to(x.dtype)
    mean_digit = ink / counts.clamp_min(1)[:, None]
    peak = activation_map.amax(dim=1, keepdim=True)
    importance = torch.where(peak > 0, mean_digit * activation_map / peak.clamp_min(torch.finfo(x.dtype).tiny), 0)
    return activation_map.numpy().astype(np.float32), importance.numpy().astype(np.float32)


def random_examples(activation: Float[np.ndarray, "n units"], rng: np.random.Generator,
                    r: int = RANDOM_EXAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, up to r of its activating digits drawn at random, highest activation first (−1 / 0 pads)."""
    index = np.full((activation.shape[1], r), -1, np.int64)
    values = np.zeros((activation.shape[1], r), np.float32)
    for j in range(activation.shape[1]):
        active = np.flatnonzero(activation[:, j] > 0)
        chosen = rng.choice(active, size=min(r, len(active)), replace=False)
        chosen = chosen[np.argsort(-activation[chosen, j], kind="stable")]
        index[j, :len(chosen)], values[j, :len(chosen)] = chosen, activation[chosen, j]
    return index, values


def example_clusters(units: Units, x: Float[Tensor, "n 784"], activation: Float[np.ndarray, "n units"],
                     threshold: float) -> dict[str, np.ndarray]:
    """Per unit, its first ≤100 activating digits, their clusters, each cluster's central example and the metrics."""
    n_units = activation.shape[1]
    index = np.full((n_units, MAX_EXAMPLES), -1, np.int64)
    values = np.zeros((n_units, MAX_EXAMPLES), np.float32)
    labels = np.full((n_units, MAX_EXAMPLES), -1, np.int32)
    centrals, metrics = [], np.full((n_units, len(METRIC_NAMES)), np.nan)
    for j in range(n_units):
        examples = np.flatnonzero(activation[:, j] > 0)[:MAX_EXAMPLES]
        with torch.no_grad():
            features = units.embeddings(x[torch.from_numpy(examples)], j).double().numpy()
        clusters = cluster_neuron(features, threshold)
        k = len(examples)
        index[j, :k], values[j, :k], labels[j, :k] = examples, activation[examples, j], clusters.labels
        centrals.append(clusters.central)
        metrics[j] = [clusters.metrics[name] for name in METRIC_NAMES]
    central = np.full((n_units, max(1, max(len(c) for c in centrals))), -1, np.int32)
    for j, c in enumerate(centrals):
        central[j, :len(c)] = c
    return {"example_index": index, "example_activation": values, "example_cluster": labels, "central": central,
            "metrics": metrics}


def unit_set_arrays(units: Units, x: Float[Tensor, "n 784"], rng: np.random.Generator,
                    threshold: float) -> dict[str, np.ndarray]:
    """Every array of one unit set, named as in the contract without the set's prefix."""
    with torch.no_grad():
        activation = torch.relu(units.pre(x))
        logit_effects = units.logit_effects().numpy().astype(np.float32)
    activation_map, importance_map = pixel_maps(units, x, activation)
    act = activation.numpy()
    random_index, random_values = random_examples(act, rng)
    return {"activation_map": activation_map, "importance_map": importance_map, "logit_effects": logit_effects,
            "max_activation": act.max(axis=0).astype(np.float32),
            "density": (act > 0).mean(axis=0).astype(np.float32),
            "random_examples": random_index, "random_activations": random_values,
            **example_clusters(units, x, act, threshold)}


def atlas_arrays(images: Float[np.ndarray, "n 784"], labels: Int[np.ndarray, " n"], seed: int,
                 sets: dict[str, tuple[str, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """atlas.npz's arrays: the test digits and, per set key, its title and its arrays (prefixed `key.`)."""
    arrays = {"images": np.rint(images * 255).astype(np.uint8), "labels": labels.astype(np.int64),
              "set_keys": np.array(list(sets)), "set_titles": np.array([title for title, _ in sets.values()]),
              "seed": np.int64(seed)}
    for key, (_, unit_arrays) in sets.items():
        arrays.update({f"{key}.{name}": value for name, value in unit_arrays.items()})
    return arrays
