"""``params/llama3-8b.yaml`` end to end on the CPU, through the code paths that otherwise run only
at paper scale.

The model is found by its hub id, ``meta-llama/Meta-Llama-3-8B``, in a local Hugging Face cache
(HF_HUB_OFFLINE): a 2-layer Llama with the Llama-3 vocabulary, config conventions (BOS 128,000,
RoPE θ 500,000, grouped-query attention) and the real Llama-3 tokenizer, random weights. The facts
are CounterFact records read by ``data.source: counterfact``; C0 comes through ``datasets`` (a
local parquet file, since Wikipedia cannot be read offline). Everything else is the paper-scale
file as written: its hyperparameters, GE on with 1,024-row decode batches and ``gen_kv_gb``,
``fast_gram``, ``max_batch_tokens``, C0 truncated at the model's max positions. Only the sizes,
the device, the fact list (the reference's index file needs the full CounterFact) and the second
model (Figure 6's Llama-2-7B) are overridden.

Scores of a random model mean nothing; what is checked is that every protocol runs, that the
preflight names what an offline user lacks before anything loads, and that the batched path
equals the one-edit-at-a-time reference path on the real tokenizer, GE's texts included.
"""
from __future__ import annotations

from pathlib import Path

import huggingface_hub
import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from _fixtures import counterfact_subset, one_thread, quiet  # noqa: F401  (one_thread: autouse, module scope)
from pandas.testing import assert_frame_equal

import editlib.llama3_tokenizer as l3
from editlib import protocols
from editlib.counterfact import load_counterfact, sha256_file
from editlib.models import ModelNotFound
from editlib.params import ParamsError, resolve
from editlib.paths import repo_path

HUB_ID = "meta-llama/Meta-Llama-3-8B"
SECOND_ID = "meta-llama/Llama-2-7b-hf"  # params/llama3-8b.yaml's second_model
REVISION = "0123456789abcdef0123456789abcdef01234567"
SIZES = {"layer_search.n_facts": 3, "singular.n_facts": 3, "sweep.total": 4, "sweep.batch_size": 4,
         "batch.total": 8, "batch.batch_sizes": [4, 8], "sequential.total": 4, "sequential.batch_sizes": [1, 2],
         "sequential.degradation_every": None, "evaluation.gen_max_len": 12,
         "batch.layer": 1, "sequential.layer": 1}  # the paper's layer ("best" reads a finished layer search)
SCORES = ["ES", "PS", "NS", "ES_mag", "PS_mag", "NS_mag", "ES_acc", "PS_acc", "NS_acc"]
UNIT = ["method", "layer", "batch_size", "batch_index", "case_id"]


