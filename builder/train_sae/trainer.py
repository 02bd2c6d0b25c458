"""Training one standard (ReLU) SAE on a stream of input batches, with the neuron-embedding loss (builder/train_sae/
loss.py) switched on after a warm-up. Pure torch: the LM stage (builder/train_sae/__init__.py) and the MNIST
reproduction (builder/mnist) feed it batches.

The SAE: f = ReLU(x @ W_enc + b_enc), x̂ = f @ W_dec + b_dec, with the input used as it is (no normalisation, no b_dec
subtracted), so h_b = x is what the NE loss compares and the saved folder's neuron embeddings x ⊙ W_enc[:, j] are the
ones it trained.
Initialisation: W_dec rows random unit vectors, W_enc = W_decᵀ, biases 0 (seeded, so a seed fixes the SAE).
Loss per step: MSE(x, x̂) (mean over inputs and dimensions) + λ1 · (mean over inputs of Σ_j f_j) + λ2 · L_N, L_N only
from step `warmup_steps` on (steps count from 0). Adam (β = 0.9, 0.999, ε = 1e-8), written out so its state is plain
arrays; after each step the decoder rows are renormalised to unit norm, so the L1 term cannot be dodged by shrinking f
and growing W_dec. The whole state (weights, Adam moments, NE buffer, which latents ever fired, the log) is arrays:
a checkpoint is an .npz, and a run resumed from one continues exactly as if never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from builder.train_sae.loss import ActivePairs, neuron_embedding_loss, update_buffer

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Per step: the loss terms (unweighted), L0 and the total. A standard SAE (λ2 = 0) has no L_N term: its `ne` is NaN and
# it keeps no buffer (L_N costs as much as the rest of a step while the code is still dense).
LOG_TERMS = ("mse", "l1", "ne", "l0", "loss")


@dataclass(frozen=True)
class TrainSettings:
    d_in: int
    d_sae: int
    l1: float  # λ1
    ne: float  # λ2 (0: a standard SAE)
    momentum: float  # m of the NE buffer
    warmup_steps: int  # steps before the NE term is switched on
    learning_rate: float
    seed: int


class SaeTrainer:
    def __init__(self, settings: TrainSettings, device: str | torch.device = "cpu"):
        self.settings = settings
        self.device = torch.device(device)
        generator = torch.Generator().manual_seed(settings.seed)
        w_dec = torch.randn(settings.d_sae, settings.d_in, generator=generator, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.params = {"W_enc": w_dec.t().clone(), "b_enc": torch.zeros(settings.d_sae), "W_dec": w_dec,
                       "b_dec": torch.zeros(settings.d_in)}
        self.params = {k: v.to(self.device).requires_grad_(True) for k, v in self.params.items()}
        self.moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in self.params.items()}
        self.h_avg = torch.zeros(settings.d_sae, settings.d_in, device=self.device)
        self.initialised = torch.zeros(settings.d_sae, dtype=torch.bool, device=self.device)
        self.fired = torch.zeros(settings.d_sae, dtype=torch.bool, device=self.device)
        self.steps = 0
        self.log: dict[str, list[float]] = {term: [] for term in LOG_TERMS}

    def encode(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        return torch.relu(x @ self.params["W_enc"] + self.params["b_enc"])

    def decode(self, f: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_in"]:
        return f @ self.params["W_dec"] + self.params["b_dec"]

    def loss_terms(self, x: Float[Tensor, "batch d_in"]) -> tuple[dict[str, Tensor], Tensor, ActivePairs]:
        """The step's terms (differentiable), its latent activations and their active pairs."""
        f = self.encode(x)
        pairs = ActivePairs.of(f.detach())
        terms = {"mse": (self.decode(f) - x).square().mean(), "l1": f.sum(dim=1).mean()}
        if self.settings.ne > 0:
            terms["ne"] = neuron_embedding_loss(self.params["W_enc"], x, self.h_avg, self.initialised, pairs)
        return terms, f, pairs

    def total(self, terms: dict[str, Tensor], step: int) -> Tensor:
        s = self.settings
        loss = terms["mse"] + s.l1 * terms["l1"]
        if s.ne > 0 and step >= s.warmup_steps:
            loss = loss + s.ne * terms["ne"]
        return loss

    def step(self, x: Float[Tensor, "batch d_in"]) -> dict[str, float]:
        x = x.to(self.device, torch.float32)
        terms, f, pairs = self.loss_terms(x)
        loss = self.total(terms, self.steps)
        grads = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
        self._adam(grads)
        if self.settings.ne > 0:
            update_buffer(self.h_avg, self.initialised, x, pairs, self.settings.momentum)
        self.fired |= (f.detach() > 0).any(dim=0)
        row = {"ne": float("nan"), **{name: float(value.detach()) for name, value in terms.items()}}
        row.update(l0=len(pairs) / x.shape[0], loss=float(loss.detach()))
        for term in LOG_TERMS:
            self.log[term].append(row[term])
        self.steps += 1
        return row

    @torch.no_grad()
    def _adam(self, grads) -> None:
        beta1, beta2 = ADAM_BETAS
        t = self.steps + 1
        for (name, param), grad in zip(self.params.items(), grads):
            if grad is None:
                grad = torch.zeros_like(param)
            m, v = self.moments[name]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + ADAM_EPS)
            param.sub_(self.settings.learning_rate * step)
        w_dec = self.params["W_dec"]
        w_dec.div_(w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # -- state as arrays -----------------------------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: p.detach().cpu().numpy() for name, p in self.params.items()}
        for name, (m, v) in self.moments.items():
            arrays[f"adam_m.{name}"], arrays[f"adam_v.{name}"] = m.cpu().numpy(), v.cpu().numpy()
        arrays.update(h_avg=self.h_avg.cpu().numpy(), initialised=self.initialised.cpu().numpy(),
                      fired=self.fired.cpu().numpy(), steps=np.int64(self.steps))
        arrays.update({f"log.{term}": np.asarray(values, np.float64) for term, values in self.log.items()})
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(torch.as_tensor(arrays[name]))
                m, v = self.moments[name]
                m.copy_(torch.as_tensor(arrays[f"adam_m.{name}"]))
                v.copy_(torch.as_tensor(arrays[f"adam_v.{name}"]))
            self.h_avg.copy_(torch.as_tensor(arrays["h_avg"]))
            self.initialised.copy_(torch.as_tensor(arrays["initialised"]))
            self.fired.copy_(torch.as_tensor(arrays["fired"]))
        self.steps = int(arrays["steps"])
        self.log = {term: [float(v) for v in arrays[f"log.{term}"]] for term in LOG_TERMS}

    def weights(self) -> dict[str, np.ndarray]:
        """The SAE's tensors as SAELens names them."""
        return {name: self.params[name].detach().cpu().numpy().astype(np.float32) for name in PARAMETERS}

    def dead_share(self) -> float:
        """The share of latents never active on any training batch so far (the paper's dead latents)."""
        return float((~self.fired).float().mean())


def saelens_config(settings: TrainSettings, hook_name: str, model_name: str, training_tokens: int) -> dict:
    """cfg.json in the SAELens 6 layout for a trained standard SAE (builder/sae.py reads it back)."""
    return {"architecture": "standard", "d_in": settings.d_in, "d_sae": settings.d_sae, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
            "metadata": {"hook_name": hook_name, "model_name": model_name, "trained_by": "neuron-atlas train_sae",
                         "l1_coefficient": settings.l1, "ne_coefficient": settings.ne,
                         "ne_momentum": settings.momentum, "ne_warmup_steps": settings.warmup_steps,
                         "learning_rate": settings.learning_rate, "seed": settings.seed,
                         "training_tokens": training_tokens}}
