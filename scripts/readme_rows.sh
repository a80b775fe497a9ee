#!/usr/bin/env bash
# Rerun two README certification commands on a few images and compare their rows with the
# committed outputs in docs/results/ (every column but time; columns added since - nonfinite -
# are left out): the CIFAR-10 ResNet-20 at sigma 0.25 (--skip 20, first MAX_CIFAR indices), the
# MNIST LeNet at sigma 0.25 (--skip 10, first MAX_MNIST indices) and the QCRS row of the methods
# table (CIFAR sigma 0.50, first MAX_QCRS indices). Prints one line per file and exits 1 on a
# difference.
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_CIFAR=${MAX_CIFAR:-41}; MAX_MNIST=${MAX_MNIST:-51}; MAX_QCRS=${MAX_QCRS:-21}
D=../shared/data
mkdir -p out/readme_rows
for s in 0.25 0.50; do
  [ -f out/cifar10_resnet20_noise$s/rsjax_model.json ] || \
    python -m rsjax convert $D/models/cifar10_resnet20_noise$s/checkpoint.pth.tar out/cifar10_resnet20_noise$s
done
[ -f out/mnist_lenet_noise0.25/rsjax_model.json ] || \
  python -m rsjax convert $D/models/mnist_lenet_noise0.25/checkpoint.pth.tar out/mnist_lenet_noise0.25
O=out/readme_rows
python -m rsjax certify cifar10 out/cifar10_resnet20_noise0.25 0.25 $O/cifar.tsv --N0 100 --N 10000 --alpha 0.001 \
  --skip 20 --batch 1000 --seed 0 --max $MAX_CIFAR --data-dir $D/cifar10 --no-progress
python -m rsjax certify mnist out/mnist_lenet_noise0.25 0.25 $O/mnist.tsv --N0 100 --N 10000 --alpha 0.001 \
  --skip 10 --batch 2000 --seed 0 --max $MAX_MNIST --data-dir $D/mnist --no-progress
python -m rsjax certify cifar10 out/cifar10_resnet20_noise0.50 0.50 $O/qcrs.tsv --N0 100 --N 10000 --alpha 0.001 \
  --skip 20 --seed 0 --max $MAX_QCRS --data-dir $D/cifar10 --no-progress \
  --method qcrs --epsilon 0.03 --left 0.12 --right 1.7 --epsilon_step 0.2
python - <<'PY'
import sys
import pandas

pairs = [("out/readme_rows/cifar.tsv", "docs/results/cifar10_resnet20_noise0.25_sigma0.25_N10000_skip20.tsv"),
         ("out/readme_rows/mnist.tsv", "docs/results/mnist_lenet_noise0.25_sigma0.25_N10000_skip10.tsv"),
         ("out/readme_rows/qcrs.tsv", "docs/results/methods_N10000/cifar_rn20_s050_qcrs.tsv")]
bad = 0
for new, old in pairs:
    a = pandas.read_csv(new, delimiter="\t", dtype=str)
    b = pandas.read_csv(old, delimiter="\t", dtype=str, comment="#").head(len(a))
    cols = [c for c in b.columns if c != "time"]
    same = a[cols].reset_index(drop=True).equals(b[cols].reset_index(drop=True))
    bad += not same
    print(f"{new}: {len(a)} rows, columns {' '.join(cols)}: {'identical to' if same else 'DIFFER from'} {old}")
sys.exit(1 if bad else 0)
PY
