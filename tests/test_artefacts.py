"""Artefacts: atomic writes, validated reads, and one-line errors for corrupt, foreign, old or unwritable files."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from builder import artefacts
from builder.artefacts import atomic_dir, read_json, read_npz, write_json, write_npz
from builder.errors import ArtefactError, AtlasError


def test_npz_round_trip_keeps_arrays_and_refuses_another_kind_or_version(tmp_path):
    path = tmp_path / "a.npz"
    write_npz(path, "thing", 2, values=np.arange(5))
    np.testing.assert_array_equal(read_npz(path, "thing", 2)["values"], np.arange(5))
    with pytest.raises(ArtefactError, match="not a other artefact"):
        read_npz(path, "other", 2)
    with pytest.raises(ArtefactError, match="schema version 2, this code reads 3"):
        read_npz(path, "thing", 3)


def test_truncated_npz_is_reported_as_corrupt_naming_the_file(tmp_path):
    path = tmp_path / "a.npz"
    write_npz(path, "thing", 1, values=np.arange(1000))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ArtefactError, match="corrupt or truncated") as caught:
        read_npz(path, "thing", 1)
    assert str(path) in caught.value.format_message()


def test_corrupt_json_is_reported_with_the_fix(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"kind": "x", "schema_')
    with pytest.raises(ArtefactError, match="re-run its stage"):
        read_json(path, "x", 1)


def test_a_failed_write_leaves_the_previous_artefact_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json(path, {"kind": "x", "schema_version": 1, "n": 1})

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artefacts.os, "replace", fail)
    with pytest.raises(AtlasError, match="no space left on device"):
        write_json(path, {"kind": "x", "schema_version": 1, "n": 2})
    assert read_json(path, "x", 1)["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_no_space_while_writing_is_one_line_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artefacts.Path, "write_bytes", full)
    with pytest.raises(AtlasError) as caught:
        artefacts.write_bytes(tmp_path / "x.bin", b"data")
    message = caught.value.format_message()
    assert "no space left" in message and "x.bin" in message and "free disk space" in message
    assert "\n" not in message


def test_unwritable_output_folder_is_one_line_naming_the_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AtlasError) as caught:
        write_json(blocker / "out" / "m.json", {"kind": "x", "schema_version": 1})
    message = caught.value.format_message()
    assert "cannot write" in message and "out" in message and "\n" not in message


def test_permission_denied_suggests_a_writable_folder(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(artefacts.tempfile, "mkstemp", denied)
    with pytest.raises(AtlasError, match=r"permission denied\); choose a writable"):
        write_json(tmp_path / "m.json", {})


def test_atomic_dir_replaces_the_folder_only_when_the_block_succeeds(tmp_path):
    site = tmp_path / "site"
    with atomic_dir(site) as tmp:
        (tmp / "index.html").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(site) as tmp:
            (tmp / "index.html").write_text("two")
            raise RuntimeError("build failed half way")
    assert (site / "index.html").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["site"]
    assert oct(os.stat(site).st_mode & 0o777) == oct(0o755)
