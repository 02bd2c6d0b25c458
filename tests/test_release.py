"""`atlas release` on a real tiny build (one layer of the tiny Llama, 32 sequences): the manifest lists every data file
of the site and every bulk file with the sha256 a literal hashlib loop finds, the id is the date and the hash of that
list, CITATION.cff is CFF 1.2.0, the archive is deterministic and verifies, every page is stamped; a rerun rewrites
nothing, and another atlas's release in the same release_dir stays out of this one's site; a rebuild that changes
one neuron's data changes exactly its hashes and gives a new release, listed first, while the old archive still
verifies; a killed release recovers; a damaged archive or extracted folder is named, and an extracted one reads
with the reader; `atlas deploy` publishes the config's site_dir and keeps the manifests already published; a
release or deploy without site_url, or a deploy of a working build, stops with one line.

The tests share one build and run in order: the rebuild test, last, changes it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
from calendar import timegm
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import yaml

import render_fixtures as fx
from builder.config import load_config
from builder.errors import AtlasError
from builder.paths import AtlasPaths
from builder.reader import open_atlas
from builder.release import check_config, kept_manifests, release, verify, verify_archive, verify_release_folder
from builder.schema import IMPORTANCE, read_example_fields
from tests.conftest import ROOT, atlas_command, atlas_with_fault, build, expect_error, tiny_config_dict

SITE_URL = "https://example.org/atlas/"
EPOCH = timegm(date(2024, 5, 1).timetuple())  # SOURCE_DATE_EPOCH of every release here
DAY = "2024-05-01"
REGION = re.compile(r"<!--atlas:(release|manifest)-->([^<]*)<!--/atlas:\1-->")


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_llama, corpus_file):
    """The tiny build with site_url, released once through the CLI (the exact neighbour search: under 64 features×2,
    so no PyNNDescent compile)."""
    folder = tmp_path_factory.mktemp("release")
    raw = tiny_config_dict(tiny_llama, corpus_file, folder, max_sequences=32, workers=1, layers=[0],
                           neighbour_count=64, neighbour_threshold=0.0, site_url=SITE_URL,
                           release_dir=str(folder / "releases"))
    config = folder / "atlas.toml"
    config.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in raw.items()))
    result = build(config)
    assert result.returncode == 0, result.stderr[-2000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
        first = atlas_release(config)
        assert first.returncode == 0, first.stderr[-2000:]
        yield {"config": config, "cfg": load_config(config), "folder": folder, "site": folder / "site",
               "releases": folder / "releases", "id": re.search(r"release (\S+):", first.stdout).group(1)}


def atlas_release(config: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    return atlas_with_fault("release", config, fault, timeout=300)


def literal_data_files(site: Path) -> dict[str, str]:
    """Every .json and .bin under the site's model folder but the .json.js twins, with its sha256: by hand."""
    found = {}
    for directory, _, names in os.walk(site / "tiny"):
        for name in names:
            if name.endswith(".json") or name.endswith(".bin"):
                path = Path(directory) / name
                found[path.relative_to(site).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def manifest_of(releases: Path, release_id: str) -> dict:
    return json.loads((releases / release_id / "manifest.json").read_text())


def hashes(manifest: dict) -> dict[str, str]:
    return {entry["path"]: entry["sha256"] for entry in manifest["files"]}


def regions(site: Path) -> dict[str, set[tuple[str, str]]]:
    return {page.relative_to(site).as_posix(): set(REGION.findall(page.read_text(encoding="utf-8")))
            for page in site.rglob("*.html")}


def snapshot(*folders: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_release_lists_every_data_file_with_its_sha256_and_writes_its_id_citation_and_archive(released):
    site, releases, release_id = released["site"], released["releases"], released["id"]
    manifest = manifest_of(releases, release_id)
    listed = hashes(manifest)
    data = {path[len("data/"):]: sha for path, sha in listed.items() if path.startswith("data/")}
    assert data == literal_data_files(site) and len(data) > 200
    bulk_dir = releases / release_id / "bulk"
    bulk = {f"bulk/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in bulk_dir.iterdir()}
    assert {name: listed[name] for name in listed if name.startswith("bulk/")} == bulk
    assert sorted(bulk) == [f"bulk/L0.{kind}.parquet" for kind in ("examples", "metrics", "sequences")]
    for path, sha in listed.items():  # the release's copies are the site's bytes
        assert hashlib.sha256((releases / release_id / path).read_bytes()).hexdigest() == sha
    canonical = json.dumps(sorted(manifest["files"], key=lambda f: f["path"]), sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False).encode()
    assert release_id == f"{DAY}-{hashlib.sha256(canonical).hexdigest()[:10]}"
    assert manifest["files_sha256"] == hashlib.sha256(canonical).hexdigest() and manifest["date"] == DAY

    citation = (releases / release_id / "CITATION.cff").read_text()
    assert (site / "CITATION.cff").read_text() == citation
    cff = yaml.safe_load(citation)
    assert {"cff-version", "message", "title", "authors"} <= set(cff) and cff["cff-version"] == "1.2.0"
    assert (cff["version"], cff["date-released"], cff["url"]) == (release_id, DAY, SITE_URL)
    assert cff["authors"] == [{"name": "Neuron Atlas"}] and cff["type"] == "dataset"

    archive = releases / f"{release_id}.tar.gz"
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    names = [m.name[len(release_id) + 1:] for m in members]
    assert names == sorted(names) and sorted(names) == sorted(list(listed) + ["manifest.json", "CITATION.cff"])
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(EPOCH, 0, 0, "")}
    assert verify_archive(archive) == []

    assert gzip.decompress((site / "releases" / release_id / "manifest.json.gz").read_bytes()) == (
        releases / release_id / "manifest.json").read_bytes()
    index = json.loads((site / "releases" / "index.json").read_text())
    assert [(r["id"], r["bulk"], r["archive"]) for r in index["releases"]] == [
        (release_id, f"{release_id}/bulk", f"{release_id}.tar.gz")]
    stamps = regions(site)
    assert len(stamps) > 60 and all(stamps.values())
    for page, found in stamps.items():
        assert found <= {("release", release_id), ("manifest", manifest["files_sha256"])}, page
        assert ("release", release_id) in found, page
    # A unit page names the sha256 of its neuron.json, which names its neuron.bin's: one hash pins both.
    unit = site / "tiny" / "L0" / "N3"
    page = (unit / "index.html").read_text()
    assert f"; data sha256 {hashlib.sha256((unit / 'neuron.json').read_bytes()).hexdigest()}.</p>" in page
    sidecar = json.loads((unit / "neuron.json").read_text())
    assert sidecar["bin_sha256"] == hashlib.sha256((unit / "neuron.bin").read_bytes()).hexdigest()
    assert sidecar["similar_sha256"] == hashlib.sha256((unit / "similar.json").read_bytes()).hexdigest()
    assert (releases / release_id).stat().st_mode & 0o777 == 0o755  # readable as any folder is, not mkdtemp's 0700


def plant_release(releases: Path, release_id: str, model: str, mtime: int | None = None) -> Path:
    """A release folder holding only a manifest of `model`, made at `mtime`."""
    folder = releases / release_id
    folder.mkdir(parents=True)
    manifest = {"kind": "release-manifest", "schema_version": 1, "release": release_id, "date": release_id[:10],
                "model": model, "site_url": SITE_URL, "files_sha256": "0" * 64, "files": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if mtime is not None:
        os.utime(folder / "manifest.json", (mtime, mtime))
    return folder


def test_releasing_the_same_data_again_rewrites_nothing_and_leaves_other_atlases_releases_out(released, monkeypatch):
    other = plant_release(released["releases"], "2030-01-01-0123456789", "another-atlas")  # newer, same release_dir
    try:
        before = snapshot(released["releases"], released["site"])
        monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH + 86400 * 30))  # another day: still the same release
        made = release(released["cfg"])
        assert made.id == released["id"] and made.date == DAY
        assert snapshot(released["releases"], released["site"]) == before  # not in this site's index nor manifests
    finally:
        shutil.rmtree(other)
    archive = made.archive.read_bytes()
    made.archive.unlink()
    assert release(released["cfg"]).archive.read_bytes() == archive  # the archive is deterministic


def test_a_release_without_site_url_stops_with_one_line_and_writes_nothing(released, tmp_path):
    cfg = dataclasses.replace(released["cfg"], site_url="", release_dir=str(tmp_path / "releases"))
    expect_error(AtlasError, lambda: release(cfg), "site_url is not set", "atlas release")
    expect_error(AtlasError, lambda: release(dataclasses.replace(cfg, site_url="example.org/atlas")),
                 "not an absolute http(s) URL")
    expect_error(AtlasError, lambda: release(dataclasses.replace(cfg, site_url="https://example.org/other/")),
                 "the render stage is stale", "site_url changed", "atlas build")
    assert not (tmp_path / "releases").exists()


def git(*args, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=git_env(), check=True, capture_output=True, text=True).stdout


def git_env() -> dict[str, str]:
    return {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.org"}


def deploy_repository(tmp_path: Path, site: Path) -> tuple[Path, Path]:
    """A git work tree holding a copy of `site` as site/, and a bare repository as its origin."""
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    git("init", "--bare", "-q", str(remote), cwd=tmp_path)
    work.mkdir()
    git("init", "-q", cwd=work)
    (work / "README").write_text("x")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "init", cwd=work)
    git("remote", "add", "origin", str(remote), cwd=work)
    shutil.copytree(site, work / "site")
    return work, remote


def deploy(work: Path, site: str = "site") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "deploy.sh"), site], cwd=work, env=git_env(),
                          capture_output=True, text=True, timeout=120)


