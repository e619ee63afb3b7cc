"""Executors: where an experiment's independent units run (issue #14).

* ``local`` (the default): this process, one unit after another, on the study the caller opened:
  the serial run. An error stops the run at once, as it always did.
* ``ray``: a pool of Ray actors, one per worker slot (``cpus_per_unit`` CPUs, ``gpus_per_unit``
  GPUs), each keeping one loaded study (model weights, C0 factors, context templates) across the
  units and experiments it runs. The driver (this process) hands units to idle workers; a unit
  that fails (an exception, a lost worker) runs again up to ``retries`` times, then is listed in
  the experiment's ``failed_units.json`` while the other units go on, and :class:`UnitsFailed`
  is raised at the end.

Both run :func:`editlib.protocols.run_unit`. The driver holds the experiment folder's lock; workers
write their parts without it (``Experiment.open(..., lock=False)``), and the caller consolidates
once, after all units. One progress bar over the experiment's edits (rate and ETA) and one log line per unit (unit,
worker, seconds). The failed-edit limit (``evaluation.max_failed_fraction``) is applied by the
driver across units, as the serial loops did.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import os
import socket
import time
import uuid
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .progress import progress

from .params import ParamsError, StudyParams

if TYPE_CHECKING:
    from .protocols import Study, UnitResult, UnitSpec
    from .store import Experiment

RAY_MISSING = "executor.kind is 'ray' but Ray is not installed: pip install -e '.[ray]'"
#: test hook: a JSON file {unit: {"times": n, "mode": "raise" | "exit"}} (see inject_failure)
ENV_INJECT = "EDITLIB_INJECT_UNIT_FAILURES"
#: environment variables a driver passes on to its Ray workers (caches, offline switches, hooks)
FORWARDED_ENV = ("EDITLIB_", "HF_", "TRANSFORMERS_")


class UnitsFailed(RuntimeError):
    """Units failed on every try; the others finished and are saved (a re-run retries the failed
    ones only). ``failed``: unit -> {error, attempts, spec}, as in ``failed_units.json``."""

    def __init__(self, experiment: str, root, failed: dict[str, dict]):
        self.experiment, self.root, self.failed = experiment, root, failed
        shown = "; ".join(f"{u} ({v['error']})" for u, v in list(failed.items())[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        super().__init__(f"{experiment}: {len(failed)} unit(s) failed on every try: {shown}{more}; listed in "
                         f"{root}/failed_units.json; the other units are saved: run again to retry only these")


class InjectedFailure(RuntimeError):
    """A unit failure asked for through ``EDITLIB_INJECT_UNIT_FAILURES`` (tests)."""


def check_executor(p: StudyParams) -> None:
    """Fail before any model loads when the executor cannot run here (Ray not installed)."""
    if p.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        raise ParamsError(RAY_MISSING)


def inject_failure(unit: str) -> None:
    """Test hook, a no-op unless ``EDITLIB_INJECT_UNIT_FAILURES`` names a JSON file that lists
    ``unit``: its next ``times`` runs fail, by an exception (``mode: raise``) or by ending the
    process (``mode: exit``: a lost worker). The count is decremented under a flock, so it holds
    across worker processes."""
    path = os.environ.get(ENV_INJECT)
    if not path or not os.path.isfile(path):
        return
    with open(path, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        plan = json.loads(f.read() or "{}")
        entry = plan.get(unit)
        if not entry or int(entry.get("times", 0)) < 1:
            return
        entry["times"] = int(entry["times"]) - 1
        f.seek(0)
        f.truncate()
        f.write(json.dumps(plan))
        f.flush()
    if entry.get("mode") == "exit":
        os._exit(17)
    raise InjectedFailure(f"injected failure of unit {unit} ({ENV_INJECT})")


# --------------------------------------------------------------------------- the driver

def run_units(study: "Study", exp: "Experiment", units: Sequence["UnitSpec"], *, log: Callable,
              fail_after: int | None = None) -> None:
    """Run the ``units`` not saved yet on the params' executor (the caller then finishes ``exp``)."""
    from .protocols import stored_checks, unit_done, unit_edits

    pending = [u for u in units if not unit_done(u, exp, study.params)]
    book = _FailureBook(study.params.evaluation.max_failed_fraction, log)
    for u in units:  # a resumed run's limit counts what earlier sessions stored (their totals, once)
        book.add(stored_checks(u, exp, study.params), stored=True)
    book.check()
    sizes = {u.name: unit_edits(u, study.params) for u in units}
    with progress(total=sum(sizes.values()), initial=sum(sizes.values()) - sum(sizes[u.name] for u in pending),
                  desc=exp.root.name, unit=" edits", unit_scale=False, disable=not pending) as bar:

        def done(unit: str) -> None:  # a finished (or given-up) unit advances the bar by its edits
            bar.update(sizes.get(unit, 1))

        if study.params.executor.kind == "ray":
            _run_ray(study, exp, pending, book, done, log)
        else:
            _run_local(study, exp, pending, book, done, log, fail_after)


