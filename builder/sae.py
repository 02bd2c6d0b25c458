"""Sparse autoencoders in the SAELens folder layout, read natively (the `sae-lens` package pins transformer-lens < 4).

A folder holds `cfg.json` and `sae_weights.safetensors` (`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae,
d_in]`, `b_dec [d_in]`, and `threshold [d_sae]` for JumpReLU). Both `cfg.json` generations are read: SAELens 6 nests
`hook_name`/`model_name` under `metadata` (`meta` in some release candidates); older releases keep them at the top
level, name TopK SAEs by `activation_fn_str = "topk"` with `activation_fn_kwargs.k`, and may say `hook_point`.

Encoding follows SAELens exactly: the input x is normalised (`normalize_activations`), b_dec is subtracted when
`apply_b_dec_to_input`, giving the SAE input x' every latent reads; the pre-activation is h = x' @ W_enc + b_enc; the
activation is ReLU(h) (standard), ReLU(h)·[h > threshold] (JumpReLU), or ReLU of the k largest entries of h, zero
elsewhere (TopK). A latent's neuron embedding is x' ⊙ W_enc[:, j]; its sum + b_enc[j] is h_j. Settings whose exact
meaning needs more than the folder (`expected_average_only_in` without its factor, hook_z reshaping, fine-tuning
scale factors, decoder-norm rescaling) are refused with one line naming the setting.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from builder.errors import AtlasError

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALISATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens' layer_norm input normalisation: (x - mean) / (std + eps), unbiased std
HOOK_LAYER = re.compile(r"^blocks\.(\d+)\.")


class SaeError(AtlasError):
    """An SAE folder is missing, malformed or uses a setting this atlas cannot reproduce exactly."""


@dataclass(frozen=True)
class SaeConfig:
    """What an SAE's cfg.json says, normalised across SAELens generations."""

    architecture: str  # one of ARCHITECTURES
    d_in: int
    d_sae: int
    hook_name: str  # TransformerLens hook the SAE reads, e.g. blocks.3.mlp.hook_post
    model_name: str  # the model it was trained on ("" when the file does not say)
    apply_b_dec_to_input: bool
    normalize_activations: str  # one of NORMALISATIONS
    k: int  # TopK's k (0 for other architectures)
    norm_scaling_factor: float  # expected_average_only_in: the input is multiplied by this (1.0 otherwise)

    @property
    def layer(self) -> int:
        """The block whose forward produces the hook."""
        return int(HOOK_LAYER.match(self.hook_name).group(1))


def _fail(folder: Path, problem: str, fix: str) -> SaeError:
    return SaeError(f"SAE {str(folder)!r}: {problem}; {fix}")


