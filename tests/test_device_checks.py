"""The prepared GPU run (bench/device_checks.py): its budget, time limits, summary file and verdicts,
checked on the CPU (the checks themselves need a GPU)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

from editlib.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import device_checks as dc  # noqa: E402


def run_of(tmp_path, budget=120.0, device="cpu") -> dc.Run:
    return dc.Run(tmp_path / "out", budget, device, smoke=True, work=tmp_path / "work")


def test_steps_run_in_order_and_the_summary_is_rewritten_after_each(tmp_path):
    seen: list[list[str]] = []

    def ok(run, step):
        step.status, step.numbers = "passed", {"x": 1}
        seen.append([s["name"] for s in json.loads((run.out / "checks.json").read_text())["steps"]]
                    if (run.out / "checks.json").is_file() else [])

    def broken(run, step):
        raise RuntimeError("boom")

    run = run_of(tmp_path)
    steps = dc.run_checks(run, ["env", "gram", "cost"], runners={"env": ok, "gram": broken, "cost": ok})
    assert [(s.name, s.status) for s in steps] == [("env", "passed"), ("gram", "failed"), ("cost", "passed")]
    assert steps[1].reason == "RuntimeError: boom"  # a broken step is reported; the next still runs
    assert seen == [[], ["env", "gram"]]  # checks.json already held the steps before the one running
    doc = json.loads((run.out / "checks.json").read_text())
    assert [s["status"] for s in doc["steps"]] == ["passed", "failed", "passed"] and doc["device"] == "cpu"
    assert not (run.out / "checks.json.tmp").exists()


def test_a_failed_env_stops_the_run_and_later_steps_keep_their_time(tmp_path):
    """No GPU seen (or packages missing) on a GPU run: nothing else runs. A running step leaves the
    cost and compiled steps' least time free (RESERVED)."""
    ran: list[str] = []

    def env(run, step):
        step.status, step.reason = "failed", "torch sees no CUDA device"

    run = dc.Run(tmp_path / "out", 60.0, "cuda", smoke=True, work=tmp_path / "work")
    steps = dc.run_checks(run, ["env", "gram", "slice"], runners={"env": env, "gram": lambda r, s: ran.append("gram"),
                                                                  "slice": lambda r, s: ran.append("slice")})
    assert ran == [] and [s.status for s in steps] == ["failed", "skipped", "skipped"]
    assert steps[1].reason == "env failed: torch sees no CUDA device"
    limits: dict[str, float] = {}

    def slice_(run, step):
        limits["slice"] = run.left() - run.reserve

    run = run_of(tmp_path, budget=110.0)
    run.caps = {"slice": (400, 10), "cost": (90, 20), "compiled": (200, 60)}
    dc.run_checks(run, ["slice", "cost", "compiled"],
                  runners={"slice": slice_, "cost": lambda r, s: None, "compiled": lambda r, s: None})
    assert 15 < limits["slice"] <= 20  # 110 s less the cost step's 20 and the compiled step's 60, each with
    # RESERVE_MARGIN_S (5 s)


def test_a_step_that_no_longer_fits_the_budget_is_skipped(tmp_path):
    ran: list[str] = []
    run = run_of(tmp_path, budget=100.0)
    run.t0 = time.perf_counter() - 50  # 50 s left
    run.caps = {"env": (10, 5), "slice": (400, 150), "gram": (60, 20)}
    steps = dc.run_checks(run, ["env", "slice", "gram"],
                          runners={k: (lambda r, s, k=k: ran.append(k) or setattr(s, "status", "passed")) for k in run.caps})
    assert ran == ["env", "gram"]
    assert steps[1].status == "not run" and "needs 150" in steps[1].reason


def test_a_step_left_out_for_want_of_budget_fails_the_run(tmp_path):
    """A run whose budget did not reach a step did not check it: exit status 1, and the summary
    file says which step and why."""
    out = tmp_path / "out"
    assert dc.main(["--only", "env", "--budget", "0", "--device", "cpu", "--out", str(out)]) == 1
    (step,) = json.loads((out / "checks.json").read_text())["steps"]
    assert step["status"] == "not run" and "budget" in step["reason"]


def test_a_command_past_its_limit_is_stopped_and_keeps_its_output(tmp_path):
    run = run_of(tmp_path, budget=5.0)
    run.out.mkdir(parents=True)
    step = dc.Step("gram")
    t = time.perf_counter()
    out = dc.run_command(run, step, [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], cap=30)
    assert time.perf_counter() - t < 25  # the budget's 5 s, not the cap's 30
    assert step.status == "timeout" and "started" in out and step.rc is None
    assert "started" in (run.out / "checks.log").read_text()
    step = dc.Step("env")
    dc.run_command(run_of(tmp_path), step, [sys.executable, "-c", "raise SystemExit(3)"], cap=30)
    assert (step.status, step.rc) == ("failed", 3)


def test_commands_find_editlib_without_an_install(tmp_path):
    """On the GPU machine the checkout is not pip-installed: every command gets the repository on
    PYTHONPATH (a bench script's own folder, not the root, is first on its path)."""
    run = run_of(tmp_path)
    run.out.mkdir(parents=True)
    script = tmp_path / "probe.py"  # like a bench script: its own folder first on its path, not the root
    script.write_text("import editlib, os\nprint(os.path.dirname(editlib.__file__))\n")
    # -S: no site-packages, so no installed or editable editlib: found through PYTHONPATH or not at all
    step = dc.Step("env")
    out = dc.run_command(run, step, [sys.executable, "-S", str(script)], cap=30)
    assert step.status == "passed" and out.strip().splitlines()[-1] == str(REPO_ROOT / "editlib"), out


