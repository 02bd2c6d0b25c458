"""The atlas's bulk data (docs/bulk-data.md): per subject set, three flat Parquet files, `{slug}.examples.parquet`
(every example), `{slug}.metrics.parquet` (the metrics table) and `{slug}.sequences.parquet` (the tokens of every
sequence an example is on, up to its last max token), for `atlas release` (builder/release.py) to freeze beside the
site's data files. Read from the artefacts through the schema module only; the same artefacts give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from builder import schema
from builder.artefacts import atomic_path
from builder.config import AtlasConfig
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.render.inputs import density, windows_of
from builder.subjects import SubjectSet

BULK_SCHEMA_VERSION = 1  # every bulk file's, in its Parquet metadata under "atlas"; a meaning change bumps it
BULK_FILES = ("examples", "metrics", "sequences")
OUTSIDE_TOKEN = -1  # a window position outside its sequence
NOT_AN_INTERVAL = -1  # the `interval` of an example at or above the threshold
# zstd at a fixed level: pandas, `datasets` and every Arrow reader decode it; no timestamps, so bytes are reproducible.
COMPRESSION, COMPRESSION_LEVEL = "zstd", 9


def write_bulk(cfg: AtlasConfig, folder: Path) -> list[Path]:
    """Write every subject set's bulk files into `folder` (each atomically); returns their paths, set by set."""
    paths = AtlasPaths.of(cfg)
    sets = schema.collect_sets(schema.read_collect_meta(paths))
    tokens = schema.read_tokens(paths)
    metrics = schema.read_metrics_table(paths)
    written = []
    for position, subject in enumerate(sets):
        examples = examples_table(cfg, paths, subject, tokens)
        tables = {"examples": examples, "metrics": metrics_table(paths, subject, position, metrics),
                  "sequences": sequences_table(examples, tokens)}
        for kind in BULK_FILES:
            path = Path(folder) / f"{subject.slug}.{kind}.parquet"
            described = {"kind": kind, "schema_version": BULK_SCHEMA_VERSION, "model": cfg.name, "set": subject.key,
                         "window": {"before": cfg.window_before, "after": cfg.window_after}}
            table = tables[kind].replace_schema_metadata({"atlas": json.dumps(described, sort_keys=True)})
            with atomic_path(path) as tmp:
                pq.write_table(table, str(tmp), compression=COMPRESSION, compression_level=COMPRESSION_LEVEL)
            written.append(path)
    return written


