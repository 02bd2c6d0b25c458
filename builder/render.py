"""Render: turn the artefacts into a static, citeable site that works from any static host, a sub-path, a plain
folder over file:// and `python -m http.server`, with no network.

Layout (all links relative, always to an explicit `index.html` so file:// works):

    index.html                               landing page
    static/                                  the site's only scripts and styles (copied from the repo's static/)
    {model}/index.html                       coverage, sortable/filterable table of neurons, search
    {model}/method/index.html                method and the embedding-comparison report
    {model}/L{layer}/index.html              static table of the layer's neurons (browsable without JavaScript)
    {model}/L{layer}/N{neuron}/index.html    neuron page
    {model}/L{layer}/N{neuron}/neuron.json   the neuron's sidecar: the public data API (docs/sidecar-schema.md)
    {model}/L{layer}/N{neuron}/F{k}/index.html  feature (cluster) page: thin; its examples come from neuron.json
    {model}/data/{vocab,neurons,tokens}.json shared vocabulary, neuron table, token -> neurons index
    {model}/data/atlas.json                  model-level manifest (provenance, layers, histogram edges)

Every data file X.json has a twin X.json.js, `(window.ATLAS_DATA=...)["key"]=<the same JSON>;`, because Chromium
refuses fetch() of file:// URLs but runs <script src> there. Pages fetch the .json over http(s) and load the .json.js
only when opened from a folder over file://. The twins exist for local browsing only: `scripts/deploy.sh` and the
Pages workflow leave them out, so a published GPT-2-small atlas holds each neuron's data once and fits GitHub Pages'
1 GB. `bytes_per_neuron` in stats.json counts the published files; `local_bytes_per_neuron` counts everything.

Safety: dataset text is hostile. One jinja2 Environment (autoescape, StrictUndefined) gets plain dicts; data reaches
pages only as escaped text or as external JSON/JS written by orjson; every page carries a Content-Security-Policy
that forbids inline script. Lone surrogates (which cannot be UTF-8 encoded) become U+FFFD at the boundary
(`clean_text`), for every string read from a tokenizer, a config or an artefact.

Determinism: no wall-clock time in the site (the build date comes from collect's meta), sorted keys, fixed ordering,
fixed zlib level, so the same inputs give byte-identical files. The site is built in a temporary folder beside
site_dir and swapped into place at the end (`atomic_dir`); a failed or killed render leaves the previous site intact.
"""

from __future__ import annotations

import base64
import logging
import math
import multiprocessing
import os
import re
import shutil
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from builder import __version__
from builder.artefacts import atomic_dir, check_schema, read_json, read_npz, write_json
from builder.config import AtlasConfig
from builder.errors import ArtefactError, ModelError
from builder.paths import AtlasPaths
from builder.stage import progress, worker_count

log = logging.getLogger(__name__)

SIDECAR_SCHEMA = 1  # docs/sidecar-schema.md; bump on any incompatible change to a published JSON file
STATS_KIND = "render-stats"
STATS_SCHEMA = 1
NEIGHBOURS_KIND, NEIGHBOURS_SCHEMA = "neighbours", 1
REPORT_KIND, REPORT_SCHEMA = "comparison-report", 1

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "templates"
STATIC = REPO / "static"

# No inline script or style may run; scripts, styles and data only from the site itself (`'self'` also matches file:
# URLs for a page opened over file://). A constant, so templates may print it unescaped.
CSP = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'"

MISSING_U8 = 255  # quantised activation/importance: outside the sequence / not scored
QUANT_LEVELS = 254  # uint8 codes 0..254 span the range
SIMILARITY_SCALE = 10_000  # neighbour similarity stored as round(similarity * 10000)
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_PICTURES = {**{i: chr(0x2400 + i) for i in range(32)}, 0x7F: "\u2421", 0x0A: "\u21b5", 0x09: "\u21e5"}


# ---------------------------------------------------------------------------------------------------------------
# Text at the boundary


def clean_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (valid pairs are joined), so it can be UTF-8 encoded."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def display_token(text: str) -> str:
    """How a token reads on a page: newline as ↵, tab as ⇥, other control characters as control pictures. The same
    mapping lives in static/atlas.js (displayToken); everything else, including RTL and zero-width characters, stays
    literal."""
    return text.translate(_CONTROL_PICTURES)


# ---------------------------------------------------------------------------------------------------------------
# Compact encodings (documented in docs/sidecar-schema.md)


def pack(array: np.ndarray, dtype: str) -> str:
    """Base64 of the zlib-compressed little-endian bytes of `array` as `dtype` (u1, u2, u4, i4, f4)."""
    data = np.ascontiguousarray(array, dtype=np.dtype(f"<{dtype}")).tobytes()
    return base64.b64encode(zlib_compress(data)).decode("ascii")


def unpack(text: str, dtype: str) -> np.ndarray:
    """Inverse of `pack` (flat array)."""
    import zlib

    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.dtype(f"<{dtype}"))


def zlib_compress(data: bytes) -> bytes:
    import zlib

    return zlib.compress(data, 9)


def round_out(value: float, up: bool, digits: int = 5) -> float:
    """`value` rounded to `digits` significant digits, away from the inside of a range (up for a maximum)."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    exponent = digits - 1 - math.floor(math.log10(abs(value)))
    scale = 10.0 ** exponent
    rounded = (math.ceil if up else math.floor)(value * scale) / scale
    if up and rounded < value:
        rounded = math.nextafter(rounded, math.inf)
    if not up and rounded > value:
        rounded = math.nextafter(rounded, -math.inf)
    return float(rounded)


def quantise_activations(window: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Codes 0..254 spanning [lo, hi] linearly; 255 where the value is NaN (outside the sequence)."""
    span = hi - lo if hi > lo else 1.0
    codes = np.rint((np.clip(window, lo, hi) - lo) / span * QUANT_LEVELS)
    return np.where(np.isnan(window), MISSING_U8, codes).astype(np.uint8)


