"""Embed: summing a neuron embedding (plus b_in) gives back the neuron's pre-activation, checked against the recorded
value and against a fresh forward pass; direct logit effects against a brute-force sort."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from builder import embed
from builder.config import EMBEDDED_MODEL, config_from_dict
from builder.embed import direct_logit_effects, embedding_preactivations, identity_error, neuron_embeddings
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.schema import read_collect_meta, read_examples, read_tokens, read_weights
from builder.stage import run_stage
from builder.subjects import InputWeights
from conftest import expect_error, stage_meta, tiny_config_dict

TOLERANCE = 1e-4


def recomputed_hooks(model, tokens: np.ndarray, layers: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """hook_pre (and hook_pre_linear) of every sequence from a plain run_with_cache over the whole model."""
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))
    return {layer: {hook: cache[f"blocks.{layer}.mlp.{hook}"].float().numpy()
                    for hook in ("hook_pre", "hook_pre_linear") if f"blocks.{layer}.mlp.{hook}" in cache}
            for layer in layers}


def check_identity(paths: AtlasPaths, layer: int, hooks: dict[str, np.ndarray], neurons=None) -> int:
    """For each neuron with examples: embedding sums equal the recorded pre-activations and the recomputed hooks.
    Returns how many examples were checked."""
    examples = read_examples(paths, f"L{layer}")
    weights = read_weights(paths, f"L{layer}").weights
    d_model = examples.vectors.shape[1]
    with_examples = np.flatnonzero(np.diff(examples.offsets))
    checked = 0
    for neuron in (with_examples if neurons is None else neurons):
        part = examples.unit_slice(neuron)
        seq, pos = examples.seq[part], examples.pos[part]
        embeddings = neuron_embeddings(examples.unit_vectors(neuron), weights, neuron)
        if weights.gated:
            assert embeddings.shape == (len(seq), 2 * d_model)
            gate = embeddings[:, :d_model].sum(axis=1, dtype=np.float64)
            linear = embeddings[:, d_model:].sum(axis=1, dtype=np.float64) + weights.b[neuron]
            np.testing.assert_allclose(gate, examples.pre[part], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(gate, hooks["hook_pre"][seq, pos, neuron], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(linear, examples.pre_linear[part], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(linear, hooks["hook_pre_linear"][seq, pos, neuron], atol=TOLERANCE, rtol=0)
        else:
            assert embeddings.shape == (len(seq), d_model)
            total = embeddings.sum(axis=1, dtype=np.float64) + weights.b[neuron]
            np.testing.assert_allclose(total, examples.pre[part], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(total, hooks["hook_pre"][seq, pos, neuron], atol=TOLERANCE, rtol=0)
        checked += len(seq)
    return checked


@pytest.fixture(scope="module")
def embedded_tiny(tmp_path_factory, tiny_models, corpus_file):
    """collect + embed on both tiny models, with each model loaded for recomputation."""
    from builder.models import load_model

    runs = {}
    for kind, folder in tiny_models.items():
        cfg = config_from_dict(tiny_config_dict(folder, corpus_file, tmp_path_factory.mktemp(f"embed-{kind}"),
                                                max_examples=8))
        run_stage("collect", cfg)
        run_stage("embed", cfg)
        model = load_model(cfg)
        tokens = read_tokens(AtlasPaths.of(cfg))
        runs[kind] = (cfg, model, recomputed_hooks(model, tokens, [0, 1]))
    return runs


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_embedding_sums_equal_recorded_and_recomputed_preactivations_on_tiny_models(embedded_tiny, kind):
    cfg, model, hooks = embedded_tiny[kind]
    for layer in (0, 1):
        checked = check_identity(AtlasPaths.of(cfg), layer, hooks[layer])
        assert checked >= 50  # the identity was exercised on real examples, not vacuously
    assert read_weights(AtlasPaths.of(cfg), "L0").weights.gated == (kind == "llama")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_embed_meta_records_an_identity_error_below_tolerance(embedded_tiny, kind):
    cfg, _, _ = embedded_tiny[kind]
    meta = stage_meta(cfg, "embed")
    assert sorted(meta["identity_max_error"]) == ["L0", "L1"]
    assert all(0 <= error < TOLERANCE for error in meta["identity_max_error"].values())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_stored_weights_are_the_models_folded_mlp_input_weights(embedded_tiny, kind):
    cfg, model, _ = embedded_tiny[kind]
    for layer in (0, 1):
        weights = read_weights(AtlasPaths.of(cfg), f"L{layer}").weights
        mlp = model.bridge.blocks[layer].mlp
        np.testing.assert_array_equal(weights.w, mlp.W_in.detach().float().numpy())
        assert weights.w.shape == (model.d_model, model.d_mlp)
        if kind == "llama":
            np.testing.assert_array_equal(weights.w_gate, mlp.W_gate.detach().float().numpy())
            np.testing.assert_array_equal(weights.b, np.zeros(model.d_mlp, np.float32))
        else:
            np.testing.assert_array_equal(weights.b, mlp.b_in.detach().float().numpy())
            assert np.abs(weights.b).max() > 0.01  # the tiny model's random biases make b_in matter


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_stored_direct_logit_effects_match_a_brute_force_sort_of_w_out_times_w_u(embedded_tiny, kind):
    cfg, model, _ = embedded_tiny[kind]
    w_u = model.bridge.W_U.detach().double().numpy()
    for layer in (0, 1):
        weights = read_weights(AtlasPaths.of(cfg), f"L{layer}")
        effects = model.bridge.blocks[layer].mlp.W_out.detach().double().numpy() @ w_u
        k = weights.logit_top_ids.shape[1]
        assert k == embed.LOGIT_TOP_K and weights.logit_top_ids.shape[0] == model.d_mlp
        order = np.argsort(-effects, axis=1, kind="stable")
        np.testing.assert_array_equal(weights.logit_top_ids, order[:, :k])
        np.testing.assert_array_equal(weights.logit_bottom_ids, order[:, ::-1][:, :k])
        np.testing.assert_allclose(weights.logit_top_values, np.take_along_axis(effects, order[:, :k], 1),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(weights.logit_bottom_values,
                                   np.take_along_axis(effects, order[:, ::-1][:, :k], 1), rtol=1e-4, atol=1e-5)


def test_direct_logit_effects_top_and_bottom_ids_match_argsort():
    rng = np.random.default_rng(0)
    w_out = rng.standard_normal((12, 7)).astype(np.float32)
    w_u = rng.standard_normal((7, 300)).astype(np.float32)
    effects = w_out.astype(np.float64) @ w_u
    for k in (1, 5, 10):
        result = direct_logit_effects(torch.from_numpy(w_out), torch.from_numpy(w_u), k=k)
        descending = np.argsort(-effects, axis=1)
        ascending = np.argsort(effects, axis=1)
        np.testing.assert_array_equal(result["logit_top_ids"], descending[:, :k])
        np.testing.assert_array_equal(result["logit_bottom_ids"], ascending[:, :k])
        np.testing.assert_allclose(result["logit_top_values"], np.take_along_axis(effects, descending[:, :k], 1),
                                   rtol=1e-5)
        np.testing.assert_allclose(result["logit_bottom_values"], np.take_along_axis(effects, ascending[:, :k], 1),
                                   rtol=1e-5)
        assert (np.diff(result["logit_top_values"], axis=1) <= 0).all()
        assert (np.diff(result["logit_bottom_values"], axis=1) >= 0).all()


def _weights(w_in, b_in, w_gate=None) -> InputWeights:
    return InputWeights(w=w_in, b=b_in, w_gate=w_gate)


def test_neuron_embeddings_are_elementwise_products_and_sum_to_the_preactivation():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((4, 6)).astype(np.float32)
    w_in, w_gate = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    b_in = rng.standard_normal(3).astype(np.float32)
    plain = _weights(w_in, b_in)
    emb = neuron_embeddings(vectors, plain, 2)
    np.testing.assert_array_equal(emb, vectors * w_in[:, 2])
    pre, again = embedding_preactivations(emb, plain, 2)
    np.testing.assert_allclose(pre, vectors.astype(np.float64) @ w_in[:, 2] + b_in[2], rtol=1e-6)
    np.testing.assert_array_equal(pre, again)
    gated = _weights(w_in, b_in, w_gate)
    emb = neuron_embeddings(vectors, gated, 1)
    np.testing.assert_array_equal(emb, np.concatenate([vectors * w_gate[:, 1], vectors * w_in[:, 1]], axis=1))
    gate, linear = embedding_preactivations(emb, gated, 1)
    np.testing.assert_allclose(gate, vectors.astype(np.float64) @ w_gate[:, 1], rtol=1e-6)
    np.testing.assert_allclose(linear, vectors.astype(np.float64) @ w_in[:, 1] + b_in[1], rtol=1e-6)


def test_identity_error_detects_weights_that_do_not_match_the_examples(embedded_tiny):
    cfg, _, _ = embedded_tiny["gpt2"]
    paths = AtlasPaths.of(cfg)
    examples, weights = read_examples(paths, "L1"), read_weights(paths, "L1").weights
    assert identity_error(examples, weights) < TOLERANCE
    other = dataclasses.replace(weights, w=weights.w[:, ::-1].copy())
    assert identity_error(examples, other) > 100 * TOLERANCE


def test_embed_refuses_a_collect_artefact_from_a_different_model_of_the_same_shape(tmp_path, tiny_gpt2, make_config,
                                                                                   tokenizer):
    """Collect with one tiny GPT-2, then embed with another of identical shape: the identity fails, one-line error."""
    from transformers import AutoModelForCausalLM

    twin = tmp_path / "twin"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(twin)
    tokenizer.save_pretrained(twin)
    cfg = make_config(tiny_gpt2)
    run_stage("collect", cfg)
    # collect's key names the model, so the stale collect artefact is refused before any identity check
    with pytest.raises(ArtefactError, match="run `atlas collect`"):
        run_stage("embed", dataclasses.replace(cfg, model=str(twin)))


def test_embed_refuses_a_collect_artefact_from_a_model_with_another_mlp_width(tiny_models, make_config):
    """Collect with the tiny GPT-2 (d_mlp 128), then `atlas embed` after switching the config to the tiny Llama
    (d_mlp 64): embed must report the stale collect artefact as an ArtefactError, not crash."""
    cfg = make_config(tiny_models["gpt2"])
    run_stage("collect", cfg)
    expect_error(ArtefactError, lambda: run_stage("embed", dataclasses.replace(cfg, model=str(tiny_models["llama"]))),
                 "collect")


def test_embed_skips_when_up_to_date(embedded_tiny, monkeypatch):
    import builder.models

    cfg, _, _ = embedded_tiny["gpt2"]

    def no_load(_cfg):
        raise AssertionError("embed reloaded the model although its artefacts are up to date")

    monkeypatch.setattr(builder.models, "load_model", no_load)
    run_stage("embed", cfg)


# --------------------------------------------------------------------------------------------------------------------
# The embedded model, on a tiny slice


@pytest.mark.slow
def test_embedding_identity_holds_on_the_embedded_model(tmp_path, embedded_corpus, share_embedded_model):
    model = share_embedded_model
    cfg = config_from_dict({"name": "embedded-slice", "model": EMBEDDED_MODEL, "data_files": [str(embedded_corpus)],
                            "max_sequences": 4, "context_length": 32, "layers": [0, 5], "batch_size": 4,
                            "device": "cpu", "max_examples": 3, "out_dir": str(tmp_path / "build"),
                            "site_dir": str(tmp_path / "site")})
    run_stage("collect", cfg)
    run_stage("embed", cfg)
    paths = AtlasPaths.of(cfg)
    meta = read_collect_meta(paths)
    assert meta["n_sequences"] == 4 and meta["layers"] == [0, 5] and meta["gated"]
    tokens = read_tokens(paths)
    hooks = recomputed_hooks(model, tokens, [0, 5])
    for layer in (0, 5):
        examples = read_examples(paths, f"L{layer}")
        counts = np.diff(examples.offsets)
        with_examples = np.flatnonzero(counts)
        assert len(with_examples) > 100
        # A few neurons: the first and last with examples, the one with the largest max, and some in between.
        picks = sorted({int(with_examples[0]), int(with_examples[-1]),
                        int(np.argmax(examples.max_activation)),
                        *np.random.default_rng(layer).choice(with_examples, 8, replace=False).tolist()})
        assert check_identity(paths, layer, hooks[layer], neurons=picks) >= len(picks)
    identity = stage_meta(cfg, "embed")["identity_max_error"]
    assert sorted(identity) == ["L0", "L5"] and max(identity.values()) < TOLERANCE
