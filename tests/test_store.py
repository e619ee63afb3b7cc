"""editlib.store: safe to repeat and to share — one process per experiment folder (flock), units
stamped with the code version that wrote them, ``clean`` for crashed runs, the user's umask, and
nothing left half-written when a write fails."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from editlib import store
from editlib.store import (Experiment, ExperimentLocked, MixedVersions, RunConflict, StoreError, clean_run,
                           lock_folder, release_folder)

PARAMS = {"experiment": "batch", "spec": {"total": 4}}

#: a second process: ``hold`` opens the experiment, saves a unit, says "ready", waits for the
#: "go" file, saves another unit and finishes; ``wait`` opens with wait=True and reports
WORKER = r"""
import json, sys, time
from pathlib import Path
import pandas as pd
from editlib.store import Experiment
results, mode, ready, go = sys.argv[1:5]
params = {"experiment": "batch", "spec": {"total": 4}}
exp = Experiment.open(results, "run", "batch", params, wait=(mode == "wait"))
if mode == "hold":
    exp.save_unit("u0", pd.DataFrame({"case_id": [0, 1], "writer": "hold"}))
    Path(ready).write_text("ready")
    while not Path(go).exists():
        time.sleep(0.05)
    exp.save_unit("u1", pd.DataFrame({"case_id": [2, 3], "writer": "hold"}))
    exp.finish()
else:
    print(json.dumps({"complete": exp.complete}), flush=True)
    if not exp.complete:
        exp.save_unit("u9", pd.DataFrame({"case_id": [9], "writer": "wait"}))
        exp.finish()
