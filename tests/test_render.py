"""The renderer on a tiny synthetic atlas (tests/render_fixtures.py): hostile tokens render literally and safely, the
compact encodings round-trip within their stated error, URLs and links are as documented, every page carries the
CSP, renders are byte-identical and atomic, missing inputs are named with the stage that writes them, and the output
matches the golden site in tests/golden/site.

Regenerate the golden site after an intended output change with:

    ATLAS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_render.py -k golden
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest

import render_fixtures as fx
from builder.config import AtlasConfig
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.render import codec, inputs, publish, sidecars, text
from builder.render.pages import citation_key, feature_key_path
from builder.render.publish import render_site
from builder.schema import (read_clusters, read_examples, read_importance, read_metrics_table, read_neighbours,
                            read_tokens)
from builder.stage import run_stage
from builder.subjects import SubjectIndex, mlp_layer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "site"
MODEL = "tiny-atlas"


def site_files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def html_pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[AtlasConfig, Path]:
    folder = tmp_path_factory.mktemp("render")
    cfg = fx.build_site(folder)
    return cfg, Path(cfg.site_dir)


def feature_html(page: str, k: int) -> str:
    """Feature F{k}'s part of a unit page: its section (or, for a single example, its list item)."""
    start = re.search(rf'<(section|li) class="feature[^"]*" id="F{k}">', page)
    assert start, f"no feature F{k}"
    end = page.index(f"</{start.group(1)}>", start.end())
    return page[start.start():end]


def sidecar(site: Path, layer: int, neuron: int) -> dict:
    """A unit's neuron.json, with the bytes of its neuron.bin under "blob"."""
    document, blob = codec.read_data_file(site / MODEL / f"L{layer}" / f"N{neuron}" / "neuron.json")
    return {**document, "blob": blob}


# ---------------------------------------------------------------------------------------------------------------
# Hostile text


def test_hostile_tokens_appear_only_escaped_in_html(built):
    _, site = built
    raw_markup = ["<script>alert", "<img src=x", "onerror=alert(1)>"]
    for page in html_pages(site):
        text = page.read_text(encoding="utf-8")
        for needle in raw_markup:
            assert needle not in text, f"{page} contains unescaped {needle!r}"
    # Neuron 0's logit tokens are the hostile ones: the sidecar keeps them as data (atlas.js draws them as text:
    # test_browser), and its summaries print escaped ones.
    doc = sidecar(site, 0, 0)
    shown = {page_vocabulary(site, doc)[i] for side in ("top", "bottom") for i, _ in doc["logits"][side]}
    assert {fx.HOSTILE[name] for name in ("script", "img", "template", "entity", "rtl", "zero_width")} <= shown
    assert "lone\ufffdsurrogate" in shown  # a lone surrogate becomes U+FFFD


def test_pages_run_no_inline_script_and_load_only_the_site_script(built):
    _, site = built
    for page in html_pages(site):
        text = page.read_text(encoding="utf-8")
        tags = re.findall(r"<script\b[^>]*>", text)
        assert tags, f"{page} loads no script"
        for tag in tags:
            assert re.fullmatch(r'<script src="((\.\./)*|/([^"]*/)?)static/(atlas|index)\.js">', tag), f"{page}: {tag}"
        assert len(re.findall(r"<script\b[^>]*></script>", text)) == len(tags), f"{page} has inline script"
        for tag in re.findall(r"<[a-zA-Z][^>]*>", text):  # real tags only: escaped text has no '<'
            assert re.search(r"\son[a-z]+\s*=", tag) is None, f"{page} has an inline event handler: {tag}"
            assert re.search(r"\sstyle\s*=", tag) is None, f"{page} has an inline style attribute: {tag}"


def test_every_page_has_a_csp_meta_forbidding_inline_script_before_any_resource(built):
    _, site = built
    for page in html_pages(site):
        text = page.read_text(encoding="utf-8")
        match = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', text)
        assert match, f"{page} lacks a CSP meta tag"
        policy = html.unescape(match.group(1))
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert "default-src 'self'" in policy and "object-src 'none'" in policy
        first_resource = min(text.index(tag) for tag in ("<script", "<link") if tag in text)
        assert match.start() < first_resource, f"{page}: CSP must precede scripts and styles"


def test_hostile_tokens_survive_the_json_files_exactly(built):
    _, site = built
    vocab = json.loads((site / MODEL / "data" / "vocab.json").read_text(encoding="utf-8"))["tokens"]
    expected = [text.clean_text(token) for token in fx.VOCAB]
    assert vocab == expected
    assert vocab[fx.HOSTILE_ID["script"]] == "</script><script>alert(1)</script>"
    assert vocab[fx.HOSTILE_ID["surrogate"]] == "lone\ufffdsurrogate"
    twin = (site / MODEL / "data" / "vocab.json.js").read_bytes()
    assert twin == codec.js_wrapper("vocab", (site / MODEL / "data" / "vocab.json").read_bytes().rstrip(b"\n"))


def test_lone_surrogates_become_replacement_characters_and_pairs_are_joined():
    assert text.clean_text("a\ud800b") == "a\ufffdb"
    assert text.clean_text("\udfff") == "\ufffd"
    assert text.clean_text("\ud83d\ude00") == "\U0001F600"  # a valid pair written as two code units
    assert text.clean_text("plain é 😀") == "plain é 😀"
    text.clean_text("x\ud800").encode("utf-8")  # encodable afterwards


def test_control_characters_display_as_symbols_and_bidi_text_stays_literal():
    assert text.display_token("a\nb\tc\x00\x7f") == "a\u21b5b\u21e5c\u2400\u2421"
    assert text.display_token("\u202eevil\u200b") == "\u202eevil\u200b"


def test_bibtex_fields_escape_tex_specials():
    assert text.bibtex_escape("a_b%c&d#e{f}g$h") == r"a\_b\%c\&d\#e\{f\}g\$h"
    assert text.bibtex_escape("x\\y^z~") == r"x\textbackslash{}y\^{}z\~{}"


# ---------------------------------------------------------------------------------------------------------------
# Encodings


