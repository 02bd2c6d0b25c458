"""The bulk Parquet files (builder/bulk.py, docs/bulk-data.md) of a real tiny build (layer 1's neurons and an SAE's
latents): every column against the render inputs and artefacts by a literal loop, the same bytes when written
twice, loadable with pandas and `datasets`, and written atomically."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from builder.bulk import write_bulk
from builder.errors import ArtefactError, AtlasError
from builder.schema import METRIC_NAMES
from conftest import SAE_SLUG, expect_error


def same(left, right) -> bool:
    """Equal values, NaN equal to NaN (None for a null list)."""
    if left is None or right is None:
        return left is None and right is None
    left, right = np.asarray(left, np.float64), np.asarray(right, np.float64)
    return left.shape == right.shape and bool(np.all((left == right) | (np.isnan(left) & np.isnan(right))))


def test_every_column_matches_the_render_inputs_and_artefacts_row_by_row(sae_build, tmp_path):
    from builder.render.inputs import load_atlas, load_set

    files = write_bulk(sae_build, tmp_path / "bulk")
    atlas = load_atlas(sae_build)
    assert [s.key for s in atlas.sets] == ["L1", SAE_SLUG]
    assert [f.name for f in files] == [f"{s.slug}.{kind}.parquet" for s in atlas.sets
                                       for kind in ("examples", "metrics", "sequences")]
    wb, wa = sae_build.window_before, sae_build.window_after
    context = atlas.tokens.shape[1]
    for position, subject in enumerate(atlas.sets):
        data = load_set(atlas, subject)
        sentinel = np.iinfo(data.window_tokens.dtype).max
        expected = []
        for unit in range(subject.size):
            start, stop = int(data.offsets[unit]), int(data.offsets[unit + 1])
            centrals = set(data.cluster_central[int(data.cluster_offsets[unit]):int(data.cluster_offsets[unit + 1])])
            for i, e in enumerate(range(start, stop)):
                window = []
                for j in range(wb + 1 + wa):
                    p = int(data.pos[e]) - wb + j
                    window.append(int(atlas.tokens[data.seq[e], p]) if 0 <= p < context else -1)
                # render's own window (its sentinel outside the sequence) says the same
                assert window == [-1 if t == sentinel else int(t) for t in data.window_tokens[e]]
                expected.append((unit, i, -1, int(data.labels[e]), e in centrals, int(data.seq[e]), int(data.pos[e]),
                                 float(data.act[e]), window, list(data.window[e]), list(data.importance[e])))
            i = 0
            for interval in range(data.interval_seq.shape[1]):
                for k in range(data.interval_seq.shape[2]):
                    seq = int(data.interval_seq[unit, interval, k])
                    if seq < 0:
                        continue
                    pos = int(data.interval_pos[unit, interval, k])
                    window = [int(atlas.tokens[seq, p]) if 0 <= p < context else -1
                              for p in range(pos - wb, pos + wa + 1)]
                    expected.append((unit, i, interval, -1, False, seq, pos,
                                     float(data.interval_act[unit, interval, k]), window, None, None))
                    i += 1
        frame = pd.read_parquet(tmp_path / "bulk" / f"{subject.slug}.examples.parquet")
        assert list(frame.columns) == ["unit", "example", "interval", "feature", "central", "sequence", "position",
                                       "activation", "window_tokens", "window_activations", "importance"]
        assert len(frame) == len(expected) and len(expected) > subject.size
        assert (frame["interval"] >= 0).any() and frame["central"].sum() == len(data.cluster_central)
        for row, want in zip(frame.itertuples(index=False), expected):
            assert tuple(row[:7]) == want[:7], (subject.key, want[:7])
            assert row.activation == np.float32(want[7])
            assert list(row.window_tokens) == want[8]
            assert same(row.window_activations, want[9]) and same(row.importance, want[10]), (subject.key, want[:7])

        metrics = pd.read_parquet(tmp_path / "bulk" / f"{subject.slug}.metrics.parquet")
        rows = atlas.index.rows(subject.key)
        assert list(metrics["unit"]) == list(range(subject.size))
        assert list(metrics.columns) == ["unit", "max_activation", "density", *METRIC_NAMES]
        for name in metrics.columns[1:]:
            assert same(metrics[name], atlas.metrics[name][rows]), name
        for name in METRIC_NAMES:  # the cluster artefact's own copy of the table
            assert same(metrics[name], data.metric[name]), name
        assert metrics["n_examples"].dtype == np.int32 and list(metrics["n_examples"]) == list(np.diff(data.offsets))

        sequences = pd.read_parquet(tmp_path / "bulk" / f"{subject.slug}.sequences.parquet")
        last: dict[int, int] = {}
        for want in expected:
            last[want[5]] = max(last.get(want[5], -1), want[6])
        assert list(sequences["sequence"]) == sorted(last)
        assert any(last[s] < context - 1 for s in last)  # some sequences really are cut after their last max token
        for seq, tokens in zip(sequences["sequence"], sequences["tokens"]):
            assert list(tokens) == [int(t) for t in atlas.tokens[seq, :last[seq] + 1]]
        # every example's prefix ends on its max token, the window's element B
        prefix = dict(zip(sequences["sequence"], sequences["tokens"]))
        for want in expected:
            assert int(prefix[want[5]][:want[6] + 1][-1]) == want[8][wb]


def test_the_same_artefacts_give_the_same_bytes(sae_build, tmp_path):
    first = write_bulk(sae_build, tmp_path / "a")
    second = write_bulk(sae_build, tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 6
    for a, b in zip(first, second):
        assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest(), a.name
    import pyarrow.parquet as pq

    described = json.loads(pq.read_schema(first[0]).metadata[b"atlas"])
    assert described == {"kind": "examples", "schema_version": 1, "model": sae_build.name, "set": "L1",
                         "window": {"before": sae_build.window_before, "after": sae_build.window_after}}


def test_the_files_load_with_pandas_and_datasets_as_documented(sae_build, tmp_path):
    import datasets

    write_bulk(sae_build, tmp_path / "bulk")
    for name in ("L1.examples.parquet", f"{SAE_SLUG}.metrics.parquet", f"{SAE_SLUG}.sequences.parquet"):
        path = str(tmp_path / "bulk" / name)
        frame = pd.read_parquet(path)
        table = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
        assert table.column_names == list(frame.columns) and len(table) == len(frame) > 0
        for column in frame.columns:
            values = table[column]
            for mine, theirs in zip(frame[column], values):
                if isinstance(theirs, list) or theirs is None:
                    assert same(None if mine is None else list(mine), theirs), (name, column)
                else:
                    assert mine == theirs or (math.isnan(mine) and math.isnan(theirs)), (name, column)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(sae_build, tmp_path, monkeypatch):
    import builder.bulk

    folder = tmp_path / "bulk"
    good = {p.name: p.read_bytes() for p in write_bulk(sae_build, folder)}
    real = builder.bulk.pq.write_table
    calls = []

    def dies_midway(table, where, **options):
        calls.append(where)
        if len(calls) == 2:  # the second file: half written, then the disk fails
            Path(where).write_bytes(b"PAR1 half")
            raise OSError(5, "Input/output error")
        real(table, where, **options)

    monkeypatch.setattr(builder.bulk.pq, "write_table", dies_midway)
    expect_error(AtlasError, lambda: write_bulk(sae_build, folder), "cannot write", "L1.metrics.parquet")
    assert sorted(p.name for p in folder.iterdir()) == sorted(good)  # no temporary file left behind
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == good


def test_an_unbuilt_atlas_stops_with_one_line(make_config, tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, "unbuilt")
    expect_error(ArtefactError, lambda: write_bulk(cfg, tmp_path / "bulk"), "missing", "atlas build")
    assert not (tmp_path / "bulk").exists()
