"""editlib.metrics: ES/PS/NS against hand computations from the logits, BOS alignment, S, batching."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import hmean

from editlib.arch import backbone_and_head
from editlib.metrics import (PROB_METRICS, evaluate_records, format_summary, harmonic_score,
                             summarize_cases)
from editlib.records import Record, Target
from editlib.rs import RSResources
from editlib.scoring import score_targets
from editlib.tokens import encode, target_ids


@torch.no_grad()
def hand_nll(model, tok, prefix: str, target: str, reference: bool = False) -> tuple[float, bool]:
    """Mean-token NLL and all-argmax flag, straight from one unpadded forward.

    correct: scored ids = target ids (no BOS), token j read at logit ``len(prefix) + j - 1``.
    reference (SPEC §8.1): scored ids = ``tok(" " + target)`` = [BOS] + target ids, same indexing,
    so every position is shifted by one.
    """
    p, t = encode(tok, prefix), target_ids(tok, target)
    logits = model(torch.tensor([p + t])).logits[0].double()
    scored = list(tok(" " + target)["input_ids"]) if reference else t
    logp = torch.log_softmax(logits, -1)
    nlls = [-logp[len(p) + j - 1, s].item() for j, s in enumerate(scored)]
    ok = all(logits[len(p) + j - 1].argmax().item() == s for j, s in enumerate(scored))
    return float(np.mean(nlls)), ok


def hand_case(model, tok, r: Record, reference: bool = False) -> dict[str, float]:
    """ES/PS/NS, magnitudes and accuracies of one record from :func:`hand_nll` (SPEC §6)."""
    out = {}
    fams = {"ES": [r.rewrite_prompt], "PS": list(r.paraphrase_prompts), "NS": list(r.neighborhood_prompts)}
    for key, prompts in fams.items():
        succ, mag, acc = [], [], []
        for p in prompts:
            nn, okn = hand_nll(model, tok, p, r.target_new.str, reference)
            nt, okt = hand_nll(model, tok, p, r.target_true.str, reference)
            if key == "NS":
                succ.append(nt < nn), mag.append(np.exp(-nt) - np.exp(-nn)), acc.append(okt)
            else:
                succ.append(nn < nt), mag.append(np.exp(-nn) - np.exp(-nt)), acc.append(okn)
        out[key], out[f"{key}_mag"], out[f"{key}_acc"] = np.mean(succ), np.mean(mag), np.mean(acc)
    return out


def word_record(case_id: int, prompt: str, subject: str, new: str, true: str) -> Record:
    return Record(case_id=case_id, prompt=prompt, subject=subject, relation_id="P1",
                  target_true=Target(true, "t"), target_new=Target(new, "n"),
                  paraphrase_prompts=("a dog ran to the", "the cat is capital of"),
                  neighborhood_prompts=("the dog sat on the", "a cat ran to", "Paris is the"),
                  generation_prompts=("the cat", "a dog ran"))


# --------------------------------------------------------------------------- probability test

def test_score_targets_matches_hand_computation(world_lm, world_records) -> None:
    model, tok = world_lm
    r = world_records[0]
    prefixes = [r.rewrite_prompt, *r.paraphrase_prompts, r.neighborhood_prompts[0]]
    targets = [r.target_new.str, r.target_true.str, r.target_new.str, r.target_true.str]
    assert all(len(target_ids(tok, t)) > 1 for t in targets)  # multi-token targets
    for alignment in ("correct", "reference"):
        got = score_targets(model, tok, prefixes, targets, alignment=alignment, batch_size=3)
        want = [hand_nll(model, tok, p, t, alignment == "reference") for p, t in zip(prefixes, targets)]
        np.testing.assert_allclose(got.nll, [w[0] for w in want], rtol=1e-5)
        assert list(got.correct) == [w[1] for w in want]


def test_multi_token_target_scores_every_token(world_lm, world_records) -> None:
    model, tok = world_lm
    r = world_records[1]
    p, target = r.rewrite_prompt, r.target_new.str
    t = target_ids(tok, target)
    assert len(t) >= 3
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([encode(tok, p) + t])).logits[0].double(), -1)
    per_tok = [-logp[len(encode(tok, p)) + j - 1, s].item() for j, s in enumerate(t)]
    got = score_targets(model, tok, [p], [target]).nll[0]
    assert got == pytest.approx(np.mean(per_tok), rel=1e-5)
    for k in range(1, len(t)):  # no shorter prefix of the target gives the same mean
        assert got != pytest.approx(np.mean(per_tok[:k]), rel=1e-4)


def test_evaluate_records_matches_hand_computation(world_lm, world_records) -> None:
    model, tok = world_lm
    recs = world_records[:3]
    for alignment in ("correct", "reference"):
        df = evaluate_records(model, tok, recs, alignment=alignment, batch_size=7)
        assert list(df.columns) == ["case_id", *PROB_METRICS]
        assert list(df.case_id) == [r.case_id for r in recs]
        for i, r in enumerate(recs):
            want = hand_case(model, tok, r, reference=alignment == "reference")
            for k, v in want.items():
                assert df.loc[i, k] == pytest.approx(v, abs=1e-6), (alignment, r.case_id, k)
    assert df.attrs["records_per_s"] > 0 and df.attrs["alignment"] == "reference"


def test_families_score_only_their_prompts(world_lm, world_records) -> None:
    """``families`` scores a subset of the prompt families: their columns equal the full call's (up
    to float rounding: other batches), the other families' columns are absent, and a misspelt or
    empty family list fails before any forward."""
    model, tok = world_lm
    recs = world_records[:6]
    full = evaluate_records(model, tok, recs, batch_size=7)
    for fams, short in ((("rewrite",), ["ES"]), (("paraphrase", "neighborhood"), ["PS", "NS"])):
        part = evaluate_records(model, tok, recs, batch_size=7, families=fams)
        cols = [k for k in PROB_METRICS if k.split("_")[0] in short]
        assert list(part.columns) == ["case_id", *cols]
        pd.testing.assert_frame_equal(part, full[["case_id", *cols]], check_exact=False, atol=1e-6, rtol=0)
    assert list(evaluate_records(model, tok, [], families=("rewrite",)).columns) == ["case_id", "ES", "ES_mag", "ES_acc"]
    for bad in (("rewrites",), ()):
        with pytest.raises(ValueError, match="families must be a non-empty subset"):
            evaluate_records(model, tok, recs, families=bad)


def test_correct_mode_never_scores_bos(word_lm) -> None:
    model, tok = word_lm
    bos = tok.bos_token_id
    assert encode(tok, "the cat")[0] == bos  # the tokenizer adds BOS, like Llama-3's
    prefix, target = "the cat sat on", "a mat"
    t = target_ids(tok, target)
    assert bos not in t and len(t) == 2
    assert list(tok(" " + target)["input_ids"]) == [bos, *t]
    p = encode(tok, prefix)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), -1)
    correct = -(logp[len(p) - 1, t[0]] + logp[len(p), t[1]]).item() / 2
    shifted = -(logp[len(p) - 1, bos] + logp[len(p), t[0]] + logp[len(p) + 1, t[1]]).item() / 3
    got_c = score_targets(model, tok, [prefix], [target], alignment="correct").nll[0]
    got_r = score_targets(model, tok, [prefix], [target], alignment="reference").nll[0]
    assert got_c == pytest.approx(correct, rel=1e-5)
    assert got_r == pytest.approx(shifted, rel=1e-5)
    assert got_c != pytest.approx(got_r, rel=1e-3)


@contextlib.contextmanager
def argmax_at(model, tokens: dict[int, int]):
    """The final hidden state at each position ``p`` of ``tokens`` set so that the output head's
    logits there are 10 for ``tokens[p]`` and 0 for every other token (hidden 32 > the 18-word
    vocabulary: an exact solve)."""
    backbone, head = backbone_and_head(model)
    w = head.weight.detach().double()

    def hook(module, args, out):
        for pos, t in tokens.items():
            e = torch.zeros(w.shape[0], 1, dtype=torch.float64)
            e[t] = 10.0
            out.last_hidden_state[:, pos] = torch.linalg.lstsq(w, e).solution[:, 0].to(out.last_hidden_state.dtype)
    handle = backbone.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_reference_mode_accuracy_needs_bos_argmax(word_lm) -> None:
    """SPEC §8.1: with the shift, `*_correct` requires BOS to be the argmax after the prompt (and
    the target after BOS); without it, the target right after the prompt."""
    model, tok = word_lm
    prefix, target = "the cat sat on", "a"
    p, (t,), bos = len(encode(tok, prefix)), target_ids(tok, target), tok.bos_token_id
    other = next(i for i in range(len(tok)) if i not in (t, bos))

    def correct(tokens: dict[int, int], alignment: str) -> bool:
        with argmax_at(model, tokens):
            return bool(score_targets(model, tok, [prefix], [target], alignment=alignment).correct[0])

    assert correct({p - 1: bos, p: t}, "reference")
    assert not correct({p - 1: t, p: t}, "reference")  # the target right after the prompt: not BOS
    assert not correct({p - 1: bos, p: other}, "reference")
    assert correct({p - 1: t}, "correct")
    assert not correct({p - 1: bos}, "correct")


def test_batch_equals_one_at_a_time(world_lm, world_records) -> None:
    model, tok = world_lm
    recs = world_records[:5]
    kw = dict(generation=True, gen_max_len=24, gen_seed=3)
    batched = evaluate_records(model, tok, recs, batch_size=64, gen_batch_size=16, **kw)
    single = pd.concat([evaluate_records(model, tok, [r], batch_size=5, gen_batch_size=3, **kw)
                        for r in recs], ignore_index=True)
    assert list(batched.columns) == ["case_id", *PROB_METRICS, "GE"]
    assert (batched.GE > 0).all()
    pd.testing.assert_frame_equal(batched, single, check_exact=False, atol=1e-6, rtol=0)


def test_word_records_by_hand(word_lm) -> None:
    model, tok = word_lm
    recs = [word_record(7, "{} is capital of", "Paris", "France", "a mat"),
            word_record(9, "the {} sat on", "dog", "a mat", "Paris")]
    df = evaluate_records(model, tok, recs, batch_size=4)
    for i, r in enumerate(recs):
        for k, v in hand_case(model, tok, r).items():
            assert df.loc[i, k] == pytest.approx(v, abs=1e-6)


def test_rs_requires_generation(word_lm) -> None:
    model, tok = word_lm
    with pytest.raises(ValueError, match="generation"):
        evaluate_records(model, tok, [], rs_resources=object())


def test_rs_scores_each_case_on_its_own_generations(word_lm) -> None:
    """RS inside evaluate_records: the texts of one batched generation over every case's prompts
    are grouped back to their own case (in prompt order) before scoring, and the RS column holds
    each case's score. A spy stands in for the TF-IDF resources."""
    from editlib.generation import sample_texts

    model, tok = word_lm
    prompts = {11: ("the cat",), 5: ("a dog ran", "Paris is"), 8: ("the mat", "France is", "a cat sat on")}
    recs = [dataclasses.replace(word_record(c, "{} is capital of", "Paris", "France", "a mat"),
                                generation_prompts=g) for c, g in prompts.items()]

    class SpyRS:
        def __init__(self):
            self.calls: list[tuple[int, list[str]]] = []

        def score(self, r: Record, texts) -> float:
            self.calls.append((r.case_id, list(texts)))
            return len(texts) + r.case_id

    spy = SpyRS()
    kw = dict(max_len=12, seed=4)
    df = evaluate_records(model, tok, recs, generation=True, gen_max_len=kw["max_len"], gen_seed=kw["seed"],
                          gen_batch_size=4, rs_resources=spy)
    assert [c for c, _ in spy.calls] == [11, 5, 8]
    for (case_id, texts), r in zip(spy.calls, recs):
        keys = [(r.case_id, j) for j in range(len(r.generation_prompts))]
        own = sample_texts(model, tok, list(r.generation_prompts), keys=keys, batch_size=64, **kw)
        assert texts == own, case_id
        assert all(t.startswith(p) for t, p in zip(texts, r.generation_prompts)), case_id
    assert df.case_id.tolist() == [11, 5, 8] and df.RS.tolist() == [12.0, 7.0, 11.0]


