"""Helpers for tests/test_convert.py: real images from ../shared/data, PyTorch logits, accuracy."""

import numpy as np

from rsjax.data import load_dataset
from rsjax.paths import SHARED_DATA


def _real(name, n):
    """Images and labels of the real subset ../shared/data/<name>, through rsjax.data (the local
    standard files, never a tfds copy)."""
    ds = load_dataset(name, "test", data_dir=SHARED_DATA / name)
    return ds.batch(range(len(ds) if n is None else n))


def cifar10_images(n=None):
    """The CIFAR-10 test images in ../shared/data (1017) as float32 NHWC in [0, 1], and int labels."""
    return _real("cifar10", n)


def mnist_images(n=None):
    """The 10,000 MNIST test images as float32 (N, 28, 28, 1) in [0, 1], and int labels."""
    return _real("mnist", n)


def imagenet_crops(n):
    """n 224x224 RGB crops in [0, 1] (NHWC): CIFAR-10 images resized bilinearly to 256, centre-cropped."""
    import torch
    import torch.nn.functional as F

    x, _ = cifar10_images(n)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(256, 256), mode="bilinear", align_corners=False).clamp(0, 1)
    t = t[:, :, 16:240, 16:240]
    return np.ascontiguousarray(t.permute(0, 2, 3, 1).numpy())


def torch_logits(model, x_nhwc):
    """Logits of a PyTorch model (eval mode, float32) on NHWC numpy input."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def accuracy(f, x, y, batch=500):
    """Top-1 accuracy (%) of logits = f(x) over the arrays x, y."""
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((np.asarray(f(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x), correct
