"""Embed: neuron embedding = a unit's input vector ⊙ the unit's input weights.

Summing a neuron embedding (plus the bias) gives back the unit's pre-activation at that token, which is checked here
on every collected example. For gated MLPs the embedding is the gate part and the linear part concatenated, and each
part sums to its own pre-activation (hook_pre and hook_pre_linear).

Embeddings are cheap to form, so they are never stored per unit: this stage stores each subject set's input weights
once, and later stages call `neuron_embeddings` where they need them. It also stores each unit's direct logit
effects (its output direction through the unembedding), which likewise need the model.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from jaxtyping import Float

from builder.errors import ArtefactError
from builder.schema import (DICTIONARY, WEIGHTS, SetExamples, collect_sets, read_collect_meta, read_example_fields,
                            read_examples)
from builder.stage import StageRun
from builder.subjects import InputWeights, embedding_preactivations, neuron_embeddings

log = logging.getLogger(__name__)

IDENTITY_TOLERANCE = 1e-4
LOGIT_TOP_K = 10


def direct_logit_effects(w_out: Float[torch.Tensor, "n_units d_model"], w_u: Float[torch.Tensor, "d_model d_vocab"],
                         k: int = LOGIT_TOP_K) -> dict[str, np.ndarray]:
    """Top-k promoted and suppressed tokens of each unit through its output direction and the unembedding."""
    effects = w_out.float() @ w_u.float()
    top = effects.topk(k, dim=1)
    bottom = effects.topk(k, dim=1, largest=False)
    return {"logit_top_ids": top.indices.int().numpy(), "logit_top_values": top.values.numpy(),
            "logit_bottom_ids": bottom.indices.int().numpy(), "logit_bottom_values": bottom.values.numpy()}


def identity_error(examples: SetExamples, weights: InputWeights) -> float:
    """Largest |embedding sum (+ bias) − recorded pre-activation| over every example of the set."""
    worst = 0.0
    for unit in np.flatnonzero(np.diff(examples.offsets)):
        part = examples.unit_slice(unit)
        gate, linear = embedding_preactivations(neuron_embeddings(examples.unit_vectors(unit), weights, unit),
                                                weights, unit)
        worst = max(worst, float(np.abs(gate - examples.pre[part]).max()))
        if weights.gated:
            worst = max(worst, float(np.abs(linear - examples.pre_linear[part]).max()))
    return worst


def build(run: StageRun) -> dict:
    from builder.models import load_model

    paths = run.paths
    sets = collect_sets(read_collect_meta(paths))
    model = load_model(run.cfg)
    w_u = model.bridge.W_U.detach().float().cpu()
    errors = {}
    for s in sets:
        weights = s.input_weights(model)
        if weights.w.shape != (s.d_input, s.size):
            raise ArtefactError(f"{s.key}: the model's input weights have shape {weights.w.shape}, the collect "
                                f"artefact says {(s.d_input, s.size)}; re-run collect for this model")
        arrays = {"w": weights.w, "b": weights.b, **direct_logit_effects(s.output_directions(model), w_u)}
        if weights.w_gate is not None:
            arrays["w_gate"] = weights.w_gate
        examples = read_examples(paths, s.key)
        errors[s.key] = identity_error(examples, weights)
        # relative to the largest pre-activation: float32 sums of d_input products carry proportional rounding
        scale = max(1.0, float(np.abs(examples.pre).max(initial=0.0)))
        if errors[s.key] > IDENTITY_TOLERANCE * scale:
            raise ArtefactError(f"{s.key}: embedding sums differ from recorded pre-activations by "
                                f"{errors[s.key]:.3g}; the collect artefact does not match this model, re-run collect")
        run.write_npz(WEIGHTS, paths.set_file("embed", s.key), **arrays)
        log.info("embed: %s identity holds (max error %.2e)", s.key, errors[s.key])
    write_dictionaries(run, sets)
    return {"identity_max_error": errors}


def write_dictionaries(run: StageRun, sets: list) -> None:
    """Per SAE set: which neurons each latent writes to most and which latents write to each neuron most (SAEs on
    an MLP's activations), and each latent's MCS to every other SAE on the same hook (builder/dictionary.py)."""
    from builder.dictionary import latents_of_neurons, max_cosine_similarity, neuron_alignment
    from builder.sae import cached_sae

    saes = [s for s in sets if s.kind == "sae"]
    for s in saes:
        w_dec = cached_sae(s.folder).W_dec
        maxima = read_example_fields(run.paths, s.key, ("max_activation",))["max_activation"]
        arrays = {}
        if s.writes == "mlp":
            arrays["align_neuron"], arrays["align_weight"] = neuron_alignment(w_dec, maxima)
            arrays["neuron_latent"], arrays["neuron_latent_weight"] = latents_of_neurons(w_dec, maxima)
        for other in saes:
            if other.key != s.key and other.hook_name == s.hook_name:
                arrays[f"mcs.{other.key}"], arrays[f"mcs_match.{other.key}"] = max_cosine_similarity(
                    w_dec, cached_sae(other.folder).W_dec)
        run.write_npz(DICTIONARY, run.paths.dictionary(s.key), **arrays)
