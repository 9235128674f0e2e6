"""Tests for afbs_jax.data: fixed, disjoint splits for every corpus source and clear errors."""

from __future__ import annotations

import pathlib

import datasets
import huggingface_hub
import pytest

from afbs_jax import data
from afbs_jax.data import corpora

SPLITS = ("train", "validation", "test")


def _documents(text: str) -> list[str]:
  return text.split(corpora.DOCUMENT_SEPARATOR)


def test_sotu_splits_partition_the_addresses_without_overlap():
  corpus = data.load_corpus("sotu")
  addresses = [address["text"] for address in data.sotu_addresses()]
  per_split = {split: _documents(getattr(corpus, split)) for split in SPLITS}
  assert [len(per_split[split]) for split in SPLITS] == [88, 11, 11]
  for first, second in (("train", "validation"), ("train", "test"), ("validation", "test")):
    assert not set(per_split[first]) & set(per_split[second]), (first, second)
  assert sorted(sum(per_split.values(), [])) == sorted(addresses)
  # Addresses are single paragraphs, so the blank-line separator recovers documents exactly.
  assert not any(corpora.DOCUMENT_SEPARATOR in address for address in addresses)


def test_sotu_assignment_is_fixed():
  addresses = data.sotu_addresses()
  _, validation, test = data.split_documents(addresses, corpora.SOTU_HELDOUT_FRACTION)
  assert [address["year"] for address in test] == [1915, 1925, 1936, 1946, 1955, 1964, 1974, 1984, 1994, 2004, 2014]
  assert [address["year"] for address in validation] == [1920, 1930, 1941, 1951, 1960, 1969, 1979, 1989, 1999, 2009, 2019]
  first = data.load_corpus("sotu")
  corpora.bundled_records.cache_clear()
  second = data.load_corpus("sotu")
  assert first == second
  assert first.test.startswith(test[0]["text"])
  assert len(addresses) == 110 and addresses[0]["year"] == 1913 and addresses[-1]["year"] == 2021


@pytest.mark.parametrize("num_documents, fraction, expected_heldout", [(3, 0.05, 1), (20, 0.05, 1), (57, 0.05, 3), (110, 0.1, 11), (9, 1 / 3, 3)])
def test_split_documents_sizes_order_and_coverage(num_documents, fraction, expected_heldout):
  documents = [f"doc{i}" for i in range(num_documents)]
  train, validation, test = data.split_documents(documents, fraction)
  assert len(validation) == len(test) == expected_heldout
  assert len(train) == num_documents - 2 * expected_heldout
  assert sorted(train + validation + test) == sorted(documents)
  for split in (train, validation, test):
    assert split == sorted(split, key=documents.index)


@pytest.mark.parametrize("num_documents, fraction, message", [(2, 0.05, "at least 3"), (10, 0.0, "heldout_fraction"), (10, 0.5, "heldout_fraction")])
def test_split_documents_rejects_bad_arguments(num_documents, fraction, message):
  with pytest.raises(ValueError, match=message):
    data.split_documents([f"doc{i}" for i in range(num_documents)], fraction)


def test_split_characters_is_contiguous_90_5_5():
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  train, validation, test = data.split_characters(text, 0.05)
  assert (len(train), len(validation), len(test)) == (900, 50, 50)
  assert train + validation + test == text
  with pytest.raises(ValueError, match="too short"):
    data.split_characters("tiny", 0.05)


def _write_documents(directory: pathlib.Path, count: int) -> list[str]:
  texts = [f"Document number {i}.\nIt has two lines about topic {i * 7}." for i in range(count)]
  for i, text in enumerate(texts):
    (directory / f"part_{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
  return texts


def test_text_directory_splits_by_document(tmp_path):
  texts = _write_documents(tmp_path, 40)
  (tmp_path / "notes.md").write_text("not a .txt file, ignored", encoding="utf-8")
  corpus = data.load_corpus(f"text:{tmp_path}")
  assert corpus.name == f"text:{tmp_path}"
  per_split = [_documents(getattr(corpus, split)) for split in SPLITS]
  assert [len(split) for split in per_split] == [36, 2, 2]
  assert sorted(sum(per_split, [])) == sorted(texts)
  assert corpus == data.load_corpus(f"text:{tmp_path}")


def test_text_single_file_splits_by_character_range(tmp_path):
  path = tmp_path / "book.txt"
  text = " ".join(f"word{i}" for i in range(400))
  path.write_text(text, encoding="utf-8")
  corpus = data.load_corpus(f"text:{path}")
  assert corpus.train + corpus.validation + corpus.test == text
  assert len(corpus.test) == len(text) - int(len(text) * 0.95)


@pytest.mark.parametrize("name, message", [
    ("imagenet", "allowed: sotu, shakespeare, wikitext2, text:PATH"),
    ("text:", "allowed: sotu, shakespeare, wikitext2, text:PATH"),
    ("text:/nonexistent/corpus", "neither a file nor a directory"),
])
def test_bad_names_raise_value_error(name, message):
  with pytest.raises(ValueError, match=message):
    data.load_corpus(name)


def test_text_directory_without_txt_files_raises(tmp_path):
  with pytest.raises(ValueError, match="no .txt files"):
    data.load_corpus(f"text:{tmp_path}")


@pytest.fixture
def empty_hf_caches(tmp_path, monkeypatch):
  """Points every Hugging Face cache at an empty directory, so a cached WikiText cannot be found."""
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
  monkeypatch.setattr(datasets.config, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_wikitext2_offline_mode_names_the_offline_corpora(empty_hf_caches, monkeypatch):
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(data.CorpusUnavailableError, match=r"load_corpus\('sotu'\).*text:PATH"):
    data.load_corpus("wikitext2")


def test_wikitext2_unreachable_hub_fails_fast(empty_hf_caches, monkeypatch):
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
  # Port 9 (discard) on the loopback interface refuses the connection at once.
  monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
  with pytest.raises(data.CorpusUnavailableError, match=r"127\.0\.0\.1:9\) cannot be reached.*load_corpus\('sotu'\)"):
    data.load_corpus("wikitext2")


def test_shakespeare_splits_are_disjoint_plays_large_enough_for_smollm2():
  corpus = data.load_corpus("shakespeare")
  assert corpus.test.startswith("THE TRAGEDY OF TITUS ANDRONICUS") and "HAMLET, PRINCE OF DENMARK" in corpus.test
  assert corpus.validation.startswith("THE LIFE OF TIMON OF ATHENS") and "OTHELLO" in corpus.validation
  assert "HAMLET, PRINCE OF DENMARK" not in corpus.train and "OTHELLO, THE MOOR" not in corpus.train
  # ~3.3 characters per SmolLM2 token on this text: >= 16K test and >= 60K training tokens, with room.
  assert len(corpus.test) > 200_000 and len(corpus.train) > 600_000
