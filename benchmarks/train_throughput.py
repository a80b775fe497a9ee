"""Training images per second of one step: rsjax vs PyTorch doing the reference's step.

Gaussian augmentation = locuslab/smoothing ``code/train.py`` (noise, forward, cross-entropy,
``SGD(momentum, weight_decay)`` step); MACER = RuntianZ/macer ``macer.py`` (k noisy copies, the two
loss terms, SGD step). Same architecture, batch, machine; repetitions interleaved (rsjax, PyTorch,
rsjax, ...), each the median of ``--steps`` timed steps after warm-up. An image is one training
example (MACER's k copies count once). rsjax runs with the memory settings ``rsjax train`` uses
(``--malloc retain``, rsjax.heap) and PyTorch in a worker process of its own with the C library's
defaults, as its users run it (``--torch-malloc``; both recorded). Writes
benchmarks/results/train_throughput_*.json and a row of benchmarks/results/train_throughput.md.

    python benchmarks/train_throughput.py --model cifar_resnet110 --method macer --batch 64 --k 16
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import device_label, machine, torch_device, versions, write_result  # noqa: E402


def rsjax_stepper(arch, method, batch, k, sigma=0.25, cpu_kernels="xla"):
    """The rsjax step of Cohen's Gaussian augmentation or of MACER with k copies (:func:`objective_stepper`)."""
    from rsjax.training.objectives import MacerConfig, get_objective

    cfg = MacerConfig(gauss_num=k) if method == "macer" else get_objective(method).config()
    return objective_stepper(arch, method, batch, cfg, sigma, cpu_kernels=cpu_kernels)[0]


