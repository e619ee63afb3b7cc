"""editlib.beyond: the beyond-the-paper params, statistics over orderings, the answers per editor,
and notebook 07's outputs (synthetic cases: every number below is known exactly)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from editlib import beyond, plotting
from editlib.params import ParamsError, resolve
from editlib.protocols import experiment_units, runs_at


def rates(configs, n: int = 20, orderings=(0, 1, 2), shift=None) -> pd.DataFrame:
    """n cases per configuration and ordering with exactly the given ES/PS/NS rates; ``shift``
    (ordering -> rate offset) makes orderings differ."""
    rows = []
    for o in orderings:
        d = (shift or {}).get(o, 0.0)
        for labels, es, ps, ns in configs:
            for i in range(n):
                rows.append({"eval": "current", **labels, "ordering": o, "case_id": 1000 * o + i,
                             "ES": float(i < (es + d) * n), "PS": float(i < (ps + d) * n),
                             "NS": float(i < (ns + d) * n), "failed": False})
    return pd.DataFrame(rows)


def params(tmp_path, **over):
    return resolve("params/tiny.yaml", overrides={"results_dir": str(tmp_path / "results"), **over})


# --------------------------------------------------------------------------- params

def test_study_params_derive_the_beyond_runs(tmp_path):
    p = params(tmp_path, **{"beyond.layer": 2, "beyond.orderings": [0, 3], "beyond.batch": {"total": 8, "batch_sizes": [1, 8],
                            "hparams": {"encore": {"update_norm_lambda": 5.0}}}})
    q = beyond.study_params(p)
    assert q.name == "tiny-beyond" and q.data.orderings == (0, 3)
    assert q.batch.methods == p.beyond.methods and q.sequential.methods == p.beyond.methods
    assert q.batch.total == 8 and q.batch.batch_sizes == (1, 8) and q.batch.windows == (1,) and q.batch.layer == 2
    # the study's own batch overrides (MEMIT λ) stay; beyond's are merged over them
    assert q.method_hparams("memit", 2, "batch").mom2_update_weight == 100
    assert q.method_hparams("encore", 2, "batch").update_norm_lambda == 5.0
    assert p.batch.methods == ("memit", "emmet")  # the study's own sections are untouched


@pytest.mark.parametrize("over, culprit", [
    ({"beyond.batch": {"totl": 8}}, "beyond.batch"),
    ({"beyond.sequential": {"batch_sizes": [4, 64], "total": 32}}, "beyond.sequential.batch_sizes"),
    ({"beyond.batch": {"batch_sizes": [4, 16]}}, "rome"),
    ({"beyond.orderings": [0, 0]}, "beyond.orderings"),
    ({"beyond.methods": ["memit", "mend"]}, "beyond.methods"),
    ({"beyond.layer": "first"}, "beyond.layer"),
    ({"batch.methods": ["rome"], "batch.batch_sizes": [4]}, "rome"),
])
def test_bad_beyond_params_fail_naming_the_key(tmp_path, over, culprit):
    with pytest.raises(ParamsError, match=culprit.replace(".", r"\.")):
        params(tmp_path, **over)


def test_layer_best_reads_the_studys_own_layer_search(tmp_path):
    p = params(tmp_path)
    with pytest.raises(ParamsError, match="layer search"):
        beyond.study_params(p)
    ls = rates([({"method": m, "layer": l}, 0.9 if l == 3 else 0.5, 0.8, 0.9) for m in ("rome", "memit") for l in range(6)],
               orderings=(0,))
    d = tmp_path / "results" / "tiny" / "layer_search"
    d.mkdir(parents=True)
    ls.to_parquet(d / "cases.parquet")
    q = beyond.study_params(p)
    assert q.batch.layer == q.sequential.layer == 3
    assert beyond.study_params(p, resolve_layer=False).batch.layer == "best"


def test_rome_runs_at_batch_size_one_only(tmp_path):
    q = beyond.study_params(params(tmp_path, **{"beyond.layer": 0}))
    study = SimpleNamespace(params=q, which="model", n_layers=6)
    for name, sec in (("batch", q.batch), ("sequential", q.sequential)):
        units = experiment_units(study, name, 0)
        rome = sorted({u.batch_size for u in units if u.method == "rome"})
        assert rome == [1]
        assert sorted({u.batch_size for u in units if u.method == "memit"}) == sorted(sec.batch_sizes)
        assert {u.ordering for u in units} == {0, 1, 2}
    assert runs_at("rome", 1) and not runs_at("rome", 2) and runs_at("emmet", 64)


# --------------------------------------------------------------------------- statistics over orderings

def test_ordering_summary_is_mean_and_std_of_per_ordering_means():
    c = rates([({"method": "memit", "batch_size": 4}, 0.8, 0.6, 0.9)], n=20, shift={0: 0.0, 1: 0.1, 2: -0.1})
    c.loc[0, "failed"] = True  # a failed row is counted, never averaged in
    c.loc[0, ["ES", "PS", "NS"]] = np.nan
    s = beyond.ordering_summary(c, ["method", "batch_size"]).iloc[0]
    per = [c[(c.ordering == o) & ~c.failed]["ES"].mean() * 100 for o in (0, 1, 2)]
    assert s["ES"] == pytest.approx(np.mean(per)) and s["ES_sd"] == pytest.approx(np.std(per, ddof=1))
    assert s["ES_case_std"] == pytest.approx(c[~c.failed]["ES"].std(ddof=0) * 100)
    assert s["orderings"] == 3 and s["n"] == 60 and s["n_failed"] == 1
    from editlib.metrics import harmonic_score
    s_per = [harmonic_score(*(c[(c.ordering == o) & ~c.failed][m].mean() * 100 for m in ("ES", "PS", "NS"))) for o in (0, 1, 2)]
    assert s["S"] == pytest.approx(np.mean(s_per)) and s["S_sd"] == pytest.approx(np.std(s_per, ddof=1))
    row = beyond.format_ordering_summary(beyond.ordering_summary(c, ["method"]), ["method"]).iloc[0]
    assert row["method"] == "MEMIT" and row["failed"] == "1"
    assert row["ES"] == f"{s['ES']:.2f} ± {s['ES_sd']:.2f} ({s['ES_case_std']:.2f})"


def test_figure_bands_are_over_orderings_when_there_are_several():
    c = rates([({"method": "memit", "batch_size": b}, 0.8, 0.7, 0.9) for b in (4, 16)], shift={0: 0.0, 1: 0.05, 2: -0.05})
    s = plotting._stats(c, ["batch_size"])
    per = [c[(c.ordering == o) & (c.batch_size == 4)]["NS"].mean() * 100 for o in (0, 1, 2)]
    assert s.loc[0, "NS_ci"] == pytest.approx(np.std(per, ddof=1)) and s.loc[0, "S_ci"] > 0
    assert plotting.band_label(c) == "±1 std over 3 orderings"
    one = c[c.ordering == 0]
    assert plotting.band_label(one) == plotting.BAND and "S_ci" not in plotting._stats(one, ["batch_size"])
    fig = plotting.plot_batch(c, "memit", "t")
    assert "bands: ±1 std over 3 orderings" in fig.get_suptitle() and "band" not in fig.axes[0].get_ylabel()


# --------------------------------------------------------------------------- the answers

def batch_frame(slope: float) -> pd.DataFrame:
    return rates([({"method": m, "batch_size": b}, 0.95 - slope * k, 0.9 - slope * k, 0.95 - slope * k)
                  for m in ("memit", "alphaedit") for k, b in enumerate((1, 4, 16, 64))]
                 + [({"method": "rome", "batch_size": 1}, 0.95, 0.9, 0.95)], shift={0: 0.0, 1: 0.01, 2: -0.01})


def seq_frame(best: int) -> pd.DataFrame:
    cfg = []
    for b in (1, 4, 32):
        v = 0.95 if b == best else 0.7
        cfg += [({"method": "memit", "batch_size": b, "eval": e}, v, v, v) for e in ("current", "final")]
    return rates(cfg, shift={0: 0.0, 1: 0.01, 2: -0.01})


def test_answers_follow_the_numbers():
    a = beyond.answer("memit", batch_frame(0.1), seq_frame(4)).lower()
    assert "s falls from" in a and "b = 1 to" in a and "one bigger batch scores worse" in a
    assert "moderate batch size (b = 4)" in a
    flat = beyond.answer("memit", batch_frame(0.0), seq_frame(32)).lower()
    assert "barely matters" in flat and "larger batches are better" in flat
    small = beyond.answer("memit", None, seq_frame(1)).lower()
    assert "smallest batches (b = 1) are best" in small and "batch editing:" not in small
    assert "no stored" in beyond.answer("encore", batch_frame(0.1), seq_frame(4))
    rome = beyond.answer("rome", batch_frame(0.1), None)
    assert rome.startswith("**ROME.** Batch editing: only B = 1") and "EMMET is its batched form" in rome


def test_answers_say_when_differences_are_within_the_spread_over_orderings():
    c = seq_frame(4)
    noisy = rates([({"method": "memit", "batch_size": b, "eval": "current"}, 0.9 if b == 4 else 0.88,) * 1 + (0.9, 0.9)
                   for b in (1, 4, 32)], shift={0: 0.0, 1: 0.1, 2: -0.1})
    assert "makes no difference beyond the spread" in beyond.answer("memit", None, noisy).lower()
    assert "moderate" in beyond.answer("memit", None, c)


def test_outputs_and_answers_are_written(tmp_path):
    b = batch_frame(0.1)
    s = seq_frame(4)
    rows = []
    for o in (0, 1, 2):
        for B, n in ((1, 32), (4, 8), (32, 1)):
            for bi in range(n):
                if (bi + 1) * B % 8 == 0 or bi + 1 == n:
                    rows.append({"method": "memit", "batch_size": B, "ordering": o, "batch_index": bi,
                                 "heldout_known": 90.0 - bi * B / 4, "heldout_known_0": 95.0, "heldout_margin": 50.0,
                                 "heldout_margin_0": 60.0, "heldout_ppl": 3.0 + o * 0.1, "heldout_ppl_0": 2.8})
    sb = pd.DataFrame(rows)
    items = beyond.outputs(["memit", "alphaedit", "rome"], b, s, sb, "t")
    stems = [stem for stem, _ in items]
    assert stems == ["beyond_table_batch", "beyond_batch_all_methods", "beyond_table_sequential",
                     "beyond_sequential_all_methods", "beyond_degradation_memit", "beyond_degradation_all_methods"]
    paths = beyond.save_outputs(items, tmp_path)
    assert {p.name for p in paths} >= {"beyond_batch_all_methods.png", "beyond_table_batch.md"}
    text = beyond.answers(["memit"], b, s, sb)
    assert "Degradation at B = 4" in text["memit"] and "(unedited 95.0 %)" in text["memit"]
    assert "null space" not in text["memit"]
    ae = pd.DataFrame([{"method": "alphaedit", "batch_size": 1, "ordering": 0, "batch_index": 0,
                        "heldout_known": np.nan, "nullspace_frac": 0.0625, "nullspace_energy": 0.0098}])
    assert "keeps 6.2 % of C0's eigenvectors (0.98 % of its trace)" in beyond.answer("alphaedit", b, None, ae)
    md = beyond.save_answers(text, tmp_path).read_text()
    assert md.startswith("# Is bigger edit batch size better?") and text["memit"] in md


def seq_rates(s_by_b: dict, shift=None) -> pd.DataFrame:
    return rates([({"method": "memit", "batch_size": b, "eval": "current"}, v, v, v) for b, v in s_by_b.items()],
                 shift=shift or {0: 0.0, 1: 0.02, 2: -0.02})


def test_a_moderate_size_beats_only_the_ends_it_clearly_beats():
    both = beyond.answer("memit", None, seq_rates({1: 0.5, 4: 0.9, 32: 0.5}))
    assert "beats both one-fact updates (B = 1) and B = 32" in both  # 20 facts per run: 32 is not "a single batch"
    one_end = beyond.answer("memit", None, seq_rates({1: 0.5, 4: 0.9, 32: 0.85}))
    assert "beats one-fact updates (B = 1), but not B = 32 beyond the spread" in one_end and "both" not in one_end
    single = beyond.answer("memit", None, seq_rates({2: 0.5, 5: 0.9, 20: 0.5}))
    assert "beats both B = 2 and a single batch (B = 20)" in single


def test_failed_edits_are_named_and_block_a_verdict():
    c = seq_rates({1: 0.9, 4: 0.9, 32: 0.9})
    dead = c["batch_size"] == 32  # every edit at B = 32 failed: no S there, never "no difference"
    c.loc[dead, ["ES", "PS", "NS"]] = np.nan
    c.loc[dead, "failed"] = True
    a = beyond.answer("memit", None, c)
    assert "no verdict, every edit at B = 32 failed" in a and "makes no difference" not in a
    b = batch_frame(0.0)
    hit = (b.method == "memit") & (b.batch_size == 64) & (b.case_id % 20 < 10)  # half of B = 64 failed
    b.loc[hit, ["ES", "PS", "NS"]] = np.nan
    b.loc[hit, "failed"] = True
    a = beyond.answer("memit", b, None)
    assert "no verdict, 30 of 60 edits at B = 64 failed" in a and "Failed edits, left out of the means: 30/60 at B = 64" in a
    b = batch_frame(0.0)
    one = (b.method == "memit") & (b.batch_size == 64) & (b.case_id == 0)  # 1 of 60 failed: a verdict, failure named
    b.loc[one, ["ES", "PS", "NS"]] = np.nan
    b.loc[one, "failed"] = True
    a = beyond.answer("memit", b, None)
    assert "no verdict" not in a and "Failed edits, left out of the means: 1/60 at B = 64" in a


def test_saturated_scores_need_more_than_a_rounding_difference():
    c = seq_rates({1: 1.0, 4: 1.0, 32: 1.0}, shift={0: 0.0, 1: 0.0, 2: 0.0})  # sd 0 over orderings
    c.loc[(c.batch_size == 32) & (c.case_id % 1000 == 0) & (c.ordering == 0), "NS"] = 0.0  # S 99.6 vs 100
    assert "makes no difference beyond the spread" in beyond.answer("memit", None, c)


def test_bands_need_two_orderings_per_group():
    c = rates([({"method": "memit", "batch_size": b}, 0.8, 0.7, 0.9) for b in (4, 16)], shift={0: 0.0, 1: 0.05, 2: -0.05})
    c = c[~((c.batch_size == 16) & (c.ordering > 0))]  # B = 16 ran on one ordering only
    s = plotting._stats(c, ["batch_size"])
    assert s.loc[0, "NS_ci"] > 0 and np.isnan(s.loc[1, "NS_ci"]) and np.isnan(s.loc[1, "S_ci"])  # no band, not a zero band
    assert plotting.band_label(c) == "±1 std over 1–3 orderings"
    o = beyond.ordering_summary(c, ["batch_size"])
    assert list(o.orderings) == [3, 1]


def test_params_without_a_beyond_section_still_load(tmp_path):
    import yaml
    d = yaml.safe_load(open("params/tiny.yaml"))
    del d["beyond"]
    d["batch"]["batch_sizes"] = [4, 16]  # no 1: ROME (in beyond's default editors) could not run there
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump(d))
    p = resolve(f)  # notebooks 01-06 and `show` never read the beyond section
    with pytest.raises(ParamsError, match="beyond.batch.batch_sizes"):
        beyond.study_params(p, resolve_layer=False)  # notebook 07 (and reproduce's pre-check) does


@pytest.mark.parametrize("over, culprit", [
    ({"beyond.sequential": {"windows": [0]}}, "beyond.sequential.windows"),
    ({"beyond.sequential": {"heldout_facts": 0}}, "beyond.sequential.heldout_facts"),
    ({"beyond.sequential": {"lm_eval": {"tasks": []}}}, "beyond.sequential.lm_eval"),
    ({"beyond.batch": {"layer": 3}}, "beyond.layer"),
    ({"beyond.batch": {"methods": ["memit"]}}, "beyond.methods"),
])
def test_beyond_overrides_are_checked_like_their_sections(tmp_path, over, culprit):
    with pytest.raises(ParamsError, match=culprit.replace(".", r"\.")):  # tiny.yaml has a beyond section: at load
        params(tmp_path, **over)


def test_summary_tables_add_s_over_orderings_only_with_several():
    from editlib.protocols import summarize

    c = rates([({"method": "memit", "batch_size": b}, 0.8, 0.7, 0.9) for b in (4, 16)], shift={0: 0.0, 1: 0.05, 2: -0.05})
    t = summarize(c, by=["method", "batch_size"], formatted=True)
    o = beyond.ordering_summary(c, ["method", "batch_size"])
    assert list(t["S over orderings"]) == [f"{a:.2f} ± {b:.2f}" for a, b in zip(o["S"], o["S_sd"])]
    one = summarize(c[c.ordering == 0], by=["method", "batch_size"], formatted=True)
    assert "S over orderings" not in one.columns
    assert "S over orderings" in summarize(c, by=["batch_size"], formatted=True).columns


def test_table1_and_sweep_tables_add_s_over_orderings_only_with_several():
    from editlib import plotting

    shift = {0: 0.0, 1: 0.05, 2: -0.1}
    c = rates([({"method": m}, es, 0.7, 0.9) for m, es in (("rome", 0.6), ("memit", 0.8))], shift=shift)
    t = plotting.table1(c)
    o = beyond.ordering_summary(c, ["method"]).set_index("method")
    assert list(t["Algorithm"]) == ["MEMIT", "ROME"]  # the paper's row order, not summarize's
    assert list(t["S over orderings"]) == [f"{o.loc[m, 'S']:.2f} ± {o.loc[m, 'S_sd']:.2f}" for m in ("memit", "rome")]
    assert "S over orderings" not in plotting.table1(c[c.ordering == 1]).columns
    lam = rates([({"method": "memit", "lam": x}, es, 0.7, 0.9) for x, es in ((10.0, 0.5), (1.0, 0.8))], shift=shift)
    t3 = plotting.sweep_table(lam, "memit")
    o3 = beyond.ordering_summary(lam, ["lam"])
    assert list(t3["lam"]) == [1.0, 10.0]
    assert list(t3["S over orderings"]) == [f"{a:.2f} ± {b:.2f}" for a, b in zip(o3["S"], o3["S_sd"])]
    assert "S over orderings" not in plotting.sweep_table(lam[lam.ordering == 0], "memit").columns
    # every configuration its own rates, so rows swapped between methods, sizes or evaluations show
    seq = rates([({"method": m, "batch_size": b, "eval": ev}, es - 0.05 * i, 0.7 - 0.02 * i, 0.9 - 0.01 * i)
                 for i, (m, b, ev, es) in enumerate((m, b, ev, es) for m in ("memit", "emmet") for b in (1, 4)
                                                    for ev, es in (("current", 0.9), ("final", 0.6)))],
                shift=shift)
    ret = plotting.retention_table(seq)
    o4 = beyond.ordering_summary(seq, ["method", "batch_size", "eval"])
    assert len(ret) == 8 and list(ret["S over orderings"]) == [f"{a:.2f} ± {b:.2f}" for a, b in zip(o4["S"], o4["S_sd"])]
    assert "S over orderings" not in plotting.retention_table(seq[seq.ordering == 2]).columns


def test_degradation_overlay_has_no_band_where_one_ordering_measured():
    rows = []
    for o in (0, 1, 2):
        for bi in (0, 1, 2):
            if bi == 2 and o > 0:
                continue  # the last measurement exists for ordering 0 only
            rows.append({"method": "memit", "batch_size": 4, "ordering": o, "batch_index": bi,
                         "heldout_known": 90.0 - bi - o, "heldout_known_0": 100.0, "heldout_margin": 50.0 + o,
                         "heldout_margin_0": 60.0, "heldout_ppl": 3.0 + o * 0.1, "heldout_ppl_0": 2.8})
    fig = plotting.plot_degradation_overlay(pd.DataFrame(rows), {"memit": 4}, "t")
    ax = fig.axes[0]
    xs = np.concatenate([p.vertices[:, 0] for c in ax.collections for p in c.get_paths()])
    assert np.isclose(xs, 8.0).any() and not np.isclose(xs, 12.0).any()  # a band at 2 × 4 facts, none at 3 × 4
