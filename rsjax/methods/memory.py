"""Memory-based certification (DDRS, Alfarra et al. 2022; reference post-processing in
MotasemAlfarra/Data_Dependent_Randomized_Smoothing).

With sigma chosen per input, two certified balls can overlap with different labels, so the
input-adaptive classifier x -> g_{sigma(x)}(x) is not globally consistent. The memory processes
the certified test points in dataset order and keeps M = {(x_j, c_j, R_j)}. For a new
certificate (x, c, R):

  1. conflicts J = { j : c_j != c and ||x - x_j||_2 < R + R_j }  (balls of another class that
     intersect the new ball);
  2. J empty: keep (c, R);
  3. else R' = min_{j in J} (||x - x_j|| - R_j), j* the minimiser:
       R' < 0  -> x lies inside the stored ball of j*: adopt c_{j*}, radius R_{j*} - ||x - x_j*||
                  (the part of that ball still around x);
       R' >= 0 -> shrink: radius R' (<= R), the new ball only touches the conflicting balls;
  4. store the (possibly changed) (x, c, R) and output it.

Only the incoming certificate changes; stored entries keep their radii (as the reference
post-processing). Distances use the flattened [0, 1] image. The reference script's min/argmin
bug is avoided (argmin is explicit).

Abstentions (this library's choice; the paper is silent): an abstained point (c = -1, R = 0) is looked up like any
other (so it adopts the class of a stored ball that contains it, with the remaining radius) but
is never stored itself - an abstention certifies nothing.

The search for conflicts runs on the device: the memory lives in padded device arrays (the
capacity doubles when needed, so a run compiles O(log N) times) and one jitted ``lax.scan``
walks a batch of new certificates in order, each seeing the ones before it. The memory is saved
(atomically) to ``OUTFILE.memory.npz`` after each batch, so a resumed run continues it;
``changed`` counts the certificates it changed (class or radius).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rsjax.errors import RsjaxError

ABSTAIN = -1
MIN_CAPACITY = 64  # device slots of an empty memory; doubled as needed (O(log N) compilations)


@jax.jit
def _resolve(mem_x, mem_c, mem_r, count, xb, cb, rb):
    """Scan the batch (xb (B,D), cb (B,), rb (B,)) through the memory in order (see module doc).

    Returns (mem_x, mem_c, mem_r, count, out_c, out_r)."""
    cap = mem_x.shape[0]
    slots = jnp.arange(cap)

    def step(carry, item):
        mx, mc, mr, cnt = carry
        x, c, r = item
        d = jnp.sqrt(jnp.sum(jnp.square(mx - x[None]), axis=1))
        conflict = (slots < cnt) & (mc != c) & (d < r + mr)
        gap = jnp.where(conflict, d - mr, jnp.inf)
        j = jnp.argmin(gap)
        rp = gap[j]
        hit = jnp.any(conflict)
        inside = hit & (rp < 0)
        new_c = jnp.where(inside, mc[j], c)
        new_r = jnp.where(hit, jnp.where(inside, -rp, rp), r)
        store = new_c != ABSTAIN
        pos = jnp.minimum(cnt, cap - 1)
        mx = mx.at[pos].set(jnp.where(store, x, mx[pos]))
        mc = mc.at[pos].set(jnp.where(store, new_c, mc[pos]))
        mr = mr.at[pos].set(jnp.where(store, new_r, mr[pos]))
        cnt = cnt + store.astype(cnt.dtype)
        return (mx, mc, mr, cnt), (new_c, new_r)

    (mem_x, mem_c, mem_r, count), (out_c, out_r) = jax.lax.scan(step, (mem_x, mem_c, mem_r, count), (xb, cb, rb))
    return mem_x, mem_c, mem_r, count, out_c, out_r


def _has_rows(out_path) -> bool:
    """Whether a certify output holds at least one data row (beyond '#' settings and the header)."""
    try:
        with open(out_path) as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.startswith("#")]
    except OSError:
        return False
    return len(lines) > 1


class Memory:
    """The stateful memory-based certifier (see module docstring).

    ``update(x, predict, radius, idx=None) -> (predict, radius)``: numpy arrays for one batch of
    images in dataset order; ``save()``; ``changed``; ``len(memory)`` stored certificates.
    When ``idx`` is given, images already in the memory (a resumed run re-feeding them) get
    their stored answer back and are not stored twice.
    """

    def __init__(self, path=None):
        self.path = None if path is None else Path(path)
        self.changed = 0
        self._dim = None
        self._cap = 0
        self._count = 0
        self._dev = None  # (mem_x, mem_c, mem_r) device arrays of capacity self._cap
        self._idx = np.zeros(0, np.int64)  # dataset index of each stored entry (-1: unknown)
        self._seen = {}  # idx -> (predict, radius) for every image fed with an idx

    # --- persistence --------------------------------------------------------------------------
    @classmethod
    def for_output(cls, out_path, fresh=False):
        """The memory saved next to the certify output (``OUTFILE.memory.npz``).

        It is loaded when it exists and the output already holds certified rows (a resumed run);
        with ``fresh`` (``--overwrite``) or an output without rows it starts empty (the stale
        file is replaced at the first save)."""
        path = Path(str(out_path) + ".memory.npz")
        mem = cls(path)
        if path.exists() and not fresh and _has_rows(out_path):
            mem.load(path)
        return mem

    def load(self, path):
        try:
            z = np.load(path)
            x, c, r, idx = z["x"], z["c"], z["r"], z["idx"]
            seen_idx, seen_c, seen_r = z["seen_idx"], z["seen_c"], z["seen_r"]
            self.changed = int(z["changed"])
        except (OSError, KeyError, ValueError) as e:
            raise RsjaxError(f"cannot read the certification memory {path}: {e}") from None
        self._count = 0
        self._dev = None
        self._dim = x.shape[1] if x.size else None
        if x.shape[0]:
            self._ensure(x.shape[1], x.shape[0])
            mx, mc, mr = self._dev
            n = x.shape[0]
            self._dev = (mx.at[:n].set(jnp.asarray(x)), mc.at[:n].set(jnp.asarray(c, jnp.int32)),
                         mr.at[:n].set(jnp.asarray(r, jnp.float32)))
            self._count = n
        self._idx = idx.astype(np.int64)
        self._seen = {int(i): (int(a), float(b)) for i, a, b in zip(seen_idx, seen_c, seen_r)}
        return self

    def arrays(self):
        """(x (N, D) float32, class (N,), radius (N,), idx (N,)) of the stored certificates."""
        if self._dev is None or self._count == 0:
            d = self._dim or 0
            return np.zeros((0, d), np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32), self._idx[:0]
        mx, mc, mr = self._dev
        n = self._count
        return np.asarray(mx[:n]), np.asarray(mc[:n]), np.asarray(mr[:n]), self._idx[:n]

    def save(self):
        if self.path is None:
            return
        x, c, r, idx = self.arrays()
        seen = sorted(self._seen.items())
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, x=x, c=c, r=r, idx=idx, changed=np.int64(self.changed),
            seen_idx=np.array([k for k, _ in seen], np.int64),
            seen_c=np.array([v[0] for _, v in seen], np.int64),
            seen_r=np.array([v[1] for _, v in seen], np.float64),
        )
        os.replace(tmp, self.path)

    def __len__(self):
        return self._count

    # --- the update ---------------------------------------------------------------------------
    def _ensure(self, dim, need):
        if self._dim is not None and dim != self._dim:
            raise RsjaxError(f"memory holds images of {self._dim} values, got {dim}")
        self._dim = dim
        if need <= self._cap and self._dev is not None:
            return
        cap = max(MIN_CAPACITY, self._cap)
        while cap < need:
            cap *= 2
        mx = jnp.zeros((cap, dim), jnp.float32)
        mc = jnp.full((cap,), ABSTAIN, jnp.int32)
        mr = jnp.zeros((cap,), jnp.float32)
        if self._dev is not None and self._count:
            ox, oc, orr = self._dev
            n = self._count
            mx, mc, mr = mx.at[:n].set(ox[:n]), mc.at[:n].set(oc[:n]), mr.at[:n].set(orr[:n])
        self._dev, self._cap = (mx, mc, mr), cap

    def update(self, x, predict, radius, idx=None):
        x = np.asarray(x, np.float32)
        b = x.shape[0]
        predict = np.asarray(predict, np.int64).reshape(b)
        radius = np.asarray(radius, np.float64).reshape(b)
        out_c, out_r = predict.copy(), radius.copy()
        if b == 0:
            return out_c, out_r
        fresh = np.ones(b, bool)
        if idx is not None:
            idx = np.asarray(idx, np.int64).reshape(b)
            for i, k in enumerate(idx):
                if int(k) in self._seen:
                    out_c[i], out_r[i] = self._seen[int(k)]
                    fresh[i] = False
        sel = np.flatnonzero(fresh)
        if sel.size == 0:
            return out_c, out_r
        flat = x[sel].reshape(sel.size, -1)
        self._ensure(flat.shape[1], self._count + sel.size)
        mx, mc, mr = self._dev
        mx, mc, mr, count, nc, nr = _resolve(mx, mc, mr, jnp.int32(self._count), jnp.asarray(flat),
                                             jnp.asarray(predict[sel], jnp.int32),
                                             jnp.asarray(radius[sel], jnp.float32))
        nc, nr = np.asarray(nc, np.int64), np.asarray(nr, np.float64)
        new_count = int(count)
        stored = nc != ABSTAIN
        new_idx = idx[sel][stored] if idx is not None else np.full(int(stored.sum()), -1, np.int64)
        self._idx = np.concatenate([self._idx[: self._count], new_idx])
        self._dev, self._count = (mx, mc, mr), new_count
        # the radius went through float32 on the device: only report a change where it is real
        changed_r = np.abs(nr - radius[sel]) > 1e-6 * np.maximum(1.0, np.abs(radius[sel]))
        changed = (nc != predict[sel]) | changed_r
        self.changed += int(changed.sum())
        out_c[sel] = nc
        out_r[sel] = np.where(changed, nr, radius[sel])
        if idx is not None:
            for i in sel:
                self._seen[int(idx[i])] = (int(out_c[i]), float(out_r[i]))
        return out_c, out_r
