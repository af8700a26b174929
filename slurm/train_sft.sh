#!/bin/bash
# SFT with one training process per GPU (accelerate launch); arguments go to `exit-loop train`.
#   mkdir -p logs   # SLURM does not create the log directory
#   sbatch slurm/train_sft.sh --config configs/sft_gsm8k_r1_correct.yaml
#   sbatch slurm/train_sft.sh --data data/gsm8k/sft_r1_correct.jsonl --model Qwen/Qwen2.5-Math-1.5B peft.enabled=true
#   ACCEL=configs/accelerate/fsdp.yaml sbatch --gpus-per-node=8 slurm/train_sft.sh --config configs/sft_gsm8k_r1_correct.yaml
#   sbatch --nodes=2 slurm/train_sft.sh --config configs/sft_gsm8k_r1_correct.yaml   # one launcher per node (srun)
# ACCEL picks the accelerate config: ddp.yaml (default), fsdp.yaml or zero3.yaml from configs/accelerate/.
# Like the jobs `exit-loop slurm submit` writes: logs in logs/, --requeue (a preempted job goes back
# in the queue), and USR1 shortly before the time limit requeues it; a rerun with the same
# output_dir resumes from TRL's last checkpoint, or returns at once if done.
#SBATCH --job-name=exit-loop-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
set -uo pipefail

ACCEL=${ACCEL:-configs/accelerate/ddp.yaml}
GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
NODES=${SLURM_NNODES:-1}
export MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
export MAIN_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))   # jobs sharing a node don't share a port
export ACCEL GPUS NODES

echo "exit-loop sft: job ${SLURM_JOB_ID:-none} on $(hostname), $NODES node(s) x $GPUS GPU(s), $ACCEL, restart ${SLURM_RESTART_COUNT:-0}"
trap 'echo "exit-loop sft: USR1: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1
# every node runs one launcher; each expands its own SLURM_NODEID
srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec accelerate launch --config_file "$ACCEL" --num_machines "$NODES" --machine_rank "$SLURM_NODEID" \
        --num_processes $((NODES * GPUS)) --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
        -m exit_loop.cli train "$@"' exit-loop-sft "$@" &
child=$!
while :; do  # a trapped signal ends `wait` early: wait again while training runs
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break
done
exit "$rc"