# --------------------------------------------------------------------------- summaries

def toy_cases() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 9
    df = pd.DataFrame({"case_id": np.arange(n), "ES": rng.random(n), "PS": rng.random(n),
                       "NS": rng.random(n), "ES_mag": rng.normal(size=n), "GE": 5 + rng.random(n)})
    df["method"] = ["a", "b", "a"] * 3
    return df


def test_summary_mean_std_and_s() -> None:
    df = toy_cases()
    s = summarize_cases(df, decimals=None).iloc[0]
    for m in ("ES", "PS", "NS", "ES_mag", "GE"):
        assert s[f"{m}_mean"] == pytest.approx(df[m].mean() * 100)
        assert s[f"{m}_std"] == pytest.approx(np.sqrt(((df[m] - df[m].mean()) ** 2).mean()) * 100)
    assert s["S"] == pytest.approx(hmean([s.ES_mean, s.PS_mean, s.NS_mean]))
    assert s["n"] == len(df)
    rounded = summarize_cases(df).iloc[0]  # summarize.py: x100, 2 decimals, then S
    assert rounded["ES_mean"] == round(df.ES.mean() * 100, 2)
    assert rounded["S"] == pytest.approx(hmean([rounded.ES_mean, rounded.PS_mean, rounded.NS_mean]))


