"""Reading SAELens-layout SAEs natively: both cfg.json generations, every architecture and normalisation against a
literal per-latent reference, and one clear line for every bad folder."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.paths import AtlasPaths
from builder.render.codec import read_unit_table
from builder.sae import SaeError, cached_sae, read_sae, write_sae
from builder.schema import read_collect_meta, read_examples, read_neighbours, read_tokens

D_IN, D_SAE = 6, 10


def sae_tensors(rng, architecture: str) -> dict[str, np.ndarray]:
    tensors = {"W_enc": rng.normal(size=(D_IN, D_SAE)), "b_enc": rng.normal(0, 0.3, D_SAE),
               "W_dec": rng.normal(size=(D_SAE, D_IN)), "b_dec": rng.normal(0, 0.5, D_IN)}
    if architecture == "jumprelu":
        tensors["threshold"] = rng.uniform(0.1, 0.8, D_SAE)
    return tensors


def v6_cfg(architecture: str = "standard", **overrides) -> dict:
    """A SAELens 6 cfg.json: hook and model under `metadata`."""
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"hook_name": "blocks.1.mlp.hook_post", "model_name": "tiny", "sae_lens_version": "6.18.0"}}
    if architecture == "topk":
        cfg["k"] = 3
    cfg.update(overrides)
    return cfg


def v5_cfg(**overrides) -> dict:
    """An older cfg.json: everything at the top level, TopK as an activation function, `hook_point`."""
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_pre", "hook_point_layer": 0,
           "model_name": "gpt2-small", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
           "apply_b_dec_to_input": False, "normalize_activations": None}
    cfg.update(overrides)
    return cfg


def literal_encode(x: np.ndarray, cfg: dict, t: dict[str, np.ndarray], architecture: str, k: int = 0) -> np.ndarray:
    """SAELens' encode written out per token and per latent, in float64."""
    out = np.zeros((len(x), D_SAE))
    for row, vector in enumerate(x.astype(np.float64)):
        mode = cfg.get("normalize_activations") or "none"
        if mode == "constant_norm_rescale":
            vector = vector * math.sqrt(D_IN) / math.sqrt(sum(v * v for v in vector))
        elif mode == "layer_norm":
            mean = sum(vector) / D_IN
            centred = vector - mean
            std = math.sqrt(sum(c * c for c in centred) / (D_IN - 1))
            vector = centred / (std + 1e-5)
        elif mode == "expected_average_only_in":
            vector = vector * cfg["norm_scaling_factor"]
        if cfg.get("apply_b_dec_to_input", True):
            vector = vector - t["b_dec"]
        pre = [sum(vector[i] * t["W_enc"][i, j] for i in range(D_IN)) + t["b_enc"][j] for j in range(D_SAE)]
        for j, h in enumerate(pre):
            if architecture == "standard":
                out[row, j] = max(h, 0.0)
            elif architecture == "jumprelu":
                out[row, j] = max(h, 0.0) if h > t["threshold"][j] else 0.0
        if architecture == "topk":
            for j in sorted(range(D_SAE), key=lambda j: -pre[j])[:k]:
                out[row, j] = max(pre[j], 0.0)
    return out


CASES = [("standard", {}), ("jumprelu", {}), ("topk", {}),
         ("standard", {"normalize_activations": "constant_norm_rescale"}),
         ("jumprelu", {"normalize_activations": "layer_norm"}),
         ("topk", {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 2.5}),
         ("standard", {"apply_b_dec_to_input": False})]


@pytest.mark.parametrize("architecture, overrides", CASES)
def test_encoding_matches_a_literal_per_latent_reference(tmp_path, architecture, overrides):
    rng = np.random.default_rng(7)
    tensors = sae_tensors(rng, architecture)
    cfg = v6_cfg(architecture, **overrides)
    sae = read_sae(write_sae(tmp_path / "sae", cfg, tensors))
    assert sae.cfg.architecture == architecture and sae.cfg.hook_name == "blocks.1.mlp.hook_post"
    assert sae.cfg.layer == 1 and sae.cfg.model_name == "tiny"
    x = rng.normal(size=(12, D_IN)).astype(np.float32)
    maths = sae.on("cpu")
    got = maths.encode(torch.as_tensor(x)).numpy()
    reference = literal_encode(x, cfg, {n: v.astype(np.float32).astype(np.float64) for n, v in tensors.items()},
                               architecture, cfg.get("k", 0))
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
    assert (got > 0).any() and (got == 0).any()  # the activation function did something either way
    # The identity the atlas rests on: x' · W_enc[:, j] summed, plus b_enc[j], is latent j's pre-activation.
    x_in = maths.sae_input(torch.as_tensor(x)).numpy()
    pre = maths.pre(torch.as_tensor(x_in)).numpy()
    for j in range(D_SAE):
        np.testing.assert_allclose((x_in * sae.W_enc[:, j]).sum(axis=1) + sae.b_enc[j], pre[:, j], atol=1e-4)


