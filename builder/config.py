"""The one build config: a frozen dataclass loaded from a flat TOML file.

Every default is explained here and nowhere else; the README's config reference points here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from builder.errors import ConfigError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
# Importance batches the masked runs of this many consecutive sequences (aligned to multiples of it); shards must
# not cut such a batch, or a different split would batch other rows together and change float rounding.
SHARD_MULTIPLE = 16


# Slugs an SAE cannot take: the model's own pages and data folders, and MLP layers' slugs (L0, L1, ...).
RESERVED_SLUGS = ("data", "method", "static", "search")
SAE_KEYS = ("path", "slug")


@dataclass(frozen=True)
class SaeSpec:
    """One `[[sae]]` table: an SAE to atlas."""

    # A local folder in the SAELens layout (cfg.json + sae_weights.safetensors), relative paths read from the config
    # file's folder; or hf://owner/repo/subfolder, fetched once from the hub. Its files' contents are part of every
    # stage's key.
    path: str
    # Its URL path component: pages at /{name}/{slug}/N{latent}/. Never change it for a published atlas.
    slug: str

    def __post_init__(self) -> None:
        _check(bool(self.path), "an [[sae]] table needs a path (its SAELens folder)", self.path)
        _check_slug(self.slug, "an [[sae]]")


@dataclass(frozen=True)
class TrainSaeSpec:
    """One `[[train_sae]]` table: an SAE the train_sae stage trains (builder/train_sae), then atlased like an
    `[[sae]]` folder. A standard ReLU SAE; with `ne` > 0, trained with the neuron-embedding loss."""

    # Its URL path component, as an [[sae]] slug: pages at /{name}/{slug}/N{latent}/.
    slug: str
    # The TransformerLens hook whose activations it reconstructs, e.g. blocks.3.mlp.hook_post.
    hook: str
    # Number of latents; 0 = expansion × the hook's width.
    d_sae: int = 0
    expansion: int = 2
    # λ1, the L1 penalty on the latent activations (per-input sum, averaged over the batch). Its right size depends
    # on the hook's scale: pick it so the standard SAE's L0 is a few percent of d_sae (the paper's range).
    l1: float = 1e-3
    # λ2, the weight of the neuron-embedding loss L_N; 0 trains a standard SAE.
    ne: float = 0.0
    # m, the momentum of the per-latent running average L_N compares each input with (the paper's 0.9).
    momentum: float = 0.9
    # Steps trained without L_N before it is switched on (the paper: 200 steps, about 40% of its epoch).
    warmup_steps: int = 200
    # Adam's learning rate.
    learning_rate: float = 1e-3
    # Tokens per optimiser step.
    batch_size: int = 1024
    # Tokens trained on (whole steps: the remainder below one batch is not used), read from train_data_files in
    # corpus order and shuffled within windows of 16 steps by one fixed permutation per window, the same for
    # every SAE, so SAEs on one hook with one batch size see the same batches.
    training_tokens: int = 500_000
    # The initialisation's seed (the token order does not depend on it).
    seed: int = 0

    def __post_init__(self) -> None:
        _check_slug(self.slug, "a [[train_sae]]")
        _check(bool(self.hook) and self.hook.startswith("blocks."), "a [[train_sae]] hook must be a "
               "blocks.<layer>.* TransformerLens hook", self.hook)
        _check(self.d_sae >= 0, "d_sae must be 0 (expansion × the hook's width) or more", self.d_sae)
        _check(self.expansion >= 1, "expansion must be at least 1", self.expansion)
        _check(self.l1 >= 0, "l1 (λ1) must be 0 or more", self.l1)
        _check(self.ne >= 0, "ne (λ2) must be 0 or more", self.ne)
        _check(0 <= self.momentum < 1, "momentum must be in [0, 1)", self.momentum)
        _check(self.warmup_steps >= 0, "warmup_steps must be 0 or more", self.warmup_steps)
        _check(self.learning_rate > 0, "learning_rate must be positive", self.learning_rate)
        _check(self.batch_size >= 1, "batch_size must be at least 1", self.batch_size)
        _check(self.training_tokens >= self.batch_size, f"training_tokens must be at least one batch "
               f"({self.batch_size} tokens)", self.training_tokens)


TRAIN_SAE_KEYS = tuple(f.name for f in fields(TrainSaeSpec))
TRAIN_SAE_TYPES = {f.name: str if f.name in ("slug", "hook") else type(f.default) for f in fields(TrainSaeSpec)}


@dataclass(frozen=True)
class AtlasConfig:
    # Short slug used in URLs (/{name}/L{layer}/N{neuron}/) and citations. Never change it for a published atlas.
    name: str = "smollm2-135m"
    # A TransformerLens-supported hub model name, a local Hugging Face model folder, or the embedded default.
    model: str = EMBEDDED_MODEL
    # Hub revision (branch, tag or commit) recorded in provenance; ignored for local folders.
    model_revision: str = "main"
    # "auto" picks cuda when available, else cpu.
    device: str = "auto"
    # Compute dtype for the forward passes; float32 keeps the embedding identity exact to 1e-4.
    dtype: str = "float32"
    # Layers to atlas; empty means every layer.
    layers: tuple[int, ...] = ()
    # Atlas the MLP neurons of those layers (false: only the SAEs below).
    atlas_neurons: bool = True
    # SAEs whose latents are atlased beside the neurons, one [[sae]] table each (see SaeSpec).
    sae: tuple[SaeSpec, ...] = ()
    # SAEs to train before atlasing, one [[train_sae]] table each (see TrainSaeSpec); each is then atlased as if it
    # were an [[sae]] folder (the train_sae stage writes it under out_dir/train_sae/{slug}).
    train_sae: tuple[TrainSaeSpec, ...] = ()
    # The corpus SAEs are trained on (.txt or .jsonl, as data_files; relative to the config file's folder), packed
    # as the atlas corpus is (context_length, prepend_bos, text_field). Never the atlas corpus itself: the atlas
    # shows what the SAEs do on text they were not trained on.
    train_data_files: tuple[str, ...] = ()
    # Sequences of the training corpus held out for evaluation: the ones right after the training tokens, never
    # trained on.
    train_heldout_sequences: int = 256
    # Hub dataset name streamed with `datasets` (the user path); ignored when data_files is set.
    dataset: str = ""
    # Hub dataset config name, if the dataset has several.
    dataset_config: str = ""
    dataset_split: str = "train"
    # Local .txt (one document per line) or .jsonl files: the offline path. Relative paths are read from the
    # config file's folder.
    data_files: tuple[str, ...] = ()
    # Field holding the document text in jsonl/hub records.
    text_field: str = "text"
    # Stop reading the corpus after this many documents.
    max_documents: int = 10_000
    # Stop after this many packed sequences (0 = no limit).
    max_sequences: int = 0
    # Tokens per sequence, BOS included. Documents are joined with the model's EOS token and packed.
    context_length: int = 64
    # Put the model's BOS token at position 0 of every sequence (recorded in the collect artefact).
    prepend_bos: bool = True
    # Sequences per forward pass.
    batch_size: int = 16
    # Keep examples whose max token reaches threshold × the neuron's max activation.
    threshold: float = 0.75
    # Keep the first max_examples qualifying sequences in corpus order (not the top ones: diversity matters).
    max_examples: int = 100
    # Examples below the threshold: [0, threshold × the neuron's max) is cut into this many equal intervals...
    interval_count: int = 5
    # ...and each keeps the first this-many sequences (corpus order) whose max falls in it; 0 = none.
    interval_examples: int = 2
    # Optional reference maxima measured on a larger dataset: an .npz file with one array per subject set key
    # (`L3` -> [d_mlp]), or an .npy file of shape [n_layers, d_mlp] for MLP layers. Keyed by content, not path.
    reference_maxima: str = ""
    # Tokens shown (and scored for importance) before the max token, and after it.
    window_before: int = 20
    window_after: int = 4
    # Per-sequence stages (collect, importance) work in shards of this many consecutive sequences: each shard is one
    # artefact, the unit of resume after a kill and of parallel work. A multiple of 16, importance's batch of
    # sequences, so every split batches the same sequences together and gives the same numbers.
    shard_sequences: int = 64
    # Collect passes over the corpus once per group of subject sets (consecutive by layer, about equal in number), so
    # each worker holds only its group's state: for a model whose every layer's candidates do not fit one device
    # (a 7B model's 32 layers), at the price of forwarding the early layers again for each later group. 1 = every
    # set in one pass. The artefacts are the same for any grouping.
    collect_groups: int = 1
    # How a unit's examples are clustered: "average" (average-linkage HAC, the paper) or "components" (the original
    # feature-clusters app: connected components of the graph joining examples whose cosine similarity is at least
    # 1 − cluster_threshold, a pair exactly there joining), which is exactly single-linkage HAC cut at
    # cluster_threshold, so every page keeps its dendrogram and re-cut.
    cluster_method: str = "average"
    # Cut the dendrogram at this cosine distance.
    cluster_threshold: float = 0.5
    # Worker processes for per-neuron stages (0 = all cores). With the Ray engine: the actors for collect and
    # importance (0 = one per GPU of the cluster, else one per CPU) and the tasks at once for cluster and render.
    workers: int = 0
    # What runs the shards and unit-range tasks: "local" (this process and a process pool) or "ray" (actors and tasks
    # on a Ray cluster, the optional extra `neuron-atlas[ray]`; docs/scaling.md). Same artefacts, same site.
    engine: str = "local"
    # The Ray cluster to join (`ray://host:10001`, or "auto" for the one `ray start` runs here); empty = start a
    # local one with this machine's cores. Every node must see out_dir (and the data) at the same path.
    ray_address: str = ""
    # Token importance removes each context token in one of two ways: "mask" replaces it by the mask token (the
    # paper), "delete" drops it so later tokens move one position left (the dictionary-learning post's ablation).
    importance_mode: str = "mask"
    # Token substituted when masking for importance; empty = the model's pad token, else its EOS token. Deleting
    # still masks the max token itself (its own score and the normaliser: a deleted max token cannot be read).
    mask_token: str = ""
    # Memory (MiB) one importance forward may use, which sets how many masked rows it batches; 0 = derived from the
    # device (half a GPU's memory, an eighth of the host's on a CPU, at most 4 GiB). Only float rounding depends on it.
    importance_memory_mb: int = 0
    # SAEs are evaluated (the evaluate stage: reconstruction and the cross-entropy cost of splicing it in) on the first
    # this-many sequences of the atlas corpus; 0 = all. Two full forward passes per SAE and sequence.
    evaluate_sequences: int = 0
    # Similar features: neighbours kept per feature and the minimum cosine similarity.
    neighbour_count: int = 20
    neighbour_threshold: float = 0.5
    # "pre_mlp" (the original method) or "embedding" (the neuron embedding of the central example).
    neighbour_space: str = "pre_mlp"
    # Seed for every randomised step (PyNNDescent, random-neuron order).
    seed: int = 0
    # Where artefacts and the site are written. Relative paths are relative to the working directory.
    out_dir: str = "build/embedded"
    site_dir: str = "site"
    # Where `atlas repro` writes the MNIST reproduction (tables.json, atlas.npz); render publishes site/mnist/
    # whenever they exist.
    mnist_dir: str = "build/mnist"
    # Absolute URL the site is published at, used in citations (empty: citations use the relative path).
    site_url: str = ""
    # Where `atlas release` keeps every release it froze (manifest, CITATION.cff, bulk Parquet files and the archive
    # {id}.tar.gz), outside the site so a rebuild never touches them. Relative to the working directory.
    release_dir: str = "releases"
    # Where a release's archive and bulk files are published, e.g. GitHub release assets
    # (https://github.com/OWNER/REPO/releases/download/{release}); "{release}" becomes the release id. Empty: pages'
    # reproduce scripts read the bulk data from the extracted archive in the working directory.
    release_url: str = ""
    # Author or organisation named in every page's citation (empty: "Neuron Atlas").
    author: str = ""
    # Date printed in provenance and citations; empty = the date collection first ran (then recorded).
    build_date: str = ""

    def __post_init__(self) -> None:
        _check(0 < self.threshold <= 1, "threshold must be in (0, 1]", self.threshold)
        _check(self.max_examples >= 1, "max_examples must be at least 1", self.max_examples)
        _check(self.interval_count >= 1, "interval_count must be at least 1", self.interval_count)
        _check(self.interval_examples >= 0, "interval_examples must be 0 (none) or more", self.interval_examples)
        _check(self.context_length >= 2, "context_length must be at least 2", self.context_length)
        _check(self.batch_size >= 1, "batch_size must be at least 1", self.batch_size)
        _check(self.max_documents >= 1, "max_documents must be at least 1", self.max_documents)
        _check(self.max_sequences >= 0, "max_sequences must be 0 (no limit) or more", self.max_sequences)
        _check(self.window_before >= 0, "window_before must be 0 or more", self.window_before)
        _check(self.window_after >= 0, "window_after must be 0 or more", self.window_after)
        _check(self.shard_sequences >= SHARD_MULTIPLE and self.shard_sequences % SHARD_MULTIPLE == 0,
               f"shard_sequences must be a positive multiple of {SHARD_MULTIPLE}", self.shard_sequences)
        _check(self.collect_groups >= 1, "collect_groups must be 1 or more", self.collect_groups)
        _check(0 < self.cluster_threshold <= 2, "cluster_threshold must be in (0, 2]", self.cluster_threshold)
        _check(self.cluster_method in ("average", "components"), "cluster_method must be average or components",
               self.cluster_method)
        _check(self.workers >= 0, "workers must be 0 (all cores) or more", self.workers)
        _check(self.engine in ("local", "ray"), "engine must be local or ray", self.engine)
        _check(self.evaluate_sequences >= 0, "evaluate_sequences must be 0 (all) or more", self.evaluate_sequences)
        _check(self.neighbour_count >= 1, "neighbour_count must be at least 1", self.neighbour_count)
        _check(-1 <= self.neighbour_threshold <= 1, "neighbour_threshold must be in [-1, 1]", self.neighbour_threshold)
        _check(self.importance_mode in ("mask", "delete"), "importance_mode must be mask or delete",
               self.importance_mode)
        _check(self.importance_memory_mb >= 0, "importance_memory_mb must be 0 (derived from the device) or more",
               self.importance_memory_mb)
        _check(self.neighbour_space in ("pre_mlp", "embedding"), "neighbour_space must be pre_mlp or embedding",
               self.neighbour_space)
        _check(self.dtype in ("float32", "float16", "bfloat16"), "dtype must be float32, float16 or bfloat16",
               self.dtype)
        _check(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
               "name must be a non-empty URL slug (letters, digits, - _ .)", self.name)
        _check(all(isinstance(layer, int) and layer >= 0 for layer in self.layers),
               "layers must be non-negative integers", self.layers)
        _check(bool(self.dataset) or bool(self.data_files), "set dataset (hub name) or data_files (local files)",
               self.dataset)
        _check(all(isinstance(s, SaeSpec) for s in self.sae), "sae must be [[sae]] tables", self.sae)
        _check(all(isinstance(s, TrainSaeSpec) for s in self.train_sae), "train_sae must be [[train_sae]] tables",
               self.train_sae)
        slugs = [s.slug for s in self.sae] + [s.slug for s in self.train_sae]
        _check(len(set(slugs)) == len(slugs), "each [[sae]] and [[train_sae]] needs its own slug", slugs)
        _check(self.atlas_neurons or bool(slugs), "atlas_neurons = false needs at least one [[sae]] or "
               "[[train_sae]]", self.atlas_neurons)
        _check(not self.train_sae or bool(self.train_data_files), "[[train_sae]] needs train_data_files (its own "
               "training corpus)", self.train_data_files)
        _check(self.train_heldout_sequences >= 1, "train_heldout_sequences must be at least 1",
               self.train_heldout_sequences)

    @property
    def atlased_saes(self) -> tuple[SaeSpec, ...]:
        """Every SAE the atlas shows: the [[sae]] folders, then the trained ones (their folders, once trained)."""
        return self.sae + tuple(SaeSpec(path=str(trained_sae_folder(self, spec.slug)), slug=spec.slug)
                                for spec in self.train_sae)

    def config_hash(self) -> str:
        """Hash of everything that changes the atlas's content (paths and dates excluded), shown in provenance.
        Which stages a change re-runs is decided by each stage's own key (builder/stage.py), not by this."""
        content = {k: v for k, v in asdict(self).items() if k not in _NOT_CONTENT}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


