"""`make bench` reads a finished build: its parts that read artefacts run on the tiny SAE build (two input spaces)."""

from __future__ import annotations

import re

import numpy as np

from builder import bench
from builder.paths import AtlasPaths
from builder.schema import NEIGHBOURS, collect_sets, read_collect_meta


def figure(output: str, label: str) -> str:
    found = re.search(re.escape(label) + r"\s+(.+)", output)
    assert found, output
    return found.group(1)


def test_bench_times_the_neighbours_search_of_the_largest_input_space(sae_build, capsys):
    bench.bench_neighbours(sae_build)
    output = capsys.readouterr().out
    paths = AtlasPaths.of(sae_build)
    sets = collect_sets(read_collect_meta(paths))
    feature_set = NEIGHBOURS.read_npz(paths.neighbours)["feature_set"]
    per_space: dict[str, int] = {}
    for position, s in enumerate(sets):
        per_space[s.space] = per_space.get(s.space, 0) + int(np.sum(feature_set == position))
    assert len(per_space) == 2  # the MLP layer's inputs and the residual stream
    assert int(figure(output, "dims)").replace(",", "")) == max(per_space.values())
    assert 0.0 <= float(figure(output, f"recall@{sae_build.neighbour_count} vs exact")) <= 1.0


def test_bench_reports_every_finished_stage_and_the_peak_memory(sae_build, capsys):
    bench.bench_render_and_memory(sae_build)
    output = capsys.readouterr().out
    for stage in ("collect", "embed", "cluster", "importance", "neighbours"):
        assert float(figure(output, f"stage wall time: {stage} (last run)").removesuffix(" s")) >= 0
    assert "MiB" in figure(output, "memory: peak RSS of the embedded build (limit 8 GiB)")
