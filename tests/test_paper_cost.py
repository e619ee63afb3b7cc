"""The cost model of ``bench/paper_cost.py`` (editlib.cost): work counted as the protocols run it,
checked against hand counts on params/smoke.yaml, scaling with batch sizes, and the unit model."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace

import pytest

from editlib.cost import GPUS, KNOWN_SHAPES, CostModel, TokenStats, count_grid, shape_for, with_unit_costs
from editlib.decode import DECODE_WARMUPS
from editlib.params import resolve
from editlib.paths import REPO_ROOT
from editlib.stats import gram_macs

SMOKE = REPO_ROOT / "params" / "smoke.yaml"


def grid(**over):
    """smoke.yaml's counts; batch on one layer unless a test asks for windows."""
    return {e.name: e for e in count_grid(resolve(SMOKE, overrides={"batch.windows": [1], **over}), layer=1)}


def test_smoke_counts_by_hand():
    """smoke.yaml: layer search 6 facts × layers {0, 1, 5} × ROME, MEMIT (values shared by the two
    methods), singular 6 facts at layer 1, sweep one batch of 8 with 2 + 2 λ, batch 8 facts at
    B ∈ {4, 8}, sequential 8 facts at B ∈ {2, 8} with the final evaluation; MEMIT and EMMET.
    Independent edits batched (tiny.yaml's evaluation.batched_edits): one multi-right-hand-side
    solve and one evaluation call per layer and method."""
    g = grid(**{"batch.windows": [1, 2]})
    assert list(g) == ["layer_search", "singular", "sweep", "batch", "sequential"]
    ls = g["layer_search"]
    assert ls.solves == Counter({"1×6": 6}) and ls.edits == 36
    assert ls.total("values") == 18 and ls.total("values", "count") == 3  # one chunk per layer
    assert ls.total("eval") == 36 and ls.total("eval", "count") == 6      # 6 cases per call
    assert [(w.size, w.layer) for w in ls.items if w.kind == "c0_collect"] == [(3, 5)]
    assert ls.total("c0_factor", "count") == 3 and ls.total("load", "count") == 1
    sg = g["singular"]
    assert sg.solves == Counter({"1×6": 2}) and sg.total("values") == 6 and sg.total("eval") == 12
    sw = g["sweep"]
    assert sw.solves == Counter({8: 4}) and sw.total("values") == 8 and sw.total("eval") == 32
    assert sw.total("solve_lr", "count") == 4 and sw.total("solve", "count") == 0  # one per λ, added by a hook, never written
    bt = g["batch"]
    # MEMIT and EMMET on one layer, plus MEMIT over a window of 2 layers (tiny.yaml's batch.windows)
    assert bt.solves == Counter({4: 6, 8: 3}) and bt.edits == 48
    assert bt.total("solve_lr", "count") == 6  # one layer: added by a hook, never written
    assert bt.total("solve", "count") == 3     # the window: written, evaluated, restored per batch
    assert bt.total("values") == 8 + 8         # once for both one-layer methods, once at the window's last layer
    assert bt.total("eval") == 32 + 16 and bt.total("eval", "count") == 4 + 3  # one call per method and B; per batch
    sq = g["sequential"]
    assert sq.solves == Counter({2: 8, 8: 2}) and sq.edits == 32
    assert sq.total("values") == 32                      # recomputed per batch on the edited model
    # current + final (2 methods × 2 B × 8)
    assert sq.total("eval") == 32 + 32
    # degradation (smoke.yaml's degradation_every 32 > 8 facts): the unedited model once (one
    # ordering's held-out set) and the end of each of the 4 runs, 64 held-out facts each
    assert sq.total("degradation", "count") == 1 + 4 and sq.total("degradation") == (1 + 4) * 64
    assert sq.total("ckpt", "count") == 10 and sq.total("ckpt") == 32
    assert all(e.total("load", "count") == 1 for e in g.values())


def test_a_second_alignment_doubles_the_scoring_only():
    """``evaluation.also_alignment`` scores every evaluation twice: the scoring time doubles, GE,
    values, keys and solves stay as they are."""
    m, ts = CostModel(GPUS["h200"]), TokenStats()
    one = grid(**{"evaluation.generation": True})
    two = grid(**{"evaluation.generation": True, "evaluation.also_alignment": "reference"})
    for name in one:
        a, b = m.seconds(one[name], ts), m.seconds(two[name], ts)
        assert b["eval"] == pytest.approx(2 * a["eval"]) and a["eval"] > 0, name
        assert {k: v for k, v in a.items() if k != "eval"} == {k: v for k, v in b.items() if k != "eval"}, name


def test_a_second_alignment_holds_its_shared_blocks_in_the_same_budget():
    """The second reading's sequences are held beside the first's in ``share_below_gb``: where one
    reading's block outputs just fit, two readings replay half as many blocks below the edited
    layer, so scoring costs more than twice the one reading's; where both fit, exactly twice."""
    ts = TokenStats()
    one = grid(**{"evaluation.also_alignment": None})
    two = grid(**{"evaluation.also_alignment": "reference"})
    name, w = next((n, w) for n, e in one.items() for w in e.items if w.kind == "eval" and w.held and w.layer)
    base = CostModel(GPUS["h200"])
    fits_one = w.held * ts.eval_tokens * one[name].shape.d * base.bpp / 1e9  # one reading's outputs, GB
    for gb, more in ((fits_one, True), (1e6, False)):
        m = replace(base, share_below_gb=gb)
        assert m.replayed(one[name].shape, ts, w.layer, w.held) == pytest.approx(w.layer)  # one reading: every block replayed
        a, b = m.seconds(one[name], ts)["eval"], m.seconds(two[name], ts)["eval"]
        assert (b > 2 * a * (1 + 1e-9)) if more else b == pytest.approx(2 * a), (gb, a, b)


def test_the_printed_grid_says_how_often_it_scores(tmp_path, capsys):
    """bench/paper_cost.py's notes say whether ES/PS/NS are scored under one alignment or two."""
    import sys
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import paper_cost
    for sets, line in (([], "ES/PS/NS scored once per evaluation (evaluation.alignment correct)"),
                       (["--set", "evaluation.also_alignment=reference"],
                        "ES/PS/NS scored twice per evaluation: under evaluation.alignment correct and also_alignment reference")):
        paper_cost.main(["--params", str(SMOKE), "--gpu", "h200", "--dtype", "bfloat16", *sets])
        assert line in capsys.readouterr().out


def test_degradation_is_costed_without_generation():
    """A degradation measurement scores its held-out facts' rewrite prompts and their sentences'
    perplexity (a small share of an evaluation of the same facts) and never generates, even when
    the experiment's GE is on: turning it on adds evaluation time, not GE tokens."""
    m, ts = CostModel(GPUS["h200"]), TokenStats()
    seq = {o: grid(**{"evaluation.generation": True, "sequential.degradation_every": o})["sequential"]
           for o in (None, 4)}
    on, off = m.seconds(seq[4], ts), m.seconds(seq[None], ts)
    assert on["ge_tokens"] == off["ge_tokens"] > 0 and on["ge"] == off["ge"]
    assert off["degradation"] == 0
    one = m.degradation(seq[4].shape, ts, 64, seq[4].eval_batch)
    assert on["degradation"] == pytest.approx(seq[4].total("degradation", "count") * one)
    assert one == pytest.approx(2 * m.eval(seq[4].shape, ts, 64 / 13, seq[4].eval_batch))  # 1 of 13 prompts, twice
    assert 0 < one < 0.5 * m.eval(seq[4].shape, ts, 64, seq[4].eval_batch)


def test_reference_path_counts():
    """evaluation.batched_edits false: every one-fact edit solved, written, evaluated, restored."""
    g = grid(**{"evaluation.batched_edits": False})
    ls = g["layer_search"]
    assert ls.solves == Counter({1: 36}) and ls.total("eval", "count") == 36
    assert g["singular"].solves == Counter({1: 12})
    bt = g["batch"]
    assert bt.total("solve", "count") == 6 and bt.total("eval", "count") == 6
    assert g["sequential"].solves == grid()["sequential"].solves  # sequential edits are always written


