"""Render: turn the artefacts into a static, citeable site that works from any static host, a sub-path, a plain
folder over file:// and `python -m http.server`, with no network.

Layout (all links relative, always to an explicit `index.html` so file:// works; `{set}` is a subject set's slug,
`L{layer}` for MLP layers):

    index.html                               landing page
    static/                                  the site's only scripts and styles (copied from the repo's static/)
    {model}/index.html                       coverage, sortable/filterable table of units, search
    {model}/method/index.html                method and the embedding-comparison report
    {model}/{set}/index.html                 static table of the set's units (browsable without JavaScript)
    {model}/{set}/N{unit}/index.html         unit page; feature (cluster) k is its section #F{k}, which prints the
                                             central example and the citation (the rest comes from neuron.json)
    {model}/{set}/N{unit}/neuron.json        the unit's sidecar: the public data API (docs/sidecar-schema.md)
    {model}/data/{vocab,common}.json         shared vocabulary, what every unit page shares
    {model}/data/neurons.json                the unit table's manifest; neurons/{slug}.json (+ .bin): one set's rows
    {model}/data/search/{i}.json             the word search index, in as many shards as keep each under budget
    {model}/data/atlas.json                  model-level manifest (provenance, layers, histogram edges)

Every data file X.json has a twin X.json.js, `(window.ATLAS_DATA=...)["key"]=<the same JSON>;`, because Chromium
refuses fetch() of file:// URLs but runs <script src> there. Pages fetch the .json over http(s) and load the .json.js
only when opened from a folder over file://. The twins exist for local browsing only: `scripts/deploy.sh` and the
Pages workflow leave them out. `bytes_per_neuron` in the render meta counts the published files;
`local_bytes_per_neuron` counts everything.

Safety: dataset text is hostile. One jinja2 Environment (autoescape, StrictUndefined) gets plain dicts; data reaches
pages only as escaped text or as external JSON/JS written by orjson; every page carries a Content-Security-Policy
that forbids inline script. Lone surrogates become U+FFFD at the boundary (`text.clean_text`).

Determinism: no wall-clock time in the site (the build date comes from the config or collect's meta), sorted keys,
fixed ordering, fixed zlib level, so the same inputs give byte-identical files. The site is built in a temporary
folder beside site_dir and swapped into place at the end; a failed or killed render leaves the previous site intact.

Parts: `text` (strings at the boundary), `codec` (the packed encodings), `inputs` (reading artefacts through
builder.schema), `sidecars` (pure builders of the JSON files), `pages` (page contexts and templates), `publish`
(fan-out over unit ranges, sizes, the atomic swap).
"""

from __future__ import annotations

from pathlib import Path

from builder.render.publish import render_site
from builder.stage import StageRun


def build(run: StageRun) -> dict:
    stats = render_site(run.cfg)
    # The model's manifest, which `atlas release` never rewrites (it stamps every page, changing their sizes).
    run.record(Path(run.cfg.site_dir) / run.cfg.name / "data" / "atlas.json")
    return stats

