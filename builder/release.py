"""`atlas release`: freeze the rendered site as a citeable release (docs/releases.md).

A release is the site's data files (every `.json` and `.bin` its pages show, and the MNIST atlas's images) and the
bulk Parquet files (builder/bulk.py), each listed with its size and sha256 in a manifest. Its id is
`{date}-{first 10 hex digits of the sha256 of the manifest's file list}`: the same data is the same release, and
pages are not hashed (they name the release), so nothing is circular.

Under release_dir (outside the site: a rebuild never touches it):

    {id}/manifest.json       id, date, model, site_url, files_sha256 and files: [{path, bytes, sha256}], by path
    {id}/CITATION.cff        CFF 1.2.0, version = the id
    {id}/data/…              copies of the site's data files (data/{path in the site})
    {id}/bulk/{slug}.{examples,metrics,sequences}.parquet
    {id}.tar.gz              the folder as one deterministic archive (a DOI deposit, GitHub release assets)

In the site:

    releases/{id}/manifest.json.gz   every kept release's manifest, at a stable URL
    releases/index.json (+ .json.js) every release of this model in release_dir (other atlases may share it), newest
                                     first, and where its archive and bulk data are (release_url); static/atlas.js
                                     reads it for the reproduce scripts
    CITATION.cff                     the release's
    every HTML page                  its stamped regions (builder/render/pages.py Region): the release id and the
                                     manifest's sha256; the home page last

Atomic: the release folder is assembled in a temporary folder and renamed into place, the archive and every site
file go through builder.artefacts.atomic_path, and the home page is stamped last. A killed release leaves no release
or a complete one, and a home page that names the release only once every page does; a rerun removes the leftovers,
reuses a complete release and stamps again.

`--verify` checks an archive (read to the end of its gzip stream, so a damaged CRC shows), an extracted archive's
folder or a released site against its manifest; every problem is one line saying what to do.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from datetime import date as Date
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from builder.artefacts import atomic_path, write_bytes
from builder.config import AtlasConfig
from builder.errors import AtlasError
from builder.render.codec import FILE_COPY_SUFFIX, dumps, js_wrapper
from builder.render.text import clean_text
from builder.stage import FINISHED, progress, statuses

log = logging.getLogger(__name__)

MANIFEST_KIND, MANIFEST_VERSION = "release-manifest", 1
INDEX_KIND, INDEX_VERSION = "releases", 1
ID_HEX = 10  # hex digits of the file list's sha256 in a release id (40 bits: no collisions between releases)
RELEASE_ID = re.compile(r"^\d{4}-\d{2}-\d{2}-[0-9a-f]{10}$")
DATA, BULK, RELEASES = "data", "bulk", "releases"  # the release's two folders; the site's folder of releases
MANIFEST, CITATION = "manifest.json", "CITATION.cff"
HOME = "index.html"  # stamped last: when it names a release, every page does
# A page's stamped regions (builder/render/pages.py Region): the text between the markers is the release's value.
REGION = re.compile(rb"<!--atlas:(release|manifest)-->[^<]*<!--/atlas:\1-->")
GZIP_LEVEL = 6
READ_BLOCK = 1 << 20
LEFTOVER = re.compile(r"^\..+\.tmp$")  # what atomic_path and the staging folder leave after a kill


@dataclass(frozen=True)
class Release:
    id: str
    date: str
    files_sha256: str  # sha256 of the canonical file list; its first ID_HEX digits end the id
    files: tuple[dict, ...]
    folder: Path
    archive: Path


# ---------------------------------------------------------------------------------------------------------------
# Checks


def check_urls(cfg: AtlasConfig) -> None:
    """Citations need an absolute site_url; release_url, when set, must name each release's own location."""
    if not cfg.site_url:
        raise AtlasError("site_url is not set, and citations need the site's absolute URL: set site_url = "
                         "\"https://OWNER.github.io/REPO/\" in the config, then run `atlas build` and `atlas release`")
    url = urlsplit(cfg.site_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise AtlasError(f"site_url {cfg.site_url!r} is not an absolute http(s) URL; set it to where the site is "
                         "published, e.g. \"https://OWNER.github.io/REPO/\"")
    if cfg.release_url:
        location = urlsplit(cfg.release_url)
        if location.scheme not in ("http", "https") or not location.netloc or "{release}" not in cfg.release_url:
            raise AtlasError(f"release_url {cfg.release_url!r} must be an http(s) URL containing {{release}}, e.g. "
                             "\"https://github.com/OWNER/REPO/releases/download/{release}\", or empty")


# Why a release without release_url is citeable but its pages' scripts are not runnable from the web alone.
UNPUBLISHED_BULK = ("release_url is not set, so the pages' \"Reproduce this\" scripts read the bulk data from the "
                    "folder where a reader extracted the archive, which they must download by hand: deposit %s "
                    "(Zenodo, GitHub release assets) and name it in the README, or set release_url to where its "
                    "files are published and run `atlas release` again")


def check_config(cfg: AtlasConfig) -> str:
    """`atlas release --check`: what a release needs of the config alone (before a long build); the line saying
    so, or AtlasError."""
    check_urls(cfg)
    release_date()
    if not cfg.release_url:
        log.warning(UNPUBLISHED_BULK, f"{cfg.release_dir}/{{id}}.tar.gz")
    return (f"release config: site_url {cfg.site_url}, release_url {cfg.release_url or '(none)'}, release_dir "
            f"{cfg.release_dir}, site_dir {cfg.site_dir}")


def check_rendered(cfg: AtlasConfig) -> dict:
    """The site must be rendered from the current artefacts and config (every stage done); returns render's meta."""
    states = statuses(cfg)
    for state in states:
        if state.state not in FINISHED:
            raise AtlasError(f"the {state.name} stage is {state.state} ({state.reason}); run `atlas build` with this "
                             "config before `atlas release`")
    manifests = sorted(Path(cfg.site_dir).glob(f"{cfg.name}/{DATA}/atlas.json"))
    if not manifests:
        raise AtlasError(f"no rendered site at {cfg.site_dir}; run `atlas build` with this config first")
    rendered_with = json.loads(manifests[0].read_text()).get("site_url")
    if rendered_with != cfg.site_url:
        raise AtlasError(f"the site at {cfg.site_dir} was rendered with site_url {rendered_with!r}, the config says "
                         f"{cfg.site_url!r}; run `atlas build` with this config")
    return next(s.meta for s in states if s.name == "render") or {}


def release_date() -> str:
    """Today (UTC), or SOURCE_DATE_EPOCH's date when set (reproducible builds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return datetime.now(timezone.utc).date().isoformat()
    try:
        return datetime.fromtimestamp(int(epoch), timezone.utc).date().isoformat()
    except (ValueError, OverflowError, OSError):
        raise AtlasError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time in seconds; unset it or set it to one, "
                         "e.g. $(git log -1 --format=%ct)") from None


# ---------------------------------------------------------------------------------------------------------------
# The site's files


@dataclass(frozen=True)
class SiteFiles:
    """A rendered site's files by role (paths from the site root, sorted)."""

    data: tuple[str, ...]  # what a release freezes
    pages: tuple[str, ...]  # HTML pages, the home page last
    leftovers: tuple[str, ...]  # temporary files of an interrupted write


def site_files(site: Path) -> SiteFiles:
    """Data files are the `.json` files and their `.bin` companions of every model's folder and the MNIST atlas's
    PNG images (what its pages show); never the `.json.js` twins (local copies of the same data), the pages, the
    static files or what a release adds (releases/, CITATION.cff)."""
    data, pages, leftovers = [], [], []
    for directory, folders, names in os.walk(site):
        relative = Path(directory).relative_to(site)
        if relative == Path("."):
            folders[:] = [f for f in folders if f not in (RELEASES, "static")]
        for name in names:
            path = (relative / name).as_posix()
            if LEFTOVER.match(name):
                leftovers.append(path)
            elif name.endswith(".html"):
                pages.append(path)
            elif (name.endswith((".json", ".bin")) and not name.endswith(FILE_COPY_SUFFIX)) or (
                    path.startswith("mnist/") and name.endswith(".png")):
                data.append(path)
    pages.sort(key=lambda p: (p == HOME, p))
    return SiteFiles(tuple(sorted(data)), tuple(pages), tuple(sorted(leftovers)))


def hash_stream(handle) -> tuple[int, str]:
    """(bytes, sha256) of what a binary file object holds, read in blocks."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: handle.read(READ_BLOCK), b""):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


def sha256_file(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of a file."""
    with open(path, "rb") as handle:
        return hash_stream(handle)


def entries(folder: Path, paths: list[str], prefix: str, desc: str) -> list[dict]:
    """Manifest entries of `folder`'s files `paths`, listed as `{prefix}/{path}`."""
    listed = []
    with progress(total=len(paths), desc=desc, unit="file") as bar:
        for path in paths:
            size, sha = sha256_file(folder / path)
            listed.append({"path": f"{prefix}/{path}", "bytes": size, "sha256": sha})
            bar.update()
    return listed


def files_digest(files: list[dict]) -> str:
    """sha256 of the canonical file list: the entries sorted by path, as compact JSON with sorted keys."""
    canonical = json.dumps(sorted(files, key=lambda f: f["path"]), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Releasing


def release(cfg: AtlasConfig) -> Release:
    """Freeze cfg.site_dir as a release under cfg.release_dir (reusing the release of the same data when there is
    one) and publish it in the site: its manifest, the release index, CITATION.cff and every page's stamp."""
    from builder.bulk import write_bulk

    check_urls(cfg)
    render_meta = check_rendered(cfg)
    site, root = Path(cfg.site_dir), Path(cfg.release_dir)
    remove_leftovers(root)
    found = site_files(site)
    files = entries(site, list(found.data), DATA, "release hash")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging.", suffix=".tmp", dir=root))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would become the release folder's, hiding it from other users
    try:
        bulk = [path.relative_to(staging / BULK).as_posix() for path in write_bulk(cfg, staging / BULK)]
        files = sorted(files + entries(staging / BULK, bulk, BULK, "release bulk hash"), key=lambda f: f["path"])
        digest = files_digest(files)
        kept = {m["files_sha256"]: m for m in kept_manifests(root, cfg.name)}
        if digest in kept:
            release_id, date = kept[digest]["release"], kept[digest]["date"]
            log.info("release: the data is that of release %s", release_id)
        else:
            date = release_date()
            release_id = f"{date}-{digest[:ID_HEX]}"
            freeze(cfg, site, staging, files, digest, release_id, date)
            os.replace(staging, root / release_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    made = Release(release_id, date, digest, tuple(files), root / release_id, root / f"{release_id}.tar.gz")
    if not made.archive.is_file():
        write_archive(made)
    publish(cfg, made, found)
    units = render_meta.get("neurons") or 0
    log.info("release %s: %d files (%.1f MB), archive %s (%.1f MB); the model's pages, data and release files are "
             "%.1f KB per unit published", release_id, len(files), sum(f["bytes"] for f in files) / 1e6, made.archive,
             made.archive.stat().st_size / 1e6, published_bytes(site, cfg.name) / max(1, units) / 1000)
    if not cfg.release_url:
        log.warning(UNPUBLISHED_BULK, made.archive)
    return made


def remove_leftovers(root: Path) -> None:
    """What a killed release leaves under release_dir: its staging folder, a half-written archive."""
    if root.is_dir():
        for leftover in sorted(root.iterdir()):
            if LEFTOVER.match(leftover.name):
                log.warning("release: removing %s left by an interrupted release", leftover)
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()


def freeze(cfg: AtlasConfig, site: Path, staging: Path, files: list[dict], digest: str, release_id: str,
           date: str) -> None:
    """Fill the staging folder (its bulk/ already written): copies of the data files, checked against the hashes
    just taken, the manifest and CITATION.cff."""
    data = [f for f in files if f["path"].startswith(f"{DATA}/")]
    with progress(total=len(data), desc="release copy", unit="file") as bar:
        for entry in data:
            source, target = site / entry["path"][len(DATA) + 1:], staging / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            content = source.read_bytes()
            if hashlib.sha256(content).hexdigest() != entry["sha256"]:
                raise AtlasError(f"{source} changed while it was being released; run `atlas release` again once "
                                 "nothing writes to the site")
            target.write_bytes(content)
            bar.update()
    manifest = {"kind": MANIFEST_KIND, "schema_version": MANIFEST_VERSION, "release": release_id, "date": date,
                "model": cfg.name, "site_url": cfg.site_url, "files_sha256": digest, "files": files}
    (staging / MANIFEST).write_bytes(manifest_bytes(manifest))
    (staging / CITATION).write_text(citation_cff(cfg, site, release_id, date), encoding="utf-8")


def manifest_bytes(manifest: dict) -> bytes:
    """The manifest as written: compact JSON with sorted keys, one line."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def kept_manifests(root: Path, model: str) -> list[dict]:
    """The manifest of every release of `model` in release_dir (which other atlases may share), newest first: by
    date, then by when its folder was made (its manifest's modification time: a day may see several releases)."""
    found = []
    for path in root.glob(f"*/{MANIFEST}") if root.is_dir() else []:
        if RELEASE_ID.match(path.parent.name):
            try:
                manifest, made = json.loads(path.read_text()), path.stat().st_mtime_ns
            except (OSError, ValueError):
                raise AtlasError(f"{path} is unreadable; delete {path.parent} (and its .tar.gz) or restore it "
                                 "from the archive") from None
            if manifest.get("model") == model:
                found.append((manifest["date"], made, manifest["release"], manifest))
    return [manifest for *_, manifest in sorted(found, key=lambda row: row[:3], reverse=True)]


def yaml_string(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is YAML's)."""
    return json.dumps(clean_text(text), ensure_ascii=False)


def citation_cff(cfg: AtlasConfig, site: Path, release_id: str, date: str) -> str:
    """CITATION.cff (CFF 1.2.0) of the release: the atlas as a dataset, version = the release id."""
    prov = json.loads((site / cfg.name / DATA / "atlas.json").read_text()).get("provenance", {})
    base = cfg.site_url.rstrip("/")
    abstract = (f"Release {release_id} of the Neuron Atlas of {prov.get('model', cfg.name)} on "
                f"{prov.get('dataset', 'its corpus')}: every unit's examples, feature clusters, token importance and "
                "polysemanticity metrics, and bulk Parquet files of every example; the manifest lists every data "
                "file with its sha256.")
    lines = ["cff-version: 1.2.0",
             f"message: {yaml_string('If you use this atlas, please cite this release of it.')}",
             "type: dataset",
             f"title: {yaml_string(f'Neuron Atlas: {cfg.name}')}",
             "authors:",
             f"  - name: {yaml_string(cfg.author or 'Neuron Atlas')}",
             f"version: {yaml_string(release_id)}",
             f"date-released: {yaml_string(date)}",
             f"url: {yaml_string(base + '/')}",
             f"abstract: {yaml_string(abstract)}",
             "identifiers:",
             "  - type: url",
             f"    value: {yaml_string(f'{base}/{RELEASES}/{release_id}/{MANIFEST}.gz')}",
             f"    description: {yaml_string('The release manifest: every data file with its size and sha256.')}"]
    return "\n".join(lines) + "\n"


def date_epoch(date: str) -> int:
    """Midnight UTC of the date, as Unix time: every archive entry's modification time."""
    return calendar.timegm(Date.fromisoformat(date).timetuple())


def write_archive(made: Release) -> None:
    """`{id}.tar.gz`: the release folder under the root folder `{id}/`, deterministic (entries sorted, modification
    time from the date, owner 0, fixed gzip header and level), so the same release gives the same bytes."""
    names = sorted(p.relative_to(made.folder).as_posix() for p in made.folder.rglob("*") if p.is_file())
    mtime = date_epoch(made.date)
    with atomic_path(made.archive) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime, compresslevel=GZIP_LEVEL) as packed, \
            tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as tar, \
            progress(total=len(names), desc="release archive", unit="file") as bar:
        for name in names:
            info = tarfile.TarInfo(f"{made.id}/{name}")
            info.size, info.mtime, info.mode = (made.folder / name).stat().st_size, mtime, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(made.folder / name, "rb") as handle:
                tar.addfile(info, handle)
            bar.update()


# ---------------------------------------------------------------------------------------------------------------
# The site


def location(cfg: AtlasConfig, release_id: str, name: str) -> str:
    """Where a release's file `name` (its archive, or `bulk` for its bulk folder) is published: under release_url
    with {release} replaced (GitHub release assets are flat), else relative to the folder the archive is
    extracted in."""
    if cfg.release_url:
        return cfg.release_url.replace("{release}", release_id).rstrip("/") + ("" if name == BULK else f"/{name}")
    return f"{release_id}/{BULK}" if name == BULK else name


def release_index(cfg: AtlasConfig, manifests: list[dict]) -> dict:
    return {"kind": INDEX_KIND, "schema_version": INDEX_VERSION, "model": cfg.name, "releases": [
        {"id": m["release"], "date": m["date"], "files": len(m["files"]), "bytes": sum(f["bytes"] for f in m["files"]),
         "files_sha256": m["files_sha256"], "manifest": f"{RELEASES}/{m['release']}/{MANIFEST}.gz",
         "archive": location(cfg, m["release"], f"{m['release']}.tar.gz"), "bulk": location(cfg, m["release"], BULK)}
        for m in manifests]}


def write_if_changed(path: Path, content: bytes, old: bytes | None = None) -> None:
    """Write `content` unless `path` already holds it (`old`: its bytes, when already read)."""
    if old is None:
        old = path.read_bytes() if path.is_file() else None
    if old != content:
        write_bytes(path, content)


def publish(cfg: AtlasConfig, made: Release, found: SiteFiles) -> None:
    """The release's files in the site (every kept release's manifest, the index, CITATION.cff), then the stamps,
    the home page last; only what differs is written."""
    site, root = Path(cfg.site_dir), Path(cfg.release_dir)
    manifests = kept_manifests(root, cfg.name)
    for manifest in manifests:
        content = (root / manifest["release"] / MANIFEST).read_bytes()
        write_if_changed(site / RELEASES / manifest["release"] / f"{MANIFEST}.gz",
                         gzip.compress(content, compresslevel=GZIP_LEVEL, mtime=0))
    index = dumps(release_index(cfg, manifests))
    write_if_changed(site / RELEASES / "index.json", index + b"\n")
    write_if_changed(site / RELEASES / f"index{FILE_COPY_SUFFIX}", js_wrapper("releases", index))
    write_if_changed(site / CITATION, (made.folder / CITATION).read_bytes())
    for leftover in found.leftovers:
        (site / leftover).unlink(missing_ok=True)
    values = {b"release": made.id.encode(), b"manifest": made.files_sha256.encode()}

    def stamp(match: re.Match) -> bytes:
        name = match.group(1)
        return b"<!--atlas:" + name + b"-->" + values[name] + b"<!--/atlas:" + name + b"-->"

    with progress(total=len(found.pages), desc="release stamp", unit="page") as bar:
        for page in found.pages:
            old = (site / page).read_bytes()
            write_if_changed(site / page, REGION.sub(stamp, old), old)
            bar.update()


def published_bytes(site: Path, model: str) -> int:
    """The published bytes of the model's folder and of the releases (not the MNIST atlas, static files, root
    pages)."""
    from builder.render.publish import site_bytes

    return site_bytes(site / model)[0] + site_bytes(site / RELEASES)[0]


# ---------------------------------------------------------------------------------------------------------------
# Verifying


def read_manifest(content: bytes, where: str) -> tuple[dict | None, list[str]]:
    """A manifest and the problems of its own consistency (kind, id against the file list's hash)."""
    try:
        manifest = json.loads(content)
    except ValueError:
        return None, [f"{where} is not JSON"]
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND or not isinstance(
            manifest.get("files"), list):
        return None, [f"{where} is not a release manifest"]
    digest = files_digest(manifest["files"])
    problems = []
    if manifest.get("files_sha256") != digest or not str(manifest.get("release", "")).endswith(digest[:ID_HEX]):
        problems.append(f"{where}: its release id and files_sha256 do not match its file list (sha256 {digest})")
    return manifest, problems


def compare(listed: dict[str, dict], found: dict[str, tuple[int, str]], where: str) -> list[str]:
    """Problems between a manifest's entries and the files found (path -> (bytes, sha256))."""
    problems = [f"{where}: {path} is missing" for path in sorted(set(listed) - set(found))]
    problems += [f"{where}: {path} is not in the manifest" for path in sorted(set(found) - set(listed))]
    for path in sorted(set(listed) & set(found)):
        size, sha = found[path]
        if (size, sha) != (listed[path]["bytes"], listed[path]["sha256"]):
            problems.append(f"{where}: {path} has {size} bytes and sha256 {sha}, the manifest says "
                            f"{listed[path]['bytes']} and {listed[path]['sha256']}")
    return problems


@dataclass(frozen=True)
class ReleaseFiles:
    """What a release archive or an extracted release folder holds."""

    where: str
    root: str | None  # the name of the folder holding it, which must be the release id (None: not checked)
    files: dict[str, tuple[int, str]]  # (bytes, sha256) of every file but the manifest and CITATION.cff
    manifest: bytes | None
    citation: bytes | None
    odd: tuple[str, ...]  # entries that are not plain files
    fix: str  # what to do about a problem

    def problems(self) -> list[str]:
        """Every problem against its own manifest: each file listed, present, of its size and sha256; nothing else
        but the manifest and CITATION.cff (naming the release); the id matching the file list's hash."""
        if self.manifest is None:
            return [f"{self.where} has no {MANIFEST}, so it is not a release that `atlas release` made; {self.fix}"]
        manifest, problems = read_manifest(self.manifest, f"{self.where}: {MANIFEST}")
        if manifest is not None:
            release_id = manifest.get("release")
            if self.root is not None and release_id != self.root:
                problems.append(f"{self.where}: its folder is {self.root!r} but its manifest names release "
                                f"{release_id!r}")
            if self.citation is None or f'version: "{release_id}"'.encode() not in self.citation:
                problems.append(f"{self.where}: {CITATION} is missing or does not name release {release_id}")
            problems += compare({f["path"]: f for f in manifest["files"]}, self.files, self.where)
        return [f"{self.where}: {name} is not a plain file" for name in self.odd] + [
            f"{problem}; {self.fix}" for problem in problems]

    @property
    def release(self) -> str:
        return json.loads(self.manifest)["release"]


def read_archive(path: Path) -> ReleaseFiles:
    """A release archive's contents, hashed in one pass over the whole compressed stream (to its end, so that gzip
    checks its CRC and length: tarfile stops reading at the archive's end blocks); AtlasError when it does not
    read as a .tar.gz."""
    path = Path(path)
    files: dict[str, tuple[int, str]] = {}
    named: dict[str, bytes] = {}
    roots, odd = set(), []
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as packed:
            with tarfile.open(fileobj=packed, mode="r|") as tar:
                for member in tar:
                    root, _, name = member.name.partition("/")
                    roots.add(root)
                    if member.isdir():
                        continue
                    if not member.isfile():
                        odd.append(member.name)
                    elif name in (MANIFEST, CITATION):
                        named[name] = tar.extractfile(member).read()
                    else:
                        files[name] = hash_stream(tar.extractfile(member))
            while packed.read(READ_BLOCK):
                pass
    except gzip.BadGzipFile as error:
        if not roots:
            raise AtlasError(f"{path} is not a .tar.gz archive ({error}); pass a release archive ({{id}}.tar.gz), "
                             "or download it again") from None
        raise AtlasError(f"{path} is corrupt ({error}); download it again") from None
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        raise AtlasError(f"{path} is corrupt ({error or type(error).__name__}); download it again") from None
    if len(roots) != 1:
        raise AtlasError(f"{path} must hold one folder named by the release id, not {sorted(roots)}; pass the "
                         "{id}.tar.gz that `atlas release` wrote, or download it again")
    return ReleaseFiles(str(path), roots.pop(), files, named.get(MANIFEST), named.get(CITATION), tuple(odd),
                        "the archive is damaged or altered: download it again")


def read_release_folder(folder: Path) -> ReleaseFiles:
    """An extracted archive's folder `{id}/` (or a release's folder in release_dir), every file hashed."""
    folder = Path(folder)
    files: dict[str, tuple[int, str]] = {}
    named: dict[str, bytes] = {}
    odd = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            odd.append(name)
        elif path.is_file():
            if name in (MANIFEST, CITATION):
                named[name] = path.read_bytes()
            else:
                files[name] = sha256_file(path)
    root = folder.resolve().name
    return ReleaseFiles(str(folder), root if RELEASE_ID.match(root) else None, files, named.get(MANIFEST),
                        named.get(CITATION), tuple(odd),
                        "a file was changed since the archive was extracted: extract it again, or download it again")


def verify_archive(path: Path) -> list[str]:
    """Every problem of a release archive against its own manifest (ReleaseFiles.problems), or the one that it does
    not read."""
    try:
        return read_archive(path).problems()
    except AtlasError as error:
        return [str(error)]


def verify_release_folder(folder: Path) -> list[str]:
    """Every problem of an extracted release folder against its own manifest."""
    return read_release_folder(folder).problems()


def stamped_release(page: Path) -> str | None:
    """The release a page's stamped region names (None without a region)."""
    match = re.search(rb"<!--atlas:release-->([^<]*)<!--/atlas:release-->", page.read_bytes())
    return match.group(1).decode() if match else None


def verify_site(site: Path) -> list[str]:
    """Every problem of a site against the release its home page names: rendered with a site_url, stamped with a
    release whose manifest it carries, every data file as that manifest lists it, no half-written file."""
    site = Path(site)
    if not (site / HOME).is_file():
        return [f"no rendered site at {site} (missing {site / HOME}); run `atlas build` first, or pass a release "
                "archive ({id}.tar.gz) or its extracted folder"]
    for manifest in sorted(site.glob(f"*/{DATA}/atlas.json")):
        if not json.loads(manifest.read_text()).get("site_url"):
            return [f"the site at {site} was rendered without site_url, and citations need absolute URLs; set "
                    "site_url in the config, then run `atlas build` and `atlas release`"]
    release_id = stamped_release(site / HOME)
    if release_id is None or not RELEASE_ID.match(release_id):
        return [f"the site at {site} is not a release (its pages say {release_id or 'nothing'} where the release "
                "belongs); run `atlas release --config FILE` first"]
    packed = site / RELEASES / release_id / f"{MANIFEST}.gz"
    try:
        content = gzip.decompress(packed.read_bytes())
    except (OSError, EOFError) as error:
        return [f"the site at {site} is stamped with release {release_id} but {packed} is unreadable ({error}); run "
                "`atlas release --config FILE` again"]
    manifest, problems = read_manifest(content, str(packed))
    problems = [f"{problem}; run `atlas release --config FILE` again" for problem in problems]
    if manifest is None:
        return problems
    found = site_files(site)
    problems += [f"{site}: {leftover} is left from an interrupted write; run `atlas release --config FILE` again"
                 for leftover in found.leftovers]
    listed = {f["path"][len(DATA) + 1:]: f for f in manifest["files"] if f["path"].startswith(f"{DATA}/")}
    hashed = {path: sha256_file(site / path) for path in found.data}
    return problems + [f"{problem}; its data is not release {release_id}'s: run `atlas release --config FILE`"
                       for problem in compare(listed, hashed, str(site))]


def verify(path: Path) -> str:
    """Check a release archive, an extracted release folder (it holds manifest.json) or a released site folder;
    the one line saying so, or AtlasError naming the first problem (and how many more there are)."""
    path = Path(path)
    if not path.exists():
        raise AtlasError(f"{path} does not exist; pass a release archive ({{id}}.tar.gz), its extracted folder or a "
                         "released site folder")
    if path.is_dir() and not (path / MANIFEST).is_file():
        problems, contents = verify_site(path), None
    else:
        contents = read_release_folder(path) if path.is_dir() else read_archive(path)
        problems = contents.problems()
    if problems:
        more = len(problems) - 1
        raise AtlasError(problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""))
    if contents is None:
        return f"{path}: release {stamped_release(path / HOME)}, every data file as its manifest lists it"
    return (f"{path}: release {contents.release}, {len(contents.files) + 2} files, every one as its manifest "
            "lists it")
