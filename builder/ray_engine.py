"""The Ray engine (`engine = "ray"`): the local engine's shards and unit-range tasks, run on a Ray cluster.

- **Shards** (collect, importance): a Ray Data pipeline over the shard ranges, `map_batches` with an actor class that
  sets its `ShardWorker` up once (so each actor loads the model once) and runs one shard per batch, writing the
  shard's artefact to out_dir, which every node must see at the same path. Actors: one per GPU (`num_gpus=1`) when the
  cluster has GPUs and the config may use CUDA, else `workers` CPU actors (0 = one per cluster CPU), each claiming
  half its share of the CPUs: Ray Data runs its own tasks beside the actors, and two actors that each claim a whole
  CPU on a 2-CPU machine leave it none, which stalls the pipeline. Each CPU actor runs torch on its full share.
- **Tasks** (cluster, render): Ray tasks, results read back in task order. A task's process runs the stage's
  initializer once per `map` (render's loads the atlas, shipped once through the object store).
- **Faults**: Ray Data restarts a dead actor and retries its batch (its defaults, max_restarts=-1 and
  max_task_retries=-1); Ray retries a task whose worker died. A shard's artefact is written atomically, so a killed
  shard leaves nothing behind and its retry computes the same bytes. A killed driver leaves the finished shards,
  which the next run skips. An exception in the stage's code reaches the user as one line naming the shard or task.

This is the only module that imports Ray; the local engine never loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from builder.config import AtlasConfig
from builder.errors import AtlasError, ConfigError, WorkerError
from builder.shards import ProgressLike, ShardWorker
from builder.stage import Tally

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The exact Ray release the engine is tested with (requirements-ray.txt pins it and its extra's dependencies).
RAY_VERSION = "2.60.0"
INSTALL = "pip install -r requirements-ray.txt"


def connect(cfg: AtlasConfig):
    """The `ray` module, connected to cfg.ray_address or to a local cluster started with this machine's cores."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"engine = \"ray\" needs Ray {RAY_VERSION}, which is not installed; run `{INSTALL}` "
                          "(`make test` does), or set engine = \"local\"") from None
    if ray.__version__ != RAY_VERSION:
        raise ConfigError(f"engine = \"ray\" is tested with Ray {RAY_VERSION}, found {ray.__version__}; run "
                          f"`{INSTALL}`")
    if not ray.is_initialized():
        # Ray's own logs go to its session folder (/tmp/ray/session_*/logs), not between the user and the one line
        # that matters; RAY_BACKEND_LOG_LEVEL=info brings its C++ logs back.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        options = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
        try:
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, **options)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, **options)
        except ConnectionError as error:
            raise ConfigError(f"cannot join the Ray cluster at ray_address = {cfg.ray_address!r} ({error}); start "
                              "it (`ray start --head`) or leave ray_address empty for a local one") from None
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the stage's own bar counts the shards
        context.print_on_execution_start = False
        for name in ("ray", "ray.data"):  # Ray Data sets its loggers up on import
            logging.getLogger(name).setLevel(logging.CRITICAL)
    return ray


