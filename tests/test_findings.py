"""editlib.findings: the paper's claims and the per-experiment paragraphs, computed from cases."""
import numpy as np
import pandas as pd
import pytest

from editlib import findings


def cases(configs: list[tuple[dict, float, float, float]], n: int = 20, orderings=(0,)) -> pd.DataFrame:
    """Per configuration (labels, ES, PS, NS rates): n cases per ordering with exactly those rates."""
    rows = []
    for o in orderings:
        for labels, es, ps, ns in configs:
            for i in range(n):
                rows.append({**labels, "ordering": o, "eval": labels.get("eval", "current"), "case_id": i,
                             "ES": float(i < es * n), "PS": float(i < ps * n), "NS": float(i < ns * n), "failed": False})
    return pd.DataFrame(rows)


def layer_search(best: int, n_layers: int = 6) -> pd.DataFrame:
    return cases([({"method": m, "layer": l}, 1.0 if l == best else 0.2, 1.0 if l == best else 0.2, 0.95)
                  for m in ("rome", "memit") for l in range(n_layers)])


def batch(ns_drop: float, es_drop: float) -> pd.DataFrame:
    return cases([({"method": m, "batch_size": b}, 1.0 - es_drop * k, 0.95 - es_drop * k, 0.95 - ns_drop * k)
                  for m in ("memit", "emmet") for k, b in enumerate((4, 16, 64))])


def sequential(one_batch_better: bool) -> pd.DataFrame:
    cur = {1: 0.9, 4: 0.95, 20: 0.85}  # 20 facts: B = 20 is one batch of all of them
    if one_batch_better:
        cur[20] = 1.0
    return cases([({"method": "memit", "batch_size": b, "eval": e}, v, v, v)
                  for b, v in cur.items() for e in ("current", "final")])


def test_claims_hold_on_results_that_show_them():
    t = findings.claims_table({"layer_search": layer_search(0), "singular": layer_search(0)[lambda d: d.layer == 0],
                               "batch": batch(ns_drop=0.2, es_drop=0.05), "sequential": sequential(False)})
    got = dict(zip(t["claim"], t["holds here"]))
    assert got == {"an early layer is the best place to edit": "yes", "MEMIT ≈ ROME for singular edits": "yes",
                   "bigger batches hurt, NS most": "yes", "sequential batches beat one big batch of the same facts": "yes"}
    seq = t[t.claim.str.startswith("sequential")].iloc[0]
    assert "B = 4 in sequence" in seq["ours"] and "one batch of 20" in seq["ours"]
    assert list(t.columns) == ["claim", "paper", "ours", "holds here", "margin", "spread"]


def test_claims_fail_on_results_that_contradict_them():
    t = findings.claims_table({"layer_search": layer_search(5), "batch": batch(ns_drop=0.02, es_drop=0.1),
                               "sequential": sequential(True)})
    got = dict(zip(t["claim"], t["holds here"]))
    assert got["an early layer is the best place to edit"] == "no"
    assert got["bigger batches hurt, NS most"] == "no"  # ES falls most here
    assert got["sequential batches beat one big batch of the same facts"] == "no"
    assert "MEMIT ≈ ROME for singular edits" not in got  # no singular experiment: no row


def test_a_score_that_rises_with_the_batch_size_reads_as_a_rise():
    """Drops are printed as signed changes: a score that rises from the smallest to the largest
    batch is "+x", never "−-x"."""
    t = findings.claims_table({"batch": batch(ns_drop=0.2, es_drop=-0.05)})  # PS rises (ES is capped at 1)
    row = t[t.claim == "bigger batches hurt, NS most"].iloc[0]
    assert "−-" not in row["ours"] and "PS +5.00" in row["ours"] and "NS −40.00" in row["ours"], row["ours"]
    assert row["holds here"] == "yes"


def test_rome_memit_difference_beyond_threshold_fails():
    c = pd.concat([cases([({"method": "memit", "layer": 0}, 1.0, 1.0, 1.0)]),
                   cases([({"method": "rome", "layer": 0}, 0.8, 0.8, 0.8)])])
    row = findings.claim_rome_memit({"singular": c})
    assert row["holds"] is False and "ΔS +" in row["ours"]


