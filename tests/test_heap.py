"""rsjax.heap: glibc keeps a freed large block, so allocating it again touches no new pages."""

import subprocess
import sys
import textwrap

import pytest

import rsjax.heap

# A 256 MB block allocated, written, freed and allocated again on a worker thread (XLA allocates
# a step's temporary buffer on one of its pool threads); prints the page faults of the second round.
CHILD = textwrap.dedent("""
    import ctypes, resource, sys, threading
    if sys.argv[1] == "retain":
        import rsjax.heap
        print(rsjax.heap.retain_freed_memory(), file=sys.stderr)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 256 << 20
    faults = []

    def cycle():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)

    def work():
        cycle()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cycle()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(faults[0])
""")


def _second_round_faults(mode):
    """``(page faults of the second round, what retain_freed_memory said)`` in a fresh process (the
    settings are process-wide, so the test process itself is left alone)."""
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()), out.stderr.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_is_reused_without_page_faults():
    pages = (256 << 20) // 4096
    retained, said = _second_round_faults("retain")
    default, _ = _second_round_faults("default")
    assert said == "arena_max=1,mmap_max=0,trim_threshold=-1"
    # the control: glibc's default returns the block to the kernel and faults every page in again
    # (fewer only where the kernel backs it with huge pages)
    assert default > pages // 600, default
    assert retained < pages // 100, (retained, default)


def test_train_command_retains_memory(monkeypatch, tmp_path, capsys):
    from rsjax import cli

    calls = []
    monkeypatch.setattr(rsjax.heap, "retain_freed_memory", lambda: calls.append(1) or "set")
    monkeypatch.delenv("RSJAX_MALLOC", raising=False)
    status = cli.main(["train", "mnist", "lenet", str(tmp_path / "out"), "--sigma", "-1"])
    assert status != 0 and "sigma" in capsys.readouterr().err
    assert calls == [1]
    monkeypatch.setenv("RSJAX_MALLOC", "default")
    cli.main(["train", "mnist", "lenet", str(tmp_path / "out"), "--sigma", "-1"])
    assert calls == [1]
