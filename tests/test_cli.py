"""The `atlas` command reports every user error as exactly one stderr line starting with 'Error:', a non-zero exit
status and no traceback.

Every case runs the real entry point in its own process with its own stdout/stderr file descriptors, so everything a
user would see (log lines, library messages written straight to fd 2, tracebacks) is captured. Starting Python with
torch, transformers and TransformerLens costs ~6 s of CPU, so only some cases start a fresh interpreter (config
errors, which never import them, and a few model-stage cases that also cover import-time output); the others are
forked from one process that imported those libraries once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from builder.artefacts import write_npz
from builder.cli import STAGES, main
from builder.config import config_from_dict
from builder.schema import EXAMPLES
from builder.stage import run_stage
from builder.sae import write_sae
from conftest import ROOT, atlas_command, run_atlas, tiny_config_dict
from test_sae import random_sae

# Fail fast: no case may wait on the network (the hub is switched off) or on anything else.
CASE_TIMEOUT_S = 120
SUCCESS = "success"


@dataclass(frozen=True)
class Case:
    stage: str
    config: Path
    expect: tuple[str, ...]  # every one of these must appear in the error line
    fresh: bool = False  # start a new interpreter rather than fork a pre-imported one


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def read_sae_arrays(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def write_config(path: Path, raw: dict) -> Path:
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in raw.items()))
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_gpt2, corpus_file) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("cli")

    def config(name: str, model=tiny_gpt2, corpus=corpus_file, **overrides) -> Path:
        raw = tiny_config_dict(model, corpus, root / name, **overrides)
        return write_config(root / f"{name}.toml", raw)

    empty = root / "empty.jsonl"
    empty.write_text("")
    whitespace = root / "whitespace.jsonl"
    whitespace.write_text("   \n\n\t\n  \n")
    malformed = root / "malformed.jsonl"
    malformed.write_text('{"text": "an unterminated record"\n')
    bad_toml = root / "bad.toml"
    bad_toml.write_text('name = "unterminated\n')
    blocker = root / "a-file"
    blocker.write_text("a file where the output folder should go")

    # A finished collect to corrupt: truncate one layer, or mark the artefacts as an older schema version.
    finished = tiny_config_dict(tiny_gpt2, corpus_file, root / "finished")
    run_stage("collect", config_from_dict(finished))
    finished_dir = Path(finished["out_dir"])
    artefact_dirs = {}
    for name in ("truncated", "emptied", "old-meta", "old-layer"):
        artefact_dirs[name] = root / name / "build"
        shutil.copytree(finished_dir, artefact_dirs[name])
    layer0 = artefact_dirs["truncated"] / "collect" / "L0.npz"
    layer0.write_bytes(layer0.read_bytes()[: layer0.stat().st_size // 2])
    (artefact_dirs["emptied"] / "collect" / "L0.npz").write_bytes(b"")
    meta = artefact_dirs["old-meta"] / "collect" / "meta.json"
    text = meta.read_text()
    version = f'"schema_version": {STAGES["collect"].version}'
    assert version in text
    meta.write_text(text.replace(version, '"schema_version": 0'))
    old_layer = artefact_dirs["old-layer"] / "collect" / "L0.npz"
    with np.load(old_layer, allow_pickle=False) as bundle:
        arrays = {k: bundle[k] for k in bundle.files if not k.startswith("_")}
    write_npz(old_layer, EXAMPLES.kind, EXAMPLES.version - 1, **arrays)
    binary = root / "ls"
    binary.write_bytes(bytes(range(256)) * 64)
    # SAE folders, each wrong in one way (tests/test_sae.py has the reader's own cases).
    rng = np.random.default_rng(0)
    sae = {name: random_sae(root / f"sae-{name}", rng, architecture, hook, width, "none") for name, architecture,
           hook, width in (("wide", "standard", "blocks.0.hook_resid_post", 31),
                           ("nohook", "standard", "blocks.0.hook_nowhere", 32),
                           ("deep", "standard", "blocks.9.hook_resid_post", 32),
                           ("gated", "standard", "blocks.0.hook_resid_post", 32),
                           ("nan", "standard", "blocks.0.hook_resid_post", 32),
                           ("notensor", "standard", "blocks.0.hook_resid_post", 32),
                           ("nocfg", "standard", "blocks.0.hook_resid_post", 32),
                           ("badcfg", "standard", "blocks.0.hook_resid_post", 32))}
    cfg_of = lambda name: sae[name] / "cfg.json"  # noqa: E731
    cfg_of("gated").write_text(cfg_of("gated").read_text().replace('"standard"', '"gated"'))
    cfg_of("nocfg").unlink()
    cfg_of("badcfg").write_text("{")
    write_sae(sae["nan"], json.loads(cfg_of("nan").read_text()),
              {**read_sae_arrays(sae["nan"]), "W_enc": np.full((32, 40), np.nan)})
    write_sae(sae["notensor"], json.loads(cfg_of("notensor").read_text()),
              {k: v for k, v in read_sae_arrays(sae["notensor"]).items() if k != "b_dec"})

    def sae_case(name: str, *expect: str) -> Case:
        return Case("collect", config(f"sae-{name}", sae=[{"path": str(sae[name]), "slug": "s"}]), expect)

    return {
        "unknown-hub-model": Case("collect", config("unknown", model="gpt2-smal"), ("unknown model 'gpt2-smal'",)),
        "missing-model-folder": Case("collect", config("missing", model="./no/such/model"),
                                     ("model folder './no/such/model' does not exist",)),
        "layer-out-of-range": Case("collect", config("layer", layers=[0, 2]), ("layer 2 is out of range", "0..1")),
        "empty-jsonl": Case("collect", config("empty", corpus=empty), (str(empty.name),)),
        "whitespace-jsonl": Case("collect", config("whitespace", corpus=whitespace),
                                 ("no complete sequence", str(whitespace.name))),
        "malformed-jsonl": Case("collect", config("malformed", corpus=malformed), ("cannot read the dataset",)),
        "missing-data-file": Case("collect", config("nodata", corpus=root / "absent.jsonl"),
                                  ("absent.jsonl", "does not exist")),
        "context-too-long": Case("collect", config("context", context_length=128),
                                 ("context_length 128 is longer than", "(64)")),
        "threshold-above-one": Case("collect", config("thr-high", threshold=1.5),
                                    ("threshold must be in (0, 1]", "1.5"), fresh=True),
        "threshold-zero": Case("collect", config("thr-zero", threshold=0.0), ("threshold must be in (0, 1]",),
                               fresh=True),
        "threshold-negative": Case("collect", config("thr-neg", threshold=-0.5), ("threshold must be in (0, 1]",),
                                   fresh=True),
        "max-examples-zero": Case("collect", config("max0", max_examples=0), ("max_examples must be at least 1",),
                                  fresh=True),
        "unknown-config-key": Case("collect", config("key", treshold=0.5),
                                   ("unknown config key 'treshold'", "did you mean 'threshold'"), fresh=True),
        "unwritable-out-dir": Case("collect", write_config(root / "unwritable.toml",
                                                           tiny_config_dict(tiny_gpt2, corpus_file, blocker)),
                                   ("cannot write", "a-file", "choose a writable")),
        "missing-config": Case("collect", root / "absent.toml", ("config file", "not found"), fresh=True),
        "invalid-toml": Case("collect", bad_toml, ("not valid TOML",), fresh=True),
        "truncated-collect-layer": Case("embed", config("truncated"), ("L0.npz", "corrupt or truncated")),
        "empty-collect-layer": Case("embed", config("emptied"), ("L0.npz", "corrupt or truncated")),
        "old-schema-collect-meta": Case("embed", config("old-meta"), ("meta.json", "schema version 0")),
        "old-schema-collect-layer": Case("embed", config("old-layer"),
                                         ("L0.npz", f"schema version {EXAMPLES.version - 1}")),
        "binary-data-file": Case("collect", config("binary", corpus=binary), (str(binary), "neither .txt nor .jsonl")),
        "upstream-missing": Case("embed", config("nothing-yet"), ("the collect stage is missing", "atlas collect")),
        "sae-d-in-mismatch": sae_case("wide", "d_in is 31", "32 wide"),
        "sae-hook-not-in-model": sae_case("nohook", "hook 'blocks.0.hook_nowhere' is not in"),
        "sae-hook-too-deep": sae_case("deep", "'blocks.9.hook_resid_post' is not in", "layers 0..1"),
        "sae-unknown-architecture": sae_case("gated", "unknown architecture 'gated'"),
        "sae-non-finite": sae_case("nan", "W_enc holds non-finite values"),
        "sae-missing-tensor": sae_case("notensor", "no tensor 'b_dec'"),
        "sae-missing-cfg": sae_case("nocfg", "cfg.json is missing"),
        "sae-malformed-cfg": sae_case("badcfg", "cfg.json is not valid JSON"),
        "sae-missing-folder": Case("collect", config("sae-absent", sae=[{"path": str(root / "absent"), "slug": "s"}]),
                                   ("no such folder",)),
        "sae-reserved-slug": Case("collect", config("sae-slug", sae=[{"path": str(sae["wide"]), "slug": "L3"}]),
                                  ("slug must be a URL slug", "'L3'"), fresh=True),
        "sae-unknown-key": Case("collect", config("sae-key", sae=[{"pth": str(sae["wide"]), "slug": "s"}]),
                                ("unknown [[sae]] key 'pth'", "did you mean 'path'"), fresh=True),
        SUCCESS: Case("collect", config("success", max_sequences=8), (), fresh=True),
    }


FORK_SERVER = r"""
import json, os, sys, time, traceback
# What the CLI imports lazily; each forked case then pays only for its own work.
import datasets, torch, transformers, transformer_lens.model_bridge  # noqa: F401
import builder.cli, builder.collect, builder.data, builder.embed, builder.models  # noqa: F401
results = {}
for name, args, out_path, err_path in json.loads(sys.argv[1]):
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, out_path), (2, err_path)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = ["atlas", *args]
        code = 0
        try:
            builder.cli.entry()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results[name] = [os.waitstatus_to_exitcode(status), time.monotonic() - start]