@pytest.mark.parametrize("dtype", ["u1", "u2", "u4", "i4", "f4"])
def test_packed_arrays_round_trip_exactly(dtype):
    rng = np.random.default_rng(3)
    values = (rng.normal(size=57) * 1000).astype(np.dtype(f"<{dtype}")) if dtype in ("i4", "f4") else \
        rng.integers(0, np.iinfo(np.dtype(dtype)).max, size=57).astype(np.dtype(f"<{dtype}"))
    blob = codec.Blob()
    before = blob.pack(values[:5], dtype)
    ref = blob.pack(values, dtype)
    data = blob.getvalue()
    assert before[0] == 0 and ref[0] == before[1] and sum(ref) == len(data)
    assert np.array_equal(codec.unpack(data, ref, dtype), values)
    assert np.array_equal(codec.unpack(data, before, dtype), values[:5])
    assert zlib.decompress(data[ref[0]:ref[0] + ref[1]]) == values.tobytes()


def test_a_data_file_with_a_blob_writes_it_beside_the_json_and_inside_the_file_twin(tmp_path):
    blob = codec.Blob()
    ref = blob.pack_json(["a", "<b>"])
    published, twin, sha256 = codec.write_data_file(tmp_path / "x.json", "x", {"kind": "x", "text": ref}, blob)
    document, data = codec.read_data_file(tmp_path / "x.json")
    assert document["bin"] == "x.bin" and codec.unpack_json(data, document["text"]) == ["a", "<b>"]
    assert published == (tmp_path / "x.json").stat().st_size + (tmp_path / "x.bin").stat().st_size
    # One hash pins both files: the .json's, returned for the page's citation, and the .bin's, inside the .json.
    assert sha256 == hashlib.sha256((tmp_path / "x.json").read_bytes()).hexdigest()
    assert document["bin_sha256"] == hashlib.sha256((tmp_path / "x.bin").read_bytes()).hexdigest()
    script = (tmp_path / "x.json.js").read_text()
    assert len(script) == twin
    inner = json.loads(script[script.index("=", script.index("]")) + 1:].rstrip(";\n"))
    assert base64.b64decode(inner["bin_base64"]) == data and inner["text"] == document["text"]


def test_quantised_activations_are_within_half_a_step_and_keep_missing_values():
    rng = np.random.default_rng(0)
    window = rng.normal(1.0, 3.0, size=(40, 25)).astype(np.float32)
    window[rng.random(window.shape) < 0.1] = np.nan
    lo, hi = codec.activation_range(window, 5.0)
    assert lo <= np.nanmin(window) and hi >= max(5.0, np.nanmax(window))
    codes = codec.quantise_activations(window, lo, hi)
    assert codes.dtype == np.uint8 and codes.max() == codec.MISSING_U8 and codes[~np.isnan(window)].max() <= 254
    decoded = codec.dequantise_activations(codes, lo, hi)
    assert np.array_equal(np.isnan(decoded), np.isnan(window))
    step = (hi - lo) / 254
    assert np.nanmax(np.abs(decoded - window)) <= step / 2 + 1e-9
    assert np.nanmax(np.abs(decoded - window)) > step / 10  # the bound is tight enough to mean something


def test_quantised_importances_are_within_half_a_step():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, size=(30, 21)).astype(np.float32)
    scores[:, :3] = np.nan
    decoded = codec.dequantise_importance(codec.quantise_importance(scores))
    assert np.array_equal(np.isnan(decoded), np.isnan(scores))
    assert np.nanmax(np.abs(decoded - scores)) <= 0.5 / 254 + 1e-9


def page_vocabulary(site: Path, doc: dict) -> list[str]:
    """A sidecar's vocabulary: the atlas's common tokens, then its own."""
    common = json.loads((site / MODEL / "data" / "common.json").read_text())
    assert common["kind"] == "common" and common["schema_version"] == codec.SCHEMA_VERSIONS["common"]
    return common["tokens"] + codec.unpack_json(doc["blob"], doc["vocab"])


def test_sidecar_decodes_back_to_the_artefacts(built):
    cfg, site = built
    paths = AtlasPaths.of(cfg)
    examples = read_examples(paths, f"L{0}")
    clusters = read_clusters(paths, f"L{0}")
    scores = read_importance(paths, f"L{0}")["importance"]
    tokens = read_tokens(paths)
    neuron = 0
    part = examples.unit_slice(neuron)
    doc = sidecar(site, 0, neuron)
    blob, ex = doc["blob"], doc["examples"]
    n, width = ex["count"], cfg.window_before + 1 + cfg.window_after
    assert n == part.stop - part.start == 8
    lo, hi = ex["activation_range"]
    decoded = codec.dequantise_activations(codec.unpack(blob, ex["activation"], "u1").reshape(n, width), lo, hi)
    window = examples.window[part]
    assert np.array_equal(np.isnan(decoded), np.isnan(window))
    assert np.nanmax(np.abs(decoded - window)) <= (hi - lo) / 508 + 1e-6
    importance = codec.dequantise_importance(codec.unpack(blob, ex["importance"], "u1").reshape(n, -1))
    assert np.nanmax(np.abs(importance - scores[part])) <= 1 / 508 + 1e-6
    ids = codec.unpack(blob, ex["tokens"], ex["token_dtype"]).reshape(n, width)
    seq, pos = codec.unpack(blob, ex["sequence"], "u4"), codec.unpack(blob, ex["position"], "u4")
    assert np.array_equal(seq, examples.seq[part]) and np.array_equal(pos, examples.pos[part])
    local = np.array([fx.VOCAB.index(t) if t in fx.VOCAB else -1 for t in page_vocabulary(site, doc)])
    assert np.array_equal(local[ids[:, cfg.window_before]], tokens[seq, pos])  # the max token, via the local vocab
    assert np.array_equal(codec.unpack(blob, ex["cluster"], "u4"), clusters["labels"][part])
    links = clusters["linkage"][clusters["linkage_offsets"][neuron]:clusters["linkage_offsets"][neuron + 1]]
    assert np.array_equal(codec.unpack(blob, doc["linkage"]["children"], "u4").reshape(-1, 2), links[:, :2])
    assert np.allclose(codec.unpack(blob, doc["linkage"]["distance"], "f4"), links[:, 2], atol=1e-6)
    assert [c["size"] for c in doc["clusters"]] == list(np.bincount(clusters["labels"][part]))
    # Logit tokens are page-vocabulary indices too; the histogram is its non-empty span of the shared bins.
    atlas = inputs.load_atlas(cfg, fx.VOCAB)
    data = inputs.load_set(atlas, atlas.index.get("L0"))
    vocab = page_vocabulary(site, doc)
    for side in ("top", "bottom"):
        assert [vocab[i] for i, _ in doc["logits"][side]] == [text.clean_text(fx.VOCAB[i])
                                                               for i in data.logits[f"logit_{side}_ids"][0]]
        assert np.allclose([v for _, v in doc["logits"][side]], data.logits[f"logit_{side}_values"][0], rtol=1e-3)
    counts = np.zeros(len(data.histogram[0]), np.int64)
    first = doc["histogram"]["first"]
    counts[first:first + len(doc["histogram"]["counts"])] = doc["histogram"]["counts"]
    assert np.array_equal(counts, data.histogram[0]) and counts[first] > 0
    common = json.loads((site / MODEL / "data" / "common.json").read_text())
    assert np.allclose(common["histogram_edges"], atlas.histogram_edges, rtol=1e-3)


