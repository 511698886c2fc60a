#!/usr/bin/env bash
# Multi-node, multi-GPU training of one regionnet model on SLURM, srun-style: SLURM starts one
# process per GPU on every node and Lightning's SLURMEnvironment reads each process's rank
# (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID) and the master address from SLURM.
#   sbatch scripts/slurm_multinode.sh data=csv data.csv=/data/xr/manifest.csv model=efficientnet_b0
# Edit the #SBATCH lines for your cluster (partition, account, GPUs per node, time). Keep
# --ntasks-per-node equal to --gpus-per-node: Lightning checks that SLURM_NTASKS equals
# trainer.devices x trainer.num_nodes. data.batch_size is per GPU; scale model.optimizer.lr
# with the global batch (docs/scaling.md).
#SBATCH --job-name=regionnet
#SBATCH --partition=gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
# Lightning saves an HPC checkpoint and requeues the job when SLURM signals the time limit
#SBATCH --signal=SIGUSR1@90
#SBATCH --output=%x-%j.out
set -euo pipefail

# SLURM_GPUS_PER_NODE may read "a100:4"; Lightning wants the count
gpus="${SLURM_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
gpus="${gpus##*:}"
# One run directory for all processes: Hydra's default (a timestamp) could differ by a second
# between nodes. Rank 0 writes checkpoints, metrics.json and the W&B run.
run_dir="${REGIONNET_LOG_DIR:-outputs}/train/slurm/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"

# --cpus-per-task again: since Slurm 22.05 srun does not inherit it from the job, and every
# process (and its data.num_workers loader workers) would share one core.
# A requeued job (Lightning's SIGUSR1 at the time limit, or scontrol requeue) keeps its job id,
# so its run directory: the job resumes from the newest hpc_ckpt_*.ckpt or checkpoints/last.ckpt
# there (skip_if_done, regionnet/sweep.py), and a finished run is not trained again.
srun --cpus-per-task="${SLURM_CPUS_PER_TASK}" regionnet-train \
  trainer=ddp \
  trainer.num_nodes="${SLURM_NNODES}" \
  trainer.devices="${gpus}" \
  data.num_workers="$((SLURM_CPUS_PER_TASK - 1))" \
  hydra.run.dir="${run_dir}" \
  "$@"