def test_env_reads_the_last_json_line_and_records_the_free_disk(tmp_path):
    assert dc.last_json('{"a": 1}\nwarning: something\n{"torch": "2.11"}\nFutureWarning: x\n') == {"torch": "2.11"}
    with pytest.raises(ValueError):
        dc.last_json("no json here")
    run = run_of(tmp_path)
    steps = dc.run_checks(run, ["env"])
    n = steps[0].numbers
    assert steps[0].status == "passed", (run.out / "checks.log").read_text()[-2000:]
    assert n["disk_free_gib"] > 0 and n["numpy"] and n["pandas"] and run.info["disk_free_gib"] == n["disk_free_gib"]


def test_shape_model_size_is_the_built_models():
    """The disk estimate counts the same parameters as the shape model's own config (2 and 32 layers)."""
    from editlib.shapes import _param_shapes, llama3_8b_config
    for layers in (2, 32):
        n = sum(math.prod(shape) for _, shape in _param_shapes(llama3_8b_config(layers)))
        assert dc.shape_model_gib(layers) == pytest.approx(n * 2 / 2**30, rel=1e-12)
    assert 14.9 < dc.shape_model_gib(32) < 15.0  # 8.03 B bfloat16 parameters


def test_the_slice_fails_fast_without_the_disk_for_its_model(tmp_path, monkeypatch):
    """A fresh GPU machine's disk too small for the 32-layer model: the slice is not started."""
    monkeypatch.setattr(dc, "ROOT", tmp_path / "repo")  # no built shape model there
    monkeypatch.setattr(dc, "run_command", lambda *a, **k: pytest.fail("the slice must not start"))
    run = _staged_shape_run(tmp_path, monkeypatch, free_gib=10)
    (step,) = dc.run_checks(run, ["slice"])
    assert step.status == "failed" and "10.0 GiB of disk free, the slice needs 19.0 GiB" in step.reason
    assert step.numbers == {"disk_need_gib": 19.0, "disk_free_gib": 10.0}


def test_the_cost_step_runs_the_measured_units_first(tmp_path, monkeypatch):
    """The measured units are what only the GPU gives: they come before the modelled estimate, and
    a failed first call leaves the time for the next step."""
    calls: list[list[str]] = []

    def fake(run, step, argv, cap, env=None):
        calls.append(argv)
        step.status = "failed"
        return ""

    monkeypatch.setattr(dc, "run_command", fake)
    run = run_of(tmp_path)
    run.out.mkdir(parents=True)
    (run.out / "phases.json").write_text(json.dumps({"units": {"values_s_per_fact": 1.0}}))
    (step,) = dc.run_checks(run, ["cost"])
    assert len(calls) == 1 and "--unit-costs" in calls[0] and step.status == "failed"


