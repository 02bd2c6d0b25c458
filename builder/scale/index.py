"""Index and search data past one site (issue 14, item 4): the unit table (`neurons.json` and its per-set shards)
and the word search shards of a 7B-sized atlas (32 layers × 14,336 neurons), written by the render stage's own
writers from simulated rows and postings, and the most index data any page view downloads, beside the 1 MB budget;
the same for an atlas of the embedded build's shape.

Only the index and search files are simulated. Rows get plausible metrics and a description naming a real word;
postings follow the render's rules on real word frequencies (data/moby-dick.jsonl split into words as the search
splits them): each example of a feature peaks on a word drawn by corpus frequency, and each feature is also listed
under the words near its central example. Drawing every example's word independently gives more distinct words per
feature than real, coherent features have, so the search index is, if anything, overestimated.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from builder.render.codec import write_data_file
from builder.render.sidecars import (INDEX_BUDGET, SEARCH_CONTEXT, Postings, atlas_manifest, largest_downloads,
                                     unit_description, words_of, write_search_index, write_unit_table)
from builder.schema import HISTOGRAM_EDGES
from builder.subjects import SubjectIndex, mlp_layer
from tests import render_fixtures as fixtures

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "moby-dick.jsonl"
SEVEN_B = {"layers": 32, "d_mlp": 14_336, "d_model": 4_096, "examples": 100, "features": 10}
# The embedded build (configs/embedded.toml): 4 MLP layers of 1,536 neurons; its render measured 26.8 examples and
# 12.8 features per neuron.
EMBEDDED = {"layers": 4, "d_mlp": 1_536, "d_model": 576, "examples": 27, "features": 13}
NEAR_WORDS = SEARCH_CONTEXT + 2  # tokens around a central example's max token that the search lists (3 before, 1 after)


def corpus_words() -> tuple[list[str], np.ndarray]:
    """The corpus's words as the search splits them, most frequent first, and their frequencies."""
    counts: collections.Counter = collections.Counter()
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            counts.update(words_of(json.loads(line)["text"]))
    words, n = zip(*counts.most_common())
    return list(words), np.array(n, np.float64) / sum(n)