def test_spread_over_orderings_and_lambda_is_not_judged():
    c = cases([({"method": "memit", "lam": lam}, e, e, 0.9) for lam, e in ((1.0, 0.5), (100.0, 0.95))],
              orderings=(0, 1, 2))
    row = findings.claim_lambda({"sweep": c})
    assert row["holds"] is None and "λ = 100" in row["ours"]
    assert "100.00 ± 0.00 over 3 orderings" in row["spread"]
    t = findings.claims_table({"sweep": c})
    assert t["holds here"].tolist() == ["n/a"]
    flat = cases([({"method": "emmet", "lam": lam}, 0.9, 0.9, 0.9) for lam in (0.0, 1e-3, 1e-2)])
    row = findings.claim_lambda({"sweep": flat})  # a tie names no λ as the best
    assert "EMMET: S flat over λ (90.00, every λ within 0.01)" in row["ours"] and "λ = " not in row["ours"]


def test_findings_paragraphs_state_the_numbers():
    ls = layer_search(1)
    txt = findings.finding("layer_search", ls)
    assert txt.startswith("Over 6 layers, MEMIT edits best at layer 1")
    b = findings.finding("batch", batch(ns_drop=0.2, es_drop=0.05))
    assert "MEMIT: S" in b and "falls more than 5 points below it from B = 16 on" in b
    s = findings.finding("sequential", sequential(False))
    assert "B = 4 scores best right after each batch" in s and "keeps the most on the final model" in s
    assert findings.finding("unknown", ls) == ""


def test_claims_are_about_the_paper_methods_and_need_a_one_batch_run():
    """Newer editors in the same run do not change whether the paper's claims hold; the sequential
    claim needs a run that edits every fact in one batch."""
    b = batch(ns_drop=0.2, es_drop=0.05)
    worse = cases([({"method": "encore", "batch_size": B}, 0.5, 0.5, 0.99) for B in (4, 16, 64)])
    assert findings.claim_batch_hurts({"batch": pd.concat([b, worse])})["holds"] is True
    seq = sequential(False)
    assert findings.claim_sequential({"sequential": seq}) is not None
    assert findings.claim_sequential({"sequential": seq[seq.batch_size < 20]}) is None  # largest B = 4 < 20 facts


def test_claims_count_facts_per_ordering():
    """Each ordering draws its own facts (other case ids): with three orderings of 20 facts the run's
    one batch of 20 still edits all of an ordering's facts, so the sequential claim has its row,
    and the singular paragraph counts facts per ordering."""
    seq = sequential(False)
    three = pd.concat([seq.assign(ordering=o, case_id=seq["case_id"] + 1000 * o) for o in (0, 1, 2)],
                      ignore_index=True)
    row = findings.claim_sequential({"sequential": three})
    assert row is not None and row["holds"] is True and "over 3 orderings" in row["spread"]
    assert "sequential batches beat one big batch of the same facts" in findings.claims_table({"sequential": three})["claim"].tolist()
    sg = layer_search(0)[lambda d: d.layer == 0]
    sg3 = pd.concat([sg.assign(ordering=o, case_id=sg["case_id"] + 1000 * o) for o in (0, 1, 2)], ignore_index=True)
    assert findings.finding("singular", sg3).startswith("Singular edits of 20 facts in each of 3 orderings at layer 0")
    assert findings.finding("singular", sg).startswith("Singular edits of 20 facts at layer 0")


