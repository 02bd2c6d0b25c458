"""Everything render reads, through the schema module only: the atlas-wide inputs once, each subject set's arrays
when its pages are written."""

from __future__ import annotations


import os
from dataclasses import asdict, dataclass

import numpy as np

from builder import schema
from builder.config import AtlasConfig
from builder.errors import ArtefactError, ModelError
from builder.paths import AtlasPaths
from builder.render.codec import token_dtype
from builder.render.text import clean_text
from builder.subjects import SubjectIndex, SubjectSet


@dataclass
class Atlas:
    """Everything atlas-wide the pages need, read once."""

    cfg: AtlasConfig
    meta: dict  # collect's meta
    index: SubjectIndex
    tokens: np.ndarray
    metrics: dict[str, np.ndarray]
    neighbours: dict[str, np.ndarray]
    report: dict
    histogram_edges: np.ndarray
    vocab: list[str]
    digest: dict[str, np.ndarray]  # per feature of the neighbours table: what a similar-feature link shows
    common: np.ndarray  # the token ids every page shares (data/common.json), most shown first
    dictionaries: dict[str, dict[str, np.ndarray]]  # per SAE set: embed's dictionary tools (builder/dictionary.py)
    evaluations: dict[str, dict]  # per SAE set: its evaluation on the corpus (builder/evaluate.py)
    # per trained SAE set ([[train_sae]]): its table, held-out evaluation and training log (builder/train_sae)
    training: dict[str, dict]

    @property
    def sets(self) -> list[SubjectSet]:
        return self.index.sets

    @property
    def n_units(self) -> int:
        return len(self.index)


def load_atlas(cfg: AtlasConfig, vocabulary: list[str] | None = None) -> Atlas:
    paths = AtlasPaths.of(cfg)
    meta = schema.read_collect_meta(paths)
    index = SubjectIndex(schema.collect_sets(meta))
    tokens = schema.read_tokens(paths)
    metrics = schema.read_metrics_table(paths)
    order = list(zip(metrics["set_index"].tolist(), metrics["unit"].tolist()))
    if order != [(i, u) for i, s in enumerate(index.sets) for u in range(s.size)]:
        raise ArtefactError("the cluster metrics table does not list this atlas's units in order; re-run "
                            "`atlas cluster`")
    metrics = {**metrics, "density": np.concatenate([density(schema.read_example_fields(paths, s.key, (
        "histogram", "histogram_edges"))) for s in index.sets]) if index.sets else np.zeros(0)}
    neighbours = schema.read_neighbours(paths)
    report = schema.read_report(paths)
    edges = (schema.read_example_fields(paths, index.keys[0], ("histogram_edges",))["histogram_edges"]
             if index.sets else schema.HISTOGRAM_EDGES)
    if vocabulary is None:
        vocabulary = load_vocabulary(cfg, int(tokens.max()) + 1 if tokens.size else 0)
    return Atlas(cfg=cfg, meta=meta, index=index, tokens=tokens, metrics=metrics, neighbours=neighbours,
                 report=report, histogram_edges=np.asarray(edges, np.float64),
                 vocab=[clean_text(str(token)) for token in vocabulary],
                 digest=feature_digest(paths, index.sets, tokens),
                 common=common_tokens(paths, index.sets, tokens, cfg.window_before, cfg.window_after),
                 dictionaries={s.key: schema.DICTIONARY.read_npz(paths.dictionary(s.key))
                               for s in index.sets if s.kind == "sae"},
                 evaluations={s.key: schema.EVALUATION.read_json(paths.evaluation(s.key))
                              for s in index.sets if s.kind == "sae"},
                 training=load_training(cfg, paths, index.keys))


def load_training(cfg: AtlasConfig, paths: AtlasPaths, keys: list[str]) -> dict[str, dict]:
    """Per trained SAE in the atlas: its [[train_sae]] settings, held-out evaluation and training log."""
    return {spec.slug: {"settings": asdict(spec),
                        "evaluation": schema.TRAINING_EVALUATION.read_json(paths.trained(spec.slug, "evaluation.json")),
                        "log": schema.TRAINING_LOG.read_npz(paths.trained(spec.slug, "log.npz"))}
            for spec in cfg.train_sae if spec.slug in keys}


def density(fields: dict[str, np.ndarray]) -> np.ndarray:
    """Each unit's share of the dataset's tokens with an activation above 0, from its histogram (bin b holds
    (edges[b - 1], edges[b]]; one edge is exactly 0, so the bins after it hold exactly the positive values)."""
    histogram, edges = fields["histogram"], fields["histogram_edges"]
    zero = int(np.flatnonzero(edges == 0)[0])
    totals = histogram.sum(axis=1)
    return histogram[:, zero + 1:].sum(axis=1) / np.maximum(totals, 1)


COMMON_TOKENS = 8192  # the most frequent tokens of the atlas's windows: fetched once (≈ 77 KB at GPT-2 scale), cached


