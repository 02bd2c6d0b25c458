"""The stage protocol: each stage's key holds exactly what it reads, so a change re-runs only the stages that read it
and what is downstream; an input file edited in place re-runs everything; `atlas status` says what changed."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.config import config_from_dict
from builder.paths import AtlasPaths
from builder.pipeline import COLLECT_FIELDS, STAGES
from builder.schema import read_tokens
from builder.stage import Keys, run_stage, statuses, what_changed
from conftest import CORPUS_PARAGRAPHS, tiny_config_dict, write_jsonl


def build_all(cfg) -> None:
    for name in STAGES:
        run_stage(name, cfg)


def meta_stamps(cfg) -> dict[str, int]:
    paths = AtlasPaths.of(cfg)
    return {name: paths.meta(name).stat().st_mtime_ns for name in used(cfg)}


def used(cfg) -> list[str]:
    """The stages this config uses (the base build has no [[train_sae]]: train_sae is unused, writes nothing)."""
    return [name for name, stage in STAGES.items() if stage.applies(cfg)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_gpt2):
    """A whole tiny build; each scenario copies its out_dir (keys never hold out_dir) and changes one thing."""
    folder = tmp_path_factory.mktemp("base")
    corpus = write_jsonl(folder / "corpus.jsonl", CORPUS_PARAGRAPHS)
    raw = tiny_config_dict(tiny_gpt2, corpus, folder, max_sequences=32, workers=1, neighbour_threshold=0.0)
    cfg = config_from_dict(raw)
    build_all(cfg)
    return raw


def rebuilt_stages(base_raw: dict, tmp_path: Path, edit_corpus: bool = False, **changes) -> set[str]:
    """Copy the base build, apply `changes` (and optionally edit the corpus in place), rebuild, and return the
    stages whose meta was rewritten. The copy renders into its own site_dir (a render field), so render always
    re-runs here; what matters is which other stages do."""
    source = Path(base_raw["out_dir"])
    shutil.copytree(source, tmp_path / "build")
    corpus = tmp_path / "corpus.jsonl"
    shutil.copyfile(base_raw["data_files"][0], corpus)
    raw = {**base_raw, "out_dir": str(tmp_path / "build"), "site_dir": str(tmp_path / "site"),
           "data_files": [str(corpus)], **changes}
    cfg = config_from_dict(raw)
    if edit_corpus:
        write_jsonl(corpus, list(reversed(CORPUS_PARAGRAPHS)))
    before = meta_stamps(cfg)
    build_all(cfg)
    after = meta_stamps(cfg)
    return {name for name in before if before[name] != after[name]}


@pytest.mark.parametrize("machine", [{}, {"workers": 2, "batch_size": 4, "shard_sequences": 32, "device": "cpu"}],
                         ids=["unchanged", "machine settings"])
def test_an_unchanged_config_or_other_machine_settings_re_run_nothing(base, machine):
    cfg = config_from_dict({**base, **machine})
    before = meta_stamps(cfg)
    build_all(cfg)
    assert meta_stamps(cfg) == before
    assert all(state.state == ("done" if state.name in used(cfg) else "unused") for state in statuses(cfg))


@pytest.mark.parametrize("changes, expected", [
    ({"neighbour_count": 3}, {"neighbours", "render"}),
    ({"seed": 5}, {"neighbours", "render"}),
    ({"cluster_threshold": 0.3}, {"cluster", "neighbours", "report", "render"}),
    ({"cluster_method": "components"}, {"cluster", "neighbours", "report", "render"}),
    ({"mask_token": "<|im_start|>"}, {"importance", "render"}),
    ({"site_url": "https://example.org/atlas/", "name": "renamed"}, {"render"}),
], ids=["neighbour_count", "seed", "cluster_threshold", "cluster_method", "mask_token", "display"])
def test_a_changed_key_re_runs_only_the_stages_that_read_it_and_what_is_downstream(base, tmp_path, changes,
                                                                                   expected):
    assert rebuilt_stages(base, tmp_path, **changes) == expected


def test_editing_the_corpus_in_place_re_runs_every_stage(base, tmp_path):
    """The key holds the corpus's content, not its path: the same file, new text, everything rebuilt."""
    assert rebuilt_stages(base, tmp_path, edit_corpus=True) == set(used(config_from_dict(base)))
    cfg = config_from_dict({**base, "out_dir": str(tmp_path / "build")})
    fresh_tokens = read_tokens(AtlasPaths.of(cfg))
    assert not (fresh_tokens.shape == read_tokens(AtlasPaths.of(config_from_dict(base))).shape
                and (fresh_tokens == read_tokens(AtlasPaths.of(config_from_dict(base)))).all())


def test_collect_keys_every_field_it_reads_and_no_machine_setting():
    assert "threshold" in COLLECT_FIELDS and "data_files" not in COLLECT_FIELDS  # data files enter by content
    for machine in ("device", "workers", "batch_size", "shard_sequences", "out_dir"):
        assert all(machine not in stage.fields for stage in STAGES.values()), machine


def test_keys_chain_through_upstream_stages(base):
    cfg = config_from_dict(base)
    keys, other = Keys(cfg, STAGES), Keys(dataclasses.replace(cfg, threshold=0.5), STAGES)
    assert all(keys.key(name) != other.key(name) for name in used(cfg))  # collect reads it; all are downstream
    near = Keys(dataclasses.replace(cfg, neighbour_threshold=0.9), STAGES)
    assert [name for name in STAGES if keys.key(name) != near.key(name)] == ["neighbours", "render"]


def test_what_changed_names_fields_inputs_and_upstream_stages():
    old = {"version": 2, "fields": {"threshold": 0.75}, "inputs": {"corpus": "a"}, "upstream": {"collect": "k1"}}
    new = {"version": 2, "fields": {"threshold": 0.5}, "inputs": {"corpus": "b"}, "upstream": {"collect": "k2"}}
    assert what_changed(old, new) == ("threshold changed (0.75 → 0.5); input corpus changed; upstream collect "
                                      "changed")
    assert "schema version" in what_changed({**old, "version": 1}, new)


def write_toml(path: Path, raw: dict) -> Path:
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in raw.items()))
    return path


def test_atlas_status_prints_done_stale_with_the_reason_and_missing(base, tmp_path):
    runner = CliRunner()
    done = runner.invoke(main, ["status", "--config", str(write_toml(tmp_path / "a.toml", base))])
    assert done.exit_code == 0, done.output
    assert [line.split()[:2] for line in done.output.splitlines()] == [
        [name, "done" if name in used(config_from_dict(base)) else "unused:"] for name in STAGES]

    changed = runner.invoke(main, ["status", "--config",
                                   str(write_toml(tmp_path / "b.toml", {**base, "cluster_threshold": 0.6}))])
    lines = dict(line.split(None, 1) for line in changed.output.splitlines())
    assert lines["collect"] == "done" and lines["embed"] == "done" and lines["importance"] == "done"
    assert lines["cluster"] == "stale: cluster_threshold changed (0.5 → 0.6)"
    assert lines["neighbours"] == "stale: upstream cluster changed"
    assert lines["report"].startswith("stale: cluster_threshold changed (0.5 → 0.6); upstream cluster changed")

    fresh = runner.invoke(main, ["status", "--config", str(write_toml(tmp_path / "c.toml", {
        **base, "out_dir": str(tmp_path / "nothing")}))])
    assert [line.split(None, 1)[1] for line in fresh.output.splitlines()] == [
        "unused: this config does not use it"] + ["missing: never built"] * (len(STAGES) - 1)
    assert not (tmp_path / "nothing").exists()  # status writes nothing