def dequantise_activations(codes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo if hi > lo else 1.0
    values = lo + codes.astype(np.float64) / QUANT_LEVELS * span
    return np.where(codes == MISSING_U8, np.nan, values)


def quantise_importance(importance: np.ndarray) -> np.ndarray:
    codes = np.rint(np.clip(importance, 0.0, 1.0) * QUANT_LEVELS)
    return np.where(np.isnan(importance), MISSING_U8, codes).astype(np.uint8)


def dequantise_importance(codes: np.ndarray) -> np.ndarray:
    return np.where(codes == MISSING_U8, np.nan, codes.astype(np.float64) / QUANT_LEVELS)


def activation_range(window: np.ndarray, max_activation: float) -> tuple[float, float]:
    """[lo, hi] for a neuron's quantised windows: lo = min(0, smallest value), hi = max(neuron max, largest value),
    rounded outwards to 5 significant digits so the JSON numbers are short and still bound every value."""
    finite = window[np.isfinite(window)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = max(float(max_activation), float(finite.max()) if finite.size else 0.0)
    lo, hi = round_out(lo, up=False), round_out(hi, up=True)
    return lo, (hi if hi > lo else lo + 1.0)


def number(value, digits: int = 6):
    """A float for JSON: `digits` significant digits, None for NaN/inf."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def fmt(value, digits: int = 3) -> str:
    """A number for a page: `digits` significant digits, an en dash for NaN/None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)) or float(value).is_integer() and abs(value) >= 10 ** digits:
        return f"{int(value):,}"
    return f"{float(value):.{digits}g}"


def dumps(document) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


FILE_COPY_SUFFIX = ".json.js"  # the file:// twin of every .json data file; never published


def js_wrapper(key: str, payload: bytes) -> bytes:
    """The JSON as a script, for pages opened over file://: `(window.ATLAS_DATA=...)["key"]=<json>;`."""
    return b'(window.ATLAS_DATA=window.ATLAS_DATA||{})["' + key.encode() + b'"]=' + payload + b";\n"


def write_data_file(path: Path, key: str, document: dict) -> tuple[int, int]:
    """Write `path` (.json) and its file:// twin; returns (published bytes, file:// copy bytes)."""
    payload = dumps(document)
    path.write_bytes(payload + b"\n")
    twin = js_wrapper(key, payload)
    path.with_name(path.name + ".js").write_bytes(twin)
    return len(payload) + 1, len(twin)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _missing(kind: str, path: Path, stage: str) -> ArtefactError:
    return ArtefactError(f"{kind} artefact {path} is missing; run `atlas {stage}` (or `atlas build`) first")


def _require(path: Path, kind: str, stage: str) -> None:
    if not Path(path).is_file():
        raise _missing(kind, path, stage)


def load_fields(path: Path, kind: str, schema_version: int, names: tuple[str, ...], stage: str
                ) -> dict[str, np.ndarray]:
    """Only the named arrays of an .npz artefact (collect's pre-MLP vectors and embed's weights are large and
    unneeded here), after checking its kind and schema version."""
    _require(path, kind, stage)
    try:
        with np.load(path, allow_pickle=False) as bundle:
            check_schema({"kind": str(bundle["_kind"]), "schema_version": int(bundle["_schema_version"])}, path,
                         kind, schema_version)
            return {name: bundle[name] for name in names}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        raise ArtefactError(f"{kind} artefact {path} is corrupt or lacks expected arrays; delete it and re-run "
                            f"`atlas {stage}`") from None


@dataclass
class Atlas:
    """Everything model-wide the pages need, read once."""

    cfg: AtlasConfig
    meta: dict
    layers: list[int]
    d_mlp: int
    tokens: np.ndarray
    metrics: dict[str, np.ndarray]
    neighbours: dict[str, np.ndarray]
    report: dict
    histogram_edges: np.ndarray
    vocab: list[str]
    provenance: dict | None = None  # filled once by load_atlas (config_hash() is not free)

    @property
    def n_neurons(self) -> int:
        return len(self.layers) * self.d_mlp


def check_inputs(paths: AtlasPaths, layers: list[int]) -> None:
    """Fail fast, before any work, naming the first missing artefact and the stage that writes it."""
    from builder import cluster, collect, embed, importance

    needed = [(paths.tokens, collect.TOKENS_KIND, "collect")]
    for layer in layers:
        needed += [(paths.layer_examples(layer), collect.LAYER_KIND, "collect"),
                   (paths.layer_weights(layer), embed.LAYER_KIND, "embed"),
                   (paths.layer_clusters(layer), cluster.LAYER_KIND, "cluster"),
                   (paths.layer_importance(layer), importance.LAYER_KIND, "importance")]
    needed += [(paths.metrics_table, cluster.METRICS_KIND, "cluster"),
               (paths.neighbours, NEIGHBOURS_KIND, "neighbours"),
               (paths.report, REPORT_KIND, "report")]
    for path, kind, stage in needed:
        _require(path, kind, stage)


