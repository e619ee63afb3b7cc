"""editlib.plotting on small synthetic result frames (seeded, no model)."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from editlib import plotting
from editlib.params import resolve

METRIC_COLS = ("ES", "PS", "NS", "ES_mag", "PS_mag", "NS_mag", "ES_acc", "PS_acc", "NS_acc")


def _cases(rng: np.random.Generator, n: int, ge: bool = False, **cols) -> pd.DataFrame:
    df = pd.DataFrame({"case_id": np.arange(n), **{k: [v] * n for k, v in cols.items()}})
    for m in METRIC_COLS:
        df[m] = rng.uniform(0, 1, n) if not m.endswith("_mag") else rng.uniform(-1, 1, n)
    df[["ES", "PS", "NS"]] = (df[["ES", "PS", "NS"]] > 0.3).astype(float)
    if ge:
        df["GE"] = rng.uniform(5, 6.5, n)
    return df


def _frame(rng, rows: list[dict], n: int = 12, ge: bool = False) -> pd.DataFrame:
    return pd.concat([_cases(rng, n, ge, **r) for r in rows], ignore_index=True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _n_lines(fig: Figure) -> list[int]:
    return [len(ax.lines) for ax in fig.axes]


def test_layer_search_panels_and_lines(rng):
    rows = [dict(method=m, layer=l, batch_size=1, batch_index=0, eval="current", ordering=0)
            for m in ("rome", "memit") for l in range(4)]
    fig = plotting.plot_layer_search(_frame(rng, rows), "Figure 1")
    assert isinstance(fig, Figure)
    assert _n_lines(fig) == [2, 2, 2, 2]
    assert "95% CI" in fig.axes[0].get_ylabel()
    assert fig.get_suptitle() == "Figure 1, 12 facts per layer"
    uneven = _frame(rng, rows)
    uneven = uneven[~((uneven["layer"] == 2) & (uneven["case_id"] >= 9))]  # 9 facts at layer 2
    three = pd.concat([uneven.assign(ordering=o) for o in range(3)], ignore_index=True)
    assert plotting.facts_per_layer(three) == "9–12 facts per layer and ordering"
    fig_ge = plotting.plot_layer_search(_frame(rng, rows, ge=True), "Figure 1 with GE")
    assert _n_lines(fig_ge) == [2] * 5


def test_batch_and_sweep(rng):
    rows = [dict(method=m, layer=1, batch_size=b, batch_index=0, eval="current", ordering=0)
            for m in ("memit", "emmet") for b in (4, 16, 64)]
    fig = plotting.plot_batch(_frame(rng, rows), "emmet", "Figure 3")
    assert _n_lines(fig) == [1, 1, 1, 1]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["4", "16", "64"]
    assert fig.axes[0].get_xscale() == "log"

    rows = [dict(method="emmet", layer=1, lam=l, batch_size=8, batch_index=0, eval="current", ordering=0)
            for l in (0.0, 1e-4, 1e-2)]
    fig = plotting.plot_sweep(_frame(rng, rows), "emmet", "Table 4")
    assert _n_lines(fig) == [1] * 4
    assert fig.axes[0].get_xscale() == "symlog"
    rows = [dict(method="memit", layer=1, lam=l, batch_size=8, batch_index=0, eval="current", ordering=0)
            for l in (1.0, 100.0, 1e4)]
    assert plotting.plot_sweep(_frame(rng, rows), "memit", "Table 3").axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="rome"):
        plotting.plot_batch(_frame(rng, rows), "rome", "x")


def test_sequential_current_and_final(rng):
    rows = [dict(method="memit", layer=1, batch_size=b, batch_index=i, eval="current", ordering=0)
            for b in (2, 8) for i in range(8 // b)]
    cur = _frame(rng, rows, n=4)
    fig = plotting.plot_sequential(cur, "memit", "Figure 4")
    assert _n_lines(fig) == [1] * 4
    # the rightmost point is the single batch of every fact the sequential runs are compared with
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2", "8\n(one batch)"]
    part = cur[~((cur.batch_size == 2) & (cur.batch_index == 3))]
    assert [t.get_text() for t in plotting.plot_sequential(part[part.batch_size == 2], "memit", "t")
            .axes[0].get_xticklabels()] == ["2"]  # several batches at the largest size: no label
    fin = _frame(rng, [dict(method="memit", layer=1, batch_size=b, batch_index=8 // b - 1, eval="final",
                            ordering=0) for b in (2, 8)], n=8)
    both = pd.concat([cur, fin], ignore_index=True)
    assert _n_lines(plotting.plot_sequential(both, "memit", "Figure 4")) == [2] * 4
    ret = plotting.retention_table(both)
    assert set(ret["Evaluated"]) == {"after its batch", "final model"} and len(ret) == 4


def test_sequential_diagnostics(rng):
    rows = [dict(method="memit", layer=1, batch_size=b, batch_index=i, ordering=0, n=b,
                 w_rel_dist=1e-3 * (i + 1), cond_D=10.0 ** (i + 1))
            for b in (1, 4, 16) for i in range(16 // b)]
    fig = plotting.plot_sequential_diagnostics(pd.DataFrame(rows), "memit", "diagnostics")
    assert _n_lines(fig) == [3, 2]  # cond(D) of a one-fact batch is 1: no B = 1 line there
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    # facts edited on the x axis by default: every batch size ends at the same 16 facts
    assert fig.axes[0].get_xscale() == "log" and {ln.get_xdata()[-1] for ln in fig.axes[0].lines} == {16}
    assert "orderings" not in fig.get_suptitle()
    two = pd.DataFrame(rows + [{**r, "ordering": 1, "w_rel_dist": 2 * r["w_rel_dist"]} for r in rows])
    fig = plotting.plot_sequential_diagnostics(two, "memit", "d")
    assert "mean over 2 orderings" in fig.get_suptitle() and len(fig.axes[0].collections) == 3  # bands
    fig = plotting.plot_sequential_diagnostics(pd.DataFrame(rows), "memit", "d", x="batch_index")
    assert fig.axes[0].get_xscale() == "linear" and max(fig.axes[0].lines[0].get_xdata()) == 15


def test_bands_count_only_the_cases_that_produced_scores(rng):
    """One ordering: a metric's 95% CI is over the cases its mean was taken over. Failed edits are
    left out of the mean, so they are left out of n too (with 18 of 20 failed, the band is that of 2
    cases, not of 20); a group with one scored case has no band (NaN), never a zero-width one."""
    rows = [dict(method="memit", batch_size=b, batch_index=0, eval="current", ordering=0) for b in (4, 16, 64)]
    c = _frame(rng, rows, n=20)
    c["failed"] = False
    c.loc[(c["batch_size"] == 16) & (c["case_id"] >= 2), "failed"] = True   # 2 of 20 scored
    c.loc[(c["batch_size"] == 64) & (c["case_id"] >= 1), "failed"] = True   # 1 of 20 scored
    s = plotting._stats(c, ["method", "batch_size"]).set_index("batch_size")
    for b, n in ((4, 20), (16, 2)):
        v = c[(c["batch_size"] == b) & ~c["failed"]]["ES"].to_numpy() * 100
        assert s.loc[b, "ES_ci"] == pytest.approx(1.96 * v.std(ddof=1) / np.sqrt(n))
    assert np.isnan(s.loc[64, "ES_ci"]) and np.isfinite(s.loc[64, "ES_mean"])


def test_save_figure_and_table(rng, tmp_path):
    rows = [dict(method=m, layer=1, batch_size=1, batch_index=0, eval="current", ordering=0)
            for m in ("rome", "memit")]
    fig = plotting.plot_layer_search(_frame(rng, rows), "one layer")
    paths = plotting.save_figure(fig, tmp_path / "figs", "fig1")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:4] == b"%PDF"

    t1 = plotting.table1(_frame(rng, rows, ge=True))
    csv, md = plotting.save_table(t1, tmp_path / "figs", "table1")
    assert csv.read_text().startswith("Algorithm,ES,PS,NS,GE,S,failed")
    lines = md.read_text().splitlines()
    assert lines[0] == "| Algorithm | ES | PS | NS | GE | S | failed |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    assert len(lines) == 2 + len(t1)


def test_figures_tables_and_records_are_written_atomically(rng, tmp_path, monkeypatch):
    """Every file a notebook saves beside the figures goes through one atomic write (a temporary file
    renamed into place): a write that fails leaves the file that was there, whole, and no temporary."""
    rows = [dict(method=m, layer=1, batch_size=1, batch_index=0, eval="current", ordering=0) for m in ("rome", "memit")]
    fig = plotting.plot_layer_search(_frame(rng, rows), "one layer")
    t1 = plotting.table1(_frame(rng, rows, ge=True))
    plotting.save_figure(fig, tmp_path, "f")
    plotting.save_table(t1, tmp_path, "t")
    plotting.save_json({"best_layer": 1}, tmp_path, "best_layer.json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"f.png", "f.pdf", "t.csv", "t.md", "best_layer.json"}
    assert before["best_layer.json"] == b'{\n "best_layer": 1\n}\n'

    import os

    real = os.fdopen

    class Full:  # the disk fills mid-write
        def __init__(self, fd, *a, **k):
            self.f = real(fd, *a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", Full)
    for save in (lambda: plotting.save_figure(fig, tmp_path, "f"), lambda: plotting.save_table(t1.head(1), tmp_path, "t"),
                 lambda: plotting.save_json({"best_layer": 2}, tmp_path, "best_layer.json")):
        with pytest.raises(OSError):
            save()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files whole, no temporaries


def test_markdown_escapes_pipes():
    md = plotting.to_markdown(pd.DataFrame({"a|b": ["x|y", None]}))
    assert md.splitlines()[0] == "| a\\|b |" and md.splitlines()[2] == "| x\\|y |"
    assert md.splitlines()[3] == "|  |"


def test_markdown_with_index_keeps_the_row_labels():
    """index=True: the index (e.g. the configuration a table is keyed by) is the first column."""
    df = pd.DataFrame({"S": [90.5, 80.25]}, index=pd.Index(["memit", "rome"], name="method"))
    assert plotting.to_markdown(df, index=True).splitlines() == [
        "| method | S |", "|---|---|", "| memit | 90.5 |", "| rome | 80.25 |"]
    assert plotting.to_markdown(df).splitlines()[0] == "| S |"


def test_table1_strings(rng):
    rows = [dict(method=m, layer=1, batch_size=1, batch_index=0, eval="current", ordering=0)
            for m in ("rome", "memit")]
    t1 = plotting.table1(_frame(rng, rows, n=40))
    assert list(t1["Algorithm"]) == ["MEMIT", "ROME"]
    assert list(t1.columns) == ["Algorithm", "ES", "PS", "NS", "S", "failed"]
    assert list(t1["failed"]) == ["0", "0"]
    for m in ("ES", "PS", "NS"):
        assert all(re.fullmatch(r"\d{1,3}\.\d\d\(\d{1,3}\.\d\d\)", v) for v in t1[m]), t1[m].tolist()
    assert all(re.fullmatch(r"\d{1,3}\.\d\d", v) for v in t1["S"])


def test_failures_and_jitter_are_shown(rng):
    """A table counts failed cases and regularised solves; a figure says so under its plots."""
    rows = [dict(method=m, layer=1, batch_size=1, batch_index=0, eval="current", ordering=0)
            for m in ("rome", "memit")]
    c = _frame(rng, rows, n=10)
    assert plotting.failure_note(c) is None and plotting.jitter_note(c) is None
    c["failed"], c["fail_reason"], c["solve_jitter"] = False, "", 0.0
    c.loc[c.index[:3], "failed"] = True
    c.loc[c.index[:3], "fail_reason"] = "value optimisation diverged: non-finite loss"
    c.loc[c.index[:3], ["ES", "PS", "NS"]] = np.nan
    c.loc[c.index[5], "solve_jitter"] = 1e-9
    t1 = plotting.table1(c)
    assert list(t1["Algorithm"]) == ["MEMIT", "ROME"] and list(t1["failed"]) == ["0", "3"]  # ROME's 3
    assert "τ≤" in "".join(t1["jittered"])
    assert "3 of " in plotting.failure_note(c) and "non-finite loss" in plotting.failure_note(c)
    assert "1 of " in plotting.jitter_note(c)
    ft = plotting.failure_table({"layer_search": c, "batch": _frame(rng, rows, n=4)})
    bad = ft[ft.experiment == "layer_search"]
    assert bad["failed"].sum() == 3 and bad["jittered"].sum() == 1
    assert "non-finite loss" in "".join(bad["first reason"])
    assert ft[ft.experiment == "batch"].iloc[0]["first reason"] == "none"
    lost = {"batch": {"memit-B16-o0": {"error": "WorkerCrashedError: the worker died\ntraceback ...", "attempts": 2}}}
    ft2 = plotting.failure_table({"layer_search": c, "batch": _frame(rng, rows, n=4)}, lost)
    row = ft2[ft2.configuration.str.contains("memit-B16-o0")]
    assert len(row) == 1 and row.iloc[0]["first reason"] == "WorkerCrashedError: the worker died"
    assert len(ft2) == len(ft) + 1
    fig = plotting.plot_layer_search(c, "t")
    assert "⚠" in fig.get_supxlabel() if hasattr(fig, "get_supxlabel") else fig._supxlabel.get_text()


def test_singular_solves_are_the_exact_ones_that_missed(rng):
    """A row counts as a numerically singular solve when its solve was exact (no jitter) and missed
    the method's equations by more than SOLVE_RESID_WARN; a regularised solve is counted as jittered
    instead, a failed row as failed, and a row without a solve (NaN) as neither."""
    rows = [dict(method="memit", batch_size=4, batch_index=0, eval="current", ordering=0)]
    c = _frame(rng, rows, n=8).assign(failed=False, fail_reason="", solve_jitter=0.0, solve_resid=1e-9)
    c.loc[c.index[:3], "solve_resid"] = 0.2                      # exact and missed: singular
    c.loc[c.index[3], ["solve_resid", "solve_jitter"]] = 0.2, 1e-6  # regularised: jittered, not singular
    c.loc[c.index[4], "solve_resid"] = np.nan                    # no solve
    c.loc[c.index[2], ["failed", "fail_reason", "ES"]] = True, "x", np.nan
    ft = plotting.failure_table({"batch": c})
    assert ft[["failed", "jittered", "singular solves"]].values.tolist() == [[1, 1, 2]]
    assert plotting.singular_note(c).startswith("2 of 8 edited-fact rows come from numerically singular solves")
    assert plotting.singular_note(c.assign(solve_resid=1e-9)) is None


def test_diagnostics_and_degradation_figures_name_failures(rng):
    """Figures drawn from batches.parquet say what their lines leave out: batches with failed facts,
    batches that wrote no update (NaN drift: the mean runs over fewer orderings), and held-out facts
    without scores (counted as not known). Nothing is said when nothing failed."""
    rows = []
    for o in (0, 1):
        for bi in range(4):
            rows.append(dict(method="memit", batch_size=2, batch_index=bi, ordering=o, n=2, n_failed=0,
                             w_rel_dist=0.01 * (bi + 1), cond_D=10.0 + bi, heldout_known=90.0 - bi,
                             heldout_margin=50.0, heldout_ppl=20.0, heldout_known_0=95.0, heldout_margin_0=55.0,
                             heldout_ppl_0=19.0))
    b = pd.DataFrame(rows)
    clean = plotting.plot_sequential_diagnostics(b, "memit", "d")
    assert not clean.get_supxlabel() and not plotting.plot_degradation(b, ["memit"], "g").get_supxlabel()
    b.loc[(b.ordering == 1) & (b.batch_index == 1), "n_failed"] = 1
    b.loc[(b.ordering == 1) & (b.batch_index == 2), ["n_failed", "w_rel_dist", "cond_D"]] = 2, np.nan, np.nan
    b["heldout_unscored"] = 0
    b.loc[(b.ordering == 0) & (b.batch_index == 3), "heldout_unscored"] = 3
    note = plotting.plot_sequential_diagnostics(b, "memit", "d").get_supxlabel()
    assert "2 of 8 batches had failed facts (3 facts" in note and "1 batches wrote no update" in note
    assert "held-out" not in note
    deg = plotting.plot_degradation(b, ["memit"], "g").get_supxlabel()
    assert "1 measurements had held-out facts without scores (up to 3" in deg and "batches had failed" not in deg
    assert "held-out facts without scores" in plotting.plot_degradation_overlay(b, {"memit": 2}, "o").get_supxlabel()


def test_failure_table_counts_facts_that_fail_only_on_a_later_model(rng):
    """A sequential run whose later batches made the model's logits overflow fails facts that were
    scored right after their own edit: the final evaluation's failures get a row of their own
    (a fact whose own edit failed is failed on every later model too, and adds none)."""
    rows = [dict(method="memit", batch_size=b, batch_index=0, eval=e, ordering=0) for b in (4, 16) for e in ("current", "final")]
    c = _frame(rng, rows, n=8).assign(failed=False, fail_reason="")
    own = (c["batch_size"] == 4) & (c["case_id"] == 0)  # its own edit failed: failed now and on the final model
    c.loc[own, ["failed", "fail_reason"]] = True, "value optimisation diverged"
    assert list(plotting.failure_table({"sequential": c})["configuration"]) == ["method=memit, batch_size=4"]
    later = (c["batch_size"] == 16) & (c["eval"] == "final") & (c["case_id"] < 3)
    c.loc[later, ["failed", "fail_reason"]] = True, "non-finite logits on a later model"
    ft = plotting.failure_table({"sequential": c})
    assert list(ft["configuration"]) == ["method=memit, batch_size=4", "method=memit, batch_size=16, eval=final"]
    assert ft.iloc[1]["failed"] == 3 and ft.iloc[1]["first reason"] == "non-finite logits on a later model"
    # counted by fact, not by count: own failures (5 right after their edits) cannot hide 2 new ones
    own = (c["batch_size"] == 4) & (c["case_id"].isin([1, 2, 3, 4]))
    c.loc[own, ["failed", "fail_reason"]] = True, "value optimisation diverged"
    new = (c["batch_size"] == 4) & (c["eval"] == "final") & (c["case_id"].isin([6, 7]))
    c.loc[new, ["failed", "fail_reason"]] = True, "non-finite logits on a later model"
    ft = plotting.failure_table({"sequential": c}).set_index("configuration")
    row = ft.loc["method=memit, batch_size=4, eval=final"]
    assert row["failed"] == 2 and row["first reason"] == "non-finite logits on a later model"
    assert ft.loc["method=memit, batch_size=4", "failed"] == 5


def test_failure_table_shows_unfinished_experiments_and_never_comes_out_empty(tmp_path):
    """An experiment killed mid-way has part files but no consolidated cases: the report lists it
    (with the units saved) instead of saying nothing, and an empty run still gets a table."""
    from editlib.params import resolve
    from editlib.reproduce import incomplete_experiments
    p = resolve("smoke", overrides={"results_dir": str(tmp_path)})
    (tmp_path / "smoke" / "sequential" / "parts").mkdir(parents=True)
    (tmp_path / "smoke" / "sequential" / "manifest.json").write_text("{}")
    for u in ("a", "b"):
        (tmp_path / "smoke" / "sequential" / "parts" / f"{u}.unit.json").write_text("{}")
    (tmp_path / "smoke" / "batch").mkdir()
    (tmp_path / "smoke" / "batch" / "cases.parquet").write_bytes(b"")
    assert incomplete_experiments(p) == {"sequential": 2}
    ft = plotting.failure_table({}, None, incomplete_experiments(p))
    assert ft.iloc[0]["experiment"] == "sequential" and "incomplete: 2 unit(s) saved" in ft.iloc[0]["configuration"]
    empty = plotting.failure_table({})
    assert list(empty.columns) == list(plotting.FAILURE_COLUMNS) and empty.iloc[0]["configuration"] == "no experiment stored"
    assert plotting.to_markdown(empty).startswith("| experiment | configuration |")


def test_sweep_table_and_comparison(rng):
    rows = [dict(method="emmet", layer=1, lam=l, batch_size=8, batch_index=0, eval="current", ordering=0)
            for l in (0.0, 1e-2)]
    t = plotting.sweep_table(_frame(rng, rows), "emmet")
    assert list(t["Lambda"]) == ["0", "1×10^-2"] and list(t["lam"]) == [0.0, 0.01]
    ref = plotting.paper_reference_tables()
    cmp = plotting.compare_with_paper(t, ref["table4"], on="lam")
    assert len(cmp) == 7  # the paper's grid; ours fills two rows
    assert cmp.loc[cmp.lam == 0, "S (paper)"].item() == "74.23"
    assert cmp.loc[cmp.lam == 1e-3, "S (ours)"].item() == ""
    assert "GE (paper)" in cmp.columns and "GE (ours)" not in cmp.columns
    # our failed edits come along (our means leave them out): a count where we ran, blank where only the paper did
    assert cmp.columns[-1] == "failed (ours)" and cmp.loc[cmp.lam == 0, "failed (ours)"].item() == "0"
    assert cmp.loc[cmp.lam == 1e-3, "failed (ours)"].item() == ""
    c = _frame(rng, rows).assign(failed=False)
    c.loc[(c["lam"] == 0.0) & (c["case_id"] < 3), "failed"] = True
    cmp = plotting.compare_with_paper(plotting.sweep_table(c, "emmet"), ref["table4"], on="lam")
    assert cmp.loc[cmp.lam == 0, "failed (ours)"].item() == "3"
    t1 = plotting.compare_with_paper(plotting.table1(_frame(rng, [dict(method=m, layer=1, batch_size=1, batch_index=0,
                                                                         eval="current", ordering=0)
                                                                    for m in ("rome", "memit")])),
                                     ref["table1"], on="Algorithm")
    assert t1["failed (ours)"].tolist() == ["0", "0"] and t1.columns[-1] == "failed (ours)"


def test_the_tables_next_to_the_papers_name_our_reading(rng):
    """Our columns say where our reading of a metric is not the one behind the paper's numbers (the
    reference's BOS-shifted alignment, GE texts keeping the BOS string): the params' alignment and
    gen_text; under the reference's readings they are plain "ours"."""
    rows = [dict(method=m, layer=1, batch_size=1, batch_index=0, eval="current", ordering=0) for m in ("rome", "memit")]
    t = plotting.table1(_frame(rng, rows)).assign(GE=["600.00", "601.00"])
    ref = plotting.paper_reference_tables()["table1"]
    cols = list(plotting.compare_with_paper(t, ref, on="Algorithm",
                                            labels=plotting.ours_labels("correct", "clean")).columns)
    assert cols[1:3] == ["ES (ours, correct alignment)", "ES (paper)"]
    assert "S (ours, correct alignment)" in cols and "GE (ours, clean text)" in cols and "failed (ours)" in cols
    same = list(plotting.compare_with_paper(t, ref, on="Algorithm",
                                            labels=plotting.ours_labels("reference", "reference")).columns)
    assert same == list(plotting.compare_with_paper(t, ref, on="Algorithm").columns)
    assert "ES (ours)" in same and "GE (ours)" in same
    half = plotting.ours_labels("reference", "clean")
    assert half == {"GE": "ours, clean text"}


