"""Write the study notebooks 01-06 (``python notebooks/build_notebooks.py``).

The .ipynb files are generated, not edited by hand: change a cell here and rerun. Cell ids are
fixed so the output is byte-for-byte reproducible. Notebooks hold no algorithm code: they resolve
the parameters, call :mod:`editlib`, display tables and save figures into ``figures/<name>/``.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = '''\
params_file = "../params/tiny.yaml"   # base parameters (a path, or a name in params/)
overrides = {}                         # dotted keys, e.g. {"batch.total": 64}
# papermill -f FILE.yaml injects whole sections (model, data, hparams, batch, ...) that are deep-merged over params_file
name = model = second_model = data = covariance = evaluation = hparams = None
layer_search = singular = sweep = batch = sequential = results_dir = figures_dir = None'''

SETUP = '''\
%matplotlib inline
import json
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

import editlib
import editlib.params
import editlib.paths
from editlib import plotting

pd.set_option("display.max_rows", 200)
pd.set_option("display.width", 200)
P = editlib.params.resolve(
    params_file, overrides=overrides, name=name, model=model, second_model=second_model, data=data,
    covariance=covariance, evaluation=evaluation, hparams=hparams, layer_search=layer_search,
    singular=singular, sweep=sweep, batch=batch, sequential=sequential, results_dir=results_dir,
    figures_dir=figures_dir)
P = editlib.paths.anchor_params(P)  # relative paths are relative to the repository root
FIG_DIR = Path(P.figures_dir) / P.name
print(f"params: {P.source}\\nrun: {P.name}\\nmodel: {P.model.label or P.model.id}\\n"
      f"results: {Path(P.results_dir) / P.name}\\nfigures: {FIG_DIR}")'''



def study_imports(runner: str) -> str:
    return f"from editlib.protocols import best_layer, open_study, {runner}, summarize"


def save_fig(call: str, stem: str) -> str:
    """Code that builds a figure with ``call``, saves it as PNG + PDF and displays it."""
    return f'''fig = {call}
print(*plotting.save_figure(fig, FIG_DIR, "{stem}"), sep="\\n")
display(fig)'''


def save_tab(expr: str, stem: str, var: str = "table") -> str:
    """Code that builds a table, saves it as CSV + Markdown and displays it."""
    return f'''{var} = {expr}
print(*plotting.save_table({var}, FIG_DIR, "{stem}"), sep="\\n")
display({var})'''


# --------------------------------------------------------------------------- notebooks

NB01 = [
    ("md", "# 01 · Layer search — Figure 1 (and Figure 6)\n\n"
           "Regenerates the paper's **Figure 1** (ES, PS, NS, S — and GE when generation is on — of "
           "singular ROME and MEMIT edits at every layer) on the main model, and **Figure 6** (the same "
           "search on the second model; Llama-2-7B in the paper) when `second_model` is set. The best "
           "layer (highest MEMIT S) is recorded in `best_layer.json` and used by notebooks 02-05."),
    ("code", SETUP),
    ("code", study_imports("run_layer_search")),
    ("md", "## Main model"),
    ("code", '''study = open_study(P, experiments=["layer_search"])
cases = run_layer_search(study)
display(summarize(cases, by=["method", "layer"], formatted=True))'''),
    ("code", save_fig('plotting.plot_layer_search(cases, f"Figure 1: layer search, {study.title}")',
                      "fig1_layer_search")),
    ("code", '''best = {"model_label": study.label, "best_layer": best_layer(study),
        "rule": "highest S of the MEMIT singular edits (ROME when MEMIT is absent)"}
if P.second_model is not None:
    del study  # free the main model before loading the second one
print(json.dumps(best, indent=1))'''),
    ("md", "## Second model (Figure 6)"),
    ("code", '''if P.second_model is None:
    print("no second_model in the params: Figure 6 skipped")
else:
    study2 = open_study(P, which="second_model", experiments=["layer_search"])
    cases2 = run_layer_search(study2)
    display(summarize(cases2, by=["method", "layer"], formatted=True))
    ''' + save_fig('plotting.plot_layer_search(cases2, f"Figure 6: layer search, {study2.title}")',
                   "fig6_layer_search_second_model").replace("\n", "\n    ") + '''
    best["second_model"] = {"model_label": study2.label, "best_layer": best_layer(study2)}'''),
    ("code", '''FIG_DIR.mkdir(parents=True, exist_ok=True)
(FIG_DIR / "best_layer.json").write_text(json.dumps(best, indent=1) + "\\n")
print(f"best layer of {best['model_label']}: {best['best_layer']}  ->", FIG_DIR / "best_layer.json")'''),
]

NB02 = [
    ("md", "# 02 · Singular edits — Table 1\n\n"
           "Regenerates the paper's **Table 1**: ROME vs MEMIT, each fact edited alone on the unedited "
           "model at the best layer (notebook 01), scores as mean(std) ×100."),
    ("code", SETUP),
    ("code", study_imports("run_singular")),
    ("code", '''study = open_study(P, experiments=["singular"])
cases = run_singular(study)
display(summarize(cases, formatted=True))'''),
    ("code", save_tab("plotting.table1(cases)", "table1_singular")),
    ("md", "The paper's Table 1 (Llama-3-8B, 1k CounterFact facts, layer 1) for comparison:"),
    ("code", 'display(plotting.compare_with_paper(table, plotting.paper_reference_tables()["table1"], on="Algorithm"))'),
]

NB03 = [
    ("md", "# 03 · λ sweeps — Tables 3 and 4\n\n"
           "Regenerates the paper's **Table 3** (MEMIT λ = `mom2_update_weight`) and **Table 4** "
           "(EMMET λ) — batch editing at one batch size (1024 in the paper) for every λ — with a "
           "figure of each sweep."),
    ("code", SETUP),
    ("code", study_imports("run_sweep")),
    ("code", '''study = open_study(P, experiments=["sweep"])
cases = run_sweep(study)
display(summarize(cases, by=["method", "lam"], formatted=True))'''),
    ("md", "## Table 3 — MEMIT"),
    ("code", save_tab('plotting.sweep_table(cases, "memit")', "table3_memit_lambda", "table3")),
    ("code", save_fig('plotting.plot_sweep(cases, "memit", f"Table 3 sweep: MEMIT λ, batch {P.sweep.batch_size}, '
                      '{study.title}")', "fig_table3_memit_lambda")),
    ("md", "## Table 4 — EMMET"),
    ("code", save_tab('plotting.sweep_table(cases, "emmet")', "table4_emmet_lambda", "table4")),
    ("code", save_fig('plotting.plot_sweep(cases, "emmet", f"Table 4 sweep: EMMET λ, batch {P.sweep.batch_size}, '
                      '{study.title}")', "fig_table4_emmet_lambda")),
]

NB04 = [
    ("md", "# 04 · Batch editing — Figures 2 and 3\n\n"
           "Regenerates the paper's **Figure 2** (batch MEMIT) and **Figure 3** (batch EMMET): each "
           "batch applied to the unedited model, its facts scored, the model restored; ES, PS, NS, S "
           "vs batch size."),
    ("code", SETUP),
    ("code", study_imports("run_batch")),
    ("code", '''study = open_study(P, experiments=["batch"])
cases = run_batch(study)
display(summarize(cases, by=["method", "batch_size"], formatted=True))'''),
    ("code", save_tab('summarize(cases, by=["method", "batch_size"], formatted=True)', "table_batch_summary")),
    ("code", '''for method, number, stem in (("memit", 2, "fig2_batch_memit"), ("emmet", 3, "fig3_batch_emmet")):
    if method not in P.batch.methods:
        print(f"{method} not in batch.methods: Figure {number} skipped")
        continue
    fig = plotting.plot_batch(cases, method, f"Figure {number}: batch {method.upper()}, {study.title}")
    print(*plotting.save_figure(fig, FIG_DIR, stem), sep="\\n")
    display(fig)'''),
]

NB05 = [
    ("md", "# 05 · Sequential-batch editing — Figures 4 and 5, Table 2\n\n"
           "Regenerates the paper's **Figure 4** (sequential-batch MEMIT), **Figure 5** (sequential-batch "
           "EMMET) and **Table 2** (batch sizes and numbers of batches). Solid lines: each fact scored "
           "right after its own batch (the paper's protocol); dashed: every fact scored on the final "
           "model (retention, beyond the paper). A diagnostics figure shows ‖W − W₀‖/‖W₀‖ and cond(D) "
           "after each batch."),
    ("code", SETUP),
    ("code", study_imports("run_sequential") + "\nfrom editlib.reproduce import load_stored"),
    ("code", '''study = open_study(P, experiments=["sequential"])
cases = run_sequential(study)
batches = load_stored(P, "sequential").batches
display(summarize(cases, by=["method", "batch_size", "eval"], formatted=True))'''),
    ("code", save_tab("plotting.table2(P, batches)", "table2_batches")),
    ("code", '''for method, number, stem in (("memit", 4, "fig4_sequential_memit"), ("emmet", 5, "fig5_sequential_emmet")):
    if method not in P.sequential.methods:
        print(f"{method} not in sequential.methods: Figure {number} skipped")
        continue
    fig = plotting.plot_sequential(cases, method, f"Figure {number}: sequential-batch {method.upper()}, "
                                                  f"{study.title}")
    print(*plotting.save_figure(fig, FIG_DIR, stem), sep="\\n")
    display(fig)'''),
    ("code", '''for method in P.sequential.methods:
    fig = plotting.plot_sequential_diagnostics(batches, method, f"Sequential-batch {method.upper()}: weight drift "
                                               f"and cond(D), {study.title}")
    print(*plotting.save_figure(fig, FIG_DIR, f"fig_sequential_diagnostics_{method}"), sep="\\n")
    display(fig)'''),
    ("code", '''if (cases["eval"] == "final").any():
    ''' + save_tab("plotting.retention_table(cases)", "table_sequential_retention").replace("\n", "\n    ") + '''
else:
    print("sequential.eval_final is off: no retention table")'''),
]

NB06 = [
    ("md", "# 06 · Report\n\n"
           "Every figure and table of the study, regenerated from the stored results only "
           "(`results/<name>/<experiment>/cases.parquet`; no model is loaded, nothing is edited), each "
           "with a caption naming the model, data, sizes and seeds from the run manifests, and Tables 1, "
           "3 and 4 next to the paper's numbers."),
    ("code", SETUP),
    ("code", '''from editlib.protocols import summarize  # a pure function of the stored cases
from editlib.reproduce import caption, load_stored, result_title, stored_experiments

runs = stored_experiments(P)
display(Markdown(f"**Run `{P.name}`** — stored experiments: " + (", ".join(f"`{e}`" for e in runs) or "none")))'''),
    ("md", "## Layer search (Figures 1 and 6)"),
    ("code", '''for exp, stem, number in [(e, "fig1_layer_search", 1) if e == "layer_search" else
                          (e, "fig6_layer_search_second_model", 6) for e in runs if e.startswith("layer_search")]:
    r = load_stored(P, exp)
    fig = plotting.plot_layer_search(r.cases, f"Figure {number}: layer search, {result_title(P, r)}")
    plotting.save_figure(fig, FIG_DIR, stem)
    display(fig, Markdown(caption(P, r, f"Figure {number}: singular edits at every layer")))'''),
    ("md", "## Singular edits (Table 1)"),
    ("code", '''if "singular" in runs:
    r = load_stored(P, "singular")
    t1 = plotting.table1(r.cases)
    plotting.save_table(t1, FIG_DIR, "table1_singular")
    display(Markdown(caption(P, r, "Table 1: singular edits at the chosen layer")), t1)
    cmp1 = plotting.compare_with_paper(t1, plotting.paper_reference_tables()["table1"], on="Algorithm")
    plotting.save_table(cmp1, FIG_DIR, "table1_vs_paper")
    display(Markdown("Table 1 next to the paper's (Llama-3-8B, layer 1, 1k CounterFact facts):"), cmp1)'''),
    ("md", "## λ sweeps (Tables 3 and 4)"),
    ("code", '''if "sweep" in runs:
    r = load_stored(P, "sweep")
    ref = plotting.paper_reference_tables()
    for method, number, key in (("memit", 3, "table3"), ("emmet", 4, "table4")):
        if not (r.cases["method"] == method).any():
            continue
        t = plotting.sweep_table(r.cases, method)
        plotting.save_table(t, FIG_DIR, f"{key}_{method}_lambda")
        fig = plotting.plot_sweep(r.cases, method, f"Table {number} sweep: {method.upper()} λ, {result_title(P, r)}")
        plotting.save_figure(fig, FIG_DIR, f"fig_{key}_{method}_lambda")
        cmp = plotting.compare_with_paper(t, ref[key], on="lam")
        plotting.save_table(cmp, FIG_DIR, f"{key}_vs_paper")
        display(Markdown(caption(P, r, f"Table {number}: {method.upper()} λ sweep")), t, fig,
                Markdown(f"Table {number} next to the paper's (Llama-3-8B, batch 1024):"), cmp)'''),
    ("md", "## Batch editing (Figures 2 and 3)"),
    ("code", '''if "batch" in runs:
    r = load_stored(P, "batch")
    for method, number in (("memit", 2), ("emmet", 3)):
        if (r.cases["method"] == method).any():
            fig = plotting.plot_batch(r.cases, method, f"Figure {number}: batch {method.upper()}, {result_title(P, r)}")
            plotting.save_figure(fig, FIG_DIR, f"fig{number}_batch_{method}")
            display(fig, Markdown(caption(P, r, f"Figure {number}: batch {method.upper()}")))
    summary = summarize(r.cases, by=["method", "batch_size"], formatted=True)
    plotting.save_table(summary, FIG_DIR, "table_batch_summary")
    display(Markdown(caption(P, r, "Batch editing: scores per method and batch size")), summary)'''),
    ("md", "## Sequential-batch editing (Figures 4 and 5, Table 2)"),
    ("code", '''if "sequential" in runs:
    r = load_stored(P, "sequential")
    t2 = plotting.table2(P, r.batches)
    plotting.save_table(t2, FIG_DIR, "table2_batches")
    display(Markdown(caption(P, r, "Table 2: batch sizes and numbers of batches")), t2)
    for method, number in (("memit", 4), ("emmet", 5)):
        if (r.cases["method"] == method).any():
            fig = plotting.plot_sequential(r.cases, method, f"Figure {number}: sequential-batch {method.upper()}, "
                                                            f"{result_title(P, r)}")
            plotting.save_figure(fig, FIG_DIR, f"fig{number}_sequential_{method}")
            display(fig, Markdown(caption(P, r, f"Figure {number}: sequential-batch {method.upper()} (solid: right "
                                                "after its batch; dashed: on the final model)")))
            fig = plotting.plot_sequential_diagnostics(r.batches, method, f"Sequential-batch {method.upper()}: "
                                                       f"weight drift and cond(D), {result_title(P, r)}")
            plotting.save_figure(fig, FIG_DIR, f"fig_sequential_diagnostics_{method}")
            display(fig, Markdown(caption(P, r, f"Diagnostics of sequential-batch {method.upper()}")))
    if (r.cases["eval"] == "final").any():
        ret = plotting.retention_table(r.cases)
        plotting.save_table(ret, FIG_DIR, "table_sequential_retention")
        display(Markdown(caption(P, r, "Retention: scores right after each batch vs on the final model")), ret)'''),
    ("md", "## Failed edits and regularised solves\n\n"
           "Every configuration with a failed edit (no scores: left out of the means) or a solve that "
           "needed jitter, with the first reason; \"none\" when an experiment had neither."),
    ("code", "failures = plotting.failure_table({e: load_stored(P, e).cases for e in runs})\n"
             "plotting.save_table(failures, FIG_DIR, \"table_failures\")\n"
             "display(failures)"),
    ("code", 'print("figures and tables in", FIG_DIR)'),
]

NOTEBOOKS = {
    "01_layer_search": NB01,
    "02_singular_edits": NB02,
    "03_hparam_sweep": NB03,
    "04_batch_editing": NB04,
    "05_sequential_batch_editing": NB05,
    "06_report": NB06,
}


def build(stem: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook: the cells, with the ``parameters`` cell inserted after the title."""
    nb = new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    kinds = [cells[0], ("parameters", PARAMETERS), *cells[1:]]
    for i, (kind, src) in enumerate(kinds):
        if kind == "md":
            cell = new_markdown_cell(src)
        else:
            cell = new_code_cell(src)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        cell.id = f"{stem.split('_')[0]}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(out_dir: Path = HERE) -> list[Path]:
    paths = []
    for stem, cells in NOTEBOOKS.items():
        path = out_dir / f"{stem}.ipynb"
        nbformat.write(build(stem, cells), str(path))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in main():
        print(p)