def test_cuda_tests_stopped_before_their_junit_file_keep_what_they_decided(tmp_path, monkeypatch):
    """A cuda_tests run stopped by its time limit writes no junit.xml: the step keeps the outcomes
    its -v lines had printed, and stays a timeout."""
    out = ("tests/test_models.py::test_fingerprint_device_independent PASSED                 [  7%]\n"
           "tests/test_stats.py::test_cuda_matches_cpu FAILED                                  [ 14%]\n"
           "tests/test_values.py::test_cuda_graph_blocks_follow_eager[True] SKIPPED (needs a CUDA device) [ 21%]\n"
           "tests/test_values.py::test_cuda_graph_blocks_under_model_deterministic \n")

    def fake(run, step, argv, cap, env=None):
        step.status, step.reason = "timeout", "stopped after 180 s"
        return out
    monkeypatch.setattr(dc, "run_command", fake)
    run = run_of(tmp_path)
    run.out.mkdir(parents=True)
    step = dc.Step("cuda_tests")
    dc.step_cuda_tests(run, step)
    assert step.status == "timeout" and "3 tests decided before it stopped" in step.reason
    assert {k: step.numbers[k] for k in ("tests", "failures", "errors", "skipped")} == \
        {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
    assert step.numbers["decided"][1] == "tests/test_stats.py::test_cuda_matches_cpu FAILED"


def test_skipped_cuda_tests_fail_a_gpu_run():
    counts = {"tests": 6, "failures": 0, "errors": 0, "skipped": 6}
    assert dc.tests_verdict("passed", counts, "cpu")[0] == "skipped"
    assert dc.tests_verdict("passed", counts, "cuda") == ("failed", "6 of 6 skipped (no CUDA device seen)")
    assert dc.tests_verdict("passed", {**counts, "skipped": 0}, "cuda")[0] == "passed"
    assert dc.tests_verdict("passed", {**counts, "tests": 0, "skipped": 0}, "cuda")[0] == "failed"
    assert dc.tests_verdict("failed", {**counts, "failures": 1}, "cuda", "x") == ("failed", "x")


def test_the_cuda_tests_it_names_exist_and_are_the_cuda_only_ones(tmp_path):
    """Every listed node id is collected, and every test skipped for want of CUDA is listed."""
    import subprocess
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          f"--junitxml={tmp_path / 'j.xml'}", *dc.CUDA_TESTS], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    counts = dc.junit_counts(tmp_path / "j.xml")
    assert counts["tests"] == 15 and counts["failures"] == counts["errors"] == 0, out.stdout[-2000:]
    if counts["skipped"]:  # -rs groups equal reasons: "SKIPPED [2] file:line: reason"
        import re
        why = re.findall(r"SKIPPED \[(\d+)\] \S+ needs a CUDA device", out.stdout)
        assert sum(map(int, why)) == counts["skipped"], out.stdout[-2000:]
    listed = {n.split("::")[1] for n in dc.CUDA_TESTS}
    for path in (REPO_ROOT / "tests").glob("test_*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("@pytest.mark.skipif(not torch.cuda.is_available()"):
                name = next(l for l in lines[i + 1:] if l.startswith("def ")).split("(")[0][4:]
                assert name in listed, f"{path.name}::{name} is CUDA-only but not in device_checks.CUDA_TESTS"


def test_the_summary_lines_of_the_benchmarks_parse():
    gram = ("d_in 14336, 24576 bfloat16 tokens on cuda (2 threads), block upper triangle into float64: float64 "
            "products 0.412 s, float32 products (covariance.fast_gram, TF32) 0.021 s: x19.62; after 4 updates "
            "each, relative difference 3.1e-06")
    assert dc.parse_gram(gram) == {"float64_s": 0.412, "float32_s": 0.021, "speedup": 19.62, "rel_diff": 3.1e-06}
    gram16 = gram + ("\n16-bit products (covariance.fast_gram on 16-bit tensor cores) 0.011 s: x37.45 over float64 "
                     "products, x1.91 over TF32; relative difference 2.9e-06")
    assert dc.parse_gram(gram16) == {"float64_s": 0.412, "float32_s": 0.021, "speedup": 19.62, "rel_diff": 3.1e-06,
                                     "bit16_s": 0.011, "speedup_16bit": 37.45, "speedup_16bit_over_tf32": 1.91,
                                     "rel_diff_16bit": 2.9e-06}
    comp = ("profile (eager): 1 facts, 26 iterations, wall 112.0 ms/iteration, device 35.1 ms/iteration (31 % of wall), "
            "4498 device kernels/iteration (wall includes the profiler's own overhead)\n"
            "         compiled vs eager: max |Δz| 2.29e-05, max relative ‖Δz‖ 3.40e-07, equal step counts 4/4\n"
            "         compiled vs eager: max |Δz| 1.10e-05, max relative ‖Δz‖ 5.00e-07, equal step counts 4/4\n"
            "profile (compiled): 1 facts, 26 iterations, wall 20.0 ms/iteration, device 15.2 ms/iteration (76 % of wall), "
            "1871 device kernels/iteration (wall includes the profiler's own overhead)\n"
            "CUDA graphs recorded: 240, peak GPU memory reserved 17.25 GiB\n"
            "eager 255.4-260.0 ms/fact, compiled 199.7-201.0: 1.28x")
    assert dc.parse_compiled(comp) == {"eager_ms_per_fact": [255.4, 260.0], "compiled_ms_per_fact": [199.7, 201.0],
                                       "max_abs_dz": 2.29e-05, "max_rel_dz": 5.0e-07,
                                       "eager_kernels_per_iteration": 4498, "compiled_kernels_per_iteration": 1871,
                                       "cuda_graphs_recorded": 240, "peak_reserved_gib": 17.25}
    assert dc.parse_gram("nothing") == {} and dc.parse_compiled("nothing") == {}
    dec = ("models/tiny-world: 64 prompts, 94 decode steps of 64 rows\n"
           "  transformers: 0.90, 0.63 s  (9.52, 6.68 ms per step)  texts equal to transformers: 64/64\n"
           "        static: 0.49, 0.47 s  (5.16, 4.96 ms per step)  texts equal to transformers: 64/64\n"
           "  kernels per decode step of 64 rows: transformers 2911, static 2870, graph 2402\n"
           "x: 10 prompts, 90 decode steps of 10 rows\n"
           "         graph: 0.54 s  (5.78 ms per step)\n")
    assert dc.parse_decode(dec) == {
        "rows_64": {"transformers": {"ms_per_step": [9.52, 6.68], "texts_equal": "64/64"},
                    "static": {"ms_per_step": [5.16, 4.96], "texts_equal": "64/64"},
                    "kernels_per_step": {"transformers": 2911, "static": 2870, "graph": 2402}},
        "rows_10": {"graph": {"ms_per_step": [5.78]}}}
    failed = "compiled warm-up failed: BackendCompilerFailed: x\neager 250.0-260.5 ms/fact, compiled failed: BackendCompilerFailed: x"
    assert dc.parse_compiled(failed) == {"eager_ms_per_fact": [250.0, 260.5], "compiled_error": "BackendCompilerFailed: x"}
    cap = ("profile (captured): 1 facts, 26 iterations, wall 30.0 ms/iteration, device 17.6 ms/iteration (59 % of wall), "
           "4498 device kernels/iteration (wall includes the profiler's own overhead)\n"
           "round 1 captured:   950.0 ms/fact   36.00 ms/iteration  mean steps 24.0  one-fact graphs kept: 5 recorded, 1 reused\n"
           "         captured vs eager: max |Δz| 0.00e+00, max relative ‖Δz‖ 0.00e+00, equal step counts 6/6, "
           "z equal to the bit 6/6\n"
           "round 2 captured:   900.0 ms/fact   34.00 ms/iteration  mean steps 24.0  one-fact graphs kept: 0 recorded, 6 reused\n"
           "         captured vs eager: max |Δz| 1.20e-07, max relative ‖Δz‖ 2.00e-09, equal step counts 6/6, "
           "z equal to the bit 5/6\n"
           "eager 2680.0-2710.0 ms/fact, captured 900.0-950.0: 2.90x")
    assert dc.parse_compiled(cap) == {"eager_ms_per_fact": [2680.0, 2710.0], "captured_ms_per_fact": [900.0, 950.0],
                                      "max_abs_dz": 1.2e-07, "max_rel_dz": 2.0e-09, "z_bit_equal": "11/12",
                                      "captured_kernels_per_iteration": 4498, "kept_graphs_recorded": [5, 0],
                                      "kept_graphs_reused": [1, 6]}
    assert dc.parse_compiled("eager 1.0-2.0 ms/fact, captured failed: RuntimeError: y") == {
        "eager_ms_per_fact": [1.0, 2.0], "captured_error": "RuntimeError: y"}


def test_gram_step_on_the_cpu(tmp_path):
    """The real benchmark at a small size: its summary line is read into numbers."""
    run = run_of(tmp_path)
    steps = dc.run_checks(run, ["gram"])
    assert steps[0].status == "passed", (run.out / "checks.log").read_text()[-2000:]
    n = steps[0].numbers
    assert n["float64_s"] > 0 and n["float32_s"] > 0 and n["rel_diff"] < 1e-5


def test_decode_step_on_the_cpu(tmp_path):
    """The decode benchmark at its smoke size (the miniature, 8 rows): every mode timed, and
    static's texts equal to the transformers path's; then the calibration's eval units under
    gen_decode compiled."""
    run = run_of(tmp_path, budget=900.0)
    (step,) = dc.run_checks(run, ["decode_shape"])
    assert step.status == "passed", (run.out / "checks.log").read_text()[-2000:]
    got = step.numbers["rows_8"]
    assert set(got) == {"transformers", "static", "graph", "compiled"}
    assert all(v["ms_per_step"][0] > 0 for v in got.values())
    assert got["static"]["texts_equal"] == "8/8" and got["transformers"]["texts_equal"] == "8/8"
    units = step.numbers["compiled_units"]  # the calibration's eval part under gen_decode compiled (uncaptured on a CPU)
    assert units["eval_s_per_case"] > 0 and (run.out / "calibration-compiled.json").is_file()
    assert "evaluation.gen_decode=compiled" in step.command and "--parts eval" in step.command


def test_slice_and_cost_steps_need_what_they_read(tmp_path, monkeypatch):
    """Without the staged tokenizer and CounterFact the GPU slice is skipped with the command to
    stage them; without the slice's measured units the cost step is skipped."""
    monkeypatch.setattr(dc, "STAGE", tmp_path / "nothing")
    run = dc.Run(tmp_path / "out", 600.0, "cuda", smoke=False, work=tmp_path / "work")
    steps = dc.run_checks(run, ["slice", "cost"])
    assert steps[0].status == "skipped" and "--stage" in steps[0].reason
    assert steps[1].status == "skipped" and "no measured units" in steps[1].reason
    cmd = dc.slice_command(run, tmp_path / "s")
    assert "model.id=.cache/llama3-8b-shape-32L" in cmd and "model.device=cuda" in cmd and "--draw-device" in cmd


def test_stage_writes_the_tokenizer_and_counterfact(tmp_path, monkeypatch):
    llama3 = pytest.importorskip("editlib.llama3_tokenizer")
    from editlib.counterfact import DatasetNotFound, resolve_counterfact
    try:
        llama3.llama3_tokenizer_file()
        src = resolve_counterfact(None, download=False)
    except (llama3.TokenizerUnavailable, DatasetNotFound) as e:  # no Llama-3 tokenizer file or no CounterFact here
        pytest.skip(str(e))
    dc.stage(tmp_path / "stage")
    (staged,) = (tmp_path / "stage").glob("counterfact*")
    assert staged.read_bytes() == src.read_bytes() and staged.name.endswith(src.suffixes[-1])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "stage" / "tokenizer"))
    assert len(tok) == 128256


