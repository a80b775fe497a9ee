"""Data parallel over local devices (4 forced CPU devices) and multi-host parts (2 local processes)."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rsjax.cli import main
from rsjax.distributed import host_share, part_path

FOUR_DEVICES = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from rsjax.core.sampler import image_keys, make_counter
    from rsjax.models import build_model

    assert len(jax.local_devices()) == 4, jax.local_devices()

    def threshold(x):
        v = x[:, 0, 0, 0]
        return jnp.stack([0.5 - v, v - 0.5, jnp.full_like(v, -10.0)], axis=-1)

    x = jnp.zeros((3, 2, 2, 1)).at[:, 0, 0, 0].set(jnp.array([0.45, 0.5, 0.62]))
    sigma, keys = jnp.array([0.1, 0.3, 0.2]), image_keys(5, np.array([7, 8, 9]))
    par = make_counter(threshold, 3, samples_per_step=7)  # default: all 4 local devices
    assert par.mesh.devices.size == 4
    one = make_counter(threshold, 3, samples_per_step=7, devices=jax.local_devices()[:1])
    for num, offset in ((1, 0), (3, 0), (50, 0), (101, 0), (30, 17)):
        a = np.asarray(one(x, sigma, keys, num=num, offset=offset))
        for d in (2, 3, 4):  # every mesh size: each draw evaluated exactly once, the same counts
            b = np.asarray(make_counter(threshold, 3, samples_per_step=7, devices=jax.local_devices()[:d])(
                x, sigma, keys, num=num, offset=offset))
            assert a.sum() == 3 * num and (a == b).all(), (num, offset, d, a, b)
    # the core's Counter (groups, padding, candidate copies, non-finite column) on 1 and 4 devices
    from rsjax.core.sampler import Counter

    def nan_above(x):  # NaN logits where the noisy pixel exceeds 0.7
        v = x[:, 0, 0, 0]
        out = jnp.stack([0.5 - v, v - 0.5], axis=-1)
        return jnp.where((v > 0.7)[:, None], jnp.nan, out)

    x5 = jnp.zeros((5, 2, 2, 1)).at[:, 0, 0, 0].set(jnp.array([0.4, 0.5, 0.6, 0.7, 0.8]))
    k5 = image_keys(2, np.arange(5), "search")
    c1 = Counter(nan_above, 2, 64, devices=jax.local_devices()[:1])
    c4 = Counter(nan_above, 2, 64)
    a, b = c1.counts(x5, np.full(5, 0.2), k5, 77), c4.counts(x5, np.full(5, 0.2), k5, 77)
    assert (a == b).all() and (a.sum(axis=1) == 77).all() and a[:, 2].min() > 0, (a, b)
    sig = np.array([[0.1, 0.3]] * 5)
    assert (c1.candidates(x5, sig, k5, 40) == c4.candidates(x5, sig, k5, 40)).all()
    # a real network (LeNet, random weights): same histogram as one device
    net = build_model("lenet", 10)
    xs = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
    v = net.init(jax.random.key(1), xs[:1])
    f = lambda z: net.apply(v, z)
    k2, s2 = image_keys(0, np.array([3, 4])), jnp.array([0.5, 1.0])
    a = np.asarray(make_counter(f, 10, samples_per_step=16, devices=jax.local_devices()[:1])(xs, s2, k2, num=90))
    b = np.asarray(make_counter(f, 10, samples_per_step=16)(xs, s2, k2, num=90))
    assert (a == b).all() and (a.max(axis=1) < 90).all(), (a, b)
    # the same network carrying its weights (f.apply(f.variables, x), as load_classifier's f):
    # they travel as an argument of the compiled counter, on one device and on four
    g = lambda z: net.apply(v, z)
    g.apply, g.variables = net.apply, v
    for devices in (jax.local_devices()[:1], None):
        c = np.asarray(make_counter(g, 10, samples_per_step=16, devices=devices)(xs, s2, k2, num=90))
        assert (c == a).all(), (c, a)
    # weights committed to one device still run on all four
    h = lambda z: net.apply(v, z)
    h.apply, h.variables = net.apply, jax.device_put(v, jax.local_devices()[1])
    c = np.asarray(make_counter(h, 10, samples_per_step=16)(xs, s2, k2, num=90))
    assert (c == a).all(), (c, a)
    print("OK")
    """
)

