"""Page contexts and the one jinja2 environment: templates get plain dicts, data reaches pages only as escaped text
or through external JSON."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np
from markupsafe import Markup, escape

from builder.config import EMBEDDED_MODEL
from builder.render.codec import write_data_file
from builder.render.inputs import Atlas, SetData
from builder.render.sidecars import static_example, subject_sets, unit_path, unit_sidecar
from builder.render.text import clean_text, display_token, fmt
from builder.subjects import SubjectSet, UnitId

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "templates"

# No inline script or style may run; scripts, styles and data only from the site itself (`'self'` also matches file:
# URLs for a page opened over file://). A constant, so templates may print it unescaped.
CSP = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'"

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


def page_url(atlas: Atlas, path: str) -> str:
    """The page's URL as a citation names it: absolute under site_url, else the path relative to the site root."""
    return f"{atlas.cfg.site_url.rstrip('/')}/{path}" if atlas.cfg.site_url else path


def citation_key(path: str) -> str:
    """A BibTeX key unique to the page: its path, with every character BibTeX keys cannot hold as '-'."""
    return "neuronatlas:" + (re.sub(r"[^A-Za-z0-9:.-]", "-", path.strip("/").replace("/", ":")) or "index")


def feature_path(unit_page: str, k: int) -> str:
    """A feature's address: its section of the unit's page (`{model}/{slug}/N{unit}/#F{k}`)."""
    return f"{unit_page}#F{k}"


def feature_key_path(unit_page: str, k: int) -> str:
    """The path a feature's BibTeX key is made of (`…/N{unit}/F{k}/`, the key its own page once had)."""
    return f"{unit_page}F{k}/"


class Region(NamedTuple):
    """A stamped region of a page: `<!--atlas:{name}-->text<!--/atlas:{name}-->`, whose text `atlas release`
    (builder/release.py) replaces by the release's value. An HTML comment cannot come from data (autoescape turns
    every `<` of data into `&lt;`), so only the templates and `stamped` below make regions."""

    name: str

    @property
    def markup(self) -> Markup:
        return Markup(f"<!--atlas:{self.name}-->{UNSTAMPED[self.name]}<!--/atlas:{self.name}-->")


RELEASE = Region("release")  # the release id, `{date}-{10 hex}`
MANIFEST = Region("manifest")  # the sha256 of the release manifest's file list, whose first 10 digits end the id
UNSTAMPED = {"release": "unreleased", "manifest": "unreleased"}  # what a working build's regions say

Parts = list  # text pieces and Regions, in order: a citation with its release still to be stamped in


def stamped(parts: Parts) -> Markup:
    """The parts as page markup: text escaped, regions as comment-delimited markup."""
    return Markup("").join(part.markup if isinstance(part, Region) else escape(part) for part in parts)


def resolve(parts: Parts, **values: str) -> str:
    """The parts as a reader sees them once stamped with `values` (region name -> text; unstamped by default)."""
    return "".join(values.get(part.name, UNSTAMPED[part.name]) if isinstance(part, Region) else part
                   for part in parts)


class Cited(NamedTuple):
    """What a page's citation pins: the data file it shows (its path from the site root and sha256), or, for a page
    that summarises the whole atlas, the release manifest (its sha256 exists only once released: a region)."""

    label: str
    sha256: str | Region

    @property
    def short(self) -> str:
        """How the one-line citation names it."""
        return "manifest" if isinstance(self.sha256, Region) else "data"


CITE_MANIFEST = Cited("release manifest", MANIFEST)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance_note(prov: dict) -> str:
    return (f"Model {prov['model']} (revision {prov['model_revision']}); dataset {prov['dataset']}, "
            f"{prov['n_sequences']} sequences, {prov['n_tokens']} tokens; threshold {prov['threshold']}; "
            f"code {prov['code_version']}; config {prov['config_hash']}")


