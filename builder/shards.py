"""Shards: how work is split so that any executor can run it and the merge is exact.

Per-sequence stages (collect, importance) split the corpus into contiguous ranges of `shard_sequences`; each range is
one artefact and the unit of resume. Per-unit stages (cluster, render) split each subject set into unit ranges whose
task reads its inputs from files, so a task can run in any process. The local engine runs the tasks in a loop or a
process pool (`LocalExecutor`); another executor only has to run the same tasks.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from builder.paths import AtlasPaths

T = TypeVar("T")
R = TypeVar("R")

# Unit-range tasks per worker: enough to balance uneven units, few enough that task overhead stays small.
TASKS_PER_WORKER = 4


def sequence_shards(n_sequences: int, shard_sequences: int) -> list[range]:
    """Contiguous ranges covering 0 … n_sequences − 1, each shard_sequences long but the last."""
    return [range(first, min(n_sequences, first + shard_sequences))
            for first in range(0, n_sequences, shard_sequences)]


def shard_files(paths: AtlasPaths, stage: str, shards: list[range]) -> dict[range, Path]:
    """Each shard's artefact path. Shard files of another split (a changed `shard_sequences`, a machine setting) are
    removed: they cannot be merged with this split's."""
    files = {shard: paths.shard(stage, shard.start, shard.stop) for shard in shards}
    folder = paths.shard(stage, 0, 0).parent
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