def test_decoding_undoes_the_input_normalisation(tmp_path):
    rng = np.random.default_rng(8)
    tensors = sae_tensors(rng, "standard")
    x = torch.as_tensor(rng.normal(2.0, 3.0, size=(5, D_IN)).astype(np.float32))
    f = torch.as_tensor(rng.uniform(0, 1, size=(5, D_SAE)).astype(np.float32))
    plain = f.double() @ torch.as_tensor(tensors["W_dec"]).float().double() + \
        torch.as_tensor(tensors["b_dec"]).float().double()
    for mode, expected in (("none", plain), ("constant_norm_rescale", plain * x.double().norm(dim=-1, keepdim=True)
                                              / math.sqrt(D_IN)),
                           ("layer_norm", plain * (x.double() - x.double().mean(-1, keepdim=True)).std(
                               -1, keepdim=True) + x.double().mean(-1, keepdim=True))):
        sae = read_sae(write_sae(tmp_path / mode, v6_cfg(normalize_activations=mode), tensors))
        np.testing.assert_allclose(sae.on("cpu").decode(f, x).double().numpy(), expected.numpy(), atol=1e-4)


def test_older_cfg_json_keeps_hook_and_model_at_the_top_level_and_names_topk_by_its_activation(tmp_path):
    rng = np.random.default_rng(9)
    tensors = sae_tensors(rng, "topk")
    sae = read_sae(write_sae(tmp_path / "old", v5_cfg(), tensors))
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name, sae.cfg.model_name, sae.cfg.layer) == \
        ("topk", 4, "blocks.0.hook_resid_pre", "gpt2-small", 0)
    assert sae.cfg.apply_b_dec_to_input is False and sae.cfg.normalize_activations == "none"
    x = rng.normal(size=(8, D_IN)).astype(np.float32)
    np.testing.assert_allclose(sae.on("cpu").encode(torch.as_tensor(x)).numpy(),
                               literal_encode(x, v5_cfg(), tensors, "topk", 4), atol=1e-4)
    assert read_sae(write_sae(tmp_path / "meta", {**v6_cfg(), "meta": v6_cfg()["metadata"], "metadata": None},
                              sae_tensors(rng, "standard"))).cfg.hook_name == "blocks.1.mlp.hook_post"
    assert cached_sae(str(tmp_path / "old")) is cached_sae(str(tmp_path / "old"))


def _bad_folders(tmp_path):
    rng = np.random.default_rng(10)
    good = sae_tensors(rng, "standard")
    yield "missing folder", tmp_path / "nowhere", "no such folder"
    (tmp_path / "no-cfg").mkdir()
    yield "missing cfg", tmp_path / "no-cfg", "cfg.json is missing"
    folder = write_sae(tmp_path / "bad-json", v6_cfg(), good)
    (folder / "cfg.json").write_text("{not json")
    yield "malformed cfg", folder, "not valid JSON"
    yield "no hook", write_sae(tmp_path / "no-hook", {**v6_cfg(), "metadata": {}}, good), "names no hook_name"
    yield "unknown architecture", write_sae(tmp_path / "gated", v6_cfg("gated"), good), "unknown architecture"
    yield "hook_z", write_sae(tmp_path / "z", v6_cfg(metadata={"hook_name": "blocks.0.attn.hook_z"}), good), \
        "hook_z"
    yield "unfolded average norm", write_sae(tmp_path / "avg", v6_cfg(normalize_activations=
                                                                       "expected_average_only_in"), good), \
        "norm_scaling_factor"
    yield "topk without k", write_sae(tmp_path / "k", {**v6_cfg("topk"), "k": None}, good), "positive integer k"
    missing = dict(good)
    del missing["b_enc"]
    yield "missing tensor", write_sae(tmp_path / "tensor", v6_cfg(), missing), "no tensor 'b_enc'"
    yield "jumprelu without threshold", write_sae(tmp_path / "jump", v6_cfg("jumprelu"), good), "'threshold'"
    yield "wrong shape", write_sae(tmp_path / "shape", v6_cfg(d_in=D_IN + 1), good), "has shape"
    nan = {**good, "W_dec": np.full((D_SAE, D_IN), np.nan)}
    yield "non-finite", write_sae(tmp_path / "nan", v6_cfg(), nan), "non-finite"
    folder = write_sae(tmp_path / "weights", v6_cfg(), good)
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    yield "unreadable weights", folder, "cannot be read"


