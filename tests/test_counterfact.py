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

# _fixtures reads EDITLIB_COUNTERFACT as set outside the tests (CI points it at the subset) at
# import, before the autouse fixture below removes it for every test
from _fixtures import counterfact_subset  # noqa: E402


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


def test_real_counterfact_fields_round_trip(tmp_path: Path) -> None:
    """CounterFact's own fields beyond the world's (pararel_idx, keys editlib does not read) are
    written back as they were read."""
    raws = dicts()
    raws[0]["pararel_idx"] = 7
    raws[0]["extra_field"] = [1, {"a": "b"}]
    recs = load_records(write(tmp_path / "m.json", raws))
    assert recs[0].pararel_idx == 7
    back = record_to_dict(recs[0])
    assert back["pararel_idx"] == 7 and back["extra_field"] == [1, {"a": "b"}]
    assert load_records(save_records(recs, tmp_path / "out.json")) == recs


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


@pytest.mark.parametrize("fieldname, value, why", [
    ("paraphrase_prompts", "a paraphrase", "must be a list of strings"),  # not one prompt per character
    ("neighborhood_prompts", [], "is empty"),
    ("generation_prompts", ["ok", 3], "must be a list of strings"),
])
def test_prompt_lists_must_be_lists_of_strings(tmp_path: Path, fieldname: str, value, why: str) -> None:
    raws = dicts()
    raws[1][fieldname] = value
    with pytest.raises(RecordError, match=f"case_id={raws[1]['case_id']!r}: field '{fieldname}' {why}"):
        load_records(write(tmp_path / "m.json", raws))


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
    """One bad record (the last) fails the whole load: the call raises and nothing is cached."""
    raws = dicts()
    del raws[-1]["requested_rewrite"]["target_new"]
    path = write(tmp_path / "h.json", raws)
    with pytest.raises(RecordError):
        load_counterfact(path)
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


# --------------------------------------------------------------------------- the reference's fact list

def fact_list_file(path: Path, samples: dict) -> Path:
    path.write_text(json.dumps({str(k): v for k, v in samples.items()}, indent=4))
    return path


def test_sample_from_the_reference_fact_list(dup_records: list[Record], tmp_path: Path) -> None:
    """data.fact_list reference: sample "i" of the index file in its order, by case_id, subjects
    repeating as they do (the reference edits them so); samples, lengths and case_ids checked."""
    by_id = {r.case_id: r for r in dup_records}
    ids = [r.case_id for r in dup_records]
    s0, s1 = ids[::-1], ids[5:] + ids[:5]
    fl = cf.load_fact_list(fact_list_file(tmp_path / "fl.json", {0: s0, 1: s1}))
    assert fl == {0: s0, 1: s1}
    got = sample(dup_records, 12, 0, fact_list=fl)
    assert [r.case_id for r in got] == s0[:12] and all(r is by_id[r.case_id] for r in got)
    assert len({r.subject.strip().lower() for r in sample(dup_records, 30, 0, fact_list=fl)}) == 26  # repeats kept
    assert [r.case_id for r in sample(dup_records, 3, 1, fact_list=fl)] == s1[:3]
    assert [r.case_id for r in sample(dup_records, 3, 0)] != s0[:3]  # not the seeded ordering
    with pytest.raises(RecordError, match=r"ordering 2: the reference fact list has samples \[0, 1\] only"):
        sample(dup_records, 3, 2, fact_list=fl)
    with pytest.raises(RecordError, match="asked for 31 facts but sample 0 of the reference fact list has 30"):
        sample(dup_records, 31, 0, fact_list=fl)
    fl2 = cf.load_fact_list(fact_list_file(tmp_path / "fl2.json", {0: [ids[0], 99_999, 99_998]}))
    with pytest.raises(RecordError, match=r"2 of the first 3 facts .*case_ids \[99999, 99998\]"):
        sample(dup_records, 3, 0, fact_list=fl2)
    assert [r.case_id for r in sample(dup_records, 1, 0, fact_list=fl2)] == [ids[0]]  # only what is drawn


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", "must be a JSON object of samples"), ("{}", "must be a JSON object"),
    ('{"a": [1]}', "sample name 'a' is not a number"), ('{"0": []}', "non-empty list"),
    ('{"0": [1, -2]}', "non-negative"), ('{"0": [1, true]}', "non-negative integers"),
    ('{"0": [1, 1]}', "repeats a case_id"), ("{", "not valid JSON")])
def test_bad_fact_lists_fail_naming_the_file(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(RecordError, match=match) as ei:
        cf.load_fact_list(p)
    assert str(p) in str(ei.value)


def test_resolve_fact_list(monkeypatch: pytest.MonkeyPatch, isolated_env: Path, tmp_path: Path, no_network) -> None:
    given = fact_list_file(tmp_path / "given.json", {0: [1]})
    assert cf.resolve_fact_list(given) == given
    with pytest.raises(DatasetNotFound, match="data.fact_list_path: the reference fact list .* is not a file"):
        cf.resolve_fact_list(tmp_path / "nope.json")
    monkeypatch.setenv(cf.FACT_LIST_ENV, str(given))
    assert cf.resolve_fact_list() == given
    monkeypatch.setenv(cf.FACT_LIST_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(DatasetNotFound, match=cf.FACT_LIST_ENV):
        cf.resolve_fact_list()
    monkeypatch.delenv(cf.FACT_LIST_ENV)
    with pytest.raises(DatasetNotFound) as ei:  # offline, nothing cached: where to put it
        cf.resolve_fact_list()
    msg = str(ei.value)
    assert cf.FACT_LIST_URL in msg and cf.FACT_LIST_SHA256 in msg and str(isolated_env / cf.FACT_LIST_NAME) in msg
    isolated_env.mkdir(parents=True, exist_ok=True)
    fact_list_file(isolated_env / cf.FACT_LIST_NAME, {0: [2]})
    assert cf.resolve_fact_list() == isolated_env / cf.FACT_LIST_NAME


def test_fact_list_download_checks_its_sha256(monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    data = json.dumps({"0": [3, 1, 2]}).encode()
    calls = serve(monkeypatch, data)
    with pytest.raises(RecordError, match=cf.FACT_LIST_SHA256):
        cf.resolve_fact_list()
    assert calls == [cf.FACT_LIST_URL] and not any(isolated_env.iterdir())
    monkeypatch.setattr(cf, "FACT_LIST_SHA256", hashlib.sha256(data).hexdigest())
    old = os.umask(0o022)
    try:
        path = cf.resolve_fact_list()
    finally:
        os.umask(old)
    assert path == isolated_env / cf.FACT_LIST_NAME and cf.load_fact_list(path) == {0: [3, 1, 2]}
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others as the umask allows (a shared cache)
    assert cf.resolve_fact_list() == path and len(calls) == 2  # then from the cache


# --------------------------------------------------------------------------- the shared subset

def test_shared_counterfact_subset(monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    monkeypatch.setenv(ENV_VAR, str(counterfact_subset()))
    recs = load_counterfact()
    assert len(recs) == 10_459
    assert len({r.case_id for r in recs}) == 10_459
    assert len(unique_subject_case_ids(recs)) == 10_205
    assert all(len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10 for r in recs)
    assert len(sample(recs, 10_205)) == 10_205
    with pytest.raises(ValueError, match="10206.*10205"):
        sample(recs, 10_206)