def common_tokens(paths: AtlasPaths, sets: list[SubjectSet], tokens: np.ndarray, before: int,
                  after: int) -> np.ndarray:
    """The COMMON_TOKENS token ids shown most often in the atlas's example windows, most shown first (ties: lower
    id; small indices for frequent tokens also compress better): every page shares them through one file, so a
    sidecar carries only the strings of its rarer tokens."""
    counts = np.zeros(int(tokens.max()) + 1 if tokens.size else 0, np.int64)
    for s in sets:
        examples = schema.read_example_fields(paths, s.key, ("seq", "pos", "interval_seq", "interval_pos"))
        for seq, pos in ((examples["seq"], examples["pos"]),
                         (examples["interval_seq"].reshape(-1), examples["interval_pos"].reshape(-1))):
            window = windows_of(tokens, seq, pos, before, after, np.dtype("<u4"))
            shown = window[window != np.iinfo(np.uint32).max]
            counts += np.bincount(shown, minlength=len(counts))[:len(counts)]
    used = np.flatnonzero(counts)
    return used[np.lexsort((used, -counts[used]))][:COMMON_TOKENS]


SNIPPET_BEFORE, SNIPPET_AFTER = 3, 1  # tokens around the max token in a similar feature's snippet


def feature_digest(paths: AtlasPaths, sets: list[SubjectSet], tokens: np.ndarray) -> dict[str, np.ndarray]:
    """For every feature (sets, units, clusters in order, as the neighbours table lists them): its central example's
    max token in context (`snippet` [F, SNIPPET_BEFORE + 1 + SNIPPET_AFTER] token ids, int64's maximum outside the
    sequence),
    its most frequent max token with its count (ties: first in corpus order) and its size."""
    parts: dict[str, list[np.ndarray]] = {"snippet": [], "top_token": [], "top_count": [], "size": []}
    for s in sets:
        examples = schema.read_example_fields(paths, s.key, ("seq", "pos", "offsets"))
        clusters = schema.read_clusters(paths, s.key)
        seq, pos = examples["seq"].astype(np.int64), examples["pos"].astype(np.int64)
        central = clusters["cluster_central"].astype(np.int64)
        parts["snippet"].append(windows_of(tokens, seq[central], pos[central], SNIPPET_BEFORE, SNIPPET_AFTER,
                                           np.dtype("<i8")))
        # Global cluster id of every example; the most frequent (cluster, max token) pair per cluster, first on ties.
        owner = np.repeat(np.arange(s.size), np.diff(examples["offsets"]))
        gid = clusters["cluster_offsets"][owner] + clusters["labels"]
        token = tokens[seq, pos].astype(np.int64)
        pairs, first, counts = np.unique(np.stack([gid, token], 1), axis=0, return_index=True, return_counts=True)
        order = np.lexsort((first, -counts, pairs[:, 0]))
        pairs, counts = pairs[order], counts[order]
        lead = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]] if len(pairs) else np.zeros(0, bool)
        top_token = np.full(len(central), -1, np.int64)
        top_count = np.zeros(len(central), np.int64)
        top_token[pairs[lead, 0]], top_count[pairs[lead, 0]] = pairs[lead, 1], counts[lead]
        parts["top_token"].append(top_token)
        parts["top_count"].append(top_count)
        parts["size"].append(clusters["cluster_size"].astype(np.int64))
    width = SNIPPET_BEFORE + 1 + SNIPPET_AFTER
    return {name: (np.concatenate(values) if values else np.zeros((0, width) if name == "snippet" else 0, np.int64))
            for name, values in parts.items()}


def load_vocabulary(cfg: AtlasConfig, min_size: int = 0) -> list[str]:
    """Every token id's display string, `tokenizer.decode([id])`, from the model's tokenizer only (no weights).
    Ids the tokenizer lacks (a padded embedding matrix) read as `<id>`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from builder.models import hub_options, resolve_model_source

    source, local = resolve_model_source(cfg.model)
    options = {} if local else {"revision": cfg.model_revision, **hub_options(cfg.model, cfg.model_revision)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer of {cfg.model!r} ({str(error).splitlines()[0]}); check the "
                         "model name or run with network access once") from None
    size = len(tokenizer)
    strings = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    return list(strings) + [f"<{i}>" for i in range(size, max(size, min_size))]


@dataclass
class SetData:
    """One subject set's arrays, as its pages need them."""

    subject: SubjectSet
    offsets: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    act: np.ndarray
    window: np.ndarray  # [n_ex, W] float32, NaN outside the sequence
    window_tokens: np.ndarray  # [n_ex, W] token ids, sentinel outside the sequence
    importance: np.ndarray  # [n_ex, window_before + 1]
    max_activation: np.ndarray
    histogram: np.ndarray
    labels: np.ndarray
    cluster_offsets: np.ndarray
    cluster_central: np.ndarray
    cluster_size: np.ndarray
    linkage_offsets: np.ndarray
    linkage: np.ndarray
    metric: dict[str, np.ndarray]
    logits: dict[str, np.ndarray]
    feature_start: np.ndarray  # [n_units + 1] rows of the neighbours feature table per unit
    interval_seq: np.ndarray  # [n_units, n_intervals, k] sequence of each interval example, -1 where none
    interval_pos: np.ndarray
    interval_act: np.ndarray
    interval_tokens: np.ndarray  # [n_units, n_intervals, k, W] window token ids, sentinel outside