def test_sidecar_has_the_documented_schema(built):
    _, site = built
    doc = sidecar(site, 0, 0)
    assert doc["schema_version"] == codec.SCHEMA_VERSIONS["neuron"] == 3
    assert doc["kind"] == "neuron" and doc["model"] == MODEL and (doc["layer"], doc["neuron"]) == (0, 0)
    assert set(doc) - {"blob"} == {"schema_version", "kind", "model", "bin", "bin_sha256", "similar_sha256", "set",
                                   "layer", "neuron", "path",
                                   "max_activation", "metrics", "cluster_threshold", "window", "vocab", "examples",
                                   "clusters", "intervals", "linkage", "histogram", "logits"}
    assert set(doc["examples"]) == {"count", "token_dtype", "tokens", "activation_range", "activation",
                                    "importance", "sequence", "position", "cluster"}
    assert set(doc["intervals"]) == {"bounds", "interval", "sequence", "position", "activation", "tokens"}
    assert set(doc["clusters"][0]) == {"size", "central", "similar"}
    similar = json.loads((site / MODEL / "L0" / "N0" / "similar.json").read_text())
    assert set(similar) == {"schema_version", "kind", "model", "path", "rows", "text", "bin", "bin_sha256"}
    assert similar["kind"] == "similar" and similar["schema_version"] == codec.SCHEMA_VERSIONS["similar"]
    assert doc["similar_sha256"] == hashlib.sha256((site / MODEL / "L0" / "N0" / "similar.json").read_bytes()
                                                   ).hexdigest()  # the unit's one cited hash pins its similar.json
    common = json.loads((site / MODEL / "data" / "common.json").read_text())
    assert set(common) == {"schema_version", "kind", "model", "tokens", "metrics", "histogram_edges", "sets",
                           "provenance", "reproduce"}
    assert set(common["provenance"]) == {"model", "model_revision", "dataset", "n_sequences", "n_tokens",
                                         "threshold", "code_version", "config_hash", "build_date"}
    assert doc["path"] == f"{MODEL}/L0/N0/"
    schema_doc = (ROOT / "docs" / "sidecar-schema.md").read_text()
    for key in (list(set(doc) - {"blob"}) + list(doc["examples"]) + list(doc["intervals"])
                + list(similar) + list(common) + ["similar", "bin_base64", "first"]):
        assert f"`{key}`" in schema_doc, f"{key} is not documented in docs/sidecar-schema.md"


def test_neighbours_in_the_sidecar_point_at_existing_features(built):
    cfg, site = built
    table = read_neighbours(AtlasPaths.of(cfg))
    found = 0
    for page in (site / MODEL).glob("L*/N*/neuron.json"):
        doc = json.loads(page.read_text())
        similar, data = codec.read_data_file(page.with_name("similar.json"))
        rows = codec.unpack(data, similar["rows"], "i4").reshape(-1, 5)
        texts = codec.unpack_json(data, similar["text"])
        assert len(texts) == len(rows)
        per_cluster = np.bincount(rows[:, 0], minlength=len(doc["clusters"])).tolist()
        assert [c["similar"] for c in doc["clusters"]] == per_cluster
        for (source, position, neuron, cluster, similarity), shown in zip(rows, texts):
            assert 0 <= source < len(doc["clusters"])
            layer = fx.LAYERS[position]
            feature_html((site / MODEL / f"L{layer}" / f"N{neuron}" / "index.html").read_text(), cluster)
            assert len(shown) == 6 and shown[4] >= 1 and shown[5] >= shown[4]
            assert 5000 <= similarity <= 10000  # fixture similarities are in [0.5, 1]
            found += 1
    assert found == int((table["neighbour_index"] >= 0).sum()) > 0


def test_dead_and_single_example_neurons_render_without_features_or_dendrogram(built):
    _, site = built
    dead = site / MODEL / "L0" / "N2"
    assert sidecar(site, 0, 2)["examples"]["count"] == 0 and not list(dead.glob("F*"))
    assert "No example reached the threshold" in (dead / "index.html").read_text()
    single = (site / MODEL / "L0" / "N1" / "index.html").read_text()
    assert 'id="dendro"' not in single and 'id="F0"' in single


# ---------------------------------------------------------------------------------------------------------------
# Layout and links