def load_atlas(cfg: AtlasConfig, vocabulary: list[str] | None = None) -> Atlas:
    from builder.cluster import read_metrics_table
    from builder.collect import HISTOGRAM_EDGES, read_collect_meta, read_tokens

    paths = AtlasPaths.of(cfg)
    _require(paths.collect_meta, "collect-meta", "collect")
    meta = read_collect_meta(paths, cfg)
    layers = [int(layer) for layer in meta["layers"]]
    check_inputs(paths, layers)
    tokens = read_tokens(paths)
    metrics = read_metrics_table(paths)
    neighbours = read_npz(paths.neighbours, NEIGHBOURS_KIND, NEIGHBOURS_SCHEMA)
    for name in ("feature_layer", "feature_neuron", "feature_cluster", "neighbour_index", "neighbour_similarity"):
        if name not in neighbours:
            raise ArtefactError(f"{paths.neighbours} lacks {name}; delete it and re-run `atlas neighbours`")
    report = read_json(paths.report, REPORT_KIND, REPORT_SCHEMA)
    edges = load_fields(paths.layer_examples(layers[0]), "collect-layer", 1, ("histogram_edges",),
                        "collect")["histogram_edges"] if layers else HISTOGRAM_EDGES
    if vocabulary is None:
        referenced = int(tokens.max()) + 1 if tokens.size else 0
        vocabulary = load_vocabulary(cfg, referenced)
    vocab = [clean_text(str(token)) for token in vocabulary]
    atlas = Atlas(cfg=cfg, meta=meta, layers=layers, d_mlp=int(meta["d_mlp"]), tokens=tokens, metrics=metrics,
                  neighbours=neighbours, report=report, histogram_edges=np.asarray(edges, np.float64), vocab=vocab)
    atlas.provenance = provenance(atlas)
    return atlas


def load_vocabulary(cfg: AtlasConfig, min_size: int = 0) -> list[str]:
    """Every token id's display string, `tokenizer.decode([id])`, from the model's tokenizer only (no weights).
    Ids the tokenizer lacks (a padded embedding matrix) read as `<id>`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from builder.models import resolve_model_source

    source, local = resolve_model_source(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({} if local else {"revision": cfg.model_revision}))
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer of {cfg.model!r} ({str(error).splitlines()[0]}); check the "
                         "model name or run with network access once") from None
    size = len(tokenizer)
    strings = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    return list(strings) + [f"<{i}>" for i in range(size, max(size, min_size))]


# ---------------------------------------------------------------------------------------------------------------
# One layer's arrays, prepared once and shared (copy-on-write) with the worker processes


@dataclass
class LayerData:
    layer: int
    layer_index: int
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
    feature_start: np.ndarray  # [d_mlp + 1] rows of the neighbours feature table per neuron


METRIC_NAMES = ("n_examples", "n_clusters", "max_distance", "mean_distance", "intra_distance", "inter_distance",
                "largest_share")


def token_dtype(vocab_size: int) -> str:
    return "u2" if vocab_size < 0xFFFF else "u4"


def load_layer(atlas: Atlas, layer: int) -> LayerData:
    from builder import cluster, collect, embed, importance

    paths = AtlasPaths.of(atlas.cfg)
    examples = load_fields(paths.layer_examples(layer), collect.LAYER_KIND, collect.SCHEMA_VERSION,
                           ("offsets", "seq", "pos", "act", "window", "max_activation", "histogram"), "collect")
    weights = load_fields(paths.layer_weights(layer), embed.LAYER_KIND, embed.SCHEMA_VERSION,
                          ("logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values"), "embed")
    clusters = cluster.read_layer_clusters(paths, layer)
    scores = importance.read_layer_importance(paths, layer)["importance"]
    n_ex = int(examples["offsets"][-1])
    wb = atlas.cfg.window_before
    window = examples["window"]
    if (len(examples["offsets"]) != atlas.d_mlp + 1 or window.shape != (n_ex, wb + 1 + atlas.cfg.window_after)
            or scores.shape != (n_ex, wb + 1) or len(clusters["labels"]) != n_ex
            or len(clusters["cluster_offsets"]) != atlas.d_mlp + 1):
        raise ArtefactError(f"layer {layer}: the collect, cluster and importance artefacts disagree in shape (window "
                            f"{window.shape}, importance {scores.shape}); re-run `atlas build` with this config")
    context = atlas.tokens.shape[1]
    positions = examples["pos"].astype(np.int64)[:, None] + np.arange(-wb, atlas.cfg.window_after + 1)[None, :]
    inside = (positions >= 0) & (positions < context)
    dtype = np.dtype(f"<{token_dtype(len(atlas.vocab))}")
    sentinel = np.iinfo(dtype).max
    gathered = atlas.tokens[examples["seq"].astype(np.int64)[:, None], np.clip(positions, 0, context - 1)]
    window_tokens = np.where(inside, gathered, sentinel).astype(dtype)
    window = np.where(inside, window, np.nan).astype(np.float32)
    return LayerData(
        layer=layer, layer_index=atlas.layers.index(layer), offsets=examples["offsets"].astype(np.int64),
        seq=examples["seq"], pos=examples["pos"], act=examples["act"], window=window, window_tokens=window_tokens,
        importance=scores, max_activation=examples["max_activation"], histogram=examples["histogram"],
        labels=clusters["labels"], cluster_offsets=clusters["cluster_offsets"].astype(np.int64),
        cluster_central=clusters["cluster_central"].astype(np.int64), cluster_size=clusters["cluster_size"],
        linkage_offsets=clusters["linkage_offsets"].astype(np.int64), linkage=clusters["linkage"],
        metric={name: clusters[name] for name in METRIC_NAMES}, logits=weights,
        feature_start=feature_rows(atlas, layer, clusters))


def feature_rows(atlas: Atlas, layer: int, clusters: dict[str, np.ndarray]) -> np.ndarray:
    """[d_mlp + 1] CSR into the neighbours feature table for this layer, checked against the cluster artefact."""
    table = atlas.neighbours
    keys = table["feature_layer"].astype(np.int64) * (atlas.d_mlp + 1) + table["feature_neuron"].astype(np.int64)
    wanted = layer * (atlas.d_mlp + 1) + np.arange(atlas.d_mlp + 1, dtype=np.int64)
    start = np.searchsorted(keys, wanted, side="left")
    counts = np.diff(start)
    expected = np.diff(clusters["cluster_offsets"])
    ordered = bool(np.all(np.diff(keys) >= 0)) if len(keys) else True
    if not ordered or not np.array_equal(counts, expected):
        raise ArtefactError(f"the neighbours artefact does not match layer {layer}'s clusters (feature counts "
                            "differ); re-run `atlas neighbours`")
    span = slice(int(start[0]), int(start[-1]))
    local = table["feature_cluster"][span].astype(np.int64)
    within = np.arange(len(local)) - np.repeat(start[:-1] - start[0], counts)
    if not np.array_equal(local, within):
        raise ArtefactError(f"the neighbours artefact lists layer {layer}'s features out of order; re-run "
                            "`atlas neighbours`")
    return start.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# The neuron sidecar (the public data API) and the data its pages render


def neuron_sidecar(atlas: Atlas, data: LayerData, neuron: int) -> dict:
    cfg = atlas.cfg
    part = slice(int(data.offsets[neuron]), int(data.offsets[neuron + 1]))
    count = part.stop - part.start
    window = data.window[part]
    lo, hi = activation_range(window, float(data.max_activation[neuron]))
    links = data.linkage[int(data.linkage_offsets[neuron]):int(data.linkage_offsets[neuron + 1])]
    clusters = slice(int(data.cluster_offsets[neuron]), int(data.cluster_offsets[neuron + 1]))
    hist_counts = data.histogram[neuron]
    nonzero = np.flatnonzero(hist_counts)
    first, last = (int(nonzero[0]), int(nonzero[-1])) if len(nonzero) else (0, -1)
    edges = atlas.histogram_edges
    bounds = [None if i < 0 or i >= len(edges) else number(edges[i], 4) for i in range(first - 1, last + 1)]
    return {
        "schema_version": SIDECAR_SCHEMA,
        "kind": "neuron",
        "model": cfg.name,
        "layer": data.layer,
        "neuron": neuron,
        "path": neuron_path(cfg.name, data.layer, neuron),
        "max_activation": number(data.max_activation[neuron]),
        "metrics": {name: (int(data.metric[name][neuron]) if name in ("n_examples", "n_clusters")
                           else number(data.metric[name][neuron])) for name in METRIC_NAMES},
        "cluster_threshold": cfg.cluster_threshold,
        "window": {"before": cfg.window_before, "after": cfg.window_after},
        "examples": {
            "count": count,
            "token_dtype": token_dtype(len(atlas.vocab)),
            "tokens": pack(data.window_tokens[part], token_dtype(len(atlas.vocab))),
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
        "neighbours": pack(neighbour_rows(atlas, data, neuron), "i4"),
        "histogram": {"edges": bounds, "counts": [int(c) for c in hist_counts[first:last + 1]]},
        "logits": {side: [[int(i), number(v, 4)] for i, v in zip(data.logits[f"logit_{side}_ids"][neuron],
                                                                  data.logits[f"logit_{side}_values"][neuron])]
                   for side in ("top", "bottom")},
        "provenance": provenance(atlas),
    }


def neighbour_rows(atlas: Atlas, data: LayerData, neuron: int) -> np.ndarray:
    """[m, 5] int32 rows (this neuron's cluster, layer, neuron, cluster, round(similarity·10⁴)), per cluster in the
    neighbours artefact's order, without empty slots (-1)."""
    table = atlas.neighbours
    rows = slice(int(data.feature_start[neuron]), int(data.feature_start[neuron + 1]))
    index = table["neighbour_index"][rows]
    similarity = table["neighbour_similarity"][rows]
    source, slot = np.nonzero(index >= 0)
    target = index[source, slot]
    return np.stack([source, table["feature_layer"][target], table["feature_neuron"][target],
                     table["feature_cluster"][target],
                     np.rint(similarity[source, slot].astype(np.float64) * SIMILARITY_SCALE)], axis=1).astype(np.int32)


def neuron_path(model: str, layer: int, neuron: int, feature: int | None = None) -> str:
    return f"{model}/L{layer}/N{neuron}/" + ("" if feature is None else f"F{feature}/")


def provenance(atlas: Atlas) -> dict:
    """Where the atlas's data comes from, as every page and sidecar shows it."""
    if atlas.provenance is not None:
        return atlas.provenance
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
        "build_date": clean_text(str(meta["build_date"])),
    }


