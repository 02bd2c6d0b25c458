"""Pure builders of the published data files (docs/sidecar-schema.md): arrays in, plain JSON-ready dicts out."""

from __future__ import annotations

import numpy as np

from builder import __version__
from builder.render.codec import (SCHEMA_VERSIONS, SIMILARITY_SCALE, activation_range, pack, quantise_activations,
                                  quantise_importance, token_dtype)
from builder.render.inputs import Atlas, SetData
from builder.render.text import clean_text, display_token, fmt, has_bidi, number
from builder.schema import COUNT_METRICS, METRIC_NAMES
from builder.subjects import SubjectSet

LOGIT_DIGITS = 4  # significant digits of a direct logit effect in the sidecar
HISTOGRAM_DIGITS = 4  # and of a histogram edge


def unit_path(model: str, subject: SubjectSet, unit: int, feature: int | None = None) -> str:
    """The page of a unit (or one of its features) relative to the site root: `{model}/{slug}/N{unit}/[F{k}/]`."""
    return f"{model}/{subject.slug}/N{unit}/" + ("" if feature is None else f"F{feature}/")


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


def unit_sidecar(atlas: Atlas, data: SetData, unit: int, prov: dict) -> dict:
    """`neuron.json`: one unit, everything its page and its feature pages show."""
    cfg = atlas.cfg
    part = slice(int(data.offsets[unit]), int(data.offsets[unit + 1]))
    window = data.window[part]
    lo, hi = activation_range(window, float(data.max_activation[unit]))
    links = data.linkage[int(data.linkage_offsets[unit]):int(data.linkage_offsets[unit + 1])]
    clusters = slice(int(data.cluster_offsets[unit]), int(data.cluster_offsets[unit + 1]))
    hist_counts = data.histogram[unit]
    nonzero = np.flatnonzero(hist_counts)
    first, last = (int(nonzero[0]), int(nonzero[-1])) if len(nonzero) else (0, -1)
    edges = atlas.histogram_edges
    bounds = [None if i < 0 or i >= len(edges) else number(edges[i], HISTOGRAM_DIGITS)
              for i in range(first - 1, last + 1)]
    dtype = token_dtype(len(atlas.vocab))
    return {
        "schema_version": SCHEMA_VERSIONS["neuron"],
        "kind": "neuron",
        "model": cfg.name,
        "layer": data.subject.layer,
        "neuron": unit,
        "path": unit_path(cfg.name, data.subject, unit),
        "max_activation": number(data.max_activation[unit]),
        "metrics": {name: (int(data.metric[name][unit]) if name in COUNT_METRICS else number(data.metric[name][unit]))
                    for name in METRIC_NAMES},
        "cluster_threshold": cfg.cluster_threshold,
        "window": {"before": cfg.window_before, "after": cfg.window_after},
        "examples": {
            "count": part.stop - part.start,
            "token_dtype": dtype,
            "tokens": pack(data.window_tokens[part], dtype),
            "activation_range": [lo, hi],
            "activation": pack(quantise_activations(window, lo, hi), "u1"),
            "importance": pack(quantise_importance(data.importance[part]), "u1"),
            "sequence": pack(data.seq[part], "u4"),
            "position": pack(data.pos[part], "u4"),
            "cluster": pack(data.labels[part], "u4"),
        },
        "clusters": [{"size": int(size), "central": int(central - part.start)}
                     for size, central in zip(data.cluster_size[clusters], data.cluster_central[clusters])],
        "linkage": {"children": pack(links[:, :2], "u4"), "distance": pack(links[:, 2], "f4")},
        "neighbours": pack(neighbour_rows(atlas, data, unit), "i4"),
        "histogram": {"edges": bounds, "counts": [int(c) for c in hist_counts[first:last + 1]]},
        "logits": {side: [[int(i), number(v, LOGIT_DIGITS)]
                          for i, v in zip(data.logits[f"logit_{side}_ids"][unit],
                                          data.logits[f"logit_{side}_values"][unit])]
                   for side in ("top", "bottom")},
        "provenance": prov,
    }


def neighbour_rows(atlas: Atlas, data: SetData, unit: int) -> np.ndarray:
    """[m, 5] int32 rows (this unit's cluster, the other set's layer, its unit, its cluster, round(similarity·10⁴)),
    per cluster in the neighbours artefact's order, without empty slots (-1)."""
    table = atlas.neighbours
    rows = slice(int(data.feature_start[unit]), int(data.feature_start[unit + 1]))
    index = table["neighbour_index"][rows]
    similarity = table["neighbour_similarity"][rows]
    source, slot = np.nonzero(index >= 0)
    target = index[source, slot]
    layers = np.array([s.layer for s in atlas.sets], np.int64)
    return np.stack([source, layers[table["feature_set"][target]], table["feature_unit"][target],
                     table["feature_cluster"][target],
                     np.rint(similarity[source, slot].astype(np.float64) * SIMILARITY_SCALE)], axis=1).astype(np.int32)