def test_a_second_alignment_sits_beside_ours_next_to_the_papers(rng):
    """With ``evaluation.also_alignment`` the cases hold a second reading: its ES, PS, NS and S
    follow ours, labelled with their alignment, computed from the same cases (failed rows as
    ours); without it the table is :func:`compare_with_paper`'s, byte for byte."""
    from editlib.metrics import PROB_METRICS, alignment_column
    rows = [dict(method=m, layer=1, batch_size=1, batch_index=0, eval="current", ordering=0) for m in ("rome", "memit")]
    c = _frame(rng, rows).assign(failed=False)
    ref = plotting.paper_reference_tables()["table1"]
    plain = plotting.table_vs_paper(c, plotting.table1, ref, "Algorithm", "correct", "clean")
    pd.testing.assert_frame_equal(plain, plotting.compare_with_paper(plotting.table1(c), ref, "Algorithm",
                                                                     plotting.ours_labels("correct", "clean")))
    alt = c.assign(**{alignment_column(m, "reference"): c[m] * 0 + (0.0 if m == "ES" else 0.5) for m in PROB_METRICS})
    both = plotting.table_vs_paper(alt, plotting.table1, ref, "Algorithm", "correct", "clean")
    cols = list(both.columns)
    assert cols[1:4] == ["ES (ours, correct alignment)", "ES (ours, reference alignment)", "ES (paper)"]
    assert "S (ours, reference alignment)" in cols and "GE (ours, reference alignment)" not in cols
    assert both["ES (ours, reference alignment)"].tolist() == ["0.00(0.00)"] * 2 and both["S (ours, reference alignment)"].tolist() == ["0.00"] * 2
    pd.testing.assert_frame_equal(both[list(plain.columns)], plain)
    sweep_rows = [dict(method="emmet", layer=1, lam=l, batch_size=8, batch_index=0, eval="current", ordering=0) for l in (0.0, 1e-2)]
    s = _frame(rng, sweep_rows)
    s = s.assign(**{alignment_column(m, "correct"): s[m] for m in PROB_METRICS})
    sw = plotting.table_vs_paper(s, lambda x: plotting.sweep_table(x, "emmet"), plotting.paper_reference_tables()["table4"],
                                 "lam", "reference", "reference")
    assert len(sw) == 7 and sw.loc[sw.lam == 0, "ES (ours)"].item() == sw.loc[sw.lam == 0, "ES (ours, correct alignment)"].item()
    assert sw.loc[sw.lam == 1e-3, "ES (ours, correct alignment)"].item() == ""


