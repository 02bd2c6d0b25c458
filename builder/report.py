"""The embedding comparison (the paper's Table 1): cluster the same examples on raw pre-MLP vectors instead of
neuron embeddings and compare the median intra- and inter-cluster distances over all neurons.

Medians are over neurons where the metric is defined (intra needs a cluster with two members, inter two clusters).
"""

from __future__ import annotations

import logging

import numpy as np

from builder import __version__
from builder.artefacts import read_json, write_json
from builder.cluster import cluster_layer, read_metrics_table
from builder.collect import read_collect_meta
from builder.config import AtlasConfig
from builder.paths import AtlasPaths
from builder.stage import peak_rss_mb, progress, stage_is_done, worker_count

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "comparison-report"
# Reported for GPT-2 small in the paper; shown beside ours, never tuned towards.
PAPER = {"pre_mlp": {"median_intra": 0.31, "median_inter": 0.63},
         "embedding": {"median_intra": 0.21, "median_inter": 0.73}}


def summary(intra: np.ndarray, inter: np.ndarray) -> dict:
    return {"median_intra": _median(intra), "median_inter": _median(inter),
            "n_neurons_intra": int(np.isfinite(intra).sum()), "n_neurons_inter": int(np.isfinite(inter).sum())}


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if len(finite) else None


def run(cfg: AtlasConfig) -> None:
    paths = AtlasPaths.of(cfg)
    if stage_is_done(paths.report, KIND, SCHEMA_VERSION, cfg):
        log.info("report: up to date")
        print_report(read_json(paths.report, KIND, SCHEMA_VERSION))
        return
    meta = read_collect_meta(paths, cfg)
    embedding = read_metrics_table(paths)
    intra, inter = [], []
    with progress(total=len(meta["layers"]) * meta["d_mlp"], desc="report", unit="neuron") as bar:
        for layer in meta["layers"]:
            results = cluster_layer(paths, layer, meta["d_mlp"], "pre_mlp", cfg.cluster_threshold,
                                    worker_count(cfg), bar)
            intra.extend(r.metrics["intra_distance"] for r in results)
            inter.extend(r.metrics["inter_distance"] for r in results)
    report = {"kind": KIND, "schema_version": SCHEMA_VERSION, "config_hash": cfg.config_hash(),
              "code_version": __version__, "peak_rss_mb": peak_rss_mb(), "cluster_threshold": cfg.cluster_threshold,
              "spaces": {"pre_mlp": summary(np.array(intra), np.array(inter)),
                         "embedding": summary(embedding["intra_distance"], embedding["inter_distance"])},
              "paper": PAPER}
    write_json(paths.report, report)
    print_report(report)


def print_report(report: dict) -> None:
    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    log.info("%-18s %8s %8s   %s", "space", "intra", "inter", "(paper, GPT-2 small)")
    for space, label in (("pre_mlp", "pre-MLP vectors"), ("embedding", "neuron embeddings")):
        ours, paper = report["spaces"][space], report["paper"][space]
        log.info("%-18s %8s %8s   (%.2f / %.2f)", label, cell(ours["median_intra"]), cell(ours["median_inter"]),
                 paper["median_intra"], paper["median_inter"])
