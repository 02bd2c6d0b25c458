"""The neuron-embedding (NE) loss (the paper's equations 4–6) and its per-latent running-average buffer.

For an SAE with encoder columns w_j = W_enc[:, j] on inputs h_b (the SAE's input), over the latents active on each
input (activation > 0):

    L_N = (1 / B) · Σ_b Σ_{j active on b} (1 − cos(h_avg,j ⊙ w_j, h_b ⊙ w_j))

divided by the batch size B (the paper writes the plain sum; dividing makes λ2 independent of the batch size, as the
MSE and L1 terms are batch means). h_avg,j is a buffer, not a parameter (no gradient).

Decisions the paper leaves open, made here:
- **One buffer update per step.** A batch in which several inputs activate latent j updates h_avg,j once, from the
  mean of those inputs: h_avg,j ← m · h_avg,j + (1 − m) · mean_{b: j active on b} h_b. The first batch in which j is
  active sets h_avg,j to that mean. Per step, not per input, so the buffer's memory (≈ 1/(1 − m) steps) is the same
  for a dense and a sparse latent and for any batch size; with m = 0.9 it averages about the last 10 batches j fired in.
- **Loss before update.** A step's L_N reads the buffer as the earlier steps left it; the buffer is updated after the
  optimiser step, under no_grad. Pairs (b, j) whose latent has never been active before this step have no buffer yet
  and add nothing to L_N.
- **The buffer runs from the first step.** It is updated during the warm-up too, so it is warm when the term is on.
- **Cosine** is a·b / (max(‖a‖, ε) · max(‖b‖, ε)) with ε = 1e-8, as `torch.nn.functional.cosine_similarity`.

L_N is computed on the active pairs only. With a = h_avg,j, x = h_b, w = w_j, u = a ⊙ w, v = x ⊙ w:
cos = Σ a_i x_i w_i² / (|u| |v|), where |u|² = Σ a_i² w_i² depends on the latent alone, and per pair only
x · (a ⊙ w²) and x² · w² are needed. The gradient with respect to w_j sums over j's pairs:
    ∂/∂w_i Σ_b (1 − cos_b) = −w_i (2 a_i Σ_b x_bi / (|u| |v_b|) − (a_i² / |u|²) Σ_b cos_b − Σ_b x_bi² cos_b / |v_b|²),
so it needs two pair-weighted sums of the inputs per latent. A custom autograd function computes both directions in
chunks of pairs (gather, then index_add), so memory stays at one chunk × d_in. Early in training, before the L1
term has made the code sparse, half of all (b, j) can be active; when more than DENSE_SHARE of them are, the same
per-pair sums are read off dense matrix products instead, which are then cheaper (the result is the same: a test
runs both paths against the literal loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

NORM_EPS = 1e-8
PAIR_CHUNK = 4096  # active pairs handled at once: a chunk costs PAIR_CHUNK × d_in floats per temporary
# Above this share of active (b, j) pairs, per-pair sums come from dense products (cheaper than gathers then).
DENSE_SHARE = 0.125


@dataclass(frozen=True)
class ActivePairs:
    """The (input, latent) pairs with a non-zero activation, in row-major order (by input, then latent)."""

    batch: Int[Tensor, " pairs"]
    latent: Int[Tensor, " pairs"]

    @classmethod
    def of(cls, activations: Float[Tensor, "batch d_sae"]) -> "ActivePairs":
        batch, latent = torch.nonzero(activations > 0, as_tuple=True)
        return cls(batch, latent)

    def __len__(self) -> int:
        return int(self.batch.numel())

    def where(self, keep: Bool[Tensor, " pairs"]) -> "ActivePairs":
        return ActivePairs(self.batch[keep], self.latent[keep])


def _per_pair(x: Tensor, a_w2: Tensor, w2: Tensor, batch: Tensor, latent: Tensor) -> tuple[Tensor, Tensor]:
    """Per pair: x · (a ⊙ w²) and x² · w², in chunks of pairs, or through dense products for dense pairs."""
    if len(batch) >= DENSE_SHARE * x.shape[0] * w2.shape[0]:
        return (x @ a_w2.t())[batch, latent], (x.square() @ w2.t())[batch, latent]
    dot, vv = [], []
    for s in range(0, len(batch), PAIR_CHUNK):
        xb, j = x[batch[s:s + PAIR_CHUNK]], latent[s:s + PAIR_CHUNK]
        dot.append((xb * a_w2[j]).sum(1))
        vv.append((xb.square_() * w2[j]).sum(1))
    return (torch.cat(dot), torch.cat(vv)) if dot else (x.new_zeros(0), x.new_zeros(0))


def _latent_sums(x: Tensor, weights: tuple[Tensor, ...], powers: tuple[int, ...], batch: Tensor, latent: Tensor,
                 d_sae: int) -> list[Float[Tensor, "d_sae d_in"]]:
    """Per latent j, for each (weight, power): Σ over its pairs (b, j) of weight · x_b ** power (power 1 or 2)."""
    if len(batch) >= DENSE_SHARE * x.shape[0] * d_sae:
        results = []
        for weight, power in zip(weights, powers):
            dense = x.new_zeros(x.shape[0], d_sae)
            dense[batch, latent] = weight
            results.append(dense.t() @ (x if power == 1 else x.square()))
        return results
    sums = [x.new_zeros(d_sae, x.shape[1]) for _ in weights]
    for s in range(0, len(batch), PAIR_CHUNK):
        xb, j = x[batch[s:s + PAIR_CHUNK]], latent[s:s + PAIR_CHUNK]
        for total, weight, power in zip(sums, weights, powers):
            total.index_add_(0, j, weight[s:s + PAIR_CHUNK, None] * (xb if power == 1 else xb.square()))
    return sums


class _NeuronEmbeddingLoss(torch.autograd.Function):
    """Σ over pairs of 1 − cos(h_avg,j ⊙ w_j, h_b ⊙ w_j); differentiable in W_enc only."""

    @staticmethod
    def forward(ctx, w_enc: Tensor, h: Tensor, h_avg: Tensor, batch: Tensor, latent: Tensor) -> Tensor:
        w2 = w_enc.detach().t().square()  # [d_sae, d_in]
        dot, vv = _per_pair(h, h_avg * w2, w2, batch, latent)
        norm_u = (h_avg.square() * w2).sum(1).sqrt().clamp_min(NORM_EPS)  # per latent
        norm_v = vv.sqrt().clamp_min(NORM_EPS)
        cos = dot / (norm_u[latent] * norm_v)
        ctx.save_for_backward(w_enc, h, h_avg, batch, latent, cos, norm_u, norm_v)
        return (1.0 - cos).sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        w_enc, h, h_avg, batch, latent, cos, norm_u, norm_v = ctx.saved_tensors
        d_sae = h_avg.shape[0]
        s1, s3 = _latent_sums(h, (1.0 / (norm_u[latent] * norm_v), cos / norm_v.square()), (1, 2), batch, latent,
                              d_sae)
        cos_sum = torch.zeros(d_sae, dtype=cos.dtype, device=cos.device).index_add_(0, latent, cos)
        w_t = w_enc.detach().t()
        grad_t = -w_t * (2.0 * h_avg * s1 - h_avg.square() * (cos_sum / norm_u.square())[:, None] - s3)
        return grad_output * grad_t.t(), None, None, None, None


def neuron_embedding_loss(w_enc: Float[Tensor, "d_in d_sae"], h: Float[Tensor, "batch d_in"],
                          h_avg: Float[Tensor, "d_sae d_in"], initialised: Bool[Tensor, " d_sae"],
                          pairs: ActivePairs) -> Float[Tensor, ""]:
    """L_N of one batch (divided by its size), on the pairs whose latent already has a buffer."""
    ready = pairs.where(initialised[pairs.latent])
    total = _NeuronEmbeddingLoss.apply(w_enc, h.detach(), h_avg.detach(), ready.batch, ready.latent)
    return total / h.shape[0]


@torch.no_grad()
def update_buffer(h_avg: Float[Tensor, "d_sae d_in"], initialised: Bool[Tensor, " d_sae"],
                  h: Float[Tensor, "batch d_in"], pairs: ActivePairs, momentum: float) -> None:
    """One step's buffer update, in place: each latent active in the batch moves towards the mean of its inputs
    (or is set to it, the first time it is active)."""
    d_sae = h_avg.shape[0]
    counts = torch.bincount(pairs.latent, minlength=d_sae)
    h = h.to(h_avg.dtype)
    sums, = _latent_sums(h, (h.new_ones(len(pairs)),), (1,), pairs.batch, pairs.latent, d_sae)
    active = counts > 0
    means = sums[active] / counts[active, None].to(h_avg.dtype)
    old = h_avg[active]
    fresh = ~initialised[active]
    h_avg[active] = torch.where(fresh[:, None], means, momentum * old + (1.0 - momentum) * means)
    initialised |= active