def feature_sizes(rng, units: int, examples: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit its feature count (around `features`, at most `examples`), and every feature's size: Zipf-like
    shares of the unit's examples, each feature at least one."""
    counts = np.clip(rng.poisson(features, units), 1, examples)
    owner = np.repeat(np.arange(units), counts)
    rank = np.arange(len(owner)) - np.repeat(np.r_[0, np.cumsum(counts)[:-1]], counts)
    weight = 1.0 / (rank + 1)
    share = weight / np.bincount(owner, weights=weight)[owner]
    sizes = 1 + np.floor(share * (examples - counts[owner])).astype(np.int64)
    sizes[np.r_[0, np.cumsum(counts)[:-1]]] += examples - np.bincount(owner, weights=sizes).astype(np.int64)
    return counts, sizes


def simulated_postings(rng, counts: np.ndarray, sizes: np.ndarray, words: list[str],
                       frequency: np.ndarray) -> Postings:
    """Postings under the render's rules: each feature under each word its examples peak on (with how many), and
    under the words near its central example that none of them peaks on (peaks 0)."""
    n_words = len(frequency)
    feature = np.repeat(np.arange(len(sizes)), sizes)
    peak = rng.choice(n_words, len(feature), p=frequency)
    keys, peaks = np.unique(feature * n_words + peak, return_counts=True)
    near_feature = np.repeat(np.arange(len(sizes)), NEAR_WORDS - 1)  # ≈ one token of the window is whitespace-only
    near = np.unique(near_feature * n_words + rng.choice(n_words, len(near_feature), p=frequency))
    near = near[~np.isin(near, keys)]
    keys = np.r_[keys, near]
    peaks = np.r_[peaks, np.zeros(len(near), np.int64)]
    unit = np.repeat(np.arange(len(counts)), counts)
    first = np.r_[0, np.cumsum(counts)[:-1]]
    features = keys // n_words
    return Postings(words, keys % n_words, unit[features], features - first[unit[features]], peaks)


def simulated_columns(rng, counts: np.ndarray, sizes: np.ndarray, examples: int, words: list[str],
                      frequency: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rows of the unit table: plausible metrics and the description of each unit's largest feature."""
    units = len(counts)
    first = np.r_[0, np.cumsum(counts)[:-1]]
    largest = sizes[first]
    top_count = np.maximum(1, np.minimum(largest, rng.geometric(0.3, units)))
    digest = {"top_token": rng.choice(len(words), units, p=frequency), "top_count": top_count, "size": largest}
    stand_in = SimpleNamespace(digest=digest, vocab=[" " + w for w in words])
    defined = counts > 1
    distance = lambda low, high: np.where(defined, rng.uniform(low, high, units), np.nan)  # noqa: E731
    columns = {"max_activation": np.exp(rng.normal(np.log(2.0), 0.6, units)), "density": rng.beta(1.0, 12.0, units),
               "n_examples": np.full(units, examples), "n_clusters": counts, "max_distance": distance(0.8, 1.6),
               "mean_distance": distance(0.3, 0.9), "intra_distance": distance(0.05, 0.45),
               "inter_distance": distance(0.6, 1.3), "largest_share": largest / examples,
               "n_multi": np.bincount(np.repeat(np.arange(units), counts), weights=sizes >= 2,
                                      minlength=units).astype(np.int64)}
    return columns, [unit_description(stand_in, u) for u in range(units)]


def simulate(folder: Path, shape: dict, layers: int, seed: int = 0) -> dict:
    """Write the index and search files of `layers` layers of an atlas of `shape`; the largest downloads."""
    rng = np.random.default_rng(seed)
    words, frequency = corpus_words()
    index = SubjectIndex([mlp_layer(layer, shape["d_mlp"], shape["d_model"], False) for layer in range(layers)])
    started = time.perf_counter()
    counts, sizes = feature_sizes(rng, len(index), shape["examples"], shape["features"])
    postings = simulated_postings(rng, counts, sizes, words, frequency)
    columns, summaries = simulated_columns(rng, counts, sizes, shape["examples"], words, frequency)
    shutil.rmtree(folder, ignore_errors=True)
    data_dir = folder / "data"
    data_dir.mkdir(parents=True)
    cfg = fixtures.render_config(folder, name="simulated", layers=list(range(layers)))
    table = write_unit_table(data_dir, cfg.name, index, columns, summaries)
    search = write_search_index(data_dir, cfg.name, index, postings)
    stand_in = SimpleNamespace(cfg=cfg, sets=index.sets, vocab=words, histogram_edges=HISTOGRAM_EDGES,
                               meta={"n_layers": shape["layers"], "d_mlp": shape["d_mlp"], "max_examples": 100})
    write_data_file(data_dir / "atlas.json", "atlas", atlas_manifest(stand_in, {}, search["shards"]))
    downloads = largest_downloads(table, search, sum((data_dir / name).stat().st_size
                                                     for name in ("neurons.json", "atlas.json")))
    seconds = time.perf_counter() - started
    published = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file() and not p.name.endswith(".js"))
    shutil.rmtree(folder, ignore_errors=True)
    return {"units": len(index), "features": int(len(sizes)), "postings": int(len(postings.word)),
            "words_cut": len(search["cut"]), "index_bytes": published, "seconds": round(seconds, 1), **downloads}


def figure(name: str, downloads: dict) -> dict:
    return {"name": name, "value": downloads["page"], "unit": "B", "target": INDEX_BUDGET,
            "met": bool(downloads["page"] <= INDEX_BUDGET), "detail": downloads}


def measure(out_dir: Path, quick: bool) -> dict:
    """The largest index download of any page at 7B scale (all 32 layers; quick: one, so the table shards are at
    scale but the search index is 1/32 of its size) and at the embedded build's scale."""
    seven_b = simulate(Path(out_dir) / "index-7b", SEVEN_B, 1 if quick else SEVEN_B["layers"])
    embedded = simulate(Path(out_dir) / "index-embedded", EMBEDDED, EMBEDDED["layers"])
    scope = "1 of 32 layers" if quick else "32 layers × 14,336 neurons"
    return {"seven_b": figure(f"largest index/search download of one page, 7B ({scope})", seven_b),
            "embedded": figure("largest index/search download of one page, embedded shape", embedded),
            "quick": quick}


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    folders = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(json.dumps(measure(Path(folders[0] if folders else "build/scale"), "--quick" in sys.argv), indent=1))