def test_counts_scale_with_batch_sizes_and_facts():
    g = grid(**{"batch.batch_sizes": [2, 4, 8], "sequential.batch_sizes": [1, 2, 4, 8],
                "hparams.common.z_batch_size": 3, "layer_search.n_facts": 12, "sweep.batch_size": 4})
    bt = g["batch"]
    assert bt.solves == Counter({2: 8, 4: 4, 8: 2}) and bt.total("values") == 8  # still prepared once
    assert bt.total("values", "count") == 3                                       # chunks 3, 3, 2
    sq = g["sequential"]
    assert sq.solves == Counter({1: 16, 2: 8, 4: 4, 8: 2})
    assert sq.total("values") == 2 * 4 * 8 and sq.total("ckpt", "count") == 2 * (8 + 4 + 2 + 1)
    # B = 1 and 2 run one value chunk per batch, B = 4 two (3 + 1), B = 8 three (3 + 3 + 2)
    assert sq.total("values", "count") == 2 * (8 + 4 + 2 * 2 + 3)
    ls = g["layer_search"]
    assert ls.solves == Counter({"1×12": 6}) and ls.edits == 72 and ls.total("values") == 36
    sw = g["sweep"]                                       # two chunks of 4, 4 λ each
    assert sw.solves == Counter({4: 8}) and sw.total("values") == 8 and sw.total("eval") == 32


def test_alphaedit_and_encore_counts():
    """AlphaEdit and ENCORE run the protocols' paths (same solves, evaluations and checkpoints as
    MEMIT) plus, per factored C0, AlphaEdit's eigendecomposition and ENCORE's factor of
    λ_p C0 + λ_n I; in a sequential run both factor their preservation matrix again for every
    batch after the first (K_p changed). ENCORE's values (MPES) are its own; AlphaEdit's are MEMIT's."""
    new = ["alphaedit", "encore"]
    g = grid(**{"batch.methods": new, "sequential.methods": new})
    bt, sq = g["batch"], g["sequential"]
    assert bt.solves == Counter({4: 4, 8: 2}) and bt.total("solve_lr", "count") == 6
    assert bt.total("values") == 16                       # AlphaEdit's (loss stop) and ENCORE's (MPES)
    assert bt.total("c0_eigh", "count") == 1 and bt.total("pres_factor", "count") == 1
    assert sq.solves == Counter({2: 8, 8: 2}) and sq.total("ckpt", "count") == 10
    # B = 2: batches 1-3 of 4 refactor, for each method; B = 8: one batch; + ENCORE's base factor
    assert sq.total("pres_factor", "count") == 2 * 3 + 1 and sq.total("c0_eigh", "count") == 1
    g2 = grid(**{"sequential.methods": ["encore"], "hparams.encore.add_prev_edits": False})
    assert g2["sequential"].total("pres_factor", "count") == 1  # the cached base factor only
    assert grid()["batch"].total("c0_eigh") == grid()["batch"].total("pres_factor") == 0
    m = CostModel(GPUS["h100"])
    s = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"]
    assert 0 < m.pres_factor(s) < m.c0_eigh(s)
    assert m.seconds(sq, TokenStats())["pres_factor"] == pytest.approx(7 * m.pres_factor(sq.shape))


def test_method_specific_value_settings_are_not_shared():
    """A value hyperparameter that differs between ROME and MEMIT gives each its own values."""
    g = grid(**{"hparams.memit.v_lr": 0.25})
    assert g["layer_search"].total("values") == 2 * 18
    assert g["singular"].total("values") == 12


def test_paper_grid_layer_search_and_second_model():
    p = resolve(REPO_ROOT / "params" / "llama3-8b.yaml")
    exps = count_grid(p, layer=1)
    names = [e.name for e in exps]
    assert names[:2] == ["layer_search", "layer_search (Llama-2-7B)"]
    ls_edits = sum(e.edits for e in exps[:2])
    assert ls_edits == p.layer_search.n_facts * 32 * len(p.layer_search.methods) * 2
    seq = next(e for e in exps if e.name == "sequential")
    n_cfg = len(p.sequential.batch_sizes) * len(p.sequential.methods)
    assert seq.total("values") == p.sequential.total * n_cfg
    assert seq.solves[1] == p.sequential.total * len(p.sequential.methods) * (1 in p.sequential.batch_sizes)


def test_llama_shapes():
    l3 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"]
    assert l3.params == 8_030_261_248
    assert KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"].params == 6_738_415_616
    tiny = shape_for(str(REPO_ROOT / "models" / "tiny-world"))
    assert (tiny.n_layers, tiny.d, tiny.d_in, tiny.vocab) == (6, 128, 512, 3072)


def test_cost_units():
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    dev = CostModel(GPUS["h100"], solve_on="device")
    host = CostModel(GPUS["h100"], solve_on="host", host_solve_s=2.0, host_speedup=2.0)
    assert host.solve(s, 1) == pytest.approx(1.0 + (4096 + 14336) * 8 / host.pcie_bw)
    assert dev.solve(s, 1) < 0.1 < host.solve(s, 1)
    assert dev.solve(s, 4096) > dev.solve(s, 1)
    # 1,000 one-fact edits in one multi-right-hand-side solve cost far less than 1,000 solves
    assert host.solve(s, 1000, "solve_r1") < 0.1 * 1000 * host.solve(s, 1)
    assert dev.solve(s, 8, "solve_lr") < dev.solve(s, 8, "solve")  # no weight written
    # GE of one case: 10 prompts, decoded from the shortest one to gen_max_len
    t, tokens = dev.ge(s, ts, 1, 100)
    assert tokens == 10 * (100 - round(ts.gen_case_min_len)) and t > 0
    # without host overhead, decoding is bandwidth-bound: the H200's faster memory decodes faster
    # and bf16 halves the weight bytes; with the default eager-PyTorch overhead one case's 10 rows
    # are host-bound (the same on both GPUs)
    free = {"kernel_s": 0.0, "step_py_s": 0.0}
    t100 = CostModel(GPUS["h100"], **free).ge(s, ts, 1, 100)[0]
    assert CostModel(GPUS["h200"], **free).ge(s, ts, 1, 100)[0] == pytest.approx(t100 * 3.35 / 4.8, rel=0.05)
    assert CostModel(GPUS["h100"], dtype="bfloat16", **free).ge(s, ts, 1, 100)[0] < 0.6 * t100
    assert CostModel(GPUS["h200"]).ge(s, ts, 1, 100)[0] == pytest.approx(t)
    # values above the last layer cost (almost) only the head; deeper edits cost more
    assert dev.values(s, ts, 32, 1) > dev.values(s, ts, 32, 30)


def test_experiment_seconds_and_overrides(tmp_path):
    p = resolve(SMOKE, overrides={"evaluation.generation": True})
    exps = count_grid(p, layer=1)
    m = CostModel(GPUS["h100"])
    on = sum(sum(v for k, v in m.seconds(e, TokenStats()).items() if k != "ge_tokens") for e in exps)
    p_off = resolve(SMOKE, overrides={"evaluation.generation": False})
    off_secs = [m.seconds(e, TokenStats()) for e in count_grid(p_off, layer=1)]
    assert all(s["ge"] == 0 and s["ge_tokens"] == 0 for s in off_secs)
    assert on > sum(sum(v for k, v in s.items() if k != "ge_tokens") for s in off_secs)
    f = tmp_path / "units.json"
    f.write_text(json.dumps({"units": {"solve_s_by_n": {"1": 7.0}, "ge_s_per_case_single": 3.0}}))
    mm = with_unit_costs(m, f)
    ls = next(e for e in exps if e.name == "layer_search")
    sec = mm.seconds(ls, TokenStats())
    assert sec["ge"] == pytest.approx(6 * mm.ge(ls.shape, TokenStats(), 6, ls.gen_max_len)[0])  # 6 calls of 6 cases
    ref = next(e for e in count_grid(resolve(SMOKE, overrides={"evaluation.generation": True,
                                                               "evaluation.batched_edits": False}), layer=1)
               if e.name == "layer_search")
    sec = mm.seconds(ref, TokenStats())
    assert sec["solve"] == pytest.approx(7.0 * 36)      # the measured N = 1 solve replaces the model
    assert sec["ge"] == pytest.approx(3.0 * 36)         # ... and the measured one-case GE
    f.write_text(json.dumps({"solve_per_fact": 1}))
    with pytest.raises(ValueError, match="unknown unit"):
        with_unit_costs(m, f)


