"""The one stage protocol: what a stage depends on, its cache key, skip-if-done, resume and its meta.

A stage *declares* (`builder.pipeline.STAGES`): the config fields it reads, its upstream stages, the input files
whose content it depends on, and a `build(run)` function that writes its outputs through `StageRun`. The runner
here owns everything else:

- **key**: a hash of exactly the declared fields' values, the content fingerprints of the declared inputs, the
  stage's schema version and its upstream stages' keys. Changing a field re-runs the stages that read it and what is
  downstream of them, nothing else; editing an input file in place changes its fingerprint;
- **done**: the stage's meta exists, carries the current key, and every output it lists is present, of the recorded
  size and readable as its kind. A missing or corrupt output makes the stage re-run; the stage's own resume
  (shards, per-set files) then redoes just the missing work;
- **resume**: partial work in the stage's folder is kept only while the folder's `.key` marker matches the key;
- **meta**: kind, schema version, key and what it was made of (so `atlas status` can say what changed), code version,
  peak RSS, wall time, the outputs and the stage's own counters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from builder import __version__
from builder.artefacts import write_bytes
from builder.config import AtlasConfig
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.schema import ArtefactType, meta_type

log = logging.getLogger(__name__)

KEY_DIGITS = 16  # hex digits of a stage key: 64 bits, no accidental collisions between configs
MARKER = ".key"
READ_BLOCK = 1 << 20  # bytes hashed at a time when fingerprinting an input file


@dataclass(frozen=True)
class Stage:
    name: str
    fields: tuple[str, ...]  # the config fields the stage reads
    upstream: tuple[str, ...]  # stages whose artefacts it reads
    version: int  # schema version of the stage's meta; bump when its outputs change meaning or format
    # Inputs whose content is part of the key: label -> a file, or a string that already identifies the content.
    inputs: Callable[[AtlasConfig], dict[str, Path | str]] = lambda cfg: {}
    # Whether a config uses the stage at all; one that does not counts as done, writes nothing and never blocks the
    # stages downstream (train_sae without [[train_sae]] tables).
    applies: Callable[[AtlasConfig], bool] = lambda cfg: True

    @property
    def command(self) -> str:
        """Its `atlas` command: the name with dashes (`atlas train-sae`)."""
        return self.name.replace("_", "-")

    @property
    def meta_type(self) -> ArtefactType:
        return meta_type(self.name, self.version)

    def build(self, run: "StageRun") -> dict:
        import importlib

        return importlib.import_module(f"builder.{self.name}").build(run)


@dataclass
class StageRun:
    """What a stage's build function gets: the config, the paths, its folder, and a record of its outputs."""

    stage: Stage
    cfg: AtlasConfig
    paths: AtlasPaths
    key: str
    outputs: list[dict] = field(default_factory=list)

    def record(self, path: Path, artefact: ArtefactType | None = None) -> None:
        """Declare `path` (already written) an output: done-checks will require it present, of this size and
        readable as `artefact`."""
        path = Path(path)
        entry = {"path": _relative(path, self.paths.root), "bytes": path.stat().st_size}
        if artefact is not None:
            entry.update(kind=artefact.kind, version=artefact.version)
        self.outputs.append(entry)

    def write_npz(self, artefact: ArtefactType, path: Path, **arrays) -> None:
        artefact.write_npz(path, **arrays)
        self.record(path, artefact)

    def write_json(self, artefact: ArtefactType, path: Path, document: dict) -> None:
        artefact.write_json(path, document)
        self.record(path, artefact)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


# ---------------------------------------------------------------------------------------------------------------
# Keys