def torch_stepper(arch, method, batch, k, device, sigma=0.25):
    import torch

    from converters.torch_reference import build_net, macer_loss
    from rsjax.models import input_shape

    h, w, c = input_shape(arch)
    net = build_net(arch, 10).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    inputs0 = torch.rand(batch, c, h, w, device=device)
    targets = torch.randint(0, 10, (batch,), device=device)
    criterion = torch.nn.CrossEntropyLoss()

    def cohen():
        inputs = inputs0 + torch.randn_like(inputs0, device=device) * sigma
        loss = criterion(net(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def macer():
        noise = torch.randn((len(inputs0) * k,) + tuple(inputs0.shape[1:]), device=device)
        loss = macer_loss(net, inputs0, targets, noise, sigma=sigma)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    fn = macer if method == "macer" else cohen

    def run():
        fn()
        if device != "cpu":
            torch.cuda.synchronize()

    return run


class TorchWorker:
    """PyTorch's step in a process of its own, so that it runs with the C library's memory settings
    PyTorch users have (``malloc="default"``) while this process keeps rsjax's (rsjax.heap): the
    settings are process-wide. Repetitions stay interleaved: :meth:`timed` runs ``steps`` steps there
    and returns their median, while this process waits."""

    def __init__(self, arch, method, batch, k, device, malloc):
        import subprocess

        code = ("import sys\n"
                "sys.path.insert(0, sys.argv[1])\n"
                "if sys.argv[2] == 'retain':\n"
                "    from rsjax.heap import retain_freed_memory; retain_freed_memory()\n"
                "from benchmarks.train_throughput import _torch_worker; _torch_worker(*sys.argv[3:])\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), malloc, arch, method, str(batch),
             str(k), device], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the PyTorch worker did not start")

    def timed(self, steps):
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the PyTorch worker stopped (exit status {self.proc.wait()})")
        return float(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def _torch_worker(arch, method, batch, k, device):
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    run = torch_stepper(arch, method, int(batch), int(k), device)
    print("ready", flush=True)
    for line in sys.stdin:
        print(timed(run, int(line)), flush=True)


def timed(run, steps):
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--method", default="gaussian", choices=("gaussian", "macer"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=16, help="MACER noisy copies")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--torch-device", default="auto")
    p.add_argument("--shared", action="store_true", help="record that the machine was shared")
    p.add_argument("--cpu-kernels", nargs="+", default=["xla"], choices=("xla", "onednn", "auto"),
                   help="rsjax's convolution kernels (rsjax train --cpu-kernels); several are interleaved "
                        "with PyTorch in the same repetitions, one record each")
    p.add_argument("--malloc", default="retain", choices=("retain", "default"),
                   help="rsjax's process: retain = glibc keeps freed memory (rsjax.heap), as rsjax train does")
    p.add_argument("--torch-malloc", default="default", choices=("retain", "default"),
                   help="PyTorch's process (its steps run in a worker process of their own): default = as "
                        "PyTorch users run it")
    args = p.parse_args(argv)
    from rsjax.heap import retain_freed_memory

    malloc = retain_freed_memory() if args.malloc == "retain" else "default"
    dev = torch_device(args.torch_device)
    rs = {kern: rsjax_stepper(args.model, args.method, args.batch, args.k, cpu_kernels=kern)
          for kern in args.cpu_kernels}
    pt = TorchWorker(args.model, args.method, args.batch, args.k, dev, args.torch_malloc)
    for _ in range(2):  # warm-up / compilation
        for run in rs.values():
            run()
        pt.timed(1)
    reps = []
    for r in range(args.reps):
        rep = {kern: timed(run, args.steps) for kern, run in rs.items()}
        rep["torch_s"] = pt.timed(args.steps)
        reps.append(rep)
        print(f"rep {r}: " + ", ".join(f"rsjax[{kern}] {args.batch / rep[kern]:.1f}" for kern in rs)
              + f", torch {args.batch / rep['torch_s']:.1f} img/s", flush=True)
    pt.close()
    pt_ips = statistics.median(args.batch / x["torch_s"] for x in reps)
    load = os.getloadavg()
    header = ("| model | method | batch | k | device | rsjax img/s | PyTorch img/s | speedup | load | shared |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kern in rs:
        rs_ips = statistics.median(args.batch / x[kern] for x in reps)
        rec = {**machine(), "versions": versions(), "model": args.model, "method": args.method, "batch": args.batch,
               "k": args.k if args.method == "macer" else None, "dtype": "float32", "cpu_kernels": kern,
               "reps": [{"rsjax_s": x[kern], "torch_s": x["torch_s"]} for x in reps],
               "rsjax_images_per_s": rs_ips, "torch_images_per_s": pt_ips, "speedup": rs_ips / pt_ips,
               "interleaved_with": list(rs), "torch_device": dev, "load_avg": load, "shared_machine": args.shared,
               "steps": args.steps, "malloc": malloc, "torch_malloc": args.torch_malloc,
               "torch_process": "worker"}
        label = device_label(rec) + (f", {kern} kernels" if dev == "cpu" else "")
        row = (f"| {args.model} | {args.method} | {args.batch} | {rec['k'] or ''} | {label} | {rs_ips:.1f} | "
               f"{pt_ips:.1f} | {rs_ips / pt_ips:.2f}x | {load[0]:.1f} | {'yes' if args.shared else 'no'} |")
        path = write_result("train_throughput", rec, row, header)
        print(row)
        print(f"wrote {path}")


# ------------------------------------------------------------------ data-dependent objectives (DS, Insta-RS)
def step_flops(step_fn, state, batch, epoch) -> float:
    """XLA's FLOP count of the compiled step (``cost_analysis``: a loop body counts once)."""
    import jax

    cost = jax.jit(step_fn).lower(state, batch, epoch).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def objective_stepper(arch, method, batch, obj_cfg, sigma=0.25, *, flops=False, cpu_kernels="xla"):
    """``(run, flops)``: ``run()`` is one jitted rsjax step of ``method`` on a fixed random batch, with
    its per-example table (rows = the batch; empty for Gaussian and MACER) in its last phase;
    ``flops`` is XLA's FLOP count of the step when asked for (else None)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from rsjax.models import build_model, input_shape
    from rsjax.training import step as S
    from rsjax.training.objectives import get_objective

    shape = input_shape(arch)
    model = build_model(arch, 10)
    v = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape)))
    obj = get_objective(method)
    c = shape[-1]
    from rsjax.kernels.onednn_train import resolve

    mesh = Mesh(np.array(jax.devices()), ("data",))
    apply = functools.partial(S.train_apply, model, np.zeros(c, np.float32), np.ones(c, np.float32),
                              onednn=resolve(cpu_kernels), mesh=mesh)
    tx = S.make_optimizer(lr=0.01, schedule="constant", gamma=0.1, epochs=1, steps_per_epoch=100, momentum=0.9,
                          weight_decay=5e-4)
    params, bs = v["params"], v.get("batch_stats", {})
    table = {k: jnp.asarray(a) for k, a in obj.init_example_state(obj_cfg, batch, sigma).items()}
    names = S.metric_names(obj, obj_cfg, apply, num_classes=10, x_shape=(batch,) + shape, example_state=table,
                           params=params, batch_stats=bs)
    state = S.TrainState(params=params, batch_stats=bs, opt_state=tx.init(params), example_state=table,
                         sums=S.zero_sums(names), step=jnp.int32(0))
    state = jax.device_put(state, S.state_shardings(mesh, state))
    step = S.make_train_step(obj, obj_cfg, tx, apply, mesh, state, seed=0, sigma=sigma, num_classes=10)
    rng = np.random.default_rng(0)
    b = {"x": rng.random((batch,) + shape, dtype=np.float32), "y": rng.integers(0, 10, batch).astype(np.int32),
         "idx": np.arange(batch, dtype=np.int32), "row": np.arange(batch, dtype=np.int32)}
    b = jax.device_put(b, S.batch_sharding(mesh))
    box = [state]
    phase = obj.phase(obj_cfg, 10 ** 6)
    count = None
    if flops:
        count = step_flops(lambda st, bb, e: S.step_fn(obj, obj_cfg, tx, apply, seed=0, sigma=sigma, num_classes=10,
                                                       phase=phase, state=st, batch=bb, epoch=e), state, b, np.int32(0))

    def run():
        box[0], sums = step(box[0], b, np.int32(0), phase)
        jax.block_until_ready(sums)

    return run, count


def data_dependent_main(argv=None):
    """Cost of DS-Gaussian, DS-MACER and Insta-RS Train steps over the plain step on the same model and
    batch (rsjax only, interleaved): ``python benchmarks/train_throughput.py data-dependent --model lenet``.
    The bound of the issue: the DS sigma update should cost less than K_tr extra forward-backward passes
    per example, i.e. ds_time < (1 + K_tr * n) * gaussian_time for DS-Gaussian (k = 1)."""
    p = argparse.ArgumentParser(description=data_dependent_main.__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ds-steps", type=int, default=5)
    p.add_argument("--ds-n", type=int, default=1)
    p.add_argument("--instars-n", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shared", action="store_true", help="record that the machine was shared")
    args = p.parse_args(argv)
    from rsjax.training.ds import DSConfig
    from rsjax.training.instars_train import InstaRSTrainConfig
    from rsjax.training.objectives import get_objective

    steppers = {
        "gaussian": objective_stepper(args.model, "gaussian", args.batch, get_objective("gaussian").config(),
                                      flops=True),
        "ddrs-gaussian": objective_stepper(args.model, "ddrs-gaussian", args.batch,
                                           DSConfig(ds_steps=args.ds_steps, ds_n=args.ds_n), flops=True),
        "instars": objective_stepper(args.model, "instars", args.batch,
                                     InstaRSTrainConfig(instars_stage1_epochs=0, instars_n=args.instars_n), flops=True),
    }
    runs = {k: v[0] for k, v in steppers.items()}
    flops = {k: v[1] for k, v in steppers.items()}
    # cost_analysis counts a loop body once: the DS step's FLOPs are those of K_tr = 0 plus K_tr times
    # the increment of one ascent step
    f0, f1 = (objective_stepper(args.model, "ddrs-gaussian", args.batch, DSConfig(ds_steps=k, ds_n=args.ds_n),
                                flops=True)[1] for k in (0, 1))
    flops["ddrs-gaussian"] = f0 + args.ds_steps * (f1 - f0)
    for run in runs.values():
        run(), run()  # compilation
    reps = []
    for _ in range(args.reps):
        reps.append({name: timed(run, args.steps) for name, run in runs.items()})
        print({k: f"{args.batch / v:.1f} img/s" for k, v in reps[-1].items()}, flush=True)
    med = {k: statistics.median(r[k] for r in reps) for k in runs}
    rec = {**machine(), "versions": versions(), "model": args.model, "batch": args.batch, "dtype": "float32",
           "ds_steps": args.ds_steps,
           "ds_n": args.ds_n, "instars_n": args.instars_n, "reps": reps, "step_s": med,
           "ratio_to_gaussian": {k: med[k] / med["gaussian"] for k in med}, "step_flops": flops,
           "flops_ratio_to_gaussian": {k: flops[k] / flops["gaussian"] for k in flops},
           "ds_bound_ratio": 1 + args.ds_steps * args.ds_n, "load_avg": os.getloadavg(), "shared_machine": args.shared}
    header = ("| model | batch | K_tr x n | gaussian img/s | DS-Gaussian img/s (x cost) | bound 1 + K_tr n | "
              "Insta-RS img/s (x cost) | load | shared | DS-Gaussian x FLOPs |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    r = rec["ratio_to_gaussian"]
    row = (f"| {args.model} | {args.batch} | {args.ds_steps} x {args.ds_n} | {args.batch / med['gaussian']:.0f} | "
           f"{args.batch / med['ddrs-gaussian']:.0f} ({r['ddrs-gaussian']:.2f}x) | {rec['ds_bound_ratio']} | "
           f"{args.batch / med['instars']:.0f} ({r['instars']:.2f}x) | {rec['load_avg'][0]:.1f} | "
           f"{'yes' if args.shared else 'no'} | {rec['flops_ratio_to_gaussian']['ddrs-gaussian']:.2f}x |")
    path = write_result("train_throughput_data_dependent", rec, row, header)
    print(row)
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["data-dependent"]:
        data_dependent_main(sys.argv[2:])
    else:
        main()
