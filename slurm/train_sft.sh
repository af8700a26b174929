#!/bin/bash
# SFT on one node, one training process per GPU (accelerate launch); arguments go to `exit-loop train`.
#   sbatch slurm/train_sft.sh --config configs/sft_gsm8k_r1_correct.yaml
#   sbatch slurm/train_sft.sh --data data/gsm8k/sft_r1_correct.jsonl --model Qwen/Qwen2.5-Math-1.5B peft.enabled=true
#   ACCEL=configs/accelerate/fsdp.yaml sbatch --gpus-per-node=8 slurm/train_sft.sh --config configs/sft_gsm8k_r1_correct.yaml
# ACCEL picks the accelerate config: ddp.yaml (default), fsdp.yaml or zero3.yaml from configs/accelerate/.
# A rerun with the same output_dir resumes from TRL's last checkpoint, or returns at once if done.
#SBATCH --job-name=exit-loop-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

ACCEL=${ACCEL:-configs/accelerate/ddp.yaml}
NPROC=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))   # jobs sharing a node don't share a port

echo "exit-loop sft: job ${SLURM_JOB_ID:-none} on $(hostname), $NPROC process(es), $ACCEL"
exec accelerate launch --config_file "$ACCEL" --num_processes "$NPROC" --main_process_port "$PORT" \
    -m exit_loop.cli train "$@"
