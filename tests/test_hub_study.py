"""``params/llama3-8b.yaml`` end to end on the CPU, through the code paths that otherwise run only
at paper scale.

The model is found by its hub id, ``meta-llama/Meta-Llama-3-8B``, in a local Hugging Face cache
(offline): a 2-layer Llama with the Llama-3 vocabulary, config conventions (BOS 128,000, RoPE θ
500,000, grouped-query attention) and the real Llama-3 tokenizer, random weights (its LM head
scaled so that an edit moves probabilities measurably). The facts are CounterFact records read by
``data.source: counterfact``; C0 comes through ``datasets`` from a local parquet file (Wikipedia
cannot be read offline), truncated at the model's max positions. Everything else is the
paper-scale file as written: its hyperparameters, GE on with 1,024-row decode batches and
``gen_kv_gb``, grouped sequential evaluation. Only the sizes, the device, the layer (``best``
reads a finished layer search), the fact list (the reference's index file needs the full
CounterFact) and the C0 corpus are overridden.

Scores of a random model mean nothing; what is checked is that every protocol runs, that the
preflight names what an offline user lacks before anything loads, that the batched path equals the
one-edit-at-a-time reference path on the real tokenizer (GE included), and that a stopped
sequential run resumes from its factor log to the uninterrupted run's cases.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pandas as pd
import pytest
import torch
from _fixtures import SCORES, UNIT, counterfact_subset, one_thread, quiet, sort_units  # noqa: F401  (one_thread: autouse, module scope)
from pandas.testing import assert_frame_equal

from editlib import protocols
from editlib.counterfact import load_counterfact, sha256_file
from editlib.hubcache import STAND_IN_REVISION, cache_paper_stand_ins, corpus_documents
from editlib.models import ModelNotFound
from editlib.params import ParamsError, resolve
from editlib.paths import repo_path
from editlib.tokens import encode

HUB_ID = "meta-llama/Meta-Llama-3-8B"
SECOND_ID = "meta-llama/Llama-2-7b-hf"  # params/llama3-8b.yaml's second_model
MAX_POSITIONS = 512  # C0 texts are truncated here (max_length null); some corpus documents are longer
SIZES = {"layer_search.n_facts": 3, "singular.n_facts": 3, "sweep.total": 4, "sweep.batch_size": 4,
         "batch.total": 8, "batch.batch_sizes": [4], "sequential.total": 4, "sequential.batch_sizes": [1, 2],
         "sequential.degradation_every": None, "evaluation.gen_max_len": 24,
         "batch.layer": 1, "sequential.layer": 1}  # the paper's layer ("best" reads a finished layer search)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding stand-ins of ``HUB_ID`` and ``SECOND_ID`` (Figure 6's model;
    editlib.hubcache.PAPER_STAND_INS), an editlib cache, the C0 corpus as a parquet file;
    HF_HUB_OFFLINE on. Yields (tmp dir, CounterFact path)."""
    cf = str(counterfact_subset())
    tmp = tmp_path_factory.mktemp("hub")
    pd.DataFrame({"text": corpus_texts(cf)}).to_parquet(tmp / "corpus.parquet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # editlib reads it at call time; the libraries at import, hence:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "hub"))  # both read at call time
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp / "datasets"))  # a cached Wikipedia stays unseen
        mp.setenv("EDITLIB_CACHE", str(tmp / "editlib-cache"))  # before the tokenizer's conversion is cached
        assert set(cache_paper_stand_ins(tmp / "hub", max_positions=MAX_POSITIONS)) == {HUB_ID, SECOND_ID}
        yield tmp, cf


def corpus_texts(cf: str) -> list[str]:
    """200 documents of 8 CounterFact records' sentences each (some longer than MAX_POSITIONS)."""
    return corpus_documents(load_counterfact(cf))


def paper_params(tmp: Path, cf: str, name: str, **over):
    """params/llama3-8b.yaml with the test's sizes; C0 from the local parquet file unless overridden."""
    corpus = {"covariance.name": "parquet", "covariance.config": None,
              "covariance.data_files": str(tmp / "corpus.parquet"), "covariance.n_samples": 200}
    base = {"results_dir": str(tmp / "results"), "name": name, "model.device": "cpu",
            "data.fact_list": "seeded", "data.counterfact_path": cf, **SIZES}
    return resolve(repo_path("params/llama3-8b.yaml"), overrides={**base, **corpus, **over})