def bibtex(atlas: Atlas, prov: dict, path: str, title: str, cited: Cited, key_path: str | None = None,
           note: str | None = None) -> Parts:
    """BibTeX for the page at `path` (absolute when site_url is set, else the relative path), naming the release
    and what `cited` pins; its key from `key_path` when given (a feature: `feature_key_path`), else from `path`;
    `note` replaces the provenance note (the MNIST pages describe their own data). static/atlas.js builds the same
    text for unit pages (tests compare the two)."""
    from builder.render.text import bibtex_escape

    url = page_url(atlas, path)
    year = prov["build_date"][:4]
    return [f"@misc{{{citation_key(key_path or path)},\n  author = {{{bibtex_escape(author(atlas))}}},\n"
            f"  title = {{{{Neuron Atlas}}: {bibtex_escape(title)}}},\n"
            f"  howpublished = {{\\url{{{url_argument(url)}}}}},\n"
            f"  note = {{{bibtex_escape(note or provenance_note(prov))}; release ", RELEASE,
            f"; data {bibtex_escape(cited.label)} sha256 ", cited.sha256,
            f"}},\n  year = {{{bibtex_escape(year)}}},\n  date = {{{bibtex_escape(prov['build_date'])}}}\n}}\n"]


def url_argument(url: str) -> str:
    """A URL as hyperref's \\url argument: `#` and `%` escaped with a backslash, which \\url drops (percent-encoding
    them would name another URL: `…/N1/%23F1` is not the section `…/N1/#F1`). static/atlas.js does the same."""
    return re.sub(r"[%#]", r"\\\g<0>", url)


def author(atlas: Atlas) -> str:
    return clean_text(atlas.cfg.author) or "Neuron Atlas"


def citation_line(atlas: Atlas, prov: dict, path: str, title: str, cited: Cited) -> Parts:
    """The one-line citation shown above the BibTeX: author, year, title, URL, the release and what it pins."""
    return [f"{author(atlas)} ({prov['build_date'][:4]}). Neuron Atlas: {title}. {page_url(atlas, path)}. Release ",
            RELEASE, f"; {cited.short} sha256 ", cited.sha256, "."]


def citation(atlas: Atlas, prov: dict, path: str, title: str, cited: Cited, note: str | None = None) -> dict:
    """A server-written citation as a page's context has it: `cite_line` and `cite` (BibTeX) as page markup."""
    return {"cite_line": stamped(citation_line(atlas, prov, path, title, cited)),
            "cite": stamped(bibtex(atlas, prov, path, title, cited, note=note))}


