#!/usr/bin/env bash
# Real training runs of docs/training.md: MNIST LeNet trained on MNIST *test* images 0-7999 (the only
# MNIST images available offline), Gaussian augmentation and MACER at sigma 0.25, both with MACER's
# MNIST hyperparameters (macer-mnist preset: SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64; MACER
# k=16, lambda 12, gamma 8, beta 16) for a short budget of epochs (this machine: 2 shared CPU cores),
# MACER again with lambda 0 for its first W_EPOCHS/2 epochs (--lbd-warmup-epochs) and with lambda 4,
# the PyTorch reference's MACER loop on the same images at lambda 12 and 4 (scripts/macer_torch_reference.py);
# then CERTIFY at N=10,000 on every 10th held-out test image 8000-9990, and
# the CIFAR-10 ResNet-20 smoke run on the 1017 real test images (train, certify, export).
# Usage: scripts/train_runs.sh [OUT]   (default out/train_runs)
set -euo pipefail
OUT=${1:-out/train_runs}
DATA=${RSJAX_SHARED_DATA:-../shared/data}
G_EPOCHS=${G_EPOCHS:-6}
M_EPOCHS=${M_EPOCHS:-6}
W_EPOCHS=${W_EPOCHS:-6}
mkdir -p "$OUT"
# XLA's convolutions, as the recorded runs (docs/results/train_mnist_*: the same bits); KERNELS=auto for oneDNN's
KERNELS=${KERNELS:-xla}
common=(--preset macer-mnist --sigma 0.25 --split test --subset 0:8000 --test-split test --test-subset 8000:10000
        --data-dir "$DATA/mnist" --quiet --cpu-kernels "$KERNELS")
# one run at a time, as recorded (the epoch times are of a machine running nothing else)
python -m rsjax train mnist lenet "$OUT/mnist_gaussian" "${common[@]}" --method gaussian --epochs "$G_EPOCHS" \
    > "$OUT/mnist_gaussian.out" 2>&1
python -m rsjax train mnist lenet "$OUT/mnist_macer" "${common[@]}" --epochs "$M_EPOCHS" \
    > "$OUT/mnist_macer.out" 2>&1
# MACER with lambda 0 for the first half of the epochs (--lbd-warmup-epochs, docs/training.md Presets)
python -m rsjax train mnist lenet "$OUT/mnist_macer_warmup" "${common[@]}" --epochs "$W_EPOCHS" \
    --lbd-warmup-epochs $((W_EPOCHS / 2)) > "$OUT/mnist_macer_warmup.out" 2>&1
# MACER with lambda 4 (lambda 12 diverges on these 8,000 images, in rsjax and in the PyTorch reference)
python -m rsjax train mnist lenet "$OUT/mnist_macer_lbd4" "${common[@]}" --epochs "$M_EPOCHS" --lbd 4 \
    > "$OUT/mnist_macer_lbd4.out" 2>&1
for lbd in 12 4; do
  [ -e "$OUT/mnist_macer_torch_lbd$lbd.jsonl" ] || python scripts/macer_torch_reference.py "$OUT/mnist_macer_torch_lbd$lbd.jsonl" --lbd "$lbd" --epochs "$M_EPOCHS" \
      --data-dir "$DATA/mnist" > /dev/null
done
# CERTIFY at N=10,000 on the held-out images 8000, 8010, ..., 9990 (seed 0: each image's noise stream
# is the one of the full test-set loop, so the real LeNet's rows of the same images compare)
for m in gaussian macer macer_warmup macer_lbd4; do
  python -m rsjax certify mnist "$OUT/mnist_$m/model" 0.25 "$OUT/mnist_${m}_N10000_8000-9990_skip10.tsv" \
      --N0 100 --N 10000 --alpha 0.001 --start 8000 --skip 10 --data-dir "$DATA/mnist" --no-progress
done
# CIFAR-10 ResNet-20 smoke run on the 1017 real test images: the whole path, not a trained model
python -m rsjax train cifar10 cifar_resnet20 "$OUT/cifar_smoke" --preset cohen-cifar10 --epochs 1 --batch 64 \
    --split test --subset 0:1000 --test-split test --test-subset 1000:1017 --data-dir "$DATA/cifar10" \
    --certify-every 1 --certify-subset 1000:1017:1 --certify-n 200 --quiet > "$OUT/cifar_smoke.out" 2>&1
python -m rsjax export "$OUT/cifar_smoke/model" "$OUT/cifar_smoke.pth.tar" --format cohen --overwrite
python -m rsjax certify cifar10 "$OUT/cifar_smoke/model" 0.25 "$OUT/cifar_smoke_certify.tsv" --N 200 --skip 100 \
    --data-dir "$DATA/cifar10" --no-progress
