"""The opt-in bfloat16 forward keeps clean accuracy on real data (within 0.5 points of float32).

Real CIFAR-10 ResNet-20 (Cohen checkpoint format, ../shared/data/models) converted with the
project's converter, evaluated on the 1017 real CIFAR-10 test images held in ../shared/data.
The certificate is valid for the classifier actually evaluated; this test is the evidence that
the bfloat16 classifier is (almost) the same classifier, so users can opt in knowingly.
"""

import jax
import numpy as np
import pytest



@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_data):
    from converters.pytorch import convert_checkpoint

    out = tmp_path_factory.mktemp("bf16") / "model"
    src = shared_data / "models" / "cifar10_resnet20_noise0.25" / "checkpoint.pth.tar"
    convert_checkpoint(src, out, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def cifar(shared_data):
    from rsjax.data import load_dataset

    ds = load_dataset("cifar10", "test", shared_data / "cifar10")
    return ds.batch(np.arange(len(ds)))


def predictions(apply, variables, x, batch=512):
    fn = jax.jit(apply)
    return np.concatenate([np.asarray(fn(variables, x[i:i + batch])).argmax(1) for i in range(0, len(x), batch)])


def accuracy_pair(converted, cifar, fold32, fold16):
    from rsjax.classifier import load_classifier

    x, y = cifar
    f32, _ = load_classifier(converted, dtype="float32", fold_bn=fold32)
    f16, _ = load_classifier(converted, dtype="bfloat16", fold_bn=fold16)
    p32 = predictions(f32.apply, f32.variables, x)
    p16 = predictions(f16.apply, f16.variables, x)
    return 100 * np.mean(p32 == y), 100 * np.mean(p16 == y), np.mean(p16 == p32)


def test_bfloat16_clean_accuracy_within_half_a_point(converted, cifar):
    assert len(cifar[1]) == 1017
    acc32, acc16, agree = accuracy_pair(converted, cifar, fold32=False, fold16=False)
    print(f"clean accuracy float32 {acc32:.2f}%, bfloat16 {acc16:.2f}%, same prediction {100 * agree:.1f}%")
    # the converted model has its known PyTorch accuracy (69.5% clean, shared data README)
    assert abs(acc32 - 69.5) < 0.5, acc32
    assert abs(acc16 - acc32) <= 0.5, (acc32, acc16)
    assert agree > 0.97  # and it is nearly the same classifier image by image


def test_folded_bfloat16_clean_accuracy_within_half_a_point(converted, cifar):
    """The fast path (BatchNorm folded, bfloat16 forward) against the plain float32 network."""
    acc32, acc16, agree = accuracy_pair(converted, cifar, fold32=False, fold16=True)
    print(f"clean accuracy float32 {acc32:.2f}%, folded bfloat16 {acc16:.2f}%, same prediction {100 * agree:.1f}%")
    assert abs(acc16 - acc32) <= 0.5, (acc32, acc16)
    assert agree > 0.97
