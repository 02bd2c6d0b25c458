"""Every artefact kind, its schema version and its typed reader, in one torch-free module.

Stages write artefacts with these types and read other stages' artefacts only through the readers here, so a kind or
version is spelled once. Reading checks the kind and version and turns a missing, corrupt or foreign file into one
line naming the file and the stage that rewrites it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from builder.artefacts import check_schema, read_json, read_npz, write_json, write_npz
from builder.errors import ArtefactError
from builder.paths import AtlasPaths
from builder.subjects import InputWeights, SubjectSet, subject_set_from_description


@dataclass(frozen=True)
class ArtefactType:
    kind: str
    version: int
    stage: str  # the stage that writes it: re-running that stage is the fix for a bad file

    @property
    def command(self) -> str:
        """The `atlas` command that runs its stage (train_sae → train-sae)."""
        return self.stage.replace("_", "-")

    def write_npz(self, path: Path, **arrays: np.ndarray) -> None:
        write_npz(path, self.kind, self.version, **arrays)

    def write_json(self, path: Path, document: dict) -> None:
        write_json(path, {**document, "kind": self.kind, "schema_version": self.version})

    def read_npz(self, path: Path, prefix: str = "") -> dict[str, np.ndarray]:
        self._require(path)
        return read_npz(path, self.kind, self.version, prefix)

    def read_json(self, path: Path) -> dict:
        self._require(path)
        return read_json(path, self.kind, self.version)

    def _require(self, path: Path) -> None:
        if not Path(path).is_file():
            raise ArtefactError(f"{self.kind} artefact {path} is missing; run `atlas {self.command}` (or "
                                "`atlas build`) first")

    def read_fields(self, path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Only the named arrays of an .npz artefact (collect's input vectors and embed's weights are large and
        often unneeded), after checking its kind and version."""
        path = Path(path)
        self._require(path)
        try:
            with np.load(path, allow_pickle=False) as bundle:
                check_schema({"kind": str(bundle["_kind"]), "schema_version": int(bundle["_schema_version"])}, path,
                             self.kind, self.version)
                return {name: bundle[name] for name in names}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
            raise ArtefactError(f"{self.kind} artefact {path} is corrupt or truncated (or lacks expected arrays); "
                                f"delete it and re-run `atlas {self.command}`") from None

    def is_readable(self, path: Path) -> bool:
        try:
            self.check_readable(path)
        except ArtefactError:
            return False
        return True

    def check_readable(self, path: Path) -> None:
        """Raise ArtefactError unless `path` opens as this kind and version (cheap: no array is decompressed)."""
        path = Path(path)
        if path.suffix == ".npz":
            self.read_fields(path, ())
        else:
            self.read_json(path)


def meta_type(stage: str, version: int) -> ArtefactType:
    return ArtefactType(f"{stage}-meta", version, stage)


TOKENS = ArtefactType("collect-tokens", 1, "collect")
COLLECT_SHARD = ArtefactType("collect-shard", 3, "collect")
EXAMPLES = ArtefactType("collect-set", 3, "collect")
WEIGHTS = ArtefactType("embed-set", 2, "embed")
DICTIONARY = ArtefactType("embed-dictionary", 1, "embed")  # builder/dictionary.py, per SAE set
EVALUATION = ArtefactType("sae-evaluation", 1, "evaluate")  # builder/evaluate.py, per SAE set
# builder/train_sae, per [[train_sae]] table (the trained SAE itself is a SAELens folder, read by builder/sae.py)
TRAIN_TOKENS = ArtefactType("train-sae-tokens", 1, "train_sae")
TRAIN_CHECKPOINT = ArtefactType("train-sae-checkpoint", 1, "train_sae")
TRAINING_LOG = ArtefactType("train-sae-log", 1, "train_sae")
TRAINING_EVALUATION = ArtefactType("train-sae-evaluation", 1, "train_sae")
CLUSTERS = ArtefactType("cluster-set", 3, "cluster")
METRICS = ArtefactType("cluster-metrics", 2, "cluster")
IMPORTANCE_SHARD = ArtefactType("importance-shard", 3, "importance")  # 3: forward counters
IMPORTANCE = ArtefactType("importance-set", 2, "importance")
NEIGHBOURS = ArtefactType("neighbours", 2, "neighbours")
REPORT = ArtefactType("comparison-report", 2, "report")

# Polysemanticity metrics of every unit, in table order (cluster writes them; render shows them).
METRIC_NAMES = ("n_examples", "n_clusters", "max_distance", "mean_distance", "intra_distance", "inter_distance",
                "largest_share")
COUNT_METRICS = ("n_examples", "n_clusters")

