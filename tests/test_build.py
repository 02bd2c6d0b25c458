"""The whole build: SIGKILL inside every stage resumes to a byte-identical site without redoing finished work, two
builds are byte-identical, and a failed build leaves the previous site in place."""

from __future__ import annotations

import json
import signal


from tests.conftest import build, site_files, write_config

# (stage progress bar, units after which the process SIGKILLs itself). The counts sit after a checkpoint or a
# finished layer, so a resumed run has finished work it must not redo.
KILL_POINTS = [("collect", 40), ("cluster", 80), ("importance", 48), ("neighbours", 1), ("report", 80),
               ("render", 20)]


def test_build_killed_inside_every_stage_resumes_to_a_byte_identical_site(reference_site, tmp_path, tiny_llama,
                                                                          corpus_file):
    config = write_config(tmp_path, tiny_llama, corpus_file)
    for stage, count in KILL_POINTS:
        result = build(config, f"{stage}:{count}")
        assert result.returncode == -signal.SIGKILL, (stage, result.returncode, result.stderr[-2000:])
        meta = tmp_path / "build" / stage / "meta.json"
        if stage != "render":
            assert not meta.exists(), f"{stage} finished before the kill"
    assert not (tmp_path / "site").exists()  # killed inside render before its first publish
    result = build(config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert site_files(tmp_path / "site") == site_files(reference_site / "site")

    build_dir = tmp_path / "build"
    collect_meta = json.loads((build_dir / "collect" / "meta.json").read_text())
    assert collect_meta["forwarded_sequences_last_run"] == collect_meta["n_sequences"] - 32  # resumed at 32
    cluster_meta = json.loads((build_dir / "cluster" / "meta.json").read_text())
    assert cluster_meta["sets_clustered_last_run"] == ["L1"]  # layer 0 was finished before the kill
    importance_meta = json.loads((build_dir / "importance" / "meta.json").read_text())
    reference_meta = json.loads((reference_site / "build" / "importance" / "meta.json").read_text())
    assert importance_meta["sequences_processed_last_run"] == reference_meta["sequences_processed_last_run"] - 32


def test_two_builds_from_the_same_inputs_are_byte_identical(reference_site, tmp_path, tiny_llama, corpus_file):
    result = build(write_config(tmp_path, tiny_llama, corpus_file))
    assert result.returncode == 0, result.stderr[-2000:]
    files = site_files(tmp_path / "site")
    assert len(files) > 10
    assert files == site_files(reference_site / "site")


def test_a_build_killed_while_rendering_leaves_the_previous_site_intact(reference_site, tmp_path, tiny_llama,
                                                                        corpus_file):
    config = write_config(tmp_path, tiny_llama, corpus_file)
    assert build(config).returncode == 0
    before = site_files(tmp_path / "site")
    # force a re-render by invalidating only the render stage's output, then kill it half way
    for stamp in (tmp_path / "build" / "render").glob("*"):
        stamp.unlink()
    result = build(config, "render:20")
    assert result.returncode == -signal.SIGKILL
    assert site_files(tmp_path / "site") == before