def load_set(atlas: Atlas, subject: SubjectSet) -> SetData:
    paths = AtlasPaths.of(atlas.cfg)
    examples = schema.read_example_fields(paths, subject.key, ("offsets", "seq", "pos", "act", "window",
                                                                "max_activation", "histogram", "interval_seq",
                                                                "interval_pos", "interval_act"))
    logits = schema.read_logits(paths, subject.key)
    clusters = schema.read_clusters(paths, subject.key)
    scores = schema.read_importance(paths, subject.key)["importance"]
    n_ex = int(examples["offsets"][-1])
    wb, wa = atlas.cfg.window_before, atlas.cfg.window_after
    window = examples["window"]
    if (len(examples["offsets"]) != subject.size + 1 or window.shape != (n_ex, wb + 1 + wa)
            or scores.shape != (n_ex, wb + 1) or len(clusters["labels"]) != n_ex
            or len(clusters["cluster_offsets"]) != subject.size + 1):
        raise ArtefactError(f"{subject.key}: the collect, cluster and importance artefacts disagree in shape (window "
                            f"{window.shape}, importance {scores.shape}); re-run `atlas build` with this config")
    dtype = np.dtype(f"<{token_dtype(len(atlas.vocab))}")
    window_tokens = windows_of(atlas.tokens, examples["seq"], examples["pos"], wb, wa, dtype)
    interval_seq = examples["interval_seq"]
    interval_tokens = windows_of(atlas.tokens, interval_seq.reshape(-1), examples["interval_pos"].reshape(-1), wb, wa,
                                 dtype).reshape(*interval_seq.shape, wb + 1 + wa)
    inside = window_tokens != np.iinfo(dtype).max
    return SetData(
        subject=subject, offsets=examples["offsets"].astype(np.int64), seq=examples["seq"], pos=examples["pos"],
        act=examples["act"], window=np.where(inside, window, np.nan).astype(np.float32),
        window_tokens=window_tokens, importance=scores,
        max_activation=examples["max_activation"], histogram=examples["histogram"], labels=clusters["labels"],
        cluster_offsets=clusters["cluster_offsets"].astype(np.int64),
        cluster_central=clusters["cluster_central"].astype(np.int64), cluster_size=clusters["cluster_size"],
        linkage_offsets=clusters["linkage_offsets"].astype(np.int64), linkage=clusters["linkage"],
        metric={name: clusters[name] for name in schema.METRIC_NAMES}, logits=logits,
        feature_start=feature_rows(atlas, subject, clusters),
        interval_seq=interval_seq, interval_pos=examples["interval_pos"], interval_act=examples["interval_act"],
        interval_tokens=interval_tokens)


def windows_of(tokens: np.ndarray, seq: np.ndarray, pos: np.ndarray, before: int, after: int,
               dtype: np.dtype) -> np.ndarray:
    """[n, before + 1 + after] token ids around (seq, pos), the dtype's maximum outside the sequence (or where seq
    is -1: no example)."""
    context = tokens.shape[1]
    positions = pos.astype(np.int64)[:, None] + np.arange(-before, after + 1)[None, :]
    inside = (positions >= 0) & (positions < context) & (seq >= 0)[:, None]
    gathered = tokens[np.clip(seq.astype(np.int64), 0, None)[:, None], np.clip(positions, 0, context - 1)]
    return np.where(inside, gathered, np.iinfo(dtype).max).astype(dtype)


def feature_rows(atlas: Atlas, subject: SubjectSet, clusters: dict[str, np.ndarray]) -> np.ndarray:
    """[n_units + 1] CSR into the neighbours feature table for this set, checked against the cluster artefact."""
    table = atlas.neighbours
    owner = atlas.index.rows_of(table["feature_set"], table["feature_unit"])
    rows = atlas.index.rows(subject.key)
    start = np.searchsorted(owner, np.arange(rows.start, rows.stop + 1, dtype=np.int64), side="left")
    counts = np.diff(start)
    ordered = bool(np.all(np.diff(owner) >= 0)) if len(owner) else True
    if not ordered or not np.array_equal(counts, np.diff(clusters["cluster_offsets"])):
        raise ArtefactError(f"the neighbours artefact does not match {subject.key}'s clusters (feature counts "
                            "differ); re-run `atlas neighbours`")
    span = slice(int(start[0]), int(start[-1]))
    local = table["feature_cluster"][span].astype(np.int64)
    within = np.arange(len(local)) - np.repeat(start[:-1] - start[0], counts)
    if not np.array_equal(local, within):
        raise ArtefactError(f"the neighbours artefact lists {subject.key}'s features out of order; re-run "
                            "`atlas neighbours`")
    return start.astype(np.int64)
