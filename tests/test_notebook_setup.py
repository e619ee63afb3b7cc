"""editlib.notebook.setup: what papermill injects into a notebook's parameters becomes the study's
params, or one clear ParamsError (a whole params file given with -f, a misspelt section, a
section that is not a mapping)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from editlib.notebook import injected_names, setup
from editlib.params import SECTIONS, ParamsError, resolve
from editlib.paths import REPO_ROOT

TINY = str(REPO_ROOT / "params" / "tiny.yaml")


def cell_defaults() -> dict:
    """The namespace a notebook's parameters cell leaves: every section ``...`` (as in the file)."""
    return {"params_file": TINY, "overrides": {}, **{k: ... for k in SECTIONS}}


def test_defaults_are_the_params_file(capsys) -> None:
    p, fig_dir = setup(cell_defaults())
    assert p == resolve(TINY) and fig_dir == Path(p.figures_dir) / "tiny"
    assert "params: params/tiny.yaml" in capsys.readouterr().out


def test_an_injected_null_replaces_the_section_and_a_mapping_merges() -> None:
    p, _ = setup({**cell_defaults(), "second_model": None, "batch": {"total": 256}})
    assert p.second_model is None  # papermill -y 'second_model: null': Figure 6 off
    assert p.batch.total == 256 and p.batch.batch_sizes == resolve(TINY).batch.batch_sizes
    assert resolve(TINY).second_model is not None


def test_a_whole_params_file_given_with_f_is_refused() -> None:
    """papermill -f params/smoke.yaml injects its `extends`, which no notebook takes: the base
    would silently stay params_file (tiny.yaml's sizes under smoke's name)."""
    with pytest.raises(ParamsError, match=r"'extends'.*-p params_file FILE.yaml"):
        setup({**cell_defaults(), "extends": "tiny.yaml", "name": "smoke"})


def test_a_name_papermill_injected_that_the_notebook_does_not_take_is_named() -> None:
    """papermill injects any name it is given (-y '{bacth: ...}') and only warns on its own stderr:
    the names of its injected ``# Parameters`` cell are checked; the user's own variables, however
    close to a section name, are not."""
    injected = "# Parameters\nbacth = {'total': 4}\nname = 'x'\n"
    with pytest.raises(ParamsError, match=r"papermill gave 'bacth' \(params section 'batch'\?\), which this notebook"):
        setup({**cell_defaults(), "In": ["", "import x", injected], "bacth": {"total": 4}, "name": "x"})
    mine = {"models": ["memit", "emmet"], "params": {"a": 1}, "names": ["a"], "result_dir": "r", "P": None}
    setup({**cell_defaults(), "In": ["", "models = ['memit']"], **mine})  # no injection: nothing checked
    assert injected_names({"In": ["", injected, "x = 1"]}) == ["bacth", "name"]


def test_a_section_set_to_none_is_refused_but_second_model() -> None:
    """None would replace the section with the built-in defaults, in no params file (batch: 256
    facts at B = 16, 64, 256 under this run's name); only second_model's null means something."""
    with pytest.raises(ParamsError, match=r"\['batch'\] are None: a section is \.\.\. \(as in the params file\)"):
        setup({**cell_defaults(), "batch": None})
    old_cell = {**cell_defaults(), **{k: None for k in SECTIONS}}  # a notebook saved before `...`
    with pytest.raises(ParamsError, match="are None"):
        setup(old_cell)


def test_a_section_given_as_text_is_read_as_yaml() -> None:
    """papermill -p batch '{total: 256}' passes the text."""
    p, _ = setup({**cell_defaults(), "batch": "{total: 256}"})
    assert p.batch.total == 256


@pytest.mark.parametrize("text", ['{"batch.total": 256}', "batch.total=256", "[batch.total=256]"])
def test_overrides_given_as_text(text) -> None:
    """papermill -p passes a mapping or list as its text."""
    p, _ = setup({**cell_defaults(), "overrides": text})
    assert p.batch.total == 256