def test_rome_memit_spread_is_the_per_ordering_delta_s():
    """The claim's spread is ΔS = S(MEMIT) − S(ROME) of each ordering alone: here 0 and +10 points
    (every score equal, so S = 100 × the rate), i.e. 5.00 ± 7.07 (sample std) over 2 orderings."""
    c = pd.concat([cases([({"method": "memit", "layer": 0}, .9, .9, .9), ({"method": "rome", "layer": 0}, .9, .9, .9)],
                         orderings=(0,)),
                   cases([({"method": "memit", "layer": 0}, .9, .9, .9), ({"method": "rome", "layer": 0}, .8, .8, .8)],
                         orderings=(1,))], ignore_index=True)
    row = findings.claim_rome_memit({"singular": c})
    assert row["spread"] == "ΔS: 5.00 ± 7.07 over 2 orderings"
    assert "ΔS +5.00" in row["ours"] and row["holds"] is False


def test_singular_paragraph_counts_facts_without_an_ordering_column():
    """Cases stored without an ordering column (one ordering): facts are the distinct case ids,
    not the rows of every method."""
    sg = layer_search(0)[lambda d: d.layer == 0].drop(columns="ordering")
    assert findings.finding("singular", sg).startswith("Singular edits of 20 facts at layer 0")


def _fail(c: pd.DataFrame, where) -> pd.DataFrame:
    """``c`` with the cases selected by ``where`` failed (no scores), as a diverged value leaves them."""
    c = c.copy()
    sel = where(c)
    c.loc[sel, ["ES", "PS", "NS"]] = np.nan
    c.loc[sel, "failed"] = True
    return c


def test_configurations_whose_edits_all_failed_are_named_not_compared():
    """A configuration whose every edit failed has no S: the paragraphs say so and the claims read
    n/a, instead of "stays within 5 points" or "largest drop: ES" computed from NaN."""
    b = _fail(batch(ns_drop=0.2, es_drop=0.05), lambda d: d.batch_size == 64)
    text = findings.finding("batch", b)
    assert "no scores at B = 64 (every edit failed)" in text and "nan" not in text.lower()
    assert "at B = 16, no scores at B = 64" in text  # the comparison runs over the scored batch sizes
    t = findings.claims_table({"batch": b})
    row = t.iloc[0]
    assert row["holds here"] == "n/a" and "no scores: MEMIT at B = 64" in row["ours"] and "nan" not in row["ours"].lower()

    everything = _fail(batch(ns_drop=0.2, es_drop=0.05), lambda d: d.method == "memit")
    assert "MEMIT: no scores at any batch size" in findings.finding("batch", everything)
    ls = _fail(layer_search(0), lambda d: d.layer == 3)
    assert "no scores at layer = 3" in findings.finding("layer_search", ls)
    row = findings.claims_table({"layer_search": ls}).iloc[0]  # layer 3 might have been the best: no verdict
    assert row["holds here"] == "n/a: 20 of 20 edits at MEMIT layer 3 failed (over 25%)"
    assert row["ours"].endswith("(failed edits, left out of the means: 20/20 at MEMIT layer 3)")  # MEMIT's layers are judged
    dead = _fail(layer_search(0), lambda d: d.method == "memit")
    assert findings.claims_table({"layer_search": dead})["holds here"].iloc[0] == "n/a"
    single = _fail(layer_search(0)[lambda d: d.layer == 0], lambda d: d.method == "rome")
    assert "ROME no scores (all 20 edits failed)" in findings.finding("singular", single)
    assert findings.claims_table({"singular": single})["holds here"].iloc[0] == "n/a"
    seq = _fail(sequential(False), lambda d: d.batch_size == 20)
    assert findings.claims_table({"sequential": seq})["holds here"].iloc[0] == "n/a"
    assert "nan" not in findings.finding("sequential", seq).lower()


