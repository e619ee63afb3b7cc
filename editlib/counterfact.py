"""Finding, loading, validating and sampling CounterFact (SPEC §5 "Fact list", §6).

Where the file comes from, first match wins:

1. an explicit ``path`` argument,
2. the environment variable ``EDITLIB_COUNTERFACT`` (a file path),
3. the user cache ``$EDITLIB_CACHE/counterfact.json`` (default ``~/.cache/editlib``),
4. a download of the canonical ``counterfact.json`` into that cache, verified against its sha256.

Offline (``HF_HUB_OFFLINE=1`` or ``EDITLIB_OFFLINE=1``) step 4 is skipped and a missing file is one
clear error that says where to put it.

Which facts are edited, in which order (``data.fact_list``):

* ``seeded`` (editlib's rule, :func:`orderings`): the first record of each case-insensitive subject,
  shuffled with ``random.Random(seed)``, one fresh shuffle per ordering;
* ``reference`` (the paper's list, SPEC §5 "Fact list"): the index file the reference code loads,
  ``counterfact_sampled_unique_mcf_10_20000.json`` (its ``if ds_name in 'cf'`` / ``in 'mcf'`` substring
  tests load the *mcf* file for ``cf`` as well), whose sample ``"i"`` (ordering i) lists 20,000
  positions of ``counterfact.json``, i.e. case_ids. They were drawn for unique subjects in
  multi-CounterFact, so in ``counterfact.json`` a subject can repeat; the reference edits them so,
  and so does ``reference``. Found like CounterFact itself: ``data.fact_list_path``, else
  ``EDITLIB_FACT_LIST``, else the cache, else a download pinned to the commit and sha256 below.
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

#: data.fact_list values: editlib's seeded unique-subject orderings, or the paper's index file
FACT_LISTS = ("seeded", "reference")
#: the index file the reference code loads for CounterFact (SPEC §5), at the paper's commit
FACT_LIST_NAME = "counterfact_sampled_unique_mcf_10_20000.json"
FACT_LIST_URL = ("https://raw.githubusercontent.com/scalable-model-editing/unified-model-editing/"
                 f"cf1907fc3e90c87ff9724c3fd750b290658a3f97/data/{FACT_LIST_NAME}")
FACT_LIST_SHA256 = "8ed45d7ce1e0bc6c1c4822b385ffeae93048bde55bbcc46a6e1207c91ef7cfd7"
FACT_LIST_ENV = "EDITLIB_FACT_LIST"


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


def _download(dest: Path, url: str | None = None, sha256: str | None = None) -> None:
    """``url`` (default: CounterFact's) into ``dest`` if its bytes have ``sha256``; readable as the
    user's umask allows (a shared cache), never a partial file."""
    from .store import apply_umask

    url, sha256 = url or CANONICAL_URL, sha256 or CANONICAL_SHA256
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
        got = sha256_file(tmp)
        if got != sha256:
            raise RecordError(f"downloaded {url} has sha256 {got}, expected {sha256}")
        apply_umask(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def resolve_counterfact(path: str | os.PathLike | None = None, *, download: bool | None = None,
                        given_as: str = "the given path") -> Path:
    """Find the CounterFact file (see module docstring); downloads only when allowed. ``given_as``
    names ``path`` in an error (a params key, a command-line flag)."""
    given = _given_file("the CounterFact file", (path, given_as), (os.environ.get(ENV_VAR), ENV_VAR))
    if given is not None:
        return given
    return _cached_or_download(
        "counterfact.json", CANONICAL_URL, CANONICAL_SHA256, download,
        "CounterFact not found. Put counterfact.json (sha256 "
        f"{CANONICAL_SHA256}, from {CANONICAL_URL}) at {{cached}}, or set {ENV_VAR}=/path/to/file "
        "(.json, .json.gz or .jsonl), or pass the path explicitly.")


def _given_file(what: str, *candidates: tuple[str | os.PathLike | None, str]) -> Path | None:
    """The first set candidate (a value and where it came from) as a path, else None. A set one
    that names no file fails naming its source; it never falls back to the next."""
    for given, source in candidates:
        if given:
            p = Path(given).expanduser()
            if not p.is_file():
                raise DatasetNotFound(f"{source}: {what} {p} is not a file")
            return p
    return None


def _cached_or_download(name: str, url: str, sha256: str, download: bool | None, missing: str) -> Path:
    """``name`` in the user cache, else downloaded there (``download`` None: unless offline), else
    :class:`DatasetNotFound` with ``missing`` (its ``{cached}`` filled in)."""
    cached = cache_dir() / name
    if cached.is_file():
        return cached
    if download is None:
        download = not offline()
    if not download:
        raise DatasetNotFound(missing.format(cached=cached))
    _download(cached, url, sha256)
    return cached


_LOADED: dict[tuple, tuple[Record, ...]] = {}  # the last file loaded (pre-load checks read it first)


def load_counterfact(path: str | os.PathLike | None = None, *, download: bool | None = None,
                     given_as: str = "the given path") -> list[Record]:
    """Resolve, load and validate CounterFact; records sorted by case_id. The last file read is
    remembered (by path, size and mtime), so checking it before a model loads costs nothing later."""
    p = resolve_counterfact(path, download=download, given_as=given_as)
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
           seed: int = DEFAULT_ORDERING_SEED, *, fact_list: dict[int, list[int]] | None = None) -> list[Record]:
    """The first ``n`` records of ordering ``ordering``: of the seeded unique-subject orderings
    (:func:`orderings`), or with ``fact_list`` (:func:`load_fact_list`) of its sample ``ordering``."""
    if fact_list is None:
        ids = orderings(records, ordering + 1, seed)[ordering]
        if n > len(ids):
            raise RecordError(f"asked for {n} facts but only {len(ids)} records with unique subjects are available")
    else:
        ids = reference_case_ids(records, fact_list, ordering, n)
    by_id = {r.case_id: r for r in records}
    return [by_id[i] for i in ids[:n]]


# --------------------------------------------------------------------------- the reference's fact list

def resolve_fact_list(path: str | os.PathLike | None = None, *, download: bool | None = None) -> Path:
    """Find the reference's index file (module docstring): ``path``, ``EDITLIB_FACT_LIST``, the
    cache, else a download checked against :data:`FACT_LIST_SHA256` when allowed."""
    given = _given_file("the reference fact list", (path, "data.fact_list_path"),
                        (os.environ.get(FACT_LIST_ENV), FACT_LIST_ENV))
    if given is not None:
        return given
    return _cached_or_download(
        FACT_LIST_NAME, FACT_LIST_URL, FACT_LIST_SHA256, download,
        f"data.fact_list is 'reference' but its index file was not found. Put {FACT_LIST_NAME} "
        f"(sha256 {FACT_LIST_SHA256}, from {FACT_LIST_URL}) at {{cached}}, or set {FACT_LIST_ENV} or "
        "data.fact_list_path, or use data.fact_list: seeded")


_FACT_LISTS: dict[tuple, dict[int, list[int]]] = {}


def load_fact_list(path: str | os.PathLike) -> dict[int, list[int]]:
    """The index file's samples as {ordering: case_ids}, validated (a JSON object of "0", "1", ...
    to lists of distinct non-negative integers); the last file read is remembered."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _FACT_LISTS:
        return _FACT_LISTS[key]
    try:
        raw = json.loads(_read_text(p))
    except json.JSONDecodeError as e:
        raise RecordError(f"fact list {p} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise RecordError(f"fact list {p} must be a JSON object of samples (\"0\": [case_id, ...]), "
                          f"got {type(raw).__name__}")
    out: dict[int, list[int]] = {}
    for k, ids in raw.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise RecordError(f"fact list {p}: sample name {k!r} is not a number")
        if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                      for i in ids)):
            raise RecordError(f"fact list {p}: sample {k!r} must be a non-empty list of non-negative integers")
        if len(set(ids)) != len(ids):
            raise RecordError(f"fact list {p}: sample {k!r} repeats a case_id")
        out[int(k)] = ids
    _FACT_LISTS.clear()
    _FACT_LISTS[key] = out
    return out


def reference_case_ids(records: Sequence[Record], fact_list: dict[int, list[int]], ordering: int,
                       n: int) -> list[int]:
    """The first ``n`` case_ids of sample ``ordering`` of the reference's fact list, each checked to be
    among ``records`` (a CounterFact subset may lack them: the reference indexes the full file)."""
    if ordering not in fact_list:
        raise RecordError(f"ordering {ordering}: the reference fact list has samples {sorted(fact_list)} only "
                          "(data.orderings)")
    ids = fact_list[ordering][:n]
    if n > len(ids):
        raise RecordError(f"asked for {n} facts but sample {ordering} of the reference fact list has {len(ids)}")
    have = {r.case_id for r in records}
    missing = [i for i in ids if i not in have]
    if missing:
        raise RecordError(f"{len(missing)} of the first {n} facts of the reference fact list (sample {ordering}; "
                          f"case_ids {missing[:5]}{' ...' if len(missing) > 5 else ''}) are not in the loaded "
                          "CounterFact records: the list indexes the full counterfact.json (21,919 records)")
    return ids