class Fingerprints:
    """sha256 of input files, cached in out_dir by (size, modification time) so unchanged files are read once."""

    def __init__(self, paths: AtlasPaths):
        self.path = paths.fingerprints
        try:
            self.cache = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.cache = {}
        self.dirty = False

    def of(self, path: Path) -> str:
        path = Path(path).resolve()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            return _digest("\0".join(f"{p.name}:{self.of(p)}" for p in files).encode())
        if not path.is_file():
            return "missing"
        stat = path.stat()
        cached = self.cache.get(str(path))
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(READ_BLOCK), b""):
                digest.update(block)
        self.cache[str(path)] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        self.dirty = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.dirty and self.path.parent.is_dir():
            try:
                write_bytes(self.path, json.dumps(self.cache, sort_keys=True).encode())
            except Exception:  # noqa: BLE001 - a cache that cannot be written only costs time
                pass
            self.dirty = False


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Keys:
    """Every stage's key parts and key for one config, computed once."""

    def __init__(self, cfg: AtlasConfig, stages: dict[str, Stage], save_fingerprints: bool = True):
        self.cfg = cfg
        self.stages = stages
        self.save_fingerprints = save_fingerprints
        self.fingerprints = Fingerprints(AtlasPaths.of(cfg))
        self._parts: dict[str, dict] = {}

    def parts(self, name: str) -> dict:
        if name not in self._parts:
            stage = self.stages[name]
            inputs = {label: value if isinstance(value, str) else self.fingerprints.of(value)
                      for label, value in stage.inputs(self.cfg).items()}
            self._parts[name] = {
                "stage": name, "version": stage.version,
                "fields": {f: _jsonable(getattr(self.cfg, f)) for f in stage.fields},
                "inputs": inputs, "upstream": {up: self.key(up) for up in stage.upstream}}
            if self.save_fingerprints:
                self.fingerprints.save()
        return self._parts[name]

    def key(self, name: str) -> str:
        return _digest(json.dumps(self.parts(name), sort_keys=True).encode())[:KEY_DIGITS]


def _jsonable(value):
    """A config value as JSON: tuples as lists, table specs (frozen dataclasses) as dicts."""
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def what_changed(old: dict, new: dict) -> str:
    """A short phrase naming what differs between two key-part records."""
    if old.get("version") != new["version"]:
        return f"its schema version changed ({old.get('version')} → {new['version']})"
    changes = []
    for name, value in new["fields"].items():
        before = old.get("fields", {}).get(name, "<unset>")
        if before != value:
            changes.append(f"{name} changed ({before!r} → {value!r})")
    for label, value in new["inputs"].items():
        if old.get("inputs", {}).get(label) != value:
            changes.append(f"input {label} changed")
    for up, value in new["upstream"].items():
        if old.get("upstream", {}).get(up) != value:
            changes.append(f"upstream {up} changed")
    return "; ".join(changes) or "its key changed"


# ---------------------------------------------------------------------------------------------------------------
# Done, stale or missing


FINISHED = ("done", "unused")  # states that let a stage be skipped and its downstream stages run


@dataclass(frozen=True)
class StageState:
    name: str
    state: str  # "done", "stale", "missing", or "unused" (the config does not use the stage)
    reason: str
    meta: dict | None = None


def stage_state(stage: Stage, keys: Keys) -> StageState:
    if not stage.applies(keys.cfg):
        return StageState(stage.name, "unused", "this config does not use it", {})
    paths = AtlasPaths.of(keys.cfg)
    meta_path = paths.meta(stage.name)
    if not meta_path.exists():
        return StageState(stage.name, "missing", "never built")
    try:
        meta = stage.meta_type.read_json(meta_path)
    except ArtefactError as error:
        return StageState(stage.name, "stale", error.format_message())
    parts = keys.parts(stage.name)
    if meta.get("key") != keys.key(stage.name):
        return StageState(stage.name, "stale", what_changed(meta.get("key_parts", {}), parts), meta)
    for output in meta.get("outputs", []):
        problem = _output_problem(paths, output, stage.name)
        if problem:
            return StageState(stage.name, "stale", problem, meta)
    return StageState(stage.name, "done", "", meta)


def _output_problem(paths: AtlasPaths, output: dict, stage: str) -> str:
    path = Path(output["path"])
    path = path if path.is_absolute() else paths.root / path
    if not path.is_file():
        return f"{path} is missing"
    if "kind" in output:
        try:
            ArtefactType(output["kind"], output["version"], stage).check_readable(path)
        except ArtefactError as error:
            return error.format_message()
    if path.stat().st_size != output["bytes"]:
        return f"{path} is corrupt or truncated"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# The runner