def examples_table(cfg: AtlasConfig, paths: AtlasPaths, subject: SubjectSet, tokens: np.ndarray) -> pa.Table:
    """One row per example: each unit's examples at or above the threshold (the sidecar's `examples`, in corpus
    order), then its examples below it (the sidecar's `intervals`, by interval, then corpus order)."""
    fields = schema.read_example_fields(paths, subject.key, ("offsets", "seq", "pos", "act", "window",
                                                             "interval_seq", "interval_pos", "interval_act"))
    clusters = schema.read_clusters(paths, subject.key)
    importance = schema.read_importance(paths, subject.key)["importance"]
    offsets = fields["offsets"].astype(np.int64)
    n = int(offsets[-1])
    wb, wa = cfg.window_before, cfg.window_after
    if (len(offsets) != subject.size + 1 or fields["window"].shape != (n, wb + 1 + wa)
            or importance.shape != (n, wb + 1) or len(clusters["labels"]) != n):
        raise ArtefactError(f"{subject.key}: the collect, cluster and importance artefacts disagree in shape; re-run "
                            "`atlas build` with this config")
    central = np.zeros(n, bool)
    central[clusters["cluster_central"].astype(np.int64)] = True
    # Below-threshold examples: np.nonzero walks [unit, interval, rank] in the order the sidecar lists them.
    present = fields["interval_seq"] >= 0
    i_unit, i_interval, _ = np.nonzero(present)
    i_counts = np.bincount(i_unit, minlength=subject.size)
    unit = np.r_[np.repeat(np.arange(subject.size), np.diff(offsets)), i_unit]
    example = np.r_[np.arange(n) - np.repeat(offsets[:-1], np.diff(offsets)),
                    np.arange(len(i_unit)) - np.repeat(np.r_[0, np.cumsum(i_counts)[:-1]], i_counts)]
    interval = np.r_[np.full(n, NOT_AN_INTERVAL), i_interval]
    seq = np.r_[fields["seq"], fields["interval_seq"][present]].astype(np.int64)
    pos = np.r_[fields["pos"], fields["interval_pos"][present]].astype(np.int64)
    window_tokens = windows_of(tokens, seq, pos, wb, wa, np.dtype("<i8"))
    outside = window_tokens == np.iinfo(np.int64).max
    window = np.r_[fields["window"], np.full((len(i_unit), wb + 1 + wa), np.nan, np.float32)]
    scores = np.r_[importance, np.full((len(i_unit), wb + 1), np.nan, np.float32)]
    threshold_row = np.r_[np.ones(n, bool), np.zeros(len(i_unit), bool)]
    order = np.lexsort((~threshold_row, unit))  # stable: within a unit, threshold examples first, each in order
    return pa.table({
        "unit": pa.array(unit[order], pa.int32()),
        "example": pa.array(example[order], pa.int32()),
        "interval": pa.array(interval[order], pa.int32()),
        "feature": pa.array(np.r_[clusters["labels"], np.full(len(i_unit), -1)][order], pa.int32()),
        "central": pa.array(np.r_[central, np.zeros(len(i_unit), bool)][order], pa.bool_()),
        "sequence": pa.array(seq[order], pa.int32()),
        "position": pa.array(pos[order], pa.int32()),
        "activation": pa.array(np.r_[fields["act"], fields["interval_act"][present]][order], pa.float32()),
        "window_tokens": list_column(np.where(outside, OUTSIDE_TOKEN, window_tokens)[order],
                                     np.full(len(order), wb + 1 + wa), pa.int32()),
        # Collect keeps only the maximum of a below-threshold example, and importance scores none of them: null.
        "window_activations": list_column(np.where(outside, np.nan, window)[order],
                                          np.where(threshold_row[order], wb + 1 + wa, -1), pa.float32()),
        "importance": list_column(scores[order], np.where(threshold_row[order], wb + 1, -1), pa.float32()),
    })


def list_column(values: np.ndarray, lengths: np.ndarray, kind: pa.DataType) -> pa.Array:
    """A list<kind> column whose row i holds values[i, :lengths[i]] ([R, W] values); null where lengths[i] < 0."""
    kept = np.arange(values.shape[1])[None, :] < lengths[:, None]
    offsets = pa.array(np.r_[0, np.cumsum(np.maximum(lengths, 0))], pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values[kept], kind), mask=pa.array(lengths < 0, pa.bool_()))


def metrics_table(paths: AtlasPaths, subject: SubjectSet, position: int, metrics: dict[str, np.ndarray]) -> pa.Table:
    """One row per unit of the set: its maximum activation, density and polysemanticity metrics (NaN where
    undefined; counts as integers), as the unit table shows them unrounded."""
    rows = metrics["set_index"] == position
    if not np.array_equal(metrics["unit"][rows], np.arange(subject.size)):
        raise ArtefactError("the cluster metrics table does not list this atlas's units in order; re-run "
                            "`atlas cluster`")
    columns = {"unit": pa.array(metrics["unit"][rows], pa.int32()),
               "max_activation": pa.array(metrics["max_activation"][rows], pa.float32()),
               "density": pa.array(density(schema.read_example_fields(paths, subject.key, (
                   "histogram", "histogram_edges"))), pa.float64())}
    for name in schema.METRIC_NAMES:
        counts = name in schema.COUNT_METRICS
        columns[name] = pa.array(metrics[name][rows].astype(np.int32 if counts else np.float64),
                                 pa.int32() if counts else pa.float64())
    return pa.table(columns)


def sequences_table(examples: pa.Table, tokens: np.ndarray) -> pa.Table:
    """One row per sequence any example of the set is on (ascending): its tokens up to the last position an example
    has its max token at, so every example's model input is `tokens[:position + 1]`."""
    seq = examples["sequence"].to_numpy()
    pos = examples["position"].to_numpy()
    sequences, owner = np.unique(seq, return_inverse=True)
    last = np.full(len(sequences), -1, np.int64)
    np.maximum.at(last, owner, pos)
    return pa.table({"sequence": pa.array(sequences, pa.int32()),
                     "tokens": list_column(tokens[sequences], last + 1, pa.int32())})