def test_smoke_slice_and_cost_on_the_miniature(tmp_path):
    """bench/slice_phases.py end to end at small sizes (the miniature in place of the 32-layer
    shape): every phase runs, phases.json carries the measured units, and paper_cost takes them."""
    run = run_of(tmp_path, budget=900.0)
    steps = dc.run_checks(run, ["slice", "cost"])
    log = (run.out / "checks.log").read_text()
    assert [s.status for s in steps] == ["passed", "passed"], log[-3000:]
    doc = json.loads((run.out / "phases.json").read_text())
    (own,) = run.work.glob("slice-*/phases.json")  # the slice wrote both itself (--phases-copy)
    assert json.loads(own.read_text()) == doc
    names = list(doc["phases"])
    assert doc["complete"] and names.index("evaluate 8 cases, GE") < names.index("layer search")
    assert {"values_s_per_fact", "eval_s_per_case", "c0_factor_s", "solve_s_by_n"} <= set(doc["units"])
    assert doc["evaluation"] == {"batch_size": 128}  # the scoring batch its eval units were timed at (smoke.yaml's)
    from editlib.cost import timed, timed_shape  # ... the shape they were timed on (the miniature's), GE's call
    assert (timed_shape(doc).n_layers, timed_shape(doc).d) == (6, doc["unit_costs"]["d"])
    t = timed(doc, "ge_s_per_case")
    assert (t.cases, t.gen_max_len) == (8, 8) and t.gen_rows > 0 and timed(doc, "ge_s_per_case_single").cases == 1
    # GE of 8 tokens on the miniature can be lost in the noise of its timing: then no unit, never a zero
    assert all(doc["units"][k] > 0 for k in ("ge_s_per_case", "ge_s_per_case_single") if k in doc["units"])
    cost = steps[1].numbers
    assert cost["modelled"]["total_gpu_hours"] > 0 and cost["measured_units"]["total_gpu_hours"] > 0
    assert steps[0].numbers["complete"] and steps[0].numbers["phases_s"]["layer search"] > 0


def test_smoke_calibration_and_cost_on_the_miniature(tmp_path):
    """bench/calibrate_units.py at small sizes on the miniature: calibration.json carries the units
    (a GE difference lost in noise is left out, never a zero), and the cost step prices with them."""
    run = run_of(tmp_path, budget=400.0)
    steps = dc.run_checks(run, ["calibrate", "cost", "captured_units"])
    log = (run.out / "checks.log").read_text()
    assert [s.status for s in steps] == ["passed", "passed", "passed"], log[-3000:]
    # captured_units' own calls, eagerly on the CPU: its parts, both pricings, nothing else returned
    cap = json.loads((run.out / "calibration-captured.json").read_text())
    assert cap["complete"] and set(cap["raw"]) == {"load_s", "eval", "values"} and "values_s_per_fact_single" in cap["units"]
    assert all(steps[2].numbers[k]["total_gpu_hours"] > 0 for k in ("measured_units", "modelled"))
    assert {p.name for p in run.out.iterdir()} == {"checks.json", "checks.log", "calibration.json", "cost.json",
                                                   "calibration-captured.json"}
    doc = json.loads((run.out / "calibration.json").read_text())
    assert doc["complete"] and not doc["errors"]
    assert {"c0_layer_fixed_s", "c0_factor_s", "eval_s_per_case", "eval_s_per_case_single", "values_s_per_fact",
            "values_s_per_fact_single"} <= set(doc["units"])
    assert all(v > 0 for v in doc["units"].values())
    assert doc["raw"]["c0"]["layers_per_pass"] == 6 and doc["raw"]["eval"]["cases"] == 4
    assert doc["evaluation"] == {"batch_size": 128}  # the grid's scoring batch, which the eval units were timed at
    from editlib.cost import timed_shape  # ... and the shape they were timed on (the miniature's)
    assert (timed_shape(doc).n_layers, timed_shape(doc).d_in) == (6, doc["model"]["d_in"])
    assert steps[0].numbers["units"] == doc["units"]
    (priced,) = [ln for ln in log.splitlines() if ln.startswith("=== cost: ") and "--unit-costs" in ln]
    assert "calibration.json" in priced and "phases.json" not in priced
    assert steps[1].numbers["measured_units"]["total_gpu_hours"] > 0