def test_deploy_publishes_a_release_without_the_file_copies_and_only_once(released, tmp_path):
    work, remote = deploy_repository(tmp_path, released["site"])
    result = deploy(work)
    assert result.returncode == 0, result.stderr
    published = set(git("ls-tree", "-r", "--name-only", "gh-pages", cwd=remote).split())
    expected = {p.relative_to(released["site"]).as_posix() for p in released["site"].rglob("*")
                if p.is_file() and not p.name.endswith(".json.js")}
    assert published == expected and f"releases/{released['id']}/manifest.json.gz" in published
    assert git("status", "--porcelain", cwd=work) == "?? site/\n"  # the working tree and index are untouched
    head = git("rev-parse", "gh-pages", cwd=remote)
    again = deploy(work)
    assert again.returncode == 0 and "nothing to publish" in again.stderr
    assert git("rev-parse", "gh-pages", cwd=remote) == head
    missing = deploy(work, "nowhere")
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_deploy_without_site_url_or_of_a_working_build_stops_with_one_line(tmp_path):
    for name, overrides, says in (("bare", {}, "rendered without site_url"),
                                  ("unreleased", {"site_url": SITE_URL}, "is not a release")):
        cfg = fx.build_site(tmp_path / name, **overrides)
        work, remote = deploy_repository(tmp_path / name, Path(cfg.site_dir))
        result = deploy(work)
        assert result.returncode == 2 and says in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("deploy: ")
        assert git("branch", "--list", "gh-pages", cwd=remote) == ""