def test_urls_follow_the_documented_layout(built):
    cfg, site = built
    paths = AtlasPaths.of(cfg)
    for name in ("index.html", ".nojekyll", "static/atlas.js", "static/atlas.css", f"{MODEL}/index.html",
                 f"{MODEL}/method/index.html", f"{MODEL}/data/atlas.json", f"{MODEL}/data/vocab.json",
                 f"{MODEL}/data/neurons.json", f"{MODEL}/data/search/0.json", f"{MODEL}/data/vocab.json.js",
                 "404.html"):
        assert (site / name).is_file(), name
    for layer in fx.LAYERS:
        assert (site / MODEL / f"L{layer}" / "index.html").is_file()
        offsets = read_clusters(paths, f"L{layer}")["cluster_offsets"]
        for neuron in range(fx.D_MLP):
            folder = site / MODEL / f"L{layer}" / f"N{neuron}"
            for name in ("index.html", "neuron.json", "neuron.json.js", "similar.json", "similar.json.js"):
                assert (folder / name).is_file()
            # Features are sections of the unit's page (#F<k>), numbered as the clusters are; no page of their own.
            page = (folder / "index.html").read_text()
            assert not list(folder.glob("F*"))
            assert re.findall(r'class="feature[^"]*" id="F(\d+)"', page) == \
                [str(k) for k in range(int(offsets[neuron + 1] - offsets[neuron]))]


def test_every_relative_link_and_resource_resolves_to_a_file(built):
    _, site = built
    checked = 0
    for page in html_pages(site):
        if page.name == "404.html":
            continue  # served for a missing path at any depth: its links are absolute (test_the_404_page_...)
        for target in re.findall(r'(?:href|src)="([^"]+)"', page.read_text(encoding="utf-8")):
            if target.startswith("#"):
                assert f'id="{target[1:]}"' in page.read_text(encoding="utf-8"), f"{page}: no anchor {target}"
                continue
            assert not re.match(r"[a-z]+:|/", target), f"{page} has a non-relative link {target}"
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_file(), f"{page.relative_to(site)} links to missing {target}"
            assert site.resolve() in path.parents
            checked += 1
    assert checked > 200


def test_neuron_pages_link_to_their_neighbours_across_layers(built):
    _, site = built
    last_of_l0 = (site / MODEL / "L0" / f"N{fx.D_MLP - 1}" / "index.html").read_text()
    assert 'rel="next" href="../../L2/N0/index.html"' in last_of_l0
    first = (site / MODEL / "L0" / "N0" / "index.html").read_text()
    assert 'rel="prev"' not in first and 'rel="next" href="../N1/index.html"' in first


def test_citations_name_the_exact_page_and_its_provenance(tmp_path):
    cfg = fx.build_site(tmp_path, site_url="https://example.org/atlas/")
    page = (Path(cfg.site_dir) / MODEL / "L0" / "N0" / "index.html").read_text()
    # Unit pages and their features: atlas.js writes the BibTeX from these lines and the sidecar's provenance (the
    # browser test compares it with pages.bibtex); the method page prints it.
    assert '<span class="cite-url">https://example.org/atlas/tiny-atlas/L0/N0/</span>' in page
    assert ('<p class="cite-line">Neuron Atlas (2024). Neuron Atlas: tiny-atlas layer 0 neuron 0 feature 1. '
            'https://example.org/atlas/tiny-atlas/L0/N0/#F1</p>') in feature_html(page, 1)
    method = (Path(cfg.site_dir) / MODEL / "method" / "index.html").read_text()
    assert r"\url{https://example.org/atlas/tiny-atlas/method/}" in method
    # The 404 page cites what it belongs to, the atlas: the home page's citation.
    cited = [re.search(r'<p class="cite-line">(.*?)</p>', (Path(cfg.site_dir) / name).read_text()).group(1)
             for name in ("index.html", "404.html")]
    assert cited[0] == cited[1] and "Neuron Atlas: atlas of tiny-atlas. https://example.org/atlas/. Release" in cited[0]
    for fact in ("revision rev-1", "corpus.jsonl", "24 sequences", "384 tokens", "threshold 0.75", "code 0.1.0",
                 f"config {cfg.config_hash()}", "date = {2024-01-01}"):
        assert fact in method, fact
    relative = fx.build_site(tmp_path / "relative")
    assert "tiny-atlas layer 0 neuron 0 feature 1. tiny-atlas/L0/N0/#F1</p>" in feature_html(
        (Path(relative.site_dir) / MODEL / "L0" / "N0" / "index.html").read_text(), 1)


def test_model_index_states_coverage_and_the_method_page_shows_the_report(built):
    _, site = built
    index = (site / MODEL / "index.html").read_text()
    assert "layers 0, 2 of the 3 layers" in index and "384 tokens in 24 sequences" in index
    method = (site / MODEL / "method" / "index.html").read_text()
    assert "0.35" in method and "0.31" in method and "0.73" in method and "6 / 5" in method