@dataclass
class _FailureBook:
    """The failed-edit limit per scope (an experiment, or one ordering), across units."""

    limit: float
    log: Callable
    scopes: dict = field(default_factory=dict)

    def add(self, checks: Sequence[tuple[str, str, Any]], *, stored: bool = False) -> None:
        from .protocols import _Failures

        for scope, config, cases in checks:
            self.scopes.setdefault(scope, _Failures(self.limit, self.log)).add(config, cases, stored=stored)

    def check(self) -> None:
        for f in self.scopes.values():
            f.check()


def _record(study: "Study", res: "UnitResult", book: _FailureBook, done: Callable, log: Callable) -> None:
    """A finished unit in the driver: its worker's log, the failed-edit limit, one log line."""
    for line in res.log:
        log(f"  [{res.worker}] {line}")
    study._cov_info.update(res.cov_info)
    book.add(res.checks)
    log(f"unit {res.unit} on {res.worker}: {res.seconds:.1f} s")
    done(res.unit)


def _run_local(study: "Study", exp: "Experiment", pending: Sequence["UnitSpec"], book: _FailureBook, done: Callable,
               log: Callable, fail_after: int | None) -> None:
    """Every unit in this process, in order, sharing prepared targets as the serial loops did."""
    from .protocols import UnitContext, run_unit

    uc = UnitContext(log=log, fail_after=fail_after)
    where = f"local:{os.getpid()}"
    for spec in pending:
        t0 = time.time()
        res = run_unit(spec, study, exp, uc)
        res.seconds, res.worker = time.time() - t0, where
        _record(study, res, book, done, log)


# --------------------------------------------------------------------------- Ray

def _ray():
    try:
        import ray
    except ImportError:
        raise ParamsError(RAY_MISSING) from None
    return ray


#: this process connected to Ray itself (not its caller), and whether a session keeps it connected
_STATE = {"connected_here": False, "sessions": 0}


def _connect(ray, address: str) -> None:
    """Join the cluster named by ``executor.address`` (once per process): ``auto`` = the running
    one (RAY_ADDRESS, or the latest ``ray start`` on this machine), else a new local one. A
    process already connected (a notebook's own ``ray.init``) stays on its cluster: an address
    other than ``auto`` that is not that cluster's is then not used, and a warning says so."""
    if ray.is_initialized():
        if address != "auto":
            try:
                current = ray.get_runtime_context().gcs_address
            except Exception:  # noqa: BLE001  (a client connection may not expose it)
                current = None
            if current is None or address != current:
                warnings.warn(f"executor.address {address!r} is not used: this process is already connected to Ray"
                              f" ({current or 'a cluster whose address it does not report'}), and the units run "
                              "there; disconnect first (ray.shutdown()) to use the address",
                              RuntimeWarning, stacklevel=3)
        return
    if address.startswith("ray://"):
        ray.init(address=address)
    else:
        ray.init(address=None if address == "auto" else address, include_dashboard=False)
    _STATE["connected_here"] = True


@contextlib.contextmanager
def session():
    """Keep the Ray connection and workers of the experiments run inside (``python -m editlib run
    A B ...``: one cluster, models loaded once per worker for all of them). Outside a session, a
    Ray connection that the executor opened itself is closed after each experiment (a notebook
    leaves no cluster behind); one the caller opened stays, and so do its workers."""
    _STATE["sessions"] += 1
    try:
        yield
    finally:
        _STATE["sessions"] -= 1
        if not _STATE["sessions"]:
            _disconnect()


def _disconnect() -> None:
    """End the workers and the Ray connection, when this module opened that connection."""
    if not _STATE["connected_here"]:
        return
    shutdown()
    _STATE["connected_here"] = False
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()


