"""Token importance: the shared computation equals a naive re-run per neuron, example and masked token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builder import importance
from builder.errors import AtlasError
from builder.importance import naive_token_count, normalised_importance
from builder.models import load_model
from builder.paths import AtlasPaths
from builder.schema import collect_sets, read_collect_meta, read_examples, read_importance, read_tokens
from builder.stage import run_stage
from conftest import expect_error, stage_meta


def naive_masked_activation(bridge, tokens: np.ndarray, layer: int, neuron: int, m: int, p: int | None,
                            mask_id: int) -> float:
    """The reference: re-run the whole prefix up to the max token with position p masked (None: clean)."""
    row = torch.as_tensor(tokens[:m + 1], dtype=torch.long)[None].clone()
    if p is not None:
        row[0, p] = mask_id
    captured = {}
    with torch.no_grad():
        bridge.run_with_hooks(row, return_type=None, fwd_hooks=[
            (f"blocks.{layer}.mlp.hook_post", lambda value, hook: captured.update(post=value))])
    return float(captured["post"][0, m, neuron])


def naive_deleted_activation(bridge, tokens: np.ndarray, layer: int, neuron: int, m: int, p: int) -> float:
    """The deletion reference: re-run the prefix up to the max token without the token at p < m; the max token is
    then at m − 1."""
    row = torch.as_tensor(np.delete(tokens[:m + 1], p), dtype=torch.long)[None]
    captured = {}
    with torch.no_grad():
        bridge.run_with_hooks(row, return_type=None, fwd_hooks=[
            (f"blocks.{layer}.mlp.hook_post", lambda value, hook: captured.update(post=value))])
    return float(captured["post"][0, m - 1, neuron])


@pytest.mark.parametrize("family, mode", [("gpt2", "mask"), ("llama", "mask"), ("gpt2", "delete"),
                                          ("llama", "delete")])
def test_shared_importance_equals_naive_reference_on_tiny_models(family, mode, tiny_models, make_config):
    cfg = make_config(tiny_models[family], max_examples=4, max_sequences=24, importance_mode=mode)
    run_stage("collect", cfg)
    run_stage("importance", cfg)
    paths = AtlasPaths.of(cfg)
    model = load_model(cfg)
    tokens = read_tokens(paths)
    mask_id = importance.mask_token_id(cfg, model.tokenizer)
    rng = np.random.default_rng(0)
    checked, deletion_differs = 0, False
    for layer in (0, 1):
        examples = read_examples(paths, f"L{layer}")
        result = read_importance(paths, f"L{layer}")
        neurons = np.repeat(np.arange(len(examples.offsets) - 1), np.diff(examples.offsets))
        for row in rng.choice(len(examples.seq), size=min(12, len(examples.seq)), replace=False):
            seq, m, neuron = int(examples.seq[row]), int(examples.pos[row]), int(neurons[row])
            clean = naive_masked_activation(model.bridge, tokens[seq], layer, neuron, m, None, mask_id)
            masked = np.full(cfg.window_before + 1, np.nan)
            for p in range(max(1, m - cfg.window_before), m + 1):  # BOS (position 0) is never masked
                by_mask = naive_masked_activation(model.bridge, tokens[seq], layer, neuron, m, p, mask_id)
                if mode == "delete" and p < m:
                    by_deletion = naive_deleted_activation(model.bridge, tokens[seq], layer, neuron, m, p)
                    deletion_differs = deletion_differs or abs(by_deletion - by_mask) > 1e-3
                    by_mask = by_deletion
                masked[p - m + cfg.window_before] = by_mask
            np.testing.assert_allclose(result["clean"][row], clean, atol=1e-5)
            np.testing.assert_allclose(result["masked"][row], masked, atol=1e-5, equal_nan=True)
            expected, _ = normalised_importance(np.array([clean]), masked[None])
            np.testing.assert_allclose(result["importance"][row], expected[0], atol=1e-5, equal_nan=True)
            checked += 1
    assert checked >= 12
    assert deletion_differs == (mode == "delete")  # deleting is not masking under another name


@pytest.mark.parametrize("family, mode", [("gpt2", "mask"), ("llama", "delete")])
def test_rows_per_forward_grow_with_the_memory_budget_and_the_results_stay_within_float_noise(family, mode,
                                                                                             tiny_models,
                                                                                             make_config):
    """Three budgets: below the least forward (clean forwards of one token, entries of window + 1 tokens),
    between, and ample. Rows per forward must grow and forwards shrink, every value stay within 1e-6 (absolute and
    relative: a few float32 ulps) of the ample budget's, not bitwise (a row's attention sums over differently packed
    keys, its clean prefix ran in other chunks), and no forward copy any cached prefix: the cache bytes written are
    at most one key and one value per forward token and layer."""
    cfg = make_config(tiny_models[family], max_examples=4, max_sequences=24, importance_mode=mode)
    run_stage("collect", cfg)
    paths = AtlasPaths.of(cfg)
    meta = read_collect_meta(paths)
    sets = collect_sets(meta)
    grouped = importance.examples_by_sequence([read_examples(paths, s.key) for s in sets])
    tokens = read_tokens(paths)
    model = load_model(cfg)
    mask_id = importance.mask_token_id(cfg, model.tokenizer)
    first_maskable = 1 if meta["packing"]["bos_token_id"] is not None else 0
    shape = importance.ForwardShape.of(model.bridge)
    runs = []
    for budget in (200_000, 1_500_000, 64 << 20):
        masker = importance.SharedMasker(model.bridge, sets, cfg.window_before, mask_id, first_maskable, mode,
                                         memory_bytes=budget)
        arrays = importance.importance_shard(masker, tokens, grouped, sets, range(len(tokens)), model.device)
        runs.append(arrays)
        assert int(arrays["cache_bytes_copied"]) <= masker.forward_tokens * model.n_layers * 2 * shape.kv_width * 4
    rows_per_call = [int(a["masked_rows"]) / int(a["masked_forward_calls"]) for a in runs]
    assert rows_per_call[0] < rows_per_call[1] < rows_per_call[2], rows_per_call
    assert int(runs[0]["masked_rows"]) == int(runs[2]["masked_rows"])  # the same rows, differently batched
    calls = [int(a["forward_calls"]) for a in runs]
    assert calls[0] > calls[1] > calls[2], calls
    groups = len(importance.sequence_groups(sorted(grouped), range(len(tokens))))
    assert calls[0] - int(runs[0]["masked_forward_calls"]) > groups  # the clean prefixes ran in chunks
    for name in runs[2]:
        if name.endswith((".clean", ".masked")):
            for run in runs[:2]:
                np.testing.assert_allclose(run[name], runs[2][name], rtol=1e-6, atol=1e-6, equal_nan=True,
                                           err_msg=name)
        elif name.endswith(".row"):
            for run in runs[:2]:
                np.testing.assert_array_equal(run[name], runs[2][name])


def test_importance_normalises_by_the_max_token_drop_and_clips():
    clean = np.array([2.0])
    masked = np.array([[1.0, 2.5, np.nan, 0.0]])  # drops 1, -0.5, nan, 2 (the max token's own drop)
    values, normaliser = normalised_importance(clean, masked)
    np.testing.assert_allclose(values[0], [0.5, 0.0, np.nan, 1.0], equal_nan=True)
    assert normaliser[0] == 0


def test_importance_falls_back_to_the_largest_drop_when_the_max_token_drop_is_not_positive():
    clean = np.array([1.0, 1.0])
    masked = np.array([[0.5, 0.0, 1.2], [1.5, 1.0, 1.0]])  # own drops -0.2 and 0
    values, normaliser = normalised_importance(clean, masked)
    np.testing.assert_allclose(values[0], [0.5, 1.0, 0.0])
    assert normaliser.tolist() == [1, 2]
    np.testing.assert_array_equal(values[1], [0.0, 0.0, 0.0])


def test_bos_position_is_never_masked(tiny_models, make_config):
    cfg = make_config(tiny_models["gpt2"], max_examples=3, max_sequences=8, window_before=30)
    run_stage("collect", cfg)
    run_stage("importance", cfg)
    paths = AtlasPaths.of(cfg)
    examples = read_examples(paths, f"L{0}")
    masked = read_importance(paths, f"L{0}")["masked"]
    bos_column = cfg.window_before - examples.pos  # the window column holding position 0
    rows = np.flatnonzero(bos_column >= 0)
    assert len(rows) > 0
    assert np.isnan(masked[rows, bos_column[rows]]).all()
    assert np.isfinite(masked[:, -1][examples.pos > 0]).all()


def assert_same_importance(left_cfg, right_cfg) -> None:
    for layer in (0, 1):
        left = read_importance(AtlasPaths.of(left_cfg), f"L{layer}")
        right = read_importance(AtlasPaths.of(right_cfg), f"L{layer}")
        assert sorted(left) == sorted(right)
        for name in left:
            np.testing.assert_array_equal(left[name], right[name], err_msg=name)


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory, tiny_models, corpus_file):
    """Importance over 48 sequences in one shard: the reference for every split."""
    from conftest import tiny_config_dict
    from builder.config import config_from_dict

    cfg = config_from_dict(tiny_config_dict(tiny_models["llama"], corpus_file, tmp_path_factory.mktemp("one"),
                                            max_sequences=48, shard_sequences=48))
    run_stage("collect", cfg)
    run_stage("importance", cfg)
    return cfg


@pytest.mark.parametrize("shard_sequences, n_shards", [(32, 2), (16, 3)])
def test_importance_over_any_split_into_shards_equals_the_unsplit_result_exactly(unsplit, make_config,
                                                                                 tiny_models, shard_sequences,
                                                                                 n_shards):
    cfg = make_config(tiny_models["llama"], subdir=f"split{n_shards}", max_sequences=48,
                      shard_sequences=shard_sequences)
    run_stage("collect", cfg)
    run_stage("importance", cfg)
    assert stage_meta(cfg, "importance")["shards_run_last_run"] == n_shards
    assert stage_meta(unsplit, "importance")["shards_run_last_run"] == 1
    assert_same_importance(unsplit, cfg)


def test_importance_resumes_after_a_kill_with_identical_results(unsplit, tiny_models, make_config, monkeypatch):
    cfg = make_config(tiny_models["llama"], subdir="killed", max_sequences=48, shard_sequences=16)
    run_stage("collect", cfg)
    real = importance.IMPORTANCE_SHARD

    class KilledAfterFirstShard:
        def __getattr__(self, name):
            return getattr(real, name)

        def write_npz(self, path, **arrays):
            real.write_npz(path, **arrays)
            raise KeyboardInterrupt("killed after the first shard")

    monkeypatch.setattr(importance, "IMPORTANCE_SHARD", KilledAfterFirstShard())
    with pytest.raises(KeyboardInterrupt):
        run_stage("importance", cfg)
    monkeypatch.undo()
    shards = sorted((AtlasPaths.of(cfg).stage("importance") / "shards").glob("*.npz"))
    assert [p.name for p in shards] == [f"{0:09d}-{16:09d}.npz"]
    run_stage("importance", cfg)
    meta = stage_meta(cfg, "importance")
    assert meta["shards_run_last_run"] == 2
    assert meta["sequences_processed_last_run"] < stage_meta(unsplit, "importance")["sequences_processed_last_run"]
    assert meta["forward_tokens"] == stage_meta(unsplit, "importance")["forward_tokens"]
    assert_same_importance(unsplit, cfg)


@pytest.mark.parametrize("fault", ["ignored cache", "wrong cache"])
def test_a_key_value_cache_that_the_model_ignores_stops_importance_with_one_line(tiny_models, make_config,
                                                                                monkeypatch, fault):
    """What transformers 5.24 does through TransformerLens 4.3 (the cache stays empty), and a cache that holds
    other values: either way one line naming the installed transformers and the supported pin, nothing written."""
    import transformers

    cfg = make_config(tiny_models["gpt2"], subdir=fault.replace(" ", "-"), max_sequences=16)
    run_stage("collect", cfg)
    real_run, real_update = importance.SharedMasker._run, importance.SharedPrefixCache.update
    if fault == "ignored cache":
        monkeypatch.setattr(importance.SharedMasker, "_run", lambda self, tokens, positions, mask, sets, layers,
                            cache: real_run(self, tokens, positions, mask, sets, layers, None))
    else:
        def zeroed(self, keys, values, layer):  # the cached prefix reads as zeros, the new tokens are right
            cached_keys, cached_values = real_update(self, keys, values, layer)
            cached_keys = cached_keys.clone()
            cached_keys[:, :, :self.write_at] = 0
            return cached_keys, cached_values
        monkeypatch.setattr(importance.SharedPrefixCache, "update", zeroed)
    expect_error(AtlasError, lambda: run_stage("importance", cfg), "key/value cache",
                 f"transformers {transformers.__version__}", "transformers==5.20.2")
    assert not AtlasPaths.of(cfg).meta("importance").exists()
    assert not list(AtlasPaths.of(cfg).stage("importance").glob("**/*.npz"))


def test_naive_token_count_counts_a_clean_and_a_masked_prefix_run_per_window_position():
    class Examples:
        pos = np.array([0, 3, 30])

    # window 5, BOS unmaskable: m=0 → no maskable position, 1 clean run of 1 token;
    # m=3 → positions 1..3 (3 runs) + clean = 4 runs of 4 tokens; m=30 → 6 + 1 runs of 31 tokens.
    assert naive_token_count([Examples], window=5, first_maskable=1) == 1 * 1 + 4 * 4 + 7 * 31
