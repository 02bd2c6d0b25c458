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

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from builder.sae import SaeTensors

log = logging.getLogger(__name__)

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
    def title(self) -> str:
        """The set's name as a heading: "Layer 3"."""
        return self.label[:1].upper() + self.label[1:]

    unit_noun: ClassVar[str] = "unit"  # what one of its units is called: "neuron", "latent"

    def published(self, n_examples: int) -> bool:
        """Whether a unit with this many examples gets pages (an SAE's latents never active on the corpus do not)."""
        return True

    @property
    def gated(self) -> bool:
        return False

    @property
    def space(self) -> str:
        """The vector space its features are compared in for similar features: sets of one space are searched
        together."""
        raise NotImplementedError

    def hooks(self) -> list[str]:
        raise NotImplementedError

    def activation_hook(self) -> str:
        """The hook holding the units' activations (all a masked importance run needs)."""
        raise NotImplementedError

    def read(self, captured: dict[str, "Tensor"]) -> Readout:
        raise NotImplementedError

    def activation_of(self, value: "Tensor") -> "Tensor":
        """The units' activations from the activation hook's value (a masked importance run reads only that)."""
        return value

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
    unit_noun: ClassVar[str] = "neuron"

    @property
    def gated(self) -> bool:
        return self.is_gated

    @property
    def label(self) -> str:
        return f"layer {self.layer}"

    @property
    def space(self) -> str:
        return "mlp"  # every layer's pre-MLP inputs, compared across layers (each set centred first)

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


@dataclass(frozen=True)
class SaeLatents(SubjectSet):
    """The latents of one SAE (builder/sae.py), read from the hook it was trained on. The input vector is the SAE's
    own input x' (the hook's value normalised as the SAE does, minus b_dec when it subtracts it), so a latent's
    neuron embedding x' ⊙ W_enc[:, j] sums (+ b_enc[j]) to its pre-activation, as a neuron's does."""

    folder: str = ""  # the SAELens folder its weights are read from
    hook_name: str = ""
    architecture: str = ""
    # How its decoder directions reach the residual stream: "resid" (the hook is d_model wide) or "mlp" (an MLP's
    # activations, through that layer's W_out).
    writes: str = "resid"

    kind: ClassVar[str] = "sae"
    unit_noun: ClassVar[str] = "latent"

    def published(self, n_examples: int) -> bool:
        return n_examples > 0  # a latent with no example never fired on this corpus: listed, not paged

    @property
    def label(self) -> str:
        return f"SAE {self.key}"

    @property
    def space(self) -> str:
        return f"sae {self.hook_name}"  # latents of SAEs trained on the same hook

    def _maths(self, device) -> "SaeTensors":
        from builder.sae import cached_sae

        return cached_sae(self.folder).on(str(device))

    def hooks(self) -> list[str]:
        return [self.hook_name]

    def activation_hook(self) -> str:
        return self.hook_name

    def activation_of(self, value: "Tensor") -> "Tensor":
        return self._maths(value.device).encode(value)

    def read(self, captured: dict[str, "Tensor"]) -> Readout:
        value = captured[self.hook_name]
        maths = self._maths(value.device)
        x_in = maths.sae_input(value)
        pre = maths.pre(x_in)
        return Readout(post=maths.activation(pre), pre=pre, pre_linear=None, input=x_in)

    def input_weights(self, model) -> InputWeights:
        from builder.sae import cached_sae

        sae = cached_sae(self.folder)
        return InputWeights(w=sae.W_enc, b=sae.b_enc, w_gate=None)

    def output_directions(self, model) -> "Float[Tensor, 'n_units d_model']":
        import torch

        from builder.sae import cached_sae

        w_dec = torch.as_tensor(cached_sae(self.folder).W_dec)
        if self.writes == "mlp":
            return w_dec @ model.bridge.blocks[self.layer].mlp.W_out.detach().float().cpu()
        return w_dec

    def describe(self) -> dict:
        return {**super().describe(), "folder": self.folder, "hook_name": self.hook_name,
                "architecture": self.architecture, "writes": self.writes}


