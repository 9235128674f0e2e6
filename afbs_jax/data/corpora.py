"""Text corpora for calibration and evaluation, each split train/validation/test by document.

`load_corpus(name)` returns a `Corpus` whose three splits are plain strings (documents joined with
blank lines), ready for a tokenizer. Splits are assigned by a fixed rule, never at random, so the
text a tuner calibrates on (train, validation) never overlaps the text perplexity is measured on
(test). Four sources: the bundled `sotu` corpus (U.S. State of the Union addresses, 1913-2021;
offline), the bundled `shakespeare` corpus (ten Shakespeare tragedies; offline, the cross-corpus set),
`wikitext2` (WikiText-2 raw from the Hugging Face hub; needs the network or a cached copy) and
`text:PATH` (a local .txt file or a directory of them). `afbs_jax/data/bundled/SOURCE.md` documents
the bundled files.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import json
import pathlib
import urllib.error
import urllib.request
from collections.abc import Sequence

from afbs_jax.errors import InputFileError, ShortInputError, UserInputError

CORPUS_NAMES = ("sotu", "shakespeare", "wikitext2", "text:PATH")
DOCUMENT_SEPARATOR = "\n\n"
# Per held-out split (validation and test each get this share of the documents).
SOTU_HELDOUT_FRACTION = 0.1
# Ten plays: 0.2 gives validation and test two plays each (0.1 would leave one play for test).
SHAKESPEARE_HELDOUT_FRACTION = 0.2
TEXT_HELDOUT_FRACTION = 0.05
# Fewer documents than this cannot give train, validation and test one document each.
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 3
HUB_PROBE_TIMEOUT_S = 5.0


class CorpusUnavailableError(UserInputError, RuntimeError):
  """A corpus that needs the network (or a local cache) could not be loaded; the user picks another."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One corpus's three disjoint splits, each its documents joined by `DOCUMENT_SEPARATOR`."""

  name: str
  train: str = dataclasses.field(repr=False)
  validation: str = dataclasses.field(repr=False)
  test: str = dataclasses.field(repr=False)

  def __repr__(self) -> str:
    sizes = ", ".join(f"{split}={len(getattr(self, split)):,} chars" for split in ("train", "validation", "test"))
    return f"Corpus(name={self.name!r}, {sizes})"


def load_corpus(name: str) -> Corpus:
  """Loads a corpus by name: "sotu", "shakespeare", "wikitext2" or "text:PATH".

  Raises:
    ValueError: `name` is not one of the allowed names.
    InputFileError: PATH is not a file or directory, holds no .txt file, or a file is empty, binary or
      not UTF-8 (the message names it).
    ShortInputError: the text is too short to split into train, validation and test.
    CorpusUnavailableError: "wikitext2" could neither be downloaded nor read from the local cache.
  """
  if name == "sotu":
    return _load_bundled("sotu", SOTU_HELDOUT_FRACTION)
  if name == "shakespeare":
    return _load_bundled("shakespeare", SHAKESPEARE_HELDOUT_FRACTION)
  if name == "wikitext2":
    return _load_wikitext2()
  if isinstance(name, str) and name.startswith("text:") and len(name) > len("text:"):
    return _load_text(pathlib.Path(name[len("text:"):]).expanduser())
  raise ValueError(f"load_corpus: name={name!r} is not a known corpus; allowed: {', '.join(CORPUS_NAMES)}")


def split_documents(documents: Sequence[str], heldout_fraction: float) -> tuple[list[str], list[str], list[str]]:
  """Assigns documents to (train, validation, test) by a fixed rule; order is kept within each split.

  Validation and test each get `max(1, round(n * heldout_fraction))` documents, taken at evenly
  spaced positions through the sequence (alternately test, then validation), so held-out text comes
  from the whole span of the corpus (for `sotu`: every era) rather than from one end of it.

  Args:
    documents: the corpus's documents in their canonical order; at least 3.
    heldout_fraction: share of the documents for each of validation and test, in (0, 1/3].
  """
  num_documents = len(documents)
  if not 0.0 < heldout_fraction <= 1 / 3:
    raise ValueError(f"split_documents: heldout_fraction={heldout_fraction} must be in (0, 1/3]")
  if num_documents < MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT:
    raise ValueError(f"split_documents: got {num_documents} documents; need at least {MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT}")
  num_per_split = max(1, round(num_documents * heldout_fraction))
  num_heldout = 2 * num_per_split
  heldout_positions = [int((slot + 0.5) * num_documents / num_heldout) for slot in range(num_heldout)]
  test_positions = set(heldout_positions[0::2])
  validation_positions = set(heldout_positions[1::2])
  splits = ([], [], [])
  for position, document in enumerate(documents):
    split = 1 if position in validation_positions else 2 if position in test_positions else 0
    splits[split].append(document)
  return splits