def test_summary_grouped_and_formatted() -> None:
    df = toy_cases()
    g = summarize_cases(df, by="method")
    assert list(g["method"]) == ["a", "b"] and list(g["n"]) == [6, 3]
    sub = df[df.method == "b"]
    assert g.loc[1, "NS_mean"] == round(sub.NS.mean() * 100, 2)
    f = format_summary(g)
    assert list(f.columns) == ["method", "n", "failed", "S", "ES", "PS", "NS", "ES_mag", "GE"]
    assert list(f["failed"]) == ["0", "0"]
    assert f.loc[1, "ES"] == f"{g.loc[1, 'ES_mean']:.2f}({g.loc[1, 'ES_std']:.2f})"
    paper = pd.DataFrame([{"n": 10, "S": 94.1, "ES_mean": 98.05, "ES_std": 11.34, "PS_mean": 90.0,
                           "PS_std": 0.0, "NS_mean": 95.0, "NS_std": 1.5}])
    fp = format_summary(paper).iloc[0]
    assert fp["ES"] == "98.05(11.34)" and fp["S"] == "94.10" and fp["PS"] == "90.00(0.00)"


def test_failed_rows_are_counted_not_averaged() -> None:
    """A failed case is counted in n and n_failed and left out of every mean: never a valid zero
    (a NaN score without the flag counts as failed too)."""
    df = toy_cases()
    ok = summarize_cases(df, by="method", decimals=None)
    bad = df.copy()
    extra = bad[bad.method == "b"].iloc[:2].copy()
    extra[["ES", "PS", "NS", "ES_mag", "GE"]] = np.nan
    extra["failed"] = True
    extra["fail_reason"] = "value optimisation diverged: non-finite loss"
    bad["failed"], bad["fail_reason"] = False, ""
    zero = bad[bad.method == "b"].iloc[:1].copy()
    zero[["ES", "PS", "NS"]] = [0.0, np.nan, 0.0]  # NaN PS without the flag
    both = pd.concat([bad, extra, zero], ignore_index=True)
    g = summarize_cases(both, by="method", decimals=None)
    assert list(g["n"]) == [6, 6] and list(g["n_failed"]) == [0, 3]
    for m in ("ES_mean", "NS_mean", "S"):
        assert g.loc[1, m] == pytest.approx(ok.loc[1, m])  # the failed rows changed no mean
    assert list(format_summary(g)["failed"]) == ["0", "3"]


