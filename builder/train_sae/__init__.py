"""The train_sae stage: train the `[[train_sae]]` SAEs on their hooks' activations over their own corpus
(`train_data_files`), evaluate each on held-out tokens, and write each as a SAELens folder that every later stage
reads like any `[[sae]]` folder.

Parts: `loss` (the neuron-embedding loss and its buffer), `trainer` (one SAE's training state and step), `metrics`
(the paper's held-out measures), this module (streaming, resume, evaluation, the artefacts).

Streaming: the training corpus is packed like the atlas corpus (context_length, prepend_bos); the first
⌈training_tokens / context_length⌉ sequences are trained on (every position, BOS included: its activation here is no
outlier), the next `train_heldout_sequences` are held out. Tokens are read in corpus order in windows of
MIX_STEPS batches, each window shuffled by a fixed permutation (seeded by the window's number), so consecutive
tokens of one text do not fill one batch. SAEs on the same hook with the same batch size train side by side on the
same batches from one forward pass.

Outputs, under out_dir/train_sae/:
    tokens.npz                        the packed training corpus (training, then held-out sequences)
    {slug}/cfg.json, {slug}/sae_weights.safetensors    the SAE, SAELens layout
    {slug}.log.npz                    each loss term per step, and which latents ever fired (TRAINING_LOG)
    {slug}.evaluation.json            the held-out evaluation (TRAINING_EVALUATION), see `evaluate_trained`
    {slug}.checkpoint.npz             while training: the whole state every CHECKPOINT_STEPS steps (resume)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch

from builder.config import AtlasConfig, TrainSaeSpec, trained_sae_folder
from builder.errors import ArtefactError, DatasetError
from builder.paths import AtlasPaths
from builder.schema import TRAIN_CHECKPOINT, TRAIN_TOKENS, TRAINING_EVALUATION, TRAINING_LOG
from builder.stage import StageRun, progress
from builder.train_sae.trainer import LOG_TERMS, SaeTrainer, TrainSettings, saelens_config

log = logging.getLogger(__name__)

MIX_STEPS = 16  # batches per shuffled window of the token stream
CHECKPOINT_STEPS = 4 * MIX_STEPS  # a checkpoint costs ≈ 8 floats per SAE weight: every few windows, not every step
FORWARD_SEQUENCES = 16  # sequences per forward pass of the model


def folder_of(cfg: AtlasConfig, spec: TrainSaeSpec) -> Path:
    return trained_sae_folder(cfg, spec.slug)


def log_path(cfg: AtlasConfig, slug: str) -> Path:
    return AtlasPaths.of(cfg).trained(slug, "log.npz")


def evaluation_path(cfg: AtlasConfig, slug: str) -> Path:
    return AtlasPaths.of(cfg).trained(slug, "evaluation.json")


def _checkpoint_path(cfg: AtlasConfig, slug: str) -> Path:
    return AtlasPaths.of(cfg).trained(slug, "checkpoint.npz")


def settings_for(spec: TrainSaeSpec, d_in: int) -> TrainSettings:
    return TrainSettings(d_in=d_in, d_sae=spec.d_sae or spec.expansion * d_in, l1=spec.l1, ne=spec.ne,
                         momentum=spec.momentum, warmup_steps=spec.warmup_steps,
                         learning_rate=spec.learning_rate, seed=spec.seed)


def steps_of(spec: TrainSaeSpec) -> int:
    return spec.training_tokens // spec.batch_size


# ---------------------------------------------------------------------------------------------------------------
# The token stream


def capture(bridge, hook: str, tokens: torch.Tensor) -> torch.Tensor:
    """The hook's value on `tokens` [batch, pos], running the model only as deep as the hook."""
    captured = {}
    layer = int(hook.split(".")[1])
    with torch.no_grad():
        bridge.run_with_hooks(tokens, return_type=None, stop_at_layer=layer + 1,
                              fwd_hooks=[(hook, lambda value, hook: captured.update(v=value.detach()))])
    return captured["v"].float()


def window_activations(bridge, hook: str, tokens: np.ndarray, window: int, window_tokens: int, limit: int,
                       device) -> torch.Tensor:
    """The activations of flat token positions [window · window_tokens, (window + 1) · window_tokens) of the
    training sequences (none from `limit` on: only whole steps are trained), shuffled by the window's fixed
    permutation: [≤ window_tokens, d_in]."""
    context = tokens.shape[1]
    start, end = window * window_tokens, min(limit, (window + 1) * window_tokens)
    first, last = start // context, math.ceil(end / context)
    parts = [capture(bridge, hook, torch.as_tensor(tokens[s:min(last, s + FORWARD_SEQUENCES)], dtype=torch.long,
                                                   device=device)) for s in range(first, last, FORWARD_SEQUENCES)]
    flat = torch.cat(parts).reshape(-1, parts[0].shape[-1])[start - first * context:end - first * context]
    order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(window))
    return flat[order.to(flat.device)]


