"""The "Reproduce this" script templates (builder/render/reproduce.py): filled for the central example of a unit's
first feature and run as a user would run them, they recompute the artefact's activation of a tiny model's neuron
and of an SAE latent (relative error ≤ 1e-4) and print the artefact's exact value beside it, reading the sequence
and the activation from the bulk files by path and by URL; the embedded and hub models' templates compile and load
the model the documented way."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from builder.bulk import write_bulk
from builder.config import SaeSpec
from builder.paths import AtlasPaths
from builder.render.inputs import load_atlas
from builder.render.reproduce import PLACEHOLDERS, reproduce_templates, set_template
from builder.schema import read_clusters, read_example_fields
from builder.subjects import SaeLatents
from conftest import SAE_HOOK, SAE_SLUG

RECOMPUTED = re.compile(r"^recomputed (\S+) atlas (\S+)$", re.M)


@pytest.fixture(scope="module")
def reproducible(tmp_path_factory, sae_build):
    """The tiny build with its templates, and a working folder holding its bulk files under bulk/."""
    folder = tmp_path_factory.mktemp("reproduce")
    cfg = sae_build
    write_bulk(cfg, folder / "work" / "bulk")
    return cfg, reproduce_templates(load_atlas(cfg)), folder / "work"


def central_example(cfg, set_key: str) -> tuple[int, int, int, float]:
    """(unit, sequence, position, activation) of the central example of feature 0 of the set's first unit with
    examples, from the collect and cluster artefacts."""
    paths = AtlasPaths.of(cfg)
    examples = read_example_fields(paths, set_key, ("offsets", "seq", "pos", "act"))
    clusters = read_clusters(paths, set_key)
    unit = int(np.flatnonzero(np.diff(examples["offsets"]))[0])
    central = int(clusters["cluster_central"][clusters["cluster_offsets"][unit]])
    return unit, int(examples["seq"][central]), int(examples["pos"][central]), float(examples["act"][central])


def fill(template: str, unit: int, sequence: int, position: int, bulk: str) -> str:
    assert PLACEHOLDERS == ("__UNIT__", "__SEQUENCE__", "__POSITION__", "__BULK__")
    for placeholder in PLACEHOLDERS:
        assert template.count(placeholder) == 1, placeholder
    return (template.replace("__UNIT__", str(unit)).replace("__SEQUENCE__", str(sequence))
            .replace("__POSITION__", str(position)).replace("__BULK__", bulk))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test's output is the script's
        pass


def run_script(text: str, cwd: Path) -> tuple[float, float]:
    """Save the script and run it with this Python, offline; returns (recomputed, atlas) as it prints them."""
    (cwd / "reproduce.py").write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1",
           "no_proxy": "127.0.0.1"}
    result = subprocess.run([sys.executable, "reproduce.py"], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = RECOMPUTED.findall(result.stdout)
    assert len(found) == 1, result.stdout
    return float(found[0][0]), float(found[0][1])


def test_the_neuron_script_recomputes_its_activation_from_the_bulk_folder(reproducible):
    cfg, templates, work = reproducible
    template = templates["L1"]
    assert "blocks.1.mlp.hook_post" in template and repr(cfg.model) in template and "revision=" not in template
    unit, sequence, position, activation = central_example(cfg, "L1")
    assert position < cfg.context_length - 1  # a prefix, not the whole sequence
    recomputed, printed = run_script(fill(template, unit, sequence, position, "bulk"), work)
    assert printed == activation and activation > 0
    assert abs(recomputed - activation) <= 1e-4 * abs(activation), (recomputed, activation)


def test_the_latent_script_recomputes_its_activation_from_a_bulk_url(reproducible):
    cfg, templates, work = reproducible
    template = templates[SAE_SLUG]
    assert "read_sae(" in template and SAE_HOOK in template
    unit, sequence, position, activation = central_example(cfg, SAE_SLUG)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(work / "bulk")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        recomputed, printed = run_script(fill(template, unit, sequence, position, url), work)
    finally:
        server.shutdown()
        server.server_close()
    assert printed == activation and activation > 0
    assert abs(recomputed - activation) <= 1e-4 * abs(activation), (recomputed, activation)


def test_every_set_has_its_template_in_common_json(reproducible):
    from builder.render.pages import METRIC_DEFINITIONS
    from builder.render.sidecars import common_file, provenance

    cfg, templates, _ = reproducible
    atlas = load_atlas(cfg)
    assert sorted(templates) == ["L1", SAE_SLUG]
    assert common_file(atlas, METRIC_DEFINITIONS, provenance(atlas))["reproduce"] == templates


@pytest.fixture
def synthetic_atlas(tmp_path):
    """render_fixtures' synthetic atlas (model-free) with the given config overrides: its model is the embedded one
    unless overridden."""
    import render_fixtures as fx

    def make(**overrides):
        cfg = fx.render_config(tmp_path / "synthetic", **overrides)
        fx.write_artefacts(cfg)
        return load_atlas(cfg, vocabulary=fx.VOCAB)

    return make


def test_the_embedded_model_template_compiles_and_loads_through_the_package(synthetic_atlas):
    templates = reproduce_templates(synthetic_atlas())
    assert sorted(templates) == ["L0", "L2"]
    for key, text in templates.items():
        compile(text, f"reproduce-{key}.py", "exec")
        assert "from builder.models import embedded_model_folder" in text
        assert "boot_transformers(str(embedded_model_folder())" in text and "revision=" not in text
        assert len(text.splitlines()) <= 20


def test_a_hub_model_and_a_hub_sae_load_at_their_recorded_revision_and_path(synthetic_atlas):
    atlas = synthetic_atlas(model="gpt2")  # the fixture's collect meta records revision "rev-1"
    text = reproduce_templates(atlas)["L0"]
    compile(text, "reproduce-L0.py", "exec")
    assert "TransformerBridge.boot_transformers('gpt2', revision='rev-1', dtype=torch.float32" in text
    assert "embedded_model_folder" not in text
    latents = SaeLatents(key="res", size=4, d_input=6, layer=0, folder="/cache/snapshot/res", hook_name=SAE_HOOK,
                         architecture="standard")
    hub = dataclasses.replace(atlas, cfg=dataclasses.replace(atlas.cfg, sae=(SaeSpec("hf://owner/repo/res", "res"),)))
    text = set_template(hub, latents)
    compile(text, "reproduce-res.py", "exec")
    assert "read_sae('hf://owner/repo/res')" in text and "/cache/snapshot" not in text
    assert "res.sequences.parquet" in text and len(text.splitlines()) <= 20


def test_the_embedded_model_script_recomputes_what_the_package_loader_computes(synthetic_atlas, embedded_model,
                                                                                tmp_path):
    """The embedded model exists at no hub revision: its script boots the package's copy, and gets the number the
    build's own loader (builder.models.load_model) gets on the same prefix."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    sequence = [int(t) for t in embedded_model.tokenizer("The whale surfaced beside the ship at dawn")["input_ids"]]
    unit, position = 5, 6
    with torch.no_grad():
        _, cache = embedded_model.bridge.run_with_cache(torch.tensor([sequence[:position + 1]]))
    expected = float(cache["blocks.0.mlp.hook_post"][0, position, unit])
    assert abs(expected) > 1e-3  # a relative error means something
    (tmp_path / "bulk").mkdir()
    rows = {"sequence": pa.array([3], pa.int32()), "tokens": pa.array([sequence], pa.list_(pa.int32()))}
    pq.write_table(pa.table(rows), tmp_path / "bulk" / "L0.sequences.parquet")
    examples = {"unit": pa.array([unit, unit, unit + 1], pa.int32()), "sequence": pa.array([3, 3, 3], pa.int32()),
                "position": pa.array([position - 1, position, position], pa.int32()),
                "activation": pa.array([1.0, expected, 2.0], pa.float32())}  # the script's row, and two others
    pq.write_table(pa.table(examples), tmp_path / "bulk" / "L0.examples.parquet")
    text = fill(reproduce_templates(synthetic_atlas())["L0"], unit, 3, position, "bulk")
    recomputed, printed = run_script(text, tmp_path)
    assert printed == float(np.float32(expected))
    assert abs(recomputed - expected) <= 1e-4 * abs(expected), (recomputed, expected)