def test_paper_reference_tables():
    ref = plotting.paper_reference_tables()
    assert ref["table1"].loc[0].tolist() == ["MEMIT", "100.0", "98.05", "85.61", "615.09", "94.10"]
    assert len(ref["table3"]) == 9 and len(ref["table4"]) == 7
    assert ref["table3"].loc[5, "Lambda"] == "5×10^4" and ref["table3"].loc[5, "S"] == "86.49"
    assert ref["table4"].loc[3, "PS"] == "85.72(27.64)"
    assert [plotting.format_lambda(l) for l in (0, 1, 10, 5e4, 1e-7)] == ["0", "1", "1×10^1", "5×10^4", "1×10^-7"]


def test_table2_from_params():
    p = resolve("tiny", overrides={"sequential.total": 10, "sequential.batch_sizes": [1, 4, 10]})
    t2 = plotting.table2(p)
    assert t2.values.tolist() == [[1, 10, 10], [4, 3, 10], [10, 1, 10]]
    b = pd.DataFrame({"method": ["memit"] * 4, "batch_size": [4, 4, 4, 10], "batch_index": [0, 1, 2, 0]})
    assert plotting.table2(p, b)["run (MEMIT)"].tolist() == [0, 3, 1]


def test_table2_from_what_a_stored_run_ran(tmp_path):
    """The report builds Table 2 from the stored manifest's spec: params changed since (tiny.yaml's
    64 facts at B = 1, 4, 16, 64 here) must not list sizes that never ran."""
    from editlib.reproduce import StoredResult
    spec = {"total": 24, "batch_sizes": [1, 4, 24], "methods": ["memit"], "layer": 0}
    b = pd.DataFrame({"method": ["memit"] * 7, "batch_size": [4] * 6 + [24], "batch_index": [0, 1, 2, 3, 4, 5, 0]})
    r = StoredResult("sequential", tmp_path, pd.DataFrame(), b, {"params": {"spec": spec}})
    t2 = plotting.table2(r.spec, r.batches)
    assert t2.values.tolist() == [[1, 24, 24, 0], [4, 6, 24, 6], [24, 1, 24, 1]]
    assert StoredResult("sequential", tmp_path, pd.DataFrame(), b).spec == {}


