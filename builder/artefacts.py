"""Atomic, validated reading and writing of artefacts: JSON documents and .npz array bundles (never pickle).

Every write goes to a temporary file in the same folder and is renamed into place, so a killed build leaves either
the old artefact or the new one, never half of one. Every read checks the schema version and reports a corrupt or
foreign artefact as one line naming the file and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from builder.errors import ArtefactError, AtlasError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide published pages from a web server
    except OSError as error:
        raise _disk_error(path, error) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise _disk_error(path, error) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _disk_error(path: Path, error: OSError) -> AtlasError:
    if error.errno == errno.ENOSPC:
        return AtlasError(f"no space left on device while writing {path}; free disk space or set out_dir elsewhere")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AtlasError(f"cannot write {path} (permission denied); choose a writable out_dir/site_dir")
    return AtlasError(f"cannot write {path} ({error.strerror}); choose a writable out_dir/site_dir")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, document: dict) -> None:
    write_bytes(path, (json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def read_json(path: Path, kind: str, schema_version: int) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{kind} artefact {path} is missing; run the stage that writes it first")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtefactError(f"{kind} artefact {path} is corrupt; delete it and re-run its stage") from None
    check_schema(document, path, kind, schema_version)
    return document


def check_schema(document: dict, path: Path, kind: str, schema_version: int) -> None:
    if not isinstance(document, dict) or document.get("kind") != kind:
        raise ArtefactError(f"{path} is not a {kind} artefact; delete it and re-run its stage")
    found = document.get("schema_version")
    if found != schema_version:
        raise ArtefactError(f"{kind} artefact {path} has schema version {found!r}, this code reads "
                            f"{schema_version}; delete {path.parent} and re-run its stage")


def write_npz(path: Path, kind: str, schema_version: int, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, _kind=np.array(kind), _schema_version=np.array(schema_version), **arrays)


def read_npz(path: Path, kind: str, schema_version: int, prefix: str = "") -> dict[str, np.ndarray]:
    """The arrays of an .npz artefact (only those whose names start with `prefix`: the others are not read)."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{kind} artefact {path} is missing; run the stage that writes it first")
    try:
        with np.load(path, allow_pickle=False) as bundle:
            arrays = {name: bundle[name] for name in bundle.files if name.startswith((prefix, "_"))}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        raise ArtefactError(f"{kind} artefact {path} is corrupt or truncated; delete it and re-run its stage") from None
    check_schema({"kind": str(arrays.pop("_kind", "")), "schema_version": int(arrays.pop("_schema_version", -1))},
                 path, kind, schema_version)
    return arrays


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it into place only if the block succeeds.

    An existing folder at `path` stays intact until the new one is complete, then is replaced.
    """
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o755)
    except OSError as error:
        raise _disk_error(path, error) from None
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        raise _disk_error(path, error) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
