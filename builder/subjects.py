"""Subject sets: what an atlas is made of.

A *subject set* is a group of units that share one input site: the neurons of one MLP layer today, the latents of an
SAE later. Everything a stage needs to know about units goes through it: its key (also its artefact file name), its
size, the hooks it reads, how to read each unit's activation, pre-activation and input vector from captured hooks,
its input weights (the neuron embedding is input ⊙ w[:, j]), its output directions (for direct logit effects) and its
URL slug.

Units are named by `UnitId(set_key, unit)`; `SubjectIndex` maps them to rows of atlas-wide tables (offsets per set)
and back. No id is ever an arithmetic encoding such as `layer * d_mlp + neuron`.

A set is described by a plain, JSON-ready dict (`describe()`), stored in collect's meta, so torch-free readers
(render, the schema module) rebuild the same sets without the model (`subject_set_from_description`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor


class UnitId(NamedTuple):
    """One unit of the atlas: the key of its subject set and its index within the set."""

    set_key: str
    unit: int


@dataclass(frozen=True)
class Readout:
    """A subject set's values on one batch, read from captured hooks."""

    post: "Float[Tensor, 'batch pos n_units']"  # the unit's activation
    pre: "Float[Tensor, 'batch pos n_units']"  # what the activation function acts on (the gate for gated MLPs)
    pre_linear: "Float[Tensor, 'batch pos n_units'] | None"  # the linear part of a gated MLP
    input: "Float[Tensor, 'batch pos d_input']"  # the vector every unit of the set reads (its input site)


@dataclass(frozen=True)
class InputWeights:
    """A set's input weights in the basis of its input vector. Unit j's neuron embedding at input x is x ⊙ w[:, j]
    (with the gate part x ⊙ w_gate[:, j] first when gated); its sum + b[j] is the unit's (linear) pre-activation."""

    w: "Float[np.ndarray, 'd_input n_units']"
    b: "Float[np.ndarray, ' n_units']"
    w_gate: "Float[np.ndarray, 'd_input n_units'] | None"

    @property
    def gated(self) -> bool:
        return self.w_gate is not None


def neuron_embeddings(vectors: "Float[np.ndarray, 'n_examples d_input']", weights: InputWeights, unit: int
                      ) -> "Float[np.ndarray, 'n_examples d_embedding']":
    """Element-wise product of each input vector with the unit's input weights (gate part first if gated)."""
    linear = vectors * weights.w[:, unit]
    if weights.w_gate is None:
        return linear
    return np.concatenate([vectors * weights.w_gate[:, unit], linear], axis=1)


def embedding_preactivations(embeddings: "Float[np.ndarray, 'n_examples d_embedding']", weights: InputWeights,
                             unit: int) -> tuple[np.ndarray, np.ndarray]:
    """(pre, pre_linear) recovered from embeddings: the identity that defines them. Without a gate the second value
    repeats the first."""
    if weights.w_gate is None:
        pre = embeddings.sum(axis=1, dtype=np.float64) + weights.b[unit]
        return pre, pre
    d_input = weights.w.shape[0]
    gate = embeddings[:, :d_input].sum(axis=1, dtype=np.float64)
    linear = embeddings[:, d_input:].sum(axis=1, dtype=np.float64) + weights.b[unit]
    return gate, linear


@dataclass(frozen=True)
class SubjectSet:
    """Base of every kind of subject set. Subclasses set `kind` and implement the hook-reading methods."""

    key: str  # unique within an atlas; the artefact file name (`collect/{key}.npz`) and the URL slug
    size: int  # number of units
    d_input: int  # width of the input vector
    layer: int  # the block whose forward produces every hook the set reads (forwards stop after it)

    kind: ClassVar[str] = ""

    @property
    def slug(self) -> str:
        """Path component of the set's pages: `{model}/{slug}/N{unit}/`."""
        return self.key

    @property
    def label(self) -> str:
        """How pages and citations name the set, e.g. "layer 3"."""
        return self.key

    @property
    def gated(self) -> bool:
        return False

    def hooks(self) -> list[str]:
        raise NotImplementedError

    def activation_hook(self) -> str:
        """The hook holding the units' activations (all a masked importance run needs)."""
        raise NotImplementedError

    def read(self, captured: dict[str, "Tensor"]) -> Readout:
        raise NotImplementedError

    def input_weights(self, model) -> InputWeights:
        raise NotImplementedError

    def output_directions(self, model) -> "Float[Tensor, 'n_units d_model']":
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "key": self.key, "size": self.size, "d_input": self.d_input, "layer": self.layer}


