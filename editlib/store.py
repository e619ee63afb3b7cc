"""Result store: ``results/<run>/<experiment>/`` with ``cases.parquet``, ``batches.parquet`` and
``manifest.json``. Work is saved in units (one batch, or one configuration step) as atomic part
files, so a killed run resumes from its last completed unit; finishing consolidates the parts.

Safe to repeat and to share:

* **Lock.** :meth:`Experiment.open` takes an exclusive ``flock`` on ``<experiment>/.lock`` and holds
  it until :meth:`Experiment.finish` (or the process exits; an experiment already complete is only
  read, so its lock is let go at once). A second process fails at once with
  :class:`ExperimentLocked` naming the folder and the holder's pid, or waits for it when asked
  (``wait=True``, environment ``EDITLIB_LOCK_WAIT=1``, the command line's ``--wait``).
* **Executor workers.** A run on several processes (``executor: {kind: ray}``) keeps one holder:
  the driver opens the folder (and so holds its lock), and its workers open it with
  ``Experiment.open(..., lock=False)``, which writes unit parts without taking the lock, refuses
  to run unless some process holds it, and can never :meth:`~Experiment.finish` (the driver
  consolidates once, after all units). Units that failed on every try are listed in
  ``failed_units.json`` (:meth:`Experiment.record_failed_units`) until a later run finishes them.
* **Versions.** Every saved unit records the editlib version and git commit that wrote it
  (``parts/<unit>.unit.json``). Reopening an incomplete experiment whose units were written by
  other code raises :class:`MixedVersions` naming them, unless mixing is allowed
  (``allow_mixed_versions=True``, ``EDITLIB_ALLOW_MIXED_VERSIONS=1``, ``--allow-mixed-versions``).
* **Clean.** :func:`clean_run` (``python -m editlib clean RUN``) removes a run's incomplete
  experiments (complete ones only when asked), so a crashed run never blocks its corrected re-run.
* Files are written under unique temporary names (``mkstemp``), then get the user's umask (not
  mkstemp's 0600) and are renamed into place.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

import editlib

from . import numerics


ENV_ALLOW_MIXED = "EDITLIB_ALLOW_MIXED_VERSIONS"
ENV_LOCK_WAIT = "EDITLIB_LOCK_WAIT"
LOCK_NAME = ".lock"
FAILED_UNITS = "failed_units.json"


class StoreError(RuntimeError):
    """A results folder cannot be used as asked (the message names it and the way out)."""


class RunConflict(StoreError):
    """An existing experiment was made with different parameters (or see the subclasses)."""


class ExperimentLocked(RunConflict):
    """Another process is working on the experiment folder (the message names its pid)."""


class MixedVersions(RunConflict):
    """The experiment's saved units were written by another editlib version or commit."""


