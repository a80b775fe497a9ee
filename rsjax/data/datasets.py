"""Test/train images for certification: MNIST, CIFAR-10 and ImageNet, as float32 NHWC in [0, 1].

Where the data comes from (the first that holds it):

1. tensorflow-datasets: ``mnist``, ``cifar10``, ``imagenet2012`` (validation split for ``test``),
   prepared in ``data_dir`` when one is given, else in tfds's default data directory; read with
   random access through ``tfds.data_source`` (needs the array_record file format).
2. ``data_dir`` holding the standard local files (directly or in ``data_dir/<dataset>``):
   - MNIST: the IDX files ``t10k-images-idx3-ubyte[.gz]`` / ``t10k-labels-idx1-ubyte[.gz]``
     (``train-*`` for the train split);
   - CIFAR-10: ``cifar-10-batches-py/test_batch`` (``data_batch_1..5`` for train), the python
     pickle format (uint8 R, G, B planes);
   - ImageNet: ``val/<wnid>/*.JPEG`` (``train/<wnid>/...`` for train); the class index is the
     position of the wnid in the sorted list of folders (torchvision ImageFolder order), and
     each image gets Cohen's test transform Resize(256) + CenterCrop(224) (PIL, bilinear).
3. No ``data_dir`` given: the directory in the environment variable ``RSJAX_DATA_DIR``
   (tensorflow-datasets prepared there, or the standard files as in 2).

An explicit ``data_dir`` is never bypassed: with one, tfds's default directory and
``RSJAX_DATA_DIR`` are not consulted. There is no built-in default directory.

Images are read lazily per index (ImageNet decodes only the images asked for); MNIST and
CIFAR-10 are small and are held in memory as uint8. An index outside the dataset is a
:class:`rsjax.errors.DataError` that says how many images the source holds.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
from pathlib import Path

import numpy as np

from rsjax.errors import DataError

DATA_DIR_ENV = "RSJAX_DATA_DIR"
SPLITS = ("test", "train")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset that models and converters rely on.

    ``input_shape`` is (H, W, C) of the [0, 1] images fed to a model; ``mean``/``std`` are the
    per-channel statistics Cohen et al.'s ``NormalizeLayer`` uses (locuslab/smoothing,
    ``code/datasets.py``: ``_CIFAR10_MEAN``/``_STDDEV``, ``_IMAGENET_MEAN``/``_STDDEV``; MNIST's
    are the usual torchvision values); ``tfds_name``/``tfds_splits`` name it in
    tensorflow-datasets.
    """

    name: str
    num_classes: int
    input_shape: tuple
    mean: tuple
    std: tuple
    tfds_name: str = ""
    tfds_splits: tuple = (("test", "test"), ("train", "train"))

    def tfds_split(self, split):
        return dict(self.tfds_splits)[split]