def run_stage(name: str, cfg: AtlasConfig, keys: Keys | None = None) -> dict:
    """Run one stage unless it is done; returns its meta."""
    from builder.pipeline import STAGES

    keys = keys or Keys(cfg, STAGES)
    stage = STAGES[name]
    current = stage_state(stage, keys)
    if current.state in FINISHED:
        log.info("%s: %s", name, current.reason or "up to date")
        return current.meta
    for up in stage.upstream:
        upstream = stage_state(STAGES[up], keys)
        if upstream.state not in FINISHED:
            raise ArtefactError(f"the {up} stage is {upstream.state} ({upstream.reason}); run `atlas "
                                f"{STAGES[up].command}` (or "
                                "`atlas build`) first")
    if current.state == "stale":
        log.info("%s: rebuilding (%s)", name, current.reason)
    paths = AtlasPaths.of(cfg)
    key = keys.key(name)
    folder = paths.stage(name)
    marker = folder / MARKER
    if folder.exists() and (not marker.is_file() or marker.read_text().strip() != key):
        log.info("%s: discarding partial work made for another key", name)
        shutil.rmtree(folder)
    root_existed = paths.root.exists()
    if not marker.is_file():
        write_bytes(marker, key.encode())
    run = StageRun(stage, cfg, paths, key)
    started = time.perf_counter()
    try:
        counters = stage.build(run)
    except BaseException:
        _remove_if_only_marker(folder, paths.root if not root_existed else None)
        raise
    meta = {"key": key, "key_parts": keys.parts(name), "code_version": __version__, "peak_rss_mb": peak_rss_mb(),
            "wall_seconds": round(time.perf_counter() - started, 3), "outputs": run.outputs, **counters}
    stage.meta_type.write_json(paths.meta(name), meta)
    return stage.meta_type.read_json(paths.meta(name))


def _remove_if_only_marker(folder: Path, created_root: Path | None) -> None:
    """A stage that failed before writing anything leaves no trace (not even its marker)."""
    try:
        if folder.is_dir() and all(p.name in (MARKER, "shards") and (p.is_file() or not any(p.iterdir()))
                                   for p in folder.iterdir()):
            shutil.rmtree(folder)
        if created_root is not None and created_root.is_dir():
            leftovers = [p for p in created_root.iterdir() if p.name != "fingerprints.json"]
            if not leftovers:
                shutil.rmtree(created_root)
    except OSError:
        pass


def statuses(cfg: AtlasConfig) -> list[StageState]:
    from builder.pipeline import STAGES

    keys = Keys(cfg, STAGES, save_fingerprints=False)  # `atlas status` writes nothing
    return [stage_state(stage, keys) for stage in STAGES.values()]


# ---------------------------------------------------------------------------------------------------------------
# What stages share


def worker_count(cfg: AtlasConfig) -> int:
    """Processes for per-unit work: cfg.workers, or every core when 0."""
    return cfg.workers or os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (recorded in each stage's meta; `make bench` reports it)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


FAULT_ENV = "ATLAS_FAULT"
# "kill" (the default) or "raise": the error tests make the work raise at the fault point instead of dying.
FAULT_MODE_ENV = "ATLAS_FAULT_MODE"
# With this set to a path prefix, each fault point fires once: the first process to reach it creates
# `<prefix>.<desc>`, later ones (a restarted Ray actor retrying the shard) run on. Without it, every process reaching
# the point is killed.
FAULT_ONCE_ENV = "ATLAS_FAULT_ONCE"


def fault_point(desc: str, count: float) -> None:
    """Fault injection for the kill-and-resume tests: with ATLAS_FAULT="<desc>:<n>" (several, comma-separated) the
    process SIGKILLs itself (or, with ATLAS_FAULT_MODE=raise, raises) as soon as the count of the work named <desc>
    reaches n, a precise point inside a stage."""
    for fault in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, at = fault.rpartition(":")
        if name != desc or count < int(at):
            continue
        once = os.environ.get(FAULT_ONCE_ENV, "")
        if once:
            try:
                Path(f"{once}.{desc.replace(' ', '-')}").touch(exist_ok=False)  # one marker per fault point
            except FileExistsError:
                continue
        if os.environ.get(FAULT_MODE_ENV) == "raise":
            raise RuntimeError(f"injected fault at {desc}:{at}")
        os.kill(os.getpid(), signal.SIGKILL)


class progress(tqdm):
    """A stage's progress bar; reaching a count is a fault point (`fault_point`) named by the bar's description."""

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        fault_point(self.desc, self.n)
        return shown


class Tally:
    """What a shard reports its progress to where no bar is shown (a Ray actor): a count with the same fault points
    as a bar of that description."""

    def __init__(self, desc: str):
        self.desc = desc
        self.n = 0

    def update(self, n: float = 1) -> None:
        self.n += n
        fault_point(self.desc, self.n)