def env_flag(name: str) -> bool:
    """True when environment variable ``name`` is 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode a plain ``open`` would: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    try:
        root = Path(editlib.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> dict:
    """The editlib version and git commit of the running code (recorded with every unit)."""
    return {"editlib_version": editlib.__version__, "git_commit": _git_commit()}


def _short_version(v: dict) -> str:
    commit = v.get("git_commit")
    return f"version {v.get('editlib_version') or 'unknown'}, commit {commit[:12] if commit else 'unknown'}"


# --------------------------------------------------------------------------- locks

@dataclass
class _Lock:
    path: Path
    fd: int


_HELD: dict[str, _Lock] = {}  # experiment folder -> the lock this process holds on it


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock_folder(root: Path, *, wait: bool = False, log: Callable[[str], None] | None = None) -> _Lock:
    """Exclusive lock on ``root/.lock`` for this process (re-entrant within it). Held by another
    process: :class:`ExperimentLocked` at once, or block until it is free when ``wait``."""
    key = str(Path(root).resolve())
    if key in _HELD:
        return _HELD[key]
    lock_path = Path(root) / LOCK_NAME
    while True:
        Path(root).mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock_path)
            if not wait:
                os.close(fd)
                raise ExperimentLocked(
                    f"{root} is in use by another process ({holder}); wait until it ends, or rerun with "
                    f"--wait (EDITLIB_LOCK_WAIT=1) to queue behind it") from None
            (log or _stderr)(f"{root} is in use by another process ({holder}); waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, lock_path):  # not removed by `clean` while this process waited
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {platform.node()}\n".encode())
    _HELD[key] = _Lock(lock_path, fd)
    return _HELD[key]


def held_elsewhere(root: Path) -> bool:
    """True when this process holds ``root``'s lock or another process does (checked without
    keeping it): what an executor worker needs before it writes into the folder unlocked."""
    if str(Path(root).resolve()) in _HELD:
        return True
    lock_path = Path(root) / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of a lock taken just now
    return False


def release_folder(root: Path) -> None:
    """Let go of this process's lock on ``root`` (no-op when it holds none)."""
    lock = _HELD.pop(str(Path(root).resolve()), None)
    if lock is not None:
        os.close(lock.fd)  # closing the descriptor releases the flock


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "transformers", "tokenizers", "numpy", "pandas", "scipy", "datasets", "papermill"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    """What the numbers were computed on, for the manifest: float rounding (and so the last digits
    of sensitive configurations) depends on the CPU's vector width and BLAS code path, not only on
    the code and package versions."""
    import torch

    # platform.processor() is empty on most Linux systems
    cpu = (numerics.cpu_info() or {}).get("model name") or platform.processor()
    out = {"platform": platform.platform(), "processor": cpu, "cpus": os.cpu_count(),
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "torch_threads": torch.get_num_threads(), "numerics": numerics.current()}
    if torch.cuda.is_available():
        out["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


@dataclass
class Experiment:
    """One experiment folder. ``params`` is what defines the results (checked on reopen)."""

    root: Path
    params: dict
    provenance: dict
    lock: bool = True  # False: an executor worker of a run whose driver holds the folder's lock
    #: dotted params keys that may differ from the stored ones on reopen (how, not what, was computed)
    free_keys: tuple[str, ...] = ()
    #: how this session computes what ``params`` define (settings outside the digest that move
    #: numbers at float rounding, e.g. GE's decode batch): recorded in every unit it saves, so a run
    #: resumed with other settings says so (:meth:`stored_settings`, the manifest's ``unit_settings``)
    settings: dict = field(default_factory=dict)

    @classmethod
    def open(cls, results_dir: str | os.PathLike, run: str, experiment: str, params: dict,
             provenance: dict | None = None, *, allow_mixed_versions: bool | None = None,
             wait: bool | None = None, lock: bool = True, free_keys: Sequence[str] = (),
             settings: dict | None = None) -> "Experiment":
        """Lock the folder (see the module docstring), check that it holds results of the same
        parameters and code version, and create its manifest. ``allow_mixed_versions`` and
        ``wait`` default to the environment (``EDITLIB_ALLOW_MIXED_VERSIONS``, ``EDITLIB_LOCK_WAIT``),
        so a notebook kernel started by ``reproduce`` inherits the command line's choice.

        ``lock=False`` is for executor workers only: the driver of the run has opened the folder
        (it holds the lock and wrote the manifest); the worker checks the same parameters and
        saves units without taking the lock. ``free_keys``: dotted params keys whose stored value
        may differ (:attr:`free_keys`); ``settings``: :attr:`settings`."""
        root = Path(results_dir) / run / experiment
        if not lock:
            return cls._open_unlocked(root, results_dir, run, params, provenance, allow_mixed_versions,
                                      tuple(free_keys), dict(settings or {}))
        lock_folder(root, wait=env_flag(ENV_LOCK_WAIT) if wait is None else wait)
        try:
            exp = cls(root, params, provenance or {}, free_keys=tuple(free_keys), settings=dict(settings or {}))
            exp._check_reopen(results_dir, run, env_flag(ENV_ALLOW_MIXED) if allow_mixed_versions is None
                              else allow_mixed_versions)
        except BaseException:
            release_folder(root)
            raise
        if exp.complete:
            release_folder(root)  # only read from now on; a later write takes the lock again
        elif not (root / "manifest.json").is_file():
            exp._write_manifest(complete=False)
        return exp

    @classmethod
    def _open_unlocked(cls, root: Path, results_dir, run: str, params: dict, provenance: dict | None,
                       allow_mixed_versions: bool | None, free_keys: tuple[str, ...] = (),
                       settings: dict | None = None) -> "Experiment":
        """A worker's handle: the folder must be open (locked, manifest written, not complete)
        by the run's driver."""
        if not held_elsewhere(root) or not (root / "manifest.json").is_file():
            raise StoreError(f"{root}: Experiment.open(lock=False) is for executor workers of a run whose "
                             "driver has opened the folder and holds its lock; none does")
        exp = cls(root, params, provenance or {}, lock=False, free_keys=free_keys, settings=dict(settings or {}))
        exp._check_reopen(results_dir, run, env_flag(ENV_ALLOW_MIXED) if allow_mixed_versions is None
                          else allow_mixed_versions)
        if exp.complete:
            raise StoreError(f"{root} is already complete: a worker has nothing to write there")
        return exp

    def _check_reopen(self, results_dir, run: str, allow_mixed: bool) -> None:
        """Same parameters as the stored ones (RunConflict), and, while units will still be added,
        units written by this code version (MixedVersions unless ``allow_mixed``)."""
        man = self.manifest
        clean = f"python -m editlib clean {run} --results-dir {results_dir} --experiment {self.root.name}"
        if man and man.get("params_digest") != params_digest(self.params):
            changed = _changed(man.get("params", {}), json.loads(json.dumps(self.params, default=str)))
            if not changed or not set(changed) <= set(self.free_keys):  # free keys alone: the same results
                done = bool(man.get("complete"))
                raise RunConflict(
                    f"{self.root} holds {'complete' if done else 'incomplete'} results made with different "
                    f"parameters (changed: {', '.join(changed) or '?'}); use another run name (params 'name') "
                    f"or remove them with `{clean}{' --include-complete' if done else ''}`")
        if man.get("complete") or allow_mixed:
            return
        differ = self.foreign_units()
        if differ:
            shown = "; ".join(f"{u}: {_short_version(v)}" for u, v in differ[:3])
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise MixedVersions(
                f"{self.root}: {len(differ)} saved unit(s) were written by other code ({shown}{more}); "
                f"this is {_short_version(code_version())}. Finish the run with that code, remove them "
                f"with `{clean}`, or resume anyway with --allow-mixed-versions ({ENV_ALLOW_MIXED}=1)")

    def foreign_units(self) -> list[tuple[str, dict]]:
        """Saved units whose recorded version or commit is not this code's (unrecorded: unknown)."""
        here = code_version()
        return [(stem, v) for stem, v in self._unit_records() if {k: v.get(k) for k in here} != here]

    def _unit_records(self) -> list[tuple[str, dict]]:
        """(part stem, its ``unit.json``) of every saved unit, in file order ({} where unreadable)."""
        parts = self.root / "parts"
        return [(f.name[: -len(".cases.parquet")], self._unit_version(f))
                for f in sorted(parts.glob("*.cases.parquet"))] if parts.is_dir() else []

    @staticmethod
    def _unit_version(cases_file: Path) -> dict:
        side = cases_file.with_name(cases_file.name[: -len(".cases.parquet")] + ".unit.json")
        try:
            return json.loads(side.read_text())
        except (OSError, ValueError):
            return {}

    def close(self) -> None:
        """Let go of the folder's lock without finishing (the process exit does the same)."""
        release_folder(self.root)

    # ---------------------------------------------------------------- manifest
    @property
    def manifest(self) -> dict:
        p = self.root / "manifest.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _write_manifest(self, *, complete: bool, timings: dict | None = None) -> None:
        old = self.manifest
        man = {
            "experiment": self.root.name, "run": self.root.parent.name,
            "params": self.params, "params_digest": params_digest(self.params),
            "editlib_version": editlib.__version__, "git_commit": _git_commit(),
            "packages": _versions(), "python": platform.python_version(),
            "machine": machine(),
            "provenance": {**old.get("provenance", {}), **self.provenance},
            "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "complete": complete,
            "timings": {**old.get("timings", {}), **(timings or {})},
        }
        records = self._unit_records()  # one pass over the units for both counts
        man["unit_versions"] = self.unit_versions(records)
        settings = self.unit_settings(records)
        if settings:  # units saved with settings (the current code records them)
            man["unit_settings"] = settings
        atomic_write_json(self.root / "manifest.json", man)

    # ---------------------------------------------------------------- parts
    @staticmethod
    def part_stem(unit: str) -> str:
        """The file name stem of ``unit``'s parts (characters a file name should not hold: "_")."""
        return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in unit)

    def _part(self, kind: str, unit: str) -> Path:
        return self.root / "parts" / f"{self.part_stem(unit)}.{kind}.parquet"

    def has_unit(self, unit: str) -> bool:
        return self._part("cases", unit).is_file()

    def save_unit(self, unit: str, cases: pd.DataFrame, batches: pd.DataFrame | None = None) -> None:
        """The unit's code version, batch diagnostics, then cases: the cases file marks the unit
        complete."""
        if self.lock:
            lock_folder(self.root, wait=env_flag(ENV_LOCK_WAIT))
        side = self._part("cases", unit)
        atomic_write_json(side.with_name(side.name[: -len(".cases.parquet")] + ".unit.json"),
                          {"unit": unit, **code_version(), "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           **({"settings": self.settings} if self.settings else {})})
        if batches is not None:
            atomic_write_parquet(self._part("batches", unit), batches)
        atomic_write_parquet(self._part("cases", unit), cases)

    def load_unit(self, unit: str) -> pd.DataFrame:
        return pd.read_parquet(self._part("cases", unit))

    def finish(self, timings: dict | None = None) -> None:
        """Consolidate parts (in unit-file order) into cases.parquet / batches.parquet; release
        the folder's lock. Every unit is done, so no failed unit is left to list."""
        if not self.lock:
            raise StoreError(f"{self.root}: an executor worker never finishes an experiment (its driver does)")
        lock_folder(self.root, wait=env_flag(ENV_LOCK_WAIT))
        try:
            (self.root / FAILED_UNITS).unlink(missing_ok=True)
            for kind in ("cases", "batches"):
                files = sorted((self.root / "parts").glob(f"*.{kind}.parquet")) if (self.root / "parts").is_dir() else []
                frames = [pd.read_parquet(f) for f in files]
                df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
                atomic_write_parquet(self.root / f"{kind}.parquet", df)
            self._write_manifest(complete=True, timings=timings)
        finally:
            release_folder(self.root)

    def record_failed_units(self, failed: dict[str, dict]) -> None:
        """List the units that failed on every try (unit -> error, attempts, worker) in
        ``failed_units.json``; an empty mapping removes the file."""
        path = self.root / FAILED_UNITS
        if failed:
            atomic_write_json(path, failed)
        else:
            path.unlink(missing_ok=True)

    def failed_units(self) -> dict[str, dict]:
        """The units listed in ``failed_units.json`` (empty when none failed)."""
        path = self.root / FAILED_UNITS
        return json.loads(path.read_text()) if path.is_file() else {}

    def unit_versions(self, records: list[tuple[str, dict]] | None = None) -> dict[str, int]:
        """How many saved units each code version wrote ("<version>@<commit>": n); ``records``:
        :meth:`_unit_records`, when the caller has read them."""
        return dict(Counter(f"{v.get('editlib_version') or 'unknown'}@{(v.get('git_commit') or 'unknown')[:12]}"
                            for _, v in (self._unit_records() if records is None else records)))

    def unit_settings(self, records: list[tuple[str, dict]] | None = None) -> dict[str, int]:
        """How many saved units ran with each :attr:`settings` (its JSON: n); units saved without
        settings are not counted."""
        return dict(Counter(json.dumps(v["settings"], sort_keys=True)
                            for _, v in (self._unit_records() if records is None else records) if v.get("settings")))

    def stored_settings(self) -> list[dict]:
        """The distinct :attr:`settings` of the saved units other than this session's."""
        mine = json.dumps(self.settings, sort_keys=True)
        return [json.loads(k) for k in self.unit_settings() if k != mine]

    def cases(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "cases.parquet")

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)
        return self.root / "checkpoints" / safe  # a folder: one factor file per batch


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed(a, b, f"{prefix}{k}.")
        elif a != b or (k in old) != (k in new):  # a key only one side has is a change, even null
            keys.append(prefix + k)
    return keys


# --------------------------------------------------------------------------- clean

@dataclass
class Cleaned:
    """What :func:`clean_run` did with one experiment folder."""

    folder: Path
    removed: bool
    why: str  # "incomplete", "complete (asked)", "complete: kept"


def clean_run(results_dir: str | os.PathLike, run: str, experiments: Sequence[str] | None = None, *,
              include_complete: bool = False, dry_run: bool = False) -> list[Cleaned]:
    """Remove the run's incomplete experiment folders (all of them, or those named), and complete
    ones only with ``include_complete``. A folder another process holds is never touched
    (:class:`ExperimentLocked`)."""
    root = Path(results_dir) / run
    if not root.is_dir():
        raise StoreError(f"no results folder {root} (run name {run!r}, results dir {results_dir})")
    found = sorted(d for d in root.iterdir() if d.is_dir())
    if experiments:
        unknown = sorted(set(experiments) - {d.name for d in found})
        if unknown:
            raise StoreError(f"{root} has no experiment(s) {unknown}; it has {[d.name for d in found]}")
        found = [d for d in found if d.name in set(experiments)]
    return [_clean_one(d, include_complete, dry_run) for d in found]


def _is_complete(folder: Path) -> bool:
    man = folder / "manifest.json"
    try:
        return bool(json.loads(man.read_text()).get("complete")) if man.is_file() else False
    except (OSError, ValueError):
        return False  # an unreadable manifest: the folder is not a usable result


def _clean_one(folder: Path, include_complete: bool, dry_run: bool) -> Cleaned:
    """Remove one experiment folder under its lock (so no running process loses its work; the
    state is read again once the lock is held)."""
    if dry_run:
        complete = _is_complete(folder)
        keep = complete and not include_complete
        return Cleaned(folder, False, "complete: kept" if keep else
                       f"{'complete' if complete else 'incomplete'}: would be removed")
    lock_folder(folder, wait=False)
    try:
        complete = _is_complete(folder)
        if complete and not include_complete:
            return Cleaned(folder, False, "complete: kept (--include-complete removes it)")
        shutil.rmtree(folder)
    finally:
        release_folder(folder)
    return Cleaned(folder, True, "complete (asked)" if complete else "incomplete")