print(json.dumps(results))
"""


def run_forked(cases: dict[str, Case], folder: Path) -> dict[str, Outcome]:
    jobs = [(name, [case.stage, "--config", str(case.config)], str(folder / f"{name}.out"),
             str(folder / f"{name}.err")) for name, case in cases.items()]
    server = subprocess.run([sys.executable, "-c", FORK_SERVER, json.dumps(jobs)], cwd=ROOT, capture_output=True,
                            text=True, timeout=CASE_TIMEOUT_S * 2, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert server.returncode == 0, server.stderr[-3000:]
    results = json.loads(server.stdout.strip().splitlines()[-1])
    return {name: Outcome(results[name][0], Path(out).read_text(), Path(err).read_text(), results[name][1])
            for name, _, out, err in jobs}


@pytest.fixture(scope="module")
def outcomes(cases, tmp_path_factory) -> dict[str, Outcome]:
    """Every case's `atlas <stage> --config X`: fresh interpreters and the fork server side by side."""

    def run_fresh(case: Case) -> Outcome:
        start = time.monotonic()
        done = run_atlas([case.stage, "--config", str(case.config)], timeout=CASE_TIMEOUT_S)
        return Outcome(done.returncode, done.stdout, done.stderr, time.monotonic() - start)

    forked = {name: case for name, case in cases.items() if not case.fresh}
    with ThreadPoolExecutor(max_workers=2) as pool:
        forked_future = pool.submit(run_forked, forked, tmp_path_factory.mktemp("forked"))
        fresh = {name: pool.submit(run_fresh, case) for name, case in cases.items() if case.fresh}
        results = {name: future.result() for name, future in fresh.items()}
        results.update(forked_future.result())
    return results