def test_captions_name_model_data_sizes_and_flag_miniatures(rng, tmp_path):
    from editlib.reproduce import StoredResult, caption, result_title

    def stored(model_dir: str, data: dict, orderings=(0,)) -> StoredResult:
        man = {"complete": True,
               "provenance": {"model": model_dir, "model_label": "m-6L", "n_layers": 6,
                              "model_fingerprint": "abcdef0123456789", "n_records_available": 2000,
                              "data": data},
               "params": {"data": {"source": "model", "ordering_seed": 37, "orderings": list(orderings)},
                          "evaluation": {"generation": False},
                          "spec": {"total": 512, "batch_sizes": [1, 8], "layer": 0}}}
        return StoredResult("sequential", tmp_path, _cases(rng, 2), pd.DataFrame(), man)

    mini = tmp_path / "mini"
    mini.mkdir()
    (mini / "editlib_tiny.json").write_text("{}")
    cf = caption(resolve("tiny-counterfact"), stored(str(mini), {"source": "model", "sha256": "2b0adfb888cb45cc",
                                                                 "case_ids": str(mini / "case_ids.json")}),
                 "Figure 4")
    own = caption(resolve("tiny"), stored(str(mini), {"source": "model", "sha256": "9f86d081884c7d65"}), "Figure 1")
    assert "records.json sha256 9f86d081884c" in own and "CounterFact" not in own
    assert cf.startswith("*Miniature result") and "not Llama-3-8B" in cf
    assert "CounterFact records the miniature was trained on" in cf and "2b0adfb888cb" in cf
    assert "m-6L" in cf and "6 decoder layers" in cf and "facts in total 512" in cf and "ordering seed 37" in cf
    three = caption(resolve("tiny"), stored(str(mini), {"source": "model"}, orderings=(0, 1, 2)), "Figure 4")
    assert "facts per ordering 512" in three and "orderings 0, 1, 2" in three  # not 512 over all three
    big_r = stored("meta-llama/Meta-Llama-3-8B", {"source": "counterfact"})
    big = caption(resolve("llama3-8b"), big_r, "Figure 4")
    assert "Miniature" not in big and "not Llama-3-8B" not in big
    # figure titles (notebooks 01-05 via Study.title, the report via result_title) carry the flag
    assert result_title(resolve("tiny-counterfact"), stored(str(mini), {})) == \
        "m-6L (tiny-counterfact), miniature: not Llama-3-8B"
    assert result_title(resolve("llama3-8b"), big_r) == "m-6L (llama3-8b)"