def test_the_calibration_wins_over_the_slice(tmp_path):
    run = run_of(tmp_path)
    run.out.mkdir(parents=True)
    assert dc.measured_unit_files(run) == []
    (run.out / "calibration.json").write_text(json.dumps({"units": {"values_s_per_fact": 1.0}}))
    (run.out / "phases.json").write_text(json.dumps({"units": {"values_s_per_fact": 2.0}}))
    assert [f.name for f in dc.measured_unit_files(run)] == ["phases.json", "calibration.json"]
    cmd = dc.calibrate_command(dc.Run(tmp_path / "out", 600.0, "cuda", smoke=False))
    assert "params/llama3-8b.yaml" in cmd and "model.id=.cache/llama3-8b-shape-32L" in cmd and "model.device=cuda" in cmd


def test_lease_sized_steps_run_only_when_asked(tmp_path, monkeypatch):
    """A plain run checks DEFAULT_STEPS (its 9 minutes: what has never run on a GPU); the others run
    with --only, and the shape step names what is missing instead of starting."""
    assert dc.DEFAULT_STEPS == ("env", "cuda_tests", "captured_shape", "captured_units")
    assert set(dc.STEPS) - set(dc.DEFAULT_STEPS) == {"gram", "slice", "calibrate", "cost", "compiled", "compiled_shape",
                                                     "shared_gpu", "decode_shape"}
    seen: list[str] = []
    monkeypatch.setattr(dc, "run_checks", lambda run, names: seen.extend(names) or [])
    assert dc.main(["--out", str(tmp_path / "o")]) == 0 and tuple(seen) == dc.DEFAULT_STEPS
    monkeypatch.undo()
    monkeypatch.setattr(dc, "STAGE", tmp_path / "nothing")
    for name in ("compiled_shape", "captured_shape"):
        run = dc.Run(tmp_path / name, 600.0, "cuda", smoke=False, work=tmp_path / "work")
        (step,) = dc.run_checks(run, [name])
        assert step.status == "skipped" and "--stage" in step.reason
        (step,) = dc.run_checks(run_of(tmp_path / f"smoke-{name}", budget=900.0), [name])
        assert step.status == "skipped" and "no smoke size" in step.reason
    for name in ("decode_shape", "captured_units", "shared_gpu"):
        run = dc.Run(tmp_path / f"out-{name}", 600.0, "cuda", smoke=False, work=tmp_path / "work")
        (step,) = dc.run_checks(run, [name])
        assert step.status == "skipped" and "--stage" in step.reason


def test_a_plain_run_reaches_every_default_step_when_each_runs_to_its_limit(tmp_path):
    """The default budget holds DEFAULT_STEPS: each step, run to the limit run_command would give it
    (its cap, less what later RESERVED steps keep), still leaves every later step its least time."""
    limits: dict[str, float] = {}

    def to_limit(run, step):
        limit = max(1.0, min(run.caps[step.name][0], run.left() - run.reserve))
        limits[step.name] = limit
        run.t0 -= limit + 4.0  # the step took all of it, and seconds of its own beyond (env's nvidia-smi, a reader's join)
        step.status = "passed"

    seen = []
    with pytest.MonkeyPatch.context() as mp:  # main's default budget, as a plain run gets it
        mp.setattr(dc, "run_checks", lambda run, names: seen.append(run.budget) or [])
        dc.main(["--out", str(tmp_path / "o")])
    run = dc.Run(tmp_path / "out", seen[0], "cuda", smoke=False, work=tmp_path / "work")
    steps = dc.run_checks(run, list(dc.DEFAULT_STEPS), runners={n: to_limit for n in dc.DEFAULT_STEPS})
    assert [s.status for s in steps] == ["passed"] * len(dc.DEFAULT_STEPS)
    assert all(limits[n] >= dc.CAPS[n][1] for n in dc.DEFAULT_STEPS), limits
    assert limits["captured_units"] >= dc.CAPS["captured_units"][1]  # kept free while the shape step ran


def test_one_failed_protocol_does_not_stop_the_others():
    import contextlib
    import slice_phases

    phases, saved, ran = {}, [], []

    @contextlib.contextmanager
    def phase(name):  # as slice_phases' own: a failed phase records its GPU peak
        try:
            yield
        except BaseException:
            phases[name] = {"seconds": None, "cuda_peak_gib": 139.5}
            raise
        phases[name] = {"seconds": 1.0}

    def boom(study, log):
        raise MemoryError("CUDA out of memory")

    runs = [("layer search", boom), ("sweep", lambda study, log: ran.append("sweep"))]
    failed = slice_phases.run_protocols(runs, None, phase, phases, lambda complete: saved.append(complete))
    assert failed == ["layer search"] and ran == ["sweep"]
    assert phases == {"layer search": {"seconds": None, "cuda_peak_gib": 139.5, "error": "MemoryError: CUDA out of memory"},
                      "sweep": {"seconds": 1.0}}
    assert saved == [False]


