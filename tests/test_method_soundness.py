"""Sample splitting of the input-specific sigma methods: the draws that choose sigma are never
the certificate's, and a known-truth coverage test shows why that matters.

Known truth: a half-space classifier (class 0 iff v < BOUNDARY) at v = V0. For every sigma the
smoothed classifier g_sigma is the same half-space, so the true certified radius of g_sigma at x
is exactly BOUNDARY - V0 (pA(sigma) = Phi((BOUNDARY - V0) / sigma)). A certificate *violates* if it
predicts class 1 or certifies class 0 with a larger radius; CERTIFY guarantees this happens with
probability <= alpha for any sigma fixed independently of the certificate's draws.

Negative control: the same pipeline with the certificate's estimation counts taken from the very
draws that decided sigma (the search's last round) must over-certify far beyond alpha - the
test has teeth - while the proper pipeline (fresh 'estimate' draws) stays within alpha.
"""

import numpy as np
import pytest

import rsjax.core.sampler as sampler
from rsjax.core import stats
from rsjax.core.certify import Smoother
from rsjax.methods import get_method
from rsjax.methods._common import method_keys, round_keys
from tests._helpers_methods import TRUE_RADIUS, V0, build, halfspace, images

ALPHA = 0.05  # a large alpha keeps the test small: violations are frequent enough to count
TRIALS = 600
SEED = 11
N0 = 100
META = {"num_classes": 2, "input_shape": [1, 1, 1], "sigma": None}
# configurations whose deciding draws are n = N_EST draws of one sub-stream of 'search'
OPTIONS = {
    "qcrs": ["--epsilon", "0.2", "--left", "0.1", "--right", "1.0", "--gradient_n", "300",
             "--qcrs-alpha", str(ALPHA), "--qcrs-no-check"],  # one grid round of 16 x 112 draws
    "instars": ["--instars-n", "112", "--instars-steps", "2", "--instars-exponents=-1,0,1,2",
                "--instars-alpha", str(ALPHA)],
    "ddrs": ["--ddrs-lr", "1e-2", "--ddrs-steps", "20", "--ddrs-n", "4"],
}
N_EST = 112
# the sub-stream of 'search' whose draws decided sigma (see each method's module docstring)
DECIDING_SUBSTREAM = {"qcrs": 1, "instars": 3}
LIMIT = ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / TRIALS)  # what alpha allows, with 3 s.d. slack


def violations(pred, radius):
    return (pred == 1) | ((pred == 0) & (radius > TRUE_RADIUS + 1e-9))


def choose(name):
    method = get_method(name)
    chooser = build(method, OPTIONS[name], halfspace, META, seed=SEED, batch=1 << 16)
    x = images([V0] * TRIALS)
    idx = np.arange(TRIALS)
    sigma, _ = chooser(x, idx, np.full(TRIALS, 0.3))
    return chooser, x, idx, np.asarray(sigma)


@pytest.fixture(scope="module")
def outcomes():
    out = {}
    sm = Smoother(halfspace, 2, 1 << 16)
    for name in ("qcrs", "instars", "ddrs"):
        chooser, x, idx, sigma = choose(name)
        pred, radius, _, _ = sm.certify(x, sigma, n0=N0, n=N_EST, alpha=ALPHA, key=SEED, idx=idx)
        res = {"sigma": sigma, "proper": violations(pred, radius).mean()}
        if name in DECIDING_SUBSTREAM:
            counter = (chooser.qcrs if name == "qcrs" else chooser.insta).counter
            keys = round_keys(method_keys(SEED, idx, "search"), DECIDING_SUBSTREAM[name])
            reused = counter.candidates(x, sigma[:, None], keys, N_EST)[:, 0, :2]
            counts0 = sm.counts(x, sigma, sampler.image_keys(SEED, idx, "select"), N0)[:, :2]
            p, r, _ = stats.certify_from_counts(counts0, reused, sigma, ALPHA)
            res["reused"] = violations(p, r).mean()
        out[name] = res
    print("\nviolation rates (alpha = %g, %d trials, limit %.3f):" % (ALPHA, TRIALS, LIMIT),
          {k: {kk: round(float(vv), 4) for kk, vv in v.items() if kk != "sigma"} for k, v in out.items()})
    return out