class Site:
    """Page contexts shared by every page of a model."""

    def __init__(self, atlas: Atlas, prov: dict):
        self.atlas = atlas
        self.model = atlas.cfg.name
        self.prov = prov
        # Which units have pages (rows of the subject index).
        self.published = np.array([s.published(int(n)) for s in atlas.sets
                                   for n in atlas.metrics["n_examples"][atlas.index.rows(s.key)]], bool)
        self.common = {"csp": CSP, "model": self.model, "prov": prov,
                       "sets": [{"key": s.key, "slug": s.slug, "layer": s.layer, "title": s.title}
                                for s in atlas.sets],
                       "sets_attr": ",".join(subject_sets(atlas)), "release": RELEASE.markup}

    def page(self, depth: int, path: str, title: str, cite_title: str, kind: str, cited: Cited = CITE_MANIFEST,
             **context) -> dict:
        """Context of a page `depth` folders below the site root (the model index is at depth 1), citing what
        `cited` pins (the release manifest unless the page shows one data file). Unit and feature pages leave their
        BibTeX to static/atlas.js, which builds the same text from the provenance in the common.json they load anyway
        (`cite_data`), as it does for each feature section's citation line."""
        root = "../" * depth
        model_root = "../" * (depth - 1) if depth >= 1 else self.model + "/"
        from_sidecar = kind == "neuron"
        cite = ({"cite": "", "cite_line": "", "cite_data": {"author": author(self.atlas), "title": cite_title,
                                                              "url": page_url(self.atlas, path),
                                                              "sha256": cited.sha256}}
                if from_sidecar else {**citation(self.atlas, self.prov, path, cite_title, cited), "cite_data": None})
        return {**self.common, "root": root, "model_root": model_root, "path": path, "title": title, **cite,
                "kind": kind, **context}

    def nav(self, unit_id: UnitId, depth_below_set: int) -> dict:
        """Previous/next unit links (across sets, in index order) from a page `depth_below_set` folders below the
        set's folder."""
        index = self.atlas.index

        def link(step: int):
            row = index.row(unit_id) + step
            while 0 <= row < len(index) and not self.published[row]:
                row += step
            if not 0 <= row < len(index):
                return None
            other = index.unit(row)
            subject = index.get(other.set_key)
            up = "../" * depth_below_set
            href = (f"{up}N{other.unit}/index.html" if other.set_key == unit_id.set_key
                    else f"{up}../{subject.slug}/N{other.unit}/index.html")
            return {"href": href, "label": f"{subject.slug} N{other.unit}"}

        return {"prev": link(-1), "next": link(1)}


    def unit_link(self, subject: SubjectSet, unit: int, up: str) -> dict:
        """A link to a unit's page from `up` (the relative path to the model folder), or plain text without one."""
        label = f"{subject.slug} N{unit}"
        row = self.atlas.index.row(UnitId(subject.key, unit))
        return {"label": label, "href": f"{up}{subject.slug}/N{unit}/index.html" if self.published[row] else None}

    def dictionary_lists(self, subject: SubjectSet, unit: int) -> dict:
        """What a unit's page shows of the SAE dictionary tools: for a latent, the neurons it writes to most and its
        best match in every other SAE on its hook; for a neuron, the latents that write to it most."""
        atlas, up = self.atlas, "../../"
        mlp = {s.layer: s for s in atlas.sets if s.kind == "mlp"}
        lists = {"writes_to": [], "matches": [], "latents": []}
        if subject.kind == "sae":
            tools = atlas.dictionaries[subject.key]
            if "align_neuron" in tools:
                layer_set = mlp.get(subject.layer)
                for neuron, weight in zip(tools["align_neuron"][unit].tolist(), tools["align_weight"][unit].tolist()):
                    if neuron < 0:
                        continue
                    link = (self.unit_link(layer_set, neuron, up) if layer_set is not None
                            else {"label": f"L{subject.layer} N{neuron}", "href": None})
                    lists["writes_to"].append({**link, "value": fmt(weight, 3)})
            for name in sorted(tools):
                if name.startswith("mcs."):
                    other = atlas.index.get(name[4:])
                    match = int(tools[f"mcs_match.{other.key}"][unit])
                    lists["matches"].append({**self.unit_link(other, match, up),
                                             "value": fmt(float(tools[name][unit]), 3)})
        else:
            for other in atlas.sets:
                tools = atlas.dictionaries.get(other.key, {})
                if other.layer != subject.layer or "neuron_latent" not in tools:
                    continue
                for latent, weight in zip(tools["neuron_latent"][unit].tolist(),
                                          tools["neuron_latent_weight"][unit].tolist()):
                    if latent >= 0:
                        lists["latents"].append({**self.unit_link(other, latent, up), "value": fmt(weight, 3)})
        return lists


def evaluation_rows(result: dict | None) -> list[dict]:
    """An SAE's evaluation (builder/evaluate.py) as the rows its page shows."""
    if result is None:
        return []
    names = [("tokens", "Tokens", "tokens of the atlas corpus evaluated on"),
             ("mse", "MSE", "mean squared reconstruction error per dimension"),
             ("explained_variance", "Explained variance", "1 − residual / total variance of the hook"),
             ("l0", "L0", "latents above 0 per token"), ("l0_share", "L0 share", "L0 / latents"),
             ("inactive_share", "Inactive", "share of latents never above 0 on this corpus"),
             ("ce_clean", "Cross-entropy", "nats per token, model as it is"),
             ("ce_spliced", "Cross-entropy, spliced", "nats per token, reconstruction in place of the hook"),
             ("ce_increase", "Cross-entropy increase", "spliced − clean")]
    return [{"name": name, "value": fmt(result[key], 4), "meaning": meaning} for key, name, meaning in names]