_NOT_CONTENT = {"out_dir", "site_dir", "mnist_dir", "site_url", "author", "build_date", "device", "workers",
                "shard_sequences", "collect_groups", "batch_size", "engine", "ray_address", "importance_memory_mb",
                "release_dir", "release_url"}


def trained_sae_folder(cfg: AtlasConfig, slug: str) -> Path:
    """Where the train_sae stage writes the SAE a [[train_sae]] table names (a SAELens folder)."""
    return Path(cfg.out_dir) / "train_sae" / slug


def _check_slug(slug: str, table: str) -> None:
    """An SAE set's slug names its URL folder: a URL slug, not an MLP layer's (L<n>) nor a reserved folder."""
    _check(bool(slug) and all(c.isalnum() or c in "-_." for c in slug) and slug not in RESERVED_SLUGS
           and not (slug[0] == "L" and slug[1:].isdigit()),
           f"{table} slug must be a URL slug (letters, digits, - _ .), not L<number> or " + "/".join(RESERVED_SLUGS),
           slug)


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{message}, got {value!r}")


def config_from_dict(raw: dict, base_dir: Path | None = None) -> AtlasConfig:
    """Build a config from parsed TOML, rejecting unknown keys with the nearest valid one."""
    known = {f.name: f for f in fields(AtlasConfig)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if isinstance(value, list):
            value = tuple(value)
        values[key] = value
    if base_dir is not None and "data_files" in values:
        values["data_files"] = tuple(str((base_dir / p).resolve()) if not Path(p).is_absolute() else p
                                     for p in values["data_files"])
    if base_dir is not None and values.get("reference_maxima") and not Path(values["reference_maxima"]).is_absolute():
        values["reference_maxima"] = str((base_dir / values["reference_maxima"]).resolve())
    if base_dir is not None and "train_data_files" in values:
        values["train_data_files"] = tuple(str((base_dir / p).resolve()) if not Path(p).is_absolute() else p
                                           for p in values["train_data_files"])
    if "sae" in values:
        values["sae"] = tuple(_sae_spec(table, base_dir) for table in values["sae"])
    if "train_sae" in values:
        values["train_sae"] = tuple(_train_sae_spec(table) for table in values["train_sae"])
    for key, value in values.items():
        expected = type(known[key].default)
        if not isinstance(value, expected) and not (expected is float and isinstance(value, int)):
            raise ConfigError(f"config key {key!r} must be {expected.__name__}, got {value!r}")
    try:
        return AtlasConfig(**values)
    except ValueError as error:
        raise ConfigError(f"invalid config: {error}") from None


def _sae_spec(table: object, base_dir: Path | None) -> SaeSpec:
    if not isinstance(table, dict):
        raise ConfigError(f"sae entries must be [[sae]] tables with {' and '.join(SAE_KEYS)}, got {table!r}")
    unknown = [key for key in table if key not in SAE_KEYS]
    if unknown:
        near = difflib.get_close_matches(unknown[0], SAE_KEYS, n=1)
        raise ConfigError(f"unknown [[sae]] key {unknown[0]!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                                     f"; an [[sae]] has {', '.join(SAE_KEYS)}"))
    missing = [key for key in SAE_KEYS if not isinstance(table.get(key), str) or not table.get(key)]
    if missing:
        raise ConfigError(f"an [[sae]] table needs {missing[0]!r} (a string), got {table!r}")
    path = table["path"]
    if base_dir is not None and not path.startswith("hf://") and not Path(path).expanduser().is_absolute():
        path = str((base_dir / path).resolve())
    try:
        return SaeSpec(path=path, slug=table["slug"])
    except ValueError as error:
        raise ConfigError(f"invalid config: {error}") from None


def _train_sae_spec(table: object) -> TrainSaeSpec:
    if not isinstance(table, dict):
        raise ConfigError(f"train_sae entries must be [[train_sae]] tables, got {table!r}")
    for key, value in table.items():
        if key not in TRAIN_SAE_KEYS:
            near = difflib.get_close_matches(key, TRAIN_SAE_KEYS, n=1)
            raise ConfigError(f"unknown [[train_sae]] key {key!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                                        f"; one of {', '.join(TRAIN_SAE_KEYS)}"))
        expected = TRAIN_SAE_TYPES[key]
        allowed = (int, float) if expected is float else (expected,)  # TOML's 1 is a fine λ
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ConfigError(f"[[train_sae]] key {key!r} must be {expected.__name__}, got {value!r}")
    missing = [key for key in ("slug", "hook") if key not in table]
    if missing:
        raise ConfigError(f"a [[train_sae]] table needs {missing[0]!r} (a string), got {table!r}")
    try:
        return TrainSaeSpec(**table)
    except ValueError as error:
        raise ConfigError(f"invalid config: {error}") from None


def load_config(path: str | Path) -> AtlasConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass --config configs/embedded.toml or another TOML")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML ({error}); fix the syntax") from None
    return config_from_dict(raw, base_dir=path.parent)
