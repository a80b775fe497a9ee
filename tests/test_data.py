"""Datasets: the real subsets in ../shared/data as they are, the standard local formats, errors."""

import gzip
import hashlib
import pickle

import numpy as np
import pytest

from rsjax.data import load_dataset, resize_center_crop
from rsjax.errors import DataError


def test_real_mnist(shared_data):
    ds = load_dataset("mnist")
    assert len(ds) == 10000 and ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    x, y = ds.batch([0, 1, 2, 3, 4])
    assert x.dtype == np.float32 and x.shape == (5, 28, 28, 1)
    assert y.tolist() == [7, 2, 1, 0, 4]
    assert 0.0 <= x.min() and x.max() == 1.0
    raw = gzip.open(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz").read()
    assert hashlib.md5(raw).hexdigest() == "2646ac647ad5339dbf082846283269ea"
    np.testing.assert_array_equal(np.rint(ds[9999][0][..., 0] * 255).astype(np.uint8),
                                  np.frombuffer(raw, np.uint8, offset=16)[-784:].reshape(28, 28))


def test_real_cifar10_subset_and_index_beyond(shared_data):
    ds = load_dataset("cifar10", data_dir=shared_data / "cifar10")
    assert len(ds) == 1017 and ds.input_shape == (32, 32, 3)
    assert ds.batch(range(10))[1].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    with open(shared_data / "cifar10" / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        data = pickle.load(fh, encoding="bytes")[b"data"]
    x = ds[1016][0]
    for c in range(3):  # R, G, B planes -> channels last
        np.testing.assert_array_equal(np.rint(x[..., c] * 255), data[1016, c * 1024:(c + 1) * 1024].reshape(32, 32))
    with pytest.raises(DataError, match="index 1017 is out of range.*1017 images"):
        ds[1017]
    # the default (no --data-dir) falls back to ../shared/data/cifar10
    assert len(load_dataset("cifar10")) == 1017


def _write_idx(path, arr):
    head = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(head + arr.astype(np.uint8).tobytes())


def test_local_mnist_train_and_cifar_train(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([5, 0, 4]))
    ds = load_dataset("mnist", "train", data_dir=tmp_path)
    assert len(ds) == 3 and ds[2][1] == 4
    np.testing.assert_allclose(ds[1][0][..., 0], imgs[1] / 255, rtol=0, atol=1e-7)

    base = tmp_path / "cifar10" / "cifar-10-batches-py"  # also found in DATA_DIR/<dataset>
    base.mkdir(parents=True)
    for k in range(1, 6):
        with open(base / f"data_batch_{k}", "wb") as fh:
            pickle.dump({b"data": np.full((2, 3072), k, np.uint8), b"labels": [k, k + 1]}, fh)
    ds = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert len(ds) == 10 and ds[9][1] == 6 and ds[9][0].max() == pytest.approx(5 / 255)


def test_imagenet_folder_order_and_transform(tmp_path):
    from PIL import Image

    for wnid, color in (("n02", (0, 255, 0)), ("n01", (255, 0, 0))):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (400, 300), color).save(tmp_path / "val" / wnid / "a.JPEG", quality=100)
    ds = load_dataset("imagenet", data_dir=tmp_path)
    assert len(ds) == 2 and ds.input_shape == (224, 224, 3)
    x, y = ds.batch([0, 1])
    assert y.tolist() == [0, 1]  # sorted wnids: n01 -> 0
    assert x.shape == (2, 224, 224, 3) and x[0, ..., 0].mean() > 0.95 and x[1, ..., 1].mean() > 0.95
    # Resize(256) on the shorter side then a centred 224 crop: a 400x300 image becomes 341x256
    img = Image.new("L", (400, 300), 0)
    img.paste(255, (190, 140, 210, 160))  # a 20x20 square at the centre
    out = np.asarray(resize_center_crop(img))
    assert out.shape == (224, 224)
    rows, cols = np.nonzero(out > 128)
    assert abs(rows.mean() - 111.5) < 1.0 and abs(cols.mean() - 111.5) < 1.0
    assert 15 < rows.max() - rows.min() + 1 < 20  # 20 px * 256/300


@pytest.mark.parametrize("name,kw,msg", [
    ("svhn", {}, "unknown dataset 'svhn'"),
    ("mnist", {"split": "val"}, "unknown split"),
])
def test_bad_names(name, kw, msg):
    with pytest.raises(DataError, match=msg):
        load_dataset(name, **kw)


def test_missing_files_one_line(tmp_path):
    for name, what in (("mnist", "t10k-images-idx3-ubyte.gz"), ("cifar10", "test_batch"), ("imagenet", "val")):
        with pytest.raises(DataError) as e:
            load_dataset(name, data_dir=tmp_path)
        assert what in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("mnist", data_dir=tmp_path / "nope")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"junk")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read|not an uint8 IDX"):
        load_dataset("mnist", data_dir=tmp_path)


