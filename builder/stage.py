"""What every stage shares: skipping finished work and discarding work from another config."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

from tqdm import tqdm

from builder.artefacts import read_json, write_bytes
from builder.config import AtlasConfig
from builder.errors import ArtefactError

log = logging.getLogger(__name__)


def stage_is_done(meta_path: Path, kind: str, schema_version: int, cfg: AtlasConfig) -> bool:
    """True when the stage's meta artefact exists, is valid and was written for this config."""
    if not meta_path.is_file():
        return False
    try:
        meta = read_json(meta_path, kind, schema_version)
    except ArtefactError:
        log.warning("%s is unreadable; rebuilding its stage", meta_path)
        return False
    return meta.get("config_hash") == cfg.config_hash()


def begin_stage(folder: Path, cfg: AtlasConfig) -> None:
    """Keep partial work in `folder` only if it was made with this config; otherwise start the stage afresh."""
    marker = folder / ".config_hash"
    if folder.exists() and (not marker.is_file() or marker.read_text().strip() != cfg.config_hash()):
        log.info("discarding %s: it was built with another config", folder)
        shutil.rmtree(folder)
    if not marker.is_file():
        write_bytes(marker, cfg.config_hash().encode())


def worker_count(cfg: AtlasConfig) -> int:
    """Processes for per-neuron work: cfg.workers, or every core when 0."""
    return cfg.workers or os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (recorded in each stage's meta; `make bench` reports it)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


FAULT_ENV = "ATLAS_FAULT"


class progress(tqdm):
    """A stage's progress bar. Fault injection for the kill-and-resume tests: with ATLAS_FAULT="<desc>:<n>" the
    process SIGKILLs itself as soon as the bar named <desc> reaches n, a precise point inside the stage."""

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        fault = os.environ.get(FAULT_ENV, "")
        if fault:
            name, _, count = fault.rpartition(":")
            if name == self.desc and self.n >= int(count):
                os.kill(os.getpid(), signal.SIGKILL)
        return shown