def test_the_paper_file_is_what_runs(hub) -> None:
    """The overrides leave the paper-scale choices this test is about in place."""
    tmp, cf = hub
    p = paper_params(tmp, cf, "file")
    assert p.model.id == HUB_ID and p.model.dtype == "float32" and p.model.tiny is None
    assert p.data.source == "counterfact" and p.covariance.kind == "hf_dataset"
    assert p.covariance.max_length is None  # truncated at the model's max positions
    assert p.sequential.eval_group == 64  # grouped sequential evaluation
    assert p.evaluation.generation and p.evaluation.gen_batch_size == 1024 and p.evaluation.gen_kv_gb == 32
    assert p.hparams["memit"].values.v_num_grad_steps == 25 and p.hparams["memit"].values.v_lr == 0.5


def test_preflight_names_what_is_missing_offline(hub) -> None:
    """Before any model loads: the paper's Wikipedia corpus (not cached, offline), a layer beyond
    the depth read from the cached config, a hub id that is not cached."""
    tmp, cf = hub
    wiki = paper_params(tmp, cf, "wiki", **{"covariance.name": "wikimedia/wikipedia",
                                            "covariance.config": "20231101.en", "covariance.data_files": None})
    with pytest.raises(ParamsError, match=r"corpus 'wikimedia/wikipedia' \('20231101.en'\) is not available offline"):
        protocols.check_before_loading(wiki, ["layer_search"])
    deep = paper_params(tmp, cf, "deep", **{"batch.layer": 7})
    with pytest.raises(ParamsError, match=r"batch: layer\(s\) \[7\] outside the model's 0\.\.1 decoder layers"):
        protocols.check_before_loading(deep, ["batch"])
    protocols.check_before_loading(paper_params(tmp, cf, "ok", **{"batch.layer": 1}), ["batch"])
    other = paper_params(tmp, cf, "other", **{"model.id": "meta-llama/Meta-Llama-3-70B"})
    with pytest.raises(ModelNotFound, match="'meta-llama/Meta-Llama-3-70B' is not in the local Hugging Face cache"):
        protocols.check_before_loading(other, ["batch"])
    pinned = paper_params(tmp, cf, "pinned", **{"model.revision": "0" * 40})  # model.revision: a commit not cached
    with pytest.raises(ModelNotFound, match=f"at revision '{'0' * 40}' is not in the local Hugging Face cache"):
        protocols.check_before_loading(pinned, ["batch"])
    protocols.check_before_loading(paper_params(tmp, cf, "cached", **{"model.revision": STAND_IN_REVISION}), ["batch"])
    local = paper_params(tmp, cf, "local", **{"model.id": str(repo_path("models/tiny-world")), "model.revision": "v1"})
    with pytest.raises(ParamsError, match="model.revision pins a hub id's commit, but model is the local directory"):
        protocols.check_before_loading(local, ["batch"])


def test_model_revision_pins_what_loads(hub) -> None:
    """model.revision reaches from_pretrained: the cached commit loads (and is what the provenance
    records), another is refused before anything is read."""
    from editlib.models import hub_commit, load_model
    model, _ = load_model(HUB_ID, revision=STAND_IN_REVISION)
    assert hub_commit(HUB_ID, STAND_IN_REVISION) == hub_commit(HUB_ID) == STAND_IN_REVISION  # main is that commit
    assert hub_commit(HUB_ID, "0" * 40) is None and hub_commit(str(repo_path("models/tiny-world"))) is None
    with pytest.raises(ModelNotFound, match="at revision 'v0.0-not-cached'"):
        load_model(HUB_ID, revision="v0.0-not-cached")


@pytest.fixture(scope="module")
def study(hub):
    tmp, cf = hub
    st = protocols.open_study(paper_params(tmp, cf, "paper"), experiments=["layer_search", "batch", "sequential"],
                              log=quiet)
    st.covs([0, 1])
    return st


