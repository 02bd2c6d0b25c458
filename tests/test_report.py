"""The embedding comparison report runs end to end on the embedded model slice used in the tests."""

from __future__ import annotations

import numpy as np
import pytest

from builder.cluster import cluster_neuron
from builder.config import EMBEDDED_MODEL, config_from_dict
from builder.paths import AtlasPaths
from builder.schema import read_examples, read_metrics_table, read_report
from builder.stage import run_stage


@pytest.mark.slow
def test_report_compares_pre_mlp_and_embedding_clusterings_on_the_embedded_slice(
        tmp_path, embedded_corpus, share_embedded_model):
    cfg = config_from_dict({"model": EMBEDDED_MODEL, "data_files": [str(embedded_corpus)], "device": "cpu",
                            "context_length": 32, "max_sequences": 24, "layers": [0, 5], "workers": 1,
                            "out_dir": str(tmp_path / "build"), "site_dir": str(tmp_path / "site")})
    for stage in ("collect", "embed", "cluster", "report"):
        run_stage(stage, cfg)
    paths = AtlasPaths.of(cfg)
    result = read_report(paths)
    table = read_metrics_table(paths)
    ours = result["spaces"]["embedding"]
    assert ours["median_intra"] == pytest.approx(np.nanmedian(table["intra_distance"]))
    assert ours["median_inter"] == pytest.approx(np.nanmedian(table["inter_distance"]))
    # the pre-MLP column really clusters raw vectors: recompute it for layer 0 independently
    examples = read_examples(paths, f"L{0}")
    intra = [cluster_neuron(examples.unit_vectors(n), cfg.cluster_threshold).metrics["intra_distance"]
             for n in range(len(examples.offsets) - 1)]
    layer5 = read_examples(paths, f"L{5}")
    intra += [cluster_neuron(layer5.unit_vectors(n), cfg.cluster_threshold).metrics["intra_distance"]
              for n in range(len(layer5.offsets) - 1)]
    assert result["spaces"]["pre_mlp"]["median_intra"] == pytest.approx(np.nanmedian(intra))
