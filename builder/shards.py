"""Shards: how work is split so that any executor can run it and the merge is exact.

Per-sequence stages (collect, importance) split the corpus into contiguous ranges of `shard_sequences`; each range is
one artefact and the unit of resume. A `ShardWorker` runs them: `setup()` loads what every shard needs once (the model),
`run(shard, bar)` computes one shard and writes its artefact atomically. Per-unit stages (cluster, render) split each
subject set into unit ranges whose task reads its inputs from files, so a task can run in any process.

Two engines run the same shards and tasks (`engine` in the config). The local one runs shards in this process and
tasks in a loop or a process pool (`LocalExecutor`); the Ray one (builder/ray_engine.py, the only module that imports
Ray) runs shards on actors that each set up once and tasks as Ray tasks. Results are read back in task order and shard
artefacts are merged in shard order, so the engine never changes an artefact.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, TypeVar

from builder.paths import AtlasPaths

if TYPE_CHECKING:
    from builder.config import AtlasConfig

T = TypeVar("T")
R = TypeVar("R")

# Unit-range tasks per worker: enough to balance uneven units, few enough that task overhead stays small.
TASKS_PER_WORKER = 4


def sequence_shards(n_sequences: int, shard_sequences: int) -> list[range]:
    """Contiguous ranges covering 0 … n_sequences − 1, each shard_sequences long but the last."""
    return [range(first, min(n_sequences, first + shard_sequences))
            for first in range(0, n_sequences, shard_sequences)]


def shard_files(paths: AtlasPaths, stage: str, shards: list[range], group: str = "") -> dict[range, Path]:
    """Each shard's artefact path. Shard files of another split (a changed `shard_sequences`, a machine setting) are
    removed: they cannot be merged with this split's."""
    files = {shard: paths.shard(stage, shard.start, shard.stop, group) for shard in shards}
    folder = paths.shard(stage, 0, 0, group).parent
    if folder.is_dir():
        for stale in set(folder.iterdir()) - set(files.values()):
            stale.unlink()
    return files


def unit_ranges(n_units: int, workers: int, most: int) -> list[range]:
    """Contiguous unit ranges of at most `most` units, about TASKS_PER_WORKER per worker."""
    size = max(1, min(most, n_units // (workers * TASKS_PER_WORKER) or 1))
    return [range(first, min(n_units, first + size)) for first in range(0, n_units, size)]


class LocalExecutor:
    """Runs tasks in this process (one worker) or a process pool; results come back in task order. The initializer
    prepares a process's inputs from its own arguments: it runs in each worker, or here for in-process work."""

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None):
        self.workers = workers
        self.initializer = initializer

    def map(self, function: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        tasks = list(tasks)
        if self.workers <= 1 or len(tasks) <= 1:
            if self.initializer is not None:
                self.initializer()
            yield from map(function, tasks)
            return
        with ProcessPoolExecutor(max_workers=self.workers, initializer=self.initializer) as pool:
            yield from pool.map(function, tasks)


class ProgressLike(Protocol):
    def update(self, n: float = 1) -> object: ...


class ShardWorker(Protocol):
    """A per-sequence stage's shard runner, constructible from its config alone and pickled before `setup` (without
    a model the driver may have lent it), so it can be shipped to another process or node."""

    stage: str  # the stage's name: its progress and fault points are named after it
    cfg: "AtlasConfig"

    def setup(self) -> None: ...

    def run(self, shard: range, bar: ProgressLike) -> dict: ...


def run_shards(cfg: "AtlasConfig", worker: ShardWorker, todo: list[range], bar: ProgressLike) -> list[dict]:
    """Run the shards still to do with the config's engine; returns each shard's counters, in shard order."""
    if not todo:
        return []
    if cfg.engine == "ray":
        from builder.ray_engine import run_shards_on_ray

        return run_shards_on_ray(cfg, worker, todo, bar)
    worker.setup()
    return [worker.run(shard, bar) for shard in todo]


def unit_executor(cfg: "AtlasConfig", workers: int, initializer: Callable[[], None] | None = None):
    """What runs a per-unit stage's tasks: a LocalExecutor of `workers` processes, or Ray tasks."""
    if cfg.engine == "ray":
        from builder.ray_engine import RayExecutor

        return RayExecutor(cfg, initializer)
    return LocalExecutor(workers, initializer)