def split_characters(text: str, heldout_fraction: float) -> tuple[str, str, str]:
  """Splits one text into contiguous (train, validation, test) character ranges, in that order."""
  validation_start = int(len(text) * (1 - 2 * heldout_fraction))
  test_start = int(len(text) * (1 - heldout_fraction))
  splits = (text[:validation_start], text[validation_start:test_start], text[test_start:])
  if not all(split.strip() for split in splits):
    raise ShortInputError(f"a text of {len(text)} characters is too short to split into train/validation/test")
  return splits


@functools.lru_cache(maxsize=None)
def bundled_records(name: str) -> tuple[dict, ...]:
  """The records of the bundled corpus `afbs_jax/data/bundled/<name>.jsonl.gz`, in file order."""
  resource = importlib.resources.files("afbs_jax.data").joinpath("bundled", f"{name}.jsonl.gz")
  with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
    return tuple(json.loads(line) for line in lines)


def sotu_addresses() -> tuple[dict, ...]:
  """The bundled addresses in chronological order: dicts with id, year, president, party, text."""
  return bundled_records("sotu")


def shakespeare_plays() -> tuple[dict, ...]:
  """The bundled tragedies in the First Folio's order: dicts with id, title, source_url, text."""
  return bundled_records("shakespeare")


def _join(documents: Sequence[str]) -> str:
  return DOCUMENT_SEPARATOR.join(documents)


def _load_bundled(name: str, heldout_fraction: float) -> Corpus:
  """A bundled corpus, one document per record, split by `split_documents`."""
  texts = [record["text"] for record in bundled_records(name)]
  train, validation, test = split_documents(texts, heldout_fraction)
  return Corpus(name, _join(train), _join(validation), _join(test))


def _text_files(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(file for file in path.rglob("*.txt") if file.is_file())
    if files:
      return files
    raise InputFileError(f"load_corpus: directory {str(path)!r} holds no .txt files")
  raise InputFileError(f"load_corpus: text path {str(path)!r} is neither a file nor a directory")


def _read_text_file(file: pathlib.Path) -> str:
  """A file's text (universal newlines), or an InputFileError that names the file and what is wrong."""
  try:
    data = file.read_bytes()
  except OSError as e:
    raise InputFileError(f"load_corpus: {str(file)!r} cannot be read ({e.strerror})") from None
  if b"\0" in data:
    raise InputFileError(f"load_corpus: {str(file)!r} holds NUL bytes: binary (or UTF-16), not UTF-8 text")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputFileError(f"load_corpus: {str(file)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}); convert it, e.g. iconv -t UTF-8") from None
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _load_text(path: pathlib.Path) -> Corpus:
  """One document per file (sorted by path); a single document is split by character ranges."""
  files = _text_files(path)
  documents = [text.strip() for text in map(_read_text_file, files) if text.strip()]
  if not documents:
    what = "is empty (or only whitespace)" if path.is_file() else f"holds only empty .txt files ({len(files)})"
    raise InputFileError(f"load_corpus: {str(path)!r} {what}")
  if len(documents) < MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT:
    try:
      train, validation, test = split_characters(_join(documents), TEXT_HELDOUT_FRACTION)
    except ShortInputError as e:
      raise ShortInputError(f"load_corpus: {str(path)!r}: {e}") from None
  else:
    train, validation, test = (_join(split) for split in split_documents(documents, TEXT_HELDOUT_FRACTION))
  return Corpus(f"text:{path}", train, validation, test)


def hub_reachable(endpoint: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
  """One HEAD request; any HTTP answer counts as reachable (it is the connection that matters)."""
  try:
    urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
  except urllib.error.HTTPError:
    return True
  except (urllib.error.URLError, OSError, ValueError):
    return False
  return True


def _unavailable_message(reason: str) -> str:
  return (
      f"wikitext2 is unavailable: {reason}. Use the bundled offline corpus (load_corpus('sotu')) or a local "
      "text file or directory (load_corpus('text:PATH')); with a cached copy of WikiText-2, set "
      "HF_DATASETS_OFFLINE=1 to read it without the network."
  )


def _load_wikitext2() -> Corpus:
  import datasets  # pylint: disable=g-import-not-at-top
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  # Offline mode reads the local cache at once; online, a quick probe avoids datasets' retry loop
  # (tens of seconds) when the hub cannot be reached at all.
  endpoint = huggingface_hub.constants.ENDPOINT
  if not datasets.config.HF_HUB_OFFLINE and not hub_reachable(endpoint):
    raise CorpusUnavailableError(_unavailable_message(f"the Hugging Face hub ({endpoint}) cannot be reached"))
  try:
    splits = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
  except (ConnectionError, OSError, FileNotFoundError, ValueError) as error:
    raise CorpusUnavailableError(_unavailable_message(f"{type(error).__name__}: {error}")) from error
  # The standard Hugging Face perplexity recipe joins WikiText's lines with blank lines.
  joined = {split: _join(splits[split]["text"]) for split in ("train", "validation", "test")}
  return Corpus("wikitext2", joined["train"], joined["validation"], joined["test"])