def test_a_ge_unit_lost_in_timing_noise_is_not_passed_on_as_zero():
    import slice_phases

    phases = {"evaluate 1 case, no GE": {"seconds": 3.2}, "evaluate 1 case, GE": {"seconds": 3.1},
              "evaluate 8 cases, no GE": {"seconds": 24.0}, "evaluate 8 cases, GE": {"seconds": 32.0}}
    u = slice_phases.measured_units({}, phases)
    assert u == {"eval_s_per_case_single": 3.2, "eval_s_per_case": 3.0, "ge_s_per_case": 1.0}


def test_the_ge_warm_up_decodes(world_lm, world_records):
    """The untimed GE warm-up of slice_phases.py and calibrate_units.py decodes tokens: GE extends a
    prompt up to the length asked for, so a length at or below every prompt's (the former 4)
    runs no forward at all and warms nothing, and the first timed GE paid the first call's costs
    (under gen_decode: compiled, the decode step's compilation)."""
    import slice_phases

    from editlib.generation import sample_texts
    from editlib.tokens import encode

    model, tok = world_lm
    rec = world_records[:1]
    prompts = rec[0].generation_prompts
    shortest = min(len(encode(tok, g)) for g in prompts)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        sample_texts(model, tok, prompts, max_len=min(shortest, 4))
        assert calls == []  # the old warm-up length: nothing decoded
        n = slice_phases.warm_gen_len(tok, rec, 100)
        assert n == shortest + 2 and slice_phases.warm_gen_len(tok, rec, shortest + 1) == shortest + 1
        sample_texts(model, tok, prompts, max_len=n)
        assert len(calls) == 2  # the prefill and one decode step
    finally:
        handle.remove()


def _fake_captured(calls, calibration: dict | None, fail: tuple[str, ...] = (), real_pricing=None):
    """A run_command for the captured_units step: the calibration writes ``calibration`` (None:
    nothing) and exits as calibrate_units.py does (1 when a part failed); paper_cost runs for real
    through ``real_pricing``, else writes its --json file with a total, or fails for the pricings
    named in ``fail`` ("measured", "modelled")."""
    def fake(run, step, argv, cap, env=None):
        calls.append(argv)
        step.command, step.seconds = " ".join(argv), 1.0
        if "bench/calibrate_units.py" in argv:
            out = argv[argv.index("--out") + 1]
            if calibration is not None:
                Path(out).write_text(json.dumps(calibration))
            ok = calibration is not None and calibration.get("complete")
            step.status, step.rc = ("passed", 0) if ok else ("failed", 1)
            return ""
        if real_pricing is not None:
            return real_pricing(run, step, argv, cap, env)
        if ("measured" if "--unit-costs" in argv else "modelled") in fail:
            step.status, step.rc = "failed", 1
            return ""
        hours = 9.0 if "--unit-costs" in argv else 8.5
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"total_gpu_hours": hours, "floor_gpu_hours": 2.6}))
        step.status, step.rc = "passed", 0
        return ""
    return fake


def _staged_shape_run(tmp_path, monkeypatch, free_gib: float = 100) -> dc.Run:
    """A GPU run (not smoke) whose tokenizer and CounterFact are staged, on a disk with ``free_gib``
    free (by default enough for the shape model, so that the shape steps start)."""
    import collections
    (tmp_path / "stage" / "tokenizer").mkdir(parents=True)
    (tmp_path / "stage" / "counterfact.json").write_text("[]")
    monkeypatch.setattr(dc, "STAGE", tmp_path / "stage")
    monkeypatch.setattr(dc.shutil, "disk_usage",
                        lambda p: collections.namedtuple("u", "total used free")(0, 0, free_gib * 2**30))
    return dc.Run(tmp_path / "out", 600.0, "cuda", smoke=False, work=tmp_path / "work")


def test_captured_units_measure_and_price_the_captured_grid(tmp_path, monkeypatch):
    """The captured_units step calibrates scoring, GE and values on the 32-layer shape under the
    settings the 9.5-hour estimate credits (capture_steps, graph decode), into
    calibration-captured.json, then prices the grid under the same settings with those units over
    the committed H200 units, and modelled; the priced files stay out of the returned folder."""
    from editlib.params import resolve

    calls: list[list[str]] = []
    # a calibration as the GPU writes one: the committed H200 file's scoring, GE and values units,
    # marked as timed under the captured settings (the real pricing then takes them)
    doc = json.loads((REPO_ROOT / dc.H200_UNITS).read_text())
    units = {k: v for k, v in doc["units"].items() if k.startswith(("eval", "ge", "values_s_per_fact_single"))}
    graphs = {"decode_graphs": True, "decode_fused": False, "value_graphs": False, "step_graphs": True}
    cal = {**doc, "complete": True, "units": units, "graphs": graphs, "errors": {}}
    monkeypatch.setattr(dc, "run_command", _fake_captured(calls, cal, real_pricing=dc.run_command))
    run = _staged_shape_run(tmp_path, monkeypatch)
    (step,) = dc.run_checks(run, ["captured_units"])
    assert step.status == "passed", step.reason
    cal, priced, modelled = calls
    assert cal[cal.index("--out") + 1] == str(run.out / "calibration-captured.json")
    assert cal[cal.index("--parts") + 1: cal.index("--parts") + 3] == ["eval", "values"]
    grid_sets = [cal[i + 1] for i, a in enumerate(cal) if a == "--grid-set"]
    assert grid_sets == ["hparams.common.capture_steps=true", "evaluation.gen_decode=graph"]
    for x in grid_sets:  # the settings are real params keys, and the pricing uses the same
        resolve(REPO_ROOT / "params" / "llama3-8b.yaml", overrides=[x])
        assert [priced[i + 1] for i, a in enumerate(priced) if a == "--set"] == grid_sets
        assert [modelled[i + 1] for i, a in enumerate(modelled) if a == "--set"] == grid_sets
    assert priced[priced.index("--unit-costs") + 1:][:2] == [dc.H200_UNITS, str(run.out / "calibration-captured.json")]
    assert (REPO_ROOT / dc.H200_UNITS).is_file() and "--unit-costs" not in modelled
    assert step.numbers["units"] == units and step.numbers["graphs"] == graphs
    measured, modelled_h = step.numbers["measured_units"]["total_gpu_hours"], step.numbers["modelled"]["total_gpu_hours"]
    assert 0 < modelled_h < measured  # the eager units, relabelled, cost more than the captured model
    log = (run.out / "checks.log").read_text()
    assert "/calibration-captured.json: ge_s_per_case" not in log  # the captured file's units are taken...
    assert "h200-bfloat16-llama3-8b-shape.json: values_s_per_fact_single (timed eagerly)" in log  # ...over these
    assert "calibrate_units.py" in step.command  # the step's command is the measurement, not the pricing
    assert {p.name for p in run.out.iterdir()} <= {"calibration-captured.json", "checks.json", "checks.log"}
    assert {p.name for p in run.work.rglob("cost-captured*.json")} == {"cost-captured.json", "cost-captured-model.json"}
    assert json.loads((run.out / "checks.json").read_text())["steps"][0]["numbers"]["modelled"]["total_gpu_hours"] == modelled_h