# The held-out evaluation of a trained SAE (builder/train_sae), as the paper's Tables 2 and 3 measure it.
TRAINED_METRICS = (("mse", "MSE", "mean squared reconstruction error per dimension"),
                   ("l1", "L1", "per-token sum of latent activations, averaged over tokens"),
                   ("l0_percent", "L0 (%)", "latents above 0 per token, as a percentage of the latents"),
                   ("ce_increase", "Cross-entropy increase", "nats per token when the reconstruction replaces the "
                    "hook (the counterpart of the paper's accuracy loss)"),
                   ("dead_percent", "Dead (%)", "latents never active on the training tokens"),
                   ("median_max_distance", "Max distance", "median over latents of the largest pairwise cosine "
                    "distance between its held-out examples' neuron embeddings"),
                   ("median_mean_distance", "Mean distance", "median over latents of the mean pairwise distance"),
                   ("median_size", "Size", "median number of held-out examples per active latent (up to 100)"))
CURVE_TERMS = (("mse", "MSE"), ("l1", "L1"), ("ne", "L_N (per input)"), ("l0", "L0 (latents per token)"))
CURVE_POINTS = 160  # a loss curve's points: the log's steps averaged in this many equal buckets
CURVE_WIDTH, CURVE_HEIGHT = 320, 110