def test_calibrated_units_b1_values_c0_tail_and_file_order(tmp_path):
    """A calibration's units (bench/calibrate_units.py): one fact alone has its own values unit, the
    chunked one serves chunks; C0 pays each layer's tail on top of its tokens; of several unit files
    the later one's unit wins."""
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    m = CostModel(GPUS["h200"], dtype="bfloat16", c0_tokens=1e6)
    slice_ = tmp_path / "phases.json"
    slice_.write_text(json.dumps({"units": {"values_s_per_fact": 0.5, "c0_s_per_token_layer": 1e-3,
                                            "eval_s_per_case": 9.0}}))
    calib = tmp_path / "calibration.json"
    calib.write_text(json.dumps({"units": {"values_s_per_fact": 0.1, "values_s_per_fact_single": 2.0,
                                           "c0_s_per_token_layer": 2e-6, "c0_layer_fixed_s": 3.0}}))
    mm = with_unit_costs(m, slice_, calib)
    assert mm.unit_s["eval_s_per_case"] == 9.0 and mm.unit_s["values_s_per_fact"] == 0.1
    assert mm.values(s, ts, 1, 1) == pytest.approx(2.0)        # B = 1: the single unit
    assert mm.values(s, ts, 32, 1) == pytest.approx(32 * 0.1)  # a chunk: the chunked unit
    assert mm.values(s, ts, 1, 16) == pytest.approx(2.0 * 15 / 30)  # fewer blocks above the layer
    assert mm.c0_collect(s, 32, 31) == pytest.approx(32 * (2e-6 * 1e6 + 3.0))
    only_chunk = with_unit_costs(m, slice_)  # no single unit measured: one fact alone is modelled
    assert only_chunk.values(s, ts, 1, 1) == m.values(s, ts, 1, 1) and only_chunk.values(s, ts, 32, 1) == pytest.approx(16)
    assert only_chunk.c0_collect(s, 2, 1) == pytest.approx(2 * 1e-3 * 1e6)


def test_units_timed_on_one_model_price_another_scaled_by_the_model(tmp_path):
    """A unit keeps what it was timed on: on that shape (and, for GE, at those rows per decode
    batch and that length) it prices as measured; on another shape, or other GE batches, it takes
    the model's own ratio of the same work on the two (Llama-2-7B: 610 rows a batch under 32 GB of
    KV cache against Llama-3-8B's 1,024, a smaller d_in for C0)."""
    from editlib.cost import timed_shape
    l3, l2, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"], TokenStats()
    m = CostModel(GPUS["h200"], dtype="bfloat16", c0_tokens=6.5e7, gen_batch=1024, gen_kv_gb=32)
    assert (m.gen_rows(l3, 100), m.gen_rows(l2, 100)) == (1024, 610)
    units = {"ge_s_per_case": 0.07, "ge_s_per_case_single": 7.0, "c0_s_per_token_layer": 2e-6, "c0_factor_s": 6.0,
             "values_s_per_fact": 0.09, "values_s_per_fact_single": 2.7, "eval_s_per_case": 0.03}
    f = tmp_path / "calibration.json"
    f.write_text(json.dumps({"units": units, "model": {"n_layers": 32, "d": 4096, "d_in": 14336},
                             "raw": {"eval": {"rows_per_batch": 1024, "gen_max_len": 100}}}))
    mm = with_unit_costs(m, f)
    assert timed_shape(json.loads(f.read_text())) == l3
    # on the shape, rows and length it was timed at: the measured unit itself
    assert mm.ge(l3, ts, 1000, 100)[0] == 0.07 * 1000 and mm.ge(l3, ts, 1, 100)[0] == 7.0
    assert mm.c0_collect(l3, 32, 31) == 2e-6 * 6.5e7 * 32 and mm.c0_factor(l3) == 6.0
    assert mm.values(l3, ts, 32, 1) == pytest.approx(0.09 * 32) and mm.eval(l3, ts, 1000, 256) == pytest.approx(30.0)
    # another shape: the model's ratio
    for got, work in ((mm.ge(l2, ts, 1000, 100)[0], lambda mod, s: mod.ge(s, ts, 1000, 100)[0]),
                      (mm.c0_collect(l2, 32, 31), lambda mod, s: mod.c0_collect(s, 32, 31)),
                      (mm.c0_factor(l2), lambda mod, s: mod.c0_factor(s)),
                      (mm.values(l2, ts, 32, 1), lambda mod, s: mod.values(s, ts, 32, 1)),
                      (mm.values(l2, ts, 1, 1), lambda mod, s: mod.values(s, ts, 1, 1)),
                      (mm.eval(l2, ts, 1000, 256), lambda mod, s: mod.eval(s, ts, 1000, 256))):
        assert got == pytest.approx(work(mm, l3) * work(m, l2) / work(m, l3))
    assert mm.ge(l2, ts, 1000, 100)[0] > 1.5 * mm.ge(l3, ts, 1000, 100)[0]  # 17 decode batches, not 10
    assert mm.c0_collect(l2, 32, 31) < mm.c0_collect(l3, 32, 31)
    # the same shape at other GE batches or another length: scaled too; the single case is one batch either way
    half = with_unit_costs(replace(m, gen_batch=512), f)
    assert half.ge(l3, ts, 1000, 100)[0] == pytest.approx(
        70.0 * replace(m, gen_batch=512).ge(l3, ts, 1000, 100)[0] / m.ge(l3, ts, 1000, 100)[0])
    assert half.ge(l3, ts, 1000, 100)[0] > 1.5 * 70.0
    assert half.ge(l3, ts, 1, 100)[0] == 7.0
    assert mm.ge(l3, ts, 1000, 50)[0] == pytest.approx(70.0 * m.ge(l3, ts, 1000, 50)[0] / m.ge(l3, ts, 1000, 100)[0])
    # GE timed on one call of 102 cases (one decode batch of 1,020 rows): a call of other size is priced
    # by the model's ratio, so 64 cases (part of one host-bound batch) cost about the 102 cases' batch
    called = tmp_path / "called.json"
    called.write_text(json.dumps({"units": units, "model": {"n_layers": 32, "d": 4096, "d_in": 14336},
                                  "raw": {"eval": {"cases": 102, "rows_per_batch": 1024, "gen_max_len": 100}}}))
    mc = with_unit_costs(m, called)
    assert mc.ge(l3, ts, 102, 100)[0] == 0.07 * 102 and mc.ge(l3, ts, 1, 100)[0] == 7.0
    assert mc.ge(l3, ts, 1000, 100)[0] == pytest.approx(0.07 * 102 * m.ge(l3, ts, 1000, 100)[0] / m.ge(l3, ts, 102, 100)[0])
    assert 0.9 * 0.07 * 102 < mc.ge(l3, ts, 64, 100)[0] < 0.07 * 102 and mm.ge(l3, ts, 64, 100)[0] == 0.07 * 64
    assert mc.ge(l2, ts, 1000, 100)[0] == pytest.approx(0.07 * 102 * m.ge(l2, ts, 1000, 100)[0] / m.ge(l3, ts, 102, 100)[0])
    # a file that records no shape: taken as timed on the priced model's (``shape``), or, without one, on any
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"units": units}))
    assert with_unit_costs(m, bare).ge(l2, ts, 1000, 100)[0] == 0.07 * 1000
    assert with_unit_costs(m, bare, shape=l3).ge(l2, ts, 1000, 100)[0] == pytest.approx(mm.ge(l2, ts, 1000, 100)[0])
    # a full shape record wins over the model record
    rec = tmp_path / "shaped.json"
    rec.write_text(json.dumps({"units": units, "shape": {**vars(l2), "name": "built"},
                               "model": {"n_layers": 32, "d": 4096, "d_in": 14336}}))
    assert with_unit_costs(m, rec).c0_factor(l2) == 6.0 and with_unit_costs(m, rec).c0_factor(l3) != 6.0