def test_every_bad_folder_is_one_line_naming_the_problem_and_the_fix(tmp_path):
    seen = 0
    for label, folder, needle in _bad_folders(tmp_path):
        with pytest.raises(SaeError) as caught:
            read_sae(folder)
        message = caught.value.format_message()
        assert needle in message and "\n" not in message and ";" in message, (label, message)
        seen += 1
    assert seen == 13


def test_written_folders_are_json_and_safetensors_that_read_back_exactly(tmp_path):
    rng = np.random.default_rng(11)
    tensors = sae_tensors(rng, "jumprelu")
    folder = write_sae(tmp_path / "sae", v6_cfg("jumprelu"), tensors)
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"
    sae = read_sae(folder)
    for name, value in tensors.items():
        np.testing.assert_array_equal(getattr(sae, name), value.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# SAE latents as subject sets on the tiny models

SAE_SITES = [("standard", "blocks.1.mlp.hook_post", "none"), ("jumprelu", "blocks.0.hook_resid_post", "layer_norm"),
             ("topk", "blocks.1.hook_resid_pre", "constant_norm_rescale")]
TINY_D_SAE = 40
INACTIVE = 7  # the latent each random SAE switches off
TWINS = 10  # latents the twin SAE shares with the standard one


def random_sae(folder, rng, architecture: str, hook: str, d_in: int, normalise: str, model_name: str = "tiny"):
    """A random SAE whose latents fire on some tokens: encoder columns of unit norm, small biases."""
    w_enc = rng.normal(size=(d_in, TINY_D_SAE))
    tensors = {"W_enc": w_enc / np.linalg.norm(w_enc, axis=0), "b_enc": rng.normal(0, 0.05, TINY_D_SAE),
               "W_dec": rng.normal(0, 0.2, (TINY_D_SAE, d_in)), "b_dec": rng.normal(0, 0.05, d_in)}
    tensors["b_enc"][INACTIVE] = -1e3  # never active on any input: listed, never paged
    if architecture == "jumprelu":
        tensors["threshold"] = rng.uniform(0.0, 0.2, TINY_D_SAE)
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": TINY_D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": normalise, "reshape_activations": "none",
           "metadata": {"hook_name": hook, "model_name": model_name}}
    if architecture == "topk":
        cfg["k"] = 6
    return write_sae(folder, cfg, tensors)


@pytest.fixture(scope="module")
def sae_runs(tmp_path_factory, tiny_models, corpus_file):
    """collect + embed with three SAEs (one per architecture) beside layer 1's neurons, on both tiny models."""
    from builder.config import config_from_dict
    from builder.models import load_model
    from builder.pipeline import STAGES
    from builder.stage import run_stage
    from conftest import tiny_config_dict

    runs = {}
    for kind, folder in tiny_models.items():
        out = tmp_path_factory.mktemp(f"sae-{kind}")
        rng = np.random.default_rng(21)
        widths = {"mlp.hook_post": 128 if kind == "gpt2" else 64}
        specs = []
        for architecture, hook, normalise in SAE_SITES:
            d_in = widths.get(hook.split(".", 2)[2], 32)
            path = random_sae(out / f"sae-{architecture}", rng, architecture, hook, d_in, normalise)
            specs.append({"path": str(path), "slug": f"sae-{architecture}"})
        # A second dictionary on the standard SAE's hook that finds its first TWINS latents again (same decoder rows).
        standard = read_sae(specs[0]["path"])
        twin_tensors = {name: getattr(standard, name).copy() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        twin_tensors["W_dec"][TWINS:] = rng.normal(0, 0.2, twin_tensors["W_dec"][TWINS:].shape)
        twin = write_sae(out / "sae-twin", json.loads((Path(specs[0]["path"]) / "cfg.json").read_text()), twin_tensors)
        specs.append({"path": str(twin), "slug": "sae-twin"})
        cfg = config_from_dict(tiny_config_dict(folder, corpus_file, out, max_examples=8, layers=[1], sae=specs))
        for stage in STAGES:
            run_stage(stage, cfg)
        runs[kind] = (cfg, load_model(cfg))
    return runs


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_latent_embeddings_sum_to_preactivations_recomputed_from_a_fresh_forward(sae_runs, kind):
    from builder.embed import embedding_preactivations, neuron_embeddings
    from builder.paths import AtlasPaths
    from builder.schema import read_collect_meta, read_examples, read_tokens, read_weights

    cfg, model = sae_runs[kind]
    paths = AtlasPaths.of(cfg)
    described = {d["key"]: d for d in read_collect_meta(paths)["subject_sets"]}
    assert sorted(described) == ["L1", "sae-jumprelu", "sae-standard", "sae-topk", "sae-twin"]
    tokens = read_tokens(paths)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))
    for architecture, hook, _ in SAE_SITES:
        key = f"sae-{architecture}"
        assert described[key]["kind"] == "sae" and described[key]["hook_name"] == hook
        maths = read_sae(cfg.sae[[s.slug for s in cfg.sae].index(key)].path).on("cpu")
        fresh_in = maths.sae_input(cache[hook].float())
        fresh_pre, fresh_post = maths.pre(fresh_in).numpy(), maths.encode(cache[hook].float()).numpy()
        examples, weights = read_examples(paths, key), read_weights(paths, key).weights
        checked = 0
        for unit in np.flatnonzero(np.diff(examples.offsets)):
            part = examples.unit_slice(unit)
            seq, pos = examples.seq[part], examples.pos[part]
            pre, _ = embedding_preactivations(neuron_embeddings(examples.unit_vectors(unit), weights, unit),
                                              weights, unit)
            np.testing.assert_allclose(pre, fresh_pre[seq, pos, unit], atol=1e-4, rtol=0)
            np.testing.assert_allclose(examples.pre[part], fresh_pre[seq, pos, unit], atol=1e-4, rtol=0)
            np.testing.assert_allclose(examples.act[part], fresh_post[seq, pos, unit], atol=1e-4, rtol=0)
            checked += len(seq)
        assert checked >= 40, (key, checked)
        # The maxima are the latents' maxima over the whole corpus.
        np.testing.assert_allclose(examples.max_activation, fresh_post.reshape(-1, TINY_D_SAE).max(axis=0),
                                   atol=1e-4)


