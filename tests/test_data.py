"""Reading the corpus and packing it into fixed-length sequences."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from builder.config import config_from_dict
from builder.data import PackingSpec, iter_documents, pack_sequences, tokenise_corpus
from builder.errors import DatasetError
from conftest import CORPUS_PARAGRAPHS, expect_error, write_jsonl

BOS, SEP = 1000, 2000


def reference_packing(docs: list[list[int]], context_length: int, bos, sep, max_sequences=0) -> np.ndarray:
    """Join the non-empty documents with the separator, cut into bodies of context_length (−1 with BOS), drop the
    partial tail, put BOS first, keep at most max_sequences."""
    stream: list[int] = []
    for doc in (d for d in docs if d):
        if stream and sep is not None:
            stream.append(sep)
        stream.extend(doc)
    body = context_length - (bos is not None)
    rows = [([bos] if bos is not None else []) + stream[i:i + body]
            for i in range(0, len(stream) - body + 1, body)]
    if max_sequences:
        rows = rows[:max_sequences]
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), context_length)


def test_pack_sequences_puts_bos_first_and_separators_between_documents():
    docs = [[1, 2], [3, 4, 5, 6], [7, 8], [9, 10, 11]]
    rows = pack_sequences(iter(docs), PackingSpec(4, BOS, SEP))
    # Stream: 1 2 S 3 4 5 6 S 7 8 S 9 10 11 → bodies of 3: [1 2 S] [3 4 5] [6 S 7] [8 S 9]; the tail [10 11] is
    # dropped.
    assert rows.tolist() == [[BOS, 1, 2, SEP], [BOS, 3, 4, 5], [BOS, 6, SEP, 7], [BOS, 8, SEP, 9]]
    assert rows.dtype == np.int32


def test_pack_sequences_keeps_the_separator_when_a_document_ends_exactly_at_a_row_end():
    """Documents are joined with the separator and then cut: a document that happens to fill a row exactly must
    still be separated from the next one (here the separator opens the second row)."""
    rows = pack_sequences(iter([[1, 2, 3], [4, 5], [6, 7, 8]]), PackingSpec(4, BOS, SEP))
    # Stream: 1 2 3 S 4 5 S 6 7 8 → [1 2 3] [S 4 5] [S 6 7]; the tail [8] is dropped.
    assert rows.tolist() == [[BOS, 1, 2, 3], [BOS, SEP, 4, 5], [BOS, SEP, 6, 7]], (
        "pack_sequences drops the separator after a document that ended exactly at a row boundary")


def test_pack_sequences_drops_the_partial_last_sequence():
    rows = pack_sequences(iter([[1, 2, 3, 4, 5, 6, 7]]), PackingSpec(4, BOS, SEP))
    assert rows.tolist() == [[BOS, 1, 2, 3], [BOS, 4, 5, 6]]  # token 7 alone cannot fill a sequence


def test_pack_sequences_honours_max_sequences():
    docs = [list(range(100))]
    rows = pack_sequences(iter(docs), PackingSpec(5, BOS, SEP), max_sequences=3)
    assert rows.tolist() == [[BOS, 0, 1, 2, 3], [BOS, 4, 5, 6, 7], [BOS, 8, 9, 10, 11]]


def test_pack_sequences_stops_reading_documents_once_max_sequences_are_packed():
    read = []

    def docs():
        for i in range(1000):
            read.append(i)
            yield [i] * 10

    pack_sequences(docs(), PackingSpec(6, BOS, SEP), max_sequences=2)
    assert len(read) <= 2


def test_pack_sequences_skips_empty_documents_without_doubling_separators():
    rows = pack_sequences(iter([[], [1, 2], [], [], [3, 4], []]), PackingSpec(6, BOS, SEP))
    assert rows.tolist() == [[BOS, 1, 2, SEP, 3, 4]]


def test_pack_sequences_without_bos_uses_the_whole_row_for_text():
    rows = pack_sequences(iter([[1, 2, 3], [4, 5, 6, 7]]), PackingSpec(4, None, SEP))
    assert rows.tolist() == [[1, 2, 3, SEP], [4, 5, 6, 7]]


def test_pack_sequences_without_separator_concatenates_documents():
    rows = pack_sequences(iter([[1, 2], [3, 4], [5, 6]]), PackingSpec(4, BOS, None))
    assert rows.tolist() == [[BOS, 1, 2, 3], [BOS, 4, 5, 6]]


def test_pack_sequences_of_too_little_text_is_empty_with_the_row_width():
    rows = pack_sequences(iter([[1, 2]]), PackingSpec(8, BOS, SEP))
    assert rows.shape == (0, 8)


@pytest.mark.parametrize("seed", range(8))
def test_pack_sequences_matches_the_reference_packing(seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50, size=rng.integers(0, 30)).tolist() for _ in range(rng.integers(1, 15))]
    context = int(rng.integers(2, 12))
    bos = BOS if seed % 2 == 0 else None
    sep = SEP if seed % 3 else None
    limit = int(rng.integers(0, 4))
    rows = pack_sequences(iter(docs), PackingSpec(context, bos, sep), max_sequences=limit)
    np.testing.assert_array_equal(rows, reference_packing(docs, context, bos, sep, limit))
    assert rows.shape[1] == context


# --------------------------------------------------------------------------------------------------------------------
# iter_documents


def data_cfg(*files, **overrides):
    return config_from_dict({"data_files": [str(f) for f in files], **overrides})


def test_jsonl_documents_are_read_in_order_up_to_max_documents(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [f"document {i}" for i in range(10)])
    assert list(iter_documents(data_cfg(path))) == [f"document {i}" for i in range(10)]
    assert list(iter_documents(data_cfg(path, max_documents=3))) == ["document 0", "document 1", "document 2"]


def test_txt_files_give_one_document_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first line\nsecond line\nthird line\n")
    assert list(iter_documents(data_cfg(path))) == ["first line", "second line", "third line"]


def test_text_field_selects_the_record_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": f"b{i}", "text": f"t{i}"}) + "\n" for i in range(3)))
    assert list(iter_documents(data_cfg(path, text_field="body"))) == ["b0", "b1", "b2"]


def test_missing_text_field_is_a_dataset_error_listing_the_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"no field 'text' \(fields: \['body'\]\)"):
        list(iter_documents(data_cfg(path)))


def test_missing_data_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list(iter_documents(data_cfg(tmp_path / "absent.jsonl")))


def test_mixed_file_types_are_a_dataset_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    b = tmp_path / "b.txt"
    b.write_text("y\n")
    with pytest.raises(DatasetError, match=r"must all be \.txt or all \.jsonl"):
        list(iter_documents(data_cfg(a, b)))


def test_malformed_jsonl_is_a_dataset_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "unterminated"\n')
    with pytest.raises(DatasetError, match="check the file format"):
        list(iter_documents(data_cfg(path)))


def test_unreachable_hub_dataset_is_a_dataset_error():
    with pytest.raises(DatasetError, match="cannot open dataset 'no-such-owner/no-such-dataset'"):
        list(iter_documents(config_from_dict({"dataset": "no-such-owner/no-such-dataset"})))


# --------------------------------------------------------------------------------------------------------------------
# tokenise_corpus


def test_tokenise_corpus_packs_the_tokenised_documents(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", CORPUS_PARAGRAPHS[:6])
    cfg = data_cfg(path, context_length=20)
    tokens, packing = tokenise_corpus(cfg, tokenizer)
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in CORPUS_PARAGRAPHS[:6]]
    np.testing.assert_array_equal(tokens, reference_packing(docs, 20, tokenizer.bos_token_id,
                                                            tokenizer.eos_token_id))
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert packing == {"bos_token_id": tokenizer.bos_token_id, "separator_token_id": tokenizer.eos_token_id,
                       "n_documents": 6, "dropped_partial_sequence": True}
    # The separator appears exactly between documents: 5 joins, minus any that fell in the dropped tail.
    assert (tokens == tokenizer.eos_token_id).sum() <= 5


def test_tokenise_corpus_without_bos_starts_rows_with_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", CORPUS_PARAGRAPHS[:2])
    tokens, packing = tokenise_corpus(data_cfg(path, context_length=16, prepend_bos=False), tokenizer)
    first = tokenizer(CORPUS_PARAGRAPHS[0], add_special_tokens=False)["input_ids"]
    assert tokens[0].tolist() == first[:16]
    assert packing["bos_token_id"] is None


def test_tokenise_corpus_honours_max_sequences(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", CORPUS_PARAGRAPHS)
    tokens, _ = tokenise_corpus(data_cfg(path, context_length=16, max_sequences=5), tokenizer)
    assert tokens.shape == (5, 16)


def test_tokenise_corpus_requires_a_bos_token_when_prepend_bos_is_set(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["some text"])
    no_bos = SimpleNamespace(bos_token_id=None, eos_token_id=0)
    with pytest.raises(DatasetError, match="prepend_bos = false"):
        tokenise_corpus(data_cfg(path), no_bos)


def test_documents_too_short_for_one_sequence_are_a_dataset_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", ["A few words.", "And a few more."])
    with pytest.raises(DatasetError, match="no complete sequence of 64 tokens"):
        tokenise_corpus(data_cfg(path, context_length=64), tokenizer)


BLANK_RECORDS = json.dumps({"text": "   "}) + "\n" + json.dumps({"text": ""}) + "\n"


@pytest.mark.parametrize("content", ["   \n\n \t \n", BLANK_RECORDS], ids=["whitespace-lines", "blank-texts"])
def test_whitespace_only_dataset_is_a_dataset_error(tmp_path, tokenizer, content):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="no complete sequence"):
        tokenise_corpus(data_cfg(path, context_length=16), tokenizer)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_empty_data_file_is_a_dataset_error(tmp_path, tokenizer, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("")
    message = expect_error(DatasetError, lambda: tokenise_corpus(data_cfg(path, context_length=16), tokenizer))
    assert "empty" in message or "no complete sequence" in message


# --------------------------------------------------------------------------------------------------------------------
# Bad input found by trying the CLI as a user would


def test_a_binary_file_as_data_is_named_in_one_line(tmp_path):
    binary = tmp_path / "ls"
    binary.write_bytes(bytes(range(256)) * 4)
    message = expect_error(DatasetError, lambda: list(iter_documents(data_cfg(binary))), str(binary),
                           "neither .txt nor .jsonl")
    assert "''" not in message


@pytest.mark.parametrize("text, limit", [("one two three four five six", 7), ("x" * 50, 8), ("a b", 100),
                                         (" lead and  double  spaces ", 5)])
def test_text_pieces_join_back_to_the_text_and_respect_the_limit(text, limit):
    from builder.data import text_pieces

    pieces = list(text_pieces(text, limit))
    assert "".join(pieces) == text
    assert all(0 < len(piece) <= limit for piece in pieces)
    # cut before a space wherever the previous piece had one to cut at
    assert all(piece.startswith(" ") or " " not in previous[1:] for previous, piece in zip(pieces, pieces[1:]))


def test_tokenising_in_pieces_gives_the_tokens_of_the_whole_document(tmp_path, tokenizer, monkeypatch):
    import builder.data

    text = " ".join(CORPUS_PARAGRAPHS)
    path = write_jsonl(tmp_path / "c.jsonl", [text])
    whole, _ = tokenise_corpus(data_cfg(path, context_length=16), tokenizer)
    monkeypatch.setattr(builder.data, "DOCUMENT_PIECE_CHARS", 200)
    pieces, _ = tokenise_corpus(data_cfg(path, context_length=16), tokenizer)
    np.testing.assert_array_equal(pieces, whole)


def test_one_huge_line_is_tokenised_in_bounded_memory_and_stops_at_max_sequences(tmp_path,
                                                                                   embedded_folder):
    """A 60 MB single-line document with max_sequences: memory must not grow with the line (it grew without bound
    when the whole line went to the tokenizer)."""
    import os
    import subprocess
    import sys

    huge = tmp_path / "huge.txt"
    with open(huge, "w") as handle:
        for _ in range(60):
            handle.write("the whale swam under the grey sea " * 30_000)
        handle.write("\n")
    script = f"""
import resource, sys
from transformers import AutoTokenizer
from builder.config import config_from_dict
from builder.data import tokenise_corpus
from conftest import ROOT
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens, _ = tokenise_corpus(config_from_dict({{"data_files": [{str(huge)!r}], "context_length": 64,
                                              "max_sequences": 200}}), tokenizer)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(tokens.shape[0], round(grown))
"""
    from conftest import ROOT

    done = subprocess.run([sys.executable, "-c", script, str(embedded_folder)], cwd=ROOT / "tests",
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    rows, grown_mb = map(int, done.stdout.split())
    assert rows == 200
    assert grown_mb < 1200, f"tokenising grew memory by {grown_mb} MB"