def test_kept_releases_are_this_models_newest_first_also_within_a_day(tmp_path):
    """By date, then by when the release was made: the id's hash says nothing of which came first."""
    plant_release(tmp_path, "2024-05-01-ffffffffff", "tiny", mtime=1000)
    plant_release(tmp_path, "2024-05-01-0000000000", "tiny", mtime=2000)  # the same day, made later
    plant_release(tmp_path, "2024-04-30-aaaaaaaaaa", "tiny", mtime=3000)  # made last, but dated the day before
    plant_release(tmp_path, "2024-06-01-bbbbbbbbbb", "another-atlas", mtime=4000)
    assert [m["release"] for m in kept_manifests(tmp_path, "tiny")] == [
        "2024-05-01-0000000000", "2024-05-01-ffffffffff", "2024-04-30-aaaaaaaaaa"]
    assert [m["release"] for m in kept_manifests(tmp_path, "another-atlas")] == ["2024-06-01-bbbbbbbbbb"]


def test_release_check_validates_the_config_alone_in_one_line(released, tmp_path):
    from click.testing import CliRunner

    from builder.cli import main

    expect_error(AtlasError, lambda: check_config(dataclasses.replace(released["cfg"], site_url="")),
                 "site_url is not set")
    expect_error(AtlasError, lambda: check_config(dataclasses.replace(released["cfg"], release_url="https://x.org/")),
                 "must be an http(s) URL containing {release}")
    result = CliRunner().invoke(main, ["release", "--config", str(released["config"]), "--check"])
    assert result.exit_code == 0, result.output
    assert f"release config: site_url {SITE_URL}" in result.output and str(released["site"]) in result.output


def corrupted(archive: Path, target: Path, offset: int) -> Path:
    """A copy of `archive` with one bit flipped at `offset` (negative: from the end)."""
    content = bytearray(archive.read_bytes())
    content[offset] ^= 0x04
    target.write_bytes(bytes(content))
    return target


