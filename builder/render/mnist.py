"""The MNIST atlas (the paper's second UI): static pages under site/mnist/ from the reproduction's artefacts
(builder/mnist/schema.py: tables.json and atlas.npz in cfg.mnist_dir), published whenever both exist.

Layout (beside the language model's folder; relative links, always to an explicit index.html):

    mnist/index.html                 the experiment, Tables 2 and 3 (ours beside the paper's), the claims, the sets
    mnist/{set}/index.html           the set's units
    mnist/{set}/N{j}/index.html      a unit: activation and importance maps, logit effects, random activating digits,
                                     feature clusters with their digits (central first)
    mnist/{set}/N{j}/activation.png, importance.png
    mnist/digits/{i}.png             each test digit shown anywhere (28 × 28, enlarged by CSS)

No script: the pages are plain HTML with inline SVG bar charts (attributes and classes only, as the CSP allows no
inline style) and PNGs written by the small deterministic encoder below.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from builder.errors import ArtefactError
from builder.mnist.schema import (ATLAS_FILE, METRIC_LABELS, MNIST_ATLAS, MNIST_TABLES, PAPER, TABLE2_METRICS,
                                  TABLE3_METRICS, TABLES_FILE)
from builder.render.pages import CITE_MANIFEST, citation, colour_class, environment
from builder.render.text import clean_text
from builder.schema import METRIC_NAMES

log = logging.getLogger(__name__)

FOLDER = "mnist"
SIDE = 28  # MNIST digits are 28 × 28
DIGITS = 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_LEVEL = 9  # fixed zlib level: the same pixels give the same bytes
SET_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


# ---------------------------------------------------------------------------------------------------------------
# PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_gray(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of `pixels` ([height, width] uint8): one IDAT, filter 0 on every row, no metadata."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ValueError(f"png_gray needs a non-empty [height, width] array, got shape {pixels.shape}")
    height, width = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    return (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, PNG_LEVEL)) + _chunk(b"IEND", b""))


def scaled(values: np.ndarray) -> np.ndarray:
    """A non-negative map as 0–255 pixels, its maximum white (all black when it has none)."""
    values = np.nan_to_num(np.asarray(values, np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    top = values.max() if values.size else 0.0
    if top <= 0:
        return np.zeros(values.shape, np.uint8)
    return np.round(255.0 * values / top).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Numbers and tables


def num(value, digits: int = 3) -> str:
    """A number for a page: `digits` significant digits, whole with thousands separators from 10^digits up, an en
    dash for NaN/None (so 2,634 never reads 2.63e+03)."""
    if value is None:
        return "–"
    value = float(value)
    if not math.isfinite(value):
        return "–"
    if abs(value) >= 10 ** digits:
        return f"{round(value):,}"
    text = f"{value:.{digits}g}"
    return text if "e" not in text else f"{value:.{digits}e}"


def signed(value: float, digits: int = 3) -> str:
    text = num(value, digits)
    return text if text.startswith(("-", "–")) or value == 0 else "+" + text


def mean_sd(entry: dict | None) -> str:
    if not entry:
        return "–"
    text = num(entry.get("mean"))
    values = entry.get("values") or []
    if len(values) > 1 and entry.get("sd") is not None:
        text += " ± " + num(entry["sd"], 2)
    return text


def _text(value) -> str:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return num(value, 4)
    return clean_text(json.dumps(value, sort_keys=True, ensure_ascii=False))


def flat(settings: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested settings as sorted (dotted key, value) pairs."""
    pairs = []
    for key, value in sorted(settings.items(), key=lambda kv: str(kv[0])):
        name = prefix + clean_text(str(key))
        pairs += flat(value, name + ".") if isinstance(value, dict) and value else [(name, value)]
    return pairs


def verdict(holds: bool, detail: str) -> dict:
    """A claim's verdict as shown: "holds", else the shipped λ2's verdict from the detail (builder/mnist/repro.py
    writes `λ2 = 1 (shipped): … : does not hold` or `inconclusive (…)`), else "not shown"."""
    if holds:
        return {"verdict": "holds", "verdict_class": "holds"}
    shipped = next((part for part in detail.split("; ") if "(shipped)" in part), "")
    said = shipped.rsplit("): ", 1)[-1] if "): " in shipped else ""
    if said.startswith("does not hold"):
        return {"verdict": "does not hold", "verdict_class": "fails"}
    if said.startswith("inconclusive"):
        return {"verdict": "inconclusive", "verdict_class": "unclear"}
    return {"verdict": "not shown", "verdict_class": "unclear"}