CASE_NAMES = ["unknown-hub-model", "missing-model-folder", "layer-out-of-range", "empty-jsonl", "whitespace-jsonl",
              "malformed-jsonl", "missing-data-file", "context-too-long", "threshold-above-one", "threshold-zero",
              "threshold-negative", "max-examples-zero", "unknown-config-key", "missing-config", "invalid-toml",
              "truncated-collect-layer", "empty-collect-layer", "old-schema-collect-meta", "old-schema-collect-layer",
              "unwritable-out-dir", "binary-data-file", "upstream-missing", "sae-d-in-mismatch",
              "sae-hook-not-in-model", "sae-hook-too-deep", "sae-unknown-architecture", "sae-non-finite",
              "sae-missing-tensor", "sae-missing-cfg", "sae-malformed-cfg", "sae-missing-folder", "sae-reserved-slug",
              "sae-unknown-key"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_user_error_is_one_error_line_with_a_nonzero_exit_and_no_traceback(cases, outcomes, name):
    case, outcome = cases[name], outcomes[name]
    shown = f"exit {outcome.returncode}\n--- stderr\n{outcome.stderr[-3000:]}\n--- stdout\n{outcome.stdout[-1000:]}"
    assert "Traceback" not in outcome.stderr + outcome.stdout, shown
    assert outcome.returncode == 2, shown  # AtlasError's exit status (1 would be an unhandled exception)
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("Error: "), shown
    for phrase in case.expect:
        assert phrase in lines[0], shown


def test_every_case_is_checked(cases):
    assert sorted(cases) == sorted(CASE_NAMES + [SUCCESS])


def test_unknown_hub_model_fails_fast_offline(outcomes):
    # Libraries are already imported in the forked case: what is left is the lookup, which must not retry against an
    # unreachable hub.
    assert outcomes["unknown-hub-model"].seconds < 20


def test_unknown_hub_model_suggests_a_supported_name(outcomes):
    assert "did you mean" in outcomes["unknown-hub-model"].stderr


def test_a_successful_stage_exits_zero_prints_no_error_and_writes_its_artefacts(cases, outcomes):
    outcome = outcomes[SUCCESS]
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert "Error" not in outcome.stderr and "Traceback" not in outcome.stderr
    out_dir = cases[SUCCESS].config.parent / SUCCESS / "build" / "collect"
    assert (out_dir / "meta.json").is_file() and (out_dir / "L0.npz").is_file() and (out_dir / "L1.npz").is_file()


def test_help_lists_every_stage():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for stage in (*STAGES, "build", "serve"):
        assert stage in result.output


FRESH_COLLECT_FAILURES = ["unknown-hub-model", "missing-model-folder", "layer-out-of-range", "empty-jsonl",
                          "whitespace-jsonl", "malformed-jsonl", "missing-data-file", "context-too-long",
                          "binary-data-file"]


@pytest.mark.parametrize("name", FRESH_COLLECT_FAILURES)
def test_a_failed_first_build_leaves_nothing_behind(cases, outcomes, name):
    """Not even collect's key marker: the next run starts clean and nothing looks half built."""
    assert outcomes[name].returncode == 2
    out_dir = cases[name].config.parent / cases[name].config.stem
    leftovers = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")) if out_dir.exists() else []
    assert leftovers == []


def test_unknown_hub_model_fails_fast_without_the_offline_switch(cases, tmp_path):
    """A user with no network and no HF_HUB_OFFLINE gets the one line at once, not a minute of retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    start = time.monotonic()
    done = subprocess.run(atlas_command() + ["collect", "--config", str(cases["unknown-hub-model"].config)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "unknown model 'gpt2-smal'" in done.stderr
    assert time.monotonic() - start < 40
