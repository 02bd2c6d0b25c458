"""The Python reader (builder/reader.py) on the golden site (tests/golden/site), once from the folder and once over
HTTP from a local server that holds only the published data files: every unit decodes to what its JSON holds and to
the render's inputs (the synthetic artefacts of tests/render_fixtures.py, the golden site's inputs), read back
literally; unknown versions, units without a page, damaged files and network failures are one line each."""

from __future__ import annotations

import functools
import json
import math
import shutil
import socket
import threading
import zlib
from contextlib import contextmanager
from dataclasses import asdict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster

import render_fixtures as fx
from builder.paths import AtlasPaths
from builder.reader import (READABLE_VERSIONS, FetchError, NotInAtlasError, ReaderError, UnknownSchemaError,
                            open_atlas)
from builder.render.codec import SCHEMA_VERSIONS
from builder.render.text import clean_text
from builder.schema import (read_clusters, read_example_fields, read_examples, read_importance, read_logits,
                            read_metrics_table, read_neighbours, read_tokens)
from conftest import expect_error

GOLDEN = Path(__file__).parent / "golden" / "site"
MODEL = "tiny-atlas"
SLUGS = [f"L{layer}" for layer in fx.LAYERS]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass


@contextmanager
def serving(folder: Path, handler=QuietHandler):
    """A local HTTP server of `folder` on a free port, on a thread; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def published_copy(folder: Path) -> Path:
    """The golden site's published data files only: no pages, no file:// twins (.json.js)."""
    for path in GOLDEN.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".bin"):
            target = folder / path.relative_to(GOLDEN)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    with serving(published_copy(tmp_path_factory.mktemp("published"))) as url:
        yield url


@pytest.fixture(scope="module", params=["folder", "http"])
def atlas(request, published):
    return open_atlas(GOLDEN) if request.param == "folder" else open_atlas(f"{published}{MODEL}/")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> AtlasPaths:
    """The golden site's render inputs: the fixture artefacts (same seed), written again."""
    cfg = fx.render_config(tmp_path_factory.mktemp("inputs"))
    fx.write_artefacts(cfg)
    return AtlasPaths.of(cfg)


def golden_json(path: str) -> dict:
    return json.loads((GOLDEN / MODEL / path).read_text(encoding="utf-8"))


def golden_packed_json(path: str, ref: list[int]):
    """A packed JSON field, decoded as docs/sidecar-schema.md's snippet does (zlib, then JSON)."""
    blob = (GOLDEN / MODEL / path).read_bytes()
    return json.loads(zlib.decompress(blob[ref[0]:ref[0] + ref[1]]))


def window_strings(tokens: np.ndarray, seq, pos, before: int, after: int) -> list[list[str | None]]:
    """Each window's token strings, literally: the vocabulary's text (lone surrogates as U+FFFD, the schema's one
    exception), None outside the sequence."""
    return [[clean_text(fx.VOCAB[tokens[s, p]]) if 0 <= p < tokens.shape[1] else None
             for p in range(q - before, q + after + 1)] for s, q in zip(seq, pos)]


def test_the_reader_decodes_the_versions_the_renderer_writes():
    # A bump of a kind's version must come with the reader's update; until then the reader refuses the new files.
    assert READABLE_VERSIONS == {kind: SCHEMA_VERSIONS[kind] for kind in READABLE_VERSIONS}


def test_models_and_subject_sets_are_those_the_manifests_list(atlas):
    assert atlas.models == [MODEL]
    assert [asdict(s) for s in atlas.sets(MODEL)] == golden_json("data/neurons.json")["sets"]
    assert [s.slug for s in atlas.sets(MODEL)] == SLUGS
    assert atlas.manifest(MODEL) == golden_json("data/atlas.json")
    assert atlas.common(MODEL) == golden_json("data/common.json")