def test_partly_failed_configurations_are_named_and_too_many_take_the_verdict():
    """Failed edits are left out of the means, so every claim and paragraph that averages over a
    configuration where some failed names them (k/n); more than MAX_FAILED (25 %) of one compared
    configuration failed leaves the claim without a verdict, as notebook 07's answers."""
    few = _fail(batch(ns_drop=0.2, es_drop=0.05), lambda d: (d.batch_size == 64) & (d.method == "memit") & (d.case_id < 2))
    row = findings.claims_table({"batch": few}).iloc[0]
    assert row["holds here"] == "yes" and row["ours"].endswith("(failed edits, left out of the means: 2/20 at MEMIT B = 64)")
    assert "failed edits, left out of the means: 2/20 at B = 64" in findings.finding("batch", few)
    many = _fail(batch(ns_drop=0.2, es_drop=0.05), lambda d: (d.batch_size == 64) & (d.method == "memit") & (d.case_id < 6))
    row = findings.claims_table({"batch": many}).iloc[0]
    assert row["holds here"] == "n/a: 6 of 20 edits at MEMIT B = 64 failed (over 25%)" and "6/20 at MEMIT B = 64" in row["ours"]
    # failures outside what a claim compares (ROME's layers for the early-layer claim, a middle batch
    # size for the batch claim) are not its concern: its verdict and text stand
    middle = _fail(batch(ns_drop=0.2, es_drop=0.05), lambda d: (d.batch_size == 16) & (d.case_id < 10))
    row = findings.claims_table({"batch": middle}).iloc[0]
    assert row["holds here"] == "yes" and "failed" not in row["ours"]
    assert "10/20 at B = 16" in findings.finding("batch", middle)  # the paragraph still names them
    rome = _fail(layer_search(0), lambda d: (d.method == "rome") & (d.layer == 5))
    assert findings.claims_table({"layer_search": rome})["holds here"].iloc[0] == "yes"
    clean = findings.claims_table({"batch": batch(ns_drop=0.2, es_drop=0.05)}).iloc[0]
    assert clean["holds here"] == "yes" and "failed" not in clean["ours"]  # nothing failed: nothing added
    seq = _fail(sequential(False), lambda d: (d.batch_size == 4) & (d.case_id < 1))
    assert "(failed edits, left out of the means: 1/20 at MEMIT B = 4)" in findings.claims_table({"sequential": seq})["ours"].iloc[0]
    assert "failed edits, left out of the means: 1/20 at B = 4" in findings.finding("sequential", seq)
    single = _fail(layer_search(0)[lambda d: d.layer == 0], lambda d: (d.method == "rome") & (d.case_id < 3))
    assert "ROME S" in findings.finding("singular", single) and "3 of 20 edits failed, left out" in findings.finding("singular", single)
    lam = cases([({"method": "memit", "lam": l}, 0.9, 0.9, 0.9 - l / 100) for l in (1.0, 10.0)])
    lam = _fail(lam, lambda d: (d.lam == 10.0) & (d.case_id < 1))
    assert "1/20 at MEMIT λ = 10" in findings.claims_table({"sweep": lam})["ours"].iloc[0]
    assert "failed edits, left out of the means: 1/20 at λ = 10" in findings.finding("sweep", lam)
    ls = _fail(layer_search(0), lambda d: (d.layer == 2) & (d.case_id < 1))
    assert "1/20 at layer = 2" in findings.finding("layer_search", ls)


def test_an_ordering_without_scores_is_left_out_of_the_spread():
    b = batch(ns_drop=0.2, es_drop=0.05)
    three = pd.concat([b.assign(ordering=o) for o in (0, 1, 2)], ignore_index=True)
    spread = findings.claims_table({"batch": three})["spread"].iloc[0]
    assert spread.endswith("over 3 orderings")
    one_dead = _fail(three, lambda d: (d.ordering == 2) & (d.method == "memit") & (d.batch_size == 64))
    assert findings.claims_table({"batch": one_dead})["spread"].iloc[0].endswith(
        "over 2 of 3 (the others: no scores) orderings")


def test_a_partial_layer_search_names_the_layers_it_searched():
    ls = layer_search(0)[lambda d: d.layer.isin([0, 1, 5])]
    assert findings.finding("layer_search", ls).startswith("Over the searched 0, 1, 5 layers, ")
    assert "layer 0 of the searched 0, 1, 5" in findings.claims_table({"layer_search": ls})["ours"].iloc[0]
    assert findings.finding("layer_search", layer_search(0)).startswith("Over 6 layers, ")


