#!/usr/bin/env bash
# bash slurm/generate_r1_traces.sh "Qwen/Qwen2.5-72B-Instruct" [N] [key=value ...]
#
# R1-style GSM8K traces from a teacher on one node. Run it with bash: it asks exit-loop how many
# GPUs the model needs (tensor parallel size = GPU count) and submits itself with sbatch. Or
# submit it directly and choose the GPUs: sbatch --gpus-per-node=8 slurm/generate_r1_traces.sh MODEL [N]
# Overrides: GPUS=8 (GPU count), TP=4 (tensor parallel size), PARTITION=..., TIME=..., and any
# config key after N (e.g. sample.num_samples=4 output_dir=data/gsm8k_72b).
# N omitted or "all": every training question. Re-running resumes where a job stopped; --requeue
# lets SLURM restart a preempted job, which then resumes the same way.
#SBATCH --job-name=r1-traces
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

MODEL=${1:?usage: generate_r1_traces.sh MODEL [N] [key=value ...]}
N=${2:-all}
shift $(( $# >= 2 ? 2 : 1 ))

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    gpus=${GPUS:-$(exit-loop slurm gpus "$MODEL")}
    mkdir -p logs
    exec sbatch --gpus-per-node="$gpus" ${PARTITION:+--partition="$PARTITION"} ${TIME:+--time="$TIME"} \
        "$0" "$MODEL" "$N" "$@"
fi

# GPUs SLURM gave this job; tensor parallel over all of them unless TP says otherwise.
visible=${CUDA_VISIBLE_DEVICES:-0}
ngpus=$(awk -F, '{print NF}' <<<"$visible")
tp=${TP:-$ngpus}

args=(--model_name "$MODEL" sample.tensor_parallel_size="$tp")
[[ "$N" != "all" ]] && args+=(--num_examples "$N")
echo "job $SLURM_JOB_ID on $(hostname): $MODEL, N=$N, GPUs=$visible, TP=$tp (restart ${SLURM_RESTART_COUNT:-0})"
srun exit-loop generate "${args[@]}" "$@"