def test_neuron_table_and_search_index_cover_every_neuron_and_feature(built):
    cfg, site = built
    paths = AtlasPaths.of(cfg)
    table, columns = codec.read_unit_table(site / MODEL / "data")
    assert table["schema_version"] == 4 and table["all"]
    assert [(s["key"], s["layer"], s["size"], s["offset"]) for s in table["sets"]] == \
        [(f"L{layer}", layer, fx.D_MLP, i * fx.D_MLP) for i, layer in enumerate(fx.LAYERS)]
    assert [s["file"] for s in table["shards"]] == [f"neurons/L{layer}.json" for layer in fx.LAYERS]
    assert columns["n_examples"] == [c for layer in fx.LAYERS for c in fx.EXAMPLE_COUNTS[layer]]
    metrics = read_metrics_table(paths)
    for name, digits in (("max_activation", 4), ("mean_distance", 3), ("largest_share", 3)):
        # Literal reference: the value to `digits` significant digits, stored as float32; None where undefined.
        expected = [float(np.float32(float(f"{v:.{digits}g}"))) if np.isfinite(v) else None for v in metrics[name]]
        assert columns[name] == expected, name
    manifest = json.loads((site / MODEL / "data" / "atlas.json").read_text())
    shards = manifest["search"]["shards"]
    words = {}
    for i in range(shards):
        doc = json.loads((site / MODEL / "data" / "search" / f"{i}.json").read_text())
        assert doc["kind"] == "search" and doc["shard"] == i
        for word, postings in doc["words"].items():
            assert sidecars.word_shard(word, shards) == i
            words[word] = postings
    tokens = read_tokens(paths)
    wb, wa = cfg.window_before, cfg.window_after
    for position, layer in enumerate(fx.LAYERS):
        examples, clusters = read_examples(paths, f"L{layer}"), read_clusters(paths, f"L{layer}")
        for neuron in range(fx.D_MLP):
            row = table["sets"][position]["offset"] + neuron
            part = examples.unit_slice(neuron)
            labels = clusters["labels"][part]
            sizes = np.bincount(labels) if len(labels) else np.zeros(0, int)
            assert columns["n_multi"][row] == int((sizes >= 2).sum())
            assert (columns["summary"][row] != "") == (len(labels) > 0)
            for k in range(len(sizes)):
                # Literal reference: the word spanning each member's max token, counted.
                expected = {}
                for j in np.flatnonzero(labels == k) + part.start:
                    seq, pos = int(examples.seq[j]), int(examples.pos[j])
                    before = "".join(fx.VOCAB[t] for t in tokens[seq, max(0, pos - wb):pos])
                    text = before + "".join(fx.VOCAB[t] for t in tokens[seq, pos:pos + wa + 1])
                    start, end = len(before), len(before) + len(fx.VOCAB[tokens[seq, pos]])
                    spans = [m for m in re.finditer(r"\w+|[^\w\s]", text) if m.start() < end and m.end() > start]
                    if spans:
                        word = spans[0].group(0).lower()
                        expected[word] = expected.get(word, 0) + 1
                for word, count in expected.items():
                    assert [row, k, count] in words[word], (layer, neuron, k, word)


# ---------------------------------------------------------------------------------------------------------------
# Determinism, atomicity, inputs


def test_two_renders_of_the_same_inputs_are_byte_identical(built, tmp_path):
    cfg, site = built
    again = dataclasses.replace(cfg, site_dir=str(tmp_path / "again"))
    render_site(again, vocabulary=fx.VOCAB)
    assert site_files(tmp_path / "again") == site_files(site)


def test_rendering_across_worker_processes_gives_the_same_site(built, tmp_path, monkeypatch):
    cfg, site = built
    monkeypatch.setattr(publish, "POOL_MIN_UNITS", 1)
    parallel = dataclasses.replace(cfg, site_dir=str(tmp_path / "parallel"), workers=2)
    render_site(parallel, vocabulary=fx.VOCAB)
    assert site_files(tmp_path / "parallel") == site_files(site)


def test_a_render_that_fails_midway_leaves_the_previous_site_intact(tmp_path, monkeypatch):
    cfg = fx.build_site(tmp_path)
    site = Path(cfg.site_dir)
    before = site_files(site)
    real = publish.render_unit
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(publish, "render_unit", flaky)
    changed = dataclasses.replace(cfg, site_url="https://changed.example/")
    with pytest.raises(RuntimeError, match="disk on fire"):
        render_site(changed, vocabulary=fx.VOCAB)
    assert site_files(site) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "site"]  # no temporary folder left behind


def test_an_interrupted_swap_is_recovered_before_rendering(tmp_path):
    cfg = fx.build_site(tmp_path)
    site = Path(cfg.site_dir)
    before = site_files(site)
    os.replace(site, site.with_name(".site.old"))  # killed between the two renames of the swap
    (tmp_path / ".site.abc.tmp").mkdir()  # and a half-written site from another kill
    publish.recover_interrupted(site)
    assert site_files(site) == before and not (tmp_path / ".site.abc.tmp").exists()


@pytest.mark.parametrize("artefact, stage", [("neighbours/neighbours.npz", "neighbours"),
                                             ("report/comparison.json", "report"),
                                             ("importance/L2.npz", "importance"),
                                             ("collect/meta.json", "collect")])
def test_a_missing_artefact_is_named_with_the_stage_that_writes_it(tmp_path, artefact, stage):
    cfg = fx.render_config(tmp_path)
    fx.write_artefacts(cfg)
    (Path(cfg.out_dir) / artefact).unlink()
    with pytest.raises(ArtefactError) as error:
        render_site(cfg, vocabulary=fx.VOCAB)
    message = error.value.message
    assert artefact.split("/")[-1] in message and f"atlas {stage}" in message and "\n" not in message
    assert not Path(cfg.site_dir).exists()


def test_artefacts_built_for_another_config_are_refused_by_the_render_stage(tmp_path):
    cfg = fx.render_config(tmp_path)
    fx.write_artefacts(cfg)
    with pytest.raises(ArtefactError, match="the collect stage is stale") as error:
        run_stage("render", dataclasses.replace(cfg, threshold=0.5))
    assert "atlas collect" in error.value.message and not Path(cfg.site_dir).exists()


def test_stats_report_bytes_per_neuron_and_throughput(tmp_path):
    cfg = fx.render_config(tmp_path)
    fx.write_artefacts(cfg)
    stats = render_site(cfg, vocabulary=fx.VOCAB)
    site = Path(cfg.site_dir)
    published, twins = publish.site_bytes(site)
    neurons = len(fx.LAYERS) * fx.D_MLP
    assert stats["neurons"] == neurons and stats["total_bytes"] == published
    assert stats["bytes_per_neuron"] == pytest.approx(published / neurons, abs=0.1)
    assert stats["local_bytes_per_neuron"] == pytest.approx((published + twins) / neurons, abs=0.1)
    assert twins > 0 and stats["seconds"] > 0 and stats["neurons_per_second"] > 0
    projection = stats["projected_bytes_per_neuron_at_100_examples"]
    assert projection["3"] < projection["5"] < projection["10"]