# ---------------------------------------------------------------------------------------------------------------
# The stage


def build(run: StageRun) -> dict:
    cfg = run.cfg
    from builder.models import load_model

    model = load_model(cfg)
    widths = {spec.hook: hook_width_checked(model, spec) for spec in cfg.train_sae}
    tokens = training_tokens(run, model)
    trained = 0
    groups: dict[tuple[str, int], list[TrainSaeSpec]] = {}
    for spec in cfg.train_sae:
        groups.setdefault((spec.hook, spec.batch_size), []).append(spec)
    for (hook, batch_size), specs in groups.items():
        trained += train_group(run, model, hook, batch_size, specs, widths[hook], tokens["train"])
    for spec in cfg.train_sae:
        path = evaluation_path(cfg, spec.slug)
        if not TRAINING_EVALUATION.is_readable(path):
            result = evaluate_trained(cfg, model, spec, tokens["heldout"])
            TRAINING_EVALUATION.write_json(path, result)
            log.info("train_sae: %s held out: MSE %.4g, L0 %.2f%%, CE +%.4f nats, dead %.1f%%", spec.slug,
                     result["mse"], result["l0_percent"], result["ce_increase"], result["dead_percent"])
        run.record(path, TRAINING_EVALUATION)
        run.record(log_path(cfg, spec.slug), TRAINING_LOG)
        for name in ("cfg.json", "sae_weights.safetensors"):
            run.record(folder_of(cfg, spec) / name)
    return {"trained": len(cfg.train_sae), "trained_last_run": trained,
            "training_sequences": int(len(tokens["train"])), "heldout_sequences": int(len(tokens["heldout"]))}


def hook_width_checked(model, spec: TrainSaeSpec) -> int:
    from builder.sae import SaeError
    from builder.subjects import hook_width

    layer = int(spec.hook.split(".")[1]) if spec.hook.split(".")[1].isdigit() else -1
    if spec.hook not in model.bridge.hook_dict or not 0 <= layer < model.n_layers:
        raise SaeError(f"[[train_sae]] {spec.slug!r}: hook {spec.hook!r} is not in {model.name!r} (layers 0.."
                       f"{model.n_layers - 1}); use one of its hooks, e.g. blocks.3.mlp.hook_post")
    return hook_width(model, spec.hook)


def training_tokens(run: StageRun, model) -> dict[str, np.ndarray]:
    """The training and held-out sequences, packed once and kept in the stage folder."""
    from builder.data import tokenise_corpus

    cfg = run.cfg
    path = Path(cfg.out_dir) / "train_sae" / "tokens.npz"
    n_train = math.ceil(max(s.training_tokens for s in cfg.train_sae) / cfg.context_length)
    needed = n_train + cfg.train_heldout_sequences
    try:
        arrays = TRAIN_TOKENS.read_npz(path)
    except ArtefactError:
        corpus = dataclasses.replace(cfg, data_files=cfg.train_data_files, dataset="", max_sequences=needed,
                                     max_documents=max(cfg.max_documents, 10 ** 9))
        packed, _ = tokenise_corpus(corpus, model.tokenizer)
        if len(packed) < needed:
            raise DatasetError(f"train_data_files give {len(packed)} sequences of {cfg.context_length} tokens, but "
                               f"training_tokens and train_heldout_sequences need {needed} ({n_train} + "
                               f"{cfg.train_heldout_sequences}); add text or lower training_tokens")
        arrays = {"train": packed[:n_train], "heldout": packed[n_train:needed]}
        TRAIN_TOKENS.write_npz(path, **arrays)
    run.record(path, TRAIN_TOKENS)
    return arrays