def parse_sae_config(raw: dict, folder: Path) -> SaeConfig:
    """A cfg.json document (either generation) as an SaeConfig, or one SaeError naming what is wrong."""
    if not isinstance(raw, dict):
        raise _fail(folder, f"{CFG_FILE} is not a JSON object", "write the SAELens cfg.json")
    nested = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else raw.get("meta")
    meta = nested if isinstance(nested, dict) else {}

    def pick(*names, default=None):
        for source in (meta, raw):
            for name in names:
                if source.get(name) is not None:
                    return source[name]
        return default

    hook_name = pick("hook_name", "hook_point", default="")
    if not isinstance(hook_name, str) or not hook_name:
        raise _fail(folder, f"{CFG_FILE} names no hook_name", "add the TransformerLens hook it reads, e.g. "
                    '"hook_name": "blocks.3.mlp.hook_post"')
    if not HOOK_LAYER.match(hook_name):
        raise _fail(folder, f"hook {hook_name!r} is not inside a block", "atlas SAEs on blocks.<layer>.* hooks")
    reshape = pick("reshape_activations", default="none")
    if reshape not in ("none", None) or hook_name.endswith("_z"):
        raise _fail(folder, f"reshape_activations {reshape!r} on {hook_name!r} (per-head hook_z inputs) is not "
                    "supported", "atlas an SAE on a hook without heads (resid, mlp)")
    architecture = raw.get("architecture") or "standard"
    activation_fn = pick("activation_fn_str", "activation_fn", default="relu")
    kwargs = pick("activation_fn_kwargs", default={}) or {}
    k = raw.get("k")
    if architecture == "standard" and activation_fn == "topk":
        architecture, k = "topk", kwargs.get("k")
    elif architecture == "standard" and activation_fn not in ("relu", None):
        raise _fail(folder, f"activation function {activation_fn!r} is not supported",
                    f"use one of the architectures {', '.join(ARCHITECTURES)}")
    if architecture not in ARCHITECTURES:
        raise _fail(folder, f"unknown architecture {architecture!r}", f"use one of {', '.join(ARCHITECTURES)}")
    if architecture == "topk":
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise _fail(folder, f"a TopK SAE needs a positive integer k, got {k!r}", 'add "k" to cfg.json')
        if raw.get("rescale_acts_by_decoder_norm"):
            raise _fail(folder, "rescale_acts_by_decoder_norm is set", "fold the decoder norms into the weights "
                        "(as SAELens does when it saves) and set it to false")
    else:
        k = 0
    normalise = raw.get("normalize_activations", "none")
    normalise = {True: "expected_average_only_in", False: "none", None: "none"}.get(normalise, normalise)
    if normalise not in NORMALISATIONS:
        raise _fail(folder, f"normalize_activations {normalise!r} is not supported", f"use one of "
                    f"{', '.join(NORMALISATIONS)}")
    factor = raw.get("norm_scaling_factor", 1.0)
    if normalise == "expected_average_only_in" and "norm_scaling_factor" not in raw:
        raise _fail(folder, "normalize_activations is expected_average_only_in but cfg.json has no "
                    "norm_scaling_factor", "add the factor (SAELens' pretrained_saes.yaml lists it) or fold it "
                    "into the weights and set normalize_activations to none")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor <= 0:
        raise _fail(folder, f"norm_scaling_factor must be a positive number, got {factor!r}", "fix cfg.json")
    if raw.get("finetuning_scaling_factor"):
        raise _fail(folder, "finetuning_scaling_factor is set", "fold the scaling factor into W_dec")
    d_in, d_sae = raw.get("d_in"), raw.get("d_sae")
    for name, value in (("d_in", d_in), ("d_sae", d_sae)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(folder, f"{CFG_FILE} needs a positive integer {name}, got {value!r}", "fix cfg.json")
    apply_b_dec = raw.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise _fail(folder, f"apply_b_dec_to_input must be true or false, got {apply_b_dec!r}", "fix cfg.json")
    model_name = pick("model_name", default="")
    return SaeConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name=hook_name,
                     model_name=model_name if isinstance(model_name, str) else "", apply_b_dec_to_input=apply_b_dec,
                     normalize_activations=normalise, k=k if architecture == "topk" else 0,
                     norm_scaling_factor=float(factor) if normalise == "expected_average_only_in" else 1.0)


@dataclass(frozen=True, eq=False)
class Sae:
    """An SAE's config and weights (float32 numpy; `on(device)` gives torch tensors for encoding)."""

    folder: Path
    cfg: SaeConfig
    W_enc: "Float[np.ndarray, 'd_in d_sae']"
    b_enc: "Float[np.ndarray, ' d_sae']"
    W_dec: "Float[np.ndarray, 'd_sae d_in']"
    b_dec: "Float[np.ndarray, ' d_in']"
    threshold: "Float[np.ndarray, ' d_sae'] | None"

    @functools.lru_cache(maxsize=4)
    def on(self, device: str, dtype: str = "float32") -> "SaeTensors":
        import torch

        kind = getattr(torch, dtype)
        move = lambda a: None if a is None else torch.as_tensor(a).to(device=device, dtype=kind)  # noqa: E731
        return SaeTensors(self.cfg, move(self.W_enc), move(self.b_enc), move(self.W_dec), move(self.b_dec),
                          move(self.threshold))