def test_a_section_that_is_not_a_mapping_fails_with_its_name(tmp_path) -> None:
    with pytest.raises(ParamsError, match=r"params section 'batch' must be a mapping of keys \(or null\), got int 5"):
        setup({**cell_defaults(), "batch": 5})
    f = tmp_path / "bad.yaml"
    f.write_text("extends: " + TINY + "\nhparams: 3\n")
    with pytest.raises(ParamsError, match="'hparams' must be a mapping"):
        resolve(f)
    with pytest.raises(ParamsError, match="overrides must be a mapping"):
        setup({**cell_defaults(), "overrides": 5})


@pytest.mark.slow
def test_papermill_injections_reach_setup(tmp_path) -> None:
    """The real path: notebook 04's own parameters cell and a setup cell under papermill, with -y
    and with a whole params file as -f (refused, naming the fix)."""
    import papermill as pm

    nb = json.loads((REPO_ROOT / "notebooks" / "04_batch_editing.ipynb").read_text())
    params_cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    probe = {**nb, "cells": [params_cell, {
        "cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "id": "probe",
        "source": "import editlib.notebook\nP, FIG_DIR = editlib.notebook.setup(globals())\n"
                  "print('RESOLVED', P.name, P.second_model, P.batch.total)"}]}
    src = tmp_path / "probe.ipynb"
    src.write_text(json.dumps(probe))
    kw = dict(cwd=str(REPO_ROOT / "notebooks"), kernel_name="python3", progress_bar=False)
    out = pm.execute_notebook(str(src), str(tmp_path / "a.ipynb"),
                              parameters={"second_model": None, "batch": {"total": 256}}, **kw)
    text = "".join("".join(o.get("text", "")) for c in out["cells"] for o in c.get("outputs", []))
    assert "RESOLVED tiny None 256" in text
    smoke = __import__("yaml").safe_load((REPO_ROOT / "params" / "smoke.yaml").read_text())
    with pytest.raises(pm.PapermillExecutionError, match="params_file"):
        pm.execute_notebook(str(src), str(tmp_path / "b.ipynb"), parameters=smoke, **kw)
    with pytest.raises(pm.PapermillExecutionError, match="papermill gave 'bacth'"):
        pm.execute_notebook(str(src), str(tmp_path / "c.ipynb"), parameters={"bacth": {"total": 4}}, **kw)


@pytest.mark.slow
def test_reproduce_kernels_do_not_print_their_transport_warning(tmp_path, capfd) -> None:
    """ipykernel warns on every start that its local TCP sockets are unencrypted; `reproduce`
    printed that before each notebook, where it read as an error."""
    import nbformat

    from editlib.reproduce import run_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import warnings\nwarnings.warn('the cell keeps its own warnings')")]
    src = tmp_path / "w.ipynb"
    nbformat.write(nb, src)
    run_notebook(src, tmp_path / "out.ipynb", {}, "python3")
    assert "without encryption" not in capfd.readouterr().err
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert "the cell keeps its own warnings" in out.cells[0].outputs[0]["text"]


def test_notebook_01_refuses_a_bad_second_model_before_the_main_one_loads(tmp_path) -> None:
    """Figure 6's model is checked in the cell before open_study: an unsupported architecture
    fails there, naming second_model, and the main model's layer search never starts."""
    import papermill as pm

    tiny = REPO_ROOT / "models" / "tiny-world"
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    for f in tiny.iterdir():
        if f.name != "config.json":
            (gemma / f.name).symlink_to(f)
    (gemma / "config.json").write_text(json.dumps({**json.loads((tiny / "config.json").read_text()),
                                                   "model_type": "gemma"}))
    out = tmp_path / "01.ipynb"
    with pytest.raises(pm.PapermillExecutionError, match="second_model.*'gemma'"):
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / "01_layer_search.ipynb"), str(out),
                            parameters={"second_model": {"id": str(gemma), "tiny": None},
                                        "overrides": {"results_dir": str(tmp_path / "results"),
                                                      "figures_dir": str(tmp_path / "figures")}},
                            cwd=str(REPO_ROOT / "notebooks"), kernel_name="python3", progress_bar=False)
    cells = [c for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code"]
    status = [c["metadata"]["papermill"]["status"] for c in cells]
    failed = "".join(cells[status.index("failed")]["source"])
    assert failed.index("check_second_model(P)") < failed.index("study = open_study(")
    assert set(status[status.index("failed") + 1:]) == {"pending"}  # no cell ran after it
    assert not (tmp_path / "results").exists()
