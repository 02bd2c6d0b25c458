"""Pure builders of the published data files (docs/sidecar-schema.md): arrays in, plain JSON-ready dicts out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson

from builder import __version__
from builder.render.codec import (SCHEMA_VERSIONS, SIMILARITY_SCALE, Blob, activation_range, dumps,
                                  quantise_activations, quantise_importance, token_dtype, write_data_file)
from builder.render.inputs import SNIPPET_BEFORE, Atlas, SetData
from builder.render.reproduce import reproduce_templates
from builder.render.text import clean_text, display_token, fmt, has_bidi, number
from builder.schema import COUNT_METRICS, METRIC_NAMES
from builder.subjects import SubjectIndex, SubjectSet, UnitId

LOGIT_DIGITS = 4  # significant digits of a direct logit effect in the sidecar
HISTOGRAM_DIGITS = 4  # and of a histogram edge


def unit_path(model: str, subject: SubjectSet, unit: int) -> str:
    """The page of a unit relative to the site root, `{model}/{slug}/N{unit}/` (its features are sections of it:
    `pages.feature_path`)."""
    return f"{model}/{subject.slug}/N{unit}/"


def provenance(atlas: Atlas) -> dict:
    """Where the atlas's data comes from, as every page and sidecar shows it."""
    meta = atlas.meta
    dataset = meta.get("dataset", "")
    return {
        "model": clean_text(str(meta.get("model", atlas.cfg.model))),
        "model_revision": clean_text(str(meta.get("model_revision", ""))),
        "dataset": clean_text(", ".join(dataset) if isinstance(dataset, list) else str(dataset)),
        "n_sequences": int(meta["n_sequences"]),
        "n_tokens": int(meta["n_tokens"]),
        "threshold": meta["threshold"],
        "code_version": __version__,
        "config_hash": atlas.cfg.config_hash(),
        "build_date": clean_text(atlas.cfg.build_date or str(meta["build_date"])),
    }


def token_text(atlas: Atlas, token: int) -> str:
    return atlas.vocab[token] if token < len(atlas.vocab) else f"<{token}>"