def test_committed_gpu_units_price_the_grid():
    """Every measured-units file under bench/units holds known keys only and positive seconds, and
    prices the paper grid (bench/paper_cost.py --unit-costs FILE)."""
    files = sorted((REPO_ROOT / "bench" / "units").glob("*.json"))
    assert files
    p = resolve(str(REPO_ROOT / "params" / "llama3-8b.yaml"), overrides={"model.dtype": "bfloat16"})
    exps = count_grid(p, layer=1)
    for f in files:
        doc = json.loads(f.read_text())
        assert doc["complete"] and all(v > 0 for v in doc["units"].values()), f.name
        m = with_unit_costs(CostModel(GPUS["h200"], dtype="bfloat16", c0_tokens=6.5e7), f)
        s = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"]
        assert m.values(s, TokenStats(), 1, 1) == doc["units"]["values_s_per_fact_single"]
        total = sum(v for e in exps for k, v in m.seconds(e, TokenStats()).items() if k != "ge_tokens")
        assert 0 < total < float("inf")


def test_a_chunks_values_unit_never_prices_one_fact_alone():
    """A one-fact value optimisation is bound by its steps' launches, a chunk's by arithmetic: a
    units file holding only the chunk's unit (the slice's phases.json) leaves one fact to the model,
    and one holding only the single fact's leaves chunks to it."""
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    m = CostModel(GPUS["h200"], dtype="bfloat16")
    chunk_only = replace(m, unit_s={"values_s_per_fact": 0.09})
    single_only = replace(m, unit_s={"values_s_per_fact_single": 2.7})
    assert chunk_only.values(s, ts, 1, 1) == m.values(s, ts, 1, 1)
    assert chunk_only.values(s, ts, 32, 1) == pytest.approx(0.09 * 32)
    assert single_only.values(s, ts, 1, 1) == pytest.approx(2.7)
    assert single_only.values(s, ts, 32, 1) == m.values(s, ts, 32, 1)


def test_a_modelled_estimate_names_the_measured_one(tmp_path, capsys):
    """Without --unit-costs, paper_cost prints (and writes) the grid's hours under every committed
    measured-units file of the same GPU and dtype; for another GPU there is none to name."""
    import sys
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import paper_cost
    grid = str(REPO_ROOT / "params" / "llama3-8b.yaml")
    out = tmp_path / "h200.json"
    paper_cost.main(["--params", grid, "--gpu", "h200", "--dtype", "bfloat16", "--json", str(out)])
    printed = capsys.readouterr().out
    measured = json.loads(out.read_text())["with_measured_units"]
    assert list(measured) == ["bench/units/h200-bfloat16-llama3-8b-shape.json"]
    priced = tmp_path / "priced.json"
    paper_cost.main(["--params", grid, "--gpu", "h200", "--dtype", "bfloat16", "--json", str(priced),
                     "--unit-costs", str(REPO_ROOT / "bench/units/h200-bfloat16-llama3-8b-shape.json")])
    doc = json.loads(priced.read_text())
    assert doc["total_gpu_hours"] == pytest.approx(measured["bench/units/h200-bfloat16-llama3-8b-shape.json"])
    # the units were timed on Llama-3-8B's shape: Figure 6's Llama-2-7B takes them scaled, and says so
    assert any("timed on Llama-3-8B price Llama-2-7B scaled" in a and "ge_s_per_case" in a for a in doc["assumptions"])
    assert "with_measured_units" not in doc and f"**{doc['total_gpu_hours']:.1f} GPU-hours** (the model" in printed
    paper_cost.main(["--params", grid, "--gpu", "h100", "--dtype", "bfloat16", "--json", str(out)])
    assert json.loads(out.read_text())["with_measured_units"] == {}


def test_arithmetic_floor():
    """The floor is the same work at 100 % of peak and nothing else: never above the estimate,
    GE at exactly its FLOPs (prefill + 2·params per decoded token) over the dtype's peak, and it
    scales with the peak of the dtype."""
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    m = CostModel(GPUS["h200"], c0_tokens=6.5e7)
    f = m.floor()
    params = s.n_layers * s.block_params + s.head_params
    t, decoded = f.ge(s, ts, 1, 100)
    rows, m_len = 10, round(ts.gen_case_min_len)
    assert decoded == rows * (100 - m_len)
    assert t == pytest.approx(2 * params * (rows * m_len + decoded) / GPUS["h200"].fp32)
    assert t < 0.2 * m.ge(s, ts, 1, 100)[0]  # one case's 10 rows are far from compute-bound
    # C0: the float64 rank-T updates at the float64 peak + the forward at the float32 peak
    acc = 2 * gram_macs(s.d_in) * 6.5e7 * 32 / GPUS["h200"].fp64  # the block upper triangle of Σkkᵀ
    assert acc < f.c0_collect(s, 32, 31) < m.c0_collect(s, 32, 31)
    p = resolve(REPO_ROOT / "params" / "llama3-8b.yaml")
    for e in count_grid(p, layer=1):
        est, low = m.seconds(e, ts), f.seconds(e, ts)
        for k in low:
            assert low[k] <= est[k] + 1e-9, (e.name, k)
        assert low["ge_tokens"] == est["ge_tokens"]  # the same work
    bf = CostModel(GPUS["h200"], dtype="bfloat16").floor()
    assert bf.ge(s, ts, 1, 100)[0] == pytest.approx(t * GPUS["h200"].fp32 / GPUS["h200"].bf16)