DATASET_INFO = {d.name: d for d in (
    DatasetInfo("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), "mnist"),
    DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "cifar10"),
    DatasetInfo("imagenet", 1000, (224, 224, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet2012",
                (("test", "validation"), ("train", "train"))),
)}


class Dataset:
    """A read-only, indexable image dataset.

    ``ds[i] -> (x float32 (H, W, C) in [0, 1], label int)``; ``ds.batch(indices) ->
    (x float32 (B, H, W, C), labels int64 (B,))``. ``len(ds)`` is the number of images the
    source holds; ``ds.source`` says where they come from.
    """

    def __init__(self, name, split, num_classes, input_shape, length, getter, source):
        self.name = name
        self.split = split
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self._len = int(length)
        self._get = getter
        self.source = source

    def __len__(self):
        return self._len

    def _check(self, i):
        if isinstance(i, (bool, np.bool_)) or int(i) != i:
            raise DataError(f"{self.name}: index {i!r} is not an integer")
        i = int(i)
        if not 0 <= i < self._len:
            raise DataError(f"{self.name} {self.split}: index {i} is out of range: "
                            f"{self.source} holds {self._len} images (indices 0..{self._len - 1})")
        return i

    def __getitem__(self, i):
        x, y = self._get(self._check(i))
        return np.asarray(x, np.float32), int(y)

    def batch(self, indices):
        items = [self[i] for i in indices]
        if not items:
            return np.zeros((0, *self.input_shape), np.float32), np.zeros((0,), np.int64)
        return np.stack([x for x, _ in items]), np.asarray([y for _, y in items], np.int64)

    def __repr__(self):
        return f"Dataset({self.name!r}, split={self.split!r}, {len(self)} images from {self.source})"


def load_dataset(name: str, split: str = "test", data_dir=None) -> Dataset:
    """Open dataset ``name`` (``mnist``, ``cifar10``, ``imagenet``); see the module docstring
    for where it is looked for. Raises DataError naming the places looked in when none holds it."""
    if name not in DATASET_INFO:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_INFO)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    looked = []
    if data_dir is not None:
        ds = _from_dir(name, split, Path(data_dir), "--data-dir", looked)
        if ds is not None:
            return ds
        raise DataError(f"no {name} {split} data found in --data-dir {data_dir}: looked for {'; '.join(looked)}")
    ds = _tfds(name, split, None, looked)
    if ds is not None:
        return ds
    env = os.environ.get(DATA_DIR_ENV)
    ds = _from_dir(name, split, Path(env), f"{DATA_DIR_ENV}=", looked) if env else None
    if ds is not None:
        return ds
    raise DataError(f"no {name} {split} data found: looked for {'; '.join(looked) or 'tensorflow-datasets'}; "
                    f"pass --data-dir DIR (or set {DATA_DIR_ENV}) with the standard files")


def _from_dir(name, split, d: Path, what, looked):
    """tensorflow-datasets prepared in ``d``, else the standard files there; None when neither."""
    if not d.is_dir():
        raise DataError(f"{what}{'' if what.endswith('=') else ' '}{d} is not a directory")
    return _tfds(name, split, d, looked) or _in_dir(name, split, d, looked)


def _in_dir(name, split, d: Path, looked):
    """The standard local files in ``d`` or ``d/<name>``, or None."""
    for sub in (d, d / name):
        ds = _local(name, split, sub, looked)
        if ds is not None:
            return ds
    return None


# ---------------------------------------------------------------- local standard files


def _local(name, split, d: Path, looked):
    return {"mnist": _mnist, "cifar10": _cifar10, "imagenet": _imagenet}[name](split, Path(d), looked)


def _first_existing(d, names):
    for n in names:
        if (d / n).is_file():
            return d / n
    return None


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic 0x0000 08 ndim, big-endian int32 dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an uint8 IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4)
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({arr.size} bytes of data for shape {tuple(dims)})")
    return arr.reshape(tuple(int(v) for v in dims))


def _mnist(split, d, looked):
    prefix = "t10k" if split == "test" else "train"
    img_names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]
    lab_names = [f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]
    imgs, labs = _first_existing(d, img_names), _first_existing(d, lab_names)
    looked.append(f"{d}/{img_names[0]}")
    if imgs is None or labs is None:
        return None
    x, y = _read_idx(imgs), _read_idx(labs)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
        raise DataError(f"{imgs}: expected N 28x28 images and N labels, got {x.shape} and {y.shape}")
    info = DATASET_INFO["mnist"]
    return Dataset("mnist", split, info.num_classes, info.input_shape, len(x),
                   lambda i: (x[i, :, :, None] / np.float32(255), y[i]), str(imgs.parent))