def local_vocabulary(atlas: Atlas, *token_arrays: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A page's vocabulary: the atlas's common tokens (data/common.json), then the other token ids it shows (sorted);
    returns all those ids in that order and the strings of the others, the only ones its sidecar carries. So a page
    never downloads the model's whole vocabulary."""
    shown = np.unique(np.concatenate([a.reshape(-1).astype(np.int64) for a in token_arrays]))
    shown = shown[shown != np.iinfo(token_arrays[0].dtype).max]
    extra = np.setdiff1d(shown, atlas.common)
    return np.concatenate([atlas.common, extra]), [token_text(atlas, i) for i in extra.tolist()]


def to_local(tokens: np.ndarray, ids: np.ndarray, dtype: str) -> np.ndarray:
    """Model token ids -> indices into a page's vocabulary `ids`; the sentinel becomes the (local) dtype's maximum."""
    sentinel_in = np.iinfo(tokens.dtype).max
    order = np.argsort(ids, kind="stable")
    at = np.clip(np.searchsorted(ids[order], tokens.astype(np.int64)), 0, max(0, len(ids) - 1))
    local = order[at] if len(ids) else np.zeros_like(tokens, np.int64)
    return np.where(tokens == sentinel_in, np.iinfo(np.dtype(f"<{dtype}")).max, local)


def subject_sets(atlas: Atlas) -> list[str]:
    """The atlas's subject sets as `key:slug:layer:size:kind`, in order: how pages and data files list them."""
    return [f"{s.key}:{s.slug}:{s.layer}:{s.size}:{s.kind}" for s in atlas.sets]


def common_file(atlas: Atlas, definitions: dict[str, str], prov: dict) -> dict:
    """`common.json`: what every unit page shares: the strings of the tokens its vocabulary starts with, the
    metric definitions its tooltips show, the histogram edges, the subject sets, the provenance and each set's
    reproduce-script template (one copy per atlas, not per page)."""
    return {"schema_version": SCHEMA_VERSIONS["common"], "kind": "common", "model": atlas.cfg.name,
            "tokens": [token_text(atlas, i) for i in atlas.common.tolist()], "metrics": definitions,
            "histogram_edges": [number(e, HISTOGRAM_DIGITS) for e in atlas.histogram_edges],
            "sets": subject_sets(atlas), "provenance": prov, "reproduce": reproduce_templates(atlas)}


class UnitFiles(NamedTuple):
    """A unit's data files and its features' summaries (for its pages; token ids are the model's)."""

    neuron: dict  # neuron.json: what its page shows on load
    neuron_blob: Blob  # its neuron.bin
    similar: dict  # similar.json: its features' similar features, fetched when a reader opens them
    similar_blob: Blob
    summaries: list[dict]


def unit_sidecar(atlas: Atlas, data: SetData, unit: int) -> UnitFiles:
    """`neuron.json` (one unit, everything its page and its features' sections show) and `similar.json`."""
    cfg = atlas.cfg
    part = slice(int(data.offsets[unit]), int(data.offsets[unit + 1]))
    window = data.window[part]
    lo, hi = activation_range(window, float(data.max_activation[unit]))
    links = data.linkage[int(data.linkage_offsets[unit]):int(data.linkage_offsets[unit + 1])]
    hist_counts = data.histogram[unit]
    nonzero = np.flatnonzero(hist_counts)
    first, last = (int(nonzero[0]), int(nonzero[-1])) if len(nonzero) else (0, -1)
    interval_present = data.interval_seq[unit] >= 0  # [n_intervals, k]
    interval_tokens = data.interval_tokens[unit][interval_present]
    logit_ids = {side: data.logits[f"logit_{side}_ids"][unit] for side in ("top", "bottom")}
    ids, strings = local_vocabulary(atlas, data.window_tokens[part], interval_tokens, *logit_ids.values())
    dtype = token_dtype(len(ids) + 1)
    summaries = feature_summaries(data, unit, cfg.window_before)
    neighbours, neighbour_text = neighbour_rows(atlas, data, unit)
    clusters = slice(int(data.cluster_offsets[unit]), int(data.cluster_offsets[unit + 1]))
    centrals = data.cluster_central[clusters]
    maximum = float(data.max_activation[unit])
    n_intervals = data.interval_seq.shape[1]
    step = float(atlas.meta["threshold"]) * maximum / n_intervals if maximum > 0 else 0.0
    similar_counts = np.bincount(neighbours[:, 0], minlength=len(centrals)) if len(neighbours) else \
        np.zeros(len(centrals), np.int64)
    blob, similar_blob = Blob(), Blob()
    similar = {"schema_version": SCHEMA_VERSIONS["similar"], "kind": "similar", "model": cfg.name,
               "path": unit_path(cfg.name, data.subject, unit), "rows": similar_blob.pack(neighbours, "i4"),
               "text": similar_blob.pack_json(neighbour_text)}
    document = {
        "schema_version": SCHEMA_VERSIONS["neuron"],
        "kind": "neuron",
        "model": cfg.name,
        "set": data.subject.key,
        "layer": data.subject.layer,
        "neuron": unit,
        "path": unit_path(cfg.name, data.subject, unit),
        "max_activation": number(maximum),
        "metrics": {name: (int(data.metric[name][unit]) if name in COUNT_METRICS else number(data.metric[name][unit]))
                    for name in METRIC_NAMES},
        "cluster_threshold": cfg.cluster_threshold,
        "window": {"before": cfg.window_before, "after": cfg.window_after},
        "vocab": blob.pack_json(strings),
        "examples": {
            "count": part.stop - part.start,
            "token_dtype": dtype,
            "tokens": blob.pack(to_local(data.window_tokens[part], ids, dtype), dtype),
            "activation_range": [lo, hi],
            "activation": blob.pack(quantise_activations(window, lo, hi), "u1"),
            "importance": blob.pack(quantise_importance(data.importance[part]), "u1"),
            "sequence": blob.pack(data.seq[part], "u4"),
            "position": blob.pack(data.pos[part], "u4"),
            "cluster": blob.pack(data.labels[part], "u4"),
        },
        "clusters": [{"size": int(size), "central": int(central - part.start), "similar": int(n_similar)}
                     for size, central, n_similar in zip(data.cluster_size[clusters], centrals, similar_counts)],
        "intervals": {
            "bounds": [number(i * step, 4) for i in range(n_intervals + 1)],
            "interval": blob.pack(np.nonzero(interval_present)[0], "u1"),
            "sequence": blob.pack(data.interval_seq[unit][interval_present], "u4"),
            "position": blob.pack(data.interval_pos[unit][interval_present], "u4"),
            "activation": [number(v, 4) for v in data.interval_act[unit][interval_present]],
            "tokens": blob.pack(to_local(interval_tokens, ids, dtype), dtype),
        },
        "linkage": {"children": blob.pack(links[:, :2], "u4"), "distance": blob.pack(links[:, 2], "f4")},
        "histogram": {"first": first, "counts": [int(c) for c in hist_counts[first:last + 1]]},
        "logits": {side: [[int(i), number(v, LOGIT_DIGITS)]
                          for i, v in zip(to_local(logit_ids[side], ids, dtype).tolist(),
                                          data.logits[f"logit_{side}_values"][unit])]
                   for side in ("top", "bottom")},
    }
    return UnitFiles(document, blob, similar, similar_blob, summaries)


SUMMARY_TOKENS = 3  # most frequent max tokens a feature summary names


def ranked_counts(values: np.ndarray) -> list[tuple[int, int]]:
    """(value, count) pairs, most frequent first, ties by first appearance: the order static/atlas.js uses too."""
    if not len(values):
        return []
    unique, first, counts = np.unique(values, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    return [(int(unique[i]), int(counts[i])) for i in order]


def feature_summary(window_tokens: np.ndarray, act: np.ndarray, window_before: int, sentinel: int) -> dict:
    """One feature's summary from its examples' windows [n, W] and max activations [n]: its most frequent max
    tokens with counts, the most frequent token just before the max token, mean and max activation, size."""
    before = window_tokens[:, window_before - 1] if window_before > 0 else np.zeros(0, np.int64)
    before = before[before != sentinel]
    top_before = ranked_counts(before)
    return {"top": [list(pair) for pair in ranked_counts(window_tokens[:, window_before])[:SUMMARY_TOKENS]],
            "before": list(top_before[0]) if top_before else None,
            "mean": number(act.mean(), 4), "max": number(act.max(), 4), "size": int(len(act))}


def feature_summaries(data: SetData, unit: int, window_before: int) -> list[dict]:
    """The summary of each of a unit's features, in feature order (token ids are the model's)."""
    part = slice(int(data.offsets[unit]), int(data.offsets[unit + 1]))
    labels = data.labels[part]
    tokens, act = data.window_tokens[part], data.act[part]
    sentinel = int(np.iinfo(data.window_tokens.dtype).max)
    k = int(data.cluster_offsets[unit + 1] - data.cluster_offsets[unit])
    return [feature_summary(tokens[labels == c], act[labels == c], window_before, sentinel) for c in range(k)]


def neighbour_rows(atlas: Atlas, data: SetData, unit: int) -> tuple[np.ndarray, list[list]]:
    """[m, 5] int32 rows (this unit's cluster, the other feature's set position, its unit, its cluster,
    round(similarity·10⁴)), per cluster in the neighbours artefact's order, without empty slots (-1); and per row
    what its link shows: [text before the max token, the max token, text after, its most frequent max token, that
    token's count, its size] (from the other feature's central example)."""
    table = atlas.neighbours
    rows = slice(int(data.feature_start[unit]), int(data.feature_start[unit + 1]))
    index = table["neighbour_index"][rows]
    similarity = table["neighbour_similarity"][rows]
    source, slot = np.nonzero(index >= 0)
    target = index[source, slot]
    packed = np.stack([source, table["feature_set"][target], table["feature_unit"][target],
                       table["feature_cluster"][target],
                       np.rint(similarity[source, slot].astype(np.float64) * SIMILARITY_SCALE)], axis=1)
    digest = atlas.digest
    before = SNIPPET_BEFORE

    outside = np.iinfo(digest["snippet"].dtype).max

    def text(ids) -> str:
        return "".join(display_token(token_text(atlas, i)) for i in ids if i != outside)

    texts = [[text(digest["snippet"][t][:before]), text(digest["snippet"][t][before:before + 1]),
              text(digest["snippet"][t][before + 1:]), text([digest["top_token"][t]]), int(digest["top_count"][t]),
              int(digest["size"][t])] for t in target.tolist()]
    return packed.astype(np.int32), texts


def static_example(atlas: Atlas, data: SetData, index: int) -> dict:
    """One example as readable static text: tokens (with the max token marked), exact activation, where it is."""
    wb = atlas.cfg.window_before
    sentinel = np.iinfo(data.window_tokens.dtype).max
    parts: list[dict] = []
    for column, token in enumerate(data.window_tokens[index].tolist()):
        if token == sentinel:
            continue
        text = display_token(token_text(atlas, token))
        part = {"text": text, "max": column == wb, "bidi": has_bidi(text)}
        if parts and not (part["max"] or part["bidi"] or parts[-1]["max"] or parts[-1]["bidi"]):
            parts[-1]["text"] += text  # runs of plain tokens are one text node
        else:
            parts.append(part)
    return {"tokens": parts, "act": fmt(float(data.act[index]), 4), "seq": int(data.seq[index]),
            "pos": int(data.pos[index])}


def set_descriptions(index: SubjectIndex) -> list[dict]:
    """The subject sets as the model-wide files list them: rows offset … offset + size − 1 belong to a set."""
    return [{"key": s.key, "slug": s.slug, "kind": s.kind, "layer": s.layer, "size": s.size,
             "offset": int(index.offsets[i])} for i, s in enumerate(index.sets)]


# What one page may download of index data (the unit table and the search index): 1 MB. The model index page loads
# the table's manifest and the shards of the sets it shows (the table budget), and a search up to MAX_QUERY_WORDS
# search shards (the rest).
INDEX_BUDGET = 1_000_000
TABLE_BUDGET = 500_000  # the unit table shards one view shows: all sets together only when they fit
MAX_QUERY_WORDS = 8  # static/index.js searches for the first 8 distinct words of a query
SEARCH_SHARD_BUDGET = 56_000  # 8 shards ≈ 450 KB, beside the table's 500 KB and the manifests
SEARCH_WORD_BUDGET = 14_000  # a word's postings past this many bytes (most peaking first, ≈ 1,000) are left out
MIN_SEARCH_SHARDS, MAX_SEARCH_SHARDS = 64, 1 << 20
FLOAT_DIGITS = {"max_activation": 4, "density": 3}  # significant digits of the unit table's floats (others: 3)


def unit_columns(atlas: Atlas) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every unit's row of the index table: metric columns (floats rounded for display, NaN where undefined;
    counts), and its description (`summary`)."""
    table = atlas.metrics
    columns = {"max_activation": table["max_activation"], "density": table["density"],
               **{name: table[name] for name in METRIC_NAMES}}
    owner = atlas.index.rows_of(atlas.neighbours["feature_set"], atlas.neighbours["feature_unit"])
    digest = atlas.digest
    columns["n_multi"] = np.bincount(owner[digest["size"] >= 2], minlength=atlas.n_units)
    largest = np.full(atlas.n_units, -1, np.int64)
    first_feature = atlas.neighbours["feature_cluster"] == 0
    largest[owner[first_feature]] = np.flatnonzero(first_feature)
    return columns, [unit_description(atlas, int(f)) if f >= 0 else "" for f in largest]


def table_shard(model: str, index: SubjectIndex, position: int, columns: dict[str, np.ndarray],
                summaries: list[str]) -> tuple[dict, Blob]:
    """`neurons/{slug}.json` (+ .bin): one subject set's rows of the unit table, each column packed (`u4` counts,
    `f4` floats rounded to 3–4 significant digits, NaN where undefined) and the descriptions as packed JSON."""
    rows = index.rows(index.sets[position].key)
    blob = Blob()
    packed = {}
    for name, values in columns.items():
        if name in COUNT_METRICS or name == "n_multi":
            packed[name] = {"dtype": "u4", "data": blob.pack(np.asarray(values[rows]), "u4")}
        else:
            digits = FLOAT_DIGITS.get(name, 3)
            rounded = np.array([np.nan if v is None else v for v in (number(x, digits) for x in values[rows])],
                               np.float32)
            packed[name] = {"dtype": "f4", "data": blob.pack(rounded, "f4")}
    packed["summary"] = {"dtype": "json", "data": blob.pack_json(summaries[rows])}
    return {"schema_version": SCHEMA_VERSIONS["neuron-shard"], "kind": "neuron-shard", "model": model,
            "set": index.sets[position].key, "offset": int(index.offsets[position]), "size": rows.stop - rows.start,
            "columns": packed}, blob


def table_manifest(model: str, index: SubjectIndex, shard_bytes: list[int]) -> dict:
    """`neurons.json`: the subject sets and, per set, its shard of the unit table and that shard's bytes; `all`
    says whether the model index may show every set at once (all shards within TABLE_BUDGET)."""
    return {"schema_version": SCHEMA_VERSIONS["neuron-table"], "kind": "neuron-table", "model": model,
            "sets": set_descriptions(index),
            "shards": [{"set": s.key, "file": f"neurons/{s.slug}.json", "bytes": int(n)}
                       for s, n in zip(index.sets, shard_bytes)],
            "all": bool(sum(shard_bytes) <= TABLE_BUDGET), "budget": TABLE_BUDGET}


def write_unit_table(data_dir: Path, model: str, index: SubjectIndex, columns: dict[str, np.ndarray],
                     summaries: list[str]) -> dict:
    """Write the unit table's shards and manifest into `data_dir`; returns the manifest."""
    (data_dir / "neurons").mkdir()
    shard_bytes = []
    for position, subject in enumerate(index.sets):
        document, blob = table_shard(model, index, position, columns, summaries)
        shard_bytes.append(write_data_file(data_dir / "neurons" / f"{subject.slug}.json", f"neurons-{subject.key}",
                                           document, blob)[0])
    manifest = table_manifest(model, index, shard_bytes)
    write_data_file(data_dir / "neurons.json", "neurons", manifest)
    return manifest