@dataclass(frozen=True, eq=False)
class SaeTensors:
    """The encoding maths on torch tensors (the pure functions the identity and the tests check)."""

    cfg: SaeConfig
    W_enc: "Tensor"
    b_enc: "Tensor"
    W_dec: "Tensor"
    b_dec: "Tensor"
    threshold: "Tensor | None"

    def sae_input(self, x: "Float[Tensor, '... d_in']") -> "Float[Tensor, '... d_in']":
        """x', what every latent reads: x normalised as the SAE was trained, minus b_dec when it subtracts it."""
        x = x.to(self.W_enc.dtype)
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in":
            x = x * self.cfg.norm_scaling_factor
        elif mode == "constant_norm_rescale":
            x = x * (math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True))
        elif mode == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            x = centred / (centred.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre(self, x_in: "Float[Tensor, '... d_in']") -> "Float[Tensor, '... d_sae']":
        return x_in @ self.W_enc + self.b_enc

    def activation(self, pre: "Float[Tensor, '... d_sae']") -> "Float[Tensor, '... d_sae']":
        import torch

        if self.cfg.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.cfg.architecture == "topk":
            top = torch.topk(pre, k=min(self.cfg.k, pre.shape[-1]), dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def encode(self, x: "Float[Tensor, '... d_in']") -> "Float[Tensor, '... d_sae']":
        return self.activation(self.pre(self.sae_input(x)))

    def decode(self, f: "Float[Tensor, '... d_sae']", x: "Float[Tensor, '... d_in']") -> "Float[Tensor, '... d_in']":
        """The reconstruction of x from its latents f, with x's normalisation undone (as SAELens does)."""
        y = f @ self.W_dec + self.b_dec
        mode = self.cfg.normalize_activations
        x = x.to(y.dtype)
        if mode == "expected_average_only_in":
            return y / self.cfg.norm_scaling_factor
        if mode == "constant_norm_rescale":
            return y / (math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True))
        if mode == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            return y * (x - mean).std(dim=-1, keepdim=True) + mean
        return y


HUB_PREFIX = "hf://"  # an [[sae]] path hf://owner/repo/sub/folder is that folder of a Hugging Face hub repo


def sae_folder(path: str | Path) -> Path:
    """The local folder of an SAE path: itself, or for hf://owner/repo[/subfolder] the hub snapshot of that folder
    (downloaded once with huggingface_hub, then read from its cache)."""
    text = str(path)
    if not text.startswith(HUB_PREFIX):
        return Path(text).expanduser()
    parts = text[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 2:
        raise SaeError(f"SAE {text!r}: a hub path is hf://owner/repo[/subfolder]; fix the [[sae]] path")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = snapshot_download(repo, allow_patterns=[f"{subfolder}/{CFG_FILE}" if subfolder else CFG_FILE,
                                                       f"{subfolder}/{WEIGHTS_FILE}" if subfolder else WEIGHTS_FILE])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        raise SaeError(f"SAE {text!r}: cannot fetch it from the hub ({type(error).__name__}); go online, or "
                       "download the folder and give its local path") from None
    return Path(root) / subfolder


def read_sae(folder: str | Path) -> Sae:
    """The SAE in `folder` (or at a hub path), checked: every problem is one SaeError naming it and its fix."""
    folder = sae_folder(folder)
    if not folder.is_dir():
        raise _fail(folder, "no such folder", "give the path of a folder holding cfg.json and "
                    f"{WEIGHTS_FILE}")
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        raise _fail(folder, f"{CFG_FILE} is missing", "put the SAELens cfg.json beside the weights")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise _fail(folder, f"{CFG_FILE} is not valid JSON ({error})", "fix or re-download it") from None
    cfg = parse_sae_config(raw, folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise _fail(folder, f"{WEIGHTS_FILE} is missing", "put the SAE's weights beside cfg.json")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise _fail(folder, f"{WEIGHTS_FILE} cannot be read ({error})", "re-download or re-save it") from None
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
              "b_dec": (cfg.d_in,)}
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    arrays = {}
    for name, shape in shapes.items():
        if name not in tensors:
            raise _fail(folder, f"{WEIGHTS_FILE} has no tensor {name!r} (it has {', '.join(sorted(tensors))})",
                        f"save {name} of shape {list(shape)}")
        value = np.asarray(tensors[name], dtype=np.float32)
        if value.shape != shape:
            raise _fail(folder, f"{name} has shape {list(value.shape)}, cfg.json implies {list(shape)}",
                        "fix d_in/d_sae in cfg.json or re-save the weights")
        if not np.isfinite(value).all():
            raise _fail(folder, f"{name} holds non-finite values", "re-train or re-download the SAE")
        arrays[name] = value
    return Sae(folder=folder, cfg=cfg, W_enc=arrays["W_enc"], b_enc=arrays["b_enc"], W_dec=arrays["W_dec"],
               b_dec=arrays["b_dec"], threshold=arrays.get("threshold"))


@functools.lru_cache(maxsize=16)
def cached_sae(folder: str) -> Sae:
    """read_sae, once per process: subject sets read their SAE on every batch."""
    return read_sae(folder)


def write_sae(folder: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    """An SAELens-layout folder (cfg.json + sae_weights.safetensors): test fixtures and trained SAEs."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()},
              str(folder / WEIGHTS_FILE))
    return folder
