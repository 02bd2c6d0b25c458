"""The build config: loading, validation with one-line errors, and the content hash; and the error family."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path

import click
import pytest

from builder.config import AtlasConfig, config_from_dict, load_config
from builder.errors import ArtefactError, AtlasError, ConfigError, DatasetError, ModelError
from conftest import ROOT

BASE = {"data_files": ["corpus.jsonl"]}


def test_unknown_key_suggests_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'treshold'; did you mean 'threshold'\?"):
        config_from_dict({**BASE, "treshold": 0.5})


@pytest.mark.parametrize("typo,nearest", [("max_example", "max_examples"), ("contxt_length", "context_length"),
                                          ("data_file", "data_files"), ("layer", "layers")])
def test_typos_suggest_their_intended_key(typo, nearest):
    with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
        config_from_dict({**BASE, typo: 1})


def test_unrelated_unknown_key_is_rejected_without_a_suggestion():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({**BASE, "zzzzzz": 1})
    assert caught.value.format_message() == "unknown config key 'zzzzzz'"


@pytest.mark.parametrize("key,value,message", [
    ("threshold", 0, "threshold must be in (0, 1]"),
    ("threshold", 0.0, "threshold must be in (0, 1]"),
    ("threshold", -0.25, "threshold must be in (0, 1]"),
    ("threshold", 1.0001, "threshold must be in (0, 1]"),
    ("threshold", 1.5, "threshold must be in (0, 1]"),
    ("threshold", float("nan"), "threshold must be in (0, 1]"),
    ("max_examples", 0, "max_examples must be at least 1"),
    ("max_examples", -5, "max_examples must be at least 1"),
    ("interval_count", 0, "interval_count must be at least 1"),
    ("interval_examples", -1, "interval_examples must be 0 (none) or more"),
    ("context_length", 1, "context_length must be at least 2"),
    ("batch_size", 0, "batch_size must be at least 1"),
    ("shard_sequences", 0, "shard_sequences must be a positive multiple of 16"),
    ("shard_sequences", 24, "shard_sequences must be a positive multiple of 16"),
    ("collect_groups", 0, "collect_groups must be 1 or more"),
    ("max_sequences", -1, "max_sequences must be 0"),
    ("window_before", -1, "window_before must be 0 or more"),
    ("layers", [0, -1], "layers must be non-negative integers"),
    ("dtype", "float64", "dtype must be float32, float16 or bfloat16"),
    ("neighbour_space", "cosine", "neighbour_space must be pre_mlp or embedding"),
    ("name", "has space", "name must be a non-empty URL slug"),
    ("name", "", "name must be a non-empty URL slug"),
])
def test_invalid_values_are_config_errors_naming_the_rule_and_the_value(key, value, message):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({**BASE, key: value})
    text = caught.value.format_message()
    assert message in text and repr(tuple(value) if isinstance(value, list) else value) in text
    assert "\n" not in text


@pytest.mark.parametrize("threshold", [1, 1.0, 0.001, 0.75])
def test_thresholds_inside_zero_one_are_accepted(threshold):
    assert config_from_dict({**BASE, "threshold": threshold}).threshold == threshold


def test_max_examples_of_one_is_accepted():
    assert config_from_dict({**BASE, "max_examples": 1}).max_examples == 1


def test_zero_interval_examples_and_one_interval_are_accepted():
    cfg = config_from_dict({**BASE, "interval_examples": 0, "interval_count": 1})
    assert (cfg.interval_examples, cfg.interval_count) == (0, 1)


def test_a_source_is_required():
    with pytest.raises(ConfigError, match="set dataset .* or data_files"):
        config_from_dict({})


@pytest.mark.parametrize("key,value", [("context_length", "64"), ("context_length", 64.0), ("threshold", "0.5"),
                                       ("prepend_bos", "yes"), ("data_files", "corpus.jsonl"), ("model", 3)])
def test_values_of_the_wrong_type_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be"):
        config_from_dict({**BASE, key: value})


def test_lists_become_tuples_and_relative_data_files_resolve_from_the_config_folder(tmp_path):
    cfg = config_from_dict({"data_files": ["sub/a.jsonl", "/abs/b.jsonl"], "layers": [2, 1]}, base_dir=tmp_path)
    assert cfg.data_files == (str((tmp_path / "sub" / "a.jsonl").resolve()), "/abs/b.jsonl")
    assert cfg.layers == (2, 1)
    hash(cfg)  # frozen and hashable


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_config_reads_toml_and_resolves_data_files_next_to_it(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write_toml(folder / "a.toml", 'name = "x"\ndata_files = ["../data/c.jsonl"]\nlayers = [0, 3]\n'
                                         'threshold = 0.5\n')
    cfg = load_config(path)
    assert cfg.data_files == (str((tmp_path / "data" / "c.jsonl").resolve()),)
    assert (cfg.name, cfg.layers, cfg.threshold) == ("x", (0, 3), 0.5)


def test_load_config_of_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_load_config_of_invalid_toml_is_a_one_line_config_error(tmp_path):
    path = write_toml(tmp_path / "bad.toml", 'name = "x\nthreshold = = 1\n')
    with pytest.raises(ConfigError, match="is not valid TOML") as caught:
        load_config(path)
    assert "\n" not in caught.value.format_message()


@pytest.mark.parametrize("name", ["embedded.toml", "gpt2-small.toml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, AtlasConfig) and cfg.name


def test_embedded_config_points_at_the_corpus_made_by_make_data():
    cfg = load_config(ROOT / "configs" / "embedded.toml")
    assert cfg.data_files == (str((ROOT / "data" / "moby-dick.jsonl").resolve()),)
    assert cfg.model == "embedded:smollm2-135m-instruct"


def test_config_hash_ignores_paths_and_machine_settings():
    base = config_from_dict(BASE)
    same = config_from_dict({**BASE, "out_dir": "elsewhere", "site_dir": "s", "device": "cpu", "workers": 3,
                             "batch_size": 2, "shard_sequences": 32, "collect_groups": 3, "site_url": "https://x",
                             "build_date": "2020-01-01"})
    assert base.config_hash() == same.config_hash()


@pytest.mark.parametrize("key,value", [("threshold", 0.5), ("max_examples", 7), ("model", "gpt2"), ("layers", [1]),
                                       ("context_length", 32), ("data_files", ["other.jsonl"]), ("seed", 1)])
def test_config_hash_changes_with_content_settings(key, value):
    assert config_from_dict(BASE).config_hash() != config_from_dict({**BASE, key: value}).config_hash()


def test_every_default_passes_validation_once_a_source_is_set():
    cfg = config_from_dict(BASE)
    for field in fields(AtlasConfig):
        if field.name not in BASE:
            assert getattr(cfg, field.name) == field.default, field.name


def test_every_config_key_is_explained_by_a_comment_above_it():
    """Each default is explained once, in builder/config.py: a comment line directly above each field (or above the
    group of fields it explains)."""
    lines = (ROOT / "builder" / "config.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class AtlasConfig"))
    unexplained = []
    for name in (f.name for f in fields(AtlasConfig)):
        row = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(f"{name}:"))
        above = row - 1
        while lines[above].strip() and not lines[above].strip().startswith("#") and ":" in lines[above]:
            above -= 1  # a field of the same group: the group's comment counts
        if not lines[above].strip().startswith("#"):
            unexplained.append(name)
    assert unexplained == []


# --------------------------------------------------------------------------------------------------------------------
# The error family


@pytest.mark.parametrize("kind", [ConfigError, ModelError, DatasetError, ArtefactError])
def test_every_atlas_error_is_a_click_error_shown_as_one_error_line_with_exit_status_2(kind, capsys):
    error = kind("something is wrong; fix it")
    assert isinstance(error, AtlasError) and isinstance(error, click.ClickException)
    assert error.exit_code == 2
    error.show()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "Error: something is wrong; fix it\n"


def test_sae_tables_load_as_frozen_entries_with_paths_from_the_config_folder(tmp_path):
    path = tmp_path / "atlas.toml"
    path.write_text('data_files = ["corpus.txt"]\natlas_neurons = false\n[[sae]]\npath = "saes/a"\nslug = "res-a"\n'
                    '[[sae]]\npath = "hf://owner/repo/blocks.0"\nslug = "b"\n')
    cfg = load_config(path)
    assert [s.slug for s in cfg.sae] == ["res-a", "b"] and cfg.atlas_neurons is False
    assert cfg.sae[0].path == str((tmp_path / "saes" / "a").resolve())
    assert cfg.sae[1].path == "hf://owner/repo/blocks.0"
    assert hash(cfg) == hash(load_config(path))  # frozen and hashable, SAE entries included
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sae[0].slug = "other"
    assert cfg.config_hash() != dataclasses.replace(cfg, sae=cfg.sae[:1]).config_hash()


@pytest.mark.parametrize("text, message", [
    ('[[sae]]\npath = "a"\nslug = "a"\n[[sae]]\npath = "b"\nslug = "a"\n',
     "each [[sae]] and [[train_sae]] needs its own slug"),
    ('atlas_neurons = false\n', "atlas_neurons = false needs at least one [[sae]]"),
    ('[[sae]]\npath = "a"\n', "an [[sae]] table needs 'slug'"),
    ('[[sae]]\npath = "a"\nslug = "data"\n', "slug must be a URL slug"),
    ('importance_mode = "erase"\n', "importance_mode must be mask or delete"),
])
def test_bad_sae_settings_are_one_line_config_errors(tmp_path, text, message):
    path = tmp_path / "atlas.toml"
    path.write_text('data_files = ["corpus.txt"]\n' + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in caught.value.format_message() and "\n" not in caught.value.format_message()
