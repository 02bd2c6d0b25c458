"""Where each stage reads and writes: one folder per stage under out_dir, one file per subject set, the site elsewhere.

Layout (`{key}` is a subject set's key, e.g. `L3`):

    train_sae/tokens.npz, train_sae/{slug}/ (SAELens folder), train_sae/{slug}.{log.npz,evaluation.json}
    collect/tokens.npz, collect/{key}.npz, collect/shards/{first}-{end}.npz (shards-{g}of{G}/ with collect_groups),
    collect/meta.json
    embed/{key}.npz, embed/meta.json
    cluster/{key}.npz, cluster/metrics.npz, cluster/meta.json
    importance/{key}.npz, importance/shards/{first}-{end}.npz (while running), importance/meta.json
    neighbours/neighbours.npz, neighbours/meta.json
    report/comparison.json, report/meta.json
    render/meta.json (the site itself goes to site_dir)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.config import AtlasConfig

# Zero-padded sequence numbers keep shard files in corpus order when listed.
SHARD_DIGITS = 9


@dataclass(frozen=True)
class AtlasPaths:
    root: Path
    site: Path

    @classmethod
    def of(cls, cfg: AtlasConfig) -> "AtlasPaths":
        return cls(root=Path(cfg.out_dir), site=Path(cfg.site_dir))

    def stage(self, name: str) -> Path:
        return self.root / name

    def meta(self, stage: str) -> Path:
        return self.root / stage / "meta.json"

    def set_file(self, stage: str, set_key: str) -> Path:
        """The one artefact a stage writes per subject set."""
        return self.root / stage / f"{set_key}.npz"

    def dictionary(self, set_key: str) -> Path:
        """An SAE set's dictionary tools (neuron alignment, MCS to other SAEs on its hook), written by embed."""
        return self.root / "embed" / f"{set_key}.dictionary.npz"

    def evaluation(self, set_key: str) -> Path:
        """An SAE set's evaluation on the atlas corpus (builder/evaluate.py)."""
        return self.root / "evaluate" / f"{set_key}.json"

    def trained(self, slug: str, what: str) -> Path:
        """A [[train_sae]] SAE's training artefacts: `log.npz`, `evaluation.json`, `checkpoint.npz` (the SAE itself
        is the folder train_sae/{slug}/, config.trained_sae_folder)."""
        return self.root / "train_sae" / f"{slug}.{what}"

    def shard(self, stage: str, first: int, end: int, group: str = "") -> Path:
        """A per-sequence stage's artefact for the sequences first … end − 1 (of one group of subject sets, if the
        stage splits them: its own folder)."""
        folder = f"shards-{group}" if group else "shards"
        return self.root / stage / folder / f"{first:0{SHARD_DIGITS}d}-{end:0{SHARD_DIGITS}d}.npz"

    @property
    def tokens(self) -> Path:
        return self.root / "collect" / "tokens.npz"

    @property
    def metrics_table(self) -> Path:
        return self.root / "cluster" / "metrics.npz"

    @property
    def neighbours(self) -> Path:
        return self.root / "neighbours" / "neighbours.npz"

    @property
    def report(self) -> Path:
        return self.root / "report" / "comparison.json"

    @property
    def fingerprints(self) -> Path:
        """Content hashes of input files, cached by size and modification time."""
        return self.root / "fingerprints.json"