def test_harmonic_score() -> None:
    assert harmonic_score(90, 80, 70) == pytest.approx(hmean([90, 80, 70]))
    assert harmonic_score(0, 80, 70) == 0.0


# --------------------------------------------------------------------------- RS

def test_rs_tfidf_cosine(tmp_path: Path) -> None:
    vocab = {"paris": 0, "france": 1, "capital": 2, "city": 3}
    idf = np.array([1.0, 2.0, 1.5, 3.0])
    snippets = [{"relation_id": "P36", "target_id": "Q90",
                 "samples": [{"name": "X", "text": "Paris is the capital."},
                             {"name": "Y", "text": "Paris, France"}]}]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(vocab))
    np.save(tmp_path / "idf.npy", idf)
    rs = RSResources.from_dir(tmp_path)
    rec = Record(case_id=0, prompt="{} is in", subject="S", relation_id="P36",
                 target_true=Target("Rome", "Q220"), target_new=Target("Paris", "Q90"),
                 paraphrase_prompts=("p",), neighborhood_prompts=("n",))
    gens = ["The city of Paris", "a city, a city"]
    # generations: paris 1, city 3 ; snippets: paris 2, capital 1, france 1 (words of >= 2 chars)
    a = np.array([1 * 1.0, 0, 0, 3 * 3.0])
    b = np.array([2 * 1.0, 1 * 2.0, 1 * 1.5, 0])
    assert rs.score(rec, gens) == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    other = dataclasses.replace(rec, target_new=Target("Lyon", "Q456"))
    assert np.isnan(rs.score(other, gens))  # no snippets: the reference's 0/0
    with pytest.raises(FileNotFoundError, match="idf.npy"):
        RSResources.from_dir(tmp_path / "nowhere")


