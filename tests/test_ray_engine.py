"""The Ray engine: the same shards and tasks on a local Ray cluster (2 CPUs, the tiny model) give a byte-identical
site; an actor killed in the middle of a shard is retried, a killed driver resumes from the finished shards, and a
worker that raises reaches the user as one line. The local engine never imports Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from builder.ray_engine import actor_plan
from tests.conftest import ROOT, atlas_command, build, site_files, write_config

pytest.importorskip("ray", reason="the Ray extra (requirements-ray.txt) is not installed; `make test` installs it")


def ray_config(folder, model, corpus, **extra):
    """The test_build config, run by the Ray engine with two actors and two tasks at once."""
    path = write_config(folder, model, corpus)
    settings = {"engine": '"ray"', "workers": "2", **extra}
    lines = [line for line in path.read_text().splitlines() if line.split(" = ")[0] not in settings]
    path.write_text("\n".join(lines + [f"{key} = {value}" for key, value in settings.items()]) + "\n")
    return path


def ray_build(config, fault: str | None = None, **env) -> subprocess.CompletedProcess:
    """An `atlas build` in its own process, so each starts (and stops) its own local Ray cluster; `env` reaches the
    Ray workers too (they inherit the driver's environment)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return build(config, fault)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def local_site(reference_site):
    """The local engine's site for the same config (conftest's reference build)."""
    return site_files(reference_site / "site")


def test_the_ray_engine_builds_the_local_site_byte_for_byte_even_when_actors_are_killed_inside_shards(
        local_site, tmp_path, tiny_llama, corpus_file):
    marker = tmp_path / "fault"
    # In collect and again in importance, the first actor to finish one batch of a shard SIGKILLs itself, once:
    # Ray restarts it and retries the shard. Collect runs each layer in its own pass (collect_groups = 2), which must
    # not change a byte either.
    result = ray_build(ray_config(tmp_path, tiny_llama, corpus_file, collect_groups="2"),
                       "collect worker:8,importance worker:8", ATLAS_FAULT_ONCE=str(marker))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on 2 Ray actors" in result.stderr
    assert (tmp_path / "fault.collect-worker").exists() and (tmp_path / "fault.importance-worker").exists()
    assert sorted(p.name for p in (tmp_path / "build" / "collect").glob("shards*")) == ["shards-1of2", "shards-2of2"]
    assert site_files(tmp_path / "site") == local_site


def test_a_killed_driver_resumes_from_the_finished_shards(reference_site, tmp_path, tiny_llama, corpus_file):
    config = ray_config(tmp_path, tiny_llama, corpus_file)
    killed = ray_build(config, "collect:16")  # the driver's bar, as the first of the four shards comes back
    assert killed.returncode == -9
    finished = len(list((tmp_path / "build" / "collect" / "shards").iterdir()))
    assert finished >= 1, "no shard survived the driver"
    resumed = subprocess.run(atlas_command() + ["collect", "--config", str(config)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Actors may finish a shard after the driver died (their cluster goes down with it moments later): never fewer.
    done = re.search(r"collect: (\d) of 4 shards already done", resumed.stderr)
    assert done and int(done.group(1)) >= finished, resumed.stderr[-2000:]
    for mine in sorted((tmp_path / "build" / "collect").glob("*.npz")):
        assert mine.read_bytes() == (reference_site / "build" / "collect" / mine.name).read_bytes(), mine.name


def test_a_worker_that_raises_reaches_the_user_as_one_line(tmp_path, tiny_llama, corpus_file):
    result = ray_build(ray_config(tmp_path, tiny_llama, corpus_file), "collect worker:8", ATLAS_FAULT_MODE="raise")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    # Every actor raises from its first batch on; which shard's failure reaches the driver first is Ray's to order.
    named = len(errors) == 1 and re.fullmatch(r"Error: collect failed on sequences (\d+)–(\d+) on a Ray worker: "
                                              r"RuntimeError: injected fault at collect worker:8", errors[0])
    assert named, result.stderr[-2000:]
    first, last = int(named.group(1)), int(named.group(2))
    assert first % 16 == 0 and last == first + 15 and last < 64, errors[0]  # one of the four 16-sequence shards
    assert "Traceback" not in result.stderr


def test_the_local_engine_never_imports_ray(make_config, tiny_llama):
    config = make_config(tiny_llama)
    code = ("import sys, pickle; from builder.shards import run_shards, unit_executor\n"
            "from builder.collect import CollectShards; from builder.importance import ImportanceShards\n"
            "import builder.cluster, builder.render.publish, builder.pipeline\n"
            "cfg = pickle.loads(sys.stdin.buffer.read())\n"
            "assert list(unit_executor(cfg, 2).map(abs, [-1, -2, -3])) == [1, 2, 3]\n"
            "assert run_shards(cfg, CollectShards(cfg), [], None) == []\n"
            "assert 'ray' not in sys.modules, 'the local engine imported ray'\n")
    import pickle

    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=pickle.dumps(config), capture_output=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_without_ray_installed_the_ray_engine_is_one_line(tmp_path, tiny_llama, corpus_file):
    config = ray_config(tmp_path, tiny_llama, corpus_file)
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now fails as if it were not installed
            "from builder.cli import entry; sys.argv = ['atlas', 'build', '--config', sys.argv[1]]; entry()\n")
    result = subprocess.run([sys.executable, "-c", code, str(config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("Error: engine = \"ray\" needs Ray 2.60.0")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("resources, actors, claim, threads", [
    ({"CPU": 2.0}, 2, {"num_cpus": 0.5}, 1),  # fractional claims: Ray Data keeps a CPU for its own tasks
    ({"CPU": 16.0}, 16, {"num_cpus": 0.5}, 1),
    ({"CPU": 16.0, "GPU": 4.0}, 4, {"num_gpus": 1, "num_cpus": 1.0}, 4),  # one actor per GPU
])
def test_actors_get_fractional_cpus_or_one_gpu_each(make_config, tiny_llama, resources, actors, claim, threads):
    cfg = make_config(tiny_llama, engine="ray", device="auto")
    assert actor_plan(cfg, resources) == (actors, claim, threads)


def test_workers_sets_the_number_of_cpu_actors(make_config, tiny_llama):
    cfg = make_config(tiny_llama, engine="ray", workers=4)
    assert actor_plan(cfg, {"CPU": 2.0}) == (4, {"num_cpus": 0.25}, 1)


@pytest.mark.slow
def test_on_the_embedded_model_the_ray_engine_builds_the_local_site(tmp_path, embedded_corpus, share_embedded_model):
    from builder.config import EMBEDDED_MODEL, config_from_dict
    from builder.pipeline import STAGES
    from builder.stage import run_stage

    raw = {"name": "embedded-slice", "model": EMBEDDED_MODEL, "data_files": [str(embedded_corpus)], "device": "cpu",
           "context_length": 32, "max_sequences": 32, "shard_sequences": 16, "layers": [0], "workers": 2,
           "neighbour_threshold": 0.0, "build_date": "2024-01-01"}
    local = config_from_dict({**raw, "out_dir": str(tmp_path / "local" / "build"),
                              "site_dir": str(tmp_path / "local" / "site")})
    for stage in STAGES:  # in this process, on the session's embedded model
        run_stage(stage, local)
    config = tmp_path / "ray.toml"
    config.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in {
        **raw, "engine": "ray", "out_dir": str(tmp_path / "ray" / "build"),
        "site_dir": str(tmp_path / "ray" / "site")}.items()))
    result = build(config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert site_files(tmp_path / "ray" / "site") == site_files(tmp_path / "local" / "site")