@pytest.mark.parametrize("name", ["qcrs", "instars", "ddrs"])
def test_fresh_certificates_hold_their_alpha(outcomes, name):
    res = outcomes[name]
    assert np.ptp(res["sigma"]) > 0  # sigma really is chosen per input
    assert res["proper"] <= LIMIT, res


@pytest.mark.parametrize("name", ["qcrs", "instars"])
def test_negative_control_reusing_the_search_draws_over_certifies(outcomes, name):
    res = outcomes[name]
    assert res["reused"] > LIMIT + 0.03, res  # far beyond what alpha allows
    assert res["reused"] > 2 * res["proper"]


@pytest.mark.parametrize("name", ["qcrs", "instars", "ddrs"])
def test_choosers_draw_only_from_their_own_streams(monkeypatch, name):
    """Every per-image key derivation in the package goes through the sampler's ``purpose_id``
    (``image_keys`` calls it whoever imports it, however), so recording it sees every stream a
    chooser opens."""
    used = []
    real = sampler.purpose_id

    def recording(purpose):
        used.append(purpose)
        return real(purpose)

    monkeypatch.setattr(sampler, "purpose_id", recording)
    method = get_method(name)
    chooser = build(method, OPTIONS[name], halfspace, META, batch=4096)
    chooser(images([V0, 0.6]), np.array([0, 1]), np.full(2, 0.3))
    assert used and set(used) <= {"search", "check", "optimize"}
    assert not set(used) & {"select", "estimate"}


def test_guarantee_column_values():
    assert get_method("cohen").guarantee == "fixed"
    for name in ("ddrs", "qcrs", "instars"):
        m = get_method(name)
        assert m.guarantee == "per-input" and m.memory is not None


@pytest.mark.parametrize("name,opts", [
    ("ddrs", ["--ddrs-steps", "5", "--ddrs-memory"]),
    ("qcrs", ["--epsilon", "0.1", "--left", "0.1", "--right", "0.8", "--gradient_n", "40"]),
])
def test_certify_command_runs_each_method_and_resumes(tmp_path, shared_data, name, opts):
    """End to end on the real MNIST LeNet: rows carry the per-image sigma, the method's extras
    and its guarantee; a second run with a larger --max resumes (and the memory with it)."""
    from rsjax.analysis.results import load_results
    from rsjax.cli import main

    ckpt = str(shared_data / "models/mnist_lenet_noise0.25/checkpoint.pth.tar")
    out = tmp_path / f"{name}.tsv"
    base = ["certify", "mnist", ckpt, "0.25", str(out), "--N0", "20", "--N", "100", "--skip", "2500",
            "--batch", "200", "--no-progress", "--method", name] + opts
    assert main(base + ["--max", "2600"]) == 0
    assert main(base + ["--max", "5001"]) == 0
    res = load_results(out)
    np.testing.assert_array_equal(res.idx, [0, 2500, 5000])
    assert res.sigma is not None and np.all(res.sigma > 0)
    for col in get_method(name).extra_columns:
        assert col in res.extra
    assert set(res.extra["guarantee"]) == ({"memory"} if "--ddrs-memory" in opts else {"per-input"})
    if name == "qcrs":  # the reference's pABar is the final certificate's pA_lower
        np.testing.assert_allclose(np.asarray(res.extra["pABar"], float), np.asarray(res.extra["pA_lower"], float))
    if name == "ddrs":
        from rsjax.methods.memory import Memory

        mem = Memory.for_output(out)
        assert len(mem) == int((res.predict != -1).sum()) == 3  # both runs' certificates are stored