def test_the_claims_say_when_an_ordering_disagrees_and_spread_with_the_sample_std():
    """"holds here" is judged on the pooled cases and, with several orderings, on each: a claim one
    ordering reverses reads "yes over all, in 2 of 3 orderings", not a bare "yes". The spread is
    the sample std over orderings, as the tables' "S over orderings" and the figures' bands."""
    parts = [sequential(False).assign(ordering=0), sequential(False).assign(ordering=1),
             sequential(True).assign(ordering=2)]  # ordering 2: one batch scores best
    three = pd.concat(parts, ignore_index=True)
    t = findings.claims_table({"sequential": three})
    assert t["holds here"].iloc[0] == "yes over all, in 2 of 3 orderings"
    margins = np.array([95.0 - 85.0, 95.0 - 85.0, 95.0 - 100.0])  # best sequential S − one batch's, per ordering
    assert t["spread"].iloc[0] == f"MEMIT margin: {margins.mean():.2f} ± {margins.std(ddof=1):.2f} over 3 orderings"
    assert findings.claims_table({"sequential": pd.concat([parts[2].assign(ordering=o) for o in (0, 1)] + [parts[0].assign(ordering=2)],
                                                          ignore_index=True)})["holds here"].iloc[0] == \
        "no over all, yes in 1 of 3 orderings"
    agree = pd.concat([sequential(False).assign(ordering=o) for o in range(3)], ignore_index=True)
    assert findings.claims_table({"sequential": agree})["holds here"].iloc[0] == "yes"


def test_orderings_that_cannot_be_judged_are_not_counted_as_disagreeing():
    """An ordering that cannot be judged, or an experiment run on one ordering next to a
    three-ordering layer search, is no disagreement: the label counts judged orderings only. (An
    ordering whose whole one-batch run failed is a third of that configuration's edits: the claim
    then has no verdict at all, test_partly_failed_configurations_are_named_and_too_many_take_the_verdict.)"""
    agree = pd.concat([sequential(False).assign(ordering=o) for o in range(3)], ignore_index=True)
    dead = _fail(agree, lambda d: (d.ordering == 2) & (d.batch_size == 20))
    assert findings.claims_table({"sequential": dead})["holds here"].iloc[0] == "n/a: 20 of 60 edits at MEMIT B = 20 failed (over 25%)"
    flip = pd.concat([sequential(False).assign(ordering=0), sequential(True).assign(ordering=1),
                      sequential(False).assign(ordering=2)], ignore_index=True)
    per = findings._holds_per_ordering(findings.claim_sequential, {"sequential": flip}, [0, 1, 2, 3])  # 3: not run
    assert per == [True, False, True, None]
    assert findings._holds_label(True, per) == "yes over all, in 2 of 3 orderings; n/a in 1"
    ls = pd.concat([layer_search(0).assign(ordering=o) for o in range(3)], ignore_index=True)
    t = findings.claims_table({"layer_search": ls, "singular": layer_search(0)[lambda d: d.layer == 0]})
    assert t.set_index("claim").loc["MEMIT ≈ ROME for singular edits", "holds here"] == "yes"



def test_the_claims_are_judged_under_a_second_reading_too():
    """With ``evaluation.also_alignment`` the cases hold a second reading: the claims are judged
    under it as well, over the experiments that hold it; without one there is no second table."""
    correct, shifted = layer_search(0), layer_search(5)
    both = correct.assign(**{f"{m}@reference": shifted[m] for m in ("ES", "PS", "NS")})
    stored = {"layer_search": both, "batch": batch(ns_drop=0.2, es_drop=0.05)}  # batch: no second reading
    assert findings.second_reading_claims({"layer_search": correct}) == {}
    other = findings.second_reading_claims(stored)
    assert list(other) == ["reference"]
    main = dict(zip(*findings.claims_table(stored)[["claim", "holds here"]].T.values))
    second = dict(zip(*other["reference"][["claim", "holds here"]].T.values))
    assert main["an early layer is the best place to edit"] == "yes" and second == {"an early layer is the best place to edit": "no"}