def static_example(atlas: Atlas, data: SetData, index: int) -> dict:
    """One example as readable static text: tokens (with the max token marked), exact activation, where it is."""
    wb = atlas.cfg.window_before
    sentinel = np.iinfo(data.window_tokens.dtype).max
    parts: list[dict] = []
    for column, token in enumerate(data.window_tokens[index].tolist()):
        if token == sentinel:
            continue
        text = display_token(atlas.vocab[token]) if token < len(atlas.vocab) else f"<{token}>"
        part = {"text": text, "max": column == wb, "bidi": has_bidi(text)}
        if parts and not (part["max"] or part["bidi"] or parts[-1]["max"] or parts[-1]["bidi"]):
            parts[-1]["text"] += text  # runs of plain tokens are one text node
        else:
            parts.append(part)
    return {"tokens": parts, "act": fmt(float(data.act[index]), 4), "seq": int(data.seq[index]),
            "pos": int(data.pos[index])}


def set_descriptions(atlas: Atlas) -> list[dict]:
    """The subject sets as the model-wide files list them: rows offset … offset + size − 1 belong to a set."""
    return [{"key": s.key, "slug": s.slug, "kind": s.kind, "layer": s.layer, "size": s.size,
             "offset": int(atlas.index.offsets[i])} for i, s in enumerate(atlas.sets)]


def unit_table(atlas: Atlas) -> dict:
    """`neurons.json`: compact columnar table of every unit; row r is unit r − offset of the set whose rows hold r."""
    table = atlas.metrics
    columns = {"max_activation": [number(v, 4) for v in table["max_activation"]]}
    for name in METRIC_NAMES:
        columns[name] = ([int(v) for v in table[name]] if name in COUNT_METRICS
                         else [number(v, 3) for v in table[name]])
    return {"schema_version": SCHEMA_VERSIONS["neuron-table"], "kind": "neuron-table", "model": atlas.cfg.name,
            "sets": set_descriptions(atlas), "columns": columns}


def token_index(atlas: Atlas, central_tokens: dict[str, np.ndarray], central_units: dict[str, np.ndarray]) -> dict:
    """`tokens.json`: token id -> rows of the unit table whose features' central examples peak on that token, those
    with most such features first, then by row."""
    token = np.concatenate([central_tokens[s.key].astype(np.int64) for s in atlas.sets] or [np.zeros(0, int)])
    row = np.concatenate([atlas.index.rows_of(np.full(len(central_units[s.key]), i), central_units[s.key])
                          for i, s in enumerate(atlas.sets)] or [np.zeros(0, int)])
    if len(token):
        pairs, counts = np.unique(np.stack([token, row], axis=1), axis=0, return_counts=True)
    else:
        pairs, counts = np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    pairs = pairs[np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))]
    unique_tokens, starts = np.unique(pairs[:, 0], return_index=True)
    ends = np.r_[starts[1:], len(pairs)].astype(np.int64)
    return {"schema_version": SCHEMA_VERSIONS["token-index"], "kind": "token-index", "model": atlas.cfg.name,
            "sets": set_descriptions(atlas), "token_ids": [int(t) for t in unique_tokens],
            "rows": [[int(r) for r in pairs[s:e, 1]] for s, e in zip(starts, ends)]}


def central_tokens_of(data: SetData, window_before: int, units: range) -> tuple[np.ndarray, np.ndarray]:
    """The max token id of every cluster's central example of the given units, and the unit each cluster belongs
    to."""
    clusters = slice(int(data.cluster_offsets[units.start]), int(data.cluster_offsets[units.stop]))
    central = data.cluster_central[clusters]
    tokens = data.window_tokens[central, window_before] if len(central) else np.zeros(0, np.int64)
    owners = np.repeat(np.arange(units.start, units.stop), np.diff(data.cluster_offsets[units.start:units.stop + 1]))
    return tokens, owners


def atlas_manifest(atlas: Atlas, prov: dict) -> dict:
    """`atlas.json`: the model, its layers, sizes, window, histogram edges and provenance."""
    return {"schema_version": SCHEMA_VERSIONS["atlas"], "kind": "atlas", "model": atlas.cfg.name,
            "layers": [s.layer for s in atlas.sets], "n_layers": atlas.meta.get("n_layers"),
            "d_mlp": atlas.meta.get("d_mlp"), "vocab_size": len(atlas.vocab),
            "token_dtype": token_dtype(len(atlas.vocab)),
            "window": {"before": atlas.cfg.window_before, "after": atlas.cfg.window_after},
            "cluster_threshold": atlas.cfg.cluster_threshold, "max_examples": atlas.meta.get("max_examples"),
            "histogram_edges": [number(e, 6) for e in atlas.histogram_edges], "provenance": prov}


def vocab_file(atlas: Atlas) -> dict:
    return {"schema_version": SCHEMA_VERSIONS["vocab"], "kind": "vocab", "model": atlas.cfg.name,
            "tokens": atlas.vocab}