def unit_description(atlas: Atlas, feature: int) -> str:
    """What the index's description column says of a unit: its largest feature's most frequent max token."""
    digest = atlas.digest
    token = int(digest["top_token"][feature])
    text = display_token(token_text(atlas, token))
    return f"\u201c{text}\u201d \u00d7{int(digest['top_count'][feature])} of {int(digest['size'][feature])}"


# Search: words (letters/digits runs, or single other non-space characters), lower-cased, so a multi-token word such
# as " Ahab" is one word. A feature is indexed by the word at its examples' max token (with how many examples peak
# on it) and by the words within SEARCH_CONTEXT tokens of its central example's max token. Postings live in shards
# chosen by a hash of the word (static/index.js computes the same hash); the shard count (a power of two, at least
# MIN_SEARCH_SHARDS) grows with the index so that every shard stays within SEARCH_SHARD_BUDGET.
WORD = re.compile(r"\w+|[^\w\s]")
SEARCH_CONTEXT = 3


def words_of(text: str) -> list[str]:
    return [m.group(0).lower() for m in WORD.finditer(text)]


def fnv1a(word: str) -> int:
    """FNV-1a (32-bit) of the word's UTF-8 bytes."""
    h = 0x811C9DC5
    for byte in word.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def word_shard(word: str, shards: int) -> int:
    return fnv1a(word) % shards