def test_an_sae_that_does_not_fit_the_model_stops_with_one_line_and_writes_nothing(tmp_path, tiny_gpt2,
                                                                                 corpus_file):
    from builder.config import config_from_dict
    from builder.paths import AtlasPaths
    from builder.stage import run_stage
    from conftest import expect_error, tiny_config_dict

    rng = np.random.default_rng(3)
    cases = [(random_sae(tmp_path / "wide", rng, "standard", "blocks.0.hook_resid_post", 31, "none"), "31"),
             (random_sae(tmp_path / "deep", rng, "standard", "blocks.7.hook_resid_post", 32, "none"), "not in"),
             (random_sae(tmp_path / "nohook", rng, "standard", "blocks.0.hook_nowhere", 32, "none"), "not in")]
    for i, (folder, phrase) in enumerate(cases):
        cfg = config_from_dict(tiny_config_dict(tiny_gpt2, corpus_file, tmp_path / f"run{i}",
                                                sae=[{"path": str(folder), "slug": "s"}]))
        expect_error(SaeError, lambda: run_stage("collect", cfg), phrase, "SAE")
        paths = AtlasPaths.of(cfg)
        assert not paths.meta("collect").exists() and not list(paths.root.rglob("*.npz"))


def test_latent_pages_sit_at_their_sets_slug_and_inactive_latents_are_listed_without_pages(sae_runs):
    cfg, model = sae_runs["gpt2"]
    site = Path(cfg.site_dir) / cfg.name
    table, columns = read_unit_table(site / "data")  # the manifest and every set's shard, as the index page reads
    sets = {s["key"]: s for s in table["sets"]}
    for architecture, hook, _ in SAE_SITES:
        slug = f"sae-{architecture}"
        assert sets[slug]["kind"] == "sae" and sets[slug]["size"] == TINY_D_SAE
        listing = (site / slug / "index.html").read_text()
        assert f'href="../index.html#set={slug}"' in listing  # the sortable index, filtered to this SAE
        found = re.search(r'id="inactive">(\d+) latents? never active on this corpus \(no page\): ([^.]*)\.', listing)
        inactive = [int(n[1:]) for n in found.group(2).split(", ")]
        assert INACTIVE in inactive and int(found.group(1)) == len(inactive)
        active = [n for n in range(TINY_D_SAE) if n not in inactive]
        for n in range(TINY_D_SAE):
            assert (site / slug / f"N{n}" / "index.html").exists() == (n in active)
            assert (f'href="N{n}/index.html"' in listing) == (n in active)
        page = (site / slug / f"N{active[0]}" / "index.html").read_text()
        assert f"<h1>SAE {slug} · Latent {active[0]}</h1>" in page and "the latent's maximum" in page
        # prev/next step over inactive latents
        before = active[active.index(max(n for n in active if n < INACTIVE))]
        after = min(n for n in active if n > INACTIVE)
        assert f'href="../N{after}/index.html"' in (site / slug / f"N{before}" / "index.html").read_text()
        # Density is the share of tokens on which the latent is above 0, recomputed from a fresh forward.
        maths = read_sae(cfg.sae[[s.slug for s in cfg.sae].index(slug)].path).on("cpu")
        tokens = read_tokens(AtlasPaths.of(cfg))
        with torch.no_grad():
            _, cache = model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))
        fresh = (maths.encode(cache[hook].float()) > 0).float().mean(dim=(0, 1)).numpy()
        rows = slice(sets[slug]["offset"], sets[slug]["offset"] + TINY_D_SAE)
        density = np.array(columns["density"][rows], np.float64)
        np.testing.assert_allclose(density, fresh, rtol=5e-3, atol=1e-6)
        assert sorted(np.flatnonzero(fresh == 0)) == inactive  # exactly the latents that never fire