"""


def start(tmp_path: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "results"), mode,
                             str(tmp_path / "ready"), str(tmp_path / "go")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pred, what: str, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture()
def holder(tmp_path: Path):
    """A second process holding results/run/batch until the test creates the "go" file."""
    proc = start(tmp_path, "hold")
    try:
        wait_for(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, "the holder")
        assert proc.poll() is None, proc.communicate()
        yield proc
    finally:
        (tmp_path / "go").write_text("go")
        proc.wait(timeout=60)


def exp_root(tmp_path: Path) -> Path:
    return tmp_path / "results" / "run" / "batch"


# --------------------------------------------------------------------------- two processes, one folder


def test_second_process_fails_cleanly_and_nothing_is_corrupted(tmp_path, holder) -> None:
    with pytest.raises(ExperimentLocked) as ei:
        Experiment.open(tmp_path / "results", "run", "batch", PARAMS)
    msg = str(ei.value)
    assert str(exp_root(tmp_path)) in msg and f"pid {holder.pid}" in msg and "--wait" in msg
    with pytest.raises(ExperimentLocked):  # clean never removes a folder in use
        clean_run(tmp_path / "results", "run")
    (tmp_path / "go").write_text("go")
    assert holder.wait(timeout=60) == 0, holder.communicate()
    exp = Experiment.open(tmp_path / "results", "run", "batch", PARAMS)
    assert exp.complete
    cases = exp.cases()
    assert cases["case_id"].tolist() == [0, 1, 2, 3] and set(cases["writer"]) == {"hold"}
    assert not list(exp_root(tmp_path).rglob("*.tmp"))


def test_second_process_waits_when_asked(tmp_path, holder) -> None:
    waiter = start(tmp_path, "wait")
    try:
        wait_for(lambda: waiter.poll() is not None or _has_waited(waiter), "the waiter to block")
        assert waiter.poll() is None, waiter.communicate()
    finally:
        (tmp_path / "go").write_text("go")
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert "waiting for it" in _WAIT_LOG.get(waiter.pid, "") + err
    assert json.loads(out.strip().splitlines()[-1]) == {"complete": True}  # it waited, then found the work done
    assert holder.wait(timeout=60) == 0


_WAIT_LOG: dict[int, str] = {}


def _has_waited(proc: subprocess.Popen) -> bool:
    """True once the waiter has said on stderr that it waits (read without blocking)."""
    import select

    if select.select([proc.stderr], [], [], 0)[0]:
        _WAIT_LOG[proc.pid] = _WAIT_LOG.get(proc.pid, "") + proc.stderr.readline()
    return "waiting" in _WAIT_LOG.get(proc.pid, "")


def test_killed_holder_leaves_no_lock(tmp_path) -> None:
    proc = start(tmp_path, "hold")
    wait_for(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, "the holder")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    exp = Experiment.open(tmp_path / "results", "run", "batch", PARAMS)  # the kernel dropped the flock
    assert exp.has_unit("u0") and not exp.has_unit("u1")
    exp.close()


def test_waiter_survives_the_folder_being_cleaned(tmp_path) -> None:
    """A process waiting for a folder that `clean` removes locks the new folder, not the old file."""
    root = exp_root(tmp_path)
    lock_folder(root)  # this process plays `clean`: it holds the lock ...
    waiter = start(tmp_path, "wait")
    try:
        wait_for(lambda: waiter.poll() is not None or _has_waited(waiter), "the waiter to block")
    finally:
        import shutil
        shutil.rmtree(root)  # ... removes the folder ...
        release_folder(root)  # ... and lets go
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"complete": False}
    # it locked (and wrote its pid into) the new folder's lock file, not the removed one
    assert (root / store.LOCK_NAME).read_text().startswith(f"pid {waiter.pid} ")
    exp = Experiment.open(tmp_path / "results", "run", "batch", PARAMS)
    assert exp.complete and exp.cases()["writer"].tolist() == ["wait"]


def test_same_process_reopens_and_finish_releases(tmp_path) -> None:
    a = Experiment.open(tmp_path, "run", "batch", PARAMS)
    b = Experiment.open(tmp_path, "run", "batch", PARAMS)  # e.g. a notebook cell run again
    b.save_unit("u0", pd.DataFrame({"case_id": [1]}))
    a.finish()
    assert str((tmp_path / "run" / "batch").resolve()) not in store._HELD
    lock_text = (tmp_path / "run" / "batch" / store.LOCK_NAME).read_text()
    assert lock_text.startswith(f"pid {os.getpid()} ")


# --------------------------------------------------------------------------- versions


def test_units_of_another_version_refused_unless_allowed(tmp_path, monkeypatch) -> None:
    exp = Experiment.open(tmp_path, "run", "batch", PARAMS)
    exp.save_unit("B00004-b00000", pd.DataFrame({"case_id": [1]}))
    exp.close()
    side = json.loads((tmp_path / "run" / "batch" / "parts" / "B00004-b00000.unit.json").read_text())
    assert side["editlib_version"] == store.code_version()["editlib_version"]
    assert side["git_commit"] == store.code_version()["git_commit"]
    Experiment.open(tmp_path, "run", "batch", PARAMS).close()  # same code: fine

    monkeypatch.setattr(store, "_git_commit", lambda: "f" * 40)  # "a later commit"
    with pytest.raises(MixedVersions) as ei:
        Experiment.open(tmp_path, "run", "batch", PARAMS)
    msg = str(ei.value)
    assert "B00004-b00000" in msg and "commit ffffffffffff" in msg and "--allow-mixed-versions" in msg
    assert "python -m editlib clean run" in msg
    assert str((tmp_path / "run" / "batch").resolve()) not in store._HELD  # refused: lock let go
    Experiment.open(tmp_path, "run", "batch", PARAMS, allow_mixed_versions=True).close()
    monkeypatch.setenv(store.ENV_ALLOW_MIXED, "1")
    exp = Experiment.open(tmp_path, "run", "batch", PARAMS)
    exp.save_unit("B00004-b00001", pd.DataFrame({"case_id": [2]}))
    exp.finish()
    assert sorted(exp.manifest["unit_versions"].values()) == [1, 1]  # the manifest says it is mixed
    monkeypatch.delenv(store.ENV_ALLOW_MIXED)
    assert Experiment.open(tmp_path, "run", "batch", PARAMS).complete  # reading complete results: fine


def test_units_without_a_recorded_version_count_as_foreign(tmp_path) -> None:
    exp = Experiment.open(tmp_path, "run", "batch", PARAMS)
    exp.save_unit("u0", pd.DataFrame({"case_id": [1]}))
    exp.close()
    (tmp_path / "run" / "batch" / "parts" / "u0.unit.json").unlink()  # written by older code
    with pytest.raises(MixedVersions, match="u0: version unknown, commit unknown"):
        Experiment.open(tmp_path, "run", "batch", PARAMS)


# --------------------------------------------------------------------------- conflicts and clean


def test_run_conflict_names_the_way_out_and_clean_takes_it(tmp_path, capsys) -> None:
    crashed = Experiment.open(tmp_path, "run", "batch", {**PARAMS, "spec": {"total": 0}})
    crashed.close()  # a run that crashed (say n_facts=0) before its first unit
    with pytest.raises(RunConflict) as ei:
        Experiment.open(tmp_path, "run", "batch", PARAMS)
    msg = str(ei.value)
    assert "incomplete" in msg and "spec.total" in msg
    cmd = msg.split("`")[1]
    assert cmd == f"python -m editlib clean run --results-dir {tmp_path} --experiment batch"
    from editlib.__main__ import main
    assert main(cmd.split()[3:]) == 0
    Experiment.open(tmp_path, "run", "batch", PARAMS).close()  # the corrected re-run starts


def test_free_keys_may_differ_from_the_stored_ones(tmp_path) -> None:
    """A key the caller declares free (how results were computed, e.g. C0 accumulators per pass) may
    hold another value in a folder's manifest, written before the key was left out of the digest;
    any other change is still a conflict, naming it."""
    old = {**PARAMS, "covariance": {"layers_per_pass": 15, "n": 1}}
    new = {**PARAMS, "covariance": {"layers_per_pass": None, "n": 1}}
    free = ("covariance.layers_per_pass",)
    Experiment.open(tmp_path, "run", "batch", old).finish()
    with pytest.raises(RunConflict, match=r"changed: covariance\.layers_per_pass\)"):
        Experiment.open(tmp_path, "run", "batch", new)
    assert Experiment.open(tmp_path, "run", "batch", new, free_keys=free).complete
    worse = {**PARAMS, "covariance": {"layers_per_pass": None, "n": 2}}
    with pytest.raises(RunConflict, match=r"changed: covariance\.layers_per_pass, covariance\.n\)"):
        Experiment.open(tmp_path, "run", "batch", worse, free_keys=free)


def test_units_record_the_settings_they_ran_with_and_a_resume_says_when_they_changed(tmp_path) -> None:
    """Settings outside the digest that move numbers at rounding (GE's decode batch and form) go
    into every unit saved; the manifest counts the units per setting, and a session with other
    settings lists the stored ones (its caller logs them). Units of the old code record none."""
    import types

    from editlib import protocols

    a = {"evaluation.gen_batch_size": 64, "evaluation.gen_decode": "transformers", "evaluation.max_failed_fraction": 0.25}
    b = {**a, "evaluation.gen_batch_size": 1024}
    first = Experiment.open(tmp_path, "run", "batch", PARAMS, settings=a)
    first.save_unit("u0", pd.DataFrame({"case_id": [0]}))
    first.save_unit("u1", pd.DataFrame({"case_id": [1]}))
    first.close()
    again = Experiment.open(tmp_path, "run", "batch", PARAMS, settings=a)
    assert again.stored_settings() == []  # the same settings: nothing to say
    again.close()
    later = Experiment.open(tmp_path, "run", "batch", PARAMS, settings=b)
    assert later.stored_settings() == [a]
    said: list[str] = []
    study = types.SimpleNamespace(params=types.SimpleNamespace(name="run", results_dir=str(tmp_path)))
    protocols._check_resume(study, later, said.append)
    assert said == ["batch: saved units ran with evaluation.gen_batch_size = 64; this session with "
                    "evaluation.gen_batch_size = 1024 (GE texts of the new units move at float rounding; "
                    "each unit's unit.json records its settings)"]
    said.clear()
    limit = Experiment.open(tmp_path, "run", "batch", PARAMS, settings={**a, "evaluation.max_failed_fraction": 0.5})
    protocols._check_resume(study, limit, said.append)
    assert len(said) == 1 and "the saved units passed another failed-edit limit" in said[0]
    limit.close()
    said.clear()  # units of code that recorded no setting are not compared on it
    more = Experiment.open(tmp_path, "run", "batch", PARAMS, settings={**a, "evaluation.gen_kv_gb": 32})
    protocols._check_resume(study, more, said.append)
    assert said == []
    more.close()
    later.save_unit("u2", pd.DataFrame({"case_id": [2]}))
    later.finish()
    man = json.loads((tmp_path / "run" / "batch" / "manifest.json").read_text())
    assert man["unit_settings"] == {json.dumps(a, sort_keys=True): 2, json.dumps(b, sort_keys=True): 1}
    unit = json.loads((tmp_path / "run" / "batch" / "parts" / "u2.unit.json").read_text())
    assert unit["settings"] == b


def test_a_resume_with_other_context_templates_is_refused(tmp_path) -> None:
    """The context templates are sampled from the model; another GPU type can sample others, which
    change every key and value: a session whose templates (digests per style, in each unit's
    settings) differ from those the saved units used refuses to add units to them, naming the way
    out. A style one session sampled and the other did not is not compared."""
    import types

    from editlib import protocols

    study = types.SimpleNamespace(params=types.SimpleNamespace(name="run", results_dir=str(tmp_path)))
    first = Experiment.open(tmp_path, "run", "batch", PARAMS, settings={"context_templates": {"memit": "aaa"}})
    first.save_unit("u0", pd.DataFrame({"case_id": [0]}))
    first.close()
    same = Experiment.open(tmp_path, "run", "batch", PARAMS, settings={"context_templates": {"memit": "aaa", "rome": "c"}})
    protocols._check_resume(study, same, print)  # the same memit templates, and one more style: resumes
    same.close()
    other = Experiment.open(tmp_path, "run", "batch", PARAMS, settings={"context_templates": {"memit": "bbb"}})
    with pytest.raises(RunConflict, match=r"other context templates \(memit\).*editlib clean run"):
        protocols._check_resume(study, other, print)
    other.close()


def test_clean_keeps_complete_unless_asked(tmp_path) -> None:
    done = Experiment.open(tmp_path, "run", "singular", PARAMS)
    done.finish()
    Experiment.open(tmp_path, "run", "batch", PARAMS).close()
    (tmp_path / "run" / "odd").mkdir()  # no manifest at all: incomplete
    got = {c.folder.name: (c.removed, c.why) for c in clean_run(tmp_path, "run")}
    assert got["batch"] == (True, "incomplete") and got["odd"] == (True, "incomplete")
    assert got["singular"][0] is False and (tmp_path / "run" / "singular" / "cases.parquet").is_file()
    with pytest.raises(RunConflict, match="--include-complete"):
        Experiment.open(tmp_path, "run", "singular", {"other": 1})
    assert [c.removed for c in clean_run(tmp_path, "run", ["singular"], include_complete=True)] == [True]
    with pytest.raises(StoreError, match="no experiment"):
        clean_run(tmp_path, "run", ["sweep"])


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_honour_the_umask(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        exp = Experiment.open(tmp_path, "run", "batch", PARAMS)
        exp.save_unit("u0", pd.DataFrame({"case_id": [1]}), pd.DataFrame({"seconds": [1.0]}))
        exp.finish()
        store.atomic_write_bytes(tmp_path / "x.bin", b"x")
    finally:
        os.umask(old)
    root = tmp_path / "run" / "batch"
    files = [root / "manifest.json", root / "cases.parquet", root / "batches.parquet",
             root / "parts" / "u0.cases.parquet", root / "parts" / "u0.unit.json", tmp_path / "x.bin"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_failed_write_leaves_no_unit_and_no_temp_file(tmp_path, monkeypatch) -> None:
    exp = Experiment.open(tmp_path, "run", "batch", PARAMS)

    def disk_full(self, path, *a, **k):
        Path(path).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    with pytest.raises(OSError, match="No space"):
        exp.save_unit("u0", pd.DataFrame({"case_id": [1]}))
    monkeypatch.undo()
    assert not exp.has_unit("u0")
    assert not [p for p in (tmp_path / "run" / "batch").rglob("*") if p.name.endswith(".tmp")]
    exp.save_unit("u0", pd.DataFrame({"case_id": [1]}))  # the retry works
    exp.finish()
    assert exp.cases()["case_id"].tolist() == [1]


def test_temp_names_are_unique(tmp_path, monkeypatch) -> None:
    """Two writers of the same file never share a temporary name (mkstemp in every writer)."""
    seen: list[str] = []
    real = store.tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real(*a, **k)
        seen.append(name)
        return fd, name

    monkeypatch.setattr(store.tempfile, "mkstemp", spy)
    for _ in range(3):
        store.atomic_write_json(tmp_path / "m.json", {"a": 1})
        store.atomic_write_parquet(tmp_path / "c.parquet", pd.DataFrame({"a": [1]}))
    assert len(seen) == 6 and len(set(seen)) == 6


def test_manifest_names_the_machine(tmp_path) -> None:
    """Float rounding depends on the CPU's code path: the manifest says which one computed the run."""
    import torch

    exp = Experiment.open(tmp_path, "run", "batch", PARAMS)
    exp.save_unit("u", pd.DataFrame({"case_id": [1]}))
    exp.finish()
    m = json.loads((tmp_path / "run" / "batch" / "manifest.json").read_text())["machine"]
    assert m["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["cpus"] == os.cpu_count()
    if Path("/proc/cpuinfo").is_file():
        assert m["processor"]  # the CPU model, where platform.processor() says nothing


def test_a_key_only_one_side_has_is_named_as_changed() -> None:
    """A key dropped from (or added to) the params is a change even when its value was null: the
    RunConflict message names it instead of "?"."""
    from editlib.store import _changed

    assert _changed({"c": {"a": 1, "b": None}}, {"c": {"a": 1}}) == ["c.b"]
    assert _changed({"c": {"a": 1}}, {"c": {"a": 1, "b": None}}) == ["c.b"]
    assert _changed({"c": {"a": 1, "b": None}}, {"c": {"a": 1, "b": None}}) == []
    assert _changed({"c": {"a": 1}}, {"c": {"a": 2}}) == ["c.a"]
