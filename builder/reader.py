"""Read a published atlas from Python: a rendered site folder, or a site on the web by URL, each unit's data decoded
from its sidecar exactly as docs/sidecar-schema.md (the contract) defines it.

    from builder.reader import open_atlas

    atlas = open_atlas("site/")                          # a rendered folder: every model in it
    atlas = open_atlas("2025-01-31-0123456789/")         # an extracted release archive: the same, frozen
    atlas = open_atlas("https://example.org/atlas/gpt2-small/")   # on the web: a model's address
    atlas.models                                         # ["gpt2-small"]
    atlas.sets("gpt2-small")                             # its subject sets (MLP layers, SAEs), from neurons.json
    unit = atlas.unit("gpt2-small", "L3", 42)            # a neuron; an SAE's latent the same way, by the SAE's slug
    unit.examples.tokens, unit.examples.activation       # [N, W] token strings and activations of the windows
    unit.features[0].examples.tokens                     # the first feature's examples
    atlas.similar("gpt2-small", "L3", 42)                # its features' similar features

A web site's root lists no models in its data, so open a model's address there (a folder's root is enough).
Every file's `kind` and `schema_version` is checked; a version this module does not know, a unit without a page, a
file that is missing or damaged and a network failure are each one line (a ReaderError) naming the file and the fix.
Standard library and numpy only; the packed encodings are the render package's codec, the one Python copy of them.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import orjson

from builder.errors import AtlasError
from builder.render.codec import (SIMILARITY_SCALE, dequantise_activations, dequantise_importance, unpack,
                                  unpack_json)

# The schema version of each file kind this reader decodes (docs/sidecar-schema.md). A site rendered with another
# version of a kind is refused rather than misread; tests/test_reader.py checks these against the renderer's.
READABLE_VERSIONS = {"atlas": 2, "common": 2, "neuron-table": 4, "neuron": 3, "similar": 2}

TIMEOUT_SECONDS = 30.0  # per request, when reading a site over the network


class ReaderError(AtlasError):
    """A published atlas cannot be read: a file is missing, damaged, or not where a site keeps it."""


class UnknownSchemaError(ReaderError):
    """A data file has a kind or schema version this reader does not decode."""


class NotInAtlasError(ReaderError):
    """The model, subject set or unit asked for is not in the atlas (no page)."""


class FetchError(ReaderError):
    """Reading a file failed: the network, the server or the file system."""


# ---------------------------------------------------------------------------------------------------------------
# Where the files are


@dataclass(frozen=True)
class FolderSource:
    """A rendered site folder."""

    root: Path

    def where(self, path: str) -> str:
        return str(self.root / path)

    def read(self, path: str) -> bytes | None:
        """The file's bytes, or None when there is none."""
        try:
            return (self.root / path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            raise FetchError(f"cannot read {self.where(path)} ({error.strerror}); check the folder and its "
                             "permissions") from None


@dataclass(frozen=True)
class UrlSource:
    """A site on the web, read with urllib; `base` ends with "/"."""

    base: str
    timeout: float

    def where(self, path: str) -> str:
        return self.base + path

    def read(self, path: str) -> bytes | None:
        """The file's bytes, or None when the server has none (404, 410)."""
        url = self.where(path)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            if error.code in (404, 410):
                return None
            raise FetchError(f"{url} answered HTTP {error.code} {error.reason}; try again later, or check the "
                             "address") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:  # refused, DNS, timeout
            reason = getattr(error, "reason", None) or error
            raise FetchError(f"could not fetch {url} ({reason}); check the address and the network connection"
                             ) from None


Source = FolderSource | UrlSource


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------------------------
# What a unit's sidecar decodes to


@dataclass(frozen=True)
class SubjectSetInfo:
    """One subject set, as neurons.json lists it: its units are rows offset … offset + size − 1 of the unit table."""

    key: str
    slug: str  # its URL path segment: `{model}/{slug}/N{unit}/`
    kind: str  # "mlp" or "sae"
    layer: int
    size: int
    offset: int


@dataclass(frozen=True)
class Examples:
    """Examples in corpus order, each a window of W = before + 1 + after tokens whose column `before` is its max
    token (the unit's `window_before`)."""

    tokens: np.ndarray  # [N, W] object: each token's string, None outside the sequence
    activation: np.ndarray  # [N, W] float64, dequantised (error ≤ (hi − lo) / 508); NaN outside the sequence
    importance: np.ndarray  # [N, before + 1] float64 in [0, 1] (error ≤ 1/508); NaN where not scored
    sequence: np.ndarray  # [N] uint32: the sequence in the packed dataset
    position: np.ndarray  # [N] uint32: the max token's position in it
    feature: np.ndarray  # [N] uint32: the feature (cluster) each example belongs to

    def __len__(self) -> int:
        return len(self.sequence)

    def rows(self, index: np.ndarray) -> "Examples":
        return Examples(self.tokens[index], self.activation[index], self.importance[index], self.sequence[index],
                        self.position[index], self.feature[index])


@dataclass(frozen=True)
class Feature:
    """Feature k of a unit: the section `path` (`…/N{unit}/#F{k}`) of its page."""

    index: int
    size: int
    central: int  # the index in the unit's examples of its central example
    members: np.ndarray  # the indices in the unit's examples of its examples, corpus order
    examples: Examples  # those examples
    n_similar: int  # its rows in similar.json
    path: str


@dataclass(frozen=True)
class Intervals:
    """Examples below the threshold: entry i is the first sequence of interval `interval[i]` of
    [0, threshold × max_activation), split at `bounds`."""

    bounds: np.ndarray  # [n + 1]
    interval: np.ndarray  # [M] uint8
    sequence: np.ndarray  # [M] uint32
    position: np.ndarray  # [M] uint32: where its highest activation is
    activation: np.ndarray  # [M] float64: that activation
    tokens: np.ndarray  # [M, W] object, like Examples.tokens


@dataclass(frozen=True)
class Linkage:
    """The dendrogram of a unit's N examples, N − 1 merges (nodes N + j: the cluster made at step j)."""

    children: np.ndarray  # [N − 1, 2] uint32
    distance: np.ndarray  # [N − 1] float32: the merge's cosine distance

    def matrix(self) -> np.ndarray:
        """scipy's linkage matrix [N − 1, 4] (children, distance, size), for scipy.cluster.hierarchy's fcluster,
        dendrogram or cophenet."""
        n = len(self.children) + 1
        sizes = np.ones(2 * n - 1, np.float64)
        for step, (left, right) in enumerate(self.children.tolist()):
            sizes[n + step] = sizes[left] + sizes[right]
        return np.column_stack([self.children.astype(np.float64), self.distance.astype(np.float64),
                                sizes[n:]]).reshape(-1, 4)


@dataclass(frozen=True)
class Histogram:
    """Activations over every token of the dataset: bin b holds those in (edges[b − 1], edges[b]], with
    edges[−1] = −∞ and edges[n] = +∞ (n edges, n + 1 bins)."""

    edges: np.ndarray  # [n] float64, common.json's histogram_edges
    counts: np.ndarray  # [n + 1] int64


@dataclass(frozen=True)
class Logits:
    """Direct logit effects: (token string, effect), most extreme first."""

    top: list[tuple[str, float]]
    bottom: list[tuple[str, float]]


@dataclass(frozen=True)
class Unit:
    """One neuron's or latent's data, decoded from its `neuron.json` and `neuron.bin`."""

    model: str
    set: str  # its subject set's key
    slug: str
    kind: str  # "mlp" or "sae"
    layer: int
    unit: int
    path: str  # its page in the site, `{model}/{slug}/N{unit}/`
    max_activation: float
    metrics: dict  # polysemanticity metrics; None where undefined
    cluster_threshold: float
    window_before: int
    window_after: int
    activation_range: tuple[float, float]  # [lo, hi] of the quantised activations
    examples: Examples
    features: list[Feature]
    intervals: Intervals
    linkage: Linkage
    histogram: Histogram
    logits: Logits


@dataclass(frozen=True)
class SimilarFeature:
    """A row of similar.json: this unit's feature `feature` is similar to feature `cluster` of `unit` of `set`."""

    feature: int
    set: str  # the other feature's subject set key
    slug: str
    unit: int
    cluster: int
    similarity: float  # cosine similarity, to 4 decimals
    before: str  # the text of the other feature's central example: before its max token, the max token, after
    max_token: str
    after: str
    top_token: str  # the other feature's most frequent max token, its count, and the other feature's size
    top_count: int
    size: int
    path: str  # `{model}/{slug}/N{unit}/#F{cluster}`


# ---------------------------------------------------------------------------------------------------------------
# Opening an atlas


def open_atlas(location: str | Path, timeout: float = TIMEOUT_SECONDS) -> "Atlas":
    """An atlas from a rendered folder (a site's root, or one model's folder in it), an extracted release archive
    (`{id}/`, holding manifest.json and data/) or a URL (a model's address, `https://…/{model}/`: a site's root
    lists no models in its data)."""
    if is_url(location):
        base = str(location) if str(location).endswith("/") else f"{location}/"
        model_source: Source = UrlSource(base, timeout)
    else:
        model_source = FolderSource(Path(location).expanduser())
    manifest = model_source.read("data/atlas.json")
    if manifest is not None:  # one model's folder or address: the site root is its parent
        model = checked(model_source.where("data/atlas.json"), manifest, "atlas")["model"]
        parent = (UrlSource(urllib.parse.urljoin(model_source.base, "../"), timeout)
                  if isinstance(model_source, UrlSource) else FolderSource(model_source.root.resolve().parent))
        return Atlas(parent, [model])
    if isinstance(model_source, UrlSource):
        raise NotInAtlasError(f"{model_source.where('data/atlas.json')} not found: a site's root lists no models, "
                              f"so open a model's address, {model_source.base}{{model}}/")
    if not model_source.root.is_dir():
        raise NotInAtlasError(f"{model_source.root} is not a folder; pass a rendered site folder (site_dir) or a URL")
    if (model_source.root / "manifest.json").is_file() and (model_source.root / "data").is_dir():
        # An extracted release archive `{id}/` (docs/releases.md): its data/ holds the site's data files.
        model_source = FolderSource(model_source.root / "data")
    models = sorted(p.name for p in model_source.root.iterdir() if (p / "data" / "atlas.json").is_file())
    if not models:
        raise NotInAtlasError(f"{model_source.root} holds no atlas (no {{model}}/data/atlas.json in it); render one "
                              "with `atlas build`, or pass the site folder")
    return Atlas(model_source, models)


def checked(where: str, data: bytes, kind: str) -> dict:
    """A data file's JSON, refused unless it is `kind` at a version this reader decodes."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ReaderError(f"{where} is not JSON; the file is damaged: download it again or re-render the site"
                          ) from None
    found = document.get("kind") if isinstance(document, dict) else None
    if found != kind:
        raise UnknownSchemaError(f"{where} is of kind {found!r}, not {kind!r}; it is not the file a site keeps "
                                 "here (docs/sidecar-schema.md lists them)")
    version, readable = document.get("schema_version"), READABLE_VERSIONS[kind]
    if version != readable:
        fix = ("update neuron-atlas to a version that reads it" if isinstance(version, int) and version > readable
               else "re-render the site with this version, or read it with the neuron-atlas version that built it")
        raise UnknownSchemaError(f"{where} is {kind} schema version {version!r}, but this reader decodes version "
                                 f"{readable}; {fix}")
    return document


class Atlas:
    """A published atlas's models, subject sets and units. Model-wide files are read once and kept."""

    def __init__(self, source: Source, models: list[str]):
        self.source = source
        self.models = models
        self._kept: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"Atlas({self.source.where('')!r}, models={self.models})"

    def _read(self, path: str, kind: str, missing: str) -> tuple[dict, bytes] | None:
        """A data file's JSON (checked) and its companion's bytes (empty without one); None when it is absent."""
        data = self.source.read(path)
        if data is None:
            return None
        document = checked(self.source.where(path), data, kind)
        if "bin" not in document:
            return document, b""
        name = document["bin"]
        if not isinstance(name, str) or PurePosixPath(name).name != name or name in ("", ".", ".."):
            raise ReaderError(f"{self.source.where(path)} names {name!r} as its binary companion, which is not a "
                              "file beside it; the file is damaged: download it again or re-render the site")
        companion = str(PurePosixPath(path).with_name(name))
        blob = self.source.read(companion)
        if blob is None:
            raise ReaderError(f"{self.source.where(companion)} is missing ({missing}); download the site again or "
                              "re-render it")
        pinned = document.get("bin_sha256")  # the .json pins its companion, so a citation's one hash covers both
        if pinned is not None and hashlib.sha256(blob).hexdigest() != pinned:
            raise ReaderError(f"{self.source.where(companion)} does not match the bin_sha256 of "
                              f"{self.source.where(path)}; one is damaged or from another build: download both "
                              "again or re-render the site")
        return document, blob

    def _shared(self, model: str, name: str, kind: str) -> dict:
        path = f"{model}/data/{name}"
        if path not in self._kept:
            if model not in self.models:
                raise NotInAtlasError(f"no model {model!r} in {self.source.where('')}: it has {self.models}")
            found = self._read(path, kind, f"{path} names it")
            if found is None:
                raise ReaderError(f"{self.source.where(path)} not found; the site is incomplete: download it "
                                  "again or re-render it")
            self._kept[path] = found[0]
        return self._kept[path]

    def manifest(self, model: str) -> dict:
        """The model's `atlas.json`: layers, sizes, window, histogram edges, provenance."""
        return self._shared(model, "atlas.json", "atlas")

    def common(self, model: str) -> dict:
        """The model's `common.json`: shared token strings, metric definitions, histogram edges, provenance."""
        return self._shared(model, "common.json", "common")

    def sets(self, model: str) -> list[SubjectSetInfo]:
        """The model's subject sets, in order (from `neurons.json`)."""
        return [SubjectSetInfo(s["key"], s["slug"], s["kind"], s["layer"], s["size"], s["offset"])
                for s in self._shared(model, "neurons.json", "neuron-table")["sets"]]

    def subject_set(self, model: str, set_slug: str) -> SubjectSetInfo:
        """A subject set by its slug (or key)."""
        sets = self.sets(model)
        for subject in sets:
            if set_slug in (subject.slug, subject.key):
                return subject
        raise NotInAtlasError(f"{model} has no subject set {set_slug!r}; its sets are "
                              f"{', '.join(s.slug for s in sets)}")

    def _unit_file(self, model: str, set_slug: str, unit: int, name: str, kind: str
                   ) -> tuple[SubjectSetInfo, dict, bytes, str]:
        subject = self.subject_set(model, set_slug)
        if not 0 <= unit < subject.size:
            raise NotInAtlasError(f"{model} {subject.slug} has units 0 to {subject.size - 1}; {unit} is not one")
        path = f"{model}/{subject.slug}/N{unit}/{name}"
        found = self._read(path, kind, f"{name} names it")
        if found is None:
            why = ("latents never active on the corpus have no page" if subject.kind == "sae"
                   else "the site is incomplete: download it again or re-render it")
            raise NotInAtlasError(f"{subject.slug} unit {unit} has no page ({self.source.where(path)} not found); "
                                  f"{why}")
        return subject, *found, self.source.where(path)

    def unit(self, model: str, set_slug: str, unit: int) -> Unit:
        """A neuron's or a latent's data, decoded from its sidecar."""
        subject, document, blob, where = self._unit_file(model, set_slug, unit, "neuron.json", "neuron")
        common = self.common(model)
        try:
            return decode_unit(document, blob, subject, common["tokens"], common["histogram_edges"])
        except (KeyError, IndexError, TypeError, ValueError, zlib.error) as error:
            # Untrusted bytes at the boundary: whatever does not decode is one line, never a traceback.
            raise ReaderError(f"{where} does not decode as a neuron sidecar ({type(error).__name__}: {error}); the "
                              "file is damaged: download it again or re-render the site") from None

    def similar(self, model: str, set_slug: str, unit: int) -> list[SimilarFeature]:
        """The similar features of a unit's features (its `similar.json`), grouped by feature, most similar first."""
        _, document, blob, where = self._unit_file(model, set_slug, unit, "similar.json", "similar")
        sets = self.sets(model)
        try:
            rows = unpack(blob, document["rows"], "i4").reshape(-1, 5).tolist()
            texts = unpack_json(blob, document["text"])
            return [SimilarFeature(k, sets[position].key, sets[position].slug, other, cluster,
                                   similarity / SIMILARITY_SCALE, *text[:3], text[3], int(text[4]), int(text[5]),
                                   f"{model}/{sets[position].slug}/N{other}/#F{cluster}")
                    for (k, position, other, cluster, similarity), text in zip(rows, texts, strict=True)]
        except (KeyError, IndexError, TypeError, ValueError, zlib.error) as error:
            raise ReaderError(f"{where} does not decode as a similar-features file ({type(error).__name__}: "
                              f"{error}); the file is damaged: download it again or re-render the site") from None


# ---------------------------------------------------------------------------------------------------------------
# Decoding (docs/sidecar-schema.md, `neuron.json`)


def token_strings(ids: np.ndarray, dtype: str, vocabulary: list[str]) -> np.ndarray:
    """Indices into a page's vocabulary -> its strings (object array); the dtype's maximum (outside the
    sequence) -> None."""
    outside = np.iinfo(np.dtype(f"<{dtype}")).max
    table = np.array([*vocabulary, None], dtype=object)
    return table[np.where(ids == outside, len(vocabulary), ids.astype(np.int64))]


def decode_unit(document: dict, blob: bytes, subject: SubjectSetInfo, common_tokens: list[str],
                histogram_edges: list[float]) -> Unit:
    window = document["window"]
    before, after = int(window["before"]), int(window["after"])
    width = before + 1 + after
    vocabulary = common_tokens + unpack_json(blob, document["vocab"])  # the page's vocabulary
    packed = document["examples"]
    n, dtype = int(packed["count"]), packed["token_dtype"]
    lo, hi = packed["activation_range"]
    examples = Examples(
        tokens=token_strings(unpack(blob, packed["tokens"], dtype).reshape(n, width), dtype, vocabulary),
        activation=dequantise_activations(unpack(blob, packed["activation"], "u1").reshape(n, width), lo, hi),
        importance=dequantise_importance(unpack(blob, packed["importance"], "u1").reshape(n, before + 1)),
        sequence=unpack(blob, packed["sequence"], "u4").reshape(n),
        position=unpack(blob, packed["position"], "u4").reshape(n),
        feature=unpack(blob, packed["cluster"], "u4").reshape(n))
    features = []
    for k, cluster in enumerate(document["clusters"]):
        members = np.flatnonzero(examples.feature == k)
        features.append(Feature(k, int(cluster["size"]), int(cluster["central"]), members, examples.rows(members),
                                int(cluster["similar"]), f"{document['path']}#F{k}"))
    intervals = document["intervals"]
    m = len(intervals["activation"])
    edges = np.asarray(histogram_edges, np.float64)
    counts = np.zeros(len(edges) + 1, np.int64)
    first, shown = int(document["histogram"]["first"]), document["histogram"]["counts"]
    counts[first:first + len(shown)] = shown
    return Unit(
        model=document["model"], set=document["set"], slug=subject.slug, kind=subject.kind, layer=document["layer"],
        unit=document["neuron"], path=document["path"], max_activation=document["max_activation"],
        metrics=document["metrics"], cluster_threshold=document["cluster_threshold"], window_before=before,
        window_after=after, activation_range=(lo, hi), examples=examples, features=features,
        intervals=Intervals(
            bounds=np.asarray(intervals["bounds"], np.float64),
            interval=unpack(blob, intervals["interval"], "u1").reshape(m),
            sequence=unpack(blob, intervals["sequence"], "u4").reshape(m),
            position=unpack(blob, intervals["position"], "u4").reshape(m),
            activation=np.asarray(intervals["activation"], np.float64),
            tokens=token_strings(unpack(blob, intervals["tokens"], dtype).reshape(m, width), dtype, vocabulary)),
        linkage=Linkage(unpack(blob, document["linkage"]["children"], "u4").reshape(max(n - 1, 0), 2),
                        unpack(blob, document["linkage"]["distance"], "f4").reshape(max(n - 1, 0))),
        histogram=Histogram(edges, counts),
        logits=Logits(*([(vocabulary[token], float(effect)) for token, effect in document["logits"][side]]
                        for side in ("top", "bottom"))))