def test_similar_features_of_latents_are_latents_of_saes_on_the_same_hook(sae_runs):
    cfg, _ = sae_runs["gpt2"]
    neighbours = read_neighbours(AtlasPaths.of(cfg))
    described = read_collect_meta(AtlasPaths.of(cfg))["subject_sets"]
    space = ["mlp" if d["kind"] == "mlp" else d["hook_name"] for d in described]
    index = neighbours["neighbour_index"]
    found = 0
    for row, others in enumerate(index):
        for other in others[others >= 0]:
            assert space[neighbours["feature_set"][other]] == space[neighbours["feature_set"][row]]
            found += 1
    assert found > 0


def test_latent_and_neuron_pages_link_the_dictionary_tools(sae_runs):
    cfg, _ = sae_runs["gpt2"]
    paths, site = AtlasPaths.of(cfg), Path(cfg.site_dir) / cfg.name
    standard = read_sae(cfg.sae[0].path)
    maxima = read_examples(paths, "sae-standard").max_activation
    active = [n for n in range(TINY_D_SAE) if maxima[n] > 0]
    checked = 0
    for latent in active[:5]:
        page = (site / "sae-standard" / f"N{latent}" / "index.html").read_text()
        strongest = int(np.argmax(np.abs(standard.W_dec[latent] * maxima[latent])))
        first = re.search(r"Neurons it writes to most</h3>.*?<li><a href=\"([^\"]+)\">", page).group(1)
        assert first == f"../../L1/N{strongest}/index.html"
        if latent < TWINS:
            match = re.search(r"Best match in other SAEs on this hook</h3><ul class=\"links\"><li>(.*?)</li>", page)
            assert f'href="../../sae-twin/N{latent}/index.html"' in match.group(1)
            assert match.group(1).endswith("maximum cosine similarity 1")
            checked += 1
    assert checked >= 3
    neuron = (site / "L1" / "N0" / "index.html").read_text()
    latents = re.search(r"SAE latents that write to it most</h3>.*?</ol>", neuron).group(0)
    best = max(active, key=lambda n: abs(standard.W_dec[n, 0] * maxima[n]))
    assert "sae-standard N" in latents and "sae-twin N" in latents
    assert f'href="../../sae-standard/N{best}/index.html"' in latents
    listing = (site / "sae-standard" / "index.html").read_text()
    assert "Compared with sae-twin" in listing and "maximum cosine similarity (MCS)" in listing