def _cifar10(split, d, looked):
    base = d / "cifar-10-batches-py"
    files = [base / "test_batch"] if split == "test" else [base / f"data_batch_{k}" for k in range(1, 6)]
    looked.append(str(files[0]))
    if not all(f.is_file() for f in files):
        return None
    xs, ys = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            data, labels = batch[b"data"], batch[b"labels"]
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError) as e:
            raise DataError(f"{f}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
        data = np.asarray(data, np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"{f}: expected (N, 3072) uint8 data and N labels, got {data.shape}, {len(labels)}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # R,G,B planes -> HWC
        ys.append(np.asarray(labels, np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    info = DATASET_INFO["cifar10"]
    return Dataset("cifar10", split, info.num_classes, info.input_shape, len(x),
                   lambda i: (x[i] / np.float32(255), y[i]), str(base))


IMAGENET_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _imagenet(split, d, looked):
    root = d / ("val" if split == "test" else "train")
    looked.append(f"{root}/<wnid>/*.JPEG")
    if not root.is_dir():
        return None
    wnids = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = []
    for c, w in enumerate(wnids):
        files += [(p, c) for p in sorted((root / w).iterdir()) if p.suffix.lower() in IMAGENET_EXTENSIONS]
    if not files:
        return None
    info = DATASET_INFO["imagenet"]
    return Dataset("imagenet", split, info.num_classes, info.input_shape, len(files),
                   lambda i: (imagenet_transform(files[i][0]), files[i][1]), str(root))


def resize_center_crop(img, size=256, crop=224):
    """torchvision's Resize(size) (shorter side to ``size``, bilinear) then CenterCrop(crop), on a PIL image."""
    from PIL import Image

    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    img = img.resize((nw, nh), Image.BILINEAR)
    top = int(round((nh - crop) / 2.0))
    left = int(round((nw - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def imagenet_transform(path) -> np.ndarray:
    """Cohen's ImageNet test transform: RGB, Resize(256), CenterCrop(224), to float32 HWC in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            img = resize_center_crop(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    return np.asarray(img, np.float32) / np.float32(255)


# ---------------------------------------------------------------- tensorflow-datasets


def _tfds_builder(name, data_dir, looked=None):
    """The tfds builder of ``name`` when tfds has it prepared (in ``data_dir`` if given), else None."""
    try:
        import tensorflow_datasets as tfds
    except Exception:  # tfds missing or broken: the local files are the other way in
        return None
    tname = DATASET_INFO[name].tfds_name
    import logging

    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # tfds warns about every version folder it does not find
    try:
        builder = tfds.builder(tname, data_dir=None if data_dir is None else str(data_dir))
        prepared = builder.is_prepared()
    except Exception:
        return None
    finally:
        absl_log.setLevel(level)
    if looked is not None:
        looked.append(f"tensorflow-datasets {tname} in {builder.data_dir}")
    return builder if prepared else None


def tfds_source(name, split, data_dir, looked=None):
    """``(random-access source, its length, description)`` of ``name``'s ``split`` when tfds has it
    prepared (in ``data_dir`` if given), else None; DataError when the copy cannot be read."""
    info = DATASET_INFO[name]
    builder = _tfds_builder(name, data_dir, looked)
    if builder is None:
        return None
    try:
        source = builder.as_data_source(split=info.tfds_split(split))
        length = len(source)
    except Exception as e:
        raise DataError(f"tensorflow-datasets {info.tfds_name} is prepared in {builder.data_dir} but cannot be read "
                        f"without TensorFlow ({type(e).__name__}: {e}); prepare it in the array_record "
                        "format or pass --data-dir with the standard files") from None
    return source, length, f"tensorflow-datasets {builder.data_dir}"


def _tfds(name, split, data_dir, looked):
    """The dataset through tfds if it is prepared there (random-access data source), else None."""
    info = DATASET_INFO[name]
    shape = info.input_shape
    found = tfds_source(name, split, data_dir, looked)
    if found is None:
        return None
    source, length, where = found

    def get(i):
        ex = source[i]
        img = np.asarray(ex["image"])
        if name == "imagenet":
            from PIL import Image

            img = np.asarray(resize_center_crop(Image.fromarray(img).convert("RGB")))
        return img.reshape(shape).astype(np.float32) / np.float32(255), int(ex["label"])

    return Dataset(name, split, info.num_classes, shape, length, get, where)
