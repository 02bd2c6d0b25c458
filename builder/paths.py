"""Where each stage reads and writes: one folder per stage under out_dir, the site elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.config import AtlasConfig


@dataclass(frozen=True)
class AtlasPaths:
    root: Path
    site: Path

    @classmethod
    def of(cls, cfg: AtlasConfig) -> "AtlasPaths":
        return cls(root=Path(cfg.out_dir), site=Path(cfg.site_dir))

    def stage(self, name: str) -> Path:
        return self.root / name

    # collect/
    @property
    def tokens(self) -> Path:
        return self.root / "collect" / "tokens.npz"

    @property
    def collect_meta(self) -> Path:
        return self.root / "collect" / "meta.json"

    @property
    def collect_checkpoint(self) -> Path:
        return self.root / "collect" / "checkpoint.npz"

    def layer_examples(self, layer: int) -> Path:
        return self.root / "collect" / f"L{layer}.npz"

    # embed/
    def layer_weights(self, layer: int) -> Path:
        return self.root / "embed" / f"L{layer}.npz"

    @property
    def embed_meta(self) -> Path:
        return self.root / "embed" / "meta.json"

    # cluster/
    def layer_clusters(self, layer: int) -> Path:
        return self.root / "cluster" / f"L{layer}.npz"

    @property
    def metrics_table(self) -> Path:
        return self.root / "cluster" / "metrics.npz"

    @property
    def cluster_meta(self) -> Path:
        return self.root / "cluster" / "meta.json"

    @property
    def report(self) -> Path:
        return self.root / "report" / "comparison.json"

    # importance/
    def layer_importance(self, layer: int) -> Path:
        return self.root / "importance" / f"L{layer}.npz"

    @property
    def importance_checkpoint(self) -> Path:
        return self.root / "importance" / "checkpoint.npz"

    @property
    def importance_meta(self) -> Path:
        return self.root / "importance" / "meta.json"

    # neighbours/
    @property
    def neighbours(self) -> Path:
        return self.root / "neighbours" / "neighbours.npz"

    @property
    def neighbours_meta(self) -> Path:
        return self.root / "neighbours" / "meta.json"