def test_size_projection_recovers_linear_costs_of_examples_and_features():
    rng = np.random.default_rng(5)
    examples, clusters = rng.integers(2, 60, 40), rng.integers(1, 12, 40)
    sidecar, page = 1000 + 100 * examples + 50 * clusters, 2000 + 300 * clusters
    search = 10 + 2 * examples + 40 * clusters
    sizes = np.stack([examples, clusters, sidecar, page, np.zeros(40, np.int64)], axis=1)
    sizes = np.concatenate([sizes, [[1, 1, 99_999, 99_999, 0]]])  # one-example units stay out of the fit
    projection = publish.size_projection(sizes, np.append(search, 99_999.0), shared=500.0)
    at = {k: 1000 + 100 * 100 + 50 * k + 2000 + 300 * k + 10 + 2 * 100 + 40 * k + 500 for k in (3, 5, 10)}
    assert projection == {str(k): v for k, v in at.items()}


def test_the_vocabulary_comes_from_the_model_tokenizer(tmp_path, tokenizer):
    cfg = fx.render_config(tmp_path, model="embedded:smollm2-135m-instruct")
    vocab = inputs.load_vocabulary(cfg, min_size=len(tokenizer) + 2)
    assert len(vocab) == len(tokenizer) + 2 and vocab[-1] == f"<{len(tokenizer) + 1}>"
    for token_id in (0, 1, 42, 1000, len(tokenizer) - 1):
        assert vocab[token_id] == tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------------------------
# Golden site


def normalised(files: dict[str, bytes]) -> dict[str, bytes]:
    """The golden comparison covers generated files; static/ is a verbatim copy of the repo's static/."""
    return {name: data for name, data in files.items() if not name.startswith("static/")}


def test_golden_site_matches_expected_output(tmp_path, monkeypatch):
    # Pin what legitimately changes elsewhere (the config schema, the package version) so only rendering is compared.
    monkeypatch.setattr(AtlasConfig, "config_hash", lambda self: "c0ffee123456")
    monkeypatch.setattr(sidecars, "__version__", "0.0.0-golden")
    cfg = fx.build_site(tmp_path, site_url="https://example.org/atlas")
    files = normalised(site_files(Path(cfg.site_dir)))
    if os.environ.get("ATLAS_UPDATE_GOLDEN"):
        shutil.rmtree(GOLDEN, ignore_errors=True)
        for name, data in files.items():
            (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / name).write_bytes(data)
    expected = normalised(site_files(GOLDEN)) if GOLDEN.is_dir() else {}
    assert expected, "no golden site; run ATLAS_UPDATE_GOLDEN=1 pytest tests/test_render.py -k golden"
    assert sorted(files) == sorted(expected), "the set of files differs from tests/golden/site"
    for name in expected:
        assert files[name] == expected[name], f"{name} differs from tests/golden/site/{name}"
    published = {name: (publish.compact_source(name, data.decode()).encode() if name.endswith((".js", ".css"))
                        else data)
                 for name, data in site_files(ROOT / "static").items()}
    assert site_files(Path(cfg.site_dir) / "static") == published


def test_the_method_page_explains_a_threshold_other_than_the_papers(tmp_path, built):
    _, site = built
    assert "this atlas uses" not in (site / MODEL / "method" / "index.html").read_text()  # 0.75: nothing to explain
    cfg = fx.build_site(tmp_path, threshold=0.5)
    method = (Path(cfg.site_dir) / MODEL / "method" / "index.html").read_text()
    assert "reaching 0.75 × a neuron&#39;s maximum, chosen for GPT-2 small; this atlas uses 0.5." in method


def test_features_are_numbered_as_their_urls_are_and_the_landing_page_says_how_examples_are_chosen(built):
    _, site = built
    page = (site / MODEL / "L0" / "N0" / "index.html").read_text()
    assert '<h3><a href="#F1">Feature F1</a></h3>' in feature_html(page, 1) and "cluster 2 of" not in page
    home = (site / "index.html").read_text()
    assert "first examples in corpus order" in home and "strongest examples" not in home


def test_feature_summaries_count_max_tokens_and_the_token_before_as_a_literal_loop_does(built):
    cfg, site = built
    paths = AtlasPaths.of(cfg)
    examples, clusters = read_examples(paths, "L0"), read_clusters(paths, "L0")
    tokens = read_tokens(paths)
    doc = sidecar(site, 0, 0)
    atlas = inputs.load_atlas(cfg, fx.VOCAB)
    summaries = sidecars.feature_summaries(inputs.load_set(atlas, atlas.index.get("L0")), 0, cfg.window_before)
    vocab = fx.VOCAB
    part = examples.unit_slice(0)
    for k, cluster in enumerate(doc["clusters"]):
        members = [j for j in range(part.start, part.stop) if clusters["labels"][j] == k]
        peaks, befores, first = {}, {}, {}
        for order, j in enumerate(members):
            seq, pos = int(examples.seq[j]), int(examples.pos[j])
            peak = int(tokens[seq, pos])
            peaks[peak] = peaks.get(peak, 0) + 1
            first.setdefault(("p", peak), order)
            if pos > 0:
                before = int(tokens[seq, pos - 1])
                befores[before] = befores.get(before, 0) + 1
                first.setdefault(("b", before), order)
        ranked = sorted(peaks, key=lambda t: (-peaks[t], first[("p", t)]))[:3]
        summary = summaries[k]
        assert [(fx.VOCAB[t], c) for t, c in [(ranked_id, peaks[ranked_id]) for ranked_id in ranked]] == \
            [(vocab[t], c) for t, c in summary["top"]]
        best_before = min(befores, key=lambda t: (-befores[t], first[("b", t)]))
        assert (vocab[summary["before"][0]], summary["before"][1]) == (fx.VOCAB[best_before],
                                                                              befores[best_before])
        acts = examples.act[members]
        assert summary["size"] == len(members) == cluster["size"]
        assert abs(summary["mean"] - float(acts.mean())) < 1e-3 and abs(summary["max"] - float(acts.max())) < 1e-3
    page = (site / MODEL / "L0" / "N0" / "index.html").read_text()
    assert "Features at a glance" in page
    for summary in summaries:
        top_token, count = summary["top"][0]
        assert html.escape("\u201c" + text.display_token(vocab[top_token]) + "\u201d", quote=True) + \
            f" \u00d7{count}" in page