def test_evaluation_matches_a_literal_per_sequence_computation(sae_runs):
    from conftest import literal_splice

    cfg, model = sae_runs["gpt2"]
    paths = AtlasPaths.of(cfg)
    tokens = torch.as_tensor(read_tokens(paths), dtype=torch.long)
    for slug, hook in (("sae-standard", "blocks.1.mlp.hook_post"), ("sae-topk", "blocks.1.hook_resid_pre")):
        result = json.loads(paths.evaluation(slug).read_text())
        maths = read_sae(cfg.sae[[s.slug for s in cfg.sae].index(slug)].path).on("cpu")
        clean = spliced = squared = 0.0
        xs, active, predicted = [], 0, 0
        for row in tokens:
            row_clean, row_spliced, row_predicted, seen = literal_splice(
                model, row, hook, lambda value: maths.decode(maths.encode(value), value))
            clean, spliced, predicted = clean + row_clean, spliced + row_spliced, predicted + row_predicted
            x = seen.double()
            squared += float(((maths.decode(maths.encode(seen), seen).double() - x) ** 2).sum())
            active += int((maths.encode(seen) > 0).sum())
            xs.append(x)
        x = torch.cat(xs)
        assert result["tokens"] == len(x)
        np.testing.assert_allclose(result["ce_clean"], clean / predicted, rtol=1e-6)
        np.testing.assert_allclose(result["ce_increase"], (spliced - clean) / predicted, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(result["mse"], squared / x.numel(), rtol=1e-5)
        np.testing.assert_allclose(result["explained_variance"], 1 - squared / float(((x - x.mean(0)) ** 2).sum()),
                                   rtol=1e-5)
        np.testing.assert_allclose(result["l0"], active / len(x), rtol=1e-9)
        assert result["ce_increase"] > 0  # a random dictionary hurts the model
    page = (Path(cfg.site_dir) / cfg.name / "sae-standard" / "index.html").read_text()
    assert "Evaluation on this corpus" in page and "Cross-entropy increase" in page


def test_a_perfect_reconstruction_costs_nothing(tmp_path, tiny_gpt2, corpus_file):
    from builder.config import config_from_dict
    from builder.stage import run_stage
    from conftest import tiny_config_dict

    d = 32
    # pre = x + 50 > 0 everywhere, so f = x + 50 and x̂ = f − 50 = x exactly.
    folder = write_sae(tmp_path / "identity", {"architecture": "standard", "d_in": d, "d_sae": d,
                                               "apply_b_dec_to_input": False, "normalize_activations": "none",
                                               "metadata": {"hook_name": "blocks.0.hook_resid_post"}},
                       {"W_enc": np.eye(d), "b_enc": np.full(d, 50.0), "W_dec": np.eye(d), "b_dec": np.full(d, -50.0)})
    cfg = config_from_dict(tiny_config_dict(tiny_gpt2, corpus_file, tmp_path / "run", atlas_neurons=False,
                                            sae=[{"path": str(folder), "slug": "identity"}]))
    run_stage("collect", cfg)
    run_stage("evaluate", cfg)
    result = json.loads(AtlasPaths.of(cfg).evaluation("identity").read_text())
    assert abs(result["ce_increase"]) < 1e-4 and result["mse"] < 1e-8 and result["explained_variance"] > 1 - 1e-6
    assert result["l0"] == d and result["inactive_share"] == 0


def test_an_sae_trained_on_another_model_is_atlased_with_a_warning(tmp_path, tiny_gpt2, corpus_file, caplog):
    from builder.config import config_from_dict
    from builder.stage import run_stage
    from conftest import tiny_config_dict

    folder = random_sae(tmp_path / "other", np.random.default_rng(4), "standard", "blocks.0.hook_resid_post", 32,
                        "none", model_name="gemma-2-2b")
    cfg = config_from_dict(tiny_config_dict(tiny_gpt2, corpus_file, tmp_path / "run", layers=[0], max_sequences=16,
                                            sae=[{"path": str(folder), "slug": "other"}]))
    with caplog.at_level("WARNING"):
        run_stage("collect", cfg)
    assert any("was trained on 'gemma-2-2b'" in r.getMessage() for r in caplog.records)
    assert AtlasPaths.of(cfg).set_file("collect", "other").exists()


def test_latent_importance_equals_a_naive_masked_rerun(sae_runs):
    from builder.importance import mask_token_id
    from builder.schema import read_importance

    cfg, model = sae_runs["llama"]
    paths = AtlasPaths.of(cfg)
    tokens = read_tokens(paths)
    mask_id = mask_token_id(cfg, model.tokenizer)
    checked = 0
    for architecture, hook, _ in SAE_SITES:
        key = f"sae-{architecture}"
        maths = read_sae(cfg.sae[[s.slug for s in cfg.sae].index(key)].path).on("cpu")
        examples, result = read_examples(paths, key), read_importance(paths, key)
        units = np.repeat(np.arange(TINY_D_SAE), np.diff(examples.offsets))
        for row in np.random.default_rng(1).choice(len(examples.seq), size=min(4, len(examples.seq)), replace=False):
            seq, m, unit = int(examples.seq[row]), int(examples.pos[row]), int(units[row])
            for p in range(max(1, m - cfg.window_before), m + 1):
                prefix = torch.as_tensor(tokens[seq, :m + 1], dtype=torch.long)[None].clone()
                prefix[0, p] = mask_id
                seen = {}
                with torch.no_grad():
                    model.bridge.run_with_hooks(prefix, return_type=None,
                                                fwd_hooks=[(hook, lambda value, hook: seen.update(x=value))])
                expected = float(maths.encode(seen["x"].float())[0, m, unit])
                assert abs(result["masked"][row, p - m + cfg.window_before] - expected) < 1e-4
                checked += 1
    assert checked >= 12


@pytest.mark.slow
def test_random_saes_beside_the_embedded_models_neurons_build_a_whole_site(tmp_path, embedded_corpus,
                                                                           share_embedded_model):
    """The embedded end-to-end: three random SAEs (one per architecture) beside layer 2's neurons on a small slice."""
    from builder.config import EMBEDDED_MODEL, config_from_dict
    from builder.pipeline import STAGES
    from builder.stage import run_stage

    model = share_embedded_model
    rng = np.random.default_rng(12)
    sites = [("jumprelu", "blocks.2.mlp.hook_post", model.d_mlp, "none"),
             ("topk", "blocks.2.hook_resid_post", model.d_model, "layer_norm"),
             ("standard", "blocks.4.hook_resid_pre", model.d_model, "constant_norm_rescale")]
    specs = [{"path": str(random_sae(tmp_path / a, rng, a, hook, width, norm, model_name="SmolLM2-135M-Instruct")),
              "slug": f"sae-{a}"} for a, hook, width, norm in sites]
    cfg = config_from_dict({"name": "embedded-sae", "model": EMBEDDED_MODEL, "data_files": [str(embedded_corpus)],
                            "max_sequences": 16, "context_length": 32, "layers": [2], "batch_size": 8,
                            "device": "cpu", "max_examples": 6, "threshold": 0.5, "out_dir": str(tmp_path / "build"),
                            "site_dir": str(tmp_path / "site"), "sae": specs, "build_date": "2024-01-01"})
    for stage in STAGES:
        run_stage(stage, cfg)
    paths = AtlasPaths.of(cfg)
    identity = json.loads(paths.meta("embed").read_text())["identity_max_error"]
    assert sorted(identity) == ["L2", "sae-jumprelu", "sae-standard", "sae-topk"]
    assert all(error < 1e-4 for error in identity.values()), identity
    tokens = read_tokens(paths)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))
    site = Path(cfg.site_dir) / cfg.name
    for (architecture, hook, _, _), spec in zip(sites, specs):
        maths = read_sae(spec["path"]).on("cpu")
        pre = maths.pre(maths.sae_input(cache[hook].float())).numpy()
        examples = read_examples(paths, spec["slug"])
        assert len(examples.seq) > 20
        np.testing.assert_allclose(examples.pre, pre[examples.seq, examples.pos, examples.unit_of_example],
                                   atol=1e-4, rtol=0)
        listing = (site / spec["slug"] / "index.html").read_text()
        assert "Evaluation on this corpus" in listing
        first = int(np.flatnonzero(np.diff(examples.offsets))[0])
        assert f"Latent {first}</h1>" in (site / spec["slug"] / f"N{first}" / "index.html").read_text()
    neuron = next(p for p in sorted((site / "L2").glob("N*/index.html")) if "SAE latents that write" in p.read_text())
    assert "sae-jumprelu N" in neuron.read_text()