def test_captured_units_fail_when_the_calibration_or_its_pricing_does(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(dc, "run_command", _fake_captured(calls, None))
    (step,) = dc.run_checks(_staged_shape_run(tmp_path / "a", monkeypatch), ["captured_units"])
    assert step.status == "failed" and step.reason == "no calibration-captured.json" and len(calls) == 1
    # a part failed (calibrate_units.py exits 1): the step says which, and what came back is still priced
    part = {"complete": False, "units": {"eval_s_per_case": 0.02}, "errors": {"values": "OutOfMemoryError: x"}}
    monkeypatch.setattr(dc, "run_command", _fake_captured(calls, part))
    (step,) = dc.run_checks(_staged_shape_run(tmp_path / "b", monkeypatch), ["captured_units"])
    assert step.status == "failed" and "parts failed" in step.reason and "OutOfMemoryError" in step.reason
    assert step.numbers["measured_units"]["total_gpu_hours"] == 9.0
    for failing in (("measured",), ("modelled",), ("measured", "modelled")):  # either pricing alone fails the step
        monkeypatch.setattr(dc, "run_command", _fake_captured(calls, {"complete": True, "units": {"x": 1.0}}, fail=failing))
        (step,) = dc.run_checks(_staged_shape_run(tmp_path / "-".join(failing), monkeypatch), ["captured_units"])
        assert step.status == "failed" and step.reason.startswith("paper_cost.py did not price"), failing
        for key, name in (("measured_units", "measured"), ("modelled", "modelled")):
            assert (key in step.reason) == (name in failing) and (key in step.numbers) == (name not in failing)


def test_the_cost_steps_totals_are_this_runs(tmp_path, monkeypatch):
    """The modelled estimate is written to the work folder (not returned) and read back from there:
    a file left by an earlier run on the same machine is never reported as this run's."""
    calls: list[list[str]] = []

    def fake(run, step, argv, cap, env=None):
        calls.append(argv)
        step.status = "failed" if "--unit-costs" in argv else "passed"
        return ""

    monkeypatch.setattr(dc, "run_command", fake)
    run = run_of(tmp_path)
    run.out.mkdir(parents=True)
    (run.out / "calibration.json").write_text(json.dumps({"units": {"values_s_per_fact": 1.0}}))
    for stale in (run.out / "cost.json", dc._work_file(run, "cost-model.json")):
        stale.write_text(json.dumps({"total_gpu_hours": 123.0, "floor_gpu_hours": 1.0}))
    (step,) = dc.run_checks(run, ["cost"])
    assert step.status == "failed" and step.numbers == {} and len(calls) == 1
    def passing(run, step, argv, cap, env=None):
        calls.append(argv)
        step.status = "passed"
        return ""

    monkeypatch.setattr(dc, "run_command", passing)
    dc.run_checks(run, ["cost"])
    where = calls[-1][calls[-1].index("--json") + 1]
    assert "--unit-costs" not in calls[-1] and where == str(dc._work_file(run, "cost-model.json"))
    assert not where.startswith(str(run.out))


def test_the_captured_single_fact_unit_is_the_grids_mix():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from calibrate_units import kept_reuse, single_fact_unit
    from editlib.cost import GPUS, CostModel

    r = kept_reuse()
    assert r == CostModel(GPUS["h200"]).kept_reuse == 3996 / 4096
    assert single_fact_unit(2.0, 0.5, r) == pytest.approx((100 * 2.0 + 3996 * 0.5) / 4096)
    assert single_fact_unit(2.0, 0.5, 0.0) == 2.0 and single_fact_unit(2.0, 0.5, 1.0) == 0.5
    with pytest.raises(ValueError, match="reuse"):
        single_fact_unit(2.0, 0.5, 1.5)


@pytest.mark.parametrize("captured", [False, True])
def test_calibrated_values_time_kept_graphs_as_a_protocol_unit_keeps_them(monkeypatch, captured):
    """Under capture_steps the one-fact values are timed as a B = 1 run spends them: within
    values.keeping_graphs, once recording their graphs and once replaying the kept ones, the unit
    being the grid's mix of the two; eagerly they are timed once (a CPU records no graphs, so
    compute_values is stood in for)."""
    import types

    import torch

    import calibrate_units as cu
    from editlib import values
    from editlib.params import resolve

    calls = []

    def fake_values(model, tok, facts, layer, ctx, hp):
        calls.append((len(facts), hp.z_batch_size, hp.capture_steps, values._KEEPING["depth"]))
        return types.SimpleNamespace(steps=torch.full((len(facts),), 24.0))

    seconds = iter([0.5, 2.0, 0.6])  # the chunk, then (captured) recording and replaying, or (eager) the facts
    monkeypatch.setattr(cu, "compute_values", fake_values)
    monkeypatch.setattr(cu, "timed", lambda device, fn, *a, **k: (next(seconds), fn(*a, **k)))
    grid = resolve(REPO_ROOT / "params" / "tiny.yaml",
                   overrides=[f"hparams.common.capture_steps={str(captured).lower()}", "hparams.common.z_batch_size=8"])
    model = torch.nn.Linear(2, 2)
    study = types.SimpleNamespace(model=model, tok=None, contexts=lambda style, text="clean": None,
                                  facts=lambda n, o=0: list(range(n)))
    got = cu.values_units(study, grid, n_single=3)
    chunk = [(1, 1, captured, 0), (8, 8, captured, 0)]  # the warm-up and the chunk, outside keeping_graphs
    raw, units = got["raw"], got["units"]
    if not captured:
        assert calls == [*chunk, (3, 1, False, 0)] and "single_own_s" not in raw
        assert units == {"values_s_per_fact": 0.5 / 8, "values_s_per_fact_single": 2.0 / 3}
        return
    assert calls == [*chunk, (3, 1, True, 1), (3, 1, True, 1)] and values._KEEPING["depth"] == 0
    assert (raw["chunk_s"], raw["single_own_s"], raw["single_kept_s"]) == (0.5, 2.0, 0.6)
    assert raw["kept_reuse"] == cu.kept_reuse()
    # a chunk's recordings are not what real facts' chunks do: no unit
    assert units == {"values_s_per_fact_single": pytest.approx(cu.single_fact_unit(2.0 / 3, 0.6 / 3, cu.kept_reuse()))}


def test_shared_gpu_throughput_is_over_the_lone_rates_of_the_same_processes():
    import bench_shared_gpu as sg

    rows = [{"facts": 6, "start": 100.0, "end": 115.0, "solo_start": 200.0, "solo_end": 212.0, "mean_steps": 24.0,
             "solo_mean_steps": 24.0, "threads": 8, "solo_threads": 16, "device": "cuda:0"},
            {"facts": 6, "start": 100.2, "end": 112.2, "solo_start": 212.0, "solo_end": 224.0, "mean_steps": 24.0,
             "solo_mean_steps": 24.0, "threads": 8, "solo_threads": 16, "device": "cuda:0"}]
    s = sg.summary(rows)
    # alone 0.5 facts/s; together 12 facts from the first start to the last end (15 s), and at their
    # own rates 6/15 + 6/12 facts/s
    assert s["throughput"] == pytest.approx(12 / 15 / 0.5) and s["throughput_window"] == pytest.approx((6 / 15 + 6 / 12) / 0.5)
    assert s["alone_ms_per_fact"] == [2000.0, 2000.0] and s["together_ms_per_fact"] == [2500.0, pytest.approx(2000.0)]
    assert s["start_skew_s"] == pytest.approx(0.2) and s["end_spread_s"] == pytest.approx(2.8)
    assert (s["procs"], s["threads"], s["solo_threads"]) == (2, 8, 16)
    with pytest.raises(SystemExit):
        sg.main(["--procs", "1"])


def test_a_failed_shared_gpu_process_ends_the_others(monkeypatch):
    """One process that fails (a GPU that refuses a second process, say) ends the one waiting at the
    barrier at once, instead of both running into the step's time limit."""
    import subprocess as sp

    import bench_shared_gpu as sg

    started = []
    real = sp.Popen

    def popen(argv, **kw):
        i = argv[argv.index("--index") + 1]
        code = "import time; time.sleep(120)" if i == "0" else "import sys; sys.exit(3)"
        started.append(real([sys.executable, "-c", code], **kw))
        return started[-1]

    monkeypatch.setattr(sg.subprocess, "Popen", popen)
    a = sg.argparse.Namespace(procs=2, params="params/tiny.yaml", n=1, layer=1, warmup=1, threads=1, solo_threads=1,
                              barrier_timeout=120.0, set=[])
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"exit statuses \[-9, 3\]"):
        sg.run_group(a)
    assert time.time() - t0 < 30 and all(p.poll() is not None for p in started)