def test_single_example_features_fold_into_one_unclustered_group_and_keep_their_text(tmp_path):
    cfg = fx.build_site(tmp_path, cluster_threshold=0.01)  # a low cut: many features of one example
    paths = AtlasPaths.of(cfg)
    clusters = read_clusters(paths, "L0")
    sizes = clusters["cluster_size"][clusters["cluster_offsets"][0]:clusters["cluster_offsets"][1]]
    singles = np.flatnonzero(sizes == 1)
    assert len(singles) >= 2
    page = (Path(cfg.site_dir) / MODEL / "L0" / "N0" / "index.html").read_text()
    group = page[page.index('<details class="unclustered" id="unclustered">'):]
    group = group[:group.index("</details>")]
    assert f"Unclustered examples ({len(singles)}:" in group
    for k in range(len(sizes)):
        assert (f'id="F{k}"' in group) == (k in singles)
        # Every feature, single or not, prints its central example and its citation for readers without JavaScript.
        assert 'class="ex-static"' in feature_html(page, k) and f"#F{k}</p>" in feature_html(page, k)


def test_every_citation_names_the_release_and_the_sha256_of_the_data_its_page_shows(built):
    _, site = built
    unstamped = "<!--atlas:release-->unreleased<!--/atlas:release-->"
    cited = 0
    for page in html_pages(site):
        footer = page.read_text(encoding="utf-8").split("<h2>Cite this page</h2>")[-1]
        line, bib = re.search(r'<p class="cite-line">(.*?)</p>', footer).group(1), footer[footer.index("<pre"):]
        assert f". Release {unstamped}; " in line, page
        path = page.relative_to(site).as_posix()
        if re.fullmatch(rf"{MODEL}/L\d+/N\d+/index.html", path):  # a unit page: its neuron.json (atlas.js: BibTeX)
            sha = hashlib.sha256(page.with_name("neuron.json").read_bytes()).hexdigest()
            assert line.endswith(f"; data sha256 {sha}.") and "@misc" not in bib
        elif re.fullmatch(rf"{MODEL}/L\d+/index.html", path):  # a set page: its rows of the unit table
            shard = f"{MODEL}/data/neurons/{page.parent.name}.json"
            sha = hashlib.sha256((site / shard).read_bytes()).hexdigest()
            assert line.endswith(f"; data sha256 {sha}.") and f"release {unstamped}; data {shard} sha256 {sha}}}" in bib
        else:  # a page about the whole atlas: the release manifest, whose hash only the release knows
            manifest = "<!--atlas:manifest-->unreleased<!--/atlas:manifest-->"
            assert line.endswith(f"; manifest sha256 {manifest}.")
            assert f"release {unstamped}; data release manifest sha256 {manifest}}}" in bib
        cited += 1
    assert cited == len(html_pages(site)) > 15
    pinned = 0
    for document in site.rglob("*.json"):  # every .json with a .bin companion pins it
        data = json.loads(document.read_text())
        if "bin" in data:
            assert data["bin_sha256"] == hashlib.sha256(document.with_name(data["bin"]).read_bytes()).hexdigest()
            pinned += 1
    assert pinned == 2 * len(fx.LAYERS) * fx.D_MLP + len(fx.LAYERS)  # neuron.json, similar.json per unit; shards


def test_citations_are_absolute_with_the_configured_author_and_a_unique_key_per_page(tmp_path):
    cfg = fx.build_site(tmp_path, site_url="https://example.org/atlas/", author="Interp Lab")
    site = Path(cfg.site_dir)
    keys = []
    for page in html_pages(site):
        body = page.read_text()
        if 'id="cite"' not in body or page.name == "404.html":  # 404.html cites the home page, key and all
            continue
        # Unit pages (and their features) get their BibTeX from atlas.js, keyed by the page's path (the browser test
        # compares it with pages.bibtex); the other pages print theirs.
        found = re.search(r"@misc\{([^,]+),", body)
        path = page.parent.relative_to(site).as_posix() + "/"
        keys.append(found.group(1) if found else citation_key(path))
        keys += [citation_key(feature_key_path(path, int(k)))
                 for k in re.findall(r'class="feature[^"]*" id="F(\d+)"', body)]
        plain = re.sub(r"<[^>]+>", "", body)
        assert "author = {Interp Lab}" in body or '<span class="cite-author">Interp Lab</span>' in body
        assert "Interp Lab (2024). Neuron Atlas:" in plain and "https://example.org/atlas/" in body
    assert len(keys) == len(set(keys)) > 20
    unit = (site / MODEL / "L0" / "N0" / "index.html").read_text()
    assert 'class="prov"' in unit and f"config {cfg.config_hash()}" in unit
    assert "Interp Lab (2024). Neuron Atlas: tiny-atlas layer 0 neuron 0 feature 0. " \
           "https://example.org/atlas/tiny-atlas/L0/N0/#F0</p>" in feature_html(unit, 0)


def test_the_404_page_links_absolutely_from_the_site_url_path_and_offers_search(tmp_path):
    cfg = fx.build_site(tmp_path, site_url="https://example.org/atlas/")
    page = (Path(cfg.site_dir) / "404.html").read_text()
    assert 'src="/atlas/static/atlas.js"' in page and 'href="/atlas/static/atlas.css"' in page
    assert 'data-model="/atlas/tiny-atlas/"' in page and 'href="/atlas/tiny-atlas/index.html"' in page
    assert 'data-kind="404"' in page  # atlas.js adds the search box to every page's header