def test_fast_gram_moves_c0_onto_tensor_cores_for_16bit_models_only():
    """covariance.fast_gram: a bfloat16 model's C0 Gram at the 16-bit tensor cores' rate (gram16;
    the TF32 rate without) plus a float64 add per batch and a float32 read + write per further
    token chunk (memory-bound), far cheaper than float64 GEMMs; float32 models are unaffected."""
    s = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"]
    base = dict(c0_tokens=6.5e7, c0_batch_tokens=24576)
    bf, bf_fast = (CostModel(GPUS["h200"], dtype="bfloat16", fast_gram=f, **base) for f in (False, True))
    f32, f32_fast = (CostModel(GPUS["h200"], fast_gram=f, **base) for f in (False, True))
    assert bf_fast.gram32 and not f32_fast.gram32
    assert f32_fast.c0_collect(s, 32, 31) == f32.c0_collect(s, 32, 31)
    fwd = bf.c0_collect(s, 32, 31) - 2 * gram_macs(s.d_in) * 6.5e7 * 32 / (GPUS["h200"].fp64 * bf.f64_eff)
    gemm = 2 * gram_macs(s.d_in) * 6.5e7 * 32 / (GPUS["h200"].bf16 * bf.mm_eff)
    per_batch = 20 + 16 * (24576 // 2048 - 1)  # 12 token chunks of editlib.stats.TC_CHUNK_TOKENS, each product added after
    adds = per_batch * gram_macs(s.d_in) * 32 * -(-6.5e7 // 24576) / (GPUS["h200"].bw * bf.bw_eff)
    assert bf_fast.c0_collect(s, 32, 31) == pytest.approx(fwd + gemm + adds)
    assert bf_fast.c0_collect(s, 32, 31) < 0.25 * bf.c0_collect(s, 32, 31)
    assert bf_fast.floor().c0_collect(s, 32, 31) == pytest.approx(fwd * bf.mm_eff + gemm * bf.mm_eff)
    tf32 = replace(bf_fast, gram16=False)  # a torch without 16-bit products: the keys made float32, on TF32
    adds32 = adds * (20 + 8 * 11) / per_batch  # each chunk added in the GEMM's epilogue
    assert tf32.c0_collect(s, 32, 31) == pytest.approx(fwd + gemm * GPUS["h200"].bf16 / GPUS["h200"].tf32 + adds32)


def test_ge_rows_per_batch_follow_the_kv_budget():
    """evaluation.gen_kv_gb caps the GE rows per decode batch by their KV cache at gen_max_len
    tokens (Llama-2-7B's 32 KV heads cache 4x Llama-3-8B's 8); fuller batches, fewer decode steps."""
    l3, l2 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"]
    m = CostModel(GPUS["h200"], gen_batch=1024, gen_kv_gb=32)
    assert m.gen_rows(l3, 100) == 1024                       # 26 MB a row in float32
    assert m.gen_rows(l2, 100) == int(32e9 // (2 * 32 * 32 * 128 * 4 * 100)) == 305
    assert CostModel(GPUS["h200"], dtype="bfloat16", gen_batch=1024, gen_kv_gb=32).gen_rows(l2, 100) == 610
    assert CostModel(GPUS["h200"], gen_batch=1024).gen_rows(l2, 100) == 1024  # no budget: no cap
    ts = TokenStats()
    for cases in (1, 1000):  # GE is costed at the capped rows
        assert m.ge(l2, ts, cases, 100) == CostModel(GPUS["h200"], gen_batch=305).ge(l2, ts, cases, 100)
    assert CostModel(GPUS["h200"], gen_batch=4, gen_kv_gb=32).ge(l3, ts, 1, 100)[0] > m.ge(l3, ts, 1, 100)[0]
    with pytest.raises(ValueError, match="gen_kv_gb = 0.01 GB holds no Llama-2-7B"):
        CostModel(GPUS["h200"], gen_kv_gb=0.01).gen_rows(l2, 100)
    small, big = (CostModel(GPUS["h200"], dtype="bfloat16", gen_batch=g) for g in (256, 1024))
    t_small, n_small = small.ge(l3, ts, 1000, 100)
    t_big, n_big = big.ge(l3, ts, 1000, 100)
    assert t_big < t_small and n_big >= n_small  # fewer steps, each row padded to its batch's shortest prompt


def test_grouped_sequential_evaluation_counts():
    """sequential.eval_group 3: consecutive batches share one evaluation call, and a group also ends
    where a measurement follows (degradation every 4 facts) and at the run's end; the facts
    evaluated stay the same."""
    one = grid(**{"sequential.degradation_every": 4})["sequential"]
    g = grid(**{"sequential.degradation_every": 4, "sequential.eval_group": 3})["sequential"]
    assert g.total("eval") == one.total("eval") and g.solves == one.solves
    # per method: B = 2 (4 batches): groups {0, 1} (4 facts: degradation), {2, 3}; B = 8: one batch;
    # + the final evaluation of each run
    assert one.total("eval", "count") == 2 * (4 + 1 + 2)
    assert g.total("eval", "count") == 2 * (2 + 1 + 2)
    m = CostModel(GPUS["h200"])
    assert m.seconds(g, TokenStats())["eval"] < m.seconds(one, TokenStats())["eval"]


def test_evaluation_groups_count_facts_not_batches():
    """sequential.eval_group counts facts: batches of 2 form groups of 4 facts, a batch of 8 (as big as
    the group or bigger) is evaluated alone, so a crash never loses more than a group's facts (in
    batches, eval_group 4 put both batches of 8 in one group, stored only at the run's end). The
    protocol and the work count use the same rule (protocols.closes_group)."""
    from types import SimpleNamespace

    from editlib.protocols import _chunks, closes_group
    sq = SimpleNamespace(eval_group=4, forgetting_every=None)
    for B, want in ((1, [3, 7]), (2, [1, 3]), (4, [0, 1]), (8, [0])):
        chunks, pending, closed = _chunks(8, B), 0, []
        for bi, c in enumerate(chunks):
            pending += len(c)
            if closes_group(sq, chunks, bi, pending, False):
                closed.append(bi)
                pending = 0
        assert closed == want, B
    over = {"sequential.eval_group": 4, "sequential.batch_sizes": [2, 8], "sequential.degradation_every": None}
    g = grid(**over)["sequential"]
    assert g.total("eval", "count") == 2 * (2 + 1 + 1 + 1)  # per method: B = 2 two groups, B = 8 one, + finals


def test_lm_eval_ends_an_evaluation_group_in_the_count():
    """An lm-eval measurement needs the model as it is after its batch: the work count closes the
    evaluation group there, as the protocol does."""
    over = {"sequential.eval_group": 4, "sequential.batch_sizes": [1], "sequential.degradation_every": None}
    plain = grid(**over)["sequential"]
    lm = grid(**over, **{"sequential.lm_eval": {"tasks": ["arc_easy"], "every": 2}})["sequential"]
    # 8 one-fact batches per method: groups of 4 (+ final) against groups of 2 (lm-eval every 2 facts)
    assert plain.total("eval", "count") == 2 * (2 + 1) and lm.total("eval", "count") == 2 * (4 + 1)


def test_forgetting_evaluations_count_facts_in_the_work_count():
    """sequential.forgetting_every counts edited facts, as the protocol does: every 4 facts of 8,
    the run's last batch excepted (the final evaluation is that), whatever the batch size, so a
    one-fact run is evaluated once per k facts, not once per k batches."""
    over = {"sequential.batch_sizes": [1, 2, 8], "sequential.degradation_every": None}
    plain = grid(**over)["sequential"]
    fg = grid(**over, **{"sequential.forgetting_every": 4})["sequential"]
    # per method: one forgetting evaluation (of the 4 facts so far) at B = 1 and B = 2, none at B = 8
    assert fg.total("eval", "count") - plain.total("eval", "count") == 2 * (1 + 1)
    assert fg.total("eval") - plain.total("eval") == 2 * (4 + 4)


def test_replayed_blocks_below_are_counted_and_priced():
    """evaluation.share_below_gb (editlib.below): an evaluation that replays an earlier one's blocks
    below the edited layer is marked with the cases it needs kept, and priced with those blocks
    not run, as far as the kept outputs fit the budget."""
    g = grid()
    ls = g["layer_search"]
    held = [(w.layer, w.held) for w in ls.items if w.kind == "eval"]
    # per layer: ROME scores first, MEMIT replays its 6 cases; layer 0 has nothing below
    assert held == [(0, 0), (0, 0), (1, 0), (1, 6), (5, 0), (5, 6)]
    sw = g["sweep"]
    assert [w.held for w in sw.items if w.kind == "eval"] == [0, 8, 8, 8]  # the chunk's first λ runs everything
    bt = g["batch"]  # MEMIT at B = 4 and 8, then EMMET replaying both of MEMIT's evaluations of 8 facts
    assert [w.held for w in bt.items if w.kind == "eval"] == [0, 0, 16, 16]
    off = grid(**{"evaluation.share_below_gb": 0})
    assert all(w.held == 0 for e in off.values() for w in e.items)
    assert [(w.kind, w.count, w.size, w.layer) for w in off["layer_search"].items] == [
        (w.kind, w.count, w.size, w.layer) for w in ls.items]
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    m = CostModel(GPUS["h200"], share_below_gb=8.0)
    assert m.replayed(s, ts, 0, 1000) == 0 and m.replayed(s, ts, 16, 0) == 0
    assert CostModel(GPUS["h200"]).replayed(s, ts, 16, 1000) == 0  # off
    need = 1000 * ts.eval_tokens * s.d * 4  # float32 block outputs of 1,000 cases
    assert m.replayed(s, ts, 16, 1000) == pytest.approx(16 * min(1.0, 8e9 / need))
    assert m.replayed(s, ts, 16, 10) == 16                       # a few cases fit whole
    full, half = m.eval(s, ts, 1000, 64), m.eval(s, ts, 1000, 64, below=16)
    assert half < full and m.eval(s, ts, 1000, 64, below=0) == full
    sec_on = m.seconds(ls, ts)["eval"]
    sec_off = m.seconds(off["layer_search"], ts)["eval"]
    assert sec_on < sec_off


def test_captured_graphs_are_priced_without_host_time_and_never_with_eager_units(tmp_path):
    """evaluation.gen_decode: graph and compile_blocks: reduce-overhead (modelled, not measured): a
    step's block kernels cost graph_node_s each on the GPU and no host time, so host-bound steps
    (one case's 10 decode rows, a one-fact value step) get cheaper, each flag its own part only;
    the floor does not move but for a decode batch's eager warm-up step. A unit timed eagerly never prices a captured part (nor a captured
    unit an eager model): it is left out and named; a file's own ``graphs`` record decides."""
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    eager = CostModel(GPUS["h200"], dtype="bfloat16")
    dec = CostModel(GPUS["h200"], dtype="bfloat16", decode_graphs=True)
    val = CostModel(GPUS["h200"], dtype="bfloat16", value_graphs=True)
    assert dec.ge(s, ts, 1, 100)[0] < 0.5 * eager.ge(s, ts, 1, 100)[0]
    assert dec.values(s, ts, 1, 1) == eager.values(s, ts, 1, 1)
    assert val.values(s, ts, 1, 1) < 0.6 * eager.values(s, ts, 1, 1)
    assert val.ge(s, ts, 1, 100) == eager.ge(s, ts, 1, 100)
    assert dec.ge(s, ts, 1, 100)[1] == eager.ge(s, ts, 1, 100)[1]  # the same tokens decoded
    for m in (dec, replace(val, graph_call_s=0.0)):  # replayed kernels are not free: their GPU time
        # adds to the roofline's (the value step's block calls left out: their host time would bind
        # once the replay costs nothing)
        free, slow = replace(m, graph_node_s=0.0), replace(m, graph_node_s=2 * m.graph_node_s)
        part = (lambda x: x.ge(s, ts, 1, 100)[0]) if m.decode_graphs else (lambda x: x.values(s, ts, 1, 1))
        assert part(free) < part(m) < part(slow)
        assert part(slow) - part(m) == pytest.approx(part(m) - part(free), rel=0.05)
        warm = DECODE_WARMUPS * eager.floor().decode_step(s, 10) if m.decode_graphs else 0.0  # a batch's eager warm-up
        assert part(m.floor()) == pytest.approx(part(eager.floor()) + warm)
    units = {"ge_s_per_case": 0.07, "ge_s_per_case_single": 7.0, "values_s_per_fact_single": 2.7, "eval_s_per_case": 0.03}
    plain, graph_ge, recorded = tmp_path / "eager.json", tmp_path / "graph.json", tmp_path / "recorded.json"
    plain.write_text(json.dumps({"sets": [], "grid_sets": [], "units": units}))
    graph_ge.write_text(json.dumps({"grid_sets": ["evaluation.gen_decode=graph"], "units": {"ge_s_per_case": 0.01}}))
    recorded.write_text(json.dumps({"graphs": {"decode_graphs": False, "value_graphs": True}, "grid_sets": [],
                                    "units": {"values_s_per_fact_single": 0.9, "ge_s_per_case": 0.05}}))
    both = replace(eager, decode_graphs=True, value_graphs=True)
    skipped: list[tuple[str, str, str]] = []
    m = with_unit_costs(both, plain, graph_ge, skipped=skipped)
    assert m.unit_s == {"eval_s_per_case": 0.03, "ge_s_per_case": 0.01}
    assert sorted(skipped) == [(str(plain), k, "eagerly") for k in
                               ("ge_s_per_case", "ge_s_per_case_single", "values_s_per_fact_single")]
    skipped = []
    assert with_unit_costs(eager, plain, graph_ge, skipped=skipped).unit_s == units
    assert skipped == [(str(graph_ge), "ge_s_per_case", "with CUDA graphs")]
    assert with_unit_costs(val, recorded).unit_s == {"values_s_per_fact_single": 0.9, "ge_s_per_case": 0.05}
    assert with_unit_costs(eager, recorded).unit_s == {"ge_s_per_case": 0.05}
    assert with_unit_costs(dec, recorded).unit_s == {}


def test_scoring_units_timed_at_another_eval_batch_are_left_out(tmp_path):
    """An eager forward costs its kernels' host time whatever its size, so a scoring unit timed at
    one evaluation.batch_size does not price another: with ``eval_batch`` given, a file recording
    another scoring batch (or none) has its many-case scoring unit left out and named (the model
    prices it). One case alone is one forward at any batch holding its sequences (at most 26), so
    its unit goes only where a batch below that splits it, or where nothing is recorded. The same
    batch (recorded, or as a params override) or no ``eval_batch`` keep them; GE stays."""
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    m = CostModel(GPUS["h200"], dtype="bfloat16")
    units = {"eval_s_per_case": 0.03, "eval_s_per_case_single": 0.05, "ge_s_per_case": 0.07}
    files = {}
    for name, doc in {"at64": {"evaluation": {"batch_size": 64}}, "at8": {"evaluation": {"batch_size": 8}},
                      "unrecorded": {}, "override": {"grid_sets": ["evaluation.batch_size=256"]}}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({**doc, "units": units}))
    skipped: list[tuple[str, str, str]] = []
    assert with_unit_costs(m, files["at64"], skipped=skipped, eval_batch=256).unit_s == {
        "eval_s_per_case_single": 0.05, "ge_s_per_case": 0.07}
    assert skipped == [(str(files["at64"]), "eval_s_per_case", "with evaluation.batch_size 64")]
    skipped = []
    assert with_unit_costs(m, files["at8"], skipped=skipped, eval_batch=256).unit_s == {"ge_s_per_case": 0.07}
    assert [k for _, k, _ in skipped] == ["eval_s_per_case", "eval_s_per_case_single"]
    skipped = []
    assert with_unit_costs(m, files["unrecorded"], skipped=skipped, eval_batch=256).unit_s == {"ge_s_per_case": 0.07}
    assert {how for *_, how in skipped} == {"with its scoring batch not recorded"}
    for f, kw in ((files["at64"], {"eval_batch": 64}), (files["at64"], {}), (files["unrecorded"], {}),
                  (files["override"], {"eval_batch": 256})):
        assert with_unit_costs(m, f, **kw).unit_s == units
    left = with_unit_costs(m, files["at64"], eval_batch=256)
    assert left.eval(s, ts, 102, 256) == m.eval(s, ts, 102, 256) != 0.03 * 102
    # the model prices fewer, fuller forwards lower: the host time of each eager forward's kernels
    assert m.eval(s, ts, 102, 256) < 0.6 * m.eval(s, ts, 102, 64)
    # ... though their arithmetic is the same but for padding (wider forwards pad more)
    flat = replace(ts, eval_len_hist=())
    assert m.floor().eval(s, flat, 102, 256) == pytest.approx(m.floor().eval(s, flat, 102, 64))
    assert m.floor().eval(s, ts, 102, 256) > m.floor().eval(s, ts, 102, 64)


def test_committed_units_record_their_scoring_batch():
    """The committed calibration scored at the grid's evaluation.batch_size of its time (64), and
    says so; the grid now scores 256 sequences per forward, so its scoring units are modelled."""
    doc = json.loads((REPO_ROOT / "bench/units/h200-bfloat16-llama3-8b-shape.json").read_text())
    assert doc["evaluation"] == {"batch_size": 64}
    assert resolve(str(REPO_ROOT / "params" / "llama3-8b.yaml")).evaluation.batch_size == 256


def test_each_captured_decode_batch_pays_its_warm_up_and_recording(monkeypatch):
    """gen_decode: graph or compiled records each decode batch's step: DECODE_WARMUPS eager steps
    (real arithmetic on the GPU) and the recording (a step's host time, nothing run) on top of the
    replayed steps, once per batch: 10 batches for 1,000 cases at 1,024 rows."""
    from editlib import cost
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    kv = s.kv_bytes_per_token(2) * 10 * (round(ts.gen_case_min_len) + 100) / 2
    for fused in (False, True):
        graph = CostModel(GPUS["h200"], dtype="bfloat16", gen_batch=1024, decode_graphs=True, decode_fused=fused)
        one = graph.ge(s, ts, 1, 100)[0]
        monkeypatch.setattr(cost, "DECODE_WARMUPS", 0)
        none = graph.ge(s, ts, 1, 100)[0]
        monkeypatch.setattr(cost, "DECODE_WARMUPS", DECODE_WARMUPS)
        assert one - none == pytest.approx(DECODE_WARMUPS * replace(graph, decode_graphs=False).decode_step(s, 10, kv))
        # on a GPU of no time at all, the host's: the prefill's launches, each replay's eager kernels, the
        # warm-up's and the recording's launches and Python (a recording runs nothing: no floor of its own)
        fast = replace(graph, gpu=replace(graph.gpu, fp32=math.inf, tf32=math.inf, bf16=math.inf, fp64=math.inf,
                                          bw=math.inf), graph_node_s=0.0)
        blocks = s.n_layers * (graph.kernels_fused_fwd if fused else graph.kernels_fwd)
        step = (blocks + 10) * graph.kernel_s + graph.step_py_s
        assert fast.ge(s, ts, 1, 100)[0] == pytest.approx(
            s.n_layers * graph.kernels_fwd * graph.kernel_s + (100 - round(ts.gen_case_min_len)) * (
                11 * graph.kernel_s + graph.step_py_s) + (DECODE_WARMUPS + 1) * step + 10 * graph.gen_row_py_s)
        eager = replace(graph, decode_graphs=False, decode_fused=False)
        assert graph.floor().ge(s, ts, 1, 100)[0] == pytest.approx(
            eager.floor().ge(s, ts, 1, 100)[0] + DECODE_WARMUPS * eager.floor().decode_step(s, 10, kv))
        assert eager.ge(s, ts, 1000, 100)[0] > graph.ge(s, ts, 1000, 100)[0]


def test_fused_kernels_are_priced_as_fewer_replayed_kernels(tmp_path):
    """gen_decode: compiled captures a step of kernels_fused_fwd kernels per block where graph
    replays the eager kernels_fwd; compile_blocks: reduce-overhead replays kernels_fused_value
    per block (inductor fuses what it captures). Fewer kernels, less GPU time, the same floor
    and tokens; a GE unit measured under graph's unfused kernels does not price compiled."""
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    eager = CostModel(GPUS["h200"], dtype="bfloat16")
    graph = replace(eager, decode_graphs=True)
    fused = replace(graph, decode_fused=True)
    assert fused.kernels_fused_fwd < fused.kernels_fwd
    assert fused.ge(s, ts, 1, 100)[0] < graph.ge(s, ts, 1, 100)[0] < eager.ge(s, ts, 1, 100)[0]
    assert fused.ge(s, ts, 1, 100)[1] == eager.ge(s, ts, 1, 100)[1]
    # the same floor for both captured forms: the eager one's and each batch's eager warm-up step (its
    # recording runs nothing)
    kv = s.kv_bytes_per_token(2) * 10 * (round(ts.gen_case_min_len) + 100) / 2
    assert fused.floor().ge(s, ts, 1, 100)[0] == pytest.approx(graph.floor().ge(s, ts, 1, 100)[0])
    assert fused.floor().ge(s, ts, 1, 100)[0] == pytest.approx(
        eager.floor().ge(s, ts, 1, 100)[0] + DECODE_WARMUPS * eager.floor().decode_step(s, 10, kv))
    step = lambda m: m.decode_step(s, 10)
    assert step(graph) - step(fused) == pytest.approx(
        s.n_layers * (graph.kernels_fwd - graph.kernels_fused_fwd) * graph.graph_node_s)
    val = replace(eager, value_graphs=True)
    more = replace(val, kernels_fused_value=2 * val.kernels_fused_value)
    assert val.values(s, ts, 1, 1) < more.values(s, ts, 1, 1) < eager.values(s, ts, 1, 1)
    # each block is a call, forward and backward: host time that binds once it passes the GPU's
    calls = replace(val, graph_call_s=1e-3)
    assert calls.values(s, ts, 1, 1) > val.values(s, ts, 1, 1)
    assert calls.values(s, ts, 1, 30) < calls.values(s, ts, 1, 1)  # fewer blocks above layer 30
    assert calls.floor().values(s, ts, 1, 1) == pytest.approx(val.floor().values(s, ts, 1, 1))
    graph_file, fused_file = tmp_path / "graph.json", tmp_path / "fused.json"
    graph_file.write_text(json.dumps({"graphs": {"decode_graphs": True, "value_graphs": False},
                                      "units": {"ge_s_per_case": 0.02}}))
    fused_file.write_text(json.dumps({"grid_sets": ["evaluation.gen_decode=compiled"], "units": {"ge_s_per_case": 0.01}}))
    skipped: list[tuple[str, str, str]] = []
    assert with_unit_costs(fused, graph_file, skipped=skipped).unit_s == {}
    assert skipped == [(str(graph_file), "ge_s_per_case", "with CUDA graphs")]
    skipped = []
    assert with_unit_costs(graph, fused_file, skipped=skipped).unit_s == {}
    assert skipped == [(str(fused_file), "ge_s_per_case", "compiled, with CUDA graphs")]
    assert with_unit_costs(fused, fused_file).unit_s == {"ge_s_per_case": 0.01}
    assert with_unit_costs(graph, graph_file).unit_s == {"ge_s_per_case": 0.02}


def test_paper_cost_prices_the_graph_options_from_the_params(tmp_path, capsys):
    """Each option lowers the grid's hours on its own, both lower still; a capture set for some
    experiment sections only is refused (the model captures every value step or none)."""
    import sys
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import paper_cost
    grid = str(REPO_ROOT / "params" / "llama3-8b.yaml")
    dec, val = ["--set", "evaluation.gen_decode=graph"], ["--set", "hparams.common.compile_blocks=reduce-overhead"]
    hours = {}
    fused = ["--set", "evaluation.gen_decode=compiled"]
    for name, sets in (("eager", []), ("decode", dec), ("values", val), ("both", dec + val), ("fused", fused + val)):
        out = tmp_path / f"{name}.json"
        paper_cost.main(["--params", grid, "--gpu", "h200", "--dtype", "bfloat16", "--json", str(out), *sets])
        hours[name] = json.loads(out.read_text())["total_gpu_hours"]
    printed = capsys.readouterr().out
    assert "captured as CUDA graphs, modelled and not measured" in printed
    assert "modelled, not measured: ge_s_per_case" in printed
    assert hours["both"] < hours["decode"] < hours["eager"] and hours["both"] < hours["values"] < hours["eager"]
    assert hours["fused"] < hours["both"]
    assert f"evaluation.gen_decode: compiled, {CostModel(GPUS['h200']).kernels_fused_fwd} fused kernels per block" in printed
    with pytest.raises(SystemExit, match="sequential.emmet, sequential.memit only"):
        paper_cost.main(["--params", grid, "--gpu", "h200", "--dtype", "bfloat16",
                         "--set", "sequential.hparams.common.compile_blocks=reduce-overhead"])


def test_value_steps_recorded_whole_are_priced_as_replays_after_their_eager_steps(tmp_path):
    """hparams capture_steps (editlib.cudagraphs): a one-fact chunk's first forward and its warm-up
    cost eager steps, the recording one step's host time, every other step (the last forward too)
    the replay of the step's eager kernels at graph_node_s each (no host time for them) plus Adam's
    Python, so a host-bound one-fact chunk gets much cheaper, and cheaper still for the share
    (kept_reuse) that replays a kept graph from its first step; a chunk of several facts (each stop
    a new set to record) and one too short to replay are priced as eager ones; the floor does not move;
    units timed eagerly (or compiled) do not price it; paper_cost reads it from the params, all
    sections or none."""
    import sys
    from editlib.values import GRAPH_WARMUPS
    s, ts = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], TokenStats()
    eager = CostModel(GPUS["h200"], dtype="bfloat16")
    cap = replace(eager, step_graphs=True)
    assert cap.values(s, ts, 1, 1) < 0.5 * eager.values(s, ts, 1, 1)
    assert cap.decode_step(s, 10) == eager.decode_step(s, 10)
    assert cap.values(s, ts, 32, 1) == eager.values(s, ts, 32, 1)
    short = {"value_iters": 2 + GRAPH_WARMUPS}
    assert replace(cap, **short).values(s, ts, 1, 1) == replace(eager, **short).values(s, ts, 1, 1)
    free, slow = replace(cap, graph_node_s=0.0), replace(cap, graph_node_s=2 * cap.graph_node_s)
    assert free.values(s, ts, 1, 1) < cap.values(s, ts, 1, 1) < slow.values(s, ts, 1, 1)
    assert cap.floor().values(s, ts, 1, 1) == pytest.approx(eager.floor().values(s, ts, 1, 1))
    own, kept = replace(cap, kept_reuse=0.0), replace(cap, kept_reuse=1.0)  # each fact records, or none does
    assert kept.values(s, ts, 1, 1) < cap.values(s, ts, 1, 1) < own.values(s, ts, 1, 1)
    r = cap.kept_reuse
    assert cap.values(s, ts, 1, 1) == pytest.approx((1 - r) * own.values(s, ts, 1, 1) + r * kept.values(s, ts, 1, 1))
    assert kept.values(s, ts, 32, 1) == eager.values(s, ts, 32, 1)  # chunks keep no graph
    units = tmp_path / "eager.json"
    units.write_text(json.dumps({"graphs": {"decode_graphs": False, "value_graphs": False},
                                 "units": {"values_s_per_fact_single": 2.7, "ge_s_per_case": 0.07}}))
    skipped: list = []
    assert with_unit_costs(cap, units, skipped=skipped).unit_s == {"ge_s_per_case": 0.07}
    assert skipped == [(str(units), "values_s_per_fact_single", "eagerly")]
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"grid_sets": ["hparams.common.capture_steps=true"],
                                    "units": {"values_s_per_fact_single": 0.9}}))
    assert with_unit_costs(cap, recorded).unit_s == {"values_s_per_fact_single": 0.9}
    skipped = []
    assert with_unit_costs(eager, recorded, skipped=skipped).unit_s == {}
    assert skipped == [(str(recorded), "values_s_per_fact_single", "with the eager steps recorded as CUDA graphs")]
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import paper_cost
    grid = str(REPO_ROOT / "params" / "llama3-8b.yaml")
    hours = {}
    for name, sets in (("eager", []), ("captured", ["--set", "hparams.common.capture_steps=true"])):
        out = tmp_path / f"{name}.json"
        paper_cost.main(["--params", grid, "--gpu", "h200", "--dtype", "bfloat16", "--json", str(out), *sets])
        hours[name] = json.loads(out.read_text())["total_gpu_hours"]
    assert hours["captured"] < 0.8 * hours["eager"]
    with pytest.raises(SystemExit, match="capture_steps: true for sequential.emmet, sequential.memit only"):
        paper_cost.main(["--params", grid, "--gpu", "h200", "--dtype", "bfloat16",
                         "--set", "sequential.hparams.common.capture_steps=true"])


