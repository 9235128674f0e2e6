"""A local-window floor under SpargeAttn's predicted mask: AFBS-BO tuned with 0 … 16 recent key blocks kept.

    python -m experiments.local_floor            # SmolLM2-135M at 8K context on one GPU
    python -m experiments.local_floor --quick    # the tiny random model on CPU (a smoke run)

SpargeAttn keeps the blocks that pooled Q/K scores rank highest, plus (its tuned path) the sink column.
StreamingLLM keeps only the sink and a recent window, and at the same sparsity it costs SmolLM2 less
perplexity than AFBS-BO in the paper's band (results/main_table.json). `SpargeMethod(local_blocks=F)` keeps
each query block's F most recent key blocks on top of the predicted mask, so τ is spent on distant blocks
only. For each F this tunes every head in the paper's band [0.045, 0.055] and measures the block sparsity
and the perplexity on the VALIDATION split (never the test split, which the main table reports), and
chooses the floor: the sparsest F whose validation ΔPPL is at most that of F = 0 (so the choice is at least
as good as no floor on both axes), or 0. `experiments.main_table` and `experiments.pareto` read the choice
from results/local_floor.json and add AFBS-BO with that floor as `afbs_local`. The JSON is rewritten after
every floor, and a stopped run resumes.
"""

from __future__ import annotations

from typing import Any

from absl import app

from experiments import common

FLOORS = {"quick": (0, 2), "full": (0, 2, 4, 8, 16)}


def run(setting: common.Setting, *, results_dir: str, work_dir: str, backend: str = "auto",
        model_path: str | None = None) -> dict[str, Any]:
  bench = common.Workbench(setting, work_dir=work_dir, backend=backend, model_path=model_path)
  tokens = bench.tokens_of(bench.corpus.validation)
  dense_ppl = bench.perplexity(tokens=tokens)
  previous = common.read_results("local_floor", results_dir=results_dir, setting=setting)
  resumable = previous is not None and previous.get("dense_ppl") == dense_ppl
  rows = list(previous["rows"]) if resumable else []
  floors = FLOORS.get(setting.name, FLOORS["quick"])
  for floor in (None, *(f for f in floors if f not in {row["local_blocks"] for row in rows})):
    if floor is not None:
      tuned = bench.tune(common.PAPER_BAND, **tuned_variant(floor))
      policy = bench.tuned_policy(tuned)
      ppl = bench.perplexity(policy, tokens=tokens)
      rows.append({"local_blocks": floor, "calibration_sparsity": float(tuned.sparsity.mean()),
                   "worst_validation_error": float(tuned.error.max()),
                   "sparsity": bench.sparsity(policy, tokens=tokens)["sparsity"], "ppl": ppl,
                   "delta_ppl_percent": 100.0 * (ppl / dense_ppl - 1.0)})
      rows.sort(key=lambda row: row["local_blocks"])
    payload = {"band": list(common.PAPER_BAND), "split": "validation", "eval_tokens": int(tokens.size),
               "dense_ppl": dense_ppl, "rows": rows, "chosen": choose(rows),
               "complete": all(f in {row["local_blocks"] for row in rows} for f in floors)}
    common.write_results("local_floor", payload, render(payload), results_dir=results_dir, setting=setting,
                         figure=(lambda path: plot(payload, path)) if payload["complete"] else None)
  return payload


def tuned_variant(floor: int) -> dict[str, int]:
  """`Workbench.tune` overrides for a floor: none for 0, so the plain checkpoint is shared with others."""
  return {"local_blocks": floor} if floor else {}


def choose(rows: list[dict[str, Any]]) -> int:
  """The sparsest floor whose validation ΔPPL is at most no floor's; 0 when none is (or nothing measured)."""
  plain = next((row for row in rows if row["local_blocks"] == 0), None)
  if plain is None:
    return 0
  fit = [row for row in rows if row["delta_ppl_percent"] <= plain["delta_ppl_percent"]]
  return max(fit, key=lambda row: (row["sparsity"], -row["local_blocks"]))["local_blocks"]


def chosen_floor(results_dir: str, setting: common.Setting) -> int | None:
  """The floor a finished run of this setting chose, or None (no run, another setting, or unfinished)."""
  payload = common.read_results("local_floor", results_dir=results_dir, setting=setting)
  return payload["chosen"] if payload is not None and payload.get("complete") else None


def render(payload: dict[str, Any]) -> str:
  table = common.markdown_table(
      ["local blocks", "sparsity (validation)", "calibration sparsity", "worst val. error", "PPL", "ΔPPL %"],
      [[row["local_blocks"], row["sparsity"], row["calibration_sparsity"], row["worst_validation_error"],
        row["ppl"], row["delta_ppl_percent"]] for row in payload["rows"]])
  return (f"{table}\n\nAFBS-BO in band {payload['band']} with each floor; sparsity and perplexity on the "
          f"{payload['split']} split ({payload['eval_tokens']:,} tokens, dense PPL {payload['dense_ppl']:.3f}). "
          f"Chosen floor: {payload['chosen']} key blocks (the sparsest floor whose validation ΔPPL is at most "
          "that of no floor)." + ("" if payload["complete"] else " Partial run: rerun to measure the rest."))


def discuss(payload: dict[str, Any]) -> str:
  rows = {row["local_blocks"]: row for row in payload["rows"]}
  plain, chosen = rows.get(0), rows.get(payload["chosen"])
  if plain is None or chosen is None or payload["chosen"] == 0:
    return "No floor beat SpargeAttn's own mask on both sparsity and validation perplexity; the tables use none."
  return (f"A floor of {payload['chosen']} recent key blocks moves AFBS-BO from {plain['sparsity']:.1%} sparsity "
          f"at ΔPPL {plain['delta_ppl_percent']:+.2f}% to {chosen['sparsity']:.1%} at "
          f"{chosen['delta_ppl_percent']:+.2f}% on the validation split, in the same per-head error band.")


def plot(payload: dict[str, Any], path: str) -> None:
  figure, axes = common.new_figure()
  for row in payload["rows"]:
    axes.scatter(row["sparsity"], row["delta_ppl_percent"], color="crimson" if row["local_blocks"] ==
                 payload["chosen"] else "grey")
    axes.annotate(str(row["local_blocks"]), (row["sparsity"], row["delta_ppl_percent"]), fontsize=8,
                  xytext=(4, 4), textcoords="offset points")
  axes.set_xlabel("block sparsity (validation)")
  axes.set_ylabel("ΔPPL % vs dense (validation)")
  axes.set_title("AFBS-BO with a local-window floor (labels: key blocks)", fontsize=10)
  common.save_figure(figure, path)


main = common.main_for(run, render, discuss)


if __name__ == "__main__":
  app.run(main)
