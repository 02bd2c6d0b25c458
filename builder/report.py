"""The embedding comparison (the paper's Table 1): cluster the same examples on raw pre-MLP vectors instead of
neuron embeddings (with the build's `cluster_method` and `cluster_threshold`, as cluster does) and compare the median
intra- and inter-cluster distances over all neurons.

Medians are over neurons where the metric is defined (intra needs a cluster with two members, inter two clusters).
"""

from __future__ import annotations

import logging

import numpy as np

from builder.cluster import cluster_set
from builder.schema import REPORT, collect_sets, read_collect_meta, read_metrics_table, read_report
from builder.stage import StageRun, progress

log = logging.getLogger(__name__)

# Reported for GPT-2 small in the paper; shown beside ours, never tuned towards.
PAPER = {"pre_mlp": {"median_intra": 0.31, "median_inter": 0.63},
         "embedding": {"median_intra": 0.21, "median_inter": 0.73}}


def summary(intra: np.ndarray, inter: np.ndarray) -> dict:
    return {"median_intra": _median(intra), "median_inter": _median(inter),
            "n_neurons_intra": int(np.isfinite(intra).sum()), "n_neurons_inter": int(np.isfinite(inter).sum())}


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if len(finite) else None


def build(run: StageRun) -> dict:
    cfg, paths = run.cfg, run.paths
    sets = collect_sets(read_collect_meta(paths))
    embedding = read_metrics_table(paths)
    intra, inter = [], []
    with progress(total=sum(s.size for s in sets), desc="report", unit="unit") as bar:
        for s in sets:
            results = cluster_set(cfg, s, "pre_mlp", bar)
            intra.extend(r.metrics["intra_distance"] for r in results)
            inter.extend(r.metrics["inter_distance"] for r in results)
    report = {"cluster_threshold": cfg.cluster_threshold, "cluster_method": cfg.cluster_method,
              "spaces": {"pre_mlp": summary(np.array(intra), np.array(inter)),
                         "embedding": summary(embedding["intra_distance"], embedding["inter_distance"])},
              "paper": PAPER}
    run.write_json(REPORT, paths.report, report)
    print_report(read_report(paths))
    return {}


def print_report(report: dict) -> None:
    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    log.info("%-18s %8s %8s   %s", "space", "intra", "inter", "(paper, GPT-2 small)")
    for space, label in (("pre_mlp", "pre-MLP vectors"), ("embedding", "neuron embeddings")):
        ours, paper = report["spaces"][space], report["paper"][space]
        log.info("%-18s %8s %8s   (%.2f / %.2f)", label, cell(ours["median_intra"]), cell(ours["median_inter"]),
                 paper["median_intra"], paper["median_inter"])