def static_example(atlas: Atlas, data: LayerData, index: int) -> dict:
    """One example as readable static text: tokens (with the max token marked), exact activation, where it is."""
    wb = atlas.cfg.window_before
    sentinel = np.iinfo(data.window_tokens.dtype).max
    parts: list[dict] = []
    for column, token in enumerate(data.window_tokens[index].tolist()):
        if token == sentinel:
            continue
        text = display_token(atlas.vocab[token]) if token < len(atlas.vocab) else f"<{token}>"
        part = {"text": text, "max": column == wb, "bidi": bool(BIDI_CONTROLS.search(text))}
        if parts and not (part["max"] or part["bidi"] or parts[-1]["max"] or parts[-1]["bidi"]):
            parts[-1]["text"] += text  # runs of plain tokens are one text node
        else:
            parts.append(part)
    return {"tokens": parts, "act": fmt(float(data.act[index]), 4), "seq": int(data.seq[index]),
            "pos": int(data.pos[index])}


# ---------------------------------------------------------------------------------------------------------------
# Pages


_ENV = None


def environment():
    """The one jinja2 Environment: autoescape on, StrictUndefined, compiled once per process."""
    global _ENV
    if _ENV is None:
        import jinja2

        _ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                                  undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                  keep_trailing_newline=True)
        _ENV.filters["fmt"] = fmt
    return _ENV


def bibtex_escape(text: str) -> str:
    return re.sub(r"([\\{}%&$#_^~])", lambda m: "\\" + m.group(1) if m.group(1) not in "\\^~" else
                  {"\\": r"\textbackslash{}", "^": r"\^{}", "~": r"\~{}"}[m.group(1)], text)