def test_search_shards_cut_long_words_and_grow_in_number_until_each_fits_its_budget(monkeypatch):
    monkeypatch.setattr(sidecars, "SEARCH_SHARD_BUDGET", 1_200)
    monkeypatch.setattr(sidecars, "SEARCH_WORD_BUDGET", 300)
    rng = np.random.default_rng(3)
    index = SubjectIndex([mlp_layer(0, 700, 4, False), mlp_layer(1, 700, 4, False)])
    words = [f"w{i}" for i in range(400)] + ["é\"", "the"]
    postings = [(words[min(int(rng.zipf(1.3)) - 1, len(words) - 1)], int(rng.integers(0, 1400)),
                 int(rng.integers(0, 12)), int(rng.integers(0, 30))) for _ in range(6000)]
    postings = list({(w, r, k): (w, r, k, c) for w, r, k, c in postings}.values())  # one posting per feature and word
    docs, cut = sidecars.search_shards("m", index, sidecars.Postings.of(postings))
    shards = docs[0]["shards"]
    assert shards > sidecars.MIN_SEARCH_SHARDS and cut
    for word in {p[0] for p in postings}:
        # Literal reference: most peaking first, then row, feature; the longest prefix whose postings, each
        # written "[row,feature,peaks],", take at most the word budget.
        ranked = sorted(([r, k, c] for w, r, k, c in postings if w == word), key=lambda p: (-p[2], p[0], p[1]))
        kept, spent = [], 0
        for posting in ranked:
            spent += len(orjson.dumps(posting)) + 1
            if spent > sidecars.SEARCH_WORD_BUDGET:
                break
            kept.append(posting)
        doc = docs[sidecars.word_shard(word, shards)]
        assert doc["words"][word] == kept, word
        assert doc["cut"].get(word) == (len(ranked) if len(kept) < len(ranked) else None) == cut.get(word)
    sizes = [len(codec.dumps(doc)) + 1 for doc in docs]
    assert max(sizes) <= sidecars.SEARCH_SHARD_BUDGET
    # Half as many shards would not do: some shard would overflow (to within the estimate's few bytes).
    half = [{**docs[0], "shard": i, "shards": shards // 2, "words": {}, "cut": {}} for i in range(shards // 2)]
    for doc in docs:
        for word, listed in doc["words"].items():
            target = half[sidecars.word_shard(word, shards // 2)]
            target["words"][word] = listed
            if word in doc["cut"]:
                target["cut"][word] = doc["cut"][word]
    assert max(len(codec.dumps(doc)) + 1 for doc in half) > sidecars.SEARCH_SHARD_BUDGET - 4


def test_the_largest_index_download_counts_the_biggest_view_and_search(tmp_path):
    cfg = fx.render_config(tmp_path)
    fx.write_artefacts(cfg)
    stats = render_site(cfg, vocabulary=fx.VOCAB)["index_downloads"]
    data = Path(cfg.site_dir) / MODEL / "data"
    size = lambda name: (data / name).stat().st_size  # noqa: E731
    table = json.loads((data / "neurons.json").read_text())
    shard_bytes = [size(s["file"]) + size(s["file"].replace(".json", ".bin")) for s in table["shards"]]
    assert [s["bytes"] for s in table["shards"]] == shard_bytes and table["all"]
    search = sorted((size(f"search/{i}.json") for i in range(stats["search_shards"])), reverse=True)
    fixed = size("neurons.json") + size("atlas.json")
    assert stats["table_view"] == fixed + sum(shard_bytes)
    assert stats["search"] == fixed + sum(search[:sidecars.MAX_QUERY_WORDS])
    assert stats["page"] == stats["table_view"] + sum(search[:sidecars.MAX_QUERY_WORDS])


def test_the_simulated_index_follows_the_render_rules_for_sizes_and_postings():
    from builder.scale import index as scale_index

    rng = np.random.default_rng(5)
    counts, sizes = scale_index.feature_sizes(rng, 40, 30, 6)
    owner = np.repeat(np.arange(40), counts)
    assert (sizes >= 1).all() and np.bincount(owner, weights=sizes).tolist() == [30.0] * 40
    words = ["a", "b", "c", "d", "e", "f"]
    postings = scale_index.simulated_postings(rng, counts, sizes, words, np.full(6, 1 / 6))
    first = np.r_[0, np.cumsum(counts)[:-1]]
    listed: dict[tuple[int, int], dict[int, int]] = {}
    for w, row, k, peaks in zip(*postings[1:]):
        assert (int(row), int(k)) not in listed or int(w) not in listed[int(row), int(k)]  # one posting per word
        listed.setdefault((int(row), int(k)), {})[int(w)] = int(peaks)
    for feature, size in enumerate(sizes.tolist()):
        row = int(owner[feature])
        peaks = listed[row, feature - int(first[row])]
        # Literal reference: every example peaks on one word, so a feature's peak counts add up to its size, and
        # words near its central example only appear (with 0) where no example peaks on them.
        assert sum(peaks.values()) == size and len([p for p in peaks.values() if p > 0]) <= size


def test_the_reference_scale_site_renders_real_text_with_the_features_asked_for(tmp_path):
    from builder.scale import site as scale_site

    tokens, vocabulary = scale_site.corpus_tokens(scale_site.CONTEXT, 120)
    cfg = scale_site.synthetic_config(tmp_path, 1, len(tokens))
    scale_site.write_atlas(cfg, tokens, len(vocabulary), 6, 5)
    stats = render_site(cfg, vocabulary=vocabulary)
    assert stats["neurons"] == 6 and stats["mean_examples"] == 100 and stats["mean_clusters"] == 5
    corpus = "".join(vocabulary[t] for t in tokens.reshape(-1).tolist())
    clusters = read_clusters(AtlasPaths.of(cfg), "L0")
    examples = read_examples(AtlasPaths.of(cfg), "L0")
    for neuron in range(6):
        # The central example of each feature, as the feature's section prints it, is a passage of the corpus.
        central = int(clusters["cluster_central"][int(clusters["cluster_offsets"][neuron])])
        seq, pos = int(examples.seq[central]), int(examples.pos[central])
        page = feature_html((Path(cfg.site_dir) / cfg.name / "L0" / f"N{neuron}" / "index.html").read_text(), 0)
        shown = html.unescape(re.search(r'<p class="ex-static" dir="ltr">(.*?)</p>', page).group(1))
        shown = re.sub(r"</?(mark|bdi)>", "", shown)
        window = "".join(vocabulary[t] for t in tokens[seq, max(0, pos - cfg.window_before):pos + cfg.window_after + 1])
        assert shown == text.display_token(window) and window in corpus
