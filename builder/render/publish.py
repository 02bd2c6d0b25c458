"""Assembling the site: model-wide files and pages, every unit's files fanned out as unit-range tasks, sizes and
speed, all inside a temporary folder swapped into place at the end."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.artefacts import atomic_dir
from builder.config import AtlasConfig
from builder.render.codec import FILE_COPY_SUFFIX, write_data_file
from builder.render.inputs import Atlas, load_atlas, load_set
from builder.render.mnist import mnist_available, method_context, render_mnist
from builder.render.pages import METRIC_DEFINITIONS, REPO, Site, model_pages, render_unit
from builder.render.sidecars import (Postings, atlas_manifest, common_file, largest_downloads, provenance,
                                     search_postings, unit_columns, vocab_file, write_search_index, write_unit_table)
from builder.shards import unit_executor, unit_ranges
from builder.stage import progress, worker_count

log = logging.getLogger(__name__)

STATIC = REPO / "static"
POOL_MIN_UNITS = 64  # atlases with fewer units render in-process (starting workers costs more than it saves)
MAX_UNITS_PER_TASK = 64
SIZE_FIELDS = 5  # render_unit's tuple: examples, clusters, sidecar, page, file:// twin bytes


@dataclass(frozen=True)
class RenderTask:
    """One unit range of one subject set, written into the set's folder of the temporary site."""

    set_key: str
    units: range
    folder: str


# A worker's inputs, set by `start_worker` from its explicit argument (the atlas-wide inputs, pickled to each worker
# process); never inherited from the parent.
_worker: dict = {}


def start_worker(atlas: Atlas) -> None:
    _worker.clear()
    _worker.update(atlas=atlas, site=Site(atlas, provenance(atlas)), sets={})


def render_units(task: RenderTask) -> tuple[list[tuple[int, ...]], list[tuple[str, int, int, int]]]:
    """Render a task's units; returns their size tuples and their features' search postings."""
    atlas, site = _worker["atlas"], _worker["site"]
    if task.set_key not in _worker["sets"]:
        _worker["sets"] = {task.set_key: load_set(atlas, atlas.index.get(task.set_key))}
    data = _worker["sets"][task.set_key]
    sizes = [render_unit(site, data, unit, Path(task.folder) / f"N{unit}") for unit in task.units]
    return sizes, search_postings(atlas, data, task.units)


def compact_source(name: str, text: str) -> str:
    """static/*.js and *.css as published: minified (rjsmin, rcssmin: comments and whitespace only, names kept), so
    the heaviest first visit stays under 100 KB; the sources keep their comments."""
    if name.endswith(".js"):
        import rjsmin

        return rjsmin.jsmin(text) + "\n"
    import rcssmin

    return rcssmin.cssmin(text) + "\n"


def copy_static(target: Path) -> None:
    target.mkdir()
    for source in sorted(STATIC.iterdir()):
        if not source.is_file() or source.name.startswith("."):
            continue
        if source.suffix in (".js", ".css"):
            (target / source.name).write_text(compact_source(source.name, source.read_text(encoding="utf-8")),
                                              encoding="utf-8")
        else:
            shutil.copyfile(source, target / source.name)


def site_bytes(folder: Path) -> tuple[int, int]:
    """(published bytes, file:// twin bytes) of every file under `folder`."""
    published = twins = 0
    for directory, _, files in os.walk(folder):
        for name in files:
            size = os.path.getsize(os.path.join(directory, name))
            if name.endswith(FILE_COPY_SUFFIX):
                twins += size
            else:
                published += size
    return published, twins


def size_projection(sizes: np.ndarray, search: np.ndarray, shared: float, examples: int = 100,
                    clusters=(3, 5, 10)) -> dict:
    """Bytes per published unit projected to `examples` examples and k clusters per unit, from least-squares fits
    over this atlas's units: sidecar ≈ a + b·examples + c·k, pages ≈ d + e·k, and the unit's share of the word
    search index (`search`: its postings' bytes) ≈ f + g·examples + h·k. `shared` (index pages, set tables,
    vocabulary, unit table, per unit) is added as measured."""
    rich = sizes[:, 0] >= 2
    if rich.sum() < 3:
        return {}
    design = np.stack([np.ones(rich.sum()), sizes[rich, 0], sizes[rich, 1]], axis=1).astype(np.float64)
    sidecar = np.linalg.lstsq(design, sizes[rich, 2].astype(np.float64), rcond=None)[0]
    words = np.linalg.lstsq(design, search[rich].astype(np.float64), rcond=None)[0]
    pages = np.linalg.lstsq(design[:, [0, 2]], sizes[rich, 3].astype(np.float64), rcond=None)[0]
    return {str(k): round(float((sidecar + words) @ [1, examples, k] + pages @ [1, k] + shared)) for k in clusters}