def citation(atlas: Atlas, path: str, title: str) -> str:
    """BibTeX for the page at `path` (absolute when site_url is set, else the relative path)."""
    prov = provenance(atlas)
    url = f"{atlas.cfg.site_url.rstrip('/')}/{path}" if atlas.cfg.site_url else path
    key = "neuronatlas:" + re.sub(r"[^A-Za-z0-9:.-]", "-", path.strip("/").replace("/", ":"))
    note = (f"Model {prov['model']} (revision {prov['model_revision']}); dataset {prov['dataset']}, "
            f"{prov['n_sequences']} sequences, {prov['n_tokens']} tokens; threshold {prov['threshold']}; "
            f"code {prov['code_version']}; config {prov['config_hash']}")
    year = prov["build_date"][:4]
    return (f"@misc{{{key},\n  title = {{{{Neuron Atlas}}: {bibtex_escape(title)}}},\n"
            f"  howpublished = {{\\url{{{url.replace('%', '%25').replace('#', '%23')}}}}},\n"
            f"  note = {{{bibtex_escape(note)}}},\n  year = {{{bibtex_escape(year)}}},\n"
            f"  date = {{{bibtex_escape(prov['build_date'])}}}\n}}\n")


class Site:
    """Page contexts shared by every page of a model; computed once, inherited by the workers through fork."""

    def __init__(self, atlas: Atlas):
        self.atlas = atlas
        self.model = atlas.cfg.name
        self.prov = provenance(atlas)
        self.common = {"csp": CSP, "model": self.model, "prov": self.prov, "layers": atlas.layers,
                       "layers_attr": ",".join(map(str, atlas.layers)), "d_mlp": atlas.d_mlp}

    def page(self, depth: int, path: str, title: str, cite_title: str, kind: str, **context) -> dict:
        """Context of a page `depth` folders below the site root (the model index is at depth 1)."""
        root = "../" * depth
        model_root = "../" * (depth - 1) if depth >= 1 else self.model + "/"
        return {**self.common, "root": root, "model_root": model_root, "path": path, "title": title,
                "cite": citation(self.atlas, path, cite_title), "kind": kind, **context}

    def nav(self, layer: int, neuron: int, depth_below_layer: int) -> dict:
        """Previous/next neuron links (across layers) from a page `depth_below_layer` folders below L{layer}/."""
        atlas = self.atlas

        def link(step: int):
            index = atlas.layers.index(layer) * atlas.d_mlp + neuron + step
            if not 0 <= index < atlas.n_neurons:
                return None
            other_layer, other = atlas.layers[index // atlas.d_mlp], index % atlas.d_mlp
            up = "../" * depth_below_layer
            href = f"{up}N{other}/index.html" if other_layer == layer else f"{up}../L{other_layer}/N{other}/index.html"
            return {"href": href, "label": f"L{other_layer} N{other}"}

        return {"prev": link(-1), "next": link(1)}


def render_neuron(site: Site, data: LayerData, neuron: int, folder: Path) -> tuple[int, ...]:
    """Write one neuron's sidecar (and its file:// twin), its page and its feature pages into `folder`.

    Returns (examples, clusters, sidecar bytes, neuron page bytes, feature pages bytes, file:// twin bytes)."""
    atlas = site.atlas
    env = environment()
    sidecar = neuron_sidecar(atlas, data, neuron)
    folder.mkdir(parents=True)
    sidecar_bytes, twin_bytes = write_data_file(folder / "neuron.json", "neuron", sidecar)
    layer = data.layer
    start = int(data.offsets[neuron])
    count = sidecar["examples"]["count"]
    labels = data.labels[start:start + count]
    features = []
    for k, cluster in enumerate(sidecar["clusters"]):
        members = np.flatnonzero(labels == k) + start
        features.append({"k": k, "size": cluster["size"], "share": fmt(100.0 * cluster["size"] / count, 3) + "%",
                         "central": static_example(atlas, data, start + cluster["central"]),
                         "mean_act": fmt(float(data.act[members].mean()), 4) if len(members) else "–"})
    metrics = sidecar["metrics"]
    metric_rows = [
        ("Max activation", fmt(sidecar["max_activation"], 4)), ("Examples", str(metrics["n_examples"])),
        ("Feature clusters", str(metrics["n_clusters"])), ("Largest cluster share", fmt(metrics["largest_share"])),
        ("Max distance", fmt(metrics["max_distance"])), ("Mean distance", fmt(metrics["mean_distance"])),
        ("Intra-cluster distance", fmt(metrics["intra_distance"])),
        ("Inter-cluster distance", fmt(metrics["inter_distance"]))]

    def logit_list(side: str) -> list[dict]:
        texts = [(display_token(atlas.vocab[i]) if i < len(atlas.vocab) else f"<{i}>", v)
                 for i, v in sidecar["logits"][side]]
        return [{"text": text, "value": fmt(v, 3), "bidi": bool(BIDI_CONTROLS.search(text))} for text, v in texts]

    distances = data.linkage[int(data.linkage_offsets[neuron]):int(data.linkage_offsets[neuron + 1]), 2]
    cut_max = max(1.0, math.ceil(float(distances.max()) * 20) / 20) if len(distances) else 1.0
    context = site.page(3, neuron_path(site.model, layer, neuron), f"L{layer} N{neuron} · {site.model}",
                        f"{site.model} layer {layer} neuron {neuron}", "neuron", layer=layer, neuron=neuron,
                        features=features, metric_rows=metric_rows, promoted=logit_list("top"),
                        suppressed=logit_list("bottom"), count=count, threshold=atlas.cfg.cluster_threshold,
                        cut_max=cut_max, nav=site.nav(layer, neuron, 1))
    page = env.get_template("neuron.html").render(context).encode()
    (folder / "index.html").write_bytes(page)
    feature_template = env.get_template("feature.html")
    nav = site.nav(layer, neuron, 2)
    feature_bytes = 0
    for feature in features:
        k = feature["k"]
        context = site.page(4, neuron_path(site.model, layer, neuron, k), f"L{layer} N{neuron} F{k} · {site.model}",
                            f"{site.model} layer {layer} neuron {neuron} feature {k}", "feature", layer=layer,
                            neuron=neuron, feature=feature, count=count, n_clusters=len(features),
                            max_activation=fmt(sidecar["max_activation"], 4), nav=nav)
        html = feature_template.render(context).encode()
        (folder / f"F{k}").mkdir()
        (folder / f"F{k}" / "index.html").write_bytes(html)
        feature_bytes += len(html)
    return count, len(features), sidecar_bytes, len(page), feature_bytes, twin_bytes


# Worker state: set in the parent before the pool forks, so workers share it copy-on-write.
_job: dict = {}


def _render_range(neurons: range) -> list[tuple[int, ...]]:
    site, data, base = _job["site"], _job["data"], _job["base"]
    return [render_neuron(site, data, neuron, base / f"N{neuron}") for neuron in neurons]


POOL_MIN_NEURONS = 64  # fewer neurons per layer than this render in-process (forking costs more than it saves)


def render_layer(site: Site, data: LayerData, base: Path, workers: int, bar) -> list[tuple[int, ...]]:
    """Render every neuron of a layer, across `workers` forked processes; returns render_neuron's tuples."""
    _job.update(site=site, data=data, base=base)
    d_mlp = site.atlas.d_mlp
    sizes: list[tuple[int, ...]] = []
    if workers <= 1 or d_mlp < POOL_MIN_NEURONS or "fork" not in multiprocessing.get_all_start_methods():
        for neuron in range(d_mlp):
            sizes.extend(_render_range(range(neuron, neuron + 1)))
            bar.update(1)
        return sizes
    chunk = max(1, min(64, d_mlp // (workers * 8)))
    ranges = [range(start, min(d_mlp, start + chunk)) for start in range(0, d_mlp, chunk)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for part in pool.map(_render_range, ranges):
            sizes.extend(part)
            bar.update(len(part))
    return sizes


# ---------------------------------------------------------------------------------------------------------------
# Model-wide files


def neuron_table(atlas: Atlas) -> dict:
    """Compact columnar table of every neuron (row i = layers[i // d_mlp], neuron i % d_mlp)."""
    table = atlas.metrics
    expected = [(layer, neuron) for layer in atlas.layers for neuron in range(atlas.d_mlp)]
    found = list(zip(table["layer"].tolist(), table["neuron"].tolist()))
    if found != expected:
        raise ArtefactError("the cluster metrics table does not list this atlas's layers and neurons in order; "
                            "re-run `atlas cluster`")
    columns = {"max_activation": [number(v, 4) for v in table["max_activation"]]}
    for name in METRIC_NAMES:
        if name in ("n_examples", "n_clusters"):
            columns[name] = [int(v) for v in table[name]]
        else:
            columns[name] = [number(v, 3) for v in table[name]]
    return {"schema_version": SIDECAR_SCHEMA, "kind": "neuron-table", "model": atlas.cfg.name,
            "layers": atlas.layers, "d_mlp": atlas.d_mlp, "columns": columns}


def token_index(atlas: Atlas, central_tokens: dict[int, np.ndarray], central_neurons: dict[int, np.ndarray]) -> dict:
    """Token id -> neurons (row in the neuron table) whose feature clusters' central examples peak on that token,
    those with most such clusters first, then by row."""
    token = np.concatenate([central_tokens[layer].astype(np.int64) for layer in atlas.layers] or [np.zeros(0, int)])
    row = np.concatenate([central_neurons[layer].astype(np.int64) + position * atlas.d_mlp
                          for position, layer in enumerate(atlas.layers)] or [np.zeros(0, int)])
    if len(token):
        pairs, counts = np.unique(np.stack([token, row], axis=1), axis=0, return_counts=True)
    else:
        pairs, counts = np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    pairs = pairs[np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))]
    unique_tokens, starts = np.unique(pairs[:, 0], return_index=True)
    ends = np.r_[starts[1:], len(pairs)].astype(np.int64)
    return {"schema_version": SIDECAR_SCHEMA, "kind": "token-index", "model": atlas.cfg.name,
            "layers": atlas.layers, "d_mlp": atlas.d_mlp, "token_ids": [int(t) for t in unique_tokens],
            "neurons": [[int(r) for r in pairs[s:e, 1]] for s, e in zip(starts, ends)]}


def central_tokens_of(data: LayerData, window_before: int) -> tuple[np.ndarray, np.ndarray]:
    """The max token id of every cluster's central example, and the neuron each cluster belongs to."""
    tokens = data.window_tokens[data.cluster_central, window_before] if len(data.cluster_central) else \
        np.zeros(0, np.int64)
    neurons = np.repeat(np.arange(len(data.cluster_offsets) - 1), np.diff(data.cluster_offsets))
    return tokens, neurons


def random_neuron(atlas: Atlas) -> tuple[int, int]:
    """A fixed 'random' neuron (from cfg.seed) for the static link; JavaScript picks a fresh one on each click."""
    with_examples = np.flatnonzero(atlas.metrics["n_examples"] > 0)
    pool = with_examples if len(with_examples) else np.arange(atlas.n_neurons)
    row = int(np.random.default_rng(atlas.cfg.seed).choice(pool))
    return atlas.layers[row // atlas.d_mlp], row % atlas.d_mlp


def model_pages(site: Site, model_dir: Path, root_dir: Path) -> None:
    """The landing page, the model index, the method page and one static table per layer."""
    atlas = site.atlas
    env = environment()
    meta = atlas.meta
    table = atlas.metrics
    rand = random_neuron(atlas)
    coverage = {
        "layers": atlas.layers, "n_layers": meta.get("n_layers", len(atlas.layers)), "d_mlp": atlas.d_mlp,
        "n_neurons": atlas.n_neurons, "n_sequences": int(meta["n_sequences"]), "n_tokens": int(meta["n_tokens"]),
        "context_length": meta.get("context_length", "?"), "dataset": site.prov["dataset"],
        "with_examples": int((table["n_examples"] > 0).sum()), "n_features": int(table["n_clusters"].sum()),
        "max_examples": meta.get("max_examples", "?"), "threshold": meta.get("threshold", "?"),
        "random": f"L{rand[0]}/N{rand[1]}/index.html",
    }

    def write(path: Path, template: str, context: dict) -> None:
        path.write_bytes(env.get_template(template).render(context).encode())

    write(root_dir / "index.html", "home.html", site.page(0, "", "Neuron Atlas", "index", "home", coverage=coverage))
    write(model_dir / "index.html", "model.html",
          site.page(1, f"{site.model}/", f"{site.model} · Neuron Atlas", site.model, "model", coverage=coverage))
    (model_dir / "method").mkdir()
    method = {"threshold": atlas.cfg.cluster_threshold, "space": atlas.cfg.neighbour_space,
              "count": atlas.cfg.neighbour_count, "neighbour_threshold": atlas.cfg.neighbour_threshold,
              "window_before": atlas.cfg.window_before, "window_after": atlas.cfg.window_after}
    write(model_dir / "method" / "index.html", "method.html",
          site.page(2, f"{site.model}/method/", f"Method · {site.model}", f"{site.model} method", "method",
                    report=report_rows(atlas.report), method=method, coverage=coverage))
    for position, layer in enumerate(atlas.layers):
        rows = slice(position * atlas.d_mlp, (position + 1) * atlas.d_mlp)
        column = {name: table[name][rows] for name in ("max_activation", "n_examples", "n_clusters",
                                                       "largest_share", "intra_distance", "inter_distance")}
        neurons = [{"n": n, "max": fmt(column["max_activation"][n], 3), "ex": int(column["n_examples"][n]),
                    "k": int(column["n_clusters"][n]), "share": fmt(column["largest_share"][n]),
                    "intra": fmt(column["intra_distance"][n]), "inter": fmt(column["inter_distance"][n])}
                   for n in range(atlas.d_mlp)]
        (model_dir / f"L{layer}").mkdir(exist_ok=True)
        write(model_dir / f"L{layer}" / "index.html", "layer.html",
              site.page(2, f"{site.model}/L{layer}/", f"Layer {layer} · {site.model}", f"{site.model} layer {layer}",
                        "layer", layer=layer, neurons=neurons))


def report_rows(report: dict) -> list[dict]:
    rows = []
    spaces = report.get("spaces", {})
    paper = report.get("paper", {})
    for name in sorted(set(spaces) | set(paper)):
        ours, theirs = spaces.get(name, {}), paper.get(name, {})
        counts = [ours.get(key) for key in ("n_neurons_intra", "n_neurons_inter", "n_neurons") if key in ours]
        rows.append({"space": clean_text(str(name)), "intra": fmt(ours.get("median_intra")),
                     "inter": fmt(ours.get("median_inter")), "n": " / ".join(fmt(c) for c in counts) or "–",
                     "paper_intra": fmt(theirs.get("median_intra")), "paper_inter": fmt(theirs.get("median_inter"))})
    return rows


def atlas_manifest(atlas: Atlas) -> dict:
    return {"schema_version": SIDECAR_SCHEMA, "kind": "atlas", "model": atlas.cfg.name, "layers": atlas.layers,
            "n_layers": atlas.meta.get("n_layers"), "d_mlp": atlas.d_mlp, "vocab_size": len(atlas.vocab),
            "token_dtype": token_dtype(len(atlas.vocab)), "window": {"before": atlas.cfg.window_before,
                                                                      "after": atlas.cfg.window_after},
            "cluster_threshold": atlas.cfg.cluster_threshold, "max_examples": atlas.meta.get("max_examples"),
            "histogram_edges": [number(e, 6) for e in atlas.histogram_edges], "provenance": provenance(atlas)}


def copy_static(target: Path) -> None:
    target.mkdir()
    for source in sorted(STATIC.iterdir()):
        if source.is_file() and not source.name.startswith("."):
            shutil.copyfile(source, target / source.name)


# ---------------------------------------------------------------------------------------------------------------
# Statistics, the up-to-date stamp, and the entry point


def site_bytes(folder: Path) -> tuple[int, int]:
    """(published bytes, file:// twin bytes) of every file under `folder`."""
    published = twins = 0
    for directory, _, files in os.walk(folder):
        for name in files:
            size = os.path.getsize(os.path.join(directory, name))
            if name.endswith(FILE_COPY_SUFFIX):
                twins += size
            else:
                published += size
    return published, twins


def size_projection(sizes: np.ndarray, shared: float, examples: int = 100, clusters=(3, 5, 10)) -> dict:
    """Bytes per published neuron projected to `examples` examples and k clusters per neuron, from a least-squares
    fit over this atlas's neurons: sidecar ≈ a + b·examples + c·k, pages ≈ d + e·k. `shared` (index pages, layer
    tables, vocabulary, neuron table, token index, per neuron) is added as measured."""
    rich = sizes[sizes[:, 0] >= 2]
    if len(rich) < 3:
        return {}
    design = np.stack([np.ones(len(rich)), rich[:, 0], rich[:, 1]], axis=1).astype(np.float64)
    sidecar = np.linalg.lstsq(design, rich[:, 2].astype(np.float64), rcond=None)[0]
    pages = np.linalg.lstsq(design[:, [0, 2]], (rich[:, 3] + rich[:, 4]).astype(np.float64), rcond=None)[0]
    return {str(k): round(float(sidecar @ [1, examples, k] + pages @ [1, k] + shared)) for k in clusters}


def read_stats(cfg: AtlasConfig) -> dict:
    """The last render's figures (out_dir/render/stats.json), for `make bench`: bytes_per_neuron (published site bytes
    / neurons; the GitHub Pages budget is 27 KB), local_bytes_per_neuron (with the file:// twins), neurons, seconds,
    neurons_per_second, mean_examples, mean_clusters and projected_bytes_per_neuron_at_100_examples (keyed by the
    mean number of feature clusters per neuron, "3", "5" and "10")."""
    return read_json(AtlasPaths.of(cfg).stage("render") / "stats.json", STATS_KIND, STATS_SCHEMA)


def fingerprint(cfg: AtlasConfig) -> str:
    """What the site depends on: config, upstream stage metas, this code, templates and static files."""
    import hashlib

    paths = AtlasPaths.of(cfg)
    digest = hashlib.sha256()
    for part in (cfg.config_hash(), cfg.site_url, str(Path(cfg.site_dir).resolve()), __version__,
                 str(SIDECAR_SCHEMA)):
        digest.update(part.encode() + b"\0")
    sources = [paths.collect_meta, paths.embed_meta, paths.cluster_meta, paths.importance_meta,
               paths.neighbours_meta, paths.report, Path(__file__)]
    sources += sorted(TEMPLATES.glob("*")) + sorted(STATIC.glob("*"))
    for source in sources:
        digest.update(str(source.name).encode() + b"\0")
        digest.update(source.read_bytes() if source.is_file() else b"missing")
    return digest.hexdigest()[:16]


def up_to_date(cfg: AtlasConfig, stamp: str) -> dict | None:
    stats_path = AtlasPaths.of(cfg).stage("render") / "stats.json"
    if not (Path(cfg.site_dir) / "index.html").is_file():
        return None
    try:
        stats = read_json(stats_path, STATS_KIND, STATS_SCHEMA)
    except ArtefactError:
        return None
    return stats if stats.get("fingerprint") == stamp else None


def recover_interrupted(site_dir: Path) -> None:
    """Undo what a render killed mid-swap can leave: the old site moved aside, or a stale temporary folder."""
    old = site_dir.with_name(f".{site_dir.name}.old")
    if not site_dir.exists() and old.is_dir():
        log.warning("render: restoring %s from an interrupted swap", site_dir)
        os.replace(old, site_dir)
    if site_dir.parent.is_dir():
        for stale in sorted(site_dir.parent.glob(f".{site_dir.name}.*.tmp")):
            log.warning("render: removing %s left by an interrupted render", stale)
            shutil.rmtree(stale, ignore_errors=True)


def run(cfg: AtlasConfig, vocabulary: list[str] | None = None, force: bool = False) -> dict:
    """Render the whole site into cfg.site_dir (atomically) and write out_dir/render/stats.json: bytes per neuron
    (published files / neurons, and all local files / neurons), seconds, neurons per second, and a projection of
    bytes per neuron at 100 examples. Skips when the site is up to date with its inputs (unless `force`).

    `vocabulary` (token id -> string) replaces the model's tokenizer; tests use it for hostile tokens."""

    stamp = fingerprint(cfg)
    if vocabulary is None and not force:
        done = up_to_date(cfg, stamp)
        if done is not None:
            log.info("render: up to date (%s)", cfg.site_dir)
            return done
    started = time.perf_counter()
    atlas = load_atlas(cfg, vocabulary)
    site = Site(atlas)
    site_dir = Path(cfg.site_dir)
    recover_interrupted(site_dir)
    workers = worker_count(cfg)
    central_tokens, central_neurons, sizes = {}, {}, []
    with atomic_dir(site_dir) as tmp:
        (tmp / ".nojekyll").write_bytes(b"")
        copy_static(tmp / "static")
        model_dir = tmp / cfg.name
        data_dir = model_dir / "data"
        data_dir.mkdir(parents=True)
        write_data_file(data_dir / "vocab.json", "vocab", {"schema_version": SIDECAR_SCHEMA, "kind": "vocab",
                                                           "model": cfg.name, "tokens": atlas.vocab})
        (data_dir / "atlas.json").write_bytes(dumps(atlas_manifest(atlas)) + b"\n")
        write_data_file(data_dir / "neurons.json", "neurons", neuron_table(atlas))
        model_pages(site, model_dir, tmp)
        with progress(total=atlas.n_neurons, desc="render", unit="neuron") as bar:
            for layer in atlas.layers:
                data = load_layer(atlas, layer)
                central_tokens[layer], central_neurons[layer] = central_tokens_of(data, cfg.window_before)
                sizes += render_layer(site, data, model_dir / f"L{layer}", workers, bar)
                _job.clear()
        write_data_file(data_dir / "tokens.json", "tokens", token_index(atlas, central_tokens, central_neurons))
        published, twins = site_bytes(tmp)
    seconds = time.perf_counter() - started
    n = atlas.n_neurons
    per_neuron = np.array(sizes, np.int64).reshape(-1, 6)
    shared = (published - per_neuron[:, 2:5].sum()) / n if n else 0.0
    stats = {"kind": STATS_KIND, "schema_version": STATS_SCHEMA, "fingerprint": stamp, "neurons": n,
             "total_bytes": published, "bytes_per_neuron": round(published / n, 1) if n else 0.0,
             "local_bytes_per_neuron": round((published + twins) / n, 1) if n else 0.0,
             "mean_examples": round(float(per_neuron[:, 0].mean()), 2) if n else 0.0,
             "mean_clusters": round(float(per_neuron[:, 1].mean()), 2) if n else 0.0,
             "projected_bytes_per_neuron_at_100_examples": size_projection(per_neuron, shared),
             "seconds": round(seconds, 3), "neurons_per_second": round(n / seconds, 1) if seconds > 0 else 0.0}
    write_json(AtlasPaths.of(cfg).stage("render") / "stats.json", stats)
    log.info("render: %d neurons in %.1f s (%.0f neurons/s); %.1f KB per neuron published (%.1f KB with the file:// "
             "copies); site %s", n, seconds, stats["neurons_per_second"], stats["bytes_per_neuron"] / 1000,
             stats["local_bytes_per_neuron"] / 1000, site_dir)
    return stats
