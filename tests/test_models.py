"""Model loading: where a model name points, what the loaded bridge reports, and the folded MLP input weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from builder.config import EMBEDDED_MODEL, config_from_dict
from builder.errors import ConfigError, ModelError
from builder.models import (check_model_fits, embedded_model_folder, load_model,
                            resolve_model_source, selected_layers)
from builder.subjects import model_subject_sets
from conftest import TINY_N_POSITIONS


def mlp_input_weights(model, layer: int) -> dict[str, torch.Tensor]:
    """The layer's input weights as the MLP subject set reads them, as tensors."""
    weights = model_subject_sets(model, [layer])[0].input_weights(model)
    return {"w_in": torch.from_numpy(weights.w), "b_in": torch.from_numpy(weights.b),
            "w_gate": None if weights.w_gate is None else torch.from_numpy(weights.w_gate)}


def cfg_for(model, **overrides):
    return config_from_dict({"model": str(model), "data_files": ["x.jsonl"], "device": "cpu", "context_length": 16,
                             **overrides})


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {kind: load_model(cfg_for(folder)) for kind, folder in tiny_models.items()}


# --------------------------------------------------------------------------------------------------------------------
# resolve_model_source


def test_missing_relative_model_folder_is_a_model_error():
    with pytest.raises(ModelError, match=r"model folder './no/such/model' does not exist"):
        resolve_model_source("./no/such/model")


def test_missing_absolute_model_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source(str(tmp_path / "absent"))


def test_missing_nested_path_without_dot_prefix_is_a_model_error():
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source("no/such/model")


