"""SAE evaluation on the atlas corpus, per SAE set: how well it reconstructs its hook and what that costs the model.

Over every token of every sequence (the first `evaluate_sequences` of the atlas corpus, or all of it; x the hook's
value, x̂ = decode(encode(x)) as the SAE reconstructs it):
- `mse`: mean over tokens and dimensions of (x̂ − x)²;
- `explained_variance`: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean of x over the corpus;
- `l0`: mean number of latents above 0 per token (and `l0_share`, as a share of d_sae);
- `l1`: the per-token sum of latent activations, averaged over tokens;
- `inactive_share`: the share of latents never above 0 on the corpus (from collect's maxima);
- `ce_clean`, `ce_spliced`, `ce_increase`: the model's mean next-token cross-entropy (nats, over every predicted
  position) as it is, with x̂ in place of x at the hook for the rest of the forward pass, and the difference.
Each SAE's result is its own file, so a killed run resumes at the next SAE.
"""

from __future__ import annotations

import logging

import torch

from builder.schema import EVALUATION, collect_sets, read_collect_meta, read_example_fields, read_tokens
from builder.stage import StageRun, progress

log = logging.getLogger(__name__)


class Totals:
    """Running sums over batches, so the result does not depend on how the corpus is batched (up to float64
    rounding)."""

    def __init__(self, d_in: int) -> None:
        self.tokens = 0
        self.predicted = 0
        self.squared_error = 0.0
        self.x_sum = torch.zeros(d_in, dtype=torch.float64)
        self.x_squared = 0.0
        self.active = 0.0
        self.activation_sum = 0.0
        self.ce_clean = 0.0
        self.ce_spliced = 0.0

    def result(self, d_sae: int, inactive_share: float) -> dict:
        n, predicted = max(1, self.tokens), max(1, self.predicted)
        # Σ‖x − x̄‖² = Σ‖x‖² − n‖x̄‖²
        total_variance = self.x_squared - float((self.x_sum ** 2).sum()) / n
        return {"tokens": self.tokens, "mse": self.squared_error / (n * len(self.x_sum)),
                "explained_variance": 1.0 - self.squared_error / total_variance if total_variance > 0 else None,
                "l0": self.active / n, "l1": self.activation_sum / n, "l0_share": self.active / n / d_sae,
                "inactive_share": inactive_share,
                "ce_clean": self.ce_clean / predicted, "ce_spliced": self.ce_spliced / predicted,
                "ce_increase": (self.ce_spliced - self.ce_clean) / predicted}


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                             tokens[:, 1:].reshape(-1), reduction="sum")


def evaluate_batch(bridge, maths, hook_name: str, tokens: torch.Tensor, totals: Totals) -> dict[str, torch.Tensor]:
    """Add one batch's clean and spliced forward passes to `totals`; returns the hook's value `x`, its latents `f`
    and reconstruction `x_hat`."""
    captured = {}

    def keep(value, hook):
        captured["x"] = value.detach()

    def splice(value, hook):
        x = value.detach()
        latents = maths.encode(x)
        reconstruction = maths.decode(latents, x)
        captured["x"], captured["x_hat"], captured["f"] = x, reconstruction, latents
        return reconstruction.to(value.dtype)

    with torch.no_grad():
        clean = bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, keep)])
        spliced = bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice)])
    x, x_hat = captured["x"].double(), captured["x_hat"].double()
    totals.tokens += int(tokens.numel())
    totals.predicted += int(tokens[:, 1:].numel())
    totals.squared_error += float(((x_hat - x) ** 2).sum())
    totals.x_sum += x.reshape(-1, x.shape[-1]).sum(dim=0).cpu()
    totals.x_squared += float((x ** 2).sum())
    totals.active += float((captured["f"] > 0).sum())
    totals.activation_sum += float(captured["f"].double().sum())
    totals.ce_clean += float(next_token_loss(clean, tokens))
    totals.ce_spliced += float(next_token_loss(spliced, tokens))
    return captured


def build(run: StageRun) -> dict:
    from builder.models import load_model
    from builder.sae import cached_sae

    cfg, paths = run.cfg, run.paths
    saes = [s for s in collect_sets(read_collect_meta(paths)) if s.kind == "sae"]
    if not saes:
        return {"saes": 0}
    tokens = read_tokens(paths)
    tokens = tokens[:cfg.evaluate_sequences] if cfg.evaluate_sequences else tokens
    model = load_model(cfg)
    done = 0
    with progress(total=len(saes) * len(tokens), desc="evaluate", unit="seq") as bar:
        for s in saes:
            path = paths.evaluation(s.key)
            if EVALUATION.is_readable(path):
                run.record(path, EVALUATION)
                bar.update(len(tokens))
                continue
            maths = cached_sae(s.folder).on(str(model.device))
            totals = Totals(s.d_input)
            for first in range(0, len(tokens), cfg.batch_size):
                batch = torch.as_tensor(tokens[first:first + cfg.batch_size], dtype=torch.long, device=model.device)
                evaluate_batch(model.bridge, maths, s.hook_name, batch, totals)
                bar.update(len(batch))
            maxima = read_example_fields(paths, s.key, ("max_activation",))["max_activation"]
            result = totals.result(s.size, float((maxima <= 0).mean()))
            run.write_json(EVALUATION, path, {"set": s.key, **result})
            log.info("evaluate: %s MSE %.4g, explained variance %s, L0 %.1f, CE +%.4f nats", s.key, result["mse"],
                     result["explained_variance"], result["l0"], result["ce_increase"])
            done += 1
    return {"saes": len(saes), "evaluated_last_run": done}