def mnist_available(mnist_dir: str | Path) -> bool:
    """Whether the reproduction's two artefacts exist (render then publishes site/mnist/)."""
    folder = Path(mnist_dir)
    return (folder / TABLES_FILE).is_file() and (folder / ATLAS_FILE).is_file()


def read_tables(mnist_dir: str | Path) -> dict:
    return MNIST_TABLES.read_json(Path(mnist_dir) / TABLES_FILE)


def tables_context(tables: dict, base: str, set_keys: list[str] | None = None) -> dict:
    """Tables 2 and 3, the claims, the split and the settings as a page prints them; `base` is the relative path from
    the page to the mnist/ folder (row names link to the sets the atlas shows)."""
    try:
        seeds = [int(s) for s in tables.get("seeds", [])]
        split = tables["split"]
        rows = tables["rows"]
        shown = set(set_keys or [])
        papers = tables.get("paper") or PAPER

        def table(metrics: tuple[str, ...]) -> dict:
            out = []
            for row in rows:
                paper = papers.get("Standard" if float(row.get("ne", 0.0)) == 0 else "+ NE loss", {})
                set_key = str(row.get("atlas_set", ""))
                out.append({"name": clean_text(str(row["name"])), "ne": num(row.get("ne", 0.0), 4),
                            "href": f"{base}{set_key}/index.html" if set_key in shown else None,
                            "cells": [{"ours": mean_sd(row["metrics"].get(m)), "paper": num(paper.get(m))}
                                      for m in metrics]})
            return {"names": [METRIC_LABELS[m] for m in metrics], "rows": out}

        claims = [{"claim": clean_text(str(c["claim"])), "metric": METRIC_LABELS.get(c["metric"], str(c["metric"])),
                   "direction": "↑" if c["direction"] == "up" else "↓", "holds": bool(c["holds"]),
                   **verdict(bool(c["holds"]), clean_text(str(c.get("detail", "")))),
                   "details": [clean_text(part) for part in str(c.get("detail", "")).split("; ") if part]}
                  for c in tables["claims"]]
        accuracy = tables["mlp_accuracy"]
        train, test = int(split["train"]), int(split["test"])
        return {"base": base, "seeds": seeds, "n_seeds": len(seeds),
                "seeds_text": ", ".join(str(s) for s in seeds),
                "table2": table(TABLE2_METRICS), "table3": table(TABLE3_METRICS), "claims": claims,
                "held": sum(c["holds"] for c in claims), "accuracy": mean_sd(accuracy) + " %",
                "split": {"train": f"{train:,}", "test": f"{test:,}", "total": f"{train + test:,}",
                          "seed": str(split.get("seed", "")), "source": clean_text(str(split.get("source", ""))),
                          "paper": clean_text(str(split.get("paper", "")))},
                "settings": [{"key": k, "value": _text(v)} for k, v in flat(tables.get("settings", {}))]}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ArtefactError(f"mnist-tables artefact {TABLES_FILE} does not follow builder/mnist/schema.py "
                            f"({error!r}); re-run `atlas repro`") from None


METHOD_ROOT = "../../"  # from {model}/method/index.html to the site root


def method_context(mnist_dir: str | Path) -> dict | None:
    """What the method page shows of the reproduction (its links relative to the method page), None without it."""
    if not mnist_available(mnist_dir):
        if (Path(mnist_dir) / TABLES_FILE).is_file() or (Path(mnist_dir) / ATLAS_FILE).is_file():
            log.warning("render: %s holds only one of %s and %s; the site leaves the MNIST atlas out", mnist_dir,
                        TABLES_FILE, ATLAS_FILE)
        return None
    keys = MNIST_ATLAS.read_fields(Path(mnist_dir) / ATLAS_FILE, ("set_keys",))["set_keys"]
    context = tables_context(read_tables(mnist_dir), f"{METHOD_ROOT}{FOLDER}/", [str(k) for k in keys.tolist()])
    return {**context, "href": f"{METHOD_ROOT}{FOLDER}/index.html"}


# ---------------------------------------------------------------------------------------------------------------
# The atlas