def test_every_unit_decodes_to_what_its_json_holds(atlas):
    for slug in SLUGS:
        for number in range(fx.D_MLP):
            doc = golden_json(f"{slug}/N{number}/neuron.json")
            unit = atlas.unit(MODEL, slug, number)
            assert (unit.model, unit.set, unit.slug, unit.kind, unit.layer, unit.unit, unit.path) == \
                (MODEL, doc["set"], slug, "mlp", doc["layer"], number, f"{MODEL}/{slug}/N{number}/")
            assert unit.max_activation == doc["max_activation"] and unit.metrics == doc["metrics"]
            assert unit.cluster_threshold == doc["cluster_threshold"]
            assert (unit.window_before, unit.window_after) == (doc["window"]["before"], doc["window"]["after"])
            assert list(unit.activation_range) == doc["examples"]["activation_range"]
            assert len(unit.examples) == doc["examples"]["count"]
            assert [{"size": f.size, "central": f.central, "similar": f.n_similar} for f in unit.features] == \
                doc["clusters"]
            assert [f.path for f in unit.features] == [f"{doc['path']}#F{k}" for k in range(len(doc["clusters"]))]
            assert unit.intervals.bounds.tolist() == doc["intervals"]["bounds"]
            assert unit.intervals.activation.tolist() == doc["intervals"]["activation"]
            page_vocabulary = golden_json("data/common.json")["tokens"] + golden_packed_json(
                f"{slug}/N{number}/neuron.bin", doc["vocab"])
            for side in ("top", "bottom"):
                assert getattr(unit.logits, side) == [(page_vocabulary[i], v) for i, v in doc["logits"][side]]


def test_every_unit_decodes_to_the_render_inputs(atlas, inputs):
    tokens = read_tokens(inputs)
    table = read_metrics_table(inputs)
    edges = golden_json("data/common.json")["histogram_edges"]
    row = 0
    for slug in SLUGS:
        examples, clusters = read_examples(inputs, slug), read_clusters(inputs, slug)
        scores = read_importance(inputs, slug)["importance"]
        logits = read_logits(inputs, slug)
        collected = read_example_fields(inputs, slug, ("histogram", "interval_seq", "interval_pos", "interval_act"))
        for number in range(fx.D_MLP):
            unit = atlas.unit(MODEL, slug, number)
            before, after = unit.window_before, unit.window_after
            part = examples.unit_slice(number)
            seq, pos = examples.seq[part], examples.pos[part]
            decoded = unit.examples
            assert decoded.sequence.tolist() == seq.tolist() and decoded.position.tolist() == pos.tolist()
            assert decoded.tokens.tolist() == window_strings(tokens, seq, pos, before, after)
            # Activations are quantised to 8 bits over the range: within half a step, NaN exactly outside.
            lo, hi = unit.activation_range
            window = examples.window[part].astype(np.float64)
            assert np.array_equal(np.isnan(decoded.activation), np.isnan(window))
            assert np.all(np.abs(decoded.activation - window)[~np.isnan(window)] <= (hi - lo) / 508 + 1e-6)
            importance = scores[part].astype(np.float64)
            assert np.array_equal(np.isnan(decoded.importance), np.isnan(importance))
            assert np.all(np.abs(decoded.importance - importance)[~np.isnan(importance)] <= 1 / 508 + 1e-6)
            labels = clusters["labels"][part]
            assert decoded.feature.tolist() == labels.tolist()
            features = slice(clusters["cluster_offsets"][number], clusters["cluster_offsets"][number + 1])
            assert [f.size for f in unit.features] == clusters["cluster_size"][features].tolist()
            assert [f.central for f in unit.features] == (clusters["cluster_central"][features] - part.start).tolist()
            for k, feature in enumerate(unit.features):
                members = [i for i, label in enumerate(labels) if label == k]
                assert feature.members.tolist() == members
                assert feature.examples.tokens.tolist() == [decoded.tokens.tolist()[i] for i in members]
            # The dendrogram: children exact, merge distances the artefact's float64 rounded to float32.
            links = clusters["linkage"][clusters["linkage_offsets"][number]:clusters["linkage_offsets"][number + 1]]
            assert unit.linkage.children.tolist() == links[:, :2].astype(np.int64).tolist()
            assert np.array_equal(unit.linkage.distance, links[:, 2].astype(np.float32))
            if len(seq) > 1:  # the documented re-cut: fcluster at the threshold, features by size, then first seen
                raw = fcluster(unit.linkage.matrix(), t=unit.cluster_threshold, criterion="distance").tolist()
                order = sorted(set(raw), key=lambda c: (-raw.count(c), raw.index(c)))
                assert [order.index(c) for c in raw] == labels.tolist()
            present = collected["interval_seq"][number] >= 0
            assert unit.intervals.interval.tolist() == np.nonzero(present)[0].tolist()
            assert unit.intervals.sequence.tolist() == collected["interval_seq"][number][present].tolist()
            assert unit.intervals.position.tolist() == collected["interval_pos"][number][present].tolist()
            np.testing.assert_allclose(unit.intervals.activation, collected["interval_act"][number][present],
                                       rtol=5e-4)  # 4 significant digits
            assert unit.intervals.tokens.tolist() == window_strings(
                tokens, collected["interval_seq"][number][present], collected["interval_pos"][number][present],
                before, after)
            assert unit.histogram.counts.tolist() == collected["histogram"][number].tolist()
            assert unit.histogram.edges.tolist() == edges
            for side in ("top", "bottom"):
                shown = getattr(unit.logits, side)
                assert [t for t, _ in shown] == [clean_text(fx.VOCAB[i]) for i in logits[f"logit_{side}_ids"][number]]
                np.testing.assert_allclose([v for _, v in shown], logits[f"logit_{side}_values"][number], rtol=1e-3)
            assert unit.max_activation == pytest.approx(float(table["max_activation"][row]), rel=1e-3)
            for name, value in unit.metrics.items():
                expected = float(table[name][row])
                assert value is None if math.isnan(expected) else value == pytest.approx(expected, rel=1e-3), name
            row += 1