def loss_curve(values: np.ndarray, warmup: int | None) -> dict:
    """One logged term as an SVG polyline (log-scaled y when every point is positive), bucket-averaged."""
    values = np.asarray(values, np.float64)
    steps = len(values)
    edges = np.linspace(0, steps, min(CURVE_POINTS, steps) + 1).astype(int)
    x = (edges[:-1] + edges[1:] - 1) / 2
    y = np.array([values[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    log_scale = bool((y > 0).all())
    shown = np.log10(y) if log_scale else y
    low, high = float(shown.min()), float(shown.max())
    span = high - low or 1.0
    px = x / max(1, steps - 1) * CURVE_WIDTH
    py = CURVE_HEIGHT - (shown - low) / span * CURVE_HEIGHT
    return {"points": " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py)), "width": CURVE_WIDTH,
            "height": CURVE_HEIGHT, "first": fmt(values[0], 3), "last": fmt(values[-1], 3),
            "low": fmt(10 ** low if log_scale else low, 3), "high": fmt(10 ** high if log_scale else high, 3),
            "scale": "log" if log_scale else "linear", "steps": steps,
            "warmup": None if warmup is None or not 0 < warmup < steps else round(warmup / (steps - 1) * CURVE_WIDTH,
                                                                                   1)}


def training_section(training: dict | None) -> dict | None:
    """A trained SAE's page section: its [[train_sae]] settings, held-out evaluation and loss curves."""
    if training is None:
        return None
    settings, log = training["settings"], training["log"]
    warmup = int(log["warmup_steps"]) if float(log["ne_coefficient"]) > 0 else None
    evaluation = training["evaluation"]
    settings = {**settings, "d_sae": evaluation["d_sae"] if settings["d_sae"] else
                f"{evaluation['d_sae']} (expansion {settings['expansion']} × the hook's width)"}
    return {"settings": [{"name": k, "value": v} for k, v in settings.items() if k not in ("slug", "expansion")],
            "evaluation": [{"name": name, "value": fmt(evaluation[key], 4), "meaning": meaning}
                           for key, name, meaning in TRAINED_METRICS],
            "heldout_tokens": fmt(evaluation["heldout_tokens"]), "training_tokens": fmt(evaluation["training_tokens"]),
            "curves": [{"name": name, **loss_curve(log[term], warmup)} for term, name in CURVE_TERMS
                       if np.isfinite(log[term]).all()]}  # a standard SAE logs no L_N (NaN)


def trained_note(training: dict | None) -> str:
    """How a trained SAE was trained, in a few words for the coverage line ("" for an SAE read from a folder)."""
    if training is None:
        return ""
    ne = training["settings"]["ne"]
    return f"with the neuron-embedding loss (λ2 = {fmt(ne, 3)})" if ne > 0 else "with the standard loss"


def trained_table(atlas: Atlas) -> dict | None:
    """The method page's side-by-side held-out evaluation of every trained SAE."""
    if not atlas.training:
        return None
    slugs = list(atlas.training)
    evaluations = [atlas.training[slug]["evaluation"] for slug in slugs]
    rows = [{"name": name, "meaning": meaning, "cells": [fmt(e[key], 4) for e in evaluations]}
            for key, name, meaning in TRAINED_METRICS]
    header = [{"slug": slug, "l1": fmt(e["l1_coefficient"], 3), "ne": fmt(e["ne_coefficient"], 3)}
              for slug, e in zip(slugs, evaluations)]
    counts = lambda key: " or ".join(fmt(n) for n in sorted({e[key] for e in evaluations}))  # one number if all agree
    return {"header": header, "rows": rows, "heldout_tokens": counts("heldout_tokens"),
            "training_tokens": counts("training_tokens")}


MCS_BINS = 10  # the MCS distribution on an SAE's page: bins of 0.1 over [0, 1] (negative values in the first)


def mcs_distributions(atlas: Atlas, subject: SubjectSet) -> list[dict]:
    """Per other SAE on the same hook: the MCS distribution of this SAE's active latents."""
    tools = atlas.dictionaries.get(subject.key, {})
    active = atlas.metrics["n_examples"][atlas.index.rows(subject.key)] > 0
    result = []
    for name in sorted(tools):
        if name.startswith("mcs.") and active.any():
            values = tools[name][active]
            counts = np.bincount(np.clip((values * MCS_BINS).astype(int), 0, MCS_BINS - 1), minlength=MCS_BINS)
            peak = max(1, int(counts.max()))
            result.append({"other": atlas.index.get(name[4:]).slug, "median": fmt(float(np.median(values)), 3),
                           "above": int((values >= 0.7).sum()), "n": int(active.sum()),
                           "bins": [{"range": f"{i / MCS_BINS:.1f}–{(i + 1) / MCS_BINS:.1f}", "count": int(c),
                                     "bar": "█" * round(20 * int(c) / peak)} for i, c in enumerate(counts)]})
    return result


def dictionary_pairs(atlas: Atlas) -> list[dict]:
    """The method page's MCS lines: for every SAE and every other SAE on its hook, its MCS distribution."""
    return [{"set": s.slug, **d} for s in atlas.sets if s.kind == "sae" for d in mcs_distributions(atlas, s)]


def quoted(text: str) -> str:
    """A token as a summary names it: display form in double quotes (the same as static/atlas.js's quoted)."""
    return "\u201c" + display_token(text) + "\u201d"


def summary_text(summary: dict, vocab: list[str]) -> str:
    """A feature's summary (token ids index `vocab`) as one line:
    `“ Ahab” ×12, “ whale” ×3 · after “ Captain” ×8 · mean 2.31, max 3.02`; for one example `“ Ahab” after
    “ Captain” · 2.31` (static/atlas.js builds the same text for re-cut clusters)."""
    if summary["size"] == 1:
        after = f" after {quoted(vocab[summary['before'][0]])}" if summary["before"] is not None else ""
        return f"{quoted(vocab[summary['top'][0][0]])}{after} \u00b7 {fmt(summary['max'], 3)}"
    parts = [", ".join(f"{quoted(vocab[t])} \u00d7{c}" for t, c in summary["top"])]
    if summary["before"] is not None:
        parts.append(f"after {quoted(vocab[summary['before'][0]])} \u00d7{summary['before'][1]}")
    parts.append(f"mean {fmt(summary['mean'], 3)}, max {fmt(summary['max'], 3)}")
    return " \u00b7 ".join(parts)


COLOURED_CLUSTERS = 8  # the largest clusters get a colour of their own (static/atlas.css .c0–.c7); the rest grey


def colour_class(k: int) -> str:
    return f"c{k}" if k < COLOURED_CLUSTERS else "cx"


def render_unit(site: Site, data: SetData, unit: int, folder: Path) -> tuple[int, ...]:
    """Write one unit's sidecar (and its file:// twin) and its page into `folder`. Its features are sections of that
    page (`#F{k}`): each prints its central example as text and its citation, so a feature's address reads without
    JavaScript; a page per feature would be most of the site's bytes.

    Returns (examples, clusters, sidecar bytes, unit page bytes, file:// twin bytes)."""
    atlas = site.atlas
    subject = data.subject
    if not site.published[atlas.index.row(UnitId(subject.key, unit))]:
        return 0, 0, 0, 0, 0
    env = environment()
    files = unit_sidecar(atlas, data, unit)
    sidecar = files.neuron
    folder.mkdir(parents=True)
    # similar.json first: neuron.json pins it by its sha256, so the one hash a unit's citation names covers both.
    similar = write_data_file(folder / "similar.json", "similar", files.similar, files.similar_blob)
    written = write_data_file(folder / "neuron.json", "neuron", {**sidecar, "similar_sha256": similar.sha256},
                              files.neuron_blob)
    sidecar_bytes, twin_bytes = written.published + similar.published, written.twin + similar.twin
    start = int(data.offsets[unit])
    count = sidecar["examples"]["count"]
    path = unit_path(site.model, subject, unit)
    cite_title = f"{site.model} {subject.label} {subject.unit_noun} {unit}"
    features = []
    for k, (cluster, summary) in enumerate(zip(sidecar["clusters"], files.summaries)):
        features.append({"k": k, "size": cluster["size"], "share": fmt(100.0 * cluster["size"] / count, 3) + "%",
                         "central": static_example(atlas, data, start + cluster["central"]),
                         "summary": summary_text(summary, atlas.vocab), "colour": colour_class(k),
                         "cite": {"title": f"{cite_title} feature {k}", "url": page_url(atlas, feature_path(path, k))}})
    clustered = [f for f in features if f["size"] > 1]
    singles = [f for f in features if f["size"] == 1]
    metrics = sidecar["metrics"]
    metric_rows = [
        ("max_activation", "Max activation", fmt(sidecar["max_activation"], 4)),
        ("density", "Density", fmt(float(atlas.metrics["density"][atlas.index.row(UnitId(subject.key, unit))]), 3)),
        ("n_examples", "Examples", str(metrics["n_examples"])),
        ("n_clusters", "Feature clusters", f"{metrics['n_clusters']} ({len(clustered)} with 2+ examples)"),
        ("largest_share", "Largest cluster share", fmt(metrics["largest_share"])),
        ("max_distance", "Max distance", fmt(metrics["max_distance"])),
        ("mean_distance", "Mean distance", fmt(metrics["mean_distance"])),
        ("intra_distance", "Intra-cluster distance", fmt(metrics["intra_distance"])),
        ("inter_distance", "Inter-cluster distance", fmt(metrics["inter_distance"]))]
    metric_rows = [{"id": key, "name": name, "value": value} for key, name, value in metric_rows]

    name = f"{subject.slug} N{unit}"
    unit_id = UnitId(subject.key, unit)
    context = site.page(3, path, f"{name} · {site.model}", cite_title, "neuron",
                        Cited(f"{path}neuron.json", written.sha256), layer=subject.layer,
                        neuron=unit, set_title=subject.title, noun=subject.unit_noun, slug=subject.slug,
                        clustered=clustered, singles=singles, metric_rows=metric_rows,
                        count=count, dictionary=site.dictionary_lists(subject, unit), nav=site.nav(unit_id, 1),
                        window_before=atlas.cfg.window_before, window_after=atlas.cfg.window_after)
    page = env.get_template("neuron.html").render(context).encode()
    (folder / "index.html").write_bytes(page)
    return count, len(features), sidecar_bytes, len(page), twin_bytes


METRIC_LABELS = {"n_clusters": "Feature clusters", "largest_share": "Largest share", "mean_distance": "Mean distance",
                 "max_distance": "Max distance", "intra_distance": "Intra-cluster", "inter_distance": "Inter-cluster"}

# Every metric's definition, as the tooltip and the method page's anchor (#m-<key>) give it.
METRIC_DEFINITIONS = {
    "max_activation": "The unit's highest activation on any token of the dataset.",
    "density": "The share of the dataset's tokens on which the unit's activation is above 0.",
    "n_examples": "Sequences kept: the first in corpus order reaching threshold × max.",
    "n_clusters": "Feature clusters: the dendrogram of the examples' embeddings cut at the cluster threshold.",
    "largest_share": "The largest cluster's share of the examples (1: one feature).",
    "max_distance": "The largest cosine distance between two examples' embeddings.",
    "mean_distance": "The mean cosine distance over all pairs of examples.",
    "intra_distance": "Mean cosine distance within clusters (low: coherent features).",
    "inter_distance": "Mean cosine distance between clusters (high: distinct features).",
}


def random_unit(atlas: Atlas) -> tuple[SubjectSet, int]:
    """A fixed 'random' unit (from cfg.seed) for the static link; JavaScript picks a fresh one on each click."""
    with_examples = np.flatnonzero(atlas.metrics["n_examples"] > 0)
    pool = with_examples if len(with_examples) else np.arange(atlas.n_units)
    unit_id = atlas.index.unit(int(np.random.default_rng(atlas.cfg.seed).choice(pool)))
    return atlas.index.get(unit_id.set_key), unit_id.unit


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


COMPARED_METRICS = ("n_clusters", "largest_share", "mean_distance", "max_distance", "intra_distance",
                    "inter_distance")


def neurons_vs_latents(atlas: Atlas) -> list[dict]:
    """The paper's proposed use of neuron embeddings on SAEs: per layer with SAEs, the distribution (quartiles over
    units with examples; a distance over units where it is defined) of each polysemanticity metric for the layer's
    neurons and for each SAE's latents on that layer."""
    groups = []
    for layer in sorted({s.layer for s in atlas.sets if s.kind == "sae"}):
        rows = []
        for s in sorted((s for s in atlas.sets if s.layer == layer), key=lambda s: s.kind != "mlp"):
            table = {name: atlas.metrics[name][atlas.index.rows(s.key)] for name in ("n_examples", *COMPARED_METRICS)}
            kept = table["n_examples"] > 0
            cells = []
            for name in COMPARED_METRICS:
                values = table[name][kept].astype(np.float64)
                values = values[np.isfinite(values)]
                cells.append(" / ".join(fmt(q) for q in np.percentile(values, [25, 50, 75])) if len(values) else "–")
            rows.append({"set": s.slug, "what": f"{s.size:,} {s.unit_noun}s", "n": int(kept.sum()), "cells": cells})
        groups.append({"layer": layer, "rows": rows})
    return groups


PAPER_THRESHOLD = 0.75  # the example threshold the method's paper used for GPT-2 small


def threshold_note(atlas: Atlas) -> str:
    """Why this atlas's example threshold differs from the paper's, or nothing when it does not."""
    threshold = atlas.meta.get("threshold")
    if threshold is None or threshold == PAPER_THRESHOLD:
        return ""
    note = (f"The paper keeps examples reaching {PAPER_THRESHOLD} × a neuron's maximum, chosen for GPT-2 small; this "
            f"atlas uses {threshold}.")
    if atlas.cfg.model == EMBEDDED_MODEL:
        note += (" On this small corpus SmolLM2's neurons have sharp, rare peaks: at 0.75 the median neuron keeps only "
                 "4 examples, too few to cluster, and more text barely helps because each maximum rises with the "
                 "data. At 0.5 the median neuron has 17 examples and 45% of neurons have 20 or more.")
    return note


def model_pages(site: Site, model_dir: Path, root_dir: Path, mnist: dict | None = None) -> None:
    """The landing page, the model index, the method page and one static table per subject set."""
    atlas = site.atlas
    env = environment()
    meta = atlas.meta
    table = atlas.metrics
    random_set, random_unit_index = random_unit(atlas)
    coverage = {
        "layers": [s.layer for s in atlas.sets if s.kind == "mlp"], "n_layers": meta.get("n_layers", len(atlas.sets)),
        "d_mlp": meta.get("d_mlp"), "n_neurons": sum(s.size for s in atlas.sets if s.kind == "mlp"),
        "saes": [{"slug": s.slug, "size": s.size, "architecture": s.architecture, "hook": s.hook_name,
                  "inactive": int((~site.published[atlas.index.rows(s.key)]).sum()),
                  "trained": trained_note(atlas.training.get(s.key))}
                 for s in atlas.sets if s.kind == "sae"], "n_sequences": int(meta["n_sequences"]),
        "n_tokens": int(meta["n_tokens"]), "context_length": meta.get("context_length", "?"),
        "dataset": site.prov["dataset"], "with_examples": int((table["n_examples"] > 0).sum()),
        "n_features": int(table["n_clusters"].sum()), "max_examples": meta.get("max_examples", "?"),
        "threshold": meta.get("threshold", "?"), "random": f"{random_set.slug}/N{random_unit_index}/index.html",
    }

    def write(path: Path, template: str, context: dict) -> None:
        path.write_bytes(env.get_template(template).render(context).encode())

    home_title = f"atlas of {site.model}"
    write(root_dir / "index.html", "home.html", site.page(0, "", "Neuron Atlas", home_title, "home",
                                                          coverage=coverage, mnist=bool(mnist)))
    # GitHub Pages serves 404.html for a missing path at any depth, so its links are absolute from the site's path.
    # Its citation is the home page's: a missing page is nothing to cite, the atlas it belongs to is.
    base = urlsplit(atlas.cfg.site_url).path.rstrip("/") + "/" if atlas.cfg.site_url else "/"
    write(root_dir / "404.html", "404.html", {**site.page(0, "", "Not found · Neuron Atlas", home_title, "404"),
                                              "root": base, "model_root": f"{base}{site.model}/"})
    write(model_dir / "index.html", "model.html",
          site.page(1, f"{site.model}/", f"{site.model} · Neuron Atlas", site.model, "model", coverage=coverage))
    (model_dir / "method").mkdir()
    method = {"threshold": atlas.cfg.cluster_threshold, "cluster_method": atlas.cfg.cluster_method,
              "definitions": METRIC_DEFINITIONS,
              "intervals": atlas.cfg.interval_count, "interval_examples": atlas.cfg.interval_examples,
              "space": atlas.cfg.neighbour_space,
              "threshold_note": threshold_note(atlas),
              "count": atlas.cfg.neighbour_count, "neighbour_threshold": atlas.cfg.neighbour_threshold,
              "window_before": atlas.cfg.window_before, "window_after": atlas.cfg.window_after}
    write(model_dir / "method" / "index.html", "method.html",
          site.page(2, f"{site.model}/method/", f"Method · {site.model}", f"{site.model} method", "method",
                    report=report_rows(atlas.report), method=method, coverage=coverage,
                    compared=neurons_vs_latents(atlas),
                    compared_names=[METRIC_LABELS[name] for name in COMPARED_METRICS], mnist=mnist,
                    trained=trained_table(atlas), dictionaries=dictionary_pairs(atlas)))
    for subject in atlas.sets:
        rows = atlas.index.rows(subject.key)
        column = {name: table[name][rows] for name in ("max_activation", "n_examples", "n_clusters",
                                                       "largest_share", "intra_distance", "inter_distance")}
        density = table["density"][rows]
        shown = site.published[rows]
        units = [{"n": n, "max": fmt(column["max_activation"][n], 3), "ex": int(column["n_examples"][n]),
                  "k": int(column["n_clusters"][n]), "share": fmt(column["largest_share"][n]),
                  "intra": fmt(column["intra_distance"][n]), "inter": fmt(column["inter_distance"][n]),
                  "density": fmt(density[n], 3)}
                 for n in range(subject.size) if shown[n]]
        (model_dir / subject.slug).mkdir(exist_ok=True)
        shard = f"data/neurons/{subject.slug}.json"  # the set's rows of the unit table: what its page lists
        write(model_dir / subject.slug / "index.html", "layer.html",
              site.page(2, f"{site.model}/{subject.slug}/", f"{subject.title} · {site.model}",
                        f"{site.model} {subject.label}", "layer",
                        Cited(f"{site.model}/{shard}", file_sha256(model_dir / shard)), layer=subject.layer,
                        neurons=units,
                        set_title=subject.title, set_key=subject.key, noun=subject.unit_noun,
                        mcs=mcs_distributions(atlas, subject),
                        evaluation=evaluation_rows(atlas.evaluations.get(subject.key)),
                        training=training_section(atlas.training.get(subject.key)),
                        inactive=[int(n) for n in np.flatnonzero(~shown)]))