def peak_word(pieces: list[str], at: int) -> str | None:
    """The word overlapping token `at` of a window of token strings (None when the token is only whitespace)."""
    text = "".join(pieces)
    start = sum(len(p) for p in pieces[:at])
    end = start + len(pieces[at])
    for m in WORD.finditer(text):
        if m.start() < end and m.end() > start:
            return m.group(0).lower()
    return None


def search_postings(atlas: Atlas, data: SetData, units: range) -> list[tuple[str, int, int, int]]:
    """(word, unit row, feature, examples peaking on the word; 0 = only near the central example's max) for every
    feature of the given units."""
    wb = atlas.cfg.window_before
    vocab = atlas.vocab
    sentinel = int(np.iinfo(data.window_tokens.dtype).max)
    postings = []
    for unit in units:
        row = atlas.index.row(UnitId(data.subject.key, unit))
        part = slice(int(data.offsets[unit]), int(data.offsets[unit + 1]))
        labels = data.labels[part]
        centrals = data.cluster_central[int(data.cluster_offsets[unit]):int(data.cluster_offsets[unit + 1])]
        peaks: list[dict[str, int]] = [dict() for _ in centrals]
        for j, window in enumerate(data.window_tokens[part].tolist()):
            pieces = [vocab[t] if t < len(vocab) else "" for t in window[:wb + 1] if t != sentinel]
            tail = [vocab[t] if t < len(vocab) else "" for t in window[wb + 1:] if t != sentinel]
            word = peak_word(pieces + tail, len(pieces) - 1)
            if word is not None:
                counts = peaks[labels[j]]
                counts[word] = counts.get(word, 0) + 1
        for k, central in enumerate(centrals.tolist()):
            window = data.window_tokens[central].tolist()
            near = [vocab[t] if t < len(vocab) else "" for t in window[wb - SEARCH_CONTEXT:wb + 2]
                    if t != sentinel]
            for word, count in peaks[k].items():
                postings.append((word, row, k, count))
            for word in dict.fromkeys(words_of("".join(near))):
                if word not in peaks[k]:
                    postings.append((word, row, k, 0))
    return postings