def test_the_method_page_sets_each_layers_neurons_beside_its_latents_as_quartiles(sae_runs):
    from builder.render.text import fmt
    from builder.schema import read_metrics_table

    cfg, _ = sae_runs["gpt2"]
    method = (Path(cfg.site_dir) / cfg.name / "method" / "index.html").read_text()
    table = read_metrics_table(AtlasPaths.of(cfg))
    sets = [d["key"] for d in read_collect_meta(AtlasPaths.of(cfg))["subject_sets"]]
    layer1 = re.search(r"<h3>Layer 1</h3>(.*?)</table>", method, re.S).group(1)
    order = re.findall(r'<th scope="row"><a href="[^"]+">([^<]+)</a>', layer1)
    assert order[0] == "L1" and sorted(order[1:]) == ["sae-standard", "sae-topk", "sae-twin"]
    for key in order:
        mine = (table["set_index"] == sets.index(key)) & (table["n_examples"] > 0)
        row = re.search(rf'>{key}</a></th><td>(\d+) of [^<]*</td><td>([^<]+)</td>', layer1)
        assert int(row.group(1)) == mine.sum()
        quartiles = np.percentile(table["n_clusters"][mine].astype(float), [25, 50, 75])
        assert row.group(2) == " / ".join(fmt(q) for q in quartiles)


def test_a_hub_path_offline_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaeError) as caught:
        read_sae("hf://nobody/no-such-saes/blocks.0.hook_resid_pre")
    message = caught.value.format_message()
    assert "cannot fetch it from the hub" in message and "local path" in message and "\n" not in message
    with pytest.raises(SaeError, match="hf://owner/repo"):
        read_sae("hf://just-a-name")


