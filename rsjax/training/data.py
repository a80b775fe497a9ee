"""Training data: the train (or test) split, the references' augmentation, a deterministic pipeline.

**Sources.** MNIST and CIFAR-10 come through :func:`rsjax.data.load_dataset` (the standard files -
MNIST IDX ``train-images-idx3-ubyte[.gz]`` / ``train-labels-idx1-ubyte[.gz]``, CIFAR-10
``cifar-10-batches-py/data_batch_1..5`` - or tensorflow-datasets) and are held in memory as uint8.
ImageNet is read from ``train/<wnid>/*.JPEG`` folders (class = position of the wnid in the sorted
folder list, torchvision's ImageFolder order), decoded per image. ``split`` and ``subset`` choose
the examples: row r of the selection is dataset index ``start + r``.

**Augmentation, as the references** (applied on the host, before the noise, which is added on
the device): CIFAR-10 ``RandomCrop(32, padding=4)`` (zero padding) + ``RandomHorizontalFlip``;
ImageNet ``RandomResizedCrop(224)`` (scale 0.08-1, ratio 3/4-4/3, torchvision's 10 tries and
central fallback, bilinear) + flip; MNIST none.

**Determinism.** Epoch e visits the rows in the order ``permutation_rng(seed, e)`` and draws every
augmentation parameter of row r from ``(seed, e)`` (CIFAR: one vectorised draw per epoch indexed by
row; ImageNet: a generator seeded with (seed, e, r)). The batch of step s of epoch e is the rows
``order[s*B:(s+1)*B]``, so the pipeline's position is the step count alone: a resumed run feeds
exactly the batches the uninterrupted run would have fed. The batches are produced by a grain
``MapDataset`` over the step numbers (:meth:`Pipeline.iterate`): the iterator's whole state is the
step, which the train state already checkpoints, so no separate iterator state is needed. The last, short batch of an epoch is
kept, cut down to a multiple of the number of devices (at most ``devices - 1`` rows of an epoch are
skipped; none on one device, as PyTorch's loader without ``drop_last``).

**Several hosts.** Process p of P reads rows ``[p*b, (p+1)*b)`` of every global batch (b = B / P),
so the processes together feed the global batch of one process, in the same order.

grain's worker threads prepare the next batches (decoding, augmentation) while the device runs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from rsjax.data.datasets import DATASET_INFO, IMAGENET_EXTENSIONS
from rsjax.errors import DataError, RsjaxError

AUGMENTATIONS = {"mnist": "none", "cifar10": "crop_flip", "imagenet": "resized_crop_flip"}


def parse_subset(text: Optional[str], length: int):
    """``START:STOP`` (either may be empty) -> (start, stop) within ``0..length``."""
    if text in (None, "", ":"):
        return 0, length
    try:
        a, b = text.split(":")
        start = int(a) if a else 0
        stop = int(b) if b else length
    except ValueError:
        raise RsjaxError(f"--subset {text!r}: expected START:STOP (e.g. 0:8000)") from None
    if not 0 <= start < stop <= length:
        raise RsjaxError(f"--subset {text!r}: need 0 <= START < STOP <= {length} (the split holds {length} images)")
    return start, stop


@dataclass
class TrainData:
    """The selected examples: rows 0..n-1 are dataset indices ``idx``; ``get(rows, epoch, seed)``
    returns augmented float32 images in [0, 1] and int32 labels."""

    name: str
    split: str
    num_classes: int
    input_shape: tuple
    idx: np.ndarray
    labels: np.ndarray
    source: str
    augmentation: str
    images: Optional[np.ndarray] = None  # uint8 (n, H, W, C) for in-memory datasets
    files: Optional[list] = None  # ImageNet paths, one per row
    records: Optional[object] = None  # or a tfds random-access source; row r is its record offset + r
    _epoch_cache: dict = field(default_factory=dict, repr=False)

    def __len__(self):
        return len(self.idx)

    def fingerprint(self) -> str:
        """sha256 of the selection: dataset, split, dataset indices, labels and image bytes (or paths)."""
        h = hashlib.sha256()
        h.update(f"{self.name}/{self.split}/{self.augmentation}".encode())
        h.update(np.ascontiguousarray(self.idx, np.int64).tobytes())
        h.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        if self.images is not None:
            h.update(np.ascontiguousarray(self.images).tobytes())
        elif self.records is not None:  # a tfds source: its name, directory and length (not every JPEG)
            h.update(f"{self.source}/{len(self.records)}".encode())
        else:
            for f in self.files:
                h.update(str(f).encode())
        return h.hexdigest()

    def _crop_flip_params(self, epoch: int, seed: int):
        key = (seed, epoch)
        params = self._epoch_cache.get(key)
        if params is None:  # pipeline threads may race here: each computes the same draws
            rng = np.random.default_rng([seed, epoch, 2])
            params = (rng.integers(0, 9, size=(len(self), 2)), rng.random(len(self)) < 0.5)
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(min(self._epoch_cache), None)
            self._epoch_cache[key] = params
        return params

    def get(self, rows, epoch: int, seed: int):
        rows = np.asarray(rows, np.int64)
        y = self.labels[rows].astype(np.int32)
        if self.augmentation == "none":
            x = self.images[rows].astype(np.float32) / np.float32(255)
        elif self.augmentation == "crop_flip":
            offsets, flips = self._crop_flip_params(epoch, seed)
            x = crop_flip(self.images[rows], offsets[rows], flips[rows]).astype(np.float32) / np.float32(255)
        else:
            x = np.stack([random_resized_crop_flip(self._record(int(r)), np.random.default_rng([seed, epoch, int(r), 3]))
                          for r in rows])
        return x, y

    def _record(self, r: int):
        """Row r of an ImageNet selection: its JPEG path, or a tfds record's decoded uint8 image."""
        if self.records is not None:
            ex = self.records[r]
            return np.asarray(ex["image"])
        return self.files[r]