def _sae_latents_from(description: dict) -> SaeLatents:
    return SaeLatents(key=str(description["key"]), size=int(description["size"]),
                      d_input=int(description["d_input"]), layer=int(description["layer"]),
                      folder=str(description["folder"]), hook_name=str(description["hook_name"]),
                      architecture=str(description["architecture"]), writes=str(description["writes"]))


def mlp_layer(layer: int, d_mlp: int, d_model: int, gated: bool) -> MlpLayer:
    return MlpLayer(key=f"L{layer}", size=d_mlp, d_input=d_model, layer=layer, is_gated=gated)


def _mlp_layer_from(description: dict) -> MlpLayer:
    return mlp_layer(int(description["layer"]), int(description["size"]), int(description["d_input"]),
                     bool(description["gated"]))


# How each kind of set is rebuilt from its description; a new kind adds its reader here.
_READERS = {MlpLayer.kind: _mlp_layer_from, SaeLatents.kind: _sae_latents_from}


def subject_set_from_description(description: dict) -> SubjectSet:
    """The set a `describe()` dict names (as stored in collect's meta)."""
    kind = description.get("kind")
    if kind not in _READERS:
        raise ValueError(f"unknown subject set kind, got {kind!r}; known: {sorted(_READERS)!r}")
    return _READERS[kind](description)


def hook_width(model, hook_name: str) -> int:
    """The last dimension of a hook's value, from a forward pass over two tokens."""
    import torch

    captured = {}
    layer = int(hook_name.split(".")[1])
    with torch.no_grad():
        model.bridge.run_with_hooks(torch.zeros((1, 2), dtype=torch.long, device=model.device), return_type=None,
                                    stop_at_layer=layer + 1,
                                    fwd_hooks=[(hook_name, lambda value, hook: captured.update(v=value))])
    return int(captured["v"].shape[-1])


def sae_latents(spec, model, model_name: str) -> SaeLatents:
    """The latents of the SAE an `[[sae]]` table names, checked against `model`: its hook exists, is as wide as the
    SAE's d_in and writes to the residual stream directly or through an MLP. One SaeError line otherwise."""
    from builder.sae import SaeError, cached_sae

    sae = cached_sae(spec.path)
    hook, where = sae.cfg.hook_name, f"SAE {spec.path!r}"
    if hook not in model.bridge.hook_dict or sae.cfg.layer >= model.n_layers:
        raise SaeError(f"{where}: its hook {hook!r} is not in {model_name!r} (layers 0..{model.n_layers - 1}); "
                       "atlas it on the model it was trained on, or fix hook_name in cfg.json")
    width = hook_width(model, hook)
    if width != sae.cfg.d_in:
        raise SaeError(f"{where}: d_in is {sae.cfg.d_in} but {hook!r} is {width} wide in {model_name!r}; "
                       "use an SAE trained on this model's hook")
    if width == model.d_model:
        writes = "resid"
    elif hook.endswith("mlp.hook_post"):
        writes = "mlp"
    else:
        raise SaeError(f"{where}: {hook!r} is neither d_model wide nor an MLP's activations (mlp.hook_post); "
                       "atlas SAEs on the residual stream, attention or MLP outputs, or MLP activations")
    trained_on = sae.cfg.model_name
    if trained_on and trained_on.lower() not in model_name.lower() and model_name.lower() not in trained_on.lower():
        log.warning("%s was trained on %r, not %r: its latents may mean nothing on this model", where, trained_on,
                    model_name)
    return SaeLatents(key=spec.slug, size=sae.cfg.d_sae, d_input=sae.cfg.d_in, layer=sae.cfg.layer,
                      folder=str(sae.folder.resolve()), hook_name=hook,
                      architecture=sae.cfg.architecture, writes=writes)


def model_subject_sets(model, layers: Sequence[int], saes: Sequence = (), model_name: str = "") -> list[SubjectSet]:
    """The subject sets a build atlases on `model`: one MLP layer per selected layer, then one set per SAE."""
    return ([mlp_layer(layer, model.d_mlp, model.d_model, model.gated) for layer in layers]
            + [sae_latents(spec, model, model_name) for spec in saes])


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
