"""editlib.degradation: held-out known facts and perplexity of a sequentially edited model."""
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from editlib import degradation, plotting, protocols
from editlib.params import ParamsError, resolve

from _fixtures import assert_unedited, quiet, use
from test_editors import SMOKE, study, weights0  # noqa: F401  (the module's fixtures)


def params_for(tmp_path, name="d", **over):
    base = {"hparams.common.v_num_grad_steps": 3, "sequential.total": 4, "sequential.batch_sizes": [1, 2],
            "sequential.layer": 1, "sequential.methods": ["memit"], "sequential.degradation_every": 2,
            "sequential.heldout_facts": 6, "results_dir": str(tmp_path), "name": name}
    return resolve(SMOKE, overrides={**base, **over})


def test_heldout_facts_are_disjoint_from_edited_and_neighbourhood_sets(study):
    """Each exclusion rule leaves out a record that breaks only it; the rest keep their order."""
    edited = study.facts(8)
    clean = study.facts(40)[8:]
    breaking = {
        "an edited fact's case_id": replace(clean[2], case_id=edited[0].case_id),
        "an edited fact's subject": replace(clean[0], case_id=10**6, subject=edited[1].subject),
        "an edited fact's neighbourhood prompt": replace(clean[1], case_id=10**6 + 1, prompt=" {}",
                                                         subject=edited[2].neighborhood_prompts[0]),
    }
    for why, r in breaking.items():
        assert degradation.heldout_facts([r], edited, 1) == [], why
    assert degradation.heldout_facts(clean[:1], edited, 1) == clean[:1]  # clean[0]'s own subject is fine
    pool = [clean[0], *breaking.values(), *clean[1:]]
    assert degradation.heldout_facts(pool, edited, 10) == clean[:10]