class MnistAtlas:
    """atlas.npz, checked against the contract once."""

    def __init__(self, arrays: dict[str, np.ndarray], path: Path):
        self.path = path
        try:
            self.images = arrays["images"].astype(np.uint8).reshape(-1, SIDE, SIDE)
            self.labels = arrays["labels"].astype(np.int64)
            self.keys = [str(k) for k in arrays["set_keys"].tolist()]
            self.titles = [clean_text(str(t)) for t in arrays["set_titles"].tolist()]
            self.seed = int(arrays["seed"])
            self.sets = {k: {name: arrays[f"{k}.{name}"] for name in (
                "activation_map", "importance_map", "logit_effects", "max_activation", "density", "random_examples",
                "random_activations", "example_index", "example_activation", "example_cluster", "central",
                "metrics")} for k in self.keys}
        except (KeyError, ValueError, TypeError) as error:
            raise ArtefactError(f"mnist-atlas artefact {path} does not follow builder/mnist/schema.py ({error!r}); "
                                "re-run `atlas repro`") from None
        problems = [k for k in self.keys if not SET_KEY.match(k) or k == "digits"]
        if problems or len(self.titles) != len(self.keys) or len(set(self.keys)) != len(self.keys):
            raise ArtefactError(f"mnist-atlas artefact {path} has unusable set keys {self.keys!r} (URL slugs, unique, "
                                "not 'digits', one title each); re-run `atlas repro`")
        for k, s in self.sets.items():
            n = len(s["max_activation"])
            if (s["activation_map"].shape != (n, SIDE * SIDE) or s["importance_map"].shape != (n, SIDE * SIDE)
                    or s["logit_effects"].shape != (n, DIGITS) or s["metrics"].shape != (n, len(METRIC_NAMES))
                    or s["example_index"].shape != s["example_cluster"].shape
                    or s["example_index"].shape != s["example_activation"].shape
                    or s["random_examples"].shape != s["random_activations"].shape
                    or max(int(s["example_index"].max(initial=-1)), int(s["random_examples"].max(initial=-1)))
                    >= len(self.images)):
                raise ArtefactError(f"mnist-atlas artefact {path}: set {k!r} has inconsistent shapes or indices; "
                                    "re-run `atlas repro`")

    def noun(self, key: str) -> str:
        return "neuron" if key == "mlp" else "latent"


def read_atlas(mnist_dir: str | Path) -> MnistAtlas:
    path = Path(mnist_dir) / ATLAS_FILE
    return MnistAtlas(MNIST_ATLAS.read_npz(path), path)


def metric(s: dict, unit: int, name: str) -> float:
    return float(s["metrics"][unit, METRIC_NAMES.index(name)])


def count(value: float) -> str:
    return str(int(value)) if math.isfinite(value) else "–"


