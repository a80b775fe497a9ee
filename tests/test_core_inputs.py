"""Bad inputs and faults at the Python API: refused with one line, never certified.

Non-finite draws are no vote; non-finite images, weights and damaged model files are errors;
images in the wrong units or layout are refused; keys, n and idx are checked against the ranges
the sampler supports (``idx = 2**32`` would otherwise wrap to image 0's noise).
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rsjax
from rsjax.core.certify import Smoother, check_images
from rsjax.core.sampler import image_keys, make_counter
from rsjax.errors import CheckpointError, RsjaxError


def threshold(x):
    v = x[:, 0, 0, 0]
    return jnp.stack([0.5 - v, v - 0.5], axis=-1)


def nan_under_noise(x):
    """Class 0 near 0.3; NaN logits for every noisy copy whose pixel exceeds 0.5."""
    v = x[:, 0, 0, 0]
    out = jnp.stack([0.5 - v, v - 0.5], axis=-1)
    return jnp.where((v > 0.5)[:, None], jnp.nan, out)


def always_nan(x):
    return jnp.full((x.shape[0], 3), jnp.nan)


def px(values):
    x = np.zeros((len(values), 1, 1, 1), np.float32)
    x[:, 0, 0, 0] = values
    return x


# --- non-finite logits ---------------------------------------------------------------------------
def test_nonfinite_draws_are_no_vote_and_are_counted():
    counts = make_counter(nan_under_noise, 2, samples_per_step=64)
    c = np.asarray(counts(jnp.asarray(px([0.3, 0.45])), jnp.full(2, 0.2), image_keys(0, np.arange(2)), num=500))
    assert c.shape == (2, 3) and (c.sum(axis=1) == 500).all()
    # a NaN argmaxes to class 0, so before this column every NaN draw was a vote for class 0
    assert (c[:, 1] == 0).all() and (c[:, 2] > 20).all(), c


def test_a_classifier_returning_nan_never_certifies():
    """All draws NaN: today's argmax would give class 0 with n_A = n and the largest radius."""
    sm = Smoother(always_nan, 3, 256)
    pred, radius, pA, nonfinite = sm.certify(px([0.3, 0.7]), 0.25, n0=20, n=200, alpha=0.001, key=0)
    assert (pred == -1).all() and (radius == 0).all() and (pA == 0).all()
    np.testing.assert_array_equal(nonfinite, [220, 220])
    p, _, nf = sm.predict(px([0.3]), 0.25, n=100, alpha=0.001)
    assert p[0] == -1 and nf[0] == 100
    with pytest.warns(RuntimeWarning, match="non-finite logits"):
        pred = rsjax.certify(always_nan, px([0.3]), sigma=0.25, n0=10, n=100)[0]
    assert pred[0] == -1


