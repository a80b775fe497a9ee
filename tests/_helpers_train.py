"""Standard-format dataset files for the training tests (MNIST IDX, CIFAR-10 python batches)."""

import gzip
import os
import pickle
import struct
import sys

import numpy as np

from rsjax.paths import REPO_ROOT


def write_idx(path, arr, gz=True):
    arr = np.asarray(arr, np.uint8)
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(head + arr.tobytes())


def write_mnist(d, n=96, seed=0, prefix="train", labels=None):
    """MNIST-like IDX files: class c images are a bright c-th row band (learnable), plus noise."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n) if labels is None else np.asarray(labels)
    x = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(y):
        x[i, 2 + 2 * (c % 10):4 + 2 * (c % 10), 4:24] = 250
    write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x)
    write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y)
    return x, y


def write_cifar(d, per_batch=8, seed=0, test=0):
    base = d / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{k}" for k in range(1, 6)] + (["test_batch"] if test else [])
    for name in names:
        m = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (m, 3072)).astype(np.uint8)
        with open(base / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": rng.integers(0, 10, m).tolist(), b"batch_label": name.encode(),
                         b"filenames": [b"x.png"] * m}, fh)
    return base


def rsjax_cmd(*args):
    return [sys.executable, "-m", "rsjax", *map(str, args)]


def subprocess_env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", **extra}


def kill_mid_epoch(cmd, outdir, env, is_target, timeout=300):
    """Start ``cmd`` (an ``rsjax train`` into ``outdir``), SIGKILL it as soon as a checkpoint step
    with ``is_target(step)`` exists, and return the largest step then on disk (None: it ended first)."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    ck = Path(outdir) / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_at = time.time() + timeout, None
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ck.glob("[0-9]*") if p.name.isdigit()] if ck.is_dir() else []
        if any(is_target(s) for s in steps):
            proc.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.02)
    proc.wait()
    return killed_at
