#!/usr/bin/env bash
# Every GPU result in results/, one step per results file, in the order the README's Measured section and
# results/REPORT.md use them. Run from the repository root after `bash scripts/setup.sh`:
#
#   bash scripts/reproduce_gpu.sh                       # every step
#   bash scripts/reproduce_gpu.sh pareto sfa_pretrain   # the named steps only
#   bash scripts/reproduce_gpu.sh --list                # the steps and their commands
#
# Steps that time kernels need the GPU to themselves: run one step at a time (this script does). Each step
# gets at most STEP_SECONDS (default 3600) and writes its log to outputs/reproduce/<step>.log; a step that
# fails or runs out of time does not stop the others. The experiments resume from their own JSON (a
# stopped step, run again, measures only what is missing) and share tuned checkpoints under
# WORK_DIR (default outputs/experiments): the first experiment that needs AFBS-BO at a band tunes it, the
# rest load it. The profile step needs Nsight Compute (`ncu`) on the PATH. The last step regenerates
# results/REPORT.md and the README's measured table from the JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK_DIR=${WORK_DIR:-outputs/experiments}
STEP_SECONDS=${STEP_SECONDS:-3600}
BAND_CHECKPOINT="$WORK_DIR/full_smollm2_sotu_afbs_eps0.045-0.055/checkpoint"  # the paper band's tuning

STEPS=(
  "mosaic_gpu_check|-m benchmarks.mosaic_gpu_check"
  "kernel_bench|-m benchmarks.kernel_bench --mode=full --seq_lens=8192,32768"
  "kernel_bench_64k|-m benchmarks.kernel_bench --mode=full --seq_lens=65536 --append --nocheck --reps=5"
  "kernel_bench_backward|-m benchmarks.kernel_bench --mode=full --backward --seq_lens=4096 --out=results/kernel_bench_backward.json"
  "kernel_profile|-m benchmarks.kernel_profile"
  "sfa_bench|-m benchmarks.sfa_bench"
  "tuner_bench|-m benchmarks.tuner_bench"
  "main_table|-m experiments.main_table --work_dir=$WORK_DIR"
  "prefill_bench|-m benchmarks.prefill_bench --densities_from=$BAND_CHECKPOINT"
  "model_throughput|-m benchmarks.model_throughput --seq_len=8192"
  "decode_bench|-m benchmarks.decode_bench"
  "local_floor|-m experiments.local_floor --work_dir=$WORK_DIR"
  "pareto|-m experiments.pareto --work_dir=$WORK_DIR"
  "stage_ablation|-m experiments.stage_ablation --work_dir=$WORK_DIR"
  "block_size|-m experiments.block_size --work_dir=$WORK_DIR"
  "context_length|-m experiments.context_length --work_dir=$WORK_DIR"
  "passkey|-m experiments.passkey --work_dir=$WORK_DIR"
  "fidelity_correlation|-m experiments.fidelity_correlation --work_dir=$WORK_DIR"
  "cross_corpus|-m experiments.cross_corpus --work_dir=$WORK_DIR"
  "frontier|-m experiments.frontier --work_dir=$WORK_DIR"
  "sfa_pretrain|-m experiments.sfa_pretrain"
  "report|-m experiments.report --update_readme"
)

names() { for step in "${STEPS[@]}"; do echo "${step%%|*}"; done; }

if [ "${1:-}" = "--list" ]; then
  for step in "${STEPS[@]}"; do printf '%-22s python %s\n' "${step%%|*}" "${step#*|}"; done
  exit 0
fi
for wanted in "$@"; do
  if ! names | grep -qx -- "$wanted"; then
    echo "unknown step '$wanted'; the steps are: $(names | tr '\n' ' ')" >&2
    exit 2
  fi
done

mkdir -p outputs/reproduce
failed=()
for step in "${STEPS[@]}"; do
  name=${step%%|*}
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx -- "$name"; then
    continue
  fi
  echo "$(date +%T) $name: python ${step#*|}"
  # shellcheck disable=SC2086  # the command's words are meant to split
  if timeout "$STEP_SECONDS" "$PYTHON" ${step#*|} > "outputs/reproduce/$name.log" 2>&1; then
    echo "$(date +%T) $name: done"
  else
    echo "$(date +%T) $name: FAILED or out of time (exit $?); see outputs/reproduce/$name.log"
    failed+=("$name")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "steps that did not finish: ${failed[*]}" >&2
  exit 1
fi
