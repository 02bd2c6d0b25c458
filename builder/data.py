"""Reading the corpus and packing it into fixed-length token sequences.

Documents are streamed with `datasets` (a hub name, or local .txt/.jsonl files), tokenised without special tokens,
joined with the model's EOS token and cut into sequences of `context_length` tokens. With `prepend_bos` every sequence
starts with the BOS token followed by `context_length - 1` corpus tokens. The last partial sequence is dropped. What
was done is recorded in the collect artefact so pages can say exactly what the model saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from jaxtyping import Int

from builder.config import AtlasConfig
from builder.errors import DatasetError

log = logging.getLogger(__name__)


DATA_SUFFIXES = (".txt", ".jsonl", ".json")
MESSAGE_CHARS = 160  # how much of a library's error message a one-line error quotes
# A document is tokenised in pieces of at most this many characters, cut before a space, so memory stays bounded
# whatever a document's length (and packing can stop at max_sequences inside one huge document). Byte-level BPE
# pre-tokenisers start a word at its leading space, so such a cut does not change the tokens.
DOCUMENT_PIECE_CHARS = 1 << 20


@dataclass(frozen=True)
class PackingSpec:
    context_length: int
    bos_token_id: int | None
    separator_token_id: int | None


def iter_documents(cfg: AtlasConfig) -> Iterator[str]:
    """Yield up to max_documents document texts in corpus order."""
    import datasets

    datasets.disable_progress_bars()
    if cfg.data_files:
        missing = [f for f in cfg.data_files if not Path(f).is_file()]
        if missing:
            raise DatasetError(f"data file {missing[0]!r} does not exist; run `make data` or fix data_files")
        for f in cfg.data_files:
            if Path(f).suffix not in DATA_SUFFIXES:
                raise DatasetError(f"data file {f!r} is neither .txt nor .jsonl (or .json); give text files (one "
                                   "document per line) or .jsonl files with a text field")
        suffixes = {Path(f).suffix for f in cfg.data_files}
        if len(suffixes) != 1:
            raise DatasetError(f"data_files must all be .txt or all .jsonl, got {sorted(suffixes)!r}; convert them "
                               "to one format")
        if all(Path(f).stat().st_size == 0 for f in cfg.data_files):
            return  # datasets' json reader fails on empty files; empty means no documents
        if suffixes == {".txt"}:
            # Undecodable bytes become U+FFFD rather than stopping the build: corpus text is untrusted anyway.
            stream = datasets.load_dataset("text", data_files=list(cfg.data_files), split="train", streaming=True,
                                           encoding_errors="replace")
        else:
            stream = datasets.load_dataset("json", data_files=list(cfg.data_files), split="train", streaming=True)
    else:
        try:
            stream = datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, split=cfg.dataset_split,
                                           streaming=True)
        except Exception as error:  # datasets raises many unrelated types for "cannot find or reach it"
            reason = str(error).splitlines()[0][:MESSAGE_CHARS]
            raise DatasetError(f"cannot open dataset {cfg.dataset!r} ({reason}); check the name and network, or use "
                               "data_files for local text") from None
    count = 0
    try:
        for record in stream:
            if count >= cfg.max_documents:
                break
            if cfg.text_field not in record:
                raise DatasetError(f"dataset records have no field {cfg.text_field!r} (fields: "
                                   f"{sorted(record)!r}); set text_field")
            count += 1
            yield record[cfg.text_field]
    except (ValueError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0][:MESSAGE_CHARS]
        raise DatasetError(f"cannot read the dataset ({reason}); check the file format") from None


def pack_sequences(documents: Iterator[list[int] | Iterable[list[int]]], spec: PackingSpec, max_sequences: int = 0
                   ) -> Int[np.ndarray, "n_sequences context_length"]:
    """Join documents' tokens with the separator and cut into rows of context_length (BOS first when set). A
    document is a token list, or an iterable of token lists (its pieces, joined without a separator)."""
    body = spec.context_length - (1 if spec.bos_token_id is not None else 0)
    rows: list[np.ndarray] = []
    buffer: list[int] = []
    started = False
    for document in documents:
        pieces = [document] if isinstance(document, list) else document
        separated = False
        for tokens in pieces:
            if not tokens:
                continue
            if started and not separated and spec.separator_token_id is not None:
                buffer.append(spec.separator_token_id)
            started = separated = True
            buffer.extend(tokens)
            while len(buffer) >= body:
                chunk, buffer = buffer[:body], buffer[body:]
                if spec.bos_token_id is not None:
                    chunk = [spec.bos_token_id] + chunk
                rows.append(np.asarray(chunk, dtype=np.int32))
                if max_sequences and len(rows) >= max_sequences:
                    return np.stack(rows)
    if not rows:
        return np.zeros((0, spec.context_length), dtype=np.int32)
    return np.stack(rows)


def text_pieces(text: str, limit: int) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` characters, each cut before a space where there is one."""
    start = 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + 1, start + limit)
        cut = cut if cut > start else start + limit
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenise_corpus(cfg: AtlasConfig, tokenizer) -> tuple[np.ndarray, dict]:
    """Tokenise the configured corpus into packed sequences; returns the token array and what was done."""
    bos = tokenizer.bos_token_id if cfg.prepend_bos else None
    if cfg.prepend_bos and bos is None:
        raise DatasetError("prepend_bos is set but the tokenizer has no BOS token; set prepend_bos = false")
    separator = tokenizer.eos_token_id
    spec = PackingSpec(cfg.context_length, bos, separator)
    n_documents = 0

    def pieces(text: str) -> Iterator[list[int]]:
        for piece in text_pieces(text, DOCUMENT_PIECE_CHARS):
            yield tokenizer(piece, add_special_tokens=False)["input_ids"]

    def documents() -> Iterator[Iterator[list[int]]]:
        nonlocal n_documents
        for text in iter_documents(cfg):
            n_documents += 1
            if isinstance(text, str) and text.strip():
                yield pieces(text)

    tokens = pack_sequences(documents(), spec, cfg.max_sequences)
    if len(tokens) == 0:
        source = cfg.data_files or cfg.dataset
        raise DatasetError(f"the dataset {source!r} gave no complete sequence of {cfg.context_length} tokens "
                           f"({n_documents} documents, all empty or too short); add text or lower context_length")
    packing = {"bos_token_id": bos, "separator_token_id": separator, "n_documents": n_documents,
               "dropped_partial_sequence": True}
    log.info("packed %d documents into %d sequences of %d tokens", n_documents, len(tokens), cfg.context_length)
    return tokens, packing