class MnistSite:
    """Contexts and files of the MNIST pages, inside the temporary site folder."""

    def __init__(self, site, atlas: MnistAtlas, tables: dict, root_dir: Path):
        self.site = site
        self.atlas = atlas
        self.tables = tables
        self.root_dir = root_dir
        self.folder = root_dir / FOLDER
        self.env = environment()
        self.digits: set[int] = set()
        self.pages = 0
        self.images = 0
        self.order = [(k, j) for k in atlas.keys for j in range(len(atlas.sets[k]["max_activation"]))]
        self.position = {unit: i for i, unit in enumerate(self.order)}
        split = tables.get("split", {})
        self.prov = {"source": clean_text(str(split.get("source", ""))), "seed": atlas.seed,
                     "split": f"{int(split.get('train', 0)):,} / {int(split.get('test', 0)):,}",
                     "n_test": f"{len(atlas.images):,}"}

    # Pages ------------------------------------------------------------------------------------------------------

    def page(self, depth: int, path: str, title: str, cite_title: str, **context) -> dict:
        site = self.site
        root = "../" * depth
        note = (f"MNIST reproduction: MLP 784-64-10 and SAEs of 512 latents on its hidden layer, atlas seed "
                f"{self.atlas.seed}, {self.prov['split']} digits of {self.prov['source']}; code "
                f"{site.prov['code_version']}")
        # The pages draw their figures from the reproduction's artefacts and images: they cite the release manifest.
        return {**site.common, "root": root, "model_root": f"{root}{site.model}/", "path": path, "title": title,
                **citation(site.atlas, site.prov, path, cite_title, CITE_MANIFEST, note=note), "cite_data": None,
                "kind": "mnist", "mnist_prov": self.prov, "method_href": f"{root}{site.model}/method/index.html#mnist",
                "definitions_href": f"{root}{site.model}/method/index.html#mnist-definitions", **context}

    def write(self, relative: str, template: str, context: dict) -> None:
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.env.get_template(template).render(context).encode())
        self.pages += 1

    def write_png(self, path: Path, pixels: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_gray(pixels))
        self.images += 1

    def digit(self, index: int, activation: float, up: str) -> dict:
        """A test digit as a page shows it (`up`: the page's path to the mnist/ folder); its PNG is written once."""
        self.digits.add(index)
        label = int(self.atlas.labels[index])
        return {"src": f"{up}digits/{index}.png", "label": label, "index": index, "act": num(activation),
                "alt": f"digit {label} (test digit {index}), activation {num(activation)}"}

    def set_info(self, key: str) -> dict:
        s = self.atlas.sets[key]
        n = len(s["max_activation"])
        active = int((s["max_activation"] > 0).sum())
        return {"key": key, "title": self.atlas.titles[self.atlas.keys.index(key)], "n": n, "active": active,
                "noun": self.atlas.noun(key), "href": f"{key}/index.html"}

    def nav(self, key: str, unit: int) -> dict:
        def link(step: int):
            i = self.position[(key, unit)] + step
            if not 0 <= i < len(self.order):
                return None
            other_key, other = self.order[i]
            href = f"../N{other}/index.html" if other_key == key else f"../../{other_key}/N{other}/index.html"
            return {"href": href, "label": f"{other_key} N{other}"}

        return {"prev": link(-1), "next": link(1)}

    def index_page(self) -> None:
        sets = [self.set_info(k) for k in self.atlas.keys]
        context = tables_context(self.tables, "", self.atlas.keys)
        self.write("index.html", "mnist_index.html",
                   self.page(1, f"{FOLDER}/", "MNIST · Neuron Atlas", "MNIST reproduction", mnist=context,
                             mnist_sets=sets, n_test=self.prov["n_test"]))

    def set_page(self, key: str) -> None:
        info = self.set_info(key)
        s = self.atlas.sets[key]
        units = []
        for j in range(info["n"]):
            active = bool(s["max_activation"][j] > 0)
            units.append({"n": j, "active": active, "max": num(s["max_activation"][j], 4),
                          "density": num(s["density"][j]), "ex": count(metric(s, j, "n_examples")),
                          "k": count(metric(s, j, "n_clusters")), "max_distance": num(metric(s, j, "max_distance")),
                          "mean_distance": num(metric(s, j, "mean_distance"))})
        self.write(f"{key}/index.html", "mnist_set.html",
                   self.page(2, f"{FOLDER}/{key}/", f"{info['title']} · MNIST · Neuron Atlas",
                             f"MNIST {info['title']}", set_info=info, units=units,
                             inactive=[u["n"] for u in units if not u["active"]]))

    def unit_page(self, key: str, j: int) -> None:
        s, info = self.atlas.sets[key], self.set_info(key)
        folder = self.folder / key / f"N{j}"
        active = bool(s["max_activation"][j] > 0)
        maps = None
        if active:
            self.write_png(folder / "activation.png", scaled(s["activation_map"][j]).reshape(SIDE, SIDE))
            self.write_png(folder / "importance.png", scaled(s["importance_map"][j]).reshape(SIDE, SIDE))
            maps = {"activation_max": num(float(np.nanmax(s["activation_map"][j]))),
                    "importance_max": num(float(np.nanmax(s["importance_map"][j])))}
        up = "../../"
        randoms = [self.digit(int(i), float(a), up) for i, a in zip(s["random_examples"][j].tolist(),
                                                                    s["random_activations"][j].tolist()) if i >= 0]
        index, acts, labels = s["example_index"][j], s["example_activation"][j], s["example_cluster"][j]
        valid = index >= 0
        n_examples = int(valid.sum())
        clusters = []
        for k, centre in enumerate(s["central"][j].tolist()):
            members = [int(p) for p in np.flatnonzero(valid & (labels == k))]
            if not members:
                continue
            order = ([centre] + [p for p in members if p != centre]) if centre in members else members
            digits = [self.digit(int(index[p]), float(acts[p]), up) for p in order]
            tally = np.bincount([d["label"] for d in digits], minlength=DIGITS)
            clusters.append({"k": k, "size": len(members), "share": num(100.0 * len(members) / n_examples) + " %",
                             "mean_act": num(float(np.mean(acts[members]))), "digits": digits,
                             "central": centre in members, "colour": colour_class(k),
                             "tally": " · ".join(f"{d} ×{int(c)}" for d, c in sorted(
                                 enumerate(tally.tolist()), key=lambda dc: (-dc[1], dc[0])) if c)})
        loose = [int(p) for p in np.flatnonzero(valid & ((labels < 0) | (labels >= len(s["central"][j]))))]
        unclustered = [self.digit(int(index[p]), float(acts[p]), up) for p in loose]
        metric_rows = [("Max activation", num(s["max_activation"][j], 4)), ("Density", num(s["density"][j])),
                       ("Examples", count(metric(s, j, "n_examples"))),
                       ("Feature clusters", count(metric(s, j, "n_clusters"))),
                       ("Largest share", num(metric(s, j, "largest_share"))),
                       ("Max distance", num(metric(s, j, "max_distance"))),
                       ("Mean distance", num(metric(s, j, "mean_distance"))),
                       ("Intra-cluster", num(metric(s, j, "intra_distance"))),
                       ("Inter-cluster", num(metric(s, j, "inter_distance")))]
        name = f"{info['title']} · {info['noun'].capitalize()} {j}"
        self.write(f"{key}/N{j}/index.html", "mnist_unit.html",
                   self.page(3, f"{FOLDER}/{key}/N{j}/", f"{key} N{j} · MNIST · Neuron Atlas",
                             f"MNIST {info['title']}, {info['noun']} {j}", set_info=info, unit=j, heading=name,
                             active=active, maps=maps, logits=logit_chart(s["logit_effects"][j]), randoms=randoms,
                             clusters=[c for c in clusters if c["size"] > 1],
                             singles=[{**c["digits"][0], "tag": f"F{c['k']}"} for c in clusters if c["size"] == 1],
                             unclustered=unclustered, n_examples=n_examples,
                             metric_rows=[{"name": a, "value": b} for a, b in metric_rows], nav=self.nav(key, j)))

    def digit_images(self) -> None:
        for index in sorted(self.digits):
            self.write_png(self.folder / "digits" / f"{index}.png", self.atlas.images[index])


