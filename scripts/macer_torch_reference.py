"""MACER trained by the PyTorch reference's loop on the images of rsjax's MNIST runs, for comparison.

The loop of RuntianZ/macer ``main.py`` + ``macer.py`` (``converters.torch_reference.macer_loss``; SGD
lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, k = 16, beta 16, gamma 8, sigma 0.25, no
augmentation, PyTorch's default LeNet initialisation, ``torch.randn`` noise, a shuffled order per
epoch) on MNIST test images START:STOP, and after each epoch the cross-entropy and accuracy of one
noisy copy of each held-out image (``--test-subset``), as ``rsjax train`` logs them. One JSON line per
epoch goes to OUT (which must not exist).

    python scripts/macer_torch_reference.py out/macer_torch_lbd12.jsonl --lbd 12 --epochs 6
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.torch_reference import LeNet, macer_loss  # noqa: E402
from rsjax.data import load_dataset  # noqa: E402
from rsjax.paths import SHARED_DATA  # noqa: E402


def subset(arg):
    start, stop = (int(v) for v in arg.split(":"))
    if not 0 <= start < stop <= 10_000:
        raise argparse.ArgumentTypeError(f"{arg!r}: need 0 <= START < STOP <= 10000")
    return start, stop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data-dir", type=Path, default=SHARED_DATA / "mnist")
    p.add_argument("--subset", type=subset, default=(0, 8000))
    p.add_argument("--test-subset", type=subset, default=(8000, 10_000))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lbd", type=float, default=12.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.out.exists():
        p.error(f"{a.out} exists; choose another file")
    torch.set_num_threads(a.threads)
    x, y = load_dataset("mnist", "test", data_dir=a.data_dir).batch(range(10_000))
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float32), -1, 1)))
    y = torch.from_numpy(np.asarray(y).astype(np.int64))
    xtr, ytr = x[slice(*a.subset)], y[slice(*a.subset)]
    xte, yte = x[slice(*a.test_subset)], y[slice(*a.test_subset)]
    torch.manual_seed(a.seed)
    net = LeNet()
    opt = torch.optim.SGD(net.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
    sigma, k, batch = 0.25, 16, 64
    order = torch.Generator().manual_seed(a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "x") as f:
        for epoch in range(a.epochs):
            t0, sums = time.time(), np.zeros(3)
            net.train()
            perm = torch.randperm(len(xtr), generator=order)
            for i in tqdm(range(0, len(xtr), batch), desc=f"epoch {epoch}", leave=False):
                idx = perm[i:i + batch]
                noise = torch.randn((len(idx) * k,) + tuple(xtr.shape[1:]))
                loss, lc, lr, correct = macer_loss(net, xtr[idx], ytr[idx], noise, sigma=sigma, lbd=a.lbd)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sums += (lc.item(), lr.item(), correct.sum().item())
            net.eval()
            with torch.no_grad():
                logits = net(xte + sigma * torch.randn_like(xte))
            row = {"epoch": epoch, "time_s": round(time.time() - t0, 1), "lbd": a.lbd, "lr": a.lr, "seed": a.seed,
                   "train_classification_loss": sums[0] / len(xtr), "train_robustness_loss": sums[1] / len(xtr),
                   "train_acc": 100 * sums[2] / len(xtr), "test_loss": F.cross_entropy(logits, yte).item(),
                   "test_acc": 100 * (logits.argmax(1) == yte).float().mean().item()}
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
