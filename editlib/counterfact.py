"""Finding, loading, validating and sampling CounterFact (SPEC §5 "Fact list", §6).

Where the file comes from, first match wins:

1. an explicit ``path`` argument,
2. the environment variable ``EDITLIB_COUNTERFACT`` (a file path),
3. the user cache ``$EDITLIB_CACHE/counterfact.json`` (default ``~/.cache/editlib``),
4. a download of the canonical ``counterfact.json`` into that cache, verified against its sha256.

Offline (``HF_HUB_OFFLINE=1`` or ``EDITLIB_OFFLINE=1``) step 4 is skipped and a missing file is one
clear error that says where to put it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

from .records import Record, RecordError, record_to_dict, records_from_dicts

CANONICAL_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
CANONICAL_SHA256 = "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"
ENV_VAR = "EDITLIB_COUNTERFACT"
DEFAULT_ORDERING_SEED = 37  # the reference's create_samples_cf.py seed (SPEC §5)


class DatasetNotFound(FileNotFoundError):
    """CounterFact could not be found locally and may not be downloaded."""


def cache_dir() -> Path:
    """editlib's user cache (``EDITLIB_CACHE``, else ``$XDG_CACHE_HOME/editlib``, else ``~/.cache/editlib``)."""
    if os.environ.get("EDITLIB_CACHE"):
        return Path(os.environ["EDITLIB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "editlib"


def offline() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE`` or ``EDITLIB_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "EDITLIB_OFFLINE"))


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, EOFError) as e:  # truncated gzip, unreadable file
        raise RecordError(f"cannot read records file {path}: {e}") from e


def read_record_dicts(path: str | os.PathLike) -> list[dict]:
    """Raw dicts from ``.json`` (a list), ``.jsonl`` (one per line), optionally gzipped."""
    p = Path(path)
    if not p.is_file():
        raise DatasetNotFound(f"records file not found: {p}")
    text = _read_text(p)
    stem = p.name[:-3] if p.name.endswith(".gz") else p.name
    try:
        if stem.endswith(".jsonl"):
            raws = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raws = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"records file {p} is not valid JSON: {e}") from e
    if not isinstance(raws, list):
        raise RecordError(f"records file {p} must hold a JSON list of records, got {type(raws).__name__}")
    return raws


def load_records(path: str | os.PathLike) -> list[Record]:
    """Load and validate every record of a file; a malformed record or an empty list fails the
    whole load (nothing could be edited or evaluated, so say so before any model loads)."""
    raws = read_record_dicts(path)  # its errors name the file already
    try:
        records = records_from_dicts(raws)
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from None  # which file, besides which record and field
    if not records:
        raise RecordError(f"records file {path} holds no records")
    return records


def save_records(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records as one JSON list in the CounterFact schema (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps([record_to_dict(r) for r in records], indent=1, ensure_ascii=False)
    from .store import atomic_write_bytes  # unique temp name, then the user's umask, then rename

    atomic_write_bytes(p, data.encode("utf-8"))
    return p


def sha256_file(path: str | os.PathLike, *, uncompressed: bool = False) -> str:
    """sha256 of a file's bytes (of the decompressed bytes when ``uncompressed`` and it is gzipped)."""
    h = hashlib.sha256()
    p = Path(path)
    opener = gzip.open if (uncompressed and p.suffix == ".gz") else open
    with opener(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(CANONICAL_URL, timeout=60) as r, open(tmp, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
        got = sha256_file(tmp)
        if got != CANONICAL_SHA256:
            raise RecordError(f"downloaded {CANONICAL_URL} has sha256 {got}, expected {CANONICAL_SHA256}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def resolve_counterfact(path: str | os.PathLike | None = None, *, download: bool | None = None) -> Path:
    """Find the CounterFact file (see module docstring); downloads only when allowed."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasetNotFound(f"CounterFact file not found at the given path: {p}")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise DatasetNotFound(f"{ENV_VAR}={env} does not point at a file")
        return p
    cached = cache_dir() / "counterfact.json"
    if cached.is_file():
        return cached
    if download is None:
        download = not offline()
    if not download:
        raise DatasetNotFound(
            "CounterFact not found. Put counterfact.json (sha256 "
            f"{CANONICAL_SHA256}, from {CANONICAL_URL}) at {cached}, or set {ENV_VAR}=/path/to/file "
            "(.json, .json.gz or .jsonl), or pass the path explicitly.")
    _download(cached)
    return cached


_LOADED: dict[tuple, tuple[Record, ...]] = {}  # the last file loaded (pre-load checks read it first)


def load_counterfact(path: str | os.PathLike | None = None, *, download: bool | None = None) -> list[Record]:
    """Resolve, load and validate CounterFact; records sorted by case_id. The last file read is
    remembered (by path, size and mtime), so checking it before a model loads costs nothing later."""
    p = resolve_counterfact(path, download=download)
    st = p.stat()
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = tuple(sorted(load_records(p), key=lambda r: r.case_id))
    return list(_LOADED[key])


# --------------------------------------------------------------------------- sampling

def unique_subject_case_ids(records: Sequence[Record]) -> list[int]:
    """case_ids of the first record (by case_id) of each case-insensitive subject (SPEC §5)."""
    seen: set[str] = set()
    out = []
    for r in sorted(records, key=lambda r: r.case_id):
        key = r.subject.strip().lower()
        if key not in seen:
            seen.add(key)
            out.append(r.case_id)
    return out


def orderings(records: Sequence[Record], n_orderings: int = 10,
              seed: int = DEFAULT_ORDERING_SEED) -> list[list[int]]:
    """``n_orderings`` seeded shuffles of the unique-subject case_ids.

    Rule (documented so others can reproduce it): ``rng = random.Random(seed)``; for each ordering,
    copy the unique-subject case_ids in ascending order and ``rng.shuffle`` the copy. Ordering ``i``
    therefore depends on ``seed`` and ``i`` only, never on the method, batch size or machine.
    """
    base = unique_subject_case_ids(records)
    rng = random.Random(seed)
    out = []
    for _ in range(n_orderings):
        ids = list(base)
        rng.shuffle(ids)
        out.append(ids)
    return out


def sample(records: Sequence[Record], n: int, ordering: int = 0,
           seed: int = DEFAULT_ORDERING_SEED) -> list[Record]:
    """The first ``n`` records of ordering ``ordering`` (unique subjects, seeded, see :func:`orderings`)."""
    ids = orderings(records, ordering + 1, seed)[ordering]
    if n > len(ids):
        raise RecordError(f"asked for {n} facts but only {len(ids)} records with unique subjects are available")
    by_id = {r.case_id: r for r in records}
    return [by_id[i] for i in ids[:n]]