def test_study_loads_by_hub_id_with_counterfact_provenance(hub, study) -> None:
    tmp, cf = hub
    assert study.model.config.model_type == "llama" and study.model.config.vocab_size == 128_256
    assert study.tok.bos_token_id == 128_000 and study.tok("Paris")["input_ids"][0] == 128_000
    assert study.n_layers == 2 and len(study.records) == len(load_counterfact(cf))
    prov = study.provenance()
    assert prov["model"] == HUB_ID and prov["model_commit"] == STAND_IN_REVISION  # what refs/main resolved to
    assert prov["data"]["source"] == "counterfact"
    assert prov["data"]["sha256"] == sha256_file(Path(cf), uncompressed=True)
    lens = [len(encode(study.tok, t, remember=False)) for t in corpus_texts(cf)]  # BOS included
    assert max(lens) > MAX_POSITIONS
    for layer in (0, 1):  # C0 read every document, each cut at the model's max positions
        assert prov["covariance"][layer]["tokens"] == sum(min(n, MAX_POSITIONS) for n in lens)


def test_generate_decodes_as_ge_does(study) -> None:
    """editlib.generate decodes with the tokenizer's space clean-up, as GE and the reference's
    transformers did (the Llama-3 tokenizer asks for it; transformers 5 would skip it)."""
    import editlib
    assert study.tok.clean_up_tokenization_spaces
    assert editlib.generate(study.model, study.tok, "He said , as Paris 's mayor", 1).startswith(
        "He said, as Paris's mayor")


@pytest.mark.parametrize("runner", ["layer_search", "batch"])
def test_batched_path_equals_the_reference_path_on_the_llama3_tokenizer(hub, study, runner) -> None:
    """The default batched path (per-row low-rank hooks, batched GE) against editing, evaluating
    and restoring one edit at a time, GE on: the same scores and GE."""
    import dataclasses
    tmp, cf = hub
    run = getattr(protocols, f"run_{runner}")
    ref = run(dataclasses.replace(study, params=paper_params(tmp, cf, f"ref-{runner}",
                                                             **{"evaluation.batched_edits": False})), log=quiet)
    got = run(dataclasses.replace(study, params=paper_params(tmp, cf, f"bat-{runner}")), log=quiet)
    a, b = sort_units(got), sort_units(ref)
    n_edits = 3 * 2 * 2 if runner == "layer_search" else 8 * 2  # facts × layers × methods, or facts × methods
    assert len(a) == len(b) == n_edits and (a["case_id"].to_numpy() == b["case_id"].to_numpy()).all()
    assert not a["failed"].any() and "GE" in a.columns and a["GE"].notna().all()
    for c in ("ES", "PS", "NS", "ES_acc", "PS_acc", "NS_acc"):
        assert (a[c].to_numpy() == b[c].to_numpy()).all(), c
    # probabilities over 128,256 tokens of a random model are ~1e-7: the tolerance is relative, and
    # the edits move the magnitudes by far more than it allows (the comparison has teeth)
    assert_frame_equal(a[SCORES], b[SCORES], check_exact=False, rtol=1e-4, atol=1e-11)
    base = study.evaluate([r for r in study.records if r.case_id in set(a["case_id"])]).set_index("case_id")
    moved = (a["ES_mag"] - base.loc[a["case_id"], "ES_mag"].to_numpy()).abs()
    assert moved.max() > 1e2 * (1e-11 + 1e-4 * a["ES_mag"].abs().max())
    assert np.allclose(a["GE"], b["GE"], rtol=0, atol=1e-9)


def test_sequential_runs_and_resumes_from_its_factor_log(hub, study) -> None:
    """Sequential MEMIT and EMMET at B = 1 and 2, each batch evaluated (``eval_group`` 1, so that a
    stop leaves stored batches); a run stopped after two batches resumes from its factor log to
    the uninterrupted run's cases, bit for bit (the CPU is deterministic)."""
    import dataclasses
    tmp, cf = hub
    over = {"sequential.eval_group": 1}
    whole = protocols.run_sequential(dataclasses.replace(study, params=paper_params(tmp, cf, "seq", **over)),
                                     log=quiet)
    assert len(whole) and not whole["failed"].any() and whole[SCORES].notna().all().all()
    p = paper_params(tmp, cf, "seq-resumed", **over)
    with pytest.raises(RuntimeError, match="injected failure after batch 1"):
        protocols.run_sequential(dataclasses.replace(study, params=p), log=quiet, fail_after=2)
    lines: list[str] = []
    resumed = protocols.run_sequential(dataclasses.replace(study, params=p), log=lines.append)
    assert any("resuming at batch 2/4" in line for line in lines), lines
    keys = [c for c in UNIT if c in whole.columns]
    assert_frame_equal(sort_units(whole)[keys + SCORES], sort_units(resumed)[keys + SCORES], check_exact=True)