@dataclass(frozen=True)
class MlpLayer(SubjectSet):
    """The neurons of one MLP layer, read in TransformerLens' compatibility-mode hooks. The input vector is
    `ln2.hook_normalized`, whose basis the bridge has folded the norm's scale into, so `input @ W_in + b_in` is
    `mlp.hook_pre` exactly. Gated MLPs (SwiGLU) have a gate part (`W_gate`, hook_pre) and a linear part (`W_in`,
    hook_pre_linear)."""

    is_gated: bool = False

    kind: ClassVar[str] = "mlp"

    @property
    def gated(self) -> bool:
        return self.is_gated

    @property
    def label(self) -> str:
        return f"layer {self.layer}"

    def _hook(self, name: str) -> str:
        return f"blocks.{self.layer}.{name}"

    def hooks(self) -> list[str]:
        names = [self._hook("ln2.hook_normalized"), self._hook("mlp.hook_pre"), self._hook("mlp.hook_post")]
        return names + ([self._hook("mlp.hook_pre_linear")] if self.is_gated else [])

    def activation_hook(self) -> str:
        return self._hook("mlp.hook_post")

    def read(self, captured: dict[str, "Tensor"]) -> Readout:
        return Readout(post=captured[self._hook("mlp.hook_post")], pre=captured[self._hook("mlp.hook_pre")],
                       pre_linear=captured.get(self._hook("mlp.hook_pre_linear")),
                       input=captured[self._hook("ln2.hook_normalized")])

    def input_weights(self, model) -> InputWeights:
        mlp = model.bridge.blocks[self.layer].mlp
        w_in = mlp.W_in.detach().float().cpu().numpy()
        b_in = getattr(mlp, "b_in", None)
        b_in = np.zeros(w_in.shape[1], np.float32) if b_in is None else b_in.detach().float().cpu().numpy()
        w_gate = mlp.W_gate.detach().float().cpu().numpy() if self.is_gated else None
        return InputWeights(w=w_in, b=b_in, w_gate=w_gate)

    def output_directions(self, model) -> "Float[Tensor, 'n_units d_model']":
        return model.bridge.blocks[self.layer].mlp.W_out.detach().float().cpu()

    def describe(self) -> dict:
        return {**super().describe(), "gated": self.is_gated}


def mlp_layer(layer: int, d_mlp: int, d_model: int, gated: bool) -> MlpLayer:
    return MlpLayer(key=f"L{layer}", size=d_mlp, d_input=d_model, layer=layer, is_gated=gated)


def _mlp_layer_from(description: dict) -> MlpLayer:
    return mlp_layer(int(description["layer"]), int(description["size"]), int(description["d_input"]),
                     bool(description["gated"]))


# How each kind of set is rebuilt from its description; a new kind adds its reader here.
_READERS = {MlpLayer.kind: _mlp_layer_from}


def subject_set_from_description(description: dict) -> SubjectSet:
    """The set a `describe()` dict names (as stored in collect's meta)."""
    kind = description.get("kind")
    if kind not in _READERS:
        raise ValueError(f"unknown subject set kind, got {kind!r}; known: {sorted(_READERS)!r}")
    return _READERS[kind](description)


def model_subject_sets(model, layers: Sequence[int]) -> list[SubjectSet]:
    """The subject sets a build atlases on `model`: one MLP layer per selected layer."""
    return [mlp_layer(layer, model.d_mlp, model.d_model, model.gated) for layer in layers]


class SubjectIndex:
    """Rows of atlas-wide tables: set i's units occupy rows offsets[i] … offsets[i + 1] − 1, in set order."""

    def __init__(self, sets: Sequence[SubjectSet]):
        self.sets = list(sets)
        self.keys = [s.key for s in self.sets]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"subject set keys must be unique, got {self.keys!r}")
        self._position = {key: i for i, key in enumerate(self.keys)}
        self.offsets = np.r_[0, np.cumsum([s.size for s in self.sets])].astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __contains__(self, unit_id: UnitId) -> bool:
        position = self._position.get(unit_id.set_key)
        return position is not None and 0 <= unit_id.unit < self.sets[position].size

    def get(self, set_key: str) -> SubjectSet:
        return self.sets[self._position[set_key]]

    def rows(self, set_key: str) -> slice:
        position = self._position[set_key]
        return slice(int(self.offsets[position]), int(self.offsets[position + 1]))

    def row(self, unit_id: UnitId) -> int:
        if unit_id not in self:
            raise KeyError(unit_id)
        return int(self.offsets[self._position[unit_id.set_key]]) + unit_id.unit

    def unit(self, row: int) -> UnitId:
        if not 0 <= row < len(self):
            raise IndexError(row)
        position = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return UnitId(self.keys[position], row - int(self.offsets[position]))

    def rows_of(self, set_positions: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Vectorised `row`: the rows of units given as (position of their set in the index, unit)."""
        return self.offsets[np.asarray(set_positions, np.int64)] + np.asarray(units, np.int64)
