"""CounterFact loading, validation, resolution, download and sampling (editlib.counterfact).

Every file is written into ``tmp_path`` from synthetic-world records; the network is never used
(``urllib.request.urlopen`` is replaced wherever a download could be attempted). The real
CounterFact subset is only read by path, and the test that needs it skips when it is absent.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
from pathlib import Path

import pytest

import editlib.counterfact as cf
from editlib.counterfact import (
    CANONICAL_URL,
    ENV_VAR,
    DatasetNotFound,
    load_counterfact,
    load_records,
    orderings,
    read_record_dicts,
    resolve_counterfact,
    sample,
    save_records,
    unique_subject_case_ids,
)
from editlib.records import Record, RecordError, record_to_dict
from editlib.world import make_world

#: EDITLIB_COUNTERFACT as set outside the tests (CI points it at the subset); read at import,
#: before the autouse fixture below removes it for every test
_OUTER_ENV = os.environ.get(ENV_VAR)
SHARED_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact_subset.json.gz"


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No EDITLIB_COUNTERFACT from the outside, an empty cache in tmp, offline by default."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("EDITLIB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDITLIB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a, **k):  # pragma: no cover - only runs on a bug
        pytest.fail(f"network access attempted: urlopen{a}")
    monkeypatch.setattr("urllib.request.urlopen", fail)


def dicts(n: int = 5, seed: int = 0) -> list[dict]:
    return [record_to_dict(r) for r in make_world(n, seed)]


def write(path: Path, raws: list) -> Path:
    """Write raw dicts as .json / .jsonl, gzipped when the name ends with .gz."""
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    text = "\n".join(json.dumps(r) for r in raws) + "\n" if stem.endswith(".jsonl") else json.dumps(raws)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("name", ["r.json", "r.json.gz", "r.jsonl", "r.jsonl.gz"])
def test_formats_load_identically(tmp_path: Path, name: str) -> None:
    expected = make_world(5)
    got = load_records(write(tmp_path / name, [record_to_dict(r) for r in expected]))
    assert got == expected
    assert all(isinstance(r, Record) for r in got)
    assert [r.case_id for r in got] == [r.case_id for r in expected]


def test_save_records_round_trip(tmp_path: Path) -> None:
    recs = make_world(5)
    p = save_records(recs, tmp_path / "sub" / "out.json")
    assert p.is_file() and load_records(p) == recs
    assert not list(p.parent.glob("*.tmp"))


def test_load_counterfact_sorts_by_case_id(tmp_path: Path) -> None:
    raws = dicts(5)[::-1]
    recs = load_counterfact(write(tmp_path / "r.json", raws))
    assert [r.case_id for r in recs] == sorted(r["case_id"] for r in raws)


# --------------------------------------------------------------------------- bad inputs

def test_truncated_json(tmp_path: Path) -> None:
    text = json.dumps(dicts())
    (tmp_path / "t.json").write_text(text[: len(text) // 2])
    with pytest.raises(RecordError, match="not valid JSON"):
        load_records(tmp_path / "t.json")


def test_truncated_jsonl(tmp_path: Path) -> None:
    text = "\n".join(json.dumps(r) for r in dicts())
    (tmp_path / "t.jsonl").write_text(text[: len(text) - 40])
    with pytest.raises(RecordError):
        load_records(tmp_path / "t.jsonl")


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(json.dumps(dicts()).encode())
    (tmp_path / "t.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError, match="cannot read"):
        load_records(tmp_path / "t.json.gz")


def test_not_a_list(tmp_path: Path) -> None:
    (tmp_path / "o.json").write_text(json.dumps({"case_id": 0}))
    with pytest.raises(RecordError, match="list"):
        load_records(tmp_path / "o.json")


def test_missing_file_is_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound):
        load_records(tmp_path / "nope.json")


@pytest.mark.parametrize("path, fieldname", [
    (("requested_rewrite", "target_new"), "requested_rewrite.target_new"),
    (("requested_rewrite", "target_true", "str"), "requested_rewrite.target_true.str"),
    (("requested_rewrite", "target_new", "id"), "requested_rewrite.target_new.id"),
    (("requested_rewrite", "subject"), "requested_rewrite.subject"),
    (("requested_rewrite", "prompt"), "requested_rewrite.prompt"),
    (("requested_rewrite", "relation_id"), "requested_rewrite.relation_id"),
    (("requested_rewrite",), "requested_rewrite"),
    (("paraphrase_prompts",), "paraphrase_prompts"),
    (("neighborhood_prompts",), "neighborhood_prompts"),
])
def test_missing_field_names_case_id_and_field(tmp_path: Path, path: tuple, fieldname: str) -> None:
    raws = dicts()
    bad = raws[3]
    node = bad
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    with pytest.raises(RecordError) as ei:
        load_records(write(tmp_path / "m.json", raws))
    msg = str(ei.value)
    assert f"case_id={bad['case_id']!r}" in msg
    assert f"'{fieldname}'" in msg


def test_missing_case_id(tmp_path: Path) -> None:
    raws = dicts()
    del raws[2]["case_id"]
    with pytest.raises(RecordError, match="'case_id'"):
        load_records(write(tmp_path / "m.json", raws))


def test_optional_prompt_lists_may_be_missing(tmp_path: Path) -> None:
    raws = dicts()
    del raws[0]["attribute_prompts"], raws[0]["generation_prompts"]
    recs = load_records(write(tmp_path / "m.json", raws))
    assert recs[0].attribute_prompts == () and recs[0].generation_prompts == ()


@pytest.mark.parametrize("prompt, found", [("{} is a citizen of {}", 2), ("Someone is a citizen of", 0)])
def test_prompt_must_have_one_placeholder(tmp_path: Path, prompt: str, found: int) -> None:
    raws = dicts()
    raws[4]["requested_rewrite"]["prompt"] = prompt
    with pytest.raises(RecordError) as ei:
        load_records(write(tmp_path / "p.json", raws))
    msg = str(ei.value)
    assert f"case_id={raws[4]['case_id']!r}" in msg
    assert "requested_rewrite.prompt" in msg and f"found {found}" in msg


def test_target_new_equal_to_true(tmp_path: Path) -> None:
    raws = dicts()
    rw = raws[1]["requested_rewrite"]
    rw["target_new"]["str"] = " " + rw["target_true"]["str"]
    with pytest.raises(RecordError, match=f"case_id={raws[1]['case_id']}.*target_new"):
        load_records(write(tmp_path / "e.json", raws))


def test_duplicate_case_id(tmp_path: Path) -> None:
    raws = dicts()
    raws[4]["case_id"] = raws[1]["case_id"]
    with pytest.raises(RecordError) as ei:
        load_records(write(tmp_path / "d.json", raws))
    assert f"case_id={raws[1]['case_id']!r}" in str(ei.value) and "duplicated" in str(ei.value)


def test_nothing_half_loaded(tmp_path: Path, isolated_env: Path, no_network) -> None:
    """One bad record (the last) fails the whole load: the call raises, nothing is returned or
    cached, and the good records before it are not handed out."""
    raws = dicts()
    del raws[-1]["requested_rewrite"]["target_new"]
    path = write(tmp_path / "h.json", raws)
    result = None
    with pytest.raises(RecordError):
        result = load_counterfact(path)
    assert result is None
    assert not isolated_env.exists() or not any(isolated_env.iterdir())
    assert len(read_record_dicts(path)) == 5  # the file itself is intact and unchanged


# --------------------------------------------------------------------------- resolution

def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_env: Path,
                          no_network) -> None:
    explicit = write(tmp_path / "explicit.json", dicts(3))
    env = write(tmp_path / "env.json.gz", dicts(4))
    isolated_env.mkdir()
    cached = write(isolated_env / "counterfact.json", dicts(5))
    assert cf.cache_dir() == isolated_env

    monkeypatch.setenv(ENV_VAR, str(env))
    assert resolve_counterfact(explicit) == explicit
    assert len(load_counterfact(explicit)) == 3
    assert resolve_counterfact() == env
    assert len(load_counterfact()) == 4
    monkeypatch.delenv(ENV_VAR)
    assert resolve_counterfact() == cached
    assert len(load_counterfact()) == 5


def test_explicit_path_missing_does_not_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  no_network) -> None:
    monkeypatch.setenv(ENV_VAR, str(write(tmp_path / "env.json", dicts(3))))
    with pytest.raises(DatasetNotFound, match="given path"):
        resolve_counterfact(tmp_path / "missing.json")


def test_env_missing_does_not_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       isolated_env: Path, no_network) -> None:
    isolated_env.mkdir()
    write(isolated_env / "counterfact.json", dicts(3))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(DatasetNotFound, match=ENV_VAR):
        resolve_counterfact()


def test_cache_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDITLIB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cf.cache_dir() == tmp_path / "xdg" / "editlib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cf.cache_dir() == Path.home() / ".cache" / "editlib"


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "EDITLIB_OFFLINE"])
def test_offline_not_found(monkeypatch: pytest.MonkeyPatch, isolated_env: Path, var: str,
                           no_network) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv(var, "1")
    assert cf.offline()
    with pytest.raises(DatasetNotFound) as ei:
        load_counterfact()
    msg = str(ei.value)
    assert CANONICAL_URL in msg
    assert cf.CANONICAL_SHA256 in msg
    assert ENV_VAR in msg
    assert str(isolated_env / "counterfact.json") in msg
    assert not isolated_env.exists() or not any(isolated_env.iterdir())


def test_download_false_overrides_online(monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not cf.offline()
    with pytest.raises(DatasetNotFound, match=ENV_VAR):
        resolve_counterfact(download=False)


# --------------------------------------------------------------------------- download

def serve(monkeypatch: pytest.MonkeyPatch, data: bytes) -> list[str]:
    """Replace urlopen by an in-memory server of ``data``; returns the list of requested URLs."""
    calls: list[str] = []

    def fake_urlopen(url, *a, **k):
        calls.append(url if isinstance(url, str) else url.full_url)
        return io.BytesIO(data)

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    return calls


def test_download_wrong_checksum(monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    data = json.dumps(dicts()).encode()
    calls = serve(monkeypatch, data)
    with pytest.raises(RecordError) as ei:
        load_counterfact()
    assert calls == [CANONICAL_URL]
    assert hashlib.sha256(data).hexdigest() in str(ei.value)
    assert cf.CANONICAL_SHA256 in str(ei.value)
    assert not any(isolated_env.iterdir())  # neither counterfact.json nor a .part file


def test_download_correct_checksum(monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    data = json.dumps(dicts()).encode()
    calls = serve(monkeypatch, data)
    monkeypatch.setattr(cf, "CANONICAL_SHA256", hashlib.sha256(data).hexdigest())
    recs = load_counterfact()
    assert calls == [CANONICAL_URL]
    assert recs == make_world(5)
    assert sorted(p.name for p in isolated_env.iterdir()) == ["counterfact.json"]
    assert (isolated_env / "counterfact.json").read_bytes() == data
    # second call: served from the cache, no second download
    assert load_counterfact() == recs and len(calls) == 1


def test_download_true_even_when_offline(monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    data = json.dumps(dicts()).encode()
    calls = serve(monkeypatch, data)
    monkeypatch.setattr(cf, "CANONICAL_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_counterfact(download=True) == isolated_env / "counterfact.json"
    assert calls == [CANONICAL_URL]


def test_sha256_file(tmp_path: Path) -> None:
    data = b"editlib" * 1000
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(data))
    assert cf.sha256_file(tmp_path / "a.bin") == hashlib.sha256(data).hexdigest()
    assert cf.sha256_file(tmp_path / "a.json.gz", uncompressed=True) == hashlib.sha256(data).hexdigest()
    assert cf.sha256_file(tmp_path / "a.json.gz") != hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def dup_records() -> list[Record]:
    """30 world records where some subjects repeat with different case / surrounding spaces."""
    recs = make_world(30, seed=3)
    out = list(recs)
    out[7] = dataclasses.replace(recs[7], subject=recs[2].subject.upper())
    out[11] = dataclasses.replace(recs[11], subject=recs[2].subject.lower())
    out[20] = dataclasses.replace(recs[20], subject=" " + recs[5].subject.swapcase() + " ")
    out[3] = dataclasses.replace(recs[3], subject=recs[25].subject.lower())
    return out


def test_unique_subject_case_ids(dup_records: list[Record]) -> None:
    ids = unique_subject_case_ids(dup_records)
    by_id = {r.case_id: r for r in dup_records}
    assert len(ids) == 30 - 4
    assert ids == sorted(ids)
    dropped = {dup_records[i].case_id for i in (7, 11, 20, 25)}  # the later case_id of each pair
    assert set(ids) == {r.case_id for r in dup_records} - dropped
    keys = [by_id[i].subject.strip().lower() for i in ids]
    assert len(set(keys)) == len(keys)
    # order of the input does not matter
    assert unique_subject_case_ids(dup_records[::-1]) == ids


def test_orderings_deterministic_permutations(dup_records: list[Record]) -> None:
    base = unique_subject_case_ids(dup_records)
    a = orderings(dup_records, 4, seed=5)
    assert a == orderings(dup_records, 4, seed=5)
    assert a == orderings(list(reversed(dup_records)), 4, seed=5)
    assert len(a) == 4
    for o in a:
        assert sorted(o) == sorted(base)
    assert len({tuple(o) for o in a}) == 4  # the orderings of one seed differ from each other
    b = orderings(dup_records, 4, seed=6)
    assert all(x != y for x, y in zip(a, b))
    # ordering i depends on (seed, i) only, not on how many orderings are asked for
    assert orderings(dup_records, 2, seed=5) == a[:2]
    assert orderings(dup_records, 1)[0] == orderings(dup_records, 1, seed=cf.DEFAULT_ORDERING_SEED)[0]


def test_sample(dup_records: list[Record]) -> None:
    by_id = {r.case_id: r for r in dup_records}
    first = orderings(dup_records, 3)
    got = sample(dup_records, 10)
    assert [r.case_id for r in got] == first[0][:10]
    assert all(r is by_id[r.case_id] for r in got)
    assert len({r.subject.strip().lower() for r in got}) == 10
    assert [r.case_id for r in sample(dup_records, 5, ordering=2)] == first[2][:5]
    assert [r.case_id for r in sample(dup_records, 26)] == first[0]
    with pytest.raises(ValueError) as ei:
        sample(dup_records, 27)
    assert "27" in str(ei.value) and "26" in str(ei.value)


# --------------------------------------------------------------------------- the shared subset

def test_shared_counterfact_subset(monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    candidates = [p for p in (_OUTER_ENV, SHARED_SUBSET) if p and Path(p).is_file()]
    if not candidates:
        pytest.skip("CounterFact subset not available (set EDITLIB_COUNTERFACT)")
    monkeypatch.setenv(ENV_VAR, str(candidates[0]))
    recs = load_counterfact()
    assert len(recs) == 10_459
    assert len({r.case_id for r in recs}) == 10_459
    assert len(unique_subject_case_ids(recs)) == 10_205
    assert all(len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10 for r in recs)
    assert len(sample(recs, 10_205)) == 10_205
    with pytest.raises(ValueError, match="10206.*10205"):
        sample(recs, 10_206)