def test_reference_context_text_puts_a_second_bos_before_the_llama3_templates(hub, study) -> None:
    """``hparams.common.context_text: reference``, as the paper's code decoded its templates: 5 of
    the 6 MEMIT templates start with a literal <|begin_of_text|>, tokenised as a second BOS, which
    moves every fact's key far beyond float rounding; a batch run computes its edits from them and
    records them."""
    import dataclasses

    from editlib.reprs import compute_keys
    tmp, cf = hub
    bos = study.tok.bos_token_id
    clean, ref = study.contexts("memit"), study.contexts("memit", "reference")
    assert sum(encode(study.tok, t.format("Paris is"))[:2] == [bos, bos] for t in ref.flat) == 5
    assert all(encode(study.tok, t.format("Paris is"))[1] != bos for t in clean.flat)
    facts = study.records[:8]
    k_clean, k_ref = (compute_keys(study.model, study.tok, facts, 1, c) for c in (clean, ref))
    assert ((k_ref - k_clean).norm(dim=0) > 1e-3 * k_clean.norm(dim=0)).all()  # float32 rounding: ~1e-7
    p = paper_params(tmp, cf, "ctx-ref", **{"batch.methods": ["memit"], "evaluation.generation": False,
                                           "hparams.common.context_text": "reference"})
    used: list = []
    real = protocols.prepare_targets
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocols, "prepare_targets", lambda m, t, f, hp, ctx, **k: used.append(ctx) or real(m, t, f, hp, ctx, **k))
        cases = protocols.run_batch(dataclasses.replace(study, params=p), log=quiet)
    assert used and all(c is ref for c in used)  # the edits' keys and values read the second BOS
    assert len(cases) == 8 and not cases["failed"].any() and cases[SCORES].notna().all().all()
    unit = json.loads(next((Path(p.results_dir) / "ctx-ref" / "batch" / "parts").glob("*.unit.json")).read_text())
    assert set(unit["settings"]["context_templates"]) == {"memit/reference"}


def test_figure_6_second_model_by_hub_id(hub) -> None:
    """Figure 6's layer search on the file's second model, found by its hub id: it follows the main
    model's dtype (bfloat16 here, so C0 takes ``fast_gram``'s float32 Gram), its results go to a
    folder named by its label, and a later ``layer: best`` of the second model reads that folder."""
    tmp, cf = hub
    p = paper_params(tmp, cf, "fig6", **{"model.dtype": "bfloat16"})
    assert p.second_model.id == SECOND_ID and p.second_model.dtype == "bfloat16" and p.covariance.fast_gram
    st = protocols.open_study(p, which="second_model", experiments=["layer_search"], log=quiet)
    assert st.model.dtype == torch.bfloat16 and st.provenance()["model"] == SECOND_ID
    assert st.model.config.rope_parameters["rope_theta"] == 10_000.0
    best = paper_params(tmp, cf, "fig6", **{"model.dtype": "bfloat16", "singular.layer": "best"})
    with pytest.raises(ParamsError, match=r"layer_search-Llama-2-7B/cases\.parquet is missing"):
        protocols.check_before_loading(best, ["singular"], "second_model")
    cases = protocols.run_layer_search(st, log=quiet)
    assert len(cases) == 3 * 2 * 2 and not cases["failed"].any()
    root = Path(p.results_dir) / "fig6"
    assert (root / "layer_search-Llama-2-7B" / "cases.parquet").is_file()
    assert not (root / "layer_search").exists()
    protocols.check_before_loading(best, ["singular"], "second_model")  # now it finds the layer search
