"""python -m editlib show / compare and --version: stored results as summary tables, no model."""
import numpy as np
import pandas as pd
import pytest

from editlib import __version__
from editlib.__main__ import main
from editlib.summary import SummaryError, compare, show


def _cases(rng, rows: list[dict], n: int = 6) -> pd.DataFrame:
    out = []
    for r in rows:
        for i in range(n):
            out.append({**r, "case_id": i, "ES": rng.random() > 0.2, "PS": rng.random(), "NS": rng.random(),
                        "ES_mag": 0.1, "PS_mag": 0.1, "NS_mag": 0.1, "failed": False})
    return pd.DataFrame(out)


@pytest.fixture()
def runs(tmp_path):
    rng = np.random.default_rng(0)
    for name, bsz in (("a", [4, 16]), ("b", [4, 64])):
        for exp, rows in (("layer_search", [dict(method=m, layer=l) for m in ("rome", "memit") for l in (0, 1)]),
                          ("batch", [dict(method="memit", batch_size=b) for b in bsz])):
            d = tmp_path / name / exp
            d.mkdir(parents=True)
            _cases(np.random.default_rng(0 if exp == "layer_search" else len(name)), rows).to_parquet(d / "cases.parquet")
    (tmp_path / "a" / "sweep").mkdir()  # unfinished: no cases.parquet
    return tmp_path


def test_show_prints_each_experiment_by_its_configuration(runs, capsys):
    text = show(runs / "a")
    assert text.index("== layer_search") < text.index("== batch") and "sweep" not in text
    block = text.split("== batch")[1]
    assert "batch_size" in block and " 16 " in block and "layer " not in block
    assert main(["show", str(runs / "a")]) == 0
    assert "== layer_search" in capsys.readouterr().out


def test_show_adds_s_over_orderings_with_several(tmp_path):
    from editlib.beyond import ordering_summary

    rows = [dict(method="memit", batch_size=b, ordering=o) for b in (4, 16) for o in (0, 1, 2)]
    cases = _cases(np.random.default_rng(3), rows)
    (tmp_path / "r" / "batch").mkdir(parents=True)
    cases.to_parquet(tmp_path / "r" / "batch" / "cases.parquet")
    o = ordering_summary(cases, ["method", "batch_size"])
    text = show(tmp_path / "r")
    assert "S over orderings" in text
    for a, b in zip(o["S"], o["S_sd"]):
        assert f"{a:.2f} ± {b:.2f}" in text
    cases[cases.ordering == 0].to_parquet(tmp_path / "r" / "batch" / "cases.parquet")
    assert "S over orderings" not in show(tmp_path / "r")


def test_compare_puts_two_runs_side_by_side(runs):
    text = compare(runs / "a", runs / "b")
    batch = text.split("== batch")[1]
    assert "S a" in batch and "S b" in batch and "ΔS" in batch
    lines = [l.split() for l in batch.strip().splitlines()[2:]]
    assert sorted(int(l[1]) for l in lines) == [4, 16, 64]  # the union of configurations
    assert {len(l) for l in lines} == {8, 15}  # a configuration only one run has: its other columns blank
    assert all(v.isdigit() for l in lines for v in (l[2], l[3], l[8] if len(l) == 15 else l[2], l[9] if len(l) == 15 else l[3]))  # n, failed: integers
    assert batch.strip().splitlines()[1].split()[:8] == ["method", "batch_size", "n", "a", "failed", "a", "ES", "a"]
    ls = text.split("== layer_search")[1].split("== batch")[0]
    assert all(l.split()[-1] == "0.00" for l in ls.strip().splitlines()[2:])  # the same cases: ΔS = 0


def test_compare_names_runs_of_the_same_name_by_path_and_lists_unshared_experiments(runs, tmp_path):
    """Two runs both called "r" (in different results folders) are told apart by their paths, and an
    experiment only one run finished is named, never silently dropped."""
    import shutil

    for side, run in (("x", "a"), ("y", "b")):
        shutil.copytree(runs / run, tmp_path / side / "r")
    shutil.copytree(runs / "b" / "batch", tmp_path / "y" / "r" / "sequential")
    text = compare(tmp_path / "x" / "r", tmp_path / "y" / "r")
    assert f"a = {tmp_path / 'x' / 'r'}, b = {tmp_path / 'y' / 'r'}" in text
    assert text.strip().splitlines()[-1] == "only in one run: sequential"
    assert "== sequential" not in text
    assert "only in one run" not in compare(runs / "a", runs / "b")


def test_errors_are_one_line(runs, tmp_path, capsys):
    with pytest.raises(SummaryError, match="no such run folder"):
        show(tmp_path / "nope")
    (tmp_path / "empty" / "sweep").mkdir(parents=True)
    with pytest.raises(SummaryError, match="no finished experiment.*found sweep"):
        show(tmp_path / "empty")
    assert main(["show", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"editlib {__version__}"


@pytest.mark.parametrize("cmd", ["tiny-train", "tiny-check", "evaluate", "run", "reproduce", "show", "compare", "clean"])
def test_every_subcommand_help_has_an_example_and_documents_every_option(cmd, capsys):
    import argparse

    from editlib.__main__ import build_parser

    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert f"example:\n  python -m editlib {cmd}" in out and "``" not in out
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    undocumented = [a.dest for a in sub._actions if not (a.help or "").strip()]
    assert not undocumented, undocumented
