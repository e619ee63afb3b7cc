"""The command line's error contract: every bad input is ONE line on stderr naming the culprit and
exit 2, before any model loads; ``--debug`` adds the traceback; a real bug keeps its traceback.

Runs ``editlib.__main__.main`` in-process; loading a model or starting a notebook kernel makes a
test fail (``no_model`` fixture), so each case also proves it failed before either.
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from editlib import __main__ as cli
from editlib.models import load_model as REAL_LOAD_MODEL  # before the fixture patches it
from editlib.records import record_to_dict
from editlib.world import make_world

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "tiny-world"

pytestmark = pytest.mark.skipif(not (TINY / "config.json").is_file(), reason="models/tiny-world is missing")


class ModelLoaded(AssertionError):
    """Raised by the patched loaders: an error case got as far as loading a model."""


@pytest.fixture(autouse=True)
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load or notebook kernel start fails the test; hub access is off."""
    import editlib.models
    import editlib.protocols
    import editlib.reproduce

    def boom(*a, **k):
        raise ModelLoaded("a model was loaded before the error")

    for mod in (editlib.models, editlib.protocols):
        monkeypatch.setattr(mod, "load_model", boom)
    monkeypatch.setattr(editlib.reproduce, "ensure_kernel", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EDITLIB_COUNTERFACT", raising=False)


def fails(capsys, argv: list[str], *culprits: str) -> str:
    """Run the CLI; assert exit 2 and one stderr line without a traceback naming every culprit."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"editlib {argv[0]}: error: "), err
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- inputs


def raw_records(n: int = 4) -> list[dict]:
    return [record_to_dict(r) for r in make_world(n, seed=0)]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture()
def results(tmp_path: Path) -> list[str]:
    """``--set`` overrides that keep every output of a run under tmp_path."""
    return ["--set", f"results_dir={tmp_path / 'results'}", "--set", f"figures_dir={tmp_path / 'figures'}"]


def run_args(results: list[str], *sets: str) -> list[str]:
    """``run singular`` on the committed miniature at layer 1 (no layer search needed)."""
    out = ["run", "singular", "--params", "tiny", "--set", "singular.layer=1", *results]
    for s in sets:
        out += ["--set", s]
    return out


def reproduce_args(tmp_path: Path, results: list[str], *sets: str) -> list[str]:
    out = ["reproduce", "--params", "tiny", "--only", "02", "--runs-dir", str(tmp_path / "runs"),
           "--set", "singular.layer=1", *results]
    for s in sets:
        out += ["--set", s]
    return out


def eval_args(tmp_path: Path, model: Path | str = TINY, records: Path | str = TINY) -> list[str]:
    return ["evaluate", "--model", str(model), "--records", str(records), "--out", str(tmp_path / "e.parquet"),
            "--no-generation"]


@pytest.fixture()
def bad_records(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Broken records files and what their one-line message must name."""
    raws = raw_records()
    out: dict[str, tuple[Path, tuple[str, ...]]] = {}
    good = json.dumps(raws).encode()
    trunc = tmp_path / "trunc.json.gz"
    trunc.write_bytes(gzip.compress(good)[: len(gzip.compress(good)) // 2])
    out["truncated_gz"] = (trunc, (str(trunc),))
    r = json.loads(json.dumps(raws))
    del r[1]["requested_rewrite"]["target_new"]
    out["no_target_new"] = (write_json(tmp_path / "no_target_new.json", r),
                            (f"case_id={raws[1]['case_id']}", "target_new"))
    r = json.loads(json.dumps(raws))
    del r[2]["paraphrase_prompts"]
    out["no_paraphrases"] = (write_json(tmp_path / "no_para.json", r),
                             (f"case_id={raws[2]['case_id']}", "paraphrase_prompts"))
    r = json.loads(json.dumps(raws))
    r[0]["requested_rewrite"]["prompt"] = "a prompt without a slot"
    out["prompt_without_slot"] = (write_json(tmp_path / "no_slot.json", r),
                                  (f"case_id={raws[0]['case_id']}", "requested_rewrite.prompt", "{}"))
    r = json.loads(json.dumps(raws))
    r[3]["case_id"] = r[0]["case_id"]
    out["duplicate_case_id"] = (write_json(tmp_path / "dup.json", r), (f"case_id={raws[0]['case_id']}", "duplicated"))
    out["empty"] = (write_json(tmp_path / "empty.json", []), ("empty.json", "no records"))
    out["not_json"] = (tmp_path / "bad.json", ("bad.json", "not valid JSON"))
    out["not_json"][0].write_text("[{")
    return out


RECORD_CASES = ("truncated_gz", "no_target_new", "no_paraphrases", "prompt_without_slot", "duplicate_case_id",
                "empty", "not_json")


# --------------------------------------------------------------------------- params (run, reproduce)

PARAMS_CASES = {
    "yaml_syntax": ("batch.batch_sizes=[4,", ("batch.batch_sizes", "not valid YAML")),
    "not_an_int": ("singular.n_facts=abc", ("singular.n_facts", "integer", "'abc'")),
    "zero_facts": ("singular.n_facts=0", ("singular.n_facts", "at least 1")),
    "zero_total": ("batch.total=0", ("batch.total", "at least 1")),
    "zero_gen_batch": ("evaluation.gen_batch_size=0", ("evaluation.gen_batch_size", "at least 1")),
    "zero_kv_budget": ("evaluation.gen_kv_gb=0", ("evaluation.gen_kv_gb", "positive")),
    "infinite_kv_budget": ("evaluation.gen_kv_gb=.inf", ("evaluation.gen_kv_gb", "positive")),
    "negative_share_below": ("evaluation.share_below_gb=-1", ("evaluation.share_below_gb", ">= 0")),
    "text_share_below": ("evaluation.share_below_gb=lots", ("evaluation.share_below_gb",)),
    "negative_share_values": ("evaluation.share_values_gb=-1", ("evaluation.share_values_gb", ">= 0")),
    "float_batch": ("batch.batch_sizes=[4, 2.5]", ("batch.batch_sizes", "list of integers")),
    "lambda_as_text": ("sweep.emmet_lambdas=[1e-3]", ("sweep.emmet_lambdas", "1.0e-3")),
    "bad_layer": ("singular.layer=-2", ("singular.layer", "[-2]")),
    "unknown_key": ("singular.n_fact=3", ("singular", "n_fact")),
    "unknown_section": ("singulr.n_facts=3", ("singulr",)),
    "bool_as_number": ("evaluation.batch_size=true", ("evaluation.batch_size",)),
    "no_orderings": ("data.orderings=[]", ("data.orderings", "empty")),
    "bad_corpus": ("covariance.n_samples=0", ("covariance", "n_samples")),
    "bad_tiny_spec": ("second_model.tiny.n_records=lots", ("second_model.tiny.n_records",)),
    "too_many_facts": ("singular.n_facts=100000", ("singular needs 100000 facts", "tiny-world")),
    "hparam_not_a_number": ("hparams.common.v_lr=fast", ("v_lr", "fast")),
    "bad_dtype": ("model.dtype=bf16", ("model.dtype", "bf16", "bfloat16")),
    "bad_second_dtype": ("second_model.dtype=half", ("second_model.dtype", "half")),
    "bad_device": ("model.device=cpux", ("model.device", "cpux")),
    "bad_templates": ("hparams.common.context_templates=foo", ("context_templates", "foo")),
    "same_alignment_twice": ("evaluation.also_alignment=correct", ("evaluation.also_alignment", "correct")),
    "bad_context_text": ("batch.hparams.memit.context_text=raw", ("batch.hparams.memit", "context_text", "raw")),
    "repeated_ordering": ("data.orderings=[0, 0]", ("data.orderings", "distinct")),
    "failed_fraction": ("evaluation.max_failed_fraction=-1", ("evaluation.max_failed_fraction", "-1")),
    "name_with_slash": ("name=a/b", ("name", "a/b")),
    "layer_past_depth": ("singular.layer=6", ("singular", "[6]", "0..5")),
    "missing_text_file": ("covariance={kind: text_file, path: /nope/c0.txt}", ("covariance.path", "/nope/c0.txt", "not a file")),
}


@pytest.mark.parametrize("case", sorted(PARAMS_CASES))
def test_run_params_errors(capsys, results, case) -> None:
    override, culprits = PARAMS_CASES[case]
    fails(capsys, run_args(results, override), *culprits)


def test_depth_from_the_build_spec_and_windows_before_loading(capsys, results) -> None:
    """A layer past a miniature's build spec fails before it is trained; a window of layers past the
    model's last layer before it loads (and before a results folder exists)."""
    fails(capsys, run_args(results, "model.tiny={n_layers: 2}", "singular.layer=3"), "singular", "[3]", "0..1")
    argv = ["run", "batch", "--params", "tiny", *results, "--set", "batch.layer=5", "--set", "batch.windows=[1, 2]"]
    fails(capsys, argv, "batch.windows [2]", "layer 5", "last layer 5")
    assert not any(Path(results[1].split("=", 1)[1]).glob("*/batch"))


@pytest.mark.parametrize("case", ["yaml_syntax", "not_an_int", "zero_facts"])
def test_reproduce_params_errors(capsys, tmp_path, results, case) -> None:
    override, culprits = PARAMS_CASES[case]
    fails(capsys, reproduce_args(tmp_path, results, override), *culprits)
    assert not (tmp_path / "runs").exists()


def test_a_layer_past_the_second_models_depth_fails_before_the_main_search(capsys, tmp_path, results) -> None:
    """Notebook 01 searches the main model's layers, then the second model's (Figure 6, 4 layers
    in tiny.yaml): layer 5 is checked against both before either loads."""
    argv = ["reproduce", "--params", "tiny", "--only", "01", "--runs-dir", str(tmp_path / "runs"), *results,
            "--set", "layer_search.layers=[0, 5]"]
    fails(capsys, argv, "second_model", "layer(s) [5]", "0..3")
    assert not (tmp_path / "runs").exists()


def test_override_without_equals_and_missing_params_file(capsys, results) -> None:
    fails(capsys, run_args(results, "singular.n_facts"), "singular.n_facts", "key.sub=value")
    fails(capsys, ["run", "singular", "--params", "no-such-params", *results], "no-such-params")


@pytest.mark.parametrize("case", RECORD_CASES)
def test_run_bad_records(capsys, results, bad_records, case) -> None:
    path, culprits = bad_records[case]
    fails(capsys, run_args(results, "data.source=counterfact", f"data.counterfact_path={path}"), str(path),
          *culprits)


@pytest.mark.parametrize("case", ["truncated_gz", "duplicate_case_id", "empty"])
def test_reproduce_bad_records(capsys, tmp_path, results, bad_records, case) -> None:
    path, culprits = bad_records[case]
    fails(capsys, reproduce_args(tmp_path, results, "data.source=counterfact", f"data.counterfact_path={path}"),
          str(path), *culprits)


# --------------------------------------------------------------------------- records (evaluate, tiny-*)


@pytest.mark.parametrize("case", RECORD_CASES)
def test_evaluate_bad_records(capsys, tmp_path, bad_records, case) -> None:
    path, culprits = bad_records[case]
    fails(capsys, eval_args(tmp_path, records=path), str(path), *culprits)
    assert not (tmp_path / "e.parquet").exists()


def test_evaluate_empty_records_is_an_error(capsys, tmp_path, bad_records) -> None:
    """Empty records exit 2 before the model loads (never exit 0 with NaN scores)."""
    fails(capsys, eval_args(tmp_path, records=bad_records["empty"][0]), "no records")
    fails(capsys, eval_args(tmp_path) + ["--n", "0"], "--n", "at least 1")


def test_evaluate_more_facts_than_records(capsys, tmp_path, bad_records) -> None:
    good = write_json(tmp_path / "good.json", raw_records())
    fails(capsys, eval_args(tmp_path, records=good) + ["--n", "50"], "asked for 50 facts", "only 4")


def test_records_file_and_folder_missing(capsys, tmp_path) -> None:
    fails(capsys, eval_args(tmp_path, records=tmp_path / "missing.json"), "missing.json")
    fails(capsys, eval_args(tmp_path, records=tmp_path), str(tmp_path), "not an editlib miniature")
    fails(capsys, run_args(["--set", f"results_dir={tmp_path}"], "data.source=counterfact",
                           f"data.counterfact_path={tmp_path / 'missing.json'}"), "missing.json")
    fails(capsys, reproduce_args(tmp_path, [], "data.source=counterfact",
                                 f"data.counterfact_path={tmp_path / 'missing.json'}"), "missing.json")


def test_evaluate_bad_flags(capsys, tmp_path) -> None:
    fails(capsys, eval_args(tmp_path) + ["--dtype", "float64"], "--dtype", "float64")
    fails(capsys, eval_args(tmp_path) + ["--batch-size", "0"], "--batch-size")
    fails(capsys, eval_args(tmp_path) + ["--gen-kv-gb", "0"], "--gen-kv-gb", "positive")
    assert not (tmp_path / "e.parquet").exists()
    if not __import__("torch").cuda.is_available():
        fails(capsys, eval_args(tmp_path) + ["--device", "cuda"], "--device cuda")


def test_rs_dir_missing(capsys, tmp_path) -> None:
    fails(capsys, eval_args(tmp_path) + ["--rs-dir", str(tmp_path / "rs")], "--rs-dir", "attribute_snippets.json")


def test_tiny_commands(capsys, tmp_path, bad_records) -> None:
    fails(capsys, ["tiny-train", "--out", str(tmp_path / "m")], "--world", "--counterfact")
    fails(capsys, ["tiny-train", "--world", "0", "--out", str(tmp_path / "m")], "--world", "at least 1")
    fails(capsys, ["tiny-train", "--world", "5", "--layers", "0", "--out", str(tmp_path / "m")], "--layers")
    fails(capsys, ["tiny-train", "--world", "5", "--hidden", "30", "--out", str(tmp_path / "m")], "--hidden 30",
          "--heads 4")
    fails(capsys, ["tiny-train", "--world", "5", "--lr", "0", "--out", str(tmp_path / "m")], "--lr")
    fails(capsys, ["tiny-train", "--counterfact", "--n", "3", "--counterfact-path", str(bad_records["empty"][0]),
                   "--out", str(tmp_path / "m")], "empty.json", "no records")
    fails(capsys, ["tiny-check", str(tmp_path / "nope")], "nope", "does not exist")
    model = copy_model(tmp_path / "m2")
    (model / "records.json").write_text("[]")
    fails(capsys, ["tiny-check", str(model)], "records.json", "no records")
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- model files


def copy_model(dest: Path) -> Path:
    shutil.copytree(TINY, dest)
    return dest


@pytest.fixture()
def broken_models(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    trunc = copy_model(tmp_path / "truncated")
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    no_cfg = copy_model(tmp_path / "no-config")
    (no_cfg / "config.json").unlink()
    bad_cfg = copy_model(tmp_path / "bad-config")
    (bad_cfg / "config.json").write_text("{")
    return {"truncated_weights": (trunc, (str(w), "truncated")),
            "no_config": (no_cfg, (str(no_cfg), "config.json")),
            "bad_config": (bad_cfg, (str(bad_cfg / "config.json"),)),
            "missing_dir": (tmp_path / "no-such-model", (str(tmp_path / "no-such-model"), "does not exist"))}


MODEL_CASES = ("truncated_weights", "no_config", "bad_config", "missing_dir")


@pytest.mark.parametrize("case", MODEL_CASES)
def test_evaluate_bad_model(capsys, tmp_path, broken_models, case) -> None:
    path, culprits = broken_models[case]
    fails(capsys, eval_args(tmp_path, model=path), *culprits)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_run_and_reproduce_bad_model(capsys, tmp_path, results, broken_models, case) -> None:
    path, culprits = broken_models[case]
    fails(capsys, run_args(results, f"model.id={path}"), "model.id", *culprits)
    fails(capsys, reproduce_args(tmp_path, results, f"model.id={path}"), "model.id", *culprits)


def test_load_model_names_the_truncated_file(broken_models) -> None:
    """The loader itself (notebooks call it directly) names the file too."""
    from editlib.models import ModelLoadError

    path, culprits = broken_models["truncated_weights"]
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        REAL_LOAD_MODEL(str(path))


# --------------------------------------------------------------------------- --debug, bugs, exit codes


def test_debug_shows_the_traceback(capsys, results) -> None:
    rc = cli.main(["--debug", *run_args(results, "singular.n_facts=abc")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err and "ParamsError" in err
    assert err.strip().splitlines()[-1].startswith("editlib run: error: singular.n_facts")
    rc = cli.main([*run_args(results, "singular.n_facts=abc"), "--debug"])  # after the command too
    assert rc == 2 and "Traceback" in capsys.readouterr().err


def test_a_bug_is_not_hidden(monkeypatch, results) -> None:
    """An unexpected exception keeps its traceback (Python then exits 1)."""
    import editlib.preflight

    def bug(*a, **k):
        raise ZeroDivisionError("a real bug")

    monkeypatch.setattr(editlib.preflight, "check_study", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(run_args(results))


def test_notebook_failure_exit_codes() -> None:
    from editlib.reproduce import ReproduceError

    assert cli._exit_code(ReproduceError("nb 02 failed", ename="ParamsError")) == 2
    assert cli._exit_code(ReproduceError("nb 02 failed", ename="ExperimentLocked")) == 2
    assert cli._exit_code(ReproduceError("nb 02 failed", ename="ZeroDivisionError")) == 1
    assert cli._exit_code(ReproduceError("no notebooks")) == 2


# --------------------------------------------------------------------------- failed edits: exit 1


def fake_cases(failed: list[bool] | None) -> pd.DataFrame:
    df = pd.DataFrame({"case_id": [1, 2, 3, 1], "method": ["memit"] * 4, "eval": ["current"] * 3 + ["final"],
                       "batch_size": [1] * 4})
    if failed is not None:
        df["failed"] = failed
        df["fail_reason"] = [("value optimisation diverged" if f else None) for f in failed]
    return df


@pytest.mark.parametrize("failed, rc", [(None, 0), ([False] * 4, 0), ([True, False, False, True], 1)])
def test_run_exits_1_when_an_edit_failed(capsys, monkeypatch, results, failed, rc) -> None:
    import editlib.protocols as protocols

    class Study:
        label = "fake"

    monkeypatch.setattr(protocols, "open_study", lambda *a, **k: Study())
    monkeypatch.setitem(protocols.RUNNERS, "singular", lambda study: fake_cases(failed))
    monkeypatch.setattr(protocols, "summarize", lambda cases, formatted=True: pd.DataFrame({"n": [len(cases)]}))
    assert cli.main(run_args(results)) == rc
    out, err = capsys.readouterr()
    if rc:
        # case 1 failed in its "current" and "final" rows: one failed edit, not two
        assert "singular: 1 failed edit(s): case_id=1 (method=memit, batch_size=1): value optimisation diverged" in out
        assert "failed edits in singular (1)" in err
    else:
        assert "singular: 0 failed edits" in out and err == ""


# --------------------------------------------------------------------------- clean


def make_experiment(root: Path, name: str, complete: bool) -> Path:
    from editlib.store import Experiment

    exp = Experiment.open(root, "r", name, {"x": name})
    exp.save_unit("u0", pd.DataFrame({"case_id": [1]}))
    if complete:
        exp.finish()
    else:
        exp.close()
    return root / "r" / name


def test_clean_removes_incomplete_only(capsys, tmp_path) -> None:
    done = make_experiment(tmp_path, "singular", complete=True)
    crashed = make_experiment(tmp_path, "batch", complete=False)
    assert cli.main(["clean", "r", "--results-dir", str(tmp_path), "--dry-run"]) == 0
    assert crashed.is_dir() and "would be removed" in capsys.readouterr().out
    assert cli.main(["clean", "r", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert not crashed.exists() and done.is_dir()
    assert f"removed {crashed}: incomplete" in out and f"kept {done}" in out
    assert cli.main(["clean", "r", "--results-dir", str(tmp_path), "--experiment", "singular",
                     "--include-complete"]) == 0
    assert not done.exists()
    fails(capsys, ["clean", "r", "--results-dir", str(tmp_path), "--experiment", "sweep"], "sweep")
    fails(capsys, ["clean", "nope", "--results-dir", str(tmp_path)], str(tmp_path / "nope"))


def test_too_many_failures_is_one_line_and_exit_1(capsys, monkeypatch, results) -> None:
    import editlib.protocols as protocols
    from editlib.protocols import TooManyFailures as stop

    def runner(study):
        raise stop("singular memit: 5 of 16 edits failed (> evaluation.max_failed_fraction 0.25)")

    monkeypatch.setattr(protocols, "open_study", lambda *a, **k: type("S", (), {"label": "fake"})())
    monkeypatch.setitem(protocols.RUNNERS, "singular", runner)
    assert cli.main(run_args(results)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["editlib run: stopped: singular memit: 5 of 16 edits failed (> evaluation.max_failed_fraction 0.25)"]


def test_reproduce_checks_the_beyond_layer_before_any_notebook(capsys, tmp_path, results) -> None:
    """Notebook 07's own layer (beyond.layer) past the model's depth fails before a kernel starts,
    naming beyond.layer."""
    argv = ["reproduce", "--params", "tiny", "--only", "07", "--runs-dir", str(tmp_path / "runs"),
            "--set", "beyond.layer=9", *results]
    fails(capsys, argv, "beyond.layer 9", "[9]", "0..5")
    assert not (tmp_path / "runs").exists()


def test_the_depth_of_a_hub_model_comes_from_its_config_alone(tmp_path) -> None:
    """The pre-load checks' config reader (for a hub model: its cached config.json, read through
    AutoConfig; here a local folder): the config as a dict, or None when it cannot be read (the
    loader then says why)."""
    from types import SimpleNamespace

    from editlib import protocols

    mp = SimpleNamespace(id=str(TINY), tiny=None, trust_remote_code=False)
    assert protocols._model_config(mp)["num_hidden_layers"] == 6
    assert protocols._model_config(SimpleNamespace(id=str(tmp_path), tiny=None, trust_remote_code=False)) is None


def test_a_hub_model_the_hub_refuses_fails_before_loading(monkeypatch) -> None:
    """Online, a hub id whose config the hub refuses (a gated model whose licence the token has not
    accepted, as Llama-2's and Llama-3's are gated apart; an unknown id) fails in the pre-load
    checks naming the section, not when its weights load: for Figure 6's second model that is
    after the main model's whole layer search."""
    from types import SimpleNamespace

    import transformers

    from editlib import models, protocols
    from editlib.params import ParamsError

    def refused(*a, **k):
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it at "
                      "https://huggingface.co/meta-llama/Llama-2-7b-hf.\n401 Client Error.")

    monkeypatch.setattr(models, "_offline", lambda *a: False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refused)
    mp = SimpleNamespace(id="meta-llama/Llama-2-7b-hf", tiny=None, trust_remote_code=False)
    with pytest.raises(ParamsError, match=r"second_model.id 'meta-llama/Llama-2-7b-hf' cannot be read .*gated repo"):
        protocols._model_config(mp, "second_model")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: 1 / 0)
    assert protocols._model_config(mp, "second_model") is None  # unreadable otherwise: the loader says why


def _copy_with_config(tmp_path: Path, name: str, **changes) -> Path:
    """models/tiny-world linked file by file into ``tmp_path/name``, its config.json changed."""
    out = tmp_path / name
    out.mkdir()
    for f in TINY.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    cfg = json.loads((TINY / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **changes}))
    return out


def test_an_unsupported_architecture_is_named_before_any_model_loads(capsys, tmp_path, results) -> None:
    """editlib has module maps for llama, mistral, qwen2, gpt2 and gptj: another model_type fails
    in the pre-load checks naming the section and folder, for the second model too (before the
    main model's whole layer search)."""
    gemma = _copy_with_config(tmp_path, "gemma", model_type="gemma")
    fails(capsys, run_args(results, f"model.id={gemma}"), "model.id", str(gemma), "'gemma'", "supported: ")
    argv = ["reproduce", "--params", "tiny", "--only", "01", "--runs-dir", str(tmp_path / "runs"), *results,
            "--set", f"second_model.id={gemma}", "--set", "second_model.tiny=null"]
    fails(capsys, argv, "second_model", "'gemma'")
    assert not (tmp_path / "runs").exists()


def test_compiled_value_steps_on_a_model_without_llama_blocks_fail_before_loading(capsys, tmp_path, results) -> None:
    """compile_blocks (and capture_steps) run the packed forward of Llama-style blocks: a model
    whose config names other blocks (here GPT-2's) is refused before it loads, not at its first
    value step after C0."""
    gpt2 = _copy_with_config(tmp_path, "gpt2", model_type="gpt2")
    fails(capsys, run_args(results, f"model.id={gpt2}", "hparams.common.compile_blocks=default"),
          "hparams compile_blocks: default runs the packed forward", str(gpt2), "(gpt2)")


def test_messages_name_the_key_the_user_wrote(capsys, tmp_path, results) -> None:
    """A bad value in hparams.common is named there (not under the first method it was merged
    into); a missing data.counterfact_path is named by its key; a model folder that is no
    miniature under the inherited data.source: model says which key to change."""
    fails(capsys, run_args(results, "hparams.common.v_lr=fast"), "hparams.common:", "v_lr")
    fails(capsys, run_args(results, "hparams.memit.v_lr=fast"), "hparams.memit:", "v_lr")
    fails(capsys, run_args(results, "data.source=counterfact", f"data.counterfact_path={tmp_path / 'none.json'}"),
          "data.counterfact_path", "none.json")
    plain = _copy_with_config(tmp_path, "plain")
    for f in ("records.json", "editlib_tiny.json"):
        (plain / f).unlink()
    fails(capsys, run_args(results, f"model.id={plain}"), "data.source is 'model'", str(plain), "data.source: counterfact")


def test_a_c0_length_past_the_models_positions_is_refused(capsys, tmp_path, results) -> None:
    """GPT-2's learned positions end at n_positions (an IndexError deep in C0 collection); a RoPE
    model would be read at positions it never saw."""
    npos = json.loads((TINY / "config.json").read_text())["max_position_embeddings"]
    fails(capsys, run_args(results, f"covariance.max_length={npos + 1}"),
          f"covariance.max_length {npos + 1}", f"{npos} positions")


def test_a_bad_progress_mode_is_one_line_before_anything_runs(capsys, results, monkeypatch) -> None:
    monkeypatch.setenv("EDITLIB_PROGRESS", "quiet")
    fails(capsys, run_args(results), "EDITLIB_PROGRESS", "quiet", "lines")


def test_layers_and_method_are_not_hyperparameters(capsys, results) -> None:
    """hparams.<method>.layers / .method would be overridden by the experiment sections: refused, named."""
    fails(capsys, run_args(results, "hparams.memit.layers=[3]"), "hparams.memit", "layers", "experiment sections")
    fails(capsys, run_args(results, "batch.hparams={emmet: {method: rome}}"), "batch.hparams.emmet", "method")


@pytest.mark.parametrize("argv", [["--help"], ["tiny-train", "--help"], ["run", "--help"]])
def test_help_does_not_import_torch(argv: list[str]) -> None:
    """``--help`` answers at once: the parser (TinyConfig's defaults included) needs no torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom editlib import __main__ as m\n"
            f"try:\n    m.main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "usage:" in out.stdout and out.stdout.strip().endswith("False"), out.stdout + out.stderr


def test_reproduce_refuses_a_thread_count_below_one_before_any_notebook(capsys, tmp_path, results) -> None:
    argv = reproduce_args(tmp_path, results) + ["--threads", "0"]
    fails(capsys, argv, "threads: must be at least 1, got 0")
    assert not (tmp_path / "runs").exists()
