"""The NE loss and its buffer against literal per-input loops (values and gradients), and the trainer's warm-up."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from builder.train_sae import loss as ne
from builder.train_sae.trainer import SaeTrainer, TrainSettings


def literal_loss(w_enc, h, h_avg, initialised, f):
    total = torch.zeros((), dtype=w_enc.dtype)
    for b in range(h.shape[0]):
        for j in range(w_enc.shape[1]):
            if f[b, j] > 0 and initialised[j]:
                total = total + 1 - F.cosine_similarity(h_avg[j] * w_enc[:, j], h[b] * w_enc[:, j], dim=0, eps=1e-8)
    return total / h.shape[0]


def literal_update(h_avg, initialised, h, f, m):
    h_avg, initialised = h_avg.clone(), initialised.clone()
    for j in range(h_avg.shape[0]):
        inputs = [h[b] for b in range(h.shape[0]) if f[b, j] > 0]
        if not inputs:
            continue
        mean = torch.stack(inputs).mean(0)
        h_avg[j] = mean if not initialised[j] else m * h_avg[j] + (1 - m) * mean
        initialised[j] = True
    return h_avg, initialised


def random_case(seed, batch=7, d_in=5, d_sae=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_sae, generator=g, dtype=dtype)
    h = torch.randn(batch, d_in, generator=g, dtype=dtype)
    h_avg = torch.randn(d_sae, d_in, generator=g, dtype=dtype)
    initialised = torch.rand(d_sae, generator=g) < 0.7
    f = torch.relu(h @ w + 0.3 * torch.randn(d_sae, generator=g, dtype=dtype))
    return w, h, h_avg, initialised, f


@pytest.mark.parametrize("path", ["pairs", "dense"])
@pytest.mark.parametrize("seed", range(4))
def test_ne_loss_and_gradient_equal_the_literal_per_input_loop(seed, path, monkeypatch):
    monkeypatch.setattr(ne, "PAIR_CHUNK", 3)  # several chunks, so chunking is exercised
    monkeypatch.setattr(ne, "DENSE_SHARE", 2.0 if path == "pairs" else 0.0)
    w, h, h_avg, initialised, f = random_case(seed)
    pairs = ne.ActivePairs.of(f)
    assert 0 < len(pairs) < f.numel()
    w_fast = w.clone().requires_grad_(True)
    fast = ne.neuron_embedding_loss(w_fast, h, h_avg, initialised, pairs)
    fast.backward()
    w_slow = w.clone().requires_grad_(True)
    slow = literal_loss(w_slow, h, h_avg, initialised, f)
    slow.backward()
    assert float(slow) > 0
    assert torch.allclose(fast, slow, atol=1e-12)
    assert torch.allclose(w_fast.grad, w_slow.grad, atol=1e-10)
    assert (w_fast.grad != 0).any()


def test_ne_loss_gradient_passes_gradcheck():
    w, h, h_avg, initialised, f = random_case(7, batch=4, d_in=3, d_sae=6)
    pairs = ne.ActivePairs.of(f)
    assert torch.autograd.gradcheck(
        lambda w_: ne.neuron_embedding_loss(w_, h, h_avg, initialised, pairs), (w.clone().requires_grad_(True),))


def test_ne_loss_is_zero_without_initialised_buffers_and_for_inputs_equal_to_their_buffer():
    w, h, h_avg, initialised, f = random_case(1)
    pairs = ne.ActivePairs.of(f)
    none = torch.zeros_like(initialised)
    assert float(ne.neuron_embedding_loss(w, h, h_avg, none, pairs)) == 0.0
    # one input per latent whose buffer is that input (scaled: cosine ignores scale) gives exactly 0
    x = torch.randn(1, 5, dtype=torch.float64)
    one = ne.ActivePairs(torch.zeros(3, dtype=torch.long), torch.tensor([0, 4, 9]))
    avg = torch.zeros(11, 5, dtype=torch.float64)
    avg[[0, 4, 9]] = 2.5 * x[0]
    assert abs(float(ne.neuron_embedding_loss(w, x, avg, torch.ones(11, dtype=torch.bool), one))) < 1e-12


@pytest.mark.parametrize("path", ["pairs", "dense"])
@pytest.mark.parametrize("seed", range(3))
def test_buffer_update_equals_the_literal_loop_one_mean_per_step(seed, path, monkeypatch):
    monkeypatch.setattr(ne, "PAIR_CHUNK", 2)
    monkeypatch.setattr(ne, "DENSE_SHARE", 2.0 if path == "pairs" else 0.0)
    w, h, h_avg, initialised, f = random_case(seed)
    expected_avg, expected_init = literal_update(h_avg, initialised, h, f, 0.9)
    avg, init = h_avg.clone(), initialised.clone()
    ne.update_buffer(avg, init, h, ne.ActivePairs.of(f), 0.9)
    assert torch.equal(init, expected_init)
    assert torch.allclose(avg, expected_avg, atol=1e-12)
    inactive = ~(f > 0).any(0)
    assert torch.equal(avg[inactive], h_avg[inactive])  # untouched


def settings(**overrides):
    base = dict(d_in=6, d_sae=16, l1=1e-3, ne=0.5, momentum=0.9, warmup_steps=3, learning_rate=1e-2, seed=0)
    return TrainSettings(**{**base, **overrides})


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, generator=g) for _ in range(n)]


def test_warmup_is_honoured_the_ne_term_changes_training_only_from_that_step():
    data = batches(6)
    with_ne, without = SaeTrainer(settings()), SaeTrainer(settings(ne=0.0))
    for step, x in enumerate(data):
        with_ne.step(x)
        without.step(x)
        same = all(torch.equal(with_ne.params[k], without.params[k]) for k in with_ne.params)
        assert same == (step < 3), step  # the update at step 3 is the first the NE term enters
    # the buffer ran from the first step in both, and the logged L_N is the same quantity
    assert with_ne.initialised.any()  # the buffer ran from the first step
    for term in ("mse", "l1", "l0"):
        assert with_ne.log[term][:4] == without.log[term][:4]  # step 3's terms come before its update
    assert all(v > 0 for v in with_ne.log["ne"][1:]) and all(v != v for v in without.log["ne"])  # NaN: no L_N


def test_total_loss_is_mse_plus_weighted_l1_plus_weighted_ne_after_warmup():
    trainer = SaeTrainer(settings(l1=0.01, ne=0.7))
    for x in batches(4):
        trainer.step(x)
    terms, _, _ = trainer.loss_terms(batches(1, seed=5)[0])
    before, after = trainer.total(terms, 2), trainer.total(terms, 3)
    assert torch.isclose(before, terms["mse"] + 0.01 * terms["l1"])
    assert torch.isclose(after, terms["mse"] + 0.01 * terms["l1"] + 0.7 * terms["ne"])
    assert float(terms["ne"]) > 0


def test_a_resumed_trainer_continues_exactly_as_one_never_stopped():
    data = batches(7)
    straight = SaeTrainer(settings())
    for x in data:
        straight.step(x)
    first = SaeTrainer(settings())
    for x in data[:4]:
        first.step(x)
    state = {k: np.array(v, copy=True) for k, v in first.state_arrays().items()}
    resumed = SaeTrainer(settings())
    resumed.load_state(state)
    for x in data[4:]:
        resumed.step(x)
    for name in straight.params:
        assert torch.equal(straight.params[name], resumed.params[name]), name
    assert torch.equal(straight.h_avg, resumed.h_avg)
    assert straight.log == resumed.log


def test_decoder_rows_stay_unit_norm_and_dead_share_counts_never_fired_latents():
    trainer = SaeTrainer(settings())
    with torch.no_grad():
        trainer.params["b_enc"][:5] = -1e6  # these five can never fire
    for x in batches(3):
        trainer.step(x)
    assert torch.allclose(trainer.params["W_dec"].norm(dim=1), torch.ones(16), atol=1e-6)
    fired = (trainer.encode(torch.cat(batches(3))) > 0).any(0)
    assert not fired[:5].any()
    assert trainer.dead_share() == pytest.approx(float((~trainer.fired).float().mean()))
    assert trainer.dead_share() >= 5 / 16