def test_a_corrupted_archive_is_named_corrupt_wherever_the_damage_is(released, tmp_path):
    archive = released["releases"] / f"{released['id']}.tar.gz"
    size = archive.stat().st_size
    for name, offset in (("crc", -6), ("middle", size // 2)):  # the gzip trailer's CRC32; inside the deflate stream
        problems = verify_archive(corrupted(archive, tmp_path / f"{name}.tar.gz", offset))
        assert len(problems) == 1 and "is corrupt (" in problems[0] and problems[0].endswith(
            "; download it again"), (name, problems)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:size - 100])
    assert verify_archive(truncated)[0].endswith("is corrupt (Compressed file ended before the end-of-stream "
                                                 "marker was reached); download it again")
    not_gzip = tmp_path / "manifest.tar.gz"
    not_gzip.write_bytes((released["releases"] / released["id"] / "manifest.json").read_bytes())
    assert "is not a .tar.gz archive" in verify_archive(not_gzip)[0]


def test_an_extracted_archive_verifies_and_reads_like_the_site(released, tmp_path):
    release_id, site = released["id"], released["site"]
    with tarfile.open(released["releases"] / f"{release_id}.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / release_id
    files = len(manifest_of(released["releases"], release_id)["files"]) + 2  # and the manifest and CITATION.cff
    assert verify(folder) == f"{folder}: release {release_id}, {files} files, every one as its manifest lists it"
    extracted, rendered = open_atlas(folder), open_atlas(site)
    assert extracted.models == rendered.models == ["tiny"]
    unit, expected = extracted.unit("tiny", "L0", 3), rendered.unit("tiny", "L0", 3)
    assert np.array_equal(unit.examples.tokens, expected.examples.tokens)
    assert np.array_equal(unit.examples.activation, expected.examples.activation, equal_nan=True)
    assert extracted.similar("tiny", "L0", 3) == rendered.similar("tiny", "L0", 3)

    sidecar = folder / "data" / "tiny" / "L0" / "N3" / "neuron.json"
    sidecar.write_bytes(sidecar.read_bytes() + b" ")
    (folder / "bulk" / "notes.txt").write_text("mine")
    problems = verify_release_folder(folder)
    assert len(problems) == 2 and problems[0].startswith(f"{folder}: bulk/notes.txt is not in the manifest")
    assert problems[1].startswith(f"{folder}: data/tiny/L0/N3/neuron.json has")
    assert all(problem.endswith("extract it again, or download it again") for problem in problems)
    expect_error(AtlasError, lambda: verify(folder), "bulk/notes.txt", "(and 1 more problem)")


def test_atlas_deploy_publishes_the_configs_site_dir_and_keeps_published_manifests(released, tmp_path):
    """From a fresh clone (no local gh-pages) whose release_dir lacks an older release: the old release's manifest,
    already published, stays at its URL; everything else is the site's."""
    remote, old, work = tmp_path / "remote.git", tmp_path / "old", tmp_path / "work"
    git("init", "--bare", "-q", str(remote), cwd=tmp_path)
    old_manifest = "releases/2024-04-01-0123456789/manifest.json.gz"
    for path, content in ((old_manifest, gzip.compress(b"{}", mtime=0)), ("old.html", b"old")):
        (old / path).parent.mkdir(parents=True, exist_ok=True)
        (old / path).write_bytes(content)
    git("init", "-q", "-b", "gh-pages", cwd=old)
    git("add", ".", cwd=old)
    git("commit", "-q", "-m", "an earlier deploy", cwd=old)
    git("push", "-q", str(remote), "gh-pages", cwd=old)
    work.mkdir()
    git("init", "-q", cwd=work)
    git("commit", "-q", "--allow-empty", "-m", "init", cwd=work)
    git("remote", "add", "origin", str(remote), cwd=work)
    env = {**git_env(), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(atlas_command() + ["deploy", "--config", str(released["config"])], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kept 1 published release manifests" in result.stderr
    published = set(git("ls-tree", "-r", "--name-only", "gh-pages", cwd=remote).split())
    site = {p.relative_to(released["site"]).as_posix() for p in released["site"].rglob("*")
            if p.is_file() and not p.name.endswith(".json.js")}
    assert published == site | {old_manifest}
    assert subprocess.run(["git", "show", f"gh-pages:{old_manifest}"], cwd=remote, capture_output=True,
                          check=True).stdout == gzip.compress(b"{}", mtime=0)
    assert git("rev-list", "--count", "gh-pages", cwd=remote).strip() == "2"  # on top of the earlier deploy


def change_one_neurons_importance(cfg) -> int:
    """Change one importance score of the first example of one neuron of L0, in place (as a fixed importance bug
    would): only that neuron's sidecar and the set's examples Parquet file show importance. Returns the neuron."""
    paths = AtlasPaths.of(cfg)
    offsets = read_example_fields(paths, "L0", ("offsets",))["offsets"]
    neuron = int(np.flatnonzero(np.diff(offsets) > 0)[0])
    path = paths.set_file("importance", "L0")
    arrays = IMPORTANCE.read_npz(path)
    size = path.stat().st_size
    scores = arrays["importance"]
    row = scores[offsets[neuron]]
    column = int(np.flatnonzero(np.isfinite(row[:-1]))[0])  # a context token's score (the max token's is 1)
    row[column] = 0.0 if row[column] > 0.5 else 1.0
    IMPORTANCE.write_npz(path, **arrays)
    assert path.stat().st_size == size  # the importance stage stays done: its outputs are checked by size
    return neuron


def test_a_rebuild_changing_one_neuron_changes_only_its_hashes_and_the_old_archive_still_verifies(released,
                                                                                                  tmp_path):
    cfg, site, releases, old_id = released["cfg"], released["site"], released["releases"], released["id"]
    old = manifest_of(releases, old_id)
    neuron = change_one_neurons_importance(cfg)
    (Path(cfg.out_dir) / "render" / "meta.json").unlink()  # re-render from the changed artefact
    result = build(released["config"])
    assert result.returncode == 0, result.stderr[-2000:]
    stamps = regions(site)
    assert all(stamps.values()) and {value for found in stamps.values() for _, value in found} == {"unreleased"}
    work, _ = deploy_repository(tmp_path, site)
    refused = deploy(work)
    assert refused.returncode == 2 and "is not a release" in refused.stderr

    # Killed while copying: no release; killed while stamping: a complete release, but not yet the site's.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
        killed = atlas_release(released["config"], "release copy:20")
        assert killed.returncode == -signal.SIGKILL
        assert sorted(p.name for p in releases.iterdir() if not p.name.startswith(".")) == [
            old_id, f"{old_id}.tar.gz"]
        killed = atlas_release(released["config"], "release stamp:5")
        assert killed.returncode == -signal.SIGKILL
        assert "unreleased" in (site / "index.html").read_text()
        assert deploy(work).returncode == 2
        finished = atlas_release(released["config"])
        assert finished.returncode == 0, finished.stderr[-2000:]
    new_id = re.search(r"release (\S+):", finished.stdout).group(1)
    new = manifest_of(releases, new_id)
    assert new_id != old_id and new_id.startswith(DAY)
    changed = {path for path in set(hashes(old)) | set(hashes(new)) if hashes(old).get(path) != hashes(new).get(path)}
    assert changed == {f"data/tiny/L0/N{neuron}/neuron.json", f"data/tiny/L0/N{neuron}/neuron.bin",
                       "bulk/L0.examples.parquet"}
    assert not any(p.name.endswith(".tmp") for p in releases.iterdir())
    assert verify_archive(releases / f"{old_id}.tar.gz") == []  # the old release is still what it was
    assert verify_archive(releases / f"{new_id}.tar.gz") == []
    index = json.loads((site / "releases" / "index.json").read_text())
    assert [r["id"] for r in index["releases"]] == [new_id, old_id]  # the same day: the later release first
    assert (site / "releases" / old_id / "manifest.json.gz").is_file()  # the old manifest keeps its URL
    assert all(("release", new_id) in found for found in regions(site).values())

    # A tampered archive names what is wrong.
    tampered = tmp_path / f"{old_id}.tar.gz"
    with tarfile.open(releases / f"{old_id}.tar.gz") as source, tarfile.open(tampered, "w:gz") as target:
        for member in source.getmembers():
            content = source.extractfile(member).read()
            if member.name.endswith(f"N{neuron}/neuron.json"):
                content = content.replace(b'"neuron":', b'"neuron": ')
                member.size = len(content)
            target.addfile(member, io.BytesIO(content))
    problems = verify_archive(tampered)
    assert len(problems) == 1 and f"data/tiny/L0/N{neuron}/neuron.json has" in problems[0]
    assert problems[0].endswith("the archive is damaged or altered: download it again")
    assert "(and" not in expect_error(AtlasError, lambda: verify(tampered), "neuron.json has")