def _gpus_per_unit(study: "Study") -> float:
    ep = study.params.executor
    if ep.gpus_per_unit is not None:
        return float(ep.gpus_per_unit)
    return 1.0 if next(study.model.parameters()).device.type == "cuda" else 0.0


def _n_workers(ray, study: "Study", gpus: float, n_pending: int) -> int:
    """As many workers as there are units, the cluster fits (or ``executor.workers`` says)."""
    ep = study.params.executor
    if ep.workers is not None:
        return max(1, min(n_pending, ep.workers))
    have = ray.cluster_resources()
    fit = int(have.get("CPU", 0) // ep.cpus_per_unit)
    if gpus:
        fit = min(fit, int(have.get("GPU", 0) // gpus))
    if fit < 1:
        raise ParamsError(f"executor: the Ray cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU, "
                          f"a unit asks for {ep.cpus_per_unit} CPU and {gpus:g} GPU (executor.cpus_per_unit, "
                          "executor.gpus_per_unit; executor.workers for an autoscaling cluster)")
    return max(1, min(n_pending, fit))


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


class UnitWorker:
    """A Ray actor: runs units one at a time on the study it loaded (kept for the next ones until
    :meth:`release`)."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))

    def run(self, spec: "UnitSpec", params: StudyParams, run_id: str, contexts: dict | None = None) -> "UnitResult":
        return worker_run(spec, params, run_id, contexts)

    def release(self) -> None:
        """Drop the loaded study and its cached device memory (the driver needs the GPU)."""
        _free_worker_study()


@dataclass
class _Pool:
    """This process's Ray workers, kept across experiments (the model loads once per worker, again
    only where the driver needed their GPU memory back: :func:`_make_room`)."""

    ray: Any
    key: tuple
    options: dict
    threads: int
    actors: list = field(default_factory=list)

    def grow(self, n: int) -> None:
        cls = self.ray.remote(UnitWorker)
        while len(self.actors) < n:
            self.actors.append(cls.options(**self.options).remote(self.threads))

    def replace(self, actor) -> Any:
        """A new worker instead of a lost one."""
        with contextlib.suppress(Exception):
            self.ray.kill(actor, no_restart=True)
        new = self.ray.remote(UnitWorker).options(**self.options).remote(self.threads)
        self.actors[self.actors.index(actor)] = new
        return new

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a, no_restart=True)
        self.actors.clear()


_POOL: _Pool | None = None


def _pool(ray, study: "Study", gpus: float) -> _Pool:
    """The worker pool for this cluster connection, resources and environment (a new one when
    any of them changed)."""
    global _POOL
    ep = study.params.executor
    env = _forwarded_env()
    key = (ray.get_runtime_context().get_job_id(), ep.cpus_per_unit, gpus, tuple(sorted(env.items())))
    if _POOL is not None and _POOL.key == key:
        return _POOL
    shutdown()
    options: dict = {"num_cpus": ep.cpus_per_unit, "num_gpus": gpus, "max_restarts": 0}
    if env:
        options["runtime_env"] = {"env_vars": env}
    _POOL = _Pool(ray, key, options, ep.cpus_per_unit)
    return _POOL


def shutdown() -> None:
    """End this process's Ray workers (their models are freed); Ray itself stays connected."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


atexit.register(shutdown)


def _why(ray, e: BaseException) -> str:
    """One line: the unit's own exception, or the worker that was lost."""
    if isinstance(e, ray.exceptions.RayActorError):
        return "worker lost: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    cause = getattr(e, "cause", None) or e
    text = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{type(cause).__name__}: {text}"


def _run_ray(study: "Study", exp: "Experiment", pending: Sequence["UnitSpec"], book: _FailureBook, done: Callable,
             log: Callable) -> None:
    """Units on Ray workers; retries, then failed units are listed and the others go on."""
    if not pending:
        return
    ray = _ray()
    _connect(ray, study.params.executor.address)
    finished = False
    try:
        gpus = _gpus_per_unit(study)
        pool = _pool(ray, study, gpus)
        n = _n_workers(ray, study, gpus, len(pending))
        pool.grow(n)
        log(f"{exp.root.name}: {len(pending)} unit(s) on {n} Ray worker(s) "
            f"({study.params.executor.cpus_per_unit} CPU, {gpus:g} GPU each)")
        exp.record_failed_units({})  # units listed by an earlier run are tried again now
        with _offloaded(study, pool):
            failed = _drive(ray, study, exp, pool, pool.actors[:n], pending, book, done, log)
        finished = True
    finally:
        if not finished:
            shutdown()  # no worker goes on writing once the driver stops
        if not _STATE["sessions"]:
            _disconnect()  # only what this module started; a caller's cluster and workers stay
    if failed:
        raise UnitsFailed(exp.root.name, exp.root, failed)


def _drive(ray, study: "Study", exp: "Experiment", pool: _Pool, workers: list, pending: Sequence["UnitSpec"],
           book: _FailureBook, done: Callable, log: Callable) -> dict[str, dict]:
    """Hand units to idle workers until every unit finished or failed on every try; the failed."""
    run_id, queue, idle = uuid.uuid4().hex, deque(pending), list(workers)
    running: dict = {}
    tries: Counter = Counter()
    failed: dict[str, dict] = {}
    while queue or running:
        while queue and idle:
            spec, actor = queue.popleft(), idle.pop()
            running[actor.run.remote(spec, study.params, run_id, dict(study._contexts))] = (spec, actor)
        [ref], _ = ray.wait(list(running), num_returns=1)
        spec, actor = running.pop(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayError as e:
            idle.append(pool.replace(actor) if isinstance(e, ray.exceptions.RayActorError) else actor)
            _failed_try(ray, e, spec, tries, failed, queue, study.params.executor.retries, exp, done, log)
            continue
        idle.append(actor)
        _record(study, res, book, done, log)
    return failed


def _failed_try(ray, e: BaseException, spec: "UnitSpec", tries: Counter, failed: dict, queue: deque,
                retries: int, exp: "Experiment", done: Callable, log: Callable) -> None:
    """A unit's try failed: queue it again while tries are left, else list it as failed. Too many
    failed edits (TooManyFailures) stop the run instead, as in a serial run."""
    from .protocols import TooManyFailures

    if isinstance(getattr(e, "cause", None), TooManyFailures):
        raise e.cause from None
    tries[spec.name] += 1
    why = _why(ray, e)
    if tries[spec.name] <= retries:
        log(f"unit {spec.name} failed ({why}); trying it again")
        queue.append(spec)
        return
    failed[spec.name] = {"error": why, "attempts": tries[spec.name], "spec": asdict(spec)}
    exp.record_failed_units(failed)
    log(f"unit {spec.name} failed {tries[spec.name]} time(s), recorded as failed: {why}")
    done(spec.name)


@contextlib.contextmanager
def _offloaded(study: "Study", pool: _Pool, *, poll_s: float = 0.5):
    """A driver model on a GPU moves to the CPU while the workers run (they need the memory), and
    back when they are done, once there is room for it. Workers keep their studies (model, cached
    GE memory) for the next experiment, so where the driver's GPU cannot hold its model beside them
    (one 80 GB card, float32 Llama-3-8B: about 32 GB of weights each, plus a worker's GE cache)
    they first let theirs go, and are ended if that is not enough (:func:`_make_room`). When the
    driver stops on an error the workers are ended at once (none goes on writing), then the model
    comes back."""
    device = next(study.model.parameters()).device
    if device.type != "cuda":
        yield
        return
    import torch

    from .weights import remark_unedited, unedited

    was_unedited = unedited(study.model)  # the round trip replaces every tensor: re-marked below
    study.model.to("cpu")
    study._covs.clear()  # C0 factors on the device; reloaded from the disk cache when needed
    torch.cuda.empty_cache()
    ok = False
    try:
        yield
        ok = True
    finally:
        if not ok:
            pool.close()
        # on an error, the driver's own error is the one to report
        with contextlib.nullcontext() if ok else contextlib.suppress(Exception):
            _make_room(pool, _model_bytes(study.model), device, poll_s=poll_s)
            study.model.to(device)
            if was_unedited:  # the same values, moved there and back: still the unedited weights
                remark_unedited(study.model)


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


#: device memory kept free beside a driver model moved back (activations of its next forward)
ROOM_MARGIN_BYTES = 2 << 30
#: seconds the workers get to drop their studies, then for their memory to be freed once ended
#: (``ray.kill`` returns before the process exits)
RELEASE_TIMEOUT_S = 60.0
FREED_TIMEOUT_S = 60.0


def _make_room(pool: _Pool, need: int, device, *, poll_s: float = 0.5) -> None:
    """Free ``need`` bytes (+ :data:`ROOM_MARGIN_BYTES`) on ``device``: the pool's workers drop their
    studies (every worker: the driver cannot tell which share its GPU), then, if that is not
    enough or they do not answer in time, the pool ends (the next experiment starts new workers)
    and this waits until their memory is free. Past the deadline the model moves back anyway, and
    an out-of-memory error names the device."""
    from .stats import free_bytes

    def room() -> bool:
        return free_bytes(device) >= need + ROOM_MARGIN_BYTES

    if room():
        return
    if pool.actors:
        with contextlib.suppress(Exception):  # a lost or busy worker: ended below
            pool.ray.get([a.release.remote() for a in pool.actors], timeout=RELEASE_TIMEOUT_S)
        if room():
            return
        pool.close()
    deadline = time.monotonic() + FREED_TIMEOUT_S
    while not room() and time.monotonic() < deadline:
        time.sleep(poll_s)


# --------------------------------------------------------------------------- the worker side

#: one worker process's state: its loaded study and what the current run's units share
_WORKER: dict = {"key": None, "study": None, "run": None, "shared": {}, "exps": {}}


def _study_key(params: StudyParams, which: str) -> str:
    """What a loaded study depends on (model, facts, C0 corpus); not the experiment sizes."""
    return json.dumps([which, asdict(params.model), asdict(params.second_model) if params.second_model else None,
                       asdict(params.data), asdict(params.covariance)], sort_keys=True, default=str)


def _worker_study(params: StudyParams, which: str, log: Callable) -> "Study":
    """The worker's study for ``params``: loaded on first use, then reused (one kept at a time)."""
    from .protocols import open_study

    key = _study_key(params, which)
    if _WORKER["key"] != key:
        _free_worker_study()
        _WORKER.update(key=key, study=open_study(params, which=which, experiments=[], log=log))
    return _WORKER["study"]


def adopt_contexts(study: "Study", contexts: dict, log: Callable) -> None:
    """Every unit uses the driver's context templates, the ones its provenance records: a worker
    samples its own from its copy of the model, and on another GPU type (or with TF32) a logit
    that differs at rounding can change a sampled token, hence every key of its units."""
    for style, ctx in contexts.items():
        own = study._contexts.get(style)
        if own is not None and own != ctx:
            log(f"context templates ({style}) sampled on this worker differ from the driver's: using the driver's")
        study._contexts[style] = ctx


def _free_worker_study() -> None:
    """Drop the worker's study (its model and C0 factors) before another one loads."""
    import gc

    import torch

    _WORKER.update(key=None, study=None, shared={}, exps={})
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _worker_name() -> str:
    name = f"{socket.gethostname()}:{os.getpid()}"
    with contextlib.suppress(Exception):
        import ray

        gpus = ray.get_gpu_ids()
        if gpus:
            name += f" gpu{','.join(str(g) for g in gpus)}"
    return name


def worker_run(spec: "UnitSpec", params: StudyParams, run_id: str, contexts: dict | None = None) -> "UnitResult":
    """Run one unit in a worker process: only the spec, the params (with the results folder), the
    run's id and the driver's context templates come in; the study and the experiment handle are
    loaded once and reused."""
    from .protocols import UnitContext, open_unit_experiment, run_unit

    lines: list[str] = []
    t0 = time.time()
    study = replace(_worker_study(params, spec.which, lines.append), params=params, log=lines.append)
    adopt_contexts(study, contexts or {}, lines.append)
    if _WORKER["run"] != run_id:
        _WORKER.update(run=run_id, shared={}, exps={})
    if (spec.experiment, spec.which) not in _WORKER["exps"]:
        _WORKER["exps"][(spec.experiment, spec.which)] = open_unit_experiment(study, spec)
    exp = _WORKER["exps"][(spec.experiment, spec.which)]
    res = run_unit(spec, study, exp, UnitContext(log=lines.append, shared=_WORKER["shared"]))
    res.log, res.seconds, res.worker, res.cov_info = lines, time.time() - t0, _worker_name(), dict(study._cov_info)
    return res
