"""Embed: neuron embedding = pre-MLP vector ⊙ the neuron's input weights.

Summing a neuron embedding (plus the bias) gives back the neuron's pre-activation at that token, which is checked
here on every collected example. For gated MLPs the embedding is the gate part and the linear part concatenated, and
each part sums to its own pre-activation (hook_pre and hook_pre_linear).

Embeddings are cheap to form, so they are never stored per neuron: this stage stores each layer's input weights (in
the folded basis) once, and later stages call `neuron_embeddings` where they need them. It also stores each neuron's
direct logit effects (its output weights through the unembedding), which likewise need the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from builder import __version__
from builder.artefacts import read_json, read_npz, write_json, write_npz
from builder.collect import read_collect_meta, read_layer_examples
from builder.config import AtlasConfig
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.stage import begin_stage, peak_rss_mb, stage_is_done

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_KIND = "embed-meta"
LAYER_KIND = "embed-layer"
IDENTITY_TOLERANCE = 1e-4
LOGIT_TOP_K = 10


@dataclass(frozen=True)
class LayerWeights:
    """One layer's MLP input weights (folded basis) and its neurons' direct logit effects."""

    w_in: Float[np.ndarray, "d_model d_mlp"]
    b_in: Float[np.ndarray, " d_mlp"]
    w_gate: Float[np.ndarray, "d_model d_mlp"] | None
    logit_top_ids: Int[np.ndarray, "d_mlp k"]
    logit_top_values: Float[np.ndarray, "d_mlp k"]
    logit_bottom_ids: Int[np.ndarray, "d_mlp k"]
    logit_bottom_values: Float[np.ndarray, "d_mlp k"]

    @property
    def gated(self) -> bool:
        return self.w_gate is not None


def neuron_embeddings(vectors: Float[np.ndarray, "n_examples d_model"], weights: LayerWeights, neuron: int
                      ) -> Float[np.ndarray, "n_examples d_embedding"]:
    """Element-wise product of each pre-MLP vector with the neuron's input weights (gate part first if gated)."""
    linear = vectors * weights.w_in[:, neuron]
    if weights.w_gate is None:
        return linear
    return np.concatenate([vectors * weights.w_gate[:, neuron], linear], axis=1)


def embedding_preactivations(embeddings: Float[np.ndarray, "n_examples d_embedding"], weights: LayerWeights,
                             neuron: int) -> tuple[np.ndarray, np.ndarray]:
    """(hook_pre, hook_pre_linear) recovered from embeddings: the identity that defines them. For plain MLPs the
    second value repeats the first."""
    if weights.w_gate is None:
        pre = embeddings.sum(axis=1, dtype=np.float64) + weights.b_in[neuron]
        return pre, pre
    d_model = weights.w_in.shape[0]
    gate = embeddings[:, :d_model].sum(axis=1, dtype=np.float64)
    linear = embeddings[:, d_model:].sum(axis=1, dtype=np.float64) + weights.b_in[neuron]
    return gate, linear


def direct_logit_effects(w_out: Float[torch.Tensor, "d_mlp d_model"], w_u: Float[torch.Tensor, "d_model d_vocab"],
                         k: int = LOGIT_TOP_K) -> dict[str, np.ndarray]:
    """Top-k promoted and suppressed tokens of each neuron through its output weights and the unembedding."""
    effects = w_out.float() @ w_u.float()
    top = effects.topk(k, dim=1)
    bottom = effects.topk(k, dim=1, largest=False)
    return {"logit_top_ids": top.indices.int().numpy(), "logit_top_values": top.values.numpy(),
            "logit_bottom_ids": bottom.indices.int().numpy(), "logit_bottom_values": bottom.values.numpy()}


def identity_error(examples, weights: LayerWeights) -> float:
    """Largest |embedding sum (+ bias) − recorded pre-activation| over every example of the layer."""
    worst = 0.0
    for neuron in np.flatnonzero(np.diff(examples.offsets)):
        part = examples.neuron_slice(neuron)
        gate, linear = embedding_preactivations(neuron_embeddings(examples.neuron_vectors(neuron), weights, neuron),
                                                weights, neuron)
        worst = max(worst, float(np.abs(gate - examples.pre[part]).max()))
        if weights.gated:
            worst = max(worst, float(np.abs(linear - examples.pre_linear[part]).max()))
    return worst


def run(cfg: AtlasConfig) -> None:
    from builder.models import load_model, mlp_input_weights

    paths = AtlasPaths.of(cfg)
    if stage_is_done(paths.embed_meta, META_KIND, SCHEMA_VERSION, cfg):
        log.info("embed: up to date")
        return
    meta = read_collect_meta(paths, cfg)
    begin_stage(paths.stage("embed"), cfg)
    model = load_model(cfg)
    w_u = model.bridge.W_U.detach().float().cpu()
    errors = {}
    for layer in meta["layers"]:
        weights = mlp_input_weights(model, layer)
        w_out = model.bridge.blocks[layer].mlp.W_out.detach().float().cpu()
        arrays = {"w_in": weights.w_in.numpy(), "b_in": weights.b_in.numpy(), **direct_logit_effects(w_out, w_u)}
        if weights.w_gate is not None:
            arrays["w_gate"] = weights.w_gate.numpy()
        write_npz(paths.layer_weights(layer), LAYER_KIND, SCHEMA_VERSION, **arrays)
        examples = read_layer_examples(paths, layer)
        errors[layer] = identity_error(examples, read_layer_weights(paths, layer))
        # relative to the largest pre-activation: float32 sums of d_model products carry proportional rounding
        scale = max(1.0, float(np.abs(examples.pre).max(initial=0.0)))
        if errors[layer] > IDENTITY_TOLERANCE * scale:
            raise ArtefactError(f"layer {layer}: embedding sums differ from recorded pre-activations by "
                                f"{errors[layer]:.3g}; the collect artefact does not match this model, re-run collect")
        log.info("embed: layer %d identity holds (max error %.2e)", layer, errors[layer])
    write_json(paths.embed_meta, {"kind": META_KIND, "schema_version": SCHEMA_VERSION,
                                  "config_hash": cfg.config_hash(), "code_version": __version__, "peak_rss_mb": peak_rss_mb(),
                                  "identity_max_error": {str(k): v for k, v in errors.items()}})


def read_layer_weights(paths: AtlasPaths, layer: int) -> LayerWeights:
    arrays = read_npz(paths.layer_weights(layer), LAYER_KIND, SCHEMA_VERSION)
    try:
        return LayerWeights(w_gate=arrays.pop("w_gate", None), **arrays)
    except TypeError:
        raise ArtefactError(f"{paths.layer_weights(layer)} lacks expected arrays; delete it and re-run embed") \
            from None


def read_embed_meta(paths: AtlasPaths) -> dict:
    return read_json(paths.embed_meta, META_KIND, SCHEMA_VERSION)