def test_folder_without_config_json_is_a_model_error(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_source(str(tmp_path / "weights"))


def test_unknown_embedded_name_names_the_only_embedded_model():
    with pytest.raises(ModelError, match=EMBEDDED_MODEL):
        resolve_model_source("embedded:llama-7b")


@pytest.mark.parametrize("name", ["gpt2", "EleutherAI/pythia-70m", "gpt2-smal"])
def test_hub_style_names_are_passed_to_the_hub(name):
    assert resolve_model_source(name) == (name, False)


def test_local_folder_resolves_to_itself(tiny_gpt2):
    assert resolve_model_source(str(tiny_gpt2)) == (str(tiny_gpt2), True)


def test_embedded_name_resolves_to_the_cached_safetensors_folder(embedded_folder):
    path, local = resolve_model_source(EMBEDDED_MODEL)
    assert local and path == str(embedded_model_folder()) == str(embedded_folder)
    assert (embedded_folder / "model.safetensors").is_file() and (embedded_folder / "tokenizer.json").is_file()


def test_home_relative_model_folder_is_expanded(tmp_path, tiny_gpt2, monkeypatch):
    """A model folder written as ~/... exists but resolve_model_source never expands the ~."""
    home = tmp_path / "home"
    shutil.copytree(tiny_gpt2, home / "models" / "tiny")
    monkeypatch.setenv("HOME", str(home))
    try:
        path, local = resolve_model_source("~/models/tiny")
    except ModelError as error:
        pytest.fail(f"an existing ~/ model folder was rejected: {error.format_message()}")
    assert local
    assert (home / "models" / "tiny").samefile(path)


# --------------------------------------------------------------------------------------------------------------------
# load_model and what it reports


def test_tiny_gpt2_loads_as_a_plain_mlp_with_its_shapes(loaded):
    model = loaded["gpt2"]
    assert (model.n_layers, model.d_model, model.d_mlp, model.n_ctx) == (2, 32, 128, TINY_N_POSITIONS)
    assert not model.gated
    assert model.device == torch.device("cpu")


def test_tiny_llama_loads_as_a_gated_mlp_with_its_shapes(loaded):
    model = loaded["llama"]
    assert (model.n_layers, model.d_model, model.d_mlp, model.n_ctx) == (2, 32, 64, TINY_N_POSITIONS)
    assert model.gated


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_folded_input_weights_reproduce_hook_pre_from_hook_normalized(loaded, kind):
    model = loaded[kind]
    tokens = torch.randint(0, len(model.tokenizer), (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens)
    for layer in range(model.n_layers):
        weights = mlp_input_weights(model, layer)
        normalized = cache[f"blocks.{layer}.ln2.hook_normalized"].float()
        assert weights["w_in"].shape == (model.d_model, model.d_mlp) and weights["b_in"].shape == (model.d_mlp,)
        if model.gated:
            assert weights["w_gate"].shape == (model.d_model, model.d_mlp)
            torch.testing.assert_close(normalized @ weights["w_gate"], cache[f"blocks.{layer}.mlp.hook_pre"],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(normalized @ weights["w_in"] + weights["b_in"],
                                       cache[f"blocks.{layer}.mlp.hook_pre_linear"], atol=1e-5, rtol=1e-5)
        else:
            assert weights["w_gate"] is None
            torch.testing.assert_close(normalized @ weights["w_in"] + weights["b_in"],
                                       cache[f"blocks.{layer}.mlp.hook_pre"], atol=1e-5, rtol=1e-5)


def test_gpt2_input_weights_fold_the_norm_scale_and_bias(loaded, tiny_gpt2):
    """The folded W_in is the raw c_fc weight scaled by ln_2's weight (randomised in the tiny model) and centred over
    d_model (hook_normalized has zero mean, so centring changes no pre-activation); b_in absorbs ln_2's bias."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2), dtype=torch.float32)
    raw_w = hf.transformer.h[0].mlp.c_fc.weight.detach()
    scale, shift = hf.transformer.h[0].ln_2.weight.detach(), hf.transformer.h[0].ln_2.bias.detach()
    weights = mlp_input_weights(loaded["gpt2"], 0)
    folded = scale[:, None] * raw_w
    torch.testing.assert_close(weights["w_in"], folded - folded.mean(dim=0, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights["b_in"], shift @ raw_w + hf.transformer.h[0].mlp.c_fc.bias.detach(),
                               atol=1e-5, rtol=1e-5)


def test_load_model_rejects_a_context_longer_than_the_model_allows(tiny_gpt2):
    with pytest.raises(ConfigError, match=r"context_length 128 is longer than .* allows \(64\)"):
        load_model(cfg_for(tiny_gpt2, context_length=128))


def test_load_model_rejects_a_layer_out_of_range(tiny_gpt2):
    with pytest.raises(ConfigError, match=r"layer 2 is out of range: the model has layers 0..1"):
        load_model(cfg_for(tiny_gpt2, layers=[0, 2]))


def test_load_model_of_an_unknown_hub_name_offline_is_a_model_error_with_a_suggestion():
    with pytest.raises(ModelError, match=r"unknown model 'gpt2-smal' \(did you mean"):
        load_model(cfg_for("gpt2-smal"))


# --------------------------------------------------------------------------------------------------------------------
# selected_layers / check_model_fits


def test_selected_layers_defaults_to_every_layer():
    assert selected_layers(cfg_for("m"), 4) == [0, 1, 2, 3]


def test_selected_layers_are_sorted():
    assert selected_layers(cfg_for("m", layers=[3, 0, 2]), 4) == [0, 2, 3]


def test_selected_layers_reject_out_of_range_with_the_valid_range():
    with pytest.raises(ConfigError, match=r"layer 4 is out of range: the model has layers 0..3"):
        selected_layers(cfg_for("m", layers=[1, 4]), 4)


def test_selected_layers_reject_duplicates():
    with pytest.raises(ConfigError, match="twice"):
        selected_layers(cfg_for("m", layers=[1, 1]), 4)


def test_context_equal_to_the_model_limit_fits(loaded):
    check_model_fits(cfg_for("m", context_length=TINY_N_POSITIONS), loaded["gpt2"])
    with pytest.raises(ConfigError, match="lower context_length"):
        check_model_fits(cfg_for("m", context_length=TINY_N_POSITIONS + 1), loaded["gpt2"])


def test_error_messages_are_one_line():
    for call in (lambda: resolve_model_source("./no/such/model"), lambda: resolve_model_source("embedded:x"),
                 lambda: selected_layers(cfg_for("m", layers=[9]), 2)):
        with pytest.raises((ModelError, ConfigError)) as caught:
            call()
        assert "\n" not in caught.value.format_message()


def test_embedded_model_weights_load_as_smollm2(embedded_model):
    assert (embedded_model.n_layers, embedded_model.d_model, embedded_model.d_mlp) == (30, 576, 1536)
    assert embedded_model.gated
    assert np.isfinite(mlp_input_weights(embedded_model, 0)["w_gate"].numpy()).all()
