"""The executors (issue #14): a local Ray cluster of 2 CPUs runs the smoke layer search and batch
experiments on the committed miniature, with tiny sizes, and stores exactly what the serial run
stores; a unit whose worker is lost, or whose task raises, is retried; a unit that fails on every
try is listed in ``failed_units.json`` while the others finish, ``run`` exits 1, and a re-run
retries only that unit; C0 is computed once when two processes need the same entry at the same
time; without Ray, ``kind: ray`` fails before any model loads.

Module-wide: a fresh C0 cache (``EDITLIB_CACHE``, so the Ray batch run is the first to need layer
2's C0) and a failure-injection plan file (``EDITLIB_INJECT_UNIT_FAILURES``), both forwarded to the
Ray workers; one Ray cluster (``ray.init(num_cpus=2)``), shut down at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from _fixtures import one_thread  # noqa: F401  (module-wide single thread: workers run one thread too)
from _fixtures import sort_units, use
from editlib import executor, protocols, weights
from editlib.__main__ import main
from editlib.params import ParamsError, resolve
from editlib.paths import REPO_ROOT
from editlib.store import Experiment, StoreError

SMOKE = REPO_ROOT / "params" / "smoke.yaml"

pytestmark = pytest.mark.skipif(not (REPO_ROOT / "models" / "tiny-world" / "config.json").is_file(),
                                reason="models/tiny-world is missing")

#: the layer search at layers 0 and 1 and batch editing at layer 1 on 4 facts, 3 value steps
SMALL = {
    "hparams.common.v_num_grad_steps": 3,
    "layer_search.n_facts": 4, "layer_search.layers": [0, 1], "layer_search.methods": ["rome", "memit"],
    "batch.total": 4, "batch.batch_sizes": [2, 4], "batch.layer": 1, "batch.methods": ["memit", "emmet"],
}
#: batches.parquet columns that say when and where time was spent (a worker charges the targets it
#: prepared itself), not what was computed
TIMING = ("seconds_values", "seconds_keys", "seconds_solve", "seconds_eval", "shared_targets")
CLI = ["--params", str(SMOKE), "--set", "hparams.common.v_num_grad_steps=3", "--set", "layer_search.n_facts=4",
       "--set", "layer_search.layers=[0,1]", "--set", "layer_search.methods=[memit]"]


def params_for(results_dir: Path, kind: str, **over):
    return resolve(SMOKE, overrides={**SMALL, "results_dir": str(results_dir), "name": "t",
                                     "executor.kind": kind, **over})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh C0 cache and an empty failure plan for this module (restored afterwards)."""
    root = tmp_path_factory.mktemp("executor-env")
    plan = root / "failures.json"
    plan.write_text("{}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITLIB_CACHE", str(root / "cache"))
        mp.setenv(executor.ENV_INJECT, str(plan))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield plan


@pytest.fixture(scope="module")
def cluster(env):
    ray = pytest.importorskip("ray", reason="Ray is an extra: pip install -e '.[ray]' (part of .[dev])")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 ** 2)
    try:
        yield ray
    finally:
        executor.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def study(env, tmp_path_factory):
    """The miniature opened once by the driver (C0 of layers 0 and 1 collected into the fresh cache)."""
    st = protocols.open_study(params_for(tmp_path_factory.mktemp("study"), "local"), log=lambda *a: None)
    st.prepare_covs([0, 1])
    return st


def plan_failures(plan: Path, **units: dict) -> None:
    plan.write_text(json.dumps(units))


def stored(p, experiment: str, kind: str = "cases") -> pd.DataFrame:
    return pd.read_parquet(Path(p.results_dir) / p.name / experiment / f"{kind}.parquet")


def assert_same_store(a, b, experiment: str) -> None:
    """cases.parquet identical row for row and value for value (sorted by unit keys); batch
    diagnostics identical apart from where the time was charged."""
    ca, cb = stored(a, experiment), stored(b, experiment)
    assert len(ca) == len(cb) > 0
    assert_frame_equal(sort_units(ca), sort_units(cb), check_exact=True)
    ba, bb = (stored(x, experiment, "batches") for x in (a, b))
    keep = [c for c in ba.columns if c not in TIMING]
    assert_frame_equal(sort_units(ba[keep]), sort_units(bb[keep]), check_exact=True)