def test_similar_features_decode_to_the_neighbours_artefact(atlas, inputs):
    table = read_neighbours(inputs)
    found = 0
    for position, slug in enumerate(SLUGS):
        for number in range(fx.D_MLP):
            similar = atlas.similar(MODEL, slug, number)
            expected = []
            for r in np.flatnonzero((table["feature_set"] == position) & (table["feature_unit"] == number)):
                for target, similarity in zip(table["neighbour_index"][r], table["neighbour_similarity"][r]):
                    if target >= 0:
                        other = SLUGS[table["feature_set"][target]]
                        expected.append((int(table["feature_cluster"][r]), other, int(table["feature_unit"][target]),
                                         int(table["feature_cluster"][target]), round(float(similarity) * 1e4) / 1e4))
            assert [(s.feature, s.slug, s.unit, s.cluster, s.similarity) for s in similar] == expected
            assert all(s.path == f"{MODEL}/{s.slug}/N{s.unit}/#F{s.cluster}" and s.set == s.slug for s in similar)
            doc = golden_json(f"{slug}/N{number}/similar.json")
            texts = golden_packed_json(f"{slug}/N{number}/similar.bin", doc["text"])
            assert [[s.before, s.max_token, s.after, s.top_token, s.top_count, s.size] for s in similar] == texts
            found += len(similar)
    assert found == int((table["neighbour_index"] >= 0).sum()) > 0


def test_a_model_folder_opens_like_the_site_folder():
    atlas = open_atlas(GOLDEN / MODEL)
    assert atlas.models == [MODEL]
    assert atlas.unit(MODEL, "L2", 4).examples.tokens.tolist() == \
        open_atlas(GOLDEN).unit(MODEL, "L2", 4).examples.tokens.tolist()


def test_an_extracted_release_archive_opens_from_its_data_folder(tmp_path):
    """`{id}/` of a release archive holds the site's data files under data/ (docs/releases.md)."""
    folder = tmp_path / "2024-05-01-0123456789"
    published_copy(folder / "data")
    (folder / "manifest.json").write_text('{"kind": "release-manifest"}')
    atlas = open_atlas(folder)
    assert atlas.models == [MODEL]
    assert atlas.unit(MODEL, "L2", 4).examples.tokens.tolist() == \
        open_atlas(GOLDEN).unit(MODEL, "L2", 4).examples.tokens.tolist()


def damaged_copy(tmp_path: Path, file: str, change) -> Path:
    """A copy of the golden model with `change(document)` applied to one of its JSON files."""
    site = published_copy(tmp_path / "site")
    path = site / MODEL / file
    document = json.loads(path.read_text(encoding="utf-8"))
    change(document)
    path.write_text(json.dumps(document), encoding="utf-8")
    return site


@pytest.mark.parametrize("file,change,phrases", [
    ("L0/N0/neuron.json", lambda d: d.update(schema_version=4),
     ["L0/N0/neuron.json", "neuron schema version 4", "decodes version 3", "update neuron-atlas"]),
    ("L0/N0/neuron.json", lambda d: d.update(schema_version=2), ["neuron schema version 2", "re-render the site"]),
    ("data/common.json", lambda d: d.update(schema_version=3), ["data/common.json", "common schema version 3"]),
    ("data/neurons.json", lambda d: d.update(kind="neuron"),
     ["data/neurons.json", "kind 'neuron', not 'neuron-table'"]),
    ("L0/N0/similar.json", lambda d: d.pop("schema_version"), ["similar.json", "similar schema version None"]),
])
def test_an_unknown_kind_or_version_is_one_line_naming_the_file(tmp_path, file, change, phrases):
    site = damaged_copy(tmp_path, file, change)
    with serving(site) as url:
        for atlas in (open_atlas(site), open_atlas(f"{url}{MODEL}/")):
            read = atlas.similar if file.endswith("similar.json") else atlas.unit
            expect_error(UnknownSchemaError, lambda: read(MODEL, "L0", 0), *phrases)


