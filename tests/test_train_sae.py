"""The train_sae stage on a tiny model: SAELens round trip, determinism and resume after a kill, the held-out
evaluation against literal computations, the trained SAEs atlased like any folder, and bad input as one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.config import config_from_dict
from builder.paths import AtlasPaths
from builder.sae import read_sae
from builder.schema import TRAIN_TOKENS, TRAINING_LOG
from builder.train_sae.metrics import latent_examples
from builder.train_sae.trainer import SaeTrainer, TrainSettings, saelens_config
from conftest import ROOT, atlas_command, expect_error, literal_splice, tiny_config_dict

HOOK = "blocks.1.mlp.hook_post"  # the tiny GPT-2's MLP activations, 128 wide
WARMUP = 30
TABLES = [{"slug": "std", "hook": HOOK, "d_sae": 64, "l1": 0.01, "training_tokens": 640, "batch_size": 8,
           "learning_rate": 0.003, "warmup_steps": WARMUP},
          {"slug": "ne", "hook": HOOK, "d_sae": 64, "l1": 0.01, "ne": 0.5, "training_tokens": 640, "batch_size": 8,
           "learning_rate": 0.003, "warmup_steps": WARMUP}]


def trained_config(model, corpus, out: Path, **overrides):
    raw = tiny_config_dict(model, corpus, out, layers=[1], max_examples=8, train_data_files=[str(corpus)],
                           train_heldout_sequences=6, train_sae=TABLES, **overrides)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gpt2, corpus_file):
    from builder.models import load_model
    from builder.pipeline import STAGES
    from builder.stage import run_stage

    cfg = trained_config(tiny_gpt2, corpus_file, tmp_path_factory.mktemp("trained"))
    for stage in STAGES:
        run_stage(stage, cfg)
    return cfg, load_model(cfg)


def test_a_trained_sae_is_a_saelens_folder_that_reads_back_exactly(tmp_path):
    from builder.train_sae import save_trained
    from builder.config import TrainSaeSpec

    spec = TrainSaeSpec(slug="s", hook=HOOK, d_sae=12, training_tokens=16, batch_size=8)
    trainer = SaeTrainer(TrainSettings(d_in=5, d_sae=12, l1=0.01, ne=0.3, momentum=0.9, warmup_steps=1,
                                       learning_rate=0.01, seed=3))
    for x in torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(0)):
        trainer.step(x)
    cfg = config_from_dict(tiny_config_dict("unused", tmp_path / "c.jsonl", tmp_path, train_data_files=["t.txt"],
                                            train_sae=[{"slug": "s", "hook": HOOK}]))
    save_trained(cfg, spec, trainer, HOOK, "tiny")
    sae = read_sae(tmp_path / "build" / "train_sae" / "s")
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.model_name, sae.cfg.d_in, sae.cfg.d_sae) == (
        "standard", HOOK, "tiny", 5, 12)
    assert not sae.cfg.apply_b_dec_to_input and sae.cfg.normalize_activations == "none"
    for name, value in trainer.weights().items():
        assert np.array_equal(getattr(sae, name), value), name
    x = torch.randn(4, 5)
    assert torch.equal(sae.on("cpu").encode(x), trainer.encode(x).detach())
    cfg_json = json.loads((sae.folder / "cfg.json").read_text())
    assert cfg_json == json.loads(json.dumps(saelens_config(trainer.settings, HOOK, "tiny", 16)))


def test_training_writes_both_saes_their_logs_and_held_out_evaluations(trained):
    cfg, _ = trained
    paths = AtlasPaths.of(cfg)
    tokens = TRAIN_TOKENS.read_npz(paths.root / "train_sae" / "tokens.npz")
    assert len(tokens["heldout"]) == 6 and len(tokens["train"]) == -(-640 // cfg.context_length)
    for table in TABLES:
        log = TRAINING_LOG.read_npz(paths.trained(table["slug"], "log.npz"))
        assert len(log["mse"]) == 640 // 8 and np.isfinite(log["mse"]).all()
        assert log["mse"][-10:].mean() < log["mse"][:10].mean()  # it learned
        assert read_sae(paths.root / "train_sae" / table["slug"]).cfg.d_sae == 64
    std, ne = (TRAINING_LOG.read_npz(paths.trained(slug, "log.npz")) for slug in ("std", "ne"))
    # Same seed, same batches: identical until the NE term is switched on, different after.
    for term in ("mse", "l1", "l0"):
        np.testing.assert_array_equal(std[term][:WARMUP + 1], ne[term][:WARMUP + 1])
    assert not np.array_equal(std["mse"][WARMUP + 1:], ne["mse"][WARMUP + 1:])
    assert np.isnan(std["ne"]).all() and (ne["ne"][1:] > 0).all()  # a standard SAE has no L_N term


def test_status_shows_the_stage_and_a_changed_table_retrains_and_rebuilds(trained):
    from builder.stage import statuses

    cfg, _ = trained
    states = {s.name: s for s in statuses(cfg)}
    assert states["train_sae"].state == "done" and list(states)[0] == "train_sae"
    changed = config_from_dict({**tiny_config_dict(cfg.model, Path(cfg.data_files[0]), Path(cfg.out_dir).parent,
                                                   layers=[1], max_examples=8),
                                "train_data_files": list(cfg.train_data_files), "train_heldout_sequences": 6,
                                "train_sae": [{**TABLES[0], "l1": 0.02}, TABLES[1]]})
    states = {s.name: s for s in statuses(changed)}
    assert states["train_sae"].state == "stale" and "train_sae changed" in states["train_sae"].reason
    assert states["collect"].state == "stale"


def test_the_held_out_evaluation_matches_literal_computations(trained):
    cfg, model = trained
    paths = AtlasPaths.of(cfg)
    heldout = torch.as_tensor(TRAIN_TOKENS.read_npz(paths.root / "train_sae" / "tokens.npz")["heldout"])
    for slug in ("std", "ne"):
        result = json.loads(paths.trained(slug, "evaluation.json").read_text())
        sae = read_sae(paths.root / "train_sae" / slug)
        w_enc, b_enc = torch.as_tensor(sae.W_enc).double(), torch.as_tensor(sae.b_enc).double()
        w_dec, b_dec = torch.as_tensor(sae.W_dec).double(), torch.as_tensor(sae.b_dec).double()
        clean = spliced = squared = l1 = 0.0
        active = predicted = 0
        xs = []
        for row in heldout:
            row_clean, row_spliced, row_predicted, x = literal_splice(
                model, row, HOOK, lambda value: torch.relu(value.double() @ w_enc + b_enc) @ w_dec + b_dec)
            clean, spliced, predicted = clean + row_clean, spliced + row_spliced, predicted + row_predicted
            x = x.double()
            for token in x:  # per input, literally
                f = torch.relu(token @ w_enc + b_enc)
                squared += float(((f @ w_dec + b_dec - token) ** 2).sum())
                l1 += float(f.sum())
                active += int((f > 0).sum())
            xs.append(x)
        n = sum(len(x) for x in xs)
        np.testing.assert_allclose(result["ce_increase"], (spliced - clean) / predicted, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(result["mse"], squared / (n * 128), rtol=1e-4)
        np.testing.assert_allclose(result["l1"], l1 / n, rtol=1e-4)
        np.testing.assert_allclose(result["l0_percent"], 100 * active / n / 64, rtol=1e-6)
        fired = TRAINING_LOG.read_npz(paths.trained(slug, "log.npz"))["fired"]
        assert result["dead_percent"] == pytest.approx(100 * float((~fired).mean()))
        assert result["heldout_tokens"] == heldout.numel() and result["training_tokens"] == 640
        # Distances and size over each latent's held-out examples, literally.
        x = torch.stack(xs).float()
        sizes, maxima, means = [], [], []
        for j in range(64):
            examples = []
            for s in range(len(x)):
                acts = torch.relu(x[s].double() @ w_enc[:, j] + b_enc[j])
                if acts.max() > 0 and len(examples) < 100:
                    examples.append(x[s, int(acts.argmax())].double() * w_enc[:, j])
            if examples:
                sizes.append(len(examples))
            if len(examples) >= 2:
                e = torch.stack(examples)
                norms = e.norm(dim=1, keepdim=True)
                cos = (e / norms) @ (e / norms).T
                d = (1 - cos)[torch.triu_indices(len(e), len(e), 1).unbind()]
                maxima.append(float(d.clamp(0, 2).max()))
                means.append(float(d.clamp(0, 2).mean()))
        assert result["median_size"] == pytest.approx(float(np.median(sizes)))
        assert result["median_max_distance"] == pytest.approx(float(np.median(maxima)), abs=1e-5)
        assert result["median_mean_distance"] == pytest.approx(float(np.median(means)), abs=1e-5)


def test_latent_examples_take_the_first_groups_at_their_max_position_up_to_the_cap():
    rng = np.random.default_rng(0)
    inputs = torch.as_tensor(rng.normal(size=(9, 4, 3)), dtype=torch.float32)
    w = rng.normal(size=(3, 5))
    encode = lambda x: torch.relu(x @ torch.as_tensor(w, dtype=torch.float32))
    result = latent_examples(inputs, encode, w, max_examples=3)
    f = encode(inputs).numpy()
    for j in range(5):
        groups = [g for g in range(9) if f[g, :, j].max() > 0][:3]
        assert result.size[j] == len(groups)


def test_trained_saes_are_atlased_with_training_sections_and_the_method_table(trained):
    cfg, _ = trained
    site = Path(cfg.site_dir) / cfg.name
    for slug in ("std", "ne"):
        page = (site / slug / "index.html").read_text()
        assert 'id="training"' in page and page.count("<polyline") == (4 if slug == "ne" else 3)  # no L_N curve
        assert ("curve-warmup" in page) == (slug == "ne")  # the NE switch-on is marked where there is one
        assert any((site / slug).glob("N*/index.html"))
    method = (site / "method" / "index.html").read_text()
    assert 'id="trained-saes"' in method and "std/index.html" in method and "ne/index.html" in method
    assert "median MCS" in method


def _run(config: Path, fault: str | None = None, command: str = "train-sae") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ATLAS_FAULT", None)
    if fault:
        env["ATLAS_FAULT"] = fault
    return subprocess.run(atlas_command() + [command, "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _toml(folder: Path, model, corpus, tables=TABLES, **extra) -> Path:
    lines = [f'model = "{model}"', f'data_files = ["{corpus}"]', f'train_data_files = ["{corpus}"]',
             "context_length = 24", "layers = [1]", 'device = "cpu"', "train_heldout_sequences = 6",
             f'out_dir = "{folder / "build"}"', f'site_dir = "{folder / "site"}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    for table in tables:
        lines.append("[[train_sae]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = folder / "atlas.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_killed_midway_resumes_to_the_same_weights(tmp_path, tiny_gpt2, corpus_file):
    straight = _run(_toml(tmp_path / "straight", tiny_gpt2, corpus_file))
    assert straight.returncode == 0, straight.stderr[-2000:]
    config = _toml(tmp_path / "killed", tiny_gpt2, corpus_file)
    killed = _run(config, fault="train_sae:70")  # after the checkpoint at step 64
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "build" / "train_sae" / "std.checkpoint.npz").is_file()
    resumed = _run(config)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    for slug in ("std", "ne"):
        a, b = (tmp_path / run / "build" / "train_sae" for run in ("straight", "killed"))
        weights = [(run / slug / "sae_weights.safetensors").read_bytes() for run in (a, b)]
        assert weights[0] == weights[1]
        assert json.loads((a / f"{slug}.evaluation.json").read_text()) == json.loads(
            (b / f"{slug}.evaluation.json").read_text())
        assert not (b / f"{slug}.checkpoint.npz").exists()


BAD_TABLES = [
    ({"hook": "blocks.9.mlp.hook_post"}, "not in", "hook"),
    ({"hook": "blocks.1.hook_nowhere"}, "not in", "hook"),
    ({"l1": -0.1}, "l1", "0 or more"),
    ({"ne": -1.0}, "ne", "0 or more"),
    ({"training_tokens": 4}, "training_tokens", "one batch"),
    ({"warmup": 3}, "unknown [[train_sae]] key", "warmup_steps"),
    ({"training_tokens": 10 ** 7}, "train_data_files give", "lower training_tokens"),
]


@pytest.mark.parametrize("change,first,second", BAD_TABLES)
def test_bad_training_settings_are_one_line_and_write_no_sae(tmp_path, tiny_gpt2, corpus_file, change, first, second):
    table = {**TABLES[0], **change}
    result = _run(_toml(tmp_path, tiny_gpt2, corpus_file, tables=[table]))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and first in message and second in message, result.stderr[-1500:]
    assert not list((tmp_path / "build").rglob("sae_weights.safetensors"))


def test_a_missing_training_corpus_is_one_line(tmp_path, tiny_gpt2, corpus_file):
    config = _toml(tmp_path, tiny_gpt2, corpus_file)
    config.write_text(config.read_text().replace(f'train_data_files = ["{corpus_file}"]',
                                                 f'train_data_files = ["{tmp_path / "absent.jsonl"}"]'))
    result = _run(config)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "absent.jsonl" in result.stderr.strip().splitlines()[-1]


def test_train_sae_tables_need_a_training_corpus(tmp_path):
    from builder.errors import ConfigError

    raw = tiny_config_dict("m", tmp_path / "c.jsonl", tmp_path, train_sae=[{"slug": "a", "hook": HOOK}])
    expect_error(ConfigError, lambda: config_from_dict(raw), "train_data_files")
    raw = {**raw, "train_data_files": ["t.txt"], "sae": [{"path": "x", "slug": "a"}]}
    expect_error(ConfigError, lambda: config_from_dict(raw), "own slug")