# --------------------------------------------------------------------------- miniature + CLI

def test_unedited_miniature_scores_es_0_ns_100() -> None:
    from editlib.models import load_model
    from editlib.tiny import COMMITTED_MINIATURE, load_tiny_records

    if not COMMITTED_MINIATURE.is_dir():
        pytest.skip(f"{COMMITTED_MINIATURE} not built yet (make tiny-world)")
    model, tok = load_model(str(COMMITTED_MINIATURE))
    df = evaluate_records(model, tok, load_tiny_records(COMMITTED_MINIATURE)[:100])
    assert df.ES.mean() < 0.05
    assert df.NS.mean() > 0.95


def test_cli_evaluate(world_model_dir: Path, world_records, tmp_path: Path, capsys,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    from editlib.__main__ import main
    from editlib.counterfact import save_records, sample

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec_path = save_records(world_records, tmp_path / "records.json")
    out = tmp_path / "res" / "eval.parquet"
    rc = main(["evaluate", "--model", str(world_model_dir), "--records", str(rec_path), "--n", "4",
               "--gen-max-len", "20", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    df = pd.read_parquet(out)
    assert list(df.case_id) == [r.case_id for r in sample(world_records, 4)]
    assert list(df.columns) == ["case_id", *PROB_METRICS, "GE"]
    printed = capsys.readouterr().out
    assert "records/s" in printed and "ES" in printed and "S" in printed
    assert not list(out.parent.glob("*.tmp"))
    rc = main(["evaluate", "--model", str(world_model_dir), "--records", str(rec_path),
               "--no-generation", "--alignment", "reference", "--device", "cpu", "--out", str(out)])
    assert rc == 0 and "GE" not in pd.read_parquet(out).columns
    capsys.readouterr()
    rc = main(["evaluate", "--model", str(world_model_dir), "--records", str(rec_path), "--n", "4",
               "--no-generation", "--also-alignment", "reference", "--device", "cpu", "--out", str(out)])
    assert rc == 0 and "ES@reference" in pd.read_parquet(out).columns
    assert "\nreference alignment:\n" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(world_model_dir), "--records", str(rec_path), "--also-alignment",
                 "correct", "--device", "cpu", "--out", str(out)]) != 0
    assert "--also-alignment must be the alignment other than --alignment correct" in capsys.readouterr().err


def test_shared_inputs_run_once_and_score_the_same(word_lm) -> None:
    """Scoring new and true after the same prompts in one call: single-token targets share the
    prompt's forward (inputs stop at the last position read), multi-token ones do not; scores
    equal separate calls."""
    model, tok = word_lm
    prefixes = ["the cat sat on", "a dog ran to", "the cat sat on"]
    new, true = ["a", "the", "a mat"], ["the", "a", "the mat"]
    assert [len(target_ids(tok, t)) for t in new + true] == [1, 1, 2, 1, 1, 2]
    rows: list[int] = []
    hook = model.base_model.register_forward_hook(lambda m, a, k, out: rows.append(k["input_ids"].shape[0]),
                                                  with_kwargs=True)
    try:
        both = score_targets(model, tok, prefixes * 2, new + true)
    finally:
        hook.remove()
    assert sum(rows) == 4  # "the cat sat on" and "a dog ran to" once each, + the two "… a" / "… the" inputs
    alone = [score_targets(model, tok, [p], [t]) for p, t in zip(prefixes * 2, new + true)]
    np.testing.assert_allclose(both.nll, [a.nll[0] for a in alone], rtol=1e-5)
    assert list(both.correct) == [bool(a.correct[0]) for a in alone]


class _Poison:
    """Stands in for a per-row edit hook: rows of edit 1 get NaN logits (an edit that blew the
    model up, an overflowing float16 forward); scoring and sampling set ``rows`` per forward."""

    def __init__(self, model):
        self.rows = None
        self._h = model.model.norm.register_forward_hook(self._hook)  # [batch, tokens, d]

    def _hook(self, module, inputs, out):
        if self.rows is None:
            return out
        out = out.clone()
        out[self.rows.to(out.device) == 1] = float("nan")
        return out

    def close(self):
        self._h.remove()


def test_nonfinite_outputs_blank_the_case_and_mark_it_failed(world_lm, world_records) -> None:
    """A case whose logits are NaN (scoring or GE sampling) gets no scores at all, never a valid
    ES = PS = NS = 0; the other cases are untouched; the protocols mark it failed with a reason and
    the summary counts it."""
    from editlib.generation import sample_texts
    from editlib.metrics import NONFINITE_REASON, failed_rows, with_unscored
    from editlib.protocols import _mark

    model, tok = world_lm
    recs = world_records[:3]
    groups = [0, 1, 0]
    clean = evaluate_records(model, tok, recs, generation=True, gen_max_len=12)
    hook = _Poison(model)
    try:
        df = evaluate_records(model, tok, recs, generation=True, gen_max_len=12, groups=groups, deltas=hook)
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            sample_texts(model, tok, ["a", "b"], max_len=6, groups=[0, 1], deltas=hook)
        texts, finite = sample_texts(model, tok, ["a", "b"], max_len=6, groups=[0, 1], deltas=hook,
                                     return_finite=True)
        assert finite == [True, False]
    finally:
        hook.close()
    assert list(df.columns) == list(clean.columns)
    assert df.drop(columns="case_id").iloc[1].isna().all()
    pd.testing.assert_frame_equal(df.iloc[[0, 2]], clean.iloc[[0, 2]])
    assert with_unscored(df, ["", "", ""]) == ["", NONFINITE_REASON, ""]
    marked = _mark(df.copy(), ["", "", ""], np.zeros(3, dtype=bool), 0.0)
    assert marked["failed"].tolist() == [False, True, False]
    assert marked["fail_reason"].iloc[1] == NONFINITE_REASON
    assert failed_rows(marked).tolist() == [False, True, False]
    assert summarize_cases(marked)["n_failed"].iloc[0] == 1


def test_generation_without_prompts_fails_naming_the_record(world_lm, world_records) -> None:
    """GE of a record without generation prompts would be NaN, silently left out of GE's mean: with
    generation on the call fails before any scoring, naming the record; without it, it scores."""
    import dataclasses

    from editlib.records import RecordError

    model, tok = world_lm
    recs = [world_records[0], dataclasses.replace(world_records[1], generation_prompts=())]
    with pytest.raises(RecordError, match=rf"1 record\(s\) have no generation_prompts \(case_id {recs[1].case_id}\)"):
        evaluate_records(model, tok, recs, generation=True, gen_max_len=8)
    assert len(evaluate_records(model, tok, recs)) == 2


def test_also_alignment_scores_both_readings_in_one_evaluation(world_lm, world_records) -> None:
    """``also_alignment``: the second alignment's ES, PS, NS, magnitudes and accuracies beside the
    first's, each equal to an evaluation under that alignment alone (the same scoring calls), GE
    once; :func:`with_alignment` reads the frame as if it had been scored the other way. On the
    miniature (BOS added, Llama-3's shape) the two readings differ."""
    from editlib.metrics import alignment_column, alignments_in, with_alignment

    model, tok = world_lm
    recs = world_records[:6]
    kw = dict(batch_size=7, generation=True, gen_max_len=10)
    both = evaluate_records(model, tok, recs, also_alignment="reference", **kw)
    correct = evaluate_records(model, tok, recs, **kw)
    reference = evaluate_records(model, tok, recs, alignment="reference", **kw)
    assert list(both.columns) == ["case_id", *PROB_METRICS, *(alignment_column(m, "reference") for m in PROB_METRICS), "GE"]
    pd.testing.assert_frame_equal(both[list(correct.columns)], correct)
    pd.testing.assert_frame_equal(with_alignment(both, "reference"), reference)
    assert alignments_in(both) == ["reference"] and alignments_in(correct) == []
    assert not np.allclose(correct["ES_mag"], reference["ES_mag"])  # the readings differ here
    flipped = evaluate_records(model, tok, recs, alignment="reference", also_alignment="correct", batch_size=7)
    pd.testing.assert_frame_equal(with_alignment(flipped, "correct"), correct.drop(columns="GE"))
    for bad in ("correct", "raw"):
        with pytest.raises(ValueError, match="also_alignment must be the alignment other than 'correct'"):
            evaluate_records(model, tok, recs, also_alignment=bad)
    with pytest.raises(ValueError, match=r"no 'reference' alignment scores \(no column ES@reference"):
        with_alignment(correct, "reference")
    empty = evaluate_records(model, tok, [], also_alignment="reference")
    assert list(empty.columns) == list(both.columns[:-1])


def test_with_alignment_keeps_the_failed_marks(world_lm, world_records) -> None:
    """A failed case is blank under both alignments and stays counted, never averaged in."""
    from editlib.metrics import with_alignment
    from editlib.protocols import _mark

    model, tok = world_lm
    both = evaluate_records(model, tok, world_records[:3], also_alignment="reference")
    marked = _mark(both, ["", "diverged", ""], np.zeros(3, dtype=bool), 0.0)
    ref = with_alignment(marked, "reference")
    assert ref["failed"].tolist() == [False, True, False] and ref.iloc[1][list(PROB_METRICS)].isna().all()
    assert summarize_cases(ref)["n_failed"].iloc[0] == 1
    assert ref.attrs["alignment"] == "reference"


def test_a_second_reading_that_is_not_finite_blanks_only_its_own_columns(world_lm, world_records) -> None:
    """NaN logits under the second alignment alone leave the case's own scores (and whether it
    failed) as they are without the option; the second reading has none there, which its
    summaries count as a failure."""
    from editlib import metrics
    from editlib.metrics import with_alignment

    model, tok = world_lm
    recs = world_records[:3]
    real = metrics._probability_columns

    def poisoned(model, tok, records, alignment, *a, **k):
        out = real(model, tok, records, alignment, *a, **k)
        if alignment == "reference":
            out[metrics._NONFINITE] = np.array([False, True, False])
        return out

    plain = evaluate_records(model, tok, recs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "_probability_columns", poisoned)
        both = evaluate_records(model, tok, recs, also_alignment="reference")
    pd.testing.assert_frame_equal(both[list(plain.columns)], plain)
    with pytest.warns(RuntimeWarning, match="1 of 3 rows have an ES but none under the 'reference' alignment"):
        ref = with_alignment(both, "reference")
    assert ref.iloc[1][list(PROB_METRICS)].isna().all() and ref.iloc[[0, 2]][list(PROB_METRICS)].notna().all().all()
    assert summarize_cases(ref)["n_failed"].iloc[0] == 1 and summarize_cases(both)["n_failed"].iloc[0] == 0


def test_rows_of_a_run_without_the_second_reading_are_not_lost_silently(world_lm, world_records) -> None:
    """Cases of a run with ``also_alignment`` concatenated with those of a run without it: read
    under the second alignment, the second run's rows have no scores, which counts them as failed;
    ``with_alignment`` says how many (a frame where every scored row has both readings stays quiet)."""
    import warnings
    from editlib.metrics import with_alignment

    model, tok = world_lm
    both = evaluate_records(model, tok, world_records[:2], also_alignment="reference")
    plain = evaluate_records(model, tok, world_records[2:5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_alignment(both, "reference")
    mixed = pd.concat([both, plain], ignore_index=True)
    with pytest.warns(RuntimeWarning, match="3 of 5 rows have an ES but none"):
        ref = with_alignment(mixed, "reference")
    assert summarize_cases(ref)["n_failed"].iloc[0] == 3
