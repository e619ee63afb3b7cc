"""Portable numerics: reproduce pins torch's kernels, MKL's code path and the thread count in the
notebook kernels' environment, so that the same study gives the same bits on another x86-64 CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from editlib import numerics

AVX2 = (numerics.cpu_flags() or set()) >= {"avx2"} and os.uname().machine == "x86_64"


def _x86(monkeypatch, flags):
    monkeypatch.setattr(numerics.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(numerics, "cpu_flags", lambda: flags)


def test_portable_pins_kernels_mkl_and_threads(monkeypatch):
    _x86(monkeypatch, {"sse2", "avx", "avx2", "fma"})
    n = numerics.choose("portable")
    assert n.mode == "portable" and n.env == {
        "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2", numerics.ENV: "portable"}
    one = numerics.choose("portable", threads=1)  # a chosen count is kept, and the log says it differs
    assert one.env["OMP_NUM_THREADS"] == one.env["MKL_NUM_THREADS"] == "1" and "committed figures used 2" in one.note


def test_auto_is_portable_on_cpu_and_native_on_a_gpu(monkeypatch):
    _x86(monkeypatch, {"avx2"})
    assert numerics.choose("auto", devices=("cpu", "cpu")).mode == "portable"
    gpu = numerics.choose("auto", devices=("cpu", "cuda:1"), threads=4)
    assert gpu.mode == "native" and "cuda:1" in gpu.note and "ATEN_CPU_CAPABILITY" not in gpu.env
    assert gpu.env["OMP_NUM_THREADS"] == "4"
    assert numerics.choose("native").env == {numerics.ENV: "native"}  # threads inherited


@pytest.mark.parametrize("arch, flags, why", [
    ("x86_64", {"sse2", "avx"}, "no AVX2"),       # torch would not check: an illegal instruction later
    ("x86_64", None, "cannot be read"),
    ("aarch64", {"neon"}, "aarch64"),
])
def test_portable_falls_back_to_native_where_avx2_is_missing(monkeypatch, arch, flags, why):
    monkeypatch.setattr(numerics.platform, "machine", lambda: arch)
    monkeypatch.setattr(numerics, "cpu_flags", lambda: flags)
    n = numerics.choose("portable")
    assert n.mode == "native" and "ATEN_CPU_CAPABILITY" not in n.env and why in n.note


def test_bad_mode_and_threads_are_named():
    with pytest.raises(ValueError, match="numerics: 'fast'"):
        numerics.choose("fast")
    with pytest.raises(ValueError, match="threads: must be at least 1, got 0"):
        numerics.choose("native", threads=0)


def test_cpu_flags_reads_the_flags_line(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx2 fma\n")
    assert numerics.cpu_flags(str(f)) == {"fpu", "sse2", "avx2", "fma"}
    assert numerics.cpu_flags(str(tmp_path / "missing")) is None


_PROBE = """
import hashlib, json, torch
from editlib import store
g = torch.Generator().manual_seed(0)
a = torch.randn(300, 4097, generator=g); b = torch.randn(4097, 203, generator=g)
x = torch.randn(64, 4099, generator=g, dtype=torch.float64)
v = torch.randn(1_000_003, generator=g)
out = [a @ b, torch.softmax(a, -1), a.sum(1), v.sum(), torch.linalg.cholesky(x @ x.T / 4099 + torch.eye(64).double())]
print(json.dumps({"digest": hashlib.sha1(b"".join(t.numpy().tobytes() for t in out)).hexdigest(),
                  "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "numerics": store.machine()["numerics"]}))
"""


def _probe(env: dict) -> dict:
    full = {**{k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}, **env}
    r = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not AVX2, reason="portable numerics need an x86-64 CPU with AVX2")
def test_portable_bits_do_not_depend_on_the_callers_kernels_or_threads():
    """A matmul, a softmax, reductions and a float64 Cholesky change bits with torch's CPU capability
    and the thread count (what differs between CPU types and machines); under portable numerics they
    give the same bits whatever the caller's settings, at AVX2 with 2 threads, and the manifest says so."""
    pinned = numerics.choose("portable").env
    base = _probe(pinned)
    assert base["capability"] == "AVX2" and base["threads"] == 2
    assert base["numerics"] == {"mode": "portable", "aten_cpu_capability": "avx2", "mkl_cbwr": "COMPATIBLE"}
    assert _probe({"ATEN_CPU_CAPABILITY": "default"})["digest"] != _probe({})["digest"]  # the probe sees kernels
    for outer in ({"ATEN_CPU_CAPABILITY": "default"},
                  {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}):
        assert _probe({**outer, **pinned})["digest"] == base["digest"], outer


def test_current_names_the_mode_set_by_reproduce_or_by_hand(monkeypatch):
    for k in (numerics.ENV, "ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    assert numerics.current() == {"mode": "native"}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert numerics.current()["mode"] == "native"  # threads not fixed: not portable
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert numerics.current() == {"mode": "portable", "aten_cpu_capability": "avx2", "mkl_cbwr": "COMPATIBLE"}
    monkeypatch.setenv(numerics.ENV, "native")  # what reproduce set wins
    assert numerics.current()["mode"] == "native"


def test_cache_tag_names_portable_numerics_and_their_threads(monkeypatch):
    for k in (numerics.ENV, "ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    assert numerics.cache_tag() is None  # native: entries keep the keys they always had
    monkeypatch.setenv(numerics.ENV, "portable")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert numerics.cache_tag() == "portable-2"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # portable bits depend on the thread count
    assert numerics.cache_tag() == "portable-4"