# Histogram edges shared by every unit: 0 and ±0.01·2^(k/3) (three per octave up to ±512, so any activation scale
# reads well), each rounded to the nearest float with 2 mantissa bits (within 7%). On such edges a float32's bin is a
# function of its top 11 bits, which collect counts without a search (builder/collect.py, `count_histogram_keys`).
# A value on an edge counts in the bin nearer zero and ±0 in the bin (−edge, 0]: bin b holds (edges[b − 1], edges[b]]
# above zero and [edges[b − 1], edges[b]) below it.
_MANTISSA, _EXPONENT = np.frexp(0.01 * 2.0 ** (np.arange(0, 48) / 3.0))
_GEOMETRIC = np.ldexp(np.round(_MANTISSA * 8) / 8, _EXPONENT)
HISTOGRAM_EDGES = np.concatenate([-_GEOMETRIC[::-1], [0.0], _GEOMETRIC]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# collect


def read_collect_meta(paths: AtlasPaths) -> dict:
    from builder.pipeline import STAGES

    return STAGES["collect"].meta_type.read_json(paths.meta("collect"))


def collect_sets(meta: dict) -> list[SubjectSet]:
    """The subject sets collect's meta describes, in atlas order."""
    try:
        return [subject_set_from_description(d) for d in meta["subject_sets"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ArtefactError(f"the collect meta does not describe its subject sets ({error}); re-run `atlas collect`") \
            from None


def read_tokens(paths: AtlasPaths) -> Int[np.ndarray, "n_sequences context_length"]:
    return TOKENS.read_npz(paths.tokens)["tokens"]


@dataclass(frozen=True)
class SetExamples:
    """The collect artefact of one subject set. Examples are grouped by unit (offsets) in corpus order; each input
    vector is stored once per (sequence, position) and examples point to it.

    Interval examples lie below the threshold: with T = threshold · max_activation, interval i of a unit is
    [i·T/n, (i+1)·T/n) and holds the first k sequences in corpus order whose max falls in it (-1 / NaN where fewer;
    none for a unit whose max is ≤ 0). Each is its sequence, the first position of its max, and that max."""

    max_activation: Float[np.ndarray, " n_units"]
    offsets: Int[np.ndarray, " n_units_plus_1"]
    seq: Int[np.ndarray, " n_examples"]
    pos: Int[np.ndarray, " n_examples"]
    act: Float[np.ndarray, " n_examples"]
    pre: Float[np.ndarray, " n_examples"]
    pre_linear: Float[np.ndarray, " n_examples"]
    window: Float[np.ndarray, "n_examples window"]
    vector_index: Int[np.ndarray, " n_examples"]
    vectors: Float[np.ndarray, "n_vectors d_input"]
    vector_seq: Int[np.ndarray, " n_vectors"]
    vector_pos: Int[np.ndarray, " n_vectors"]
    observed_max: Float[np.ndarray, " n_units"]
    histogram: Int[np.ndarray, "n_units n_bins"]
    histogram_edges: Float[np.ndarray, " n_edges"]
    interval_seq: Int[np.ndarray, "n_units n_intervals k"]
    interval_pos: Int[np.ndarray, "n_units n_intervals k"]
    interval_act: Float[np.ndarray, "n_units n_intervals k"]

    def unit_slice(self, unit: int) -> slice:
        return slice(int(self.offsets[unit]), int(self.offsets[unit + 1]))

    def unit_vectors(self, unit: int) -> Float[np.ndarray, "n_examples d_input"]:
        return self.vectors[self.vector_index[self.unit_slice(unit)]]

    @property
    def unit_of_example(self) -> Int[np.ndarray, " n_examples"]:
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))


def read_examples(paths: AtlasPaths, set_key: str) -> SetExamples:
    path = paths.set_file("collect", set_key)
    arrays = EXAMPLES.read_npz(path)
    try:
        examples = SetExamples(**arrays)
    except TypeError:
        raise ArtefactError(f"{path} lacks expected arrays; delete it and re-run `atlas collect`") from None
    if examples.offsets[-1] != len(examples.seq):
        raise ArtefactError(f"{path} is inconsistent; delete it and re-run `atlas collect`")
    return examples


def read_example_fields(paths: AtlasPaths, set_key: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return EXAMPLES.read_fields(paths.set_file("collect", set_key), names)


# ---------------------------------------------------------------------------------------------------------------
# embed


@dataclass(frozen=True)
class SetWeights:
    """One subject set's input weights (in its input vector's basis) and its units' direct logit effects."""

    weights: InputWeights
    logit_top_ids: Int[np.ndarray, "n_units k"]
    logit_top_values: Float[np.ndarray, "n_units k"]
    logit_bottom_ids: Int[np.ndarray, "n_units k"]
    logit_bottom_values: Float[np.ndarray, "n_units k"]


LOGIT_FIELDS = ("logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values")


def read_weights(paths: AtlasPaths, set_key: str) -> SetWeights:
    path = paths.set_file("embed", set_key)
    arrays = WEIGHTS.read_npz(path)
    try:
        weights = InputWeights(w=arrays["w"], b=arrays["b"], w_gate=arrays.get("w_gate"))
        return SetWeights(weights=weights, **{name: arrays[name] for name in LOGIT_FIELDS})
    except KeyError:
        raise ArtefactError(f"{path} lacks expected arrays; delete it and re-run `atlas embed`") from None


def read_logits(paths: AtlasPaths, set_key: str) -> dict[str, np.ndarray]:
    return WEIGHTS.read_fields(paths.set_file("embed", set_key), LOGIT_FIELDS)


# ---------------------------------------------------------------------------------------------------------------
# cluster, importance, neighbours, report


def read_clusters(paths: AtlasPaths, set_key: str) -> dict[str, np.ndarray]:
    return CLUSTERS.read_npz(paths.set_file("cluster", set_key))


def read_metrics_table(paths: AtlasPaths) -> dict[str, np.ndarray]:
    return METRICS.read_npz(paths.metrics_table)


def read_importance(paths: AtlasPaths, set_key: str) -> dict[str, np.ndarray]:
    return IMPORTANCE.read_npz(paths.set_file("importance", set_key))


NEIGHBOUR_FIELDS = ("feature_set", "feature_unit", "feature_cluster", "neighbour_index", "neighbour_similarity")


def read_neighbours(paths: AtlasPaths) -> dict[str, np.ndarray]:
    table = NEIGHBOURS.read_npz(paths.neighbours)
    missing = [name for name in NEIGHBOUR_FIELDS if name not in table]
    if missing:
        raise ArtefactError(f"{paths.neighbours} lacks {missing[0]}; delete it and re-run `atlas neighbours`")
    return table


def read_report(paths: AtlasPaths) -> dict:
    return REPORT.read_json(paths.report)
