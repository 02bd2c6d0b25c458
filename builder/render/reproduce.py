""""Reproduce this": per subject set, a short script template that recomputes one example's activation from the model
and the release's bulk data (builder/bulk.py), beside the atlas's exact value from the same data. Unit pages fill
the placeholders (docs/sidecar-schema.md, `common.json` `reproduce`) for the central example of the unit's first
feature.

The full sequence prefix is needed, not the sidecar's window: a token's activation depends on every token before it.
The model boots as builder/models.py boots it (TransformerBridge in compatibility mode), so the recomputed number
is the atlas's up to float rounding.
"""

from __future__ import annotations

from pathlib import Path

from builder.config import EMBEDDED_MODEL
from builder.render.inputs import Atlas
from builder.sae import HUB_PREFIX
from builder.subjects import SaeLatents, SubjectSet

# What a page substitutes: numbers in place of the first three, a URL or path (inside a string literal, so without
# `"` or `\`) in place of the last.
PLACEHOLDERS = ("__UNIT__", "__SEQUENCE__", "__POSITION__", "__BULK__")


def reproduce_templates(atlas: Atlas) -> dict[str, str]:
    """Per subject set key, its script template (the placeholders are valid Python names, so it compiles unfilled)."""
    return {subject.key: set_template(atlas, subject) for subject in atlas.sets}


def model_lines(atlas: Atlas) -> tuple[list[str], str]:
    """(imports, the call) booting the atlas's model: the embedded one through the package (it exists at no hub
    revision), a local folder from that folder, a hub model at the revision collect recorded."""
    cfg = atlas.cfg
    options = f"dtype=torch.{cfg.dtype}, device=device"
    if cfg.model == EMBEDDED_MODEL:
        return (["from builder.models import embedded_model_folder  # the neuron-atlas package: its embedded model"],
                f"TransformerBridge.boot_transformers(str(embedded_model_folder()), {options})")
    if Path(cfg.model).expanduser().is_dir():
        return [], f"TransformerBridge.boot_transformers({cfg.model!r}, {options})"
    revision = str(atlas.meta.get("model_revision") or cfg.model_revision)
    return [], f"TransformerBridge.boot_transformers({cfg.model!r}, revision={revision!r}, {options})"


def sae_path(atlas: Atlas, subject: SaeLatents) -> str:
    """Where a script reads an SAE: its hub path (hf://…) when the config names one, else the folder it was read
    from."""
    configured = {spec.slug: spec.path for spec in atlas.cfg.atlased_saes}.get(subject.key, "")
    return configured if configured.startswith(HUB_PREFIX) else subject.folder


def set_template(atlas: Atlas, subject: SubjectSet) -> str:
    """Each placeholder occurs once. The atlas's activation comes from the examples file (pages print it rounded),
so the script compares the recomputed number with the exact one."""
    imports, boot = model_lines(atlas)
    hook = subject.activation_hook()
    if isinstance(subject, SaeLatents):
        imports.append("from builder.sae import read_sae  # the neuron-atlas package")
        readout = [f"sae = read_sae({sae_path(atlas, subject)!r}).on(device)",
                   f"activation = sae.encode(cache[{hook!r}][0, position])[unit].item()"]
    else:
        readout = [f"activation = cache[{hook!r}][0, position, unit].item()"]
    return "\n".join([
        f"# Recompute an example's activation of a {subject.unit_noun} of {subject.label} ({atlas.cfg.name}) from "
        "the model and the bulk data.",
        "import pandas as pd, torch",
        "from transformer_lens.model_bridge import TransformerBridge",
        *imports,
        "",
        'unit, sequence, position, bulk = __UNIT__, __SEQUENCE__, __POSITION__, "__BULK__"',
        f'example = pd.read_parquet(f"{{bulk}}/{subject.slug}.examples.parquet", columns=["activation"],',
        '                          filters=[("unit", "==", unit), ("sequence", "==", sequence), ("position", "==", '
        'position)])',
        'expected = float(example["activation"].iloc[0])  # the atlas\'s activation, exact (pages print it rounded)',
        f'rows = pd.read_parquet(f"{{bulk}}/{subject.slug}.sequences.parquet", filters=[("sequence", "==", sequence)])',
        'tokens = torch.tensor(rows["tokens"].iloc[0][:position + 1], dtype=torch.long)[None]  # the whole prefix',
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        f"model = {boot}",
        "model.enable_compatibility_mode()  # as the atlas was built (builder/models.py): the same activations",
        f"_, cache = model.run_with_cache(tokens.to(device), names_filter={hook!r})",
        *readout,
        'print("recomputed", activation, "atlas", expected)',
    ]) + "\n"
