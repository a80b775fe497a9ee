"""Per-epoch curves of MACER runs side by side: rsjax's ``metrics.jsonl`` and the PyTorch reference's
(scripts/macer_torch_reference.py), both with ``train_classification_loss`` and ``test_acc`` per
epoch. Usage: ``python scripts/plot_macer_runs.py OUT.png LABEL=FILE.jsonl ...``"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv):
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        sys.exit("usage: plot_macer_runs.py OUT.png LABEL=FILE.jsonl [LABEL=FILE.jsonl ...]")
    out = Path(argv[0])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for arg in argv[1:]:
        label, path = arg.split("=", 1)
        rows = read_rows(path)
        style = "--" if "torch" in label.lower() else "-"
        ep = [r["epoch"] for r in rows]
        ax_loss.plot(ep, [r["train_classification_loss"] for r in rows], style, marker="o", label=label)
        ax_acc.plot(ep, [r["test_acc"] for r in rows], style, marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="train classification loss L_C / B", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy, one noisy copy (%)", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