def test_latent_pages_work_in_the_browser_like_neuron_pages(sae_runs):
    from playwright.sync_api import sync_playwright

    from test_browser import ARGS, CHROMIUM, Tab, serve

    cfg, _ = sae_runs["gpt2"]
    site = Path(cfg.site_dir)
    examples = read_examples(AtlasPaths.of(cfg), "sae-standard")
    latent = int(np.argmax(np.diff(examples.offsets)))  # the latent with the most examples
    server, url = serve(site)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            tab = Tab(browser)
            page = tab.open(url + f"{cfg.name}/sae-standard/N{latent}/index.html")
            shown = page.locator(".example").count()
            assert shown == min(int(np.diff(examples.offsets)[latent]), shown) and shown > 0
            assert page.locator("#dendro svg").count() == 1 and page.locator("#logits li").count() == 20
            assert "Latent" in page.text_content("h1")
            page.keyboard.press("r")  # a random unit: from the MLP layers, which have a page for every unit
            page.wait_for_url("**/L1/N*/index.html")
            page.wait_for_selector("html[data-ready=true]")
            page = tab.open(url + f"{cfg.name}/sae-standard/N{latent}/index.html")
            page.fill("#q", f"sae-twin {latent}")
            page.press("#q", "Enter")
            page.wait_for_url(f"**/sae-twin/N{latent}/index.html")
            page.wait_for_selector("html[data-ready=true]")
            # The SAE's sortable index: the model index filtered to its latents, inactive ones left out.
            page = tab.open(url + f"{cfg.name}/index.html#set=sae-standard&ex=0")
            page.click("th button[data-col=density]")
            names = page.eval_on_selector_all("#neurons tbody tr td:first-child", "ts => ts.map(t => t.textContent)")
            active = int((np.diff(examples.offsets) > 0).sum())
            assert all(n.startswith("sae-standard N") for n in names) and len(names) == min(50, active)
            density = page.eval_on_selector_all("#neurons tbody tr td:nth-child(3)",
                                                "ts => ts.map(t => +t.textContent)")
            order = page.get_attribute("th:has(button[data-col=density])", "aria-sort")
            assert density == sorted(density, reverse=order == "descending") and max(density) > 0
            browser.close()
    finally:
        server.shutdown()
    assert tab.errors == [] and tab.dialogs == []


def test_latent_examples_are_the_first_sequences_over_the_threshold_as_a_naive_loop_finds_them(sae_runs):
    cfg, model = sae_runs["llama"]
    paths = AtlasPaths.of(cfg)
    tokens = read_tokens(paths)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.as_tensor(tokens, dtype=torch.long))
    for architecture, hook, _ in SAE_SITES:
        key = f"sae-{architecture}"
        post = read_sae(cfg.sae[[s.slug for s in cfg.sae].index(key)].path).on("cpu").encode(
            cache[hook].float()).numpy()
        examples = read_examples(paths, key)
        for unit in range(TINY_D_SAE):
            maximum = post[:, :, unit].max()
            expected = []
            if maximum > 0:
                for seq in range(len(tokens)):  # corpus order: the first max_examples sequences reaching the bar
                    if post[seq, :, unit].max() >= cfg.threshold * maximum and len(expected) < cfg.max_examples:
                        expected.append((seq, int(np.argmax(post[seq, :, unit]))))
            part = examples.unit_slice(unit)
            assert list(zip(examples.seq[part].tolist(), examples.pos[part].tolist())) == expected, (key, unit)


def test_latent_logit_effects_go_through_the_decoder_as_a_brute_force_sort_finds_them(sae_runs):
    from builder.schema import read_weights

    cfg, model = sae_runs["gpt2"]
    w_u = model.bridge.W_U.detach().double().numpy()
    w_out = model.bridge.blocks[1].mlp.W_out.detach().double().numpy()
    for key, through_mlp in (("sae-standard", True), ("sae-topk", False)):
        w_dec = read_sae(cfg.sae[[s.slug for s in cfg.sae].index(key)].path).W_dec.astype(np.float64)
        effects = (w_dec @ w_out if through_mlp else w_dec) @ w_u
        weights = read_weights(AtlasPaths.of(cfg), key)
        k = weights.logit_top_ids.shape[1]
        np.testing.assert_array_equal(weights.logit_top_ids, np.argsort(-effects, axis=1, kind="stable")[:, :k])
        np.testing.assert_allclose(weights.logit_bottom_values, np.sort(effects, axis=1)[:, :k], rtol=1e-4, atol=1e-4)


def test_an_sae_files_content_is_part_of_every_stage_key(tmp_path, tiny_gpt2, corpus_file):
    from builder.config import config_from_dict
    from builder.pipeline import STAGES
    from builder.stage import Keys
    from conftest import tiny_config_dict

    rng = np.random.default_rng(6)
    folder = random_sae(tmp_path / "sae", rng, "standard", "blocks.0.hook_resid_post", 32, "none")
    cfg = config_from_dict(tiny_config_dict(tiny_gpt2, corpus_file, tmp_path / "run",
                                            sae=[{"path": str(folder), "slug": "s"}]))
    before = {name: Keys(cfg, STAGES).key(name) for name in STAGES}
    random_sae(folder, rng, "standard", "blocks.0.hook_resid_post", 32, "none")  # same path, new weights
    after = {name: Keys(cfg, STAGES).key(name) for name in STAGES}
    assert all(before[name] != after[name] for name in STAGES if name != "train_sae")  # it reads no [[sae]]