def _finished(cfg: AtlasConfig, spec: TrainSaeSpec) -> bool:
    folder = folder_of(cfg, spec)
    return ((folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()
            and TRAINING_LOG.is_readable(log_path(cfg, spec.slug)))


def train_group(run: StageRun, model, hook: str, batch_size: int, specs: list[TrainSaeSpec], d_in: int,
                tokens: np.ndarray) -> int:
    """Train the SAEs of one hook and batch size side by side; returns how many were trained this run."""
    cfg = run.cfg
    todo = [s for s in specs if not _finished(cfg, s)]
    if not todo:
        return 0
    trainers = {}
    for spec in todo:
        trainer = SaeTrainer(settings_for(spec, d_in), device=model.device)
        checkpoint = _checkpoint_path(cfg, spec.slug)
        if TRAIN_CHECKPOINT.is_readable(checkpoint):
            trainer.load_state(TRAIN_CHECKPOINT.read_npz(checkpoint))
        trainers[spec.slug] = trainer
    total = max(steps_of(s) for s in todo)
    start = min(t.steps for t in trainers.values())
    if start:
        log.info("train_sae: resuming %s at step %d of %d", ", ".join(trainers), start, total)
    window_tokens = MIX_STEPS * batch_size
    with progress(total=total, initial=start, desc="train_sae", unit="step") as bar:
        for window in range(start // MIX_STEPS, math.ceil(total / MIX_STEPS)):
            activations = window_activations(model.bridge, hook, tokens, window, window_tokens, total * batch_size,
                                             model.device)
            for offset in range(MIX_STEPS):
                step = window * MIX_STEPS + offset
                if step >= total:
                    break
                batch = activations[offset * batch_size:(offset + 1) * batch_size]
                for spec in todo:
                    trainer = trainers[spec.slug]
                    if trainer.steps == step and step < steps_of(spec):
                        trainer.step(batch)
                bar.update(1)
                if (step + 1) % CHECKPOINT_STEPS == 0:
                    for spec in todo:
                        trainer = trainers[spec.slug]
                        if trainer.steps < steps_of(spec):
                            TRAIN_CHECKPOINT.write_npz(_checkpoint_path(cfg, spec.slug), **trainer.state_arrays())
            for spec in todo:
                if trainers[spec.slug].steps == steps_of(spec) and not _finished(cfg, spec):
                    save_trained(cfg, spec, trainers[spec.slug], hook, model.name)
    return len(todo)


def save_trained(cfg: AtlasConfig, spec: TrainSaeSpec, trainer: SaeTrainer, hook: str, model_name: str) -> None:
    from builder.artefacts import atomic_dir
    from builder.sae import write_sae

    settings = trainer.settings
    with atomic_dir(folder_of(cfg, spec)) as tmp:
        write_sae(tmp, saelens_config(settings, hook, model_name, steps_of(spec) * spec.batch_size),
                  trainer.weights())
    TRAINING_LOG.write_npz(log_path(cfg, spec.slug), fired=trainer.fired.cpu().numpy(),
                           warmup_steps=np.int64(settings.warmup_steps), ne_coefficient=np.float64(settings.ne),
                           **{term: np.asarray(trainer.log[term], np.float64) for term in LOG_TERMS})
    _checkpoint_path(cfg, spec.slug).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation


def evaluate_trained(cfg: AtlasConfig, model, spec: TrainSaeSpec, heldout: np.ndarray) -> dict:
    """The paper's measures on the held-out sequences, for the SAE as read back from its folder:
    mse, l1, l0_percent (builder/train_sae/metrics.py's definitions, over every held-out token), ce_clean,
    ce_spliced, ce_increase (builder/evaluate.py: the reconstruction replaces the hook for the rest of the forward
    pass), dead_percent (never active on the training tokens), median_max_distance, median_mean_distance,
    median_size (over each latent's held-out examples, one per sequence at its max token, up to 100)."""
    from builder.evaluate import Totals, evaluate_batch
    from builder.sae import read_sae
    from builder.train_sae.metrics import latent_examples

    sae = read_sae(folder_of(cfg, spec))
    maths = sae.on(str(model.device))
    totals = Totals(sae.cfg.d_in)
    inputs = []
    for first in range(0, len(heldout), cfg.batch_size):
        batch = torch.as_tensor(heldout[first:first + cfg.batch_size], dtype=torch.long, device=model.device)
        inputs.append(evaluate_batch(model.bridge, maths, spec.hook, batch, totals)["x"].float().cpu())
    result = totals.result(sae.cfg.d_sae, float("nan"))
    examples = latent_examples(torch.cat(inputs), lambda x: maths.encode(x.to(maths.W_enc.device)), sae.W_enc)
    fired = TRAINING_LOG.read_npz(log_path(cfg, spec.slug))["fired"]
    return {"slug": spec.slug, "hook": spec.hook, "d_sae": sae.cfg.d_sae, "l1_coefficient": spec.l1,
            "ne_coefficient": spec.ne, "training_tokens": steps_of(spec) * spec.batch_size,
            "heldout_tokens": int(heldout.size), "mse": result["mse"], "l1": result["l1"],
            "l0_percent": 100.0 * result["l0_share"], "explained_variance": result["explained_variance"],
            "ce_clean": result["ce_clean"], "ce_spliced": result["ce_spliced"], "ce_increase": result["ce_increase"],
            "dead_percent": 100.0 * float((~fired).mean()), **examples.medians()}