# The logit-effect chart: ten bars around a zero line, in SVG user units (the CSS scales the whole chart).
CHART = {"width": 340, "height": 168, "zero": 80, "reach": 56, "pitch": 32, "bar": 22, "pad": 10}


def logit_chart(effects: np.ndarray) -> dict:
    """The unit's direct effect on each digit's logit as bars (positions in the SVG's user units)."""
    effects = np.nan_to_num(np.asarray(effects, np.float64))
    top = float(np.abs(effects).max()) if effects.size else 0.0
    scale = CHART["reach"] / top if top > 0 else 0.0
    bars = []
    for digit, value in enumerate(effects.tolist()):
        height = abs(value) * scale
        x = CHART["pad"] + digit * CHART["pitch"] + (CHART["pitch"] - CHART["bar"]) / 2
        y = CHART["zero"] - height if value > 0 else CHART["zero"]
        label_y = y - 4 if value > 0 else CHART["zero"] + height + 11
        bars.append({"digit": digit, "x": f"{x:.1f}", "y": f"{y:.1f}", "w": CHART["bar"], "h": f"{height:.1f}",
                     "cx": f"{x + CHART['bar'] / 2:.1f}", "label_y": f"{label_y:.1f}", "value": signed(value, 2),
                     "sign": "pos" if value > 0 else "neg"})
    best = int(np.argmax(effects)) if effects.size else 0
    worst = int(np.argmin(effects)) if effects.size else 0
    return {**CHART, "bars": bars, "digit_y": CHART["height"] - 6, "best": best, "worst": worst,
            "summary": f"most up: {best} ({signed(effects[best])}), most down: {worst} ({signed(effects[worst])})"}


def render_mnist(site, mnist_dir: str | Path, root_dir: Path) -> dict:
    """Write site/mnist/ (inside the temporary site folder `root_dir`) from the artefacts in `mnist_dir`; returns how
    many pages and images it wrote."""
    tables = read_tables(mnist_dir)
    atlas = read_atlas(mnist_dir)
    tables_context(tables, "", atlas.keys)  # refuse a malformed table before writing anything
    pages = MnistSite(site, atlas, tables, root_dir)
    pages.index_page()
    for key in atlas.keys:
        pages.set_page(key)
        for j in range(len(atlas.sets[key]["max_activation"])):
            pages.unit_page(key, j)
    pages.digit_images()
    log.info("render: MNIST atlas, %d pages and %d images from %s", pages.pages, pages.images, mnist_dir)
    return {"mnist_pages": pages.pages, "mnist_images": pages.images}