def test_tfds_prepared_source_is_used(monkeypatch, tmp_path):
    """When tfds has the dataset prepared, images come from its random-access data source."""
    import tensorflow_datasets as tfds

    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)

    class Builder:
        data_dir = str(tmp_path / "cifar10" / "3.0.2")

        def is_prepared(self):
            return True

        def as_data_source(self, split):
            assert split == "test"
            return [{"image": imgs[i], "label": i + 4} for i in range(3)]

    seen = {}

    def builder(name, data_dir=None):
        seen["args"] = (name, data_dir)
        return Builder()

    monkeypatch.setattr(tfds, "builder", builder)
    ds = load_dataset("cifar10", data_dir=tmp_path)  # no local files there: tfds is next
    assert seen["args"] == ("cifar10", str(tmp_path)) and "tensorflow-datasets" in ds.source
    assert len(ds) == 3 and ds[2][1] == 6
    np.testing.assert_allclose(ds[1][0], imgs[1] / 255, rtol=0, atol=1e-7)


def test_lookup_order_tfds_then_data_dir_then_environment(monkeypatch, tmp_path, shared_data):
    """tensorflow-datasets first, then the standard files of --data-dir, then RSJAX_DATA_DIR; no
    built-in default directory."""
    import tensorflow_datasets as tfds

    class NotPrepared:
        data_dir = str(tmp_path / "tfds")

        def is_prepared(self):
            return False

    asked = []
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: asked.append(data_dir) or NotPrepared())
    monkeypatch.delenv("RSJAX_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="RSJAX_DATA_DIR") as e:
        load_dataset("mnist")  # nothing configured: no default location, the error says how to give one
    assert "shared" not in str(e.value) and asked == [None]
    monkeypatch.setenv("RSJAX_DATA_DIR", str(shared_data))
    ds = load_dataset("mnist")
    assert len(ds) == 10000 and ds.source == str(shared_data / "mnist")
    assert asked[1:] == [None, str(shared_data)]  # tfds default dir, then tfds in the variable's dir
    # an explicit --data-dir is not bypassed by the variable
    with pytest.raises(DataError, match="in --data-dir"):
        load_dataset("mnist", data_dir=tmp_path)


def test_dataset_info_is_the_one_table(monkeypatch, shared_data, tmp_path):
    """Named facts per dataset; the converter takes mean/std/classes from this table."""
    import dataclasses

    from converters.pytorch import convert_checkpoint
    from rsjax.data import DATASET_INFO

    info = DATASET_INFO["cifar10"]
    assert (info.name, info.num_classes, info.input_shape) == ("cifar10", 10, (32, 32, 3))
    assert DATASET_INFO["imagenet"].tfds_split("test") == "validation"
    assert load_dataset("cifar10", data_dir=shared_data / "cifar10").input_shape == info.input_shape
    monkeypatch.setitem(DATASET_INFO, "cifar10", dataclasses.replace(info, mean=(0.5, 0.5, 0.5)))
    meta = convert_checkpoint(shared_data / "models" / "cifar10_resnet20_noise0.25" / "checkpoint.pth.tar",
                              tmp_path / "m", log=lambda s: None)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [float(v) for v in info.std]
