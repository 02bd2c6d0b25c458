"""`make bench-scale`'s driver: each part's figures are printed beside their targets and saved with their measured
points (the parts' own computations are tested in test_collect, test_importance and test_render)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from builder.scale.__main__ import figures, human, main


def test_the_driver_prints_each_figure_beside_its_target_and_saves_the_results(tmp_path):
    result = CliRunner().invoke(main, ["--quick", "--part", "index", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "results.json").read_text())
    entries = list(figures(saved["index"]))
    assert len(entries) == 2 and all("target" in e for e in entries)
    for entry in entries:
        assert entry["name"] in result.output
        assert f"target {human(entry['target'], entry['unit'])}: {'met' if entry['met'] else 'NOT MET'}" in \
            result.output
        assert entry["met"] == (entry["value"] <= entry["target"])


def test_bytes_are_shown_in_decimal_units():
    assert [human(v, "B") for v in (999, 1_500, 27_127, 2.5e6, 1e9)] == ["999 B", "1.5 KB", "27.1 KB", "2.5 MB",
                                                                         "1 GB"]