def test_nonfinite_draws_lower_the_bound_but_count_among_the_trials():
    """Class 0 everywhere, NaN where the noisy pixel exceeds 0.5: the NaN draws count among the
    n trials against c_A, so pA_lower is the Clopper-Pearson bound of the finite votes in n."""
    from rsjax.core import stats

    def zero(x):
        return jnp.stack([jnp.ones(x.shape[0]), jnp.zeros(x.shape[0])], axis=-1)

    def zero_or_nan(x):
        return jnp.where((x[:, 0, 0, 0] > 0.5)[:, None], jnp.nan, zero(x))

    x = px([0.3])
    sm = Smoother(zero_or_nan, 2, 256)
    counts = sm.counts(x, [0.2], image_keys(1, np.arange(1), "estimate"), 2000)
    _, _, pA, nonfinite = sm.certify(x, 0.2, n0=50, n=2000, alpha=0.001, key=1)
    assert counts[0, 2] > 0 and nonfinite[0] >= counts[0, 2]
    assert pA[0] == pytest.approx(stats.clopper_pearson_lower(counts[0, 0], 2000, 0.001))
    assert pA[0] < Smoother(zero, 2, 256).certify(x, 0.2, n0=50, n=2000, alpha=0.001, key=1)[2][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite classifier gives no warning
        rsjax.certify(threshold, x, sigma=0.2, n0=10, n=100)


def test_progress_reports_every_draw_and_changes_no_count():
    sm = Smoother(threshold, 2, 32)
    x = px([0.45, 0.5, 0.55])
    seen = []
    a = sm.certify(x, 0.3, n0=40, n=1000, alpha=0.01, key=2, progress=seen.append)
    b = sm.certify(x, 0.3, n0=40, n=1000, alpha=0.01, key=2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert sum(seen) == 3 * (40 + 1000) and len(seen) > 4  # long counts are split into chunks


# --- images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("x,msg", [
    (np.zeros((2, 28, 28, 1), np.uint8), "must be float in \\[0, 1\\], got dtype uint8"),
    (np.zeros((28, 28, 1), np.float32), "batch \\(M, H, W, C\\).*x\\[None\\]"),
    (np.zeros((2, 1, 28, 28), np.float32), "channels-first"),
    (np.full((2, 28, 28, 1), 255.0, np.float32), "outside \\[0, 1\\]"),
])
def test_images_in_the_wrong_units_or_layout_are_refused(x, msg):
    with pytest.raises(RsjaxError, match=msg) as e:
        check_images(x, input_shape=(28, 28, 1))
    assert "\n" not in str(e.value)


def test_nonfinite_image_names_its_index_and_range_opt_out():
    x = np.full((3, 2, 2, 1), 0.5, np.float32)
    x[2, 1, 0, 0] = np.nan
    with pytest.raises(RsjaxError, match="image 42 has NaN"):
        check_images(x, idx=np.array([40, 41, 42]))
    with pytest.raises(RsjaxError, match="image 2 has NaN"):
        rsjax.certify(threshold, x, sigma=0.25, n0=10, n=50)
    big = np.full((1, 2, 2, 1), 3.0, np.float32)
    with pytest.raises(RsjaxError, match="check_range=False"):
        rsjax.certify(threshold, big, sigma=0.25, n0=10, n=50)
    assert rsjax.predict(threshold, big, sigma=0.25, n=50, check_range=False)[0] == 1
    assert check_images(np.full((1, 2, 2, 1), 1 + 1e-7)).dtype == np.float32  # rounding is fine


def test_uint8_cifar_images_are_refused_by_the_api():
    x = (np.random.default_rng(0).random((2, 32, 32, 3)) * 255).astype(np.uint8)
    with pytest.raises(RsjaxError, match="divide 0-255 images by 255"):
        rsjax.certify(lambda z: jnp.zeros((z.shape[0], 10)), x, sigma=0.25, n0=10, n=20)


# --- f, num_classes, keys, n, idx -----------------------------------------------------------------
def test_bad_f_and_num_classes():
    x = px([0.5])
    with pytest.raises(RsjaxError, match="f must be a function"):
        rsjax.certify("model.pth", x, sigma=0.25)
    with pytest.raises(RsjaxError, match="logits of shape \\(B, num_classes\\)"):
        rsjax.certify(lambda z: z[:, 0, 0, 0], x, sigma=0.25, n0=10, n=20)
    with pytest.raises(RsjaxError, match="logits of shape"):
        rsjax.certify(lambda z: jnp.zeros((1, 2)), x, sigma=0.25, n0=10, n=20)  # ignores the batch
    with pytest.raises(RsjaxError, match="num_classes = 10 but f returns 2 logits"):
        rsjax.certify(threshold, x, sigma=0.25, n0=10, n=20, num_classes=10)
    with pytest.raises(RsjaxError, match="f fails on a batch"):
        rsjax.certify(lambda z: z.reshape(-1, 7), x, sigma=0.25, n0=10, n=20)


def test_model_shape_mismatch_is_refused():
    from rsjax.classifier import Classifier

    clf = Classifier(threshold, {"num_classes": 2, "input_shape": [28, 28, 1]})
    with pytest.raises(RsjaxError, match="\\(H, W, C\\) = \\(32, 32, 3\\) but the model expects \\(28, 28, 1\\)"):
        rsjax.certify(clf, np.zeros((1, 32, 32, 3), np.float32), sigma=0.25)