def test_c0_passes_are_priced_with_the_remainder_first(monkeypatch):
    """C0 in several passes: each runs the corpus up to its deepest layer, the few leftover layers in
    the first, shallowest pass (editlib.stats.pass_groups): 32 layers at 15 per pass cost 2 + 17 + 32
    blocks per token, not 15 + 30 + 32."""
    s = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"]
    m = CostModel(GPUS["h100"], flops_only=True)
    monkeypatch.setattr(CostModel, "c0_per_pass", lambda self, shape: 15)
    one_block = 2 * s.block_params * m.c0_tokens / (m.peak * m.mm_eff)
    gram = m.c0_collect(s, 32, 31) - (2 + 17 + 32) * one_block
    assert gram > 0
    monkeypatch.setattr(CostModel, "c0_per_pass", lambda self, shape: 32)
    assert m.c0_collect(s, 32, 31) == pytest.approx(32 * one_block + gram)  # one pass: the same Gram work


def test_generation_lengths_are_the_histograms_quantiles():
    """GE's prompt lengths for n rows: sorted, each the first length whose cumulative weight reaches
    (i + 0.5) / n, so their counts follow the histogram; the same tuple on every call."""
    ts = TokenStats(gen_len_hist=((5, 1.0), (7, 2.0), (9, 1.0)))
    assert ts.gen_lengths(4) == (5, 7, 7, 9) and ts.gen_lengths(1) == (7,)
    lens = TokenStats().gen_lengths(10_000)
    assert list(lens) == sorted(lens) and lens is TokenStats().gen_lengths(10_000)
    total = sum(w for _, w in TokenStats().gen_len_hist)
    for length, w in TokenStats().gen_len_hist:
        assert abs(lens.count(length) / len(lens) - w / total) <= 1 / len(lens)


