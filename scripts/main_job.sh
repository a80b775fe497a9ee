#!/usr/bin/env bash
# The main job: convert a real noise-trained CIFAR-10 ResNet-20 (Cohen's checkpoint format,
# trained with sigma = 0.25) into an rsjax model in out/, then certify real CIFAR-10 test images
# with Cohen's CERTIFY (N0 = 100, N = 10,000, alpha = 0.001, every 50th of the 1017 test images
# in ../shared/data: 21 images) and print the summary. About 4 minutes on a 2-core CPU.
# Running it again resumes/reuses out/main_job_cifar10_sigma0.25.tsv (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
python -m rsjax convert --overwrite \
  ../shared/data/models/cifar10_resnet20_noise0.25/checkpoint.pth.tar out/cifar10_resnet20_noise0.25
python -m rsjax certify cifar10 out/cifar10_resnet20_noise0.25 0.25 out/main_job_cifar10_sigma0.25.tsv \
  --N0 100 --N 10000 --alpha 0.001 --batch 1000 --skip 50 --seed 0 --data-dir ../shared/data/cifar10
# certified accuracy vs radius, as a table and a plot
python -m rsjax analyze out/main_job_cifar10_sigma0.25.tsv --labels "ResNet-20 sigma=0.25" \
  --plot out/main_job_cifar10_sigma0.25.png