class Postings(NamedTuple):
    """The search index's postings as arrays: posting i says feature `feature[i]` of unit row `row[i]` is listed
    under word `words[word[i]]`, with `peaks[i]` of its examples peaking on it (0: only near its central example)."""

    words: list[str]
    word: np.ndarray
    row: np.ndarray
    feature: np.ndarray
    peaks: np.ndarray

    @classmethod
    def of(cls, postings: list[tuple[str, int, int, int]]) -> "Postings":
        words = sorted({p[0] for p in postings})
        number_of = {w: i for i, w in enumerate(words)}
        columns = np.array([(number_of[w], row, k, count) for w, row, k, count in postings], np.int64).reshape(-1, 4)
        return cls(words, *columns.T)


def digits(values: np.ndarray) -> np.ndarray:
    """Decimal digits of non-negative integers (their JSON length)."""
    return np.floor(np.log10(np.maximum(values, 1))).astype(np.int64) + 1


def search_shards(model: str, index: SubjectIndex, postings: Postings) -> tuple[list[dict], dict[str, int]]:
    """`search/{i}.json`: per word, its postings [unit row, feature, peaks], most peaking first (then by row and
    feature), at most SEARCH_WORD_BUDGET bytes of them; in as many shards as keep each within SEARCH_SHARD_BUDGET.
    Returns the shards and, for each word whose postings were cut, how many it has."""
    order = np.lexsort((postings.feature, postings.row, -postings.peaks, postings.word))
    word, row, feature, peaks = (a[order] for a in postings[1:])
    cost = digits(row) + digits(feature) + digits(peaks) + 5  # "[row,feature,peaks],"
    starts = np.searchsorted(word, np.arange(len(postings.words) + 1))
    # Each word keeps its postings up to SEARCH_WORD_BUDGET bytes (they are sorted most peaking first).
    spent = np.cumsum(cost) - np.repeat(np.r_[0, np.cumsum(cost)][starts[:-1]], np.diff(starts))
    kept = spent <= SEARCH_WORD_BUDGET
    n_kept = np.bincount(word[kept], minlength=len(postings.words))
    totals = np.diff(starts)
    # Each word's bytes in its shard: "word":[…], and, when cut, "word":total, in the cut table.
    names = np.array([len(orjson.dumps(w)) for w in postings.words], np.int64)
    listed = np.bincount(word[kept], weights=cost[kept], minlength=len(postings.words)).astype(np.int64)
    word_bytes = names + 3 + listed + (n_kept == 0) + np.where(n_kept < totals, names + 2 + digits(totals), 0)
    hashes = np.array([fnv1a(w) for w in postings.words], np.int64)
    sets = set_descriptions(index)

    def header(shards: int) -> int:  # an empty shard's bytes, at most
        return len(dumps({"schema_version": SCHEMA_VERSIONS["search"], "kind": "search", "model": model, "sets": sets,
                          "shard": shards - 1, "shards": shards, "words": {}, "cut": {}})) + 1

    shards = MIN_SEARCH_SHARDS
    while len(hashes) and (np.bincount(hashes % shards, weights=word_bytes, minlength=shards).max() + header(shards)
                           > SEARCH_SHARD_BUDGET) and shards < MAX_SEARCH_SHARDS:
        shards *= 2
    docs = [{"schema_version": SCHEMA_VERSIONS["search"], "kind": "search", "model": model, "sets": sets, "shard": i,
             "shards": shards, "words": {}, "cut": {}} for i in range(shards)]
    table = np.stack([row, feature, peaks], axis=1)
    cut = {}
    for w, text in enumerate(postings.words):
        part = slice(int(starts[w]), int(starts[w + 1]))
        keep = int(kept[part].sum())
        doc = docs[int(hashes[w] % shards)]
        doc["words"][text] = table[part.start:part.start + keep].tolist()
        if keep < part.stop - part.start:
            doc["cut"][text] = cut[text] = part.stop - part.start
    return docs, cut