# --------------------------------------------------------------------------- Ray = serial

def test_ray_layer_search_equals_serial_after_a_lost_worker(cluster, env, study, tmp_path):
    """The worker running layer 1 dies (the process ends) on its first try: the unit runs again on
    a new worker, and the store holds exactly what the serial run stores."""
    plan_failures(env, **{"o0-L001": {"times": 1, "mode": "exit"}})
    p = params_for(tmp_path / "ray", "ray")
    logged: list[str] = []
    protocols.run_layer_search(use(study, p), log=logged.append)
    assert json.loads(env.read_text())["o0-L001"]["times"] == 0, "the injected failure never ran"
    assert any("o0-L001 failed (worker lost" in m and "trying it again" in m for m in logged), logged
    finished = [m for m in logged if re.fullmatch(r"unit o0-L00[01] on \S+( gpu[\d,]+)?: [\d.]+ s", m)]
    assert len(finished) == 2, logged  # one line per finished unit: unit, worker, seconds
    assert not (Path(p.results_dir) / "t" / "layer_search" / "failed_units.json").exists()
    q = params_for(tmp_path / "serial", "local")
    protocols.run_layer_search(use(study, q), log=lambda *a: None)
    assert_same_store(p, q, "layer_search")


def test_ray_batch_equals_serial_and_collects_c0_once(cluster, env, study, tmp_path):
    """Batch editing at layer 2, whose C0 nobody has computed yet: the workers that start together
    compute it once (the other waits for the cache entry), a unit whose task raises once is
    retried, and the store equals the serial run's."""
    plan_failures(env, **{"memit-B00002-o0": {"times": 1, "mode": "raise"}})
    p = params_for(tmp_path / "ray", "ray", **{"batch.layer": 2})
    logged: list[str] = []
    protocols.run_batch(use(study, p), log=logged.append)
    assert json.loads(env.read_text())["memit-B00002-o0"]["times"] == 0
    assert any("memit-B00002-o0 failed (InjectedFailure" in m for m in logged), logged
    collected = [m for m in logged if "C0: collecting" in m]
    assert len(collected) == 1, logged
    q = params_for(tmp_path / "serial", "local", **{"batch.layer": 2})
    protocols.run_batch(use(study, q), log=lambda *a: None)
    assert_same_store(p, q, "batch")


# --------------------------------------------------------------------------- failed units, resume