def test_a_unit_without_a_page_is_one_line(tmp_path):
    site = published_copy(tmp_path / "site")
    (site / MODEL / "L2" / "N3" / "neuron.json").unlink()
    with serving(site) as url:
        for atlas in (open_atlas(site), open_atlas(f"{url}{MODEL}/")):
            expect_error(NotInAtlasError, lambda: atlas.unit(MODEL, "L2", 3), "L2 unit 3 has no page",
                         "L2/N3/neuron.json not found", "re-render")
            expect_error(NotInAtlasError, lambda: atlas.unit(MODEL, "L0", fx.D_MLP), "L0 has units 0 to 4")
            expect_error(NotInAtlasError, lambda: atlas.unit(MODEL, "L1", 0), "no subject set 'L1'", "L0, L2")
            expect_error(NotInAtlasError, lambda: atlas.similar("other", "L0", 0), "no model 'other'")
    # An SAE's latent that was never active has no page by design, and the line says so.
    manifest = site / MODEL / "data" / "neurons.json"
    document = json.loads(manifest.read_text(encoding="utf-8"))
    document["sets"][1]["kind"] = "sae"
    manifest.write_text(json.dumps(document), encoding="utf-8")
    expect_error(NotInAtlasError, lambda: open_atlas(site).unit(MODEL, "L2", 3), "L2 unit 3 has no page",
                 "latents never active on the corpus have no page")


def test_a_missing_or_damaged_companion_is_one_line(tmp_path):
    site = published_copy(tmp_path / "site")
    (site / MODEL / "L0" / "N0" / "neuron.bin").unlink()
    blob = site / MODEL / "L0" / "N3" / "neuron.bin"
    blob.write_bytes(blob.read_bytes()[:40])
    atlas = open_atlas(site)
    expect_error(ReaderError, lambda: atlas.unit(MODEL, "L0", 0), "L0/N0/neuron.bin is missing")
    expect_error(ReaderError, lambda: atlas.unit(MODEL, "L0", 3), "L0/N3/neuron.bin does not match the bin_sha256",
                 "download both again")
    # Without the pin, the truncated companion fails to decode, and that too is one line.
    sidecar = site / MODEL / "L0" / "N3" / "neuron.json"
    document = json.loads(sidecar.read_text(encoding="utf-8"))
    del document["bin_sha256"]
    sidecar.write_text(json.dumps(document), encoding="utf-8")
    expect_error(ReaderError, lambda: atlas.unit(MODEL, "L0", 3), "L0/N3/neuron.json does not decode",
                 "download it again")
    evil = damaged_copy(tmp_path / "evil", "L0/N1/neuron.json", lambda d: d.update(bin="../../data/vocab.json"))
    expect_error(ReaderError, lambda: open_atlas(evil).unit(MODEL, "L0", 1), "not a file beside it")


def test_network_failures_and_a_site_root_address_are_one_line(published):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    expect_error(FetchError, lambda: open_atlas(f"http://127.0.0.1:{closed}/{MODEL}/"), "could not fetch",
                 f"http://127.0.0.1:{closed}/{MODEL}/data/atlas.json", "check the address")

    class Failing(QuietHandler):
        def do_GET(self) -> None:  # unit 4's files fail on the server
            if "/N4/" in self.path:
                self.send_error(503)
            else:
                super().do_GET()

    with serving(GOLDEN, Failing) as url:
        atlas = open_atlas(f"{url}{MODEL}/")
        expect_error(FetchError, lambda: atlas.unit(MODEL, "L0", 4), "HTTP 503", "L0/N4/neuron.json", "try again")
    expect_error(NotInAtlasError, lambda: open_atlas(published), "a site's root lists no models",
                 f"{published}{{model}}/")
    expect_error(NotInAtlasError, lambda: open_atlas(GOLDEN / MODEL / "L0"), "holds no atlas")
