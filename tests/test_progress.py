"""editlib.progress: widget / text / plain-line progress depending on where it runs."""
import pytest

from editlib import progress as pg


def test_lines_mode_prints_plain_lines(monkeypatch, capsys):
    monkeypatch.setenv(pg.ENV, "lines")
    assert pg.mode() == "lines"
    with pg.progress(total=3, desc="layer_search", unit="unit", mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.strip().splitlines()
    assert lines[0].startswith("layer_search:") and "0/3" in lines[0]
    assert "3/3" in lines[-1] and len(lines) == 4  # start, each update (no minimum interval)


def test_lines_mode_respects_the_interval(monkeypatch, capsys):
    monkeypatch.setenv(pg.ENV, "lines")
    for _ in pg.progress(range(50), desc="C0", mininterval=3600):
        pass
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "0/50" in lines[0] and "50/50" in lines[1]  # first and final state only


def test_off_and_bad_mode(monkeypatch, capsys):
    monkeypatch.setenv(pg.ENV, "off")
    assert list(pg.progress(range(3), desc="x")) == [0, 1, 2]
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(pg.ENV, "sometimes")
    with pytest.raises(ValueError, match="EDITLIB_PROGRESS='sometimes'"):
        pg.mode()


def test_reproduce_kernels_get_plain_lines(monkeypatch):
    import os

    from editlib.numerics import choose
    from editlib.reproduce import kernel_env

    monkeypatch.delenv(pg.ENV, raising=False)
    monkeypatch.delenv("MKL_CBWR", raising=False)
    with kernel_env(choose("native", threads=2)):
        assert os.environ[pg.ENV] == "lines" and os.environ["OMP_NUM_THREADS"] == "2"
    assert pg.ENV not in os.environ
    pins = choose("portable").env
    with kernel_env(choose("portable")):  # the numerics' variables reach the kernels, and leave with the block
        assert all(os.environ[k] == v for k, v in pins.items())
    assert "MKL_CBWR" not in os.environ
    monkeypatch.setenv(pg.ENV, "off")  # a user's choice wins
    with kernel_env(None):
        assert os.environ[pg.ENV] == "off"


def test_previous_seconds(tmp_path):
    import json

    from editlib.reproduce import previous_seconds

    f = tmp_path / "timings.json"
    assert previous_seconds(f) == {}
    f.write_text(json.dumps({"notebooks": [{"notebook": "01_a.ipynb", "seconds": 5.5, "status": "ok"},
                                           {"notebook": "02_b.ipynb", "seconds": 9, "status": "failed"}]}))
    assert previous_seconds(f) == {"01_a.ipynb": 5.5}


def test_timings_keep_the_notebooks_a_run_did_not_run(tmp_path):
    """reproduce --only 02 (or a run that stopped) rewrites its own notebooks' times and keeps the
    others' last ones, so the next run still has an estimate for every notebook."""
    import json
    from pathlib import Path

    from editlib.params import resolve
    from editlib.reproduce import NotebookRun, _write_timings, previous_seconds

    f, p = tmp_path / "timings.json", resolve("params/tiny.yaml")
    first = [NotebookRun("01_a.ipynb", Path("o1"), None, 10.0), NotebookRun("02_b.ipynb", Path("o2"), None, 20.0)]
    _write_timings(f, p, Path("params/tiny.yaml"), {}, first, None, "native")
    _write_timings(f, p, Path("params/tiny.yaml"), {}, [NotebookRun("02_b.ipynb", Path("o2"), None, 7.0)], None, "native")
    assert previous_seconds(f) == {"01_a.ipynb": 10.0, "02_b.ipynb": 7.0}
    assert json.loads(f.read_text())["total_seconds"] == 7.0