HOST = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from rsjax.core.certify import certify
    from rsjax.core.io import CERTIFY_COLUMNS, ResultWriter
    from rsjax.distributed import host_share, initialize, part_path

    port, k, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if n > 1:
        assert initialize(f"localhost:{port}", n, k) == (k, n)

    def threshold(x):
        v = x[:, 0, 0, 0]
        return jnp.stack([0.5 - v, v - 0.5, jnp.full_like(v, -10.0)], axis=-1)

    values = np.linspace(0.3, 0.7, 11)
    idx = host_share(np.arange(11), k, n)
    x = np.zeros((len(idx), 2, 2, 1), np.float32)
    x[:, 0, 0, 0] = values[idx]
    labels = (values[idx] > 0.5).astype(int)
    pred, radius, _ = certify(threshold, x, sigma=0.25, n0=64, n=500, alpha=0.01, key=3, idx=idx,
                              batch_size=128, num_classes=3)
    path = part_path(out, k, n) if n > 1 else out
    with ResultWriter(path, CERTIFY_COLUMNS, {"sigma": 0.25, "N": 500}) as w:
        for i in range(len(idx)):
            w.write([int(idx[i]), int(labels[i]), int(pred[i]), float(radius[i]), int(pred[i] == labels[i]), 0.0])
    print("OK", k, n, idx.tolist())
    """
)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    env.update(extra)
    return env


def test_four_local_devices_give_the_counts_of_one():
    r = subprocess.run([sys.executable, "-c", FOUR_DEVICES], capture_output=True, text=True, timeout=300,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-3000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_parts_that_merge_into_the_single_run(tmp_path):
    out = tmp_path / "certify.tsv"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", HOST, str(port), str(k), "2", str(out)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, logs):
        assert p.returncode == 0, o + e[-3000:]
    assert "[0, 2, 4, 6, 8, 10]" in logs[0][0] and "[1, 3, 5, 7, 9]" in logs[1][0]
    single = tmp_path / "single.tsv"
    r = subprocess.run([sys.executable, "-c", HOST, "0", "0", "1", str(single)], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = tmp_path / "merged.tsv"
    assert main(["merge", part_path(out, 1, 2), part_path(out, 0, 2), "-o", str(merged)]) == 0
    assert merged.read_text() == single.read_text()
    rows = [ln for ln in merged.read_text().splitlines() if not ln.startswith("#")][1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(11))
    assert len({r.split("\t")[2] for r in rows}) >= 2  # both classes (or abstains) occur: a real check


def test_host_shares_are_disjoint_and_cover():
    idx = np.arange(0, 100, 20)
    shares = [host_share(idx, k, 3) for k in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == idx.tolist()
    assert shares[0].tolist() == [0, 60] and shares[2].tolist() == [40]
    with pytest.raises(Exception, match="process index"):
        host_share(idx, 3, 3)


def test_part_names():
    assert part_path("out/c.tsv", 1, 4) == "out/c.tsv.part1of4"


def test_xla_settings_keep_the_users_flags():
    from rsjax.xla import merged_xla_flags

    got = merged_xla_flags(["--a=1", "--b=2"], "--b=7 --xla_force_host_platform_device_count=4")
    assert got.split() == ["--b=7", "--xla_force_host_platform_device_count=4", "--a=1"]
    assert merged_xla_flags([], "") == ""


@pytest.mark.parametrize("choice,command", [("rsjax", "certify"), ("default", "certify"), ("rsjax", "train")])
def test_device_commands_apply_the_xla_settings_unless_opted_out(choice, command, tmp_path):
    """`rsjax certify/predict` set rsjax.xla's flags before JAX starts; RSJAX_XLA=default opts out;
    `rsjax train` gets the compilation cache but not the inference flags (slower training steps)."""
    code = ("import os, jax; from rsjax.cli import apply_xla_settings; from rsjax.xla import CPU_FLAGS; "
            f"apply_xla_settings({command!r}); jax.numpy.zeros(1); flags = os.environ.get('XLA_FLAGS', '').split(); "
            "print(all(f in flags for f in CPU_FLAGS), any(f in flags for f in CPU_FLAGS))")
    env = _env(RSJAX_XLA=choice, XDG_CACHE_HOME=str(tmp_path))
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    on = choice == "rsjax" and command != "train"
    assert r.stdout.split() == (["True", "True"] if on else ["False", "False"])


def _rows_without_time(path):
    lines = [ln for ln in open(path).read().splitlines() if not ln.startswith("#")]
    t = lines[0].split("\t").index("time")
    return [tuple(c for j, c in enumerate(ln.split("\t")) if j != t) for ln in lines]


def test_certify_command_distributed_over_two_processes_merges_into_the_single_run(tmp_path, shared_data):
    """`rsjax certify --distributed` in two local processes (jax.distributed on CPU), real MNIST
    LeNet: each writes its share as OUTFILE.part<k>of2; `rsjax merge` gives the single run's rows."""
    from converters.pytorch import convert_checkpoint

    model = tmp_path / "lenet"
    convert_checkpoint(shared_data / "models/mnist_lenet_noise0.25/checkpoint.pth.tar", model, log=lambda s: None)
    out, single = tmp_path / "dist.tsv", tmp_path / "single.tsv"
    common = ["mnist", str(model), "0.25", None, "--N0", "20", "--N", "200", "--batch", "200", "--skip", "1500",
              "--no-progress"]

    def cmd(path, *extra):
        args = list(common)
        args[3] = str(path)
        return [sys.executable, "-m", "rsjax", "certify"] + args + list(extra)

    port = _free_port()
    procs = [subprocess.Popen(cmd(out, "--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                                  "--process-id", str(k)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in range(2)]
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, logs):
        assert p.returncode == 0, o + e[-3000:]
    r = subprocess.run(cmd(single), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = [_rows_without_time(part_path(out, k, 2)) for k in range(2)]
    assert [int(row[0]) for row in parts[0][1:]] == [0, 3000, 6000, 9000]
    assert [int(row[0]) for row in parts[1][1:]] == [1500, 4500, 7500]
    merged = tmp_path / "merged.tsv"
    assert main(["merge", part_path(out, 0, 2), part_path(out, 1, 2), "-o", str(merged)]) == 0
    assert _rows_without_time(merged) == _rows_without_time(single)