def test_host_units_benchmark_measures_each_priced_piece(world_records, monkeypatch):
    """bench/host_units.py (the source of case_py_s and gen_row_py_s): each piece of a GE text's
    host work and a case's host time outside the model come out positive and finite, and the
    time it takes off (the model's forwards, the vocabulary-wide ops) is measured, not zero."""
    import math
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import host_units

    from editlib.llama3_tokenizer import build_llama3_tokenizer
    tok = build_llama3_tokenizer()
    ids = host_units.texts_of(world_records, tok, 6, tokens=12)
    assert len(ids) == 6 and all(0 < len(s) <= 12 and s[0] == tok.bos_token_id for s in ids)
    row = host_units.gen_row(tok, ids, rounds=1)
    assert {"row_rng", "decode_text", "ngram_entropy"} <= set(row)
    assert all(0 < v < math.inf for v in row.values())
    host, model = host_units.case_host(world_records, tok, 4, rounds=1)
    assert 0 < host < math.inf and 0 < model < math.inf
    import torch
    assert torch.log_softmax.__name__ == "log_softmax" and torch.Tensor.argmax.__name__ == "argmax"  # restored


def test_profile_device_time_counts_each_kernel_once(monkeypatch):
    """bench/bench_compiled_values.py --profile: a kernel's time is carried both by the operator
    that launched it and by the kernel's own device event; the device time per iteration (what
    graph_node_s is fitted to) counts it once, as torch's own table footer does."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import bench_compiled_values

    op = FunctionEvent(id=1, name="aten::mm", thread=0, start_us=0, end_us=20, use_device="cuda",
                       device_type=DeviceType.CPU, stack=[])
    op.append_kernel("gemm", 0, 5.0)
    other = FunctionEvent(id=3, name="aten::add", thread=0, start_us=30, end_us=40, use_device="cuda",
                          device_type=DeviceType.CPU, stack=[])
    other.append_kernel("add_kernel", 0, 2.0)
    kernels = [FunctionEvent(id=i, name=n, thread=0, start_us=s, end_us=s + d, use_device="cuda",
                             device_type=DeviceType.CUDA, device_index=0, stack=[])
               for i, n, s, d in ((2, "gemm", 2, 5), (4, "add_kernel", 32, 2))]
    events = EventList([op, other, *kernels], use_device="cuda")
    events._build_tree()
    ev = events.key_averages()
    assert sum(e.self_device_time_total for e in ev) == 14.0  # every event: each kernel twice
    assert bench_compiled_values.device_us(ev) == 7.0


def test_scoring_forwards_are_priced_padded():
    """Scoring sorts a call's sequences by length and pads each forward to its longest
    (editlib.scoring.score_targets), so the cost model prices padded tokens: none for equal
    lengths, the batch's longest for every row of a forward, more padding in fewer, wider forwards,
    and (for a big call, whose forwards are each nearly one length) almost none."""
    flat = TokenStats(eval_len_hist=((10, 1.0),))
    assert flat.eval_padding(64, 256) == 1.0
    two = TokenStats(eval_seqs=4.0, eval_len_hist=((10, 0.5), (30, 0.5)))
    assert two.eval_padding(1, 256) == pytest.approx(4 * 30 / (2 * 10 + 2 * 30))  # one forward of 4
    assert two.eval_padding(1, 2) == 1.0                                         # [10, 10], [30, 30]
    assert two.eval_padding(1, 3) == pytest.approx((3 * 30 + 30) / 80)           # [10, 10, 30], [30]
    assert TokenStats(eval_len_hist=()).eval_padding(8, 256) == 1.0
    ts = TokenStats()
    assert ts.eval_padding(1, 256) > ts.eval_padding(64, 256) > ts.eval_padding(1000, 256) > 1.0
    assert ts.eval_padding(64, 256) > ts.eval_padding(64, 64) > 1.0
    assert ts.eval_padding(4096, 256) < 1.02
    model, shape = CostModel(gpu=GPUS["h200"]), KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"]
    padded = model.eval(shape, ts, 64, 256)
    assert padded > model.eval(shape, replace(ts, eval_len_hist=()), 64, 256)
    assert model.eval(shape, two, 1, 2) == pytest.approx(model.eval(shape, replace(two, eval_len_hist=()), 1, 2))
