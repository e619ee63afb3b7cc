"""The whole study end to end: ``editlib.reproduce`` runs notebooks 01-07 with params/smoke.yaml
(papermill + nbconvert) into a temporary folder. Slow (about a minute on 2 cores): ``-m "not slow"``
skips it.

It needs the committed miniature models/tiny-world; ``EDITLIB_SMOKE_MODEL=/path/to/model`` runs it
on another miniature directory instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from editlib.paths import REPO_ROOT

pytestmark = pytest.mark.slow

FIGURES = ("fig1_layer_search", "fig_table3_memit_lambda", "fig_table4_emmet_lambda", "fig2_batch_memit",
           "fig3_batch_emmet", "fig4_sequential_memit", "fig5_sequential_emmet",
           "fig_sequential_diagnostics_memit", "fig_sequential_diagnostics_emmet", "beyond_batch_all_methods",
           "beyond_sequential_all_methods", "beyond_degradation_all_methods", "beyond_degradation_encore")
TABLES = ("table1_singular", "table3_memit_lambda", "table4_emmet_lambda", "table_batch_summary",
          "table2_batches", "table_sequential_retention", "table1_vs_paper", "table3_vs_paper",
          "table4_vs_paper", "table_claims", "table_failures", "beyond_table_batch", "beyond_table_sequential")
STUDY = ("01_layer_search", "02_singular_edits", "03_hparam_sweep", "04_batch_editing",
         "05_sequential_batch_editing", "07_beyond_the_paper")
NOTEBOOKS = STUDY + ("06_report",)  # the report runs last


def _model_overrides() -> dict:
    model = os.environ.get("EDITLIB_SMOKE_MODEL")
    if model:
        return {"model.id": model}
    if not (REPO_ROOT / "models" / "tiny-world" / "config.json").is_file():
        pytest.skip("models/tiny-world is missing (set EDITLIB_SMOKE_MODEL to a miniature directory)")
    return {}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from editlib.reproduce import reproduce

    tmp = tmp_path_factory.mktemp("smoke")
    over = {**_model_overrides(), "results_dir": str(tmp / "results"), "figures_dir": str(tmp / "figures")}
    runs = reproduce("smoke", over, runs_dir=tmp / "runs", threads=1, log=lambda *_: None)
    return tmp, runs


def _argmax_memit_s(cases_file: Path) -> int:
    """The layer with the highest MEMIT S in the stored layer-search cases (ties: the lowest)."""
    import pandas as pd

    from editlib.metrics import summarize_cases

    s = summarize_cases(pd.read_parquet(cases_file), by=["method", "layer"])
    s = s[s.method == "memit"]
    assert sorted(s.layer) == [0, 1, 5] and s.S.notna().all()
    top = s.S.max()
    return int(s[s.S == top].layer.min())


def _nonempty(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 0


def test_every_figure_and_table_written(smoke_run):
    tmp, _ = smoke_run
    fig_dir = tmp / "figures" / "smoke"
    missing = [f"{s}{ext}" for s in FIGURES for ext in (".png", ".pdf") if not _nonempty(fig_dir / f"{s}{ext}")]
    missing += [f"{s}{ext}" for s in TABLES for ext in (".csv", ".md") if not _nonempty(fig_dir / f"{s}{ext}")]
    assert not missing, f"missing or empty in {fig_dir}: {missing}"
    best = json.loads((fig_dir / "best_layer.json").read_text())
    assert best["best_layer"] == _argmax_memit_s(tmp / "results" / "smoke" / "layer_search" / "cases.parquet")
    assert "fig6_layer_search_second_model.png" not in {p.name for p in fig_dir.iterdir()}


def test_notebooks_html_and_timings(smoke_run):
    tmp, runs = smoke_run
    run_dir = tmp / "runs" / "smoke"
    assert [r.notebook for r in runs] == [f"{n}.ipynb" for n in NOTEBOOKS]
    for n in NOTEBOOKS:
        assert _nonempty(run_dir / f"{n}.ipynb") and _nonempty(run_dir / f"{n}.html")
    timings = json.loads((run_dir / "timings.json").read_text())
    assert [t["status"] for t in timings["notebooks"]] == ["ok"] * len(NOTEBOOKS)
    report = (run_dir / "06_report.html").read_text()
    assert "Miniature result" in report and "not Llama-3-8B" in report
    assert "plotting.save_table" not in report  # the report's code cells are hidden
    assert "The paper&#39;s claims, checked on this run" in report or "The paper's claims, checked on this run" in report
    assert "holds here" in report and "MEMIT edits best at layer" in report  # claims table and generated findings
    assert "Is bigger edit batch size better?" in report and "<strong>AlphaEdit.</strong>" in report  # notebook 07's answers
    assert str(REPO_ROOT) not in report  # paths are shown relative to the repository
    for n in NOTEBOOKS:  # progress is plain text in stored notebooks and HTML: no widget, no warning box
        html = (run_dir / f"{n}.html").read_text()
        assert "IProgress" not in html and "TqdmWarning" not in html, n
        nb = json.loads((run_dir / f"{n}.ipynb").read_text())
        for cell in nb["cells"]:
            for o in cell.get("outputs", []):
                assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), f"{n}: a widget output"
                assert o.get("name") != "stderr" or "IProgress" not in "".join(o.get("text", "")), n
                assert "\r" not in "".join(o.get("text", "")), f"{n}: carriage returns in a stored output"


def test_results_stored_outside_the_repo(smoke_run):
    tmp, _ = smoke_run
    exps = sorted(p.name for p in (tmp / "results" / "smoke").iterdir())
    assert exps == ["batch", "layer_search", "sequential", "singular", "sweep"]
    assert sorted(p.name for p in (tmp / "results" / "smoke-beyond").iterdir()) == ["batch", "sequential"]
    answers = (tmp / "figures" / "smoke" / "beyond_answers.md").read_text()
    assert all(f"**{m}.**" in answers for m in ("MEMIT", "EMMET", "ROME", "AlphaEdit", "ENCORE"))


def test_parameters_cells_parse_cleanly(caplog):
    """papermill reads every notebook's parameters (``--help-notebook``) without a warning: each
    section on its own line with its help, every section setup() takes."""
    import papermill as pm

    from editlib.params import SECTIONS

    for nb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        with caplog.at_level("WARNING", logger="papermill"):
            got = pm.inspect_notebook(str(nb))
        assert not [r for r in caplog.records if r.levelname == "WARNING"], (nb.name, caplog.text)
        assert {"params_file", "overrides"} <= set(got), nb.name
        sections = set(got) - {"params_file", "overrides"}
        assert sections <= set(SECTIONS) and all(got[k]["help"] for k in sections), nb.name
        assert set(SECTIONS) - sections <= {"beyond"}, (nb.name, set(SECTIONS) - sections)


def test_study_notebooks_read_well():
    """Notebooks 01-05 and 07 (the committed sources): an opening explanation, the one-call setup, a
    markdown step before every code step, tables shown without the pandas index, no outputs."""
    for n in STUDY:
        cells = json.loads((REPO_ROOT / "notebooks" / f"{n}.ipynb").read_text())["cells"]
        intro = "".join(cells[0]["source"])
        assert cells[0]["cell_type"] == "markdown", n
        for part in ("**Protocol.**", "**What to look for.**", "**Time.**"):
            assert part in intro, (n, part)
        if n != "01_layer_search":
            assert "**Run first:** notebook 01" in intro, n
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        assert "executor" in code[0] and "parameters" in cells[1]["metadata"].get("tags", []), n
        assert sum("editlib.notebook.setup(globals())" in c for c in code) == 1, n
        assert not any("editlib.params.resolve" in c for c in code), n
        assert not any("display(summarize(" in c or "display(table)" in c for c in code), n
        for prev, cell in zip(cells, cells[1:]):
            if cell["cell_type"] == "code" and cell is not cells[1]:
                assert prev["cell_type"] == "markdown", (n, cell["id"])
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), n


def test_the_report_describes_the_stored_runs_not_the_params_it_is_opened_with(smoke_run, tmp_path):
    """The report re-rendered after the params file changed (other sequential sizes, fewer
    editors) still describes what ran: Table 2 and notebook 07's editors come from each stored
    run's manifest, so no batch size that never ran is listed with 0 runs."""
    import shutil

    import papermill as pm

    tmp, _ = smoke_run
    shutil.copytree(tmp / "figures", tmp_path / "figures")
    over = {**_model_overrides(), "results_dir": str(tmp / "results"), "figures_dir": str(tmp_path / "figures")}
    pm.execute_notebook(str(REPO_ROOT / "notebooks" / "06_report.ipynb"), str(tmp_path / "06.ipynb"),
                        parameters={"params_file": str(REPO_ROOT / "params" / "smoke.yaml"), "overrides": over,
                                    "sequential": {"total": 16, "batch_sizes": [1, 16]},
                                    "beyond": {"methods": ["memit"]}},
                        cwd=str(REPO_ROOT / "notebooks"), kernel_name="python3", progress_bar=False)
    for f in ("table2_batches.md", "beyond_answers.md", "table_claims.md"):
        assert (tmp_path / "figures" / "smoke" / f).read_text() == (tmp / "figures" / "smoke" / f).read_text(), f
    assert "| 16 |" not in (tmp_path / "figures" / "smoke" / "table2_batches.md").read_text()