def _cache(hub: Path, repo_id: str, **shape) -> Path:
    """Save a random 2-layer Llama with the Llama-3 vocabulary as ``repo_id``'s snapshot in the
    Hugging Face cache ``hub`` (``refs/main`` names it); returns the snapshot directory."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REVISION
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128_256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=256, bos_token_id=128_000,
                                   eos_token_id=128_001, tie_word_embeddings=False, **shape)
    transformers.LlamaForCausalLM(cfg).save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding ``HUB_ID`` (Llama-3's RoPE θ and grouped-query attention) and
    ``SECOND_ID`` (Figure 6's model: Llama-2's θ, one KV head per head; the Llama-3 tokenizer stands
    in for its sentencepiece file, which no package ships), an editlib cache, the C0 corpus as a
    parquet file; HF_HUB_OFFLINE on. Yields (tmp dir, CounterFact path)."""
    cf = str(counterfact_subset())
    tmp = tmp_path_factory.mktemp("hub")
    first = _cache(tmp / "hub", HUB_ID, num_key_value_heads=2, rope_theta=500_000.0)
    second = _cache(tmp / "hub", SECOND_ID, num_key_value_heads=4, rope_theta=10_000.0)
    texts = [f"{r.rewrite_prompt.format(r.subject)} {r.target_true.str}. " + " ".join(r.generation_prompts)
             for r in load_counterfact(cf)[:400]]
    pd.DataFrame({"text": texts}).to_parquet(tmp / "corpus.parquet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("EDITLIB_CACHE", str(tmp / "editlib-cache"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "hub"))  # read at call time
        for snap in (first, second):
            l3.build_llama3_tokenizer(out_dir=snap)  # after EDITLIB_CACHE: the conversion is cached there
        yield tmp, cf


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
    assert p.covariance.max_length is None and p.covariance.fast_gram  # truncated at max positions
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
    assert prov["model"] == HUB_ID
    assert prov["data"]["source"] == "counterfact"
    assert prov["data"]["sha256"] == sha256_file(Path(cf), uncompressed=True)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values([c for c in UNIT if c in df.columns]).reset_index(drop=True)


@pytest.mark.parametrize("runner", ["layer_search", "batch"])
def test_batched_path_equals_the_reference_path_on_the_llama3_tokenizer(hub, study, runner) -> None:
    """The default batched path (per-row low-rank hooks, batched GE) against editing, evaluating
    and restoring one edit at a time, GE on: the same scores, the same generated texts' entropy."""
    import dataclasses
    tmp, cf = hub
    run = getattr(protocols, f"run_{runner}")
    ref = run(dataclasses.replace(study, params=paper_params(tmp, cf, f"ref-{runner}",
                                                             **{"evaluation.batched_edits": False})), log=quiet)
    got = run(dataclasses.replace(study, params=paper_params(tmp, cf, f"bat-{runner}")), log=quiet)
    a, b = _sorted(got), _sorted(ref)
    n_edits = 3 * 2 * 2 if runner == "layer_search" else 8 * 2 * 2  # facts × layers or sizes × methods
    assert len(a) == len(b) == n_edits and (a["case_id"].to_numpy() == b["case_id"].to_numpy()).all()
    assert not a["failed"].any() and "GE" in a.columns and a["GE"].notna().all()
    for c in ("ES", "PS", "NS", "ES_acc", "PS_acc", "NS_acc"):
        assert (a[c].to_numpy() == b[c].to_numpy()).all(), c
    assert_frame_equal(a[SCORES], b[SCORES], check_exact=False, rtol=0, atol=1e-5)
    assert np.allclose(a["GE"], b["GE"], rtol=0, atol=1e-9)  # the same sampled texts


def test_sequential_runs_and_resumes_from_its_factor_log(hub, study) -> None:
    """Sequential MEMIT and EMMET at B = 1 and 2; a run stopped after one batch resumes to the
    same cases as an uninterrupted one."""
    import dataclasses
    tmp, cf = hub
    whole = protocols.run_sequential(dataclasses.replace(study, params=paper_params(tmp, cf, "seq")), log=quiet)
    assert len(whole) and not whole["failed"].any() and whole[SCORES].notna().all().all()
    p = paper_params(tmp, cf, "seq-resumed")
    with pytest.raises(RuntimeError, match="injected failure after batch 0"):
        protocols.run_sequential(dataclasses.replace(study, params=p), log=quiet, fail_after=1)
    resumed = protocols.run_sequential(dataclasses.replace(study, params=p), log=quiet)
    keys = [c for c in ("method", "batch_size", "ordering", "eval", "batch_index", "case_id") if c in whole.columns]
    x, y = (d.sort_values(keys).reset_index(drop=True) for d in (whole, resumed))
    assert_frame_equal(x[keys + SCORES], y[keys + SCORES], check_exact=False, rtol=0, atol=1e-6)


def test_figure_6_second_model_by_hub_id(hub) -> None:
    """Figure 6's layer search on the file's second model, found by its hub id: it inherits the
    main model's device and dtype, and its results go to their own folder, named by its label."""
    tmp, cf = hub
    p = paper_params(tmp, cf, "fig6")
    assert p.second_model.id == SECOND_ID and p.second_model.device == "cpu" and p.second_model.dtype == "float32"
    st = protocols.open_study(p, which="second_model", experiments=["layer_search"], log=quiet)
    assert st.model.config.rope_parameters["rope_theta"] == 10_000.0 and st.provenance()["model"] == SECOND_ID
    cases = protocols.run_layer_search(st, log=quiet)
    assert len(cases) == 3 * 2 * 2 and not cases["failed"].any()
    root = Path(p.results_dir) / "fig6"
    assert (root / "layer_search-Llama-2-7B" / "cases.parquet").is_file()
    assert not (root / "layer_search").exists()