def write_search_index(data_dir: Path, model: str, index: SubjectIndex, postings: Postings) -> dict:
    """Write the search shards into `data_dir/search`; returns {"shards": S, "bytes": [published bytes per
    shard], "cut": {word: postings} for the words whose postings were cut}."""
    (data_dir / "search").mkdir()
    docs, cut = search_shards(model, index, postings)
    sizes = [write_data_file(data_dir / "search" / f"{doc['shard']}.json", f"search{doc['shard']}", doc)[0]
             for doc in docs]
    return {"shards": len(docs), "bytes": sizes, "cut": cut}


def largest_downloads(manifest: dict, search: dict, fixed: int) -> dict:
    """The most index data one page view downloads (published bytes): the model index page's table (the shards
    of its largest view: every set when `all`, else the largest set) plus a search of MAX_QUERY_WORDS words that
    land in the largest search shards, each beside `fixed` (the bytes of neurons.json and atlas.json)."""
    shard_bytes = [s["bytes"] for s in manifest["shards"]]
    table = sum(shard_bytes) if manifest["all"] else max(shard_bytes, default=0)
    words = sum(sorted(search["bytes"], reverse=True)[:MAX_QUERY_WORDS])
    return {"table_view": fixed + table, "search": fixed + words, "page": fixed + table + words,
            "largest_table_shard": max(shard_bytes, default=0), "largest_search_shard": max(search["bytes"]),
            "search_shards": search["shards"], "budget": INDEX_BUDGET}


def atlas_manifest(atlas: Atlas, prov: dict, search_shards: int) -> dict:
    """`atlas.json`: the model, its layers, sizes, window, search shard count, histogram edges and provenance."""
    return {"schema_version": SCHEMA_VERSIONS["atlas"], "kind": "atlas", "model": atlas.cfg.name,
            "layers": [s.layer for s in atlas.sets], "n_layers": atlas.meta.get("n_layers"),
            "d_mlp": atlas.meta.get("d_mlp"), "vocab_size": len(atlas.vocab),
            "token_dtype": token_dtype(len(atlas.vocab)),
            "window": {"before": atlas.cfg.window_before, "after": atlas.cfg.window_after},
            "cluster_threshold": atlas.cfg.cluster_threshold, "max_examples": atlas.meta.get("max_examples"),
            "search": {"shards": search_shards, "context": SEARCH_CONTEXT}, "site_url": atlas.cfg.site_url,
            "histogram_edges": [number(e, 6) for e in atlas.histogram_edges], "provenance": prov}


def vocab_file(atlas: Atlas) -> dict:
    return {"schema_version": SCHEMA_VERSIONS["vocab"], "kind": "vocab", "model": atlas.cfg.name,
            "tokens": atlas.vocab}