def crop_flip(images, offsets, flips, pad: int = 4):
    """RandomCrop(H, padding=pad) with zero padding, then a horizontal flip where ``flips``:
    image i is ``padded[i, oy:oy+H, ox:ox+W]`` with (oy, ox) = offsets[i] in 0..2*pad."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ys = offsets[:, 0, None] + np.arange(h)[None]
    xs = offsets[:, 1, None] + np.arange(w)[None]
    xs = np.where(flips[:, None], xs[:, ::-1], xs)
    return padded[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]]


def random_resized_crop_flip(path, rng, size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop(size) + RandomHorizontalFlip with the draws from ``rng``;
    ``path`` is an image file or a decoded uint8 (H, W, C) array."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, np.ndarray):
        img = Image.fromarray(path.reshape(path.shape[:2]) if path.ndim == 3 and path.shape[2] == 1 else path)
        img = img.convert("RGB")
    else:
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
    width, height = img.size
    area = width * height
    box = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:  # central crop at the nearest allowed ratio
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        box = (left, top, left + w, top + h)
    img = img.resize((size, size), Image.BILINEAR, box=box)
    x = np.asarray(img, np.float32) / np.float32(255)
    return x[:, ::-1] if rng.random() < 0.5 else x


def load_train_data(name: str, split: str = "train", data_dir=None, subset: Optional[str] = None) -> TrainData:
    """The examples to train on (module doc); DataError naming the files expected when none exist."""
    if name not in DATASET_INFO:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_INFO)}")
    num_classes, shape = DATASET_INFO[name].num_classes, tuple(DATASET_INFO[name].input_shape)
    if name == "imagenet":
        tf_source = _imagenet_tfds(split, data_dir)
        if tf_source is not None:
            records, labels, source = tf_source
            start, stop = parse_subset(subset, len(labels))
            data = TrainData(name, split, num_classes, shape, np.arange(start, stop), np.asarray(labels[start:stop]),
                             source, AUGMENTATIONS[name], records=_Offset(records, start))
        else:
            files, labels, source = _imagenet_files(split, data_dir)
            start, stop = parse_subset(subset, len(files))
            data = TrainData(name, split, num_classes, shape, np.arange(start, stop), np.asarray(labels[start:stop]),
                             source, AUGMENTATIONS[name], files=files[start:stop])
    else:
        from rsjax.data import load_dataset

        ds = load_dataset(name, split, data_dir)
        start, stop = parse_subset(subset, len(ds))
        idx = np.arange(start, stop)
        images = np.empty((len(idx),) + shape, np.uint8)
        labels = np.empty(len(idx), np.int64)
        for lo in range(0, len(idx), 4096):
            x, y = ds.batch(idx[lo:lo + 4096])
            images[lo:lo + len(y)] = np.rint(x * 255).astype(np.uint8)
            labels[lo:lo + len(y)] = y
        data = TrainData(name, split, num_classes, shape, idx, labels, ds.source, AUGMENTATIONS[name], images=images)
    bad = np.flatnonzero((data.labels < 0) | (data.labels >= num_classes))
    if bad.size:
        raise DataError(f"{data.source}: label {int(data.labels[bad[0]])} of image {int(data.idx[bad[0]])} is out of "
                        f"range 0..{num_classes - 1} ({bad.size} such labels)")
    return data


class _Offset:
    """Records ``start..`` of a random-access source, indexed from 0."""

    def __init__(self, source, start):
        self.source, self.start = source, int(start)

    def __len__(self):
        return len(self.source) - self.start

    def __getitem__(self, r):
        return self.source[self.start + int(r)]


def _imagenet_tfds(split, data_dir):
    """(source, labels, description) of ``imagenet2012`` prepared by tensorflow-datasets (in
    ``data_dir`` when given, else tfds's default directory; array_record format for random access),
    or None when tfds has no prepared copy. The labels are read once (one pass over the records'
    label field); images are decoded per record in the pipeline's threads."""
    from rsjax.data.datasets import tfds_source

    found = tfds_source("imagenet", split, data_dir)
    if found is None:
        return None
    source, n, where = found
    labels = np.fromiter((int(source[i]["label"]) for i in range(n)), np.int64, count=n)
    return source, labels, f"{where} ({DATASET_INFO['imagenet'].tfds_split(split)})"


def _imagenet_files(split, data_dir):
    if data_dir is None:
        raise DataError("imagenet: pass --data-dir DIR holding train/<wnid>/*.JPEG (or val/ for --split test)")
    sub = "train" if split == "train" else "val"
    for root in (Path(data_dir) / sub, Path(data_dir) / "imagenet" / sub):
        if root.is_dir():
            wnids = sorted(p.name for p in root.iterdir() if p.is_dir())
            files, labels = [], []
            for c, w in enumerate(wnids):
                for p in sorted((root / w).iterdir()):
                    if p.suffix.lower() in IMAGENET_EXTENSIONS:
                        files.append(p)
                        labels.append(c)
            if files:
                return files, labels, str(root)
    raise DataError(f"no imagenet {split} images found: looked for {Path(data_dir) / sub}/<wnid>/*.JPEG")


# ----------------------------------------------------------------------------- the batch schedule


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The rows in the order epoch ``epoch`` visits them (a permutation of 0..n-1)."""
    return np.random.default_rng([seed, epoch, 1]).permutation(n)


def steps_per_epoch(n: int, batch: int, num_devices: int) -> int:
    """Full batches plus the short last one if it keeps at least one row per device."""
    full, rest = divmod(n, batch)
    return full + (1 if rest >= num_devices else 0)


def batch_rows(order: np.ndarray, step_in_epoch: int, batch: int, num_devices: int) -> np.ndarray:
    rows = order[step_in_epoch * batch:(step_in_epoch + 1) * batch]
    return rows[:len(rows) - len(rows) % num_devices]


class Pipeline:
    """Process-local batches ``{"x", "y", "idx", "row"}`` from global step ``start`` on (module doc),
    prepared ``prefetch`` ahead by ``threads`` grain worker threads."""

    def __init__(self, data: TrainData, *, batch: int, seed: int, num_devices: int, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 4, threads: Optional[int] = None):
        self.data, self.batch, self.seed = data, batch, seed
        self.num_devices, self.pi, self.pc = num_devices, process_index, process_count
        self.steps_per_epoch = steps_per_epoch(len(data), batch, num_devices)
        self.prefetch = prefetch
        # ImageNet decodes JPEGs per record (PIL releases the GIL); in-memory datasets need one thread
        self.threads = threads or (min(8, os.cpu_count() or 1) if data.augmentation == "resized_crop_flip" else 1)

    def local(self, step: int):
        epoch, s = divmod(step, self.steps_per_epoch)
        rows = batch_rows(epoch_order(self.seed, epoch, len(self.data)), s, self.batch, self.num_devices)
        share = len(rows) // self.pc
        rows = rows[self.pi * share:(self.pi + 1) * share]
        x, y = self.data.get(rows, epoch, self.seed)
        return {"x": x, "y": y, "idx": self.data.idx[rows].astype(np.int32), "row": rows.astype(np.int32)}

    def iterate(self, start: int, stop: int):
        """Yield (step, local batch) for start <= step < stop, in order.

        A grain ``MapDataset`` over the step numbers, mapped by :meth:`local` (a pure function of the
        step) and read by ``threads`` worker threads ``prefetch`` batches ahead, so decoding and
        augmentation run off the device's critical path; resuming at step s is the range from s."""
        import grain

        ds = grain.MapDataset.range(start, stop).map(lambda step: (step, self.local(step)))
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        yield from ds.to_iter_dataset(options)


def eval_batches(x: np.ndarray, y: np.ndarray, idx: np.ndarray, batch: int, num_devices: int):
    """Fixed-size batches of a test set, padded to ``batch`` (rounded up to the devices) with
    ``valid`` 0 rows, so one compiled eval step serves every batch."""
    b = -(-batch // num_devices) * num_devices
    for lo in range(0, len(y), b):
        n = min(b, len(y) - lo)
        pad = b - n
        yield {"x": np.concatenate([x[lo:lo + n], np.zeros((pad,) + x.shape[1:], x.dtype)]),
               "y": np.concatenate([y[lo:lo + n], np.zeros(pad, y.dtype)]).astype(np.int32),
               "idx": np.concatenate([idx[lo:lo + n], np.zeros(pad, idx.dtype)]).astype(np.int32),
               "valid": np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])}
