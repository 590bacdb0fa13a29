#!/bin/bash
# SLURM array job: 8 workers, each a task of the array, all joining one study.
# The study stops at --trials trials in total, whoever runs them.
#SBATCH --job-name=asymnas
#SBATCH --array=0-7
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
#SBATCH --output=logs/asymnas-%A_%a.out

set -euo pipefail
cd "$SLURM_SUBMIT_DIR"
.venv/bin/nas worker experiments/cluster/distributed.yaml \
    --trials 400 \
    --threads "$SLURM_CPUS_PER_TASK" \
    --timeout 13800
