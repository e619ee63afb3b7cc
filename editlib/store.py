"""Result store: ``results/<run>/<experiment>/`` with ``cases.parquet``, ``batches.parquet`` and
``manifest.json``. Work is saved in units (one batch, or one configuration step) as atomic part
files, so a killed run resumes from its last completed unit; finishing consolidates the parts.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import editlib


class RunConflict(RuntimeError):
    """An existing run was made with different parameters."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        root = Path(editlib.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("torch", "transformers", "tokenizers", "numpy", "pandas", "scipy", "datasets", "papermill"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class Experiment:
    """One experiment folder. ``params`` is what defines the results (checked on reopen)."""

    root: Path
    params: dict
    provenance: dict

    @classmethod
    def open(cls, results_dir: str | os.PathLike, run: str, experiment: str, params: dict,
             provenance: dict | None = None) -> "Experiment":
        root = Path(results_dir) / run / experiment
        man = root / "manifest.json"
        if man.is_file():
            old = json.loads(man.read_text())
            if old.get("params_digest") != params_digest(params):
                raise RunConflict(
                    f"{root} was run with different parameters; use another run name (params 'name') "
                    f"or delete {root}. Changed keys: {_changed(old.get('params', {}), json.loads(json.dumps(params, default=str)))}")
        exp = cls(root, params, provenance or {})
        if not man.is_file():
            exp._write_manifest(complete=False)
        return exp

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
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count()},
            "provenance": {**old.get("provenance", {}), **self.provenance},
            "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "complete": complete,
            "timings": {**old.get("timings", {}), **(timings or {})},
        }
        atomic_write_json(self.root / "manifest.json", man)

    # ---------------------------------------------------------------- parts
    def _part(self, kind: str, unit: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in unit)
        return self.root / "parts" / f"{safe}.{kind}.parquet"

    def has_unit(self, unit: str) -> bool:
        return self._part("cases", unit).is_file()

    def save_unit(self, unit: str, cases: pd.DataFrame, batches: pd.DataFrame | None = None) -> None:
        """Batch diagnostics first, then cases: the cases file marks the unit complete."""
        if batches is not None:
            atomic_write_parquet(self._part("batches", unit), batches)
        atomic_write_parquet(self._part("cases", unit), cases)

    def load_unit(self, unit: str) -> pd.DataFrame:
        return pd.read_parquet(self._part("cases", unit))

    def finish(self, timings: dict | None = None) -> None:
        """Consolidate parts (in unit-file order) into cases.parquet / batches.parquet."""
        for kind in ("cases", "batches"):
            files = sorted((self.root / "parts").glob(f"*.{kind}.parquet")) if (self.root / "parts").is_dir() else []
            frames = [pd.read_parquet(f) for f in files]
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            atomic_write_parquet(self.root / f"{kind}.parquet", df)
        self._write_manifest(complete=True, timings=timings)

    def cases(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "cases.parquet")

    def batches(self) -> pd.DataFrame:
        p = self.root / "batches.parquet"
        return pd.read_parquet(p) if p.is_file() else pd.DataFrame()

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)
        return self.root / "checkpoints" / f"{safe}.safetensors"


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix + k)
    return keys