def test_a_second_alignment_reaches_the_tables_next_to_the_papers(tmp_path):
    """``evaluation.also_alignment: reference``: notebook 02's and the report's Table 1 next to the
    paper's carry the reference alignment's ES, PS, NS and S beside ours, from the same cases. The
    report names each reading as the stored run scored it, whatever the params it is opened with."""
    import papermill as pm

    over = {**_model_overrides(), "results_dir": str(tmp_path / "results"), "figures_dir": str(tmp_path / "figures"),
            "evaluation": {"also_alignment": "reference"}, "singular": {"layer": 1}}
    swapped = {**over, "evaluation": {"alignment": "reference", "also_alignment": "correct"}}
    for nb, o in (("02_singular_edits", over), ("06_report", swapped)):
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{nb}.ipynb"), str(tmp_path / f"{nb}.ipynb"),
                            parameters={"params_file": str(REPO_ROOT / "params" / "smoke.yaml"), "overrides": o},
                            cwd=str(REPO_ROOT / "notebooks"), kernel_name="python3", progress_bar=False)
    table = (tmp_path / "figures" / "smoke" / "table1_vs_paper.md").read_text()
    header = table.splitlines()[0]
    for m in ("ES", "PS", "NS", "S"):
        assert f"{m} (ours, correct alignment) | {m} (ours, reference alignment) | {m} (paper)" in header, m
    html = (tmp_path / "02_singular_edits.ipynb").read_text()
    assert "ES (ours, reference alignment)" in html
    claims = (tmp_path / "figures" / "smoke" / "table_claims_reference.md").read_text()  # the claims under it
    assert "MEMIT ≈ ROME for singular edits" in claims