def actor_plan(cfg: AtlasConfig, resources: dict[str, float]) -> tuple[int, dict[str, float], int]:
    """How many shard actors, each one's resource claim, and its torch threads."""
    cpus = max(1.0, float(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    if gpus and cfg.device != "cpu":
        actors = cfg.workers or gpus
        return actors, {"num_gpus": 1, "num_cpus": min(1.0, cpus / actors / 2)}, max(1, int(cpus // actors))
    actors = cfg.workers or int(cpus)
    share = cpus / actors
    return actors, {"num_cpus": share / 2}, max(1, int(share))


def shard_actor(worker: ShardWorker, threads: int) -> type:
    """A Ray Data actor class bound to `worker`: it sets the worker up once, then runs one shard per batch row. The
    worker travels in the class (small: the config and what the driver read), so a restarted actor has it again.
    Failures come back as rows, the shard named, so the driver can say them in one line."""

    class ShardActor:
        def __init__(self):
            import torch

            torch.set_num_threads(threads)
            self.worker = worker
            self.tally = Tally(f"{worker.stage} worker")  # the actor's own fault points (tests kill it there)
            self.failure = ""
            try:
                worker.setup()
            except Exception as error:  # noqa: BLE001 - reported with the first shard it cannot run
                self.failure = describe(error, f"{worker.stage} could not start on a Ray worker")

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            counters, failures = [], []
            for start, stop in zip(batch["start"], batch["stop"]):
                shard = range(int(start), int(stop))
                failure = self.failure
                if not failure:
                    try:
                        counters.append(json.dumps(self.worker.run(shard, self.tally)))
                    except Exception as error:  # noqa: BLE001 - named here, where the shard is known
                        failure = describe(error, f"{worker.stage} failed on sequences {shard.start}–{shard.stop - 1} "
                                                  "on a Ray worker")
                if failure:
                    counters.append("")
                failures.append(failure)
            return {"start": np.asarray(batch["start"]), "counters": np.array(counters),
                    "failure": np.array(failures)}

    return ShardActor


def describe(error: Exception, where: str) -> str:
    """A worker's exception as one line for the driver: an AtlasError's own message (its kind kept), else where it
    happened and what it was."""
    if isinstance(error, AtlasError):
        return json.dumps([type(error).__name__, error.format_message()])
    return json.dumps(["WorkerError", f"{where}: {type(error).__name__}: {error}"])


def raise_failure(failure: str) -> None:
    """Raise `describe`'s line on the driver as the error it was (an AtlasError kind from builder.errors)."""
    from builder import errors

    kind, message = json.loads(failure)
    error_type = getattr(errors, kind, AtlasError)
    raise (error_type if isinstance(error_type, type) and issubclass(error_type, AtlasError) else AtlasError)(message)


def for_every_node(cfg: AtlasConfig) -> AtlasConfig:
    """The config with its output folders absolute, as a worker on any node must read them (data paths already are:
    the config loader resolves them against the config file's folder)."""
    return dataclasses.replace(cfg, **{name: str(Path(getattr(cfg, name)).resolve())
                                       for name in ("out_dir", "site_dir", "mnist_dir")})


def run_shards_on_ray(cfg: AtlasConfig, worker: ShardWorker, todo: list[range], bar: ProgressLike) -> list[dict]:
    """Run `todo` on shard actors; each finished shard advances `bar`. Returns the counters in shard order."""
    ray = connect(cfg)
    worker = copy.copy(worker)  # what it pickles (never a model the driver lent it), with paths every node reads
    worker.cfg = for_every_node(worker.cfg)
    actors, claim, threads = actor_plan(cfg, ray.cluster_resources())
    actors = min(actors, len(todo))
    by_start = {shard.start: shard for shard in todo}
    dataset = ray.data.from_items([{"start": s.start, "stop": s.stop} for s in todo], override_num_blocks=len(todo))
    shards = dataset.map_batches(shard_actor(worker, threads), batch_size=1,
                                 compute=ray.data.ActorPoolStrategy(size=actors), **claim)
    log.info("%s: %d shards on %d Ray actors (%s, %d torch threads each)", worker.stage, len(todo), actors,
             ", ".join(f"{k}={v:g}" for k, v in claim.items()), threads)
    counters: dict[int, dict] = {}
    try:
        for row in shards.iter_rows():
            if row["failure"]:
                raise_failure(row["failure"])
            start = int(row["start"])
            counters[start] = json.loads(row["counters"])
            bar.update(len(by_start[start]))
    except AtlasError:
        raise
    except Exception as error:  # noqa: BLE001 - Ray's own failure (a lost node, an unschedulable actor)
        raise ray_failure(error, f"{worker.stage} on Ray") from None
    return [counters[shard.start] for shard in todo]


@dataclass(frozen=True)
class TaskFailure:
    failure: str  # `describe`'s line


_prepared: set[str] = set()  # the `map` calls whose initializer already ran in this worker process


def _run_task(token: str, initializer: Callable[[], None] | None, function: Callable[[T], R], task: T) -> R:
    if initializer is not None and token not in _prepared:
        initializer()
        _prepared.add(token)
    try:
        return function(task)
    except Exception as error:  # noqa: BLE001 - one line naming the task, raised again by the driver
        return TaskFailure(describe(error, f"{getattr(function, '__name__', 'a task')} failed on a Ray worker for "
                                           f"{task!r}"))


class RayExecutor:
    """The LocalExecutor's interface on Ray tasks: `map(function, tasks)` yields results in task order."""

    def __init__(self, cfg: AtlasConfig, initializer: Callable[[], None] | None = None):
        self.cfg = cfg
        self.initializer = initializer

    def map(self, function: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        tasks = list(tasks)
        ray = connect(self.cfg)
        cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
        # `workers` tasks at once (0: one per CPU); a task's claim is its share of the cluster's CPUs.
        remote = ray.remote(num_cpus=cpus / (self.cfg.workers or cpus), max_retries=3)(_run_task)
        initializer = ray.put(self.initializer) if self.initializer is not None else None
        token = uuid.uuid4().hex
        pending = [remote.remote(token, initializer, function, task) for task in tasks]
        try:
            for ref in pending:
                result = ray.get(ref)
                if isinstance(result, TaskFailure):
                    raise_failure(result.failure)
                yield result
        except Exception as error:  # noqa: BLE001 - the rest of the map is abandoned either way
            for ref in pending:
                ray.cancel(ref)
            if isinstance(error, AtlasError):
                raise
            raise ray_failure(error, f"{getattr(function, '__name__', 'a task')} on Ray") from None


def ray_failure(error: BaseException, what: str) -> WorkerError:
    """Ray's own failure (a lost node, an actor that cannot be scheduled) as one line; the stage's own errors come
    back as failure rows and results instead (`describe`)."""
    first = str(error).strip().splitlines()
    return WorkerError(f"{what} failed: {type(error).__name__}: {first[-1] if first else ''}")