def recover_interrupted(site_dir: Path) -> None:
    """Undo what a render killed mid-swap can leave: the old site moved aside, or a stale temporary folder."""
    old = site_dir.with_name(f".{site_dir.name}.old")
    if not site_dir.exists() and old.is_dir():
        log.warning("render: restoring %s from an interrupted swap", site_dir)
        os.replace(old, site_dir)
    if site_dir.parent.is_dir():
        for stale in sorted(site_dir.parent.glob(f".{site_dir.name}.*.tmp")):
            log.warning("render: removing %s left by an interrupted render", stale)
            shutil.rmtree(stale, ignore_errors=True)


def render_site(cfg: AtlasConfig, vocabulary: list[str] | None = None) -> dict:
    """Render the whole site into cfg.site_dir (atomically); returns its figures: bytes per unit (published files /
    units, and all local files / units), seconds, units per second, and a projection of bytes per unit at 100
    examples. `vocabulary` (token id -> string) replaces the model's tokenizer; tests use it for hostile tokens."""
    started = time.perf_counter()
    atlas = load_atlas(cfg, vocabulary)
    prov = provenance(atlas)
    site = Site(atlas, prov)
    site_dir = Path(cfg.site_dir)
    recover_interrupted(site_dir)
    workers = worker_count(cfg) if atlas.n_units >= POOL_MIN_UNITS else 1
    postings, sizes = [], []
    with atomic_dir(site_dir) as tmp:
        (tmp / ".nojekyll").write_bytes(b"")
        copy_static(tmp / "static")
        model_dir = tmp / cfg.name
        data_dir = model_dir / "data"
        data_dir.mkdir(parents=True)
        write_data_file(data_dir / "vocab.json", "vocab", vocab_file(atlas))
        write_data_file(data_dir / "common.json", "common", common_file(atlas, METRIC_DEFINITIONS, prov))
        table = write_unit_table(data_dir, cfg.name, atlas.index, *unit_columns(atlas))
        model_pages(site, model_dir, tmp, mnist=method_context(cfg.mnist_dir))
        tasks = [RenderTask(s.key, units, str((model_dir / s.slug).resolve()))
                 for s in atlas.sets for units in unit_ranges(s.size, workers, MAX_UNITS_PER_TASK)]
        executor = unit_executor(cfg, workers, initializer=functools.partial(start_worker, atlas))
        try:
            with progress(total=atlas.n_units, desc="render", unit="unit") as bar:
                for task_sizes, task_postings in executor.map(render_units, tasks):
                    sizes += task_sizes
                    postings += task_postings
                    bar.update(len(task_sizes))
        finally:
            _worker.clear()
        search_index = write_search_index(data_dir, cfg.name, atlas.index, Postings.of(postings))
        search_bytes = sum(search_index["bytes"])
        write_data_file(data_dir / "atlas.json", "atlas", atlas_manifest(atlas, prov, search_index["shards"]))
        index_downloads = largest_downloads(table, search_index, sum(
            (data_dir / name).stat().st_size for name in ("neurons.json", "atlas.json")))
        published, twins = site_bytes(tmp)
        if mnist_available(cfg.mnist_dir):  # the MNIST reproduction's atlas (builder/render/mnist.py), not counted
            render_mnist(site, cfg.mnist_dir, tmp)  # in the language model's bytes per unit
    seconds = time.perf_counter() - started
    n = atlas.n_units
    per_unit = np.array(sizes, np.int64).reshape(-1, SIZE_FIELDS)
    # Each unit's share of the search index: its postings at the index's mean bytes per posting, by unit row (the
    # order of `sizes`: tasks go set by set, units ascending).
    search = np.bincount(np.array([row for _, row, _, _ in postings], np.int64), minlength=n) * (
        search_bytes / max(1, len(postings)))
    shared = (published - per_unit[:, 2:4].sum() - search_bytes) / n if n else 0.0
    stats = {"neurons": n, "total_bytes": published, "bytes_per_neuron": round(published / n, 1) if n else 0.0,
             "local_bytes_per_neuron": round((published + twins) / n, 1) if n else 0.0,
             "mean_examples": round(float(per_unit[:, 0].mean()), 2) if n else 0.0,
             "mean_clusters": round(float(per_unit[:, 1].mean()), 2) if n else 0.0,
             "search_bytes_per_feature": round(search_bytes / max(1, int(per_unit[:, 1].sum())), 1),
             "index_downloads": index_downloads, "search_words_cut": len(search_index["cut"]),
             "projected_bytes_per_neuron_at_100_examples": size_projection(per_unit, search, shared),
             "seconds": round(seconds, 3), "neurons_per_second": round(n / seconds, 1) if seconds > 0 else 0.0}
    log.info("render: %d units in %.1f s (%.0f units/s); %.1f KB per unit published (%.1f KB with the file:// "
             "copies); site %s", n, seconds, stats["neurons_per_second"], stats["bytes_per_neuron"] / 1000,
             stats["local_bytes_per_neuron"] / 1000, site_dir)
    return stats
