#!/usr/bin/env bash
# Issues 5's and 12's GPU measurements in one go, for a machine with a GPU (run from the repository root).
# Needs a CUDA build of jaxlib for the rsjax side and, for a same-device comparison, a CUDA build of
# PyTorch (the benchmarks put PyTorch on the GPU when it sees one and warn when it does not).
# Every run appends its row to benchmarks/results/*.md and writes its JSON record there.
#
#   bash benchmarks/run_gpu.sh            # all of it (~15-30 min on an H100)
#   bash benchmarks/run_gpu.sh quick      # the two throughput rows only
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import jax, sys
if jax.default_backend() != "gpu":
    sys.exit(f"JAX runs on {jax.default_backend()}, not a GPU: install a CUDA jaxlib first")
print("JAX devices:", jax.devices())
PY
python benchmarks/throughput.py --model cifar_resnet110 --batch 400 --reps 7
python benchmarks/throughput.py --model resnet50 --batch 256 --reps 5
[ "${1:-}" = quick ] && exit 0
python benchmarks/throughput.py --model cifar_resnet110 --batch 4096 --reps 7
python benchmarks/throughput.py --model cifar_resnet110 --batch 400 --dtype bfloat16 --reps 7
python benchmarks/peak.py --model cifar_resnet110 \
    --throughput "$(ls -t benchmarks/results/throughput_cifar_resnet110_b4096_float32_gpu_*.json | head -1)"
python benchmarks/certify_time.py --model cifar_resnet110 --batch 4096 --N0 100 --N 100000 --images 8
python benchmarks/certify_time.py --model resnet50 --batch 256 --N0 100 --N 10000 --images 4
# issue 12: training steps (target >= 2x PyTorch; MACER ResNet-110 CIFAR-10 under 60 s per epoch,
# i.e. 50,000 / 60 = 833 training images/s at batch 64, k = 16)
python benchmarks/train_throughput.py --model cifar_resnet110 --method gaussian --batch 400 --reps 5 --steps 10
python benchmarks/train_throughput.py --model cifar_resnet110 --method macer --batch 64 --k 16 --reps 5 --steps 10