def test_the_shared_gpu_step_runs_the_shape_on_the_gpu(tmp_path, monkeypatch):
    calls = []

    def fake(run, step, argv, cap, env=None):
        calls.append((argv, env))
        step.status = "failed"
        return "GPU compute mode: Exclusive_Process\n2 processes: exit statuses [1, -9] (a process that failed ...)\n"

    monkeypatch.setattr(dc, "run_command", fake)
    run = _staged_shape_run(tmp_path, monkeypatch)
    (step,) = dc.run_checks(run, ["shared_gpu"])
    ((argv, env),) = calls
    assert argv[argv.index("--params") + 1] == "params/llama3-shape-slice.yaml" and "--draw-device" in argv
    assert "model.id=.cache/llama3-8b-shape-32L" in argv and "model.device=cuda" in argv
    assert env["EDITLIB_COUNTERFACT"] == str(dc.staged_counterfact()) and env["HF_HUB_OFFLINE"] == "1"
    assert step.status == "failed" and "exit statuses [1, -9]" in step.reason
    assert step.numbers["compute_mode"] == "Exclusive_Process"


def test_smoke_shared_gpu_on_the_cpu(tmp_path):
    """The shared-device benchmark's own processes on the miniature (the CPU's cores stand in for
    the GPU: only that it runs and reports is checked here)."""
    run = run_of(tmp_path, budget=300.0)
    (step,) = dc.run_checks(run, ["shared_gpu"])
    assert step.status == "passed", (run.out / "checks.log").read_text()[-3000:]
    n = step.numbers
    assert n["procs"] == 2 and len(n["alone_ms_per_fact"]) == len(n["together_ms_per_fact"]) == 2
    assert min(n["alone_ms_per_fact"]) > 0 and n["throughput"] > 0 and n["throughput_window"] > 0
    assert n["device"] == "cpu" and n["start_skew_s"] < 1.0  # the barrier held the starts together