def test_index_and_draw_ranges():
    x = px([0.5])
    with pytest.raises(RsjaxError, match="idx must be in \\[0, 2\\*\\*32\\)"):
        rsjax.certify(threshold, x, sigma=0.25, n0=10, n=20, idx=[2 ** 32])
    with pytest.raises(RsjaxError, match="\\[0, 2\\*\\*32\\)"):
        image_keys(0, np.array([2 ** 32]))  # would wrap to image 0's noise
    with pytest.raises(RsjaxError, match="n must be at most"):
        rsjax.certify(threshold, x, sigma=0.25, n0=10, n=2 ** 31)
    with pytest.raises(RsjaxError, match="seed must be in"):
        rsjax.certify(threshold, x, sigma=0.25, n0=10, n=20, key=2 ** 64)
    with pytest.raises(RsjaxError, match="integer seed or a JAX PRNG key"):
        rsjax.certify(threshold, x, sigma=0.25, n0=10, n=20, key=1.5)
    with pytest.raises(RsjaxError, match="sigma must be finite"):
        rsjax.certify(threshold, x, sigma=float("inf"), n0=10, n=20)
    assert rsjax.certify(threshold, x, sigma=0.25, n0=10, n=20, idx=[2 ** 32 - 1])[0].shape == (1,)
    top, zero = (jax.random.key_data(image_keys(0, np.array([i]))) for i in (2 ** 32 - 1, 0))
    assert not np.array_equal(np.asarray(top), np.asarray(zero))


# --- checksums and finite weights -----------------------------------------------------------------
def _lenet_dir(tmp_path, name="m", **change):
    from rsjax.classifier import save_classifier
    from rsjax.models import build_model

    v = build_model("lenet", 10).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    v = jax.tree_util.tree_map(np.asarray, dict(v))
    meta = {"arch": "lenet", "dataset": "mnist", "num_classes": 10, "input_shape": [28, 28, 1],
            "mean": [0.0], "std": [1.0]}
    return save_classifier(tmp_path / name, v, meta), v


def test_checksum_recorded_and_verified(tmp_path):
    from rsjax.classifier import load_classifier, variables_sha256

    out, v = _lenet_dir(tmp_path)
    meta = json.loads((out / "rsjax_model.json").read_text())
    assert meta["variables_sha256"] == variables_sha256(v)
    clf = load_classifier(out)
    f, m = clf
    assert clf.checksum == meta["variables_sha256"] and clf.num_classes == 10 and clf.input_shape == (28, 28, 1)
    assert m is clf.meta and callable(f)
    # bytes zeroed inside the data files: the variables no longer match the checksum
    meta["variables_sha256"] = "0" * 64
    (out / "rsjax_model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match their checksum") as e:
        load_classifier(out)
    assert "\n" not in str(e.value)
    del meta["variables_sha256"]  # an older conversion: loads, finiteness still checked
    (out / "rsjax_model.json").write_text(json.dumps(meta))
    assert load_classifier(out).checksum == variables_sha256(v)


def test_nonfinite_weights_are_refused(tmp_path):
    import orbax.checkpoint as ocp

    from rsjax.classifier import load_classifier, save_classifier

    out, v = _lenet_dir(tmp_path)
    bad = jax.tree_util.tree_map(np.copy, v)
    bad["params"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
    with pytest.raises(RsjaxError, match="NaN or infinite"):
        save_classifier(tmp_path / "bad", bad, json.loads((out / "rsjax_model.json").read_text()))
    # a NaN written into the stored variables (no checksum to catch it): refused on load
    import shutil

    shutil.rmtree(out / "variables")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out / "variables", bad)
    meta = json.loads((out / "rsjax_model.json").read_text())
    del meta["variables_sha256"]
    (out / "rsjax_model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="params/conv1/kernel hold NaN or infinite"):
        load_classifier(out)