def test_coinciding_methods_are_named_in_the_legend(rng):
    rows = [dict(method="memit", layer=l, batch_size=1, batch_index=0, eval="current", ordering=0) for l in range(3)]
    memit = _frame(rng, rows)
    same = pd.concat([memit, memit.assign(method="rome")], ignore_index=True)
    fig = plotting.plot_layer_search(same, "t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["MEMIT", "ROME (= MEMIT within 0.5)"]
    other = memit.assign(method="rome", ES=1.0 - memit["ES"])  # flipped efficacy: clearly different
    fig = plotting.plot_layer_search(pd.concat([memit, other], ignore_index=True), "t")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["MEMIT", "ROME"]


def test_batch_and_sequential_share_the_y_range_of_es_ps_ns(rng):
    rows = [dict(method="memit", batch_size=b, batch_index=0, eval="current", ordering=0) for b in (4, 16)]
    c = _frame(rng, rows)
    c.loc[c.batch_size == 16, "NS"] = 0.2  # NS drops far below ES / PS
    for fig in (plotting.plot_batch(c, "memit", "t"), plotting.plot_sequential(c, "memit", "t")):
        es, ps, ns, s = fig.axes[:4]
        assert es.get_ylim() == ps.get_ylim() == ns.get_ylim()


def _degradation_rows(orderings=(0,), sizes=(1, 4), n=8, known=lambda o, B, i: 90.0 - i, ppl=lambda o, B, i: 3.0):
    return pd.DataFrame([{"method": "memit", "batch_size": B, "ordering": o, "batch_index": i,
                          "heldout_known": known(o, B, i), "heldout_known_0": 100.0,
                          "heldout_margin": 50.0 - i, "heldout_margin_0": 60.0,
                          "heldout_ppl": ppl(o, B, i), "heldout_ppl_0": 2.8}
                         for o in orderings for B in sizes for i in range(n // B)])


def test_degradation_draws_what_was_measured():
    """No line joins the unedited model to the first measurement (nothing was measured between:
    a single batch of all facts would be a diagonal across the axis); the unedited model is a
    grey point at "0" and a dotted line. Perplexity on a log axis, the share known within
    [0, 100], bands over orderings with the title saying what lines and bands are."""
    b = _degradation_rows(ppl=lambda o, B, i: 1000.0 if B == 4 else 3.0 + i)
    fig = plotting.plot_degradation(b, ["memit"], "t")
    known, _, ppl = fig.axes
    data = [ln for ln in known.lines if ln.get_label().startswith("MEMIT B=")]
    assert [ln.get_xdata()[0] for ln in data] == [1, 4]  # first measured points, not 0.5
    assert ppl.get_yscale() == "log" and known.get_ylim()[1] <= 100
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["MEMIT B=1", "MEMIT B=4"]
    assert "orderings" not in fig.get_suptitle()
    two = _degradation_rows(orderings=(0, 1), known=lambda o, B, i: 99.5 - i + o)
    fig = plotting.plot_degradation(two, ["memit"], "t")
    assert "mean over 2 orderings" in fig.get_suptitle()
    band_tops = np.concatenate([p.vertices[:, 1] for c in fig.axes[0].collections for p in c.get_paths()])
    assert band_tops.max() <= 100 and len(fig.axes[0].collections) == 2  # clipped at 100 %
    fig = plotting.plot_degradation(two, ["memit"], "t", ylims={"heldout_known": (50.0, 100.0)})
    assert fig.axes[0].get_ylim() == (50.0, 100.0)


def test_sibling_degradation_figures_share_their_scales():
    """Every editor's degradation figure of one run gets the same y ranges (a dip of one held-out
    fact must not fill one panel while another editor's collapse fits in its own)."""
    b = pd.concat([_degradation_rows(known=lambda o, B, i: 99.0),
                   _degradation_rows(known=lambda o, B, i: 60.0 - i).assign(method="alphaedit")])
    lims = plotting.degradation_ylims(b, ["memit", "alphaedit"])
    assert lims["heldout_known"][0] < 53 and lims["heldout_known"][1] == 100.0
    assert 0 < lims["heldout_ppl"][0] < 2.8 < 3.0 < lims["heldout_ppl"][1]
    figs = [plotting.plot_degradation(b, [m], "t", ylims=lims) for m in ("memit", "alphaedit")]
    assert figs[0].axes[0].get_ylim() == figs[1].axes[0].get_ylim() == lims["heldout_known"]


def test_editors_drawn_on_each_other_say_so():
    """ROME and EMMET make the same edit at B = 1: the later line gets open markers and a legend
    entry naming the one it lies on, so neither hides the other silently."""
    rng = np.random.default_rng(1)
    emmet = _frame(rng, [dict(method="emmet", batch_size=b, batch_index=0, eval="current", ordering=0)
                         for b in (1, 4)])
    rome = emmet[emmet.batch_size == 1].assign(method="rome")
    fig = plotting.plot_editors_batch(pd.concat([emmet, rome]), ["emmet", "rome"], "t")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["EMMET", "ROME (= EMMET at B = 1)"]
    assert fig.axes[0].lines[1].get_markerfacecolor() == "none"
    other = rome.assign(ES=1.0 - rome["ES"])
    fig = plotting.plot_editors_batch(pd.concat([emmet, other]), ["emmet", "rome"], "t")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["EMMET", "ROME"]


def test_score_axes_stay_within_0_and_100(rng):
    """A share or S panel never runs past 100 (matplotlib's margin used to take it to ~101), in
    the layer search and λ sweeps too, whose ES, PS, NS panels now share one range."""
    rows = [dict(method="memit", layer=l, batch_size=1, batch_index=0, eval="current", ordering=0) for l in range(3)]
    c = _frame(rng, rows)
    c[["ES", "PS"]] = 1.0
    c.loc[c.layer == 2, "NS"] = 0.0
    fig = plotting.plot_layer_search(c, "t")
    es, ps, ns, s = fig.axes
    assert es.get_ylim() == ps.get_ylim() == ns.get_ylim() and es.get_ylim()[1] == 100 and es.get_ylim()[0] >= 0
    assert s.get_ylim()[1] <= 100 and es.lines[0].get_clip_on() is False  # points at 100 drawn whole
    rows = [dict(method="memit", lam=l, batch_size=8, batch_index=0, eval="current", ordering=0)
            for l in (1.0, 10.0, 100.0, 1e3, 1e4, 5e4, 1e5, 5e5, 1e6)]
    fig = plotting.plot_sweep(_frame(rng, rows), "memit", "t")
    assert fig.axes[0].get_ylim() == fig.axes[2].get_ylim()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["1", "10", "100", "1e3", "1e4", "", "1e5", "", "1e6"]  # 5e4 and 5e5: ticks, no overlapping labels


def test_long_titles_wrap_and_pdfs_embed_truetype(rng, tmp_path):
    rows = [dict(method="memit", batch_size=b, batch_index=0, eval="current", ordering=0) for b in (4, 16)]
    fig = plotting.plot_batch(_frame(rng, rows), "memit", "Figure 2: " + "a very long model and data description " * 4)
    assert all(len(line) <= 13 * fig.get_figwidth() for line in fig.get_suptitle().split("\n"))
    plotting.save_figure(fig, tmp_path, "f")
    pdf = (tmp_path / "f.pdf").read_bytes()
    assert b"/Type3" not in pdf and b"/CIDFontType2" in pdf  # TrueType outlines (fonttype 42)


def test_windows_are_shades_of_their_method(rng):
    """MEMIT over 1 and 2 layers: one line each, in shades of MEMIT's colour (another method's
    colour would read as that method), the single layer solid."""
    import matplotlib.colors as mc

    rows = [dict(method=m, batch_size=b, batch_index=0, eval="current", ordering=0)
            for m in ("memit", "memit-w2") for b in (4, 16)]
    fig = plotting.plot_windows(_frame(rng, rows), "memit", "t")
    one, two = fig.axes[0].lines
    assert one.get_linestyle() == "-" and two.get_linestyle() == "--"
    assert mc.to_hex(one.get_color()) == mc.to_hex(plotting._PALETTE["memit"])
    assert all(mc.to_hex(two.get_color()) != mc.to_hex(c) for c in plotting._PALETTE.values())
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["MEMIT, 1 layer", "MEMIT, 2 layers"]


def test_degradation_axis_labels_the_unedited_model_zero():
    fig = plotting.plot_degradation(_degradation_rows(sizes=(1, 4), n=256), ["memit"], "t")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "0" and labels[-1] == "256" and len(labels) <= 8