def test_perplexity_equals_a_plain_computation(study):
    texts = degradation.sentences(study.facts(5))
    got = degradation.perplexity(study.model, study.tok, texts, batch_size=2)
    nll, n = 0.0, 0
    for t in texts:  # one text at a time, no padding
        ids = torch.tensor([study.tok(t, add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(study.model(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert math.isclose(got, math.exp(nll / n), rel_tol=1e-5)
    assert 1.0 < got < 50.0  # the miniature knows its own fact text


def test_sequential_run_records_degradation(study, weights0, tmp_path, monkeypatch):  # noqa: F811
    p = params_for(tmp_path)
    calls = []
    measure = protocols._degradation
    monkeypatch.setattr(protocols, "_degradation", lambda *a: calls.append(1) or measure(*a))
    protocols.run_sequential(use(study, p), log=quiet)
    b = pd.read_parquet(tmp_path / "d" / "sequential" / "batches.parquet").sort_values(["batch_size", "batch_index"])
    # every 2 facts and at the end: B = 1 after batches 1, 3; B = 2 after batches 0, 1
    measured = b[b.heldout_known.notna()]
    assert [(int(r.batch_size), int(r.batch_index)) for r in measured.itertuples()] == [(1, 1), (1, 3), (2, 0), (2, 1)]
    assert measured.heldout_known_0.nunique() == 1 and measured.heldout_ppl_0.nunique() == 1
    # the unedited model measured once for both configurations (same held-out facts), then 4 times edited
    assert len(calls) == 1 + 4
    heldout = protocols._heldout(study, p.sequential, study.facts(4), 0)
    ref = degradation.measure(study.model, study.tok, heldout,  # the unedited model (the session restored it)
                              lambda rs: protocols.evaluate_records(study.model, study.tok, rs, generation=False,
                                                                    families=("rewrite",)))
    for k in degradation.KEYS:  # the same call on the same model: the same bits
        assert ref[k] == float(measured[f"{k}_0"].iloc[0]), k
    assert len(heldout) == 6 and (measured.heldout_n == 6).all() and "heldout_n_0" not in b  # stored once per row
    full = degradation.measure(study.model, study.tok, heldout,  # every prompt family scored: rounding apart
                               lambda rs: protocols.evaluate_records(study.model, study.tok, rs, generation=False))
    assert full["heldout_known"] == ref["heldout_known"]
    assert math.isclose(full["heldout_margin"], ref["heldout_margin"], rel_tol=1e-5, abs_tol=1e-6)
    assert (measured.heldout_ppl != measured.heldout_ppl_0).all()  # the edits moved it
    assert_unedited(study.model, weights0)
    fig = plotting.plot_degradation(b, ["memit"], "t")
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) == 2 + 2  # two batch sizes + the unedited line and point


def test_fewer_heldout_facts_than_asked_are_stored_and_logged(study, weights0, tmp_path):  # noqa: F811
    """When the records after the edited facts hold fewer held-out facts than
    ``sequential.heldout_facts`` asks for, degradation is measured on those there are, and every
    measurement says how many (``heldout_n``) in batches.parquet as well as in the log."""
    n = len(study.records)
    p = params_for(tmp_path, **{"sequential.batch_sizes": [2], "sequential.heldout_facts": 10 * n})
    lines = []
    s = replace(use(study, p), log=lines.append)
    held = protocols._heldout(s, p.sequential, study.facts(4), 0)
    assert 0 < len(held) < n and any(f"{len(held)} held-out facts, not sequential.heldout_facts={10 * n}" in x
                                      for x in lines)
    protocols.run_sequential(s, log=quiet)
    b = pd.read_parquet(tmp_path / "d" / "sequential" / "batches.parquet")
    measured = b[b.heldout_known.notna()]
    assert len(measured) == 2 and (measured.heldout_n == len(held)).all()
    assert_unedited(study.model, weights0)


def test_the_unedited_measurement_is_kept_per_evaluation_setting(study, weights0, tmp_path):  # noqa: F811
    """Two sequential runs of one study (a notebook's, a Ray worker's) that differ only in
    ``evaluation.alignment`` each store the unedited model's degradation under their own
    alignment: the kept measurement of the first is not served to the second."""
    for i, alignment in enumerate(("correct", "reference")):
        p = params_for(tmp_path, name=f"a{i}", **{"sequential.batch_sizes": [2], "sequential.degradation_every": 4,
                                                   "evaluation.alignment": alignment})
        protocols.run_sequential(use(study, p), log=quiet)
        b = pd.read_parquet(tmp_path / f"a{i}" / "sequential" / "batches.parquet")
        ev = p.evaluation
        ref = protocols._degradation(use(study, p), protocols._heldout(study, p.sequential, study.facts(4), 0))
        assert ev.alignment == alignment and float(b.heldout_margin_0.dropna().iloc[0]) == ref["heldout_margin"]
    assert_unedited(study.model, weights0)


def test_unedited_measurements_are_kept_only_for_the_unedited_model(study, weights0):  # noqa: F811
    """Study.of_unedited keeps a measurement per key while the weights are the unedited ones, and
    measures afresh (keeping nothing) while an edit session holds a write or a forward hook is on
    the model."""
    from editlib.weights import EditSession

    calls = []
    measure = lambda: calls.append(1) or {"x": float(len(calls))}  # noqa: E731
    key = ("test", len(study._of_unedited))
    assert study.of_unedited(key, measure) == {"x": 1.0} == study.of_unedited(key, measure) and len(calls) == 1
    W = study.model.model.layers[1].mlp.down_proj.weight
    with EditSession(study.model) as s:
        s.apply(1, torch.full(W.shape, 1e-3, dtype=torch.float64))
        assert study.of_unedited(key, measure) == {"x": 2.0} and study.of_unedited(key, measure) == {"x": 3.0}
    assert study.of_unedited(key, measure) == {"x": 1.0} and len(calls) == 3  # restored: the kept one
    h = study.model.model.layers[0].register_forward_hook(lambda *a: None)  # a hook can change a forward
    try:
        assert study.of_unedited(key, measure) == {"x": 4.0} and study.of_unedited(("new",), measure) == {"x": 5.0}
    finally:
        h.remove()
    assert study.of_unedited(key, measure) == {"x": 1.0} and study.of_unedited(("new",), measure) == {"x": 6.0}
    from editlib.nethook import observer
    h = study.model.model.layers[0].register_forward_hook(observer(lambda *a: None))  # only reads: kept ones stay
    try:
        assert study.of_unedited(key, measure) == {"x": 1.0} and study.of_unedited(("new",), measure) == {"x": 6.0}
    finally:
        h.remove()
    assert len(calls) == 6
    assert_unedited(study.model, weights0)


def test_degradation_off_unless_asked_and_bad_values(tmp_path):
    from editlib.params import SequentialParams

    assert SequentialParams().degradation_every is None  # a params file without the key measures nothing
    assert resolve(SMOKE, overrides={"results_dir": str(tmp_path)}).sequential.degradation_every == 32  # smoke.yaml (tiny.yaml: 16)
    for over, match in (({"sequential.degradation_every": 0}, "degradation_every"),
                        ({"sequential.heldout_facts": 0}, "heldout_facts")):
        with pytest.raises(ParamsError, match=match):
            params_for(tmp_path, **over)


class _FakeHarness:
    """Stands in for lm-eval (not installed in the test venv): records each call and scores the
    model by its current down-projection norm, so edited weights must give other numbers."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch):
        import sys
        import types

        top, models, hf = (types.ModuleType(n) for n in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"))

        class HFLM:
            def __init__(self, pretrained, tokenizer, batch_size):
                self.model, self.batch_size = pretrained, batch_size

        def simple_evaluate(model, tasks, num_fewshot, limit, log_samples):
            w = float(sum(p.detach().double().norm() for n, p in model.model.named_parameters() if "down_proj" in n))
            self.calls.append((tuple(tasks), num_fewshot, limit, model.batch_size))
            return {"results": {t: {"alias": t, "acc,none": w / 1000, "acc_stderr,none": 0.01} for t in tasks}}

        hf.HFLM, top.simple_evaluate = HFLM, simple_evaluate
        for name, mod in (("lm_eval", top), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
            monkeypatch.setitem(sys.modules, name, mod)


def test_lm_eval_hook_runs_per_checkpoint_on_the_edited_model(study, weights0, tmp_path, monkeypatch):  # noqa: F811
    fake = _FakeHarness()
    fake.install(monkeypatch)
    p = params_for(tmp_path, name="lm", **{"sequential.batch_sizes": [2, 4], "sequential.degradation_every": None,
                                           "sequential.lm_eval": {"tasks": ["arc_easy", "piqa"], "every": 2, "limit": 5}})
    protocols.check_before_loading(p, ["sequential"])  # installed (the fake): no error
    protocols.run_sequential(use(study, p), log=quiet)
    b = pd.read_parquet(tmp_path / "lm" / "sequential" / "batches.parquet")
    # the unedited model once per study, then after each batch of 2 facts (every 2 facts) and after B = 4's one batch
    assert fake.calls == [(("arc_easy", "piqa"), 0, 5, 8)] * 4
    b = b[b.batch_size == 2].sort_values("batch_index")
    assert set(b.columns[b.columns.str.startswith("lmeval_")]) == {  # aliases dropped, the default filter "none" left out of the name
        f"lmeval_{t}_{m}{s}" for t in ("arc_easy", "piqa") for m in ("acc", "acc_stderr") for s in ("", "_0")}
    assert b.lmeval_piqa_acc_0.nunique() == 1
    assert (b.lmeval_piqa_acc != b.lmeval_piqa_acc_0).all()  # scored on the edited weights
    assert b.lmeval_piqa_acc.iloc[0] != b.lmeval_piqa_acc.iloc[1]
    assert_unedited(study.model, weights0)


def test_lm_eval_results_keep_every_filter():
    """A task the harness scores under two filters (gsm8k: strict-match and flexible-extract) keeps
    both numbers; the default filter "none" is left out of the name (stored results keep theirs)."""
    from editlib.lmeval import flatten

    out = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25,
                                 "exact_match_stderr,strict-match": 0.01, "exact_match,flexible-extract": 0.75,
                                 "exact_match_stderr,flexible-extract": 0.02},
                       "arc_easy": {"acc,none": 0.5, "acc_stderr,none": "N/A", "flag": True}}}
    assert flatten(out) == {"lmeval_gsm8k_exact_match_strict-match": 0.25,
                            "lmeval_gsm8k_exact_match_stderr_strict-match": 0.01,
                            "lmeval_gsm8k_exact_match_flexible-extract": 0.75,
                            "lmeval_gsm8k_exact_match_stderr_flexible-extract": 0.02,
                            "lmeval_arc_easy_acc": 0.5}
    assert flatten(None) == {}


def test_lm_eval_params_fail_fast(tmp_path, monkeypatch):
    import sys

    for bad, culprit in (({"tasks": []}, "tasks"), ({"tasks": ["x"], "every": 0}, "every"),
                         ({"tasks": ["x"], "limt": 3}, "limt"), ("arc", "mapping")):
        with pytest.raises(ParamsError, match=culprit):
            params_for(tmp_path, **{"sequential.lm_eval": bad})
    p = params_for(tmp_path, **{"sequential.lm_eval": {"tasks": ["arc_easy"]}})
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    with pytest.raises(ParamsError, match=r"pip install -e '\.\[lmeval\]'"):
        protocols.check_before_loading(p, ["sequential"])
    assert params_for(tmp_path).sequential.lm_eval is None  # off by default


def test_lm_eval_task_names_are_checked_before_loading(tmp_path, monkeypatch):
    """A task name the installed harness does not know (a typo) fails in the pre-load checks,
    naming it and its near names, not in the sequential notebook after the notebooks before it;
    names and task files pass, a glob pattern fails (simple_evaluate does not expand it, only the
    harness's command line does), and a harness without a readable task registry is left to say so
    itself."""
    import sys
    import types

    FakeHarnessTasks = types.ModuleType("lm_eval.tasks")

    class TaskManager:
        all_tasks = ["arc_challenge", "arc_easy", "hellaswag", "mmlu"]

    FakeHarnessTasks.TaskManager = TaskManager
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", FakeHarnessTasks)
    task_file = tmp_path / "my_task.yaml"
    task_file.write_text("task: mine\n")
    ok = params_for(tmp_path, **{"sequential.lm_eval": {"tasks": ["arc_easy", str(task_file)]}})
    protocols.check_before_loading(ok, ["sequential"])
    glob = params_for(tmp_path, **{"sequential.lm_eval": {"tasks": ["arc_*", "mmlu"]}})
    with pytest.raises(ParamsError, match=r"\['arc_\*'\] are not tasks.*did you mean \['arc_challenge', 'arc_easy'\]"):
        protocols.check_before_loading(glob, ["sequential"])
    with pytest.raises(ParamsError, match="are not tasks"):  # a folder is no task file
        protocols.check_before_loading(params_for(tmp_path, **{"sequential.lm_eval": {"tasks": [str(tmp_path)]}}),
                                       ["sequential"])
    bad = params_for(tmp_path, **{"sequential.lm_eval": {"tasks": ["arc-easy", "hellaswag"]}})
    with pytest.raises(ParamsError, match=r"\['arc-easy'\] are not tasks.*did you mean \['arc_easy'\]"):
        protocols.check_before_loading(bad, ["sequential"])
    protocols.check_before_loading(bad, ["layer_search"])  # no sequential experiment: not needed

    def unreadable():
        raise RuntimeError("no task index here")

    TaskManager.__init__ = lambda self: unreadable()
    protocols.check_before_loading(bad, ["sequential"])


def test_unscored_heldout_facts_count_as_not_known(study, monkeypatch):
    """A held-out fact whose outputs are NaN/inf (blanked by evaluate_records) is not known: it counts
    against heldout_known instead of leaving the mean, and heldout_unscored says how many."""
    held = study.facts(4)
    monkeypatch.setattr(degradation, "perplexity", lambda *a, **k: 1.0)

    def scores(es):
        return lambda rs: pd.DataFrame({"ES": es, "ES_mag": [-0.5 if e == 0 else np.nan for e in es]})

    clean = degradation.measure(study.model, study.tok, held, scores([0.0, 0.0, 0.0, 1.0]))
    assert clean["heldout_known"] == 75.0 and "heldout_unscored" not in clean
    blown = degradation.measure(study.model, study.tok, held, scores([0.0, np.nan, np.nan, 1.0]))
    assert blown["heldout_known"] == 25.0 and blown["heldout_unscored"] == 2
    assert blown["heldout_margin"] == 50.0  # over the scored facts