def test_a_unit_failing_every_try_is_listed_and_run_exits_1(cluster, env, tmp_path, monkeypatch, capsys):
    """Layer 0 fails on both tries: layer 1 still finishes, failed_units.json lists layer 0 with
    its error, the experiment is not consolidated, ``run`` exits 1 naming the unit; a re-run
    retries only layer 0 and ends with the serial run's store."""
    monkeypatch.chdir(REPO_ROOT)
    plan_failures(env, **{"o0-L000": {"times": 2, "mode": "raise"}})
    rc = main(["run", "layer-search", *CLI, "--set", f"results_dir={tmp_path / 'ray'}", "--executor", "ray"])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "failed on every try" in err and "o0-L000" in err and "failed_units.json" in err, err
    root = tmp_path / "ray" / "smoke" / "layer_search"
    failed = json.loads((root / "failed_units.json").read_text())
    assert list(failed) == ["o0-L000"] and failed["o0-L000"]["attempts"] == 2
    assert failed["o0-L000"]["error"].startswith("InjectedFailure")
    assert (root / "parts" / "o0-L001.cases.parquet").is_file() and not (root / "cases.parquet").exists()
    assert not json.loads((root / "manifest.json").read_text())["complete"]
    from types import SimpleNamespace

    from editlib.reproduce import stored_failed_units  # what the report's failure table lists
    assert list(stored_failed_units(SimpleNamespace(results_dir=str(tmp_path / "ray"), name="smoke"))) == ["layer_search"]

    rc = main(["run", "layer-search", *CLI, "--set", f"results_dir={tmp_path / 'ray'}", "--executor", "ray"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "unit o0-L000 on" in out and "unit o0-L001 on" not in out, out  # only the failed unit ran again
    assert not (root / "failed_units.json").exists() and (root / "cases.parquet").is_file()
    assert main(["run", "layer-search", *CLI, "--set", f"results_dir={tmp_path / 'serial'}"]) == 0
    capsys.readouterr()
    ray_cases = pd.read_parquet(root / "cases.parquet")
    serial = pd.read_parquet(tmp_path / "serial" / "smoke" / "layer_search" / "cases.parquet")
    assert_frame_equal(sort_units(ray_cases), sort_units(serial), check_exact=True)


# --------------------------------------------------------------------------- C0 once, across processes

C0_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from editlib import stats
    from editlib.models import load_model
    from editlib.tiny import load_tiny_records

    cache, work, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    model, tok = load_model("models/tiny-world")
    records = load_tiny_records("models/tiny-world")
    real = stats.collect_second_moments
    def counted(*a, **k):  # every collection is counted, and holds the entry for 2 s
        with open(work / "collections", "a") as f:
            f.write(me + "\\n")
        time.sleep(2.0)
        return real(*a, **k)
    stats.collect_second_moments = counted
    (work / f"ready-{me}").touch()  # start together
    while len(list(work.glob("ready-*"))) < 2:
        time.sleep(0.02)
    out = stats.layer_covariance(model, tok, [1], stats.CorpusSpec(kind="records", n_samples=64),
                                 records=records, cache_dir=cache, progress=False, log=print)
    torch.save(out[1].mom2, work / f"mom2-{me}.pt")
''')


def test_c0_is_collected_once_when_two_processes_need_it_together(tmp_path):
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", C0_SCRIPT, str(tmp_path / "cache"), str(tmp_path), me],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert (tmp_path / "collections").read_text().split() in (["a"], ["b"])
    assert sum("another process is computing it; waiting" in out for out, _ in outs) == 1, outs
    assert torch.equal(torch.load(tmp_path / "mom2-a.pt"), torch.load(tmp_path / "mom2-b.pt"))


# --------------------------------------------------------------------------- setup errors

def test_ray_not_installed_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the executor was checked")
    monkeypatch.setattr(protocols, "load_model", boom)
    rc = main(["run", "layer-search", *CLI, "--set", f"results_dir={tmp_path}", "--executor", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install -e '.[ray]'" in err[0], err


@pytest.mark.parametrize("over, named", [
    ({"executor.kind": "slurm"}, "executor.kind"),
    ({"executor.cpus_per_unit": 0}, "executor.cpus_per_unit"),
    ({"executor.gpus_per_unit": -1}, "executor.gpus_per_unit"),
    ({"executor.retries": -1}, "executor.retries"),
    ({"executor.address": "nowhere"}, "executor.address"),
    ({"executor.gpus": 1}, "gpus"),
])
def test_bad_executor_params_name_the_key(over, named):
    with pytest.raises(ParamsError, match=named.replace(".", r"\.")):
        resolve(SMOKE, overrides=over)


def test_workers_write_only_under_a_driver_lock(tmp_path):
    """``Experiment.open(lock=False)``: refused unless the folder is held (here by this process,
    the driver); it saves units without the lock and can never finish the experiment."""
    params = {"experiment": "x"}
    with pytest.raises(StoreError, match="lock=False"):
        Experiment.open(tmp_path, "run", "x", params, lock=False)
    driver = Experiment.open(tmp_path, "run", "x", params)
    worker = Experiment.open(tmp_path, "run", "x", params, lock=False)
    worker.save_unit("u0", pd.DataFrame({"case_id": [1]}))
    assert driver.has_unit("u0")
    with pytest.raises(StoreError, match="never finishes"):
        worker.finish()
    driver.record_failed_units({"u1": {"error": "E: x", "attempts": 2}})
    assert list(driver.failed_units()) == ["u1"]
    driver.finish()
    assert driver.complete and driver.failed_units() == {}
    with pytest.raises(StoreError, match="lock=False"):  # the driver let go: no worker may write now
        Experiment.open(tmp_path, "run", "x", params, lock=False)


def test_units_of_the_paper_grid():
    """The independent units per experiment (what a cluster can run at once) for the paper's params."""
    p = resolve(REPO_ROOT / "params" / "llama3-8b.yaml")
    fake = protocols.Study(params=p, model=None, tok=None, model_dir="", label="", records=[])
    fake._fp = "x"
    counts = {e: len(protocols.experiment_units(_with_depth(fake, 32), e, 1)) for e in protocols.EXPERIMENTS}
    o = len(p.data.orderings)
    layers = 32 if p.layer_search.layers == "all" else len(p.layer_search.layers)
    assert counts == {"layer_search": layers * o, "singular": o,
                      "sweep": o * -(-p.sweep.total // p.sweep.batch_size)
                      * (len(p.sweep.memit_lambdas) + len(p.sweep.emmet_lambdas)),
                      "batch": o * len(p.batch.methods) * len(p.batch.batch_sizes),
                      "sequential": o * len(p.sequential.methods) * len(p.sequential.batch_sizes)}


def test_sweep_units_of_close_lambdas_have_their_own_parts(tmp_path):
    """A λ is named as {:g} (the paper grid's names: lam50000, lam0.001) where that is exact, else
    with every digit: {:g} keeps six, and two λ of one grid would write one part file."""
    def name(lam):
        return protocols.UnitSpec("sweep", 0, 1, "memit", 8, lam=lam, chunk=0).name
    assert [name(l) for l in (5e4, 1e-3, 0.0, 15000.0)] == ["memit-lam50000-o0-b00000", "memit-lam0.001-o0-b00000",
                                                          "memit-lam0-o0-b00000", "memit-lam15000-o0-b00000"]
    assert name(1234567.0) != name(1234568.0) and name(1234567.0) == "memit-lam1234567.0-o0-b00000"
    # a part saved under another name (earlier code's, for such a λ) is no unit's: consolidation would
    # count it beside the unit's own, so the run refuses to go on and names it
    from editlib.store import Experiment

    specs = [protocols.UnitSpec("sweep", 0, 1, "memit", 8, lam=l, chunk=0) for l in (1234567.0, 1e-3)]
    exp = types.SimpleNamespace(root=tmp_path, part_stem=Experiment.part_stem)
    p = types.SimpleNamespace(batch=types.SimpleNamespace(total=8), sequential=types.SimpleNamespace(total=4))
    (tmp_path / "parts").mkdir()
    for stem in ("memit-lam0.001-o0-b00000", "memit-lam1.23457e_06-o0-b00000"):
        for suffix in (".cases.parquet", ".unit.json"):
            (tmp_path / "parts" / f"{stem}{suffix}").write_bytes(b"")
    (tmp_path / "parts" / ".memit-lam0.001-o0-b00000.cases.parquet.x1.tmp").write_bytes(b"")  # a write in flight
    assert protocols.foreign_parts(exp, specs, p) == ["memit-lam1.23457e_06-o0-b00000.cases.parquet",
                                                      "memit-lam1.23457e_06-o0-b00000.unit.json"]
    # exact names: a batch unit's batches and a sequential unit's batches and final evaluation are its
    # own; a batch beyond its size, or a singular chunk beside an unchunked unit, is not
    units = [protocols.UnitSpec("batch", 0, 1, "memit", 4), protocols.UnitSpec("sequential", 0, 1, "memit", 2),
             protocols.UnitSpec("singular", 0, 1)]
    for stem in ("memit-B00004-o0-b00001", "memit-B00002-o0-b00001", "memit-B00002-o0-final", "o0",
                 "memit-B00004-o0-b00002", "o0-c00003"):
        (tmp_path / "parts" / f"{stem}.batches.parquet").write_bytes(b"")
    assert protocols.foreign_parts(exp, units + specs[1:], p) == [
        "memit-B00004-o0-b00002.batches.parquet", "memit-lam1.23457e_06-o0-b00000.cases.parquet",
        "memit-lam1.23457e_06-o0-b00000.unit.json", "o0-c00003.batches.parquet"]


def test_a_worker_drops_another_experiments_shared_targets(monkeypatch):
    """A Ray worker's UnitContext outlives an experiment: the batch group (targets, shared block
    outputs: GBs on a GPU) goes when a unit of another experiment starts, not at the end of the run."""
    seen = []
    monkeypatch.setitem(protocols._UNIT_RUNNERS, "sequential", lambda spec, st, exp, uc: seen.append(dict(uc.shared)))
    monkeypatch.setitem(protocols._UNIT_RUNNERS, "batch", lambda spec, st, exp, uc: seen.append(dict(uc.shared)))
    uc = protocols.UnitContext(log=lambda *_: None)
    uc.group(("batch", 0))["targets"]["k"] = "235 MB"
    protocols.run_unit(protocols.UnitSpec("batch", 0, 1, "memit", 4), None, None, uc)
    assert list(seen[-1]) == [("batch", 0)]  # the same experiment keeps its group
    protocols.run_unit(protocols.UnitSpec("sequential", 0, 1, "memit", 4), None, None, uc)
    assert seen[-1] == {} and uc.shared == {}


def _with_depth(study, n: int):
    """A study stand-in whose model has ``n`` decoder layers (no weights are needed to list units)."""
    class Deep(type(study)):
        @property
        def n_layers(self) -> int:
            return n
    return Deep(**{f.name: getattr(study, f.name) for f in dataclasses.fields(study)})


def test_workers_use_the_driver_context_templates(study):
    """A worker adopts the context templates the driver sends with every unit (the ones its
    provenance records), saying so when its own sample differs (another GPU's rounding)."""
    import dataclasses

    from editlib.context import ContextTemplates
    from editlib.executor import adopt_contexts

    worker = dataclasses.replace(study, _contexts=dict(study._contexts))
    style, own = next(iter(worker._contexts.items()))
    logged: list[str] = []
    adopt_contexts(worker, dict(study._contexts), logged.append)
    assert worker.contexts(style) == own and not logged  # the same sample: nothing to say
    driver = ContextTemplates(groups=(("{}",), ("Other text. {}",)))
    adopt_contexts(worker, {style: driver}, logged.append)
    assert worker.contexts(style) is driver and len(logged) == 1 and "using the driver's" in logged[0]
    assert study.contexts(style) == own  # the driver's study is not touched


class _CudaStandIn:
    """A driver model as ``_offloaded`` sees it: its parameters on ``cuda:0``, its moves recorded."""

    def __init__(self, events: list, nbytes: int, free) -> None:
        import torch

        self.events, self.device, self.free = events, torch.device("cuda", 0), free
        self.p = torch.empty(nbytes, dtype=torch.uint8, device="meta")
        self.ptr = 1000
        me = self

        class P:  # the meta tensor's size, reported on the GPU; its storage moves with the model
            device, numel, element_size, dtype, _version = me.device, me.p.numel, me.p.element_size, torch.uint8, 0

            @staticmethod
            def data_ptr():
                return me.ptr
        self.param = P

    def parameters(self):
        yield self.param

    def buffers(self):
        return iter(())

    def modules(self):
        return iter(())

    def to(self, device):  # with the free device memory at that moment; every tensor replaced
        self.events.append(("model to", str(device), self.free() if str(device) != "cpu" else 0))
        self.ptr += 1
        return self


@pytest.mark.parametrize("free_gb, error, between", [
    ({"start": 80, "release": 80, "end": 80}, False, []),                                # room at once
    ({"start": 10, "release": 80, "end": 80}, False, ["worker release"]),                # after the release
    ({"start": 10, "release": 20, "end": 80}, False, ["worker release", "worker end"]),  # once they end
    ({"start": 10, "release": 20, "end": 20}, False, ["worker release", "worker end"]),  # never: moved at the deadline
    ({"start": 80, "release": 80, "end": 80}, True, ["worker end"]),   # the driver failed: workers end first
])
def test_driver_model_moves_back_only_once_the_gpu_has_room(monkeypatch, free_gb, error, between):
    """On one GPU the Ray workers keep their studies after an experiment; the driver's model comes
    back from the CPU only when the device can hold it: the workers first drop their studies (asked
    with a timeout, so a busy or hung worker cannot block the driver), and the pool ends if that is
    not enough (a float32 Llama-3-8B beside a worker's on an 80 GB card), then the driver waits for
    their memory to be freed (``ray.kill`` returns before the process exits), up to a deadline.
    When the driver stops on an error the workers end at once, before anything else."""
    import torch

    from editlib import stats

    events: list = []
    state = {"now": "start", "polls": 0, "killed_at": None, "timeout": None}

    def free(device):  # an ended worker's memory is freed a few polls after ray.kill returned
        state["polls"] += 1
        now = state["now"]
        if now == "end" and state["polls"] < state["killed_at"] + 3:
            now = "release"
        return free_gb[now] << 30

    monkeypatch.setattr(stats, "free_bytes", free)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(executor, "FREED_TIMEOUT_S", 0.2)

    class Actor:
        class release:
            @staticmethod
            def remote():
                events.append(("worker release",))
                state["now"] = "release"
                return "ref"

    class FakeRay:
        @staticmethod
        def get(refs, timeout=None):
            state["timeout"] = timeout
            return [None for _ in refs]

        @staticmethod
        def kill(actor, no_restart=True):
            events.append(("worker end",))
            state["now"], state["killed_at"] = "end", state["polls"]

    pool = executor._Pool(FakeRay, ("k",), {}, 1, actors=[Actor()])
    study = type("S", (), {})()
    study.model, study._covs = _CudaStandIn(events, 32 << 30, lambda: free(None)), {"x": 1}
    assert weights.unedited(study.model)
    with pytest.raises(RuntimeError) if error else contextlib.nullcontext():
        with executor._offloaded(study, pool, poll_s=0.01):
            events.append(("workers run",))
            if error:
                raise RuntimeError("too many failed edits")
    assert events[:2] == [("model to", "cpu", 0), ("workers run",)] and study._covs == {}
    assert [e[0] for e in events[2:-1]] == between
    assert events[-1][:2] == ("model to", "cuda:0")
    assert (not pool.actors) == ("worker end" in between)
    if "worker release" in between:
        assert state["timeout"] == executor.RELEASE_TIMEOUT_S
    if free_gb["end"] == 80:  # room came: the model moved back into it, not before
        assert events[-1][2] >= (32 + 2) << 30
    # the round trip replaced every tensor, but the unedited model is still its unedited weights
    # (its value store and kept unedited measurements still serve); one moved outside it is not
    assert weights.unedited(study.model)
    study.model.to("cpu")
    assert not weights.unedited(study.model)


def test_an_address_the_connected_process_does_not_use_is_named() -> None:
    """A process already connected to Ray stays on its cluster: executor.address auto or that
    cluster's own address pass silently, any other address warns that it is not used."""
    import warnings
    from types import SimpleNamespace

    from editlib import executor
    ray = SimpleNamespace(is_initialized=lambda: True,
                          get_runtime_context=lambda: SimpleNamespace(gcs_address="10.0.0.1:6379"),
                          init=lambda **k: pytest.fail("a connected process connected again"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        executor._connect(ray, "auto")
        executor._connect(ray, "10.0.0.1:6379")
    for other in ("10.0.0.2:6379", "local", "ray://head:10001"):
        with pytest.warns(RuntimeWarning, match=f"executor.address '{other}' is not used.*10.0.0.1:6379"):
            executor._connect(ray, other)
