"""Every check that needs a GPU, as one prepared run sized for a short device lease (issue 13).

Benchmark and check script, not a test. Stage what the GPU machine cannot fetch (the Llama-3
tokenizer, the CounterFact file) into the git-ignored ``.cache/device`` here, then run the checks
there as one command, carrying that folder:

    python bench/device_checks.py --stage                     # here: writes .cache/device (~21 MB)
    python bench/device_checks.py --out "$OUT" [--budget 540] [--only STEP ...] [--skip STEP ...]

Steps, most valuable first; each runs as its own process under a time limit (what is left of
``--budget``, at most its cap), and ``checks.json`` is rewritten after each, so whatever finished
comes back even if the run is stopped:

  env         GPU, driver, torch / transformers / accelerate / numpy / pandas versions, free disk, the
              packages the steps import; on a GPU run where torch sees no GPU, nothing else runs
  cuda_tests  the CUDA-only tests (skipped on a CPU machine), verbose, with a traceback of every thread
              after 150 s (a hung test): passed only if none failed or skipped
  gram        bench/bench_gram.py --fast-gram --device cuda --tokens 24576
  slice       a 32-layer Llama-3-8B-shaped model (random weights, bfloat16, drawn on the GPU) loaded
              with device_map, then bench/slice_phases.py on it: C0 of layers 0-1, evaluation with
              GE of 100 tokens, layer search over layers 0-1 (32 facts, values 32 at a time as in
              params/llama3-8b.yaml), Table 1, λ sweep, batch, sequential; its ``units`` are the cost
              model's unit costs measured on this GPU (the slice writes phases.json straight into
              ``--out`` after every phase, so a stopped slice still returns what it measured); skipped
              when the disk cannot hold the model (about 15 GiB at 32 layers)
  calibrate   bench/calibrate_units.py on the same 32-layer shape (built here if the slice did not
              run): the units at the paper's own sizes (C0 at two corpus sizes in one pass of every
              layer, GE of one full decode batch of params/llama3-8b.yaml's 1,024 rows, values in a
              chunk and one fact at a time) into calibration.json, rewritten after every part
  cost        bench/paper_cost.py on params/llama3-8b.yaml in bfloat16 on an H200 with the measured
              units (--unit-costs: the slice's, then the calibration's over them), then modelled
              (both are arithmetic: rerun them here on the returned JSON if this step did not finish)
  compiled    bench/bench_compiled_values.py --set model.device=cuda --mode reduce-overhead (B = 1)
  compiled_shape  the same on the 32-layer shape (built first if need be; compiling the 30 blocks
              as one graph took 199 s there): hparams.common.compile_blocks reduce-overhead against eager at B = 1,
              4 facts, one round, torch at every CPU thread; then each path's CUDA kernels per
              Adam iteration of one fact (--profile 1: what refits editlib.cost's kernels_fused_value)
  captured_shape  the same script on the 32-layer shape with --mode capture: hparams.common.capture_steps
              (the eager value steps recorded whole as CUDA graphs, no compilation) against eager at
              B = 1, 6 facts, two rounds, both under model.deterministic, with how many facts' z equal
              eager's to the bit, the graphs recorded and the peak GPU memory reserved (a graph
              released per set keeps it flat), and each path's GPU time per Adam iteration (--profile 1)
  captured_units  bench/calibrate_units.py --parts eval values on the 32-layer shape under the settings
              the ≤ 10 GPU-hour estimate credits (hparams.common.capture_steps, evaluation.gen_decode
              graph): scoring, GE of one full decode batch and values of one fact at a time (a B = 1
              run's mix of facts recording their graph and facts replaying a kept one; a chunk is
              timed, but priced eagerly as the cost model does) into calibration-captured.json;
              then the grid priced with them over the committed H200 units, and modelled, under
              the same settings (both totals in checks.json)
  shared_gpu  bench/bench_shared_gpu.py on the 32-layer shape: eager one-fact value optimisations
              (a B = 1 run's values, host-bound on a GPU) in two processes sharing the GPU, each
              opening the study itself as a Ray worker would, then each alone at every core: ms per
              fact and the throughput of the two over one (what executor.gpus_per_unit: 0.5 would
              gain for one-fact values; about a third of a lease: --only env shared_gpu)
  decode_shape  bench/bench_decode.py on the 32-layer shape (built first if need be): GE's decode
              steps under evaluation.gen_decode transformers, static, graph and compiled (both
              captured), 1,020 rows and 10, two rounds each, with whether the texts equal the
              transformers path's and the CUDA kernels one step of each form launches;
              then the calibration's scoring and GE units under compiled (calibration-compiled.json;
              price the grid with them: paper_cost.py --set evaluation.gen_decode=compiled --unit-costs
              bench/units/h200-bfloat16-llama3-8b-shape.json calibration-compiled.json)

Without --only, the steps are DEFAULT_STEPS: the checks that have never run on a GPU and that the
≤ 10 GPU-hour estimate rests on (env, cuda_tests, captured_shape, captured_units; about 9 minutes).
The steps that ran on an H200 once (docs/paper-scale.md) run again with --only: env cuda_tests gram
slice cost compiled (about 9 minutes); calibrate, compiled_shape and decode_shape each need most of a
lease: --only env calibrate cost, --only env compiled_shape, --only env cuda_tests decode_shape;
shared_gpu about a third of one: --only env shared_gpu.

Each later step in RESERVED keeps its least time free while an earlier step runs. A step that no longer
fits the budget is "not run" and makes the run's exit status 1: the run did not check it.

Files under ``--out`` (at most 8, as the device tool returns them): checks.json (per step: status,
seconds, the numbers it printed), checks.log (every step's output), junit.xml, phases.json,
calibration.json, cost.json, calibration-compiled.json, calibration-captured.json. The other
estimates (arithmetic on the repository and those files) stay under the run's work folder; their
totals are in checks.json. ``--device cpu`` runs the same steps on a CPU at small sizes
(``--smoke``: the miniature instead of the 32-layer shape) to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the steps import editlib here too; on the device it is not installed
    sys.path.insert(0, str(ROOT))
PY = sys.executable  # every step runs under the interpreter that runs this script
STAGE = ROOT / ".cache" / "device"
STEPS = ("env", "cuda_tests", "gram", "slice", "calibrate", "cost", "compiled", "compiled_shape", "captured_shape",
         "captured_units", "shared_gpu", "decode_shape")
#: what a run without --only checks (sized for a 9-minute lease): what has never run on a GPU, the
#: CUDA-only tests and the captured value steps behind the 9.5-hour estimate, on the 32-layer shape.
#: The earlier default (env cuda_tests gram slice cost compiled, run once on an H200), calibrate,
#: compiled_shape, decode_shape and shared_gpu run with --only
DEFAULT_STEPS = ("env", "cuda_tests", "captured_shape", "captured_units")
#: later steps whose least time a running step leaves free (the cost step turns the slice into hours;
#: captured_units prices the captured grid)
RESERVED = ("cost", "compiled", "captured_units")
#: the CUDA-only tests (each is skipped where torch sees no GPU)
CUDA_TESTS = (
    "tests/test_models.py::test_fingerprint_device_independent",
    "tests/test_solver.py::test_cuda_factor_with_cpu_inputs",
    "tests/test_stats.py::test_cuda_matches_cpu",
    "tests/test_stats.py::test_cuda_fast_gram_on_tf32_matches_float64_products",
    "tests/test_stats.py::test_cuda_fast_gram_on_16bit_tensor_cores_matches_float64_products",
    "tests/test_stats.py::test_cuda_c0_products_ignore_model_tf32",
    "tests/test_lowrank.py::test_cuda_bf16_terms_are_ieee_under_model_tf32",
    "tests/test_protocols.py::test_every_protocol_runs_on_cuda_as_on_the_cpu",
    "tests/test_values.py::test_cuda_graph_blocks_follow_eager",
    "tests/test_values.py::test_cuda_graph_blocks_under_model_deterministic",
    "tests/test_values.py::test_cuda_captured_value_steps_are_the_eager_steps",
    "tests/test_values.py::test_cuda_kept_graphs_record_again_after_a_release_that_left_an_output_alive",
    "tests/test_decode.py::test_cuda_graph_decode_follows_the_transformers_forward",
    "tests/test_cudagraphs.py::test_cuda_a_graph_replays_after_another_recorded_on_its_stream_is_released",
)
#: what the steps import besides torch and transformers (editlib's core and the bench scripts)
NEEDED = ("numpy", "scipy", "pandas", "pyarrow", "yaml", "tqdm", "safetensors", "matplotlib", "pytest", "tokenizers")
#: seconds a step may take at most (on the GPU machine), and the least it needs to be worth starting
CAPS = {"env": (45, 5), "cuda_tests": (180, 60), "slice": (420, 150), "calibrate": (420, 150),
        "cost": (90, 40), "gram": (120, 20), "compiled": (150, 60), "compiled_shape": (480, 300),
        "captured_shape": (300, 150), "captured_units": (300, 150), "shared_gpu": (300, 240),
        "decode_shape": (480, 180)}
#: seconds kept beside a RESERVED step's least time: a step run to its limit ends a little past it
#: (its own bookkeeping), which would leave the reserved step just short of its least time
RESERVE_MARGIN_S = 5.0
#: free disk the slice needs beyond the model (its C0 cache, results, pip's and torch's caches)
SLICE_DISK_MARGIN_GIB = 4.0


@dataclass
class Step:
    """One check's outcome, as written to checks.json."""

    name: str
    status: str = "not run"  # passed | failed | timeout | skipped | not run (no budget left for it)
    seconds: float = 0.0
    command: str = ""
    rc: int | None = None
    reason: str = ""
    numbers: dict = field(default_factory=dict)


@dataclass
class Run:
    """The whole run: where it writes, how long it may take, what is done."""

    out: Path
    budget: float
    device: str
    smoke: bool
    shape_layers: int = 32
    slice_sets: list[str] = field(default_factory=list)
    work: Path = ROOT / "runs" / "device-checks"  # the slice's results and C0 cache (GBs: not under out)
    caps: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(CAPS))  # see CAPS
    reserve: float = 0.0  # seconds the running step leaves to later RESERVED steps
    t0: float = field(default_factory=time.perf_counter)
    steps: list[Step] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        """checks.json, written atomically after every step."""
        doc = {"device": self.device, "smoke": self.smoke, "budget_s": self.budget,
               "elapsed_s": round(time.perf_counter() - self.t0, 1), "info": self.info,
               "steps": [asdict(s) for s in self.steps]}
        tmp = self.out / "checks.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.out / "checks.json")

    def log(self, text: str) -> None:
        with open(self.out / "checks.log", "a") as f:
            f.write(text)
        print(text, end="", flush=True)


def run_command(run: Run, step: Step, argv: list[str], cap: float, env: dict | None = None) -> str:
    """Run ``argv`` under min(cap, what is left), its output streamed to checks.log and stdout as it
    comes (a stopped step keeps what it printed); returns that output."""
    step.command = " ".join(argv)
    limit = max(1.0, min(cap, run.left() - run.reserve))
    run.log(f"\n=== {step.name}: {step.command} (limit {limit:.0f} s)\n")
    lines: list[str] = []
    t = time.perf_counter()
    # editlib need not be installed (on a GPU machine the checkout is used as it is): the bench
    # scripts, whose own folder is first on their path, find it through PYTHONPATH
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            run.log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        step.rc = proc.wait(timeout=limit)
        step.status = "passed" if step.rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and anything it started
        proc.wait()
        step.status, step.reason = "timeout", f"stopped after {limit:.0f} s"
    reader.join(timeout=10)
    step.seconds = round(time.perf_counter() - t, 1)
    run.log(f"=== {step.name}: {step.status} in {step.seconds} s\n")
    return "".join(lines)


# --------------------------------------------------------------------------- the steps


def shape_model_gib(n_layers: int, bytes_per_param: int = 2) -> float:
    """GiB of a Llama-3-8B-shaped model ``n_layers`` deep (the cost model's Llama-3-8B shape)."""
    from editlib.workcount import KNOWN_SHAPES

    shape = replace(KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"], n_layers=n_layers)
    return shape.params * bytes_per_param / 2**30


def last_json(out: str) -> dict:
    """The last line of ``out`` that is a JSON object (a library may print warnings after it)."""
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def step_env(run: Run, step: Step) -> None:
    code = ("import json, torch, transformers, numpy, pandas, importlib.util as u; c = torch.cuda.is_available(); "
            f"missing = [m for m in {NEEDED!r} if u.find_spec(m) is None]; "
            "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
            "'numpy': numpy.__version__, 'pandas': pandas.__version__, "
            "'accelerate': bool(u.find_spec('accelerate')), 'missing': missing, 'cuda': c, "
            "'gpu': torch.cuda.get_device_name(0) if c else None, "
            "'gpu_mem_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None, "
            "'cpus': __import__('os').cpu_count()}))")
    out = run_command(run, step, [PY, "-c", code], run.caps["env"][0])
    if step.status == "passed":
        step.numbers = last_json(out)
        run.info.update(step.numbers)
    step.numbers["disk_free_gib"] = run.info["disk_free_gib"] = round(shutil.disk_usage(ROOT).free / 2**30, 1)
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
            step.numbers["nvidia_smi"] = smi.stdout.strip()
        except subprocess.TimeoutExpired:
            step.numbers["nvidia_smi"] = "no answer in 30 s"
    if step.numbers.get("missing"):
        step.status, step.reason = "failed", f"packages missing: {', '.join(step.numbers['missing'])}"
    if run.device.startswith("cuda") and not step.numbers.get("cuda"):
        step.status, step.reason = "failed", "torch sees no CUDA device"


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def verbose_counts(output: str) -> dict:
    """:func:`junit_counts`' numbers from pytest's ``-v`` lines (``path::test[id] PASSED``): what a
    run stopped before it wrote its junit file had decided, with the tests it had ``decided``."""
    got = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output, re.M)
    kinds = Counter(k for _, k in got)
    return {"tests": len(got), "failures": kinds["FAILED"], "errors": kinds["ERROR"], "skipped": kinds["SKIPPED"],
            "decided": [f"{name} {kind}" for name, kind in got]}


def step_cuda_tests(run: Run, step: Step) -> None:
    xml = run.out / "junit.xml"
    # -v names each test as it starts; faulthandler prints every thread's stack if one hangs
    out = run_command(run, step, [PY, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-o",
                                  "faulthandler_timeout=150", f"--junitxml={xml}", *CUDA_TESTS],
                      run.caps["cuda_tests"][0], env={"HF_HUB_OFFLINE": "1"})
    if not xml.is_file():  # stopped (a time limit) before pytest wrote it: what its -v lines decided
        step.numbers = verbose_counts(out)
        step.status, step.reason = "failed" if step.status == "passed" else step.status, "; ".join(
            x for x in (step.reason, f"no junit.xml; {step.numbers['tests']} tests decided before it stopped") if x)
        return
    step.numbers = junit_counts(xml)
    step.status, step.reason = tests_verdict(step.status, step.numbers, run.device, step.reason)


def tests_verdict(status: str, counts: dict, device: str, reason: str = "") -> tuple[str, str]:
    """A skipped CUDA test checked nothing: on a GPU run that is a failure, on a CPU the expected
    outcome; no tests at all is a failure everywhere."""
    if status == "passed" and not counts["tests"]:
        return "failed", "no tests ran"
    if status == "passed" and counts["skipped"]:
        why = f"{counts['skipped']} of {counts['tests']} skipped (no CUDA device seen)"
        return ("failed" if device.startswith("cuda") else "skipped"), why
    return status, reason


def shape_sets(run: Run) -> list[str]:
    """The params overrides that point a step at the 32-layer shape, in bfloat16 on the run's device."""
    return [f"model.id=.cache/llama3-8b-shape-{run.shape_layers}L", "model.dtype=bfloat16", f"model.device={run.device}"]


def set_args(sets) -> list[str]:
    """``--set`` before each override."""
    return [a for s in sets for a in ("--set", s)]


def slice_command(run: Run, out_dir: Path) -> list[str]:
    """bench/slice_phases.py on the 32-layer shape (GPU) or on the miniature (``--smoke``)."""
    if run.smoke:
        sets = ["layer_search.n_facts=2", "layer_search.layers=[0,1]", "singular.n_facts=2", "sweep.total=4",
                "sweep.batch_size=4", "sweep.memit_lambdas=[1]", "sweep.emmet_lambdas=[0]", "batch.total=4",
                "batch.batch_sizes=[4]", "batch.windows=[1]", "sequential.total=2", "sequential.batch_sizes=[1]",
                "sequential.degradation_every=null", "data.orderings=[0]", "evaluation.gen_max_len=8",
                "covariance.n_samples=40", *run.slice_sets]
        return [PY, "bench/slice_phases.py", "--params", "params/tiny.yaml", "--out", str(out_dir),
                "--phases-copy", str(run.out / "phases.json"),
                "--no-watch", "--c0-layers", "0", "1", *set_args(sets)]
    sets = [*shape_sets(run), "layer_search.layers=[0,1]", "layer_search.n_facts=32",
            "hparams.common.z_batch_size=32", "evaluation.gen_max_len=100", *run.slice_sets]
    return [PY, "bench/slice_phases.py", "--params", "params/llama3-shape-slice.yaml", "--out", str(out_dir),
            "--phases-copy", str(run.out / "phases.json"), "--no-watch", "--c0-layers", "0", "1", "--draw-device", run.device,
            "--tokenizer", str(STAGE / "tokenizer"), "--counterfact", str(staged_counterfact()), *set_args(sets)]


def staged_counterfact() -> Path:
    """The CounterFact file ``--stage`` wrote (its name keeps the source's suffixes)."""
    found = sorted(STAGE.glob("counterfact*"))
    return found[0] if found else STAGE / "counterfact.json.gz"


def slice_disk_need_gib(run: Run) -> float:
    """Free disk the slice step needs: the shape model unless it is already built, and a margin."""
    from editlib.shapes import SHAPE_MARKER, slice_dir

    built = (ROOT / slice_dir(run.shape_layers) / SHAPE_MARKER).is_file()
    return (0.0 if run.smoke or built else shape_model_gib(run.shape_layers)) + SLICE_DISK_MARGIN_GIB


def unstaged(run: Run, step: Step) -> bool:
    """Skip ``step`` (and say so) when a GPU run lacks what ``--stage`` writes here."""
    missing = [] if run.smoke else [p for p in (STAGE / "tokenizer", staged_counterfact()) if not p.exists()]
    if missing:
        step.status, step.reason = "skipped", f"not staged: {', '.join(map(str, missing))} (run --stage here first)"
    return bool(missing)


def shape_unready(run: Run, step: Step, what: str) -> bool:
    """:func:`unstaged`, or fail ``step`` when the disk cannot hold the shape model (``what`` needs it)."""
    if unstaged(run, step):
        return True
    need, free = slice_disk_need_gib(run), shutil.disk_usage(ROOT).free / 2**30
    step.numbers = {"disk_need_gib": round(need, 1), "disk_free_gib": round(free, 1)}
    if free < need:
        step.status, step.reason = "failed", f"{free:.1f} GiB of disk free, {what} needs {need:.1f} GiB"
    return free < need


def step_slice(run: Run, step: Step) -> None:
    if shape_unready(run, step, "the slice"):
        return
    # a folder of its own: another run of this script (or of the slice) never writes into it
    out_dir = run.work / f"slice-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    (run.out / "phases.json").unlink(missing_ok=True)  # only this slice's phases come back
    run_command(run, step, slice_command(run, out_dir), run.caps["slice"][0], env={"HF_HUB_OFFLINE": "1"})
    phases = run.out / "phases.json"  # written by the slice itself after every phase (--phases-copy)
    if phases.is_file():
        doc = json.loads(phases.read_text())
        step.numbers |= {"complete": doc.get("complete", True), "wall_s": round(doc["wall_s"], 1),
                        "units": doc.get("units", {}),
                        "cuda_peak_gib": max((v.get("cuda_peak_gib", 0.0) for v in doc["phases"].values()), default=0.0),
                        "phases_s": {k: round(v["seconds"], 2) for k, v in doc["phases"].items() if v.get("seconds") is not None},
                        "phase_errors": {k: v["error"] for k, v in doc["phases"].items() if v.get("error")}}
    elif step.status == "passed":
        step.status, step.reason = "failed", "no phases.json"


def calibrate_command(run: Run, out: str = "calibration.json") -> list[str]:
    """bench/calibrate_units.py on the 32-layer shape (GPU) or on the miniature (``--smoke``)."""
    base = [PY, "bench/calibrate_units.py", "--out", str(run.out / out)]
    if run.smoke:
        return [*base, "--params", "params/tiny.yaml", "--grid", "params/tiny.yaml", "--c0-batches", "1", "2",
                "--c0-text-tokens", "32", "--gen-max-len", "8", "--max-cases", "4", "--single-facts", "2"]
    return [*base, "--params", "params/llama3-shape-slice.yaml", "--grid", "params/llama3-8b.yaml",
            "--draw-device", run.device, "--tokenizer", str(STAGE / "tokenizer"), "--counterfact", str(staged_counterfact()),
            *set_args(shape_sets(run))]


def step_calibrate(run: Run, step: Step) -> None:
    if shape_unready(run, step, "the calibration"):
        return
    _calibrate(run, step, "calibration.json", [], run.caps["calibrate"][0])


def _calibrate(run: Run, step: Step, name: str, args: list[str], limit: float) -> dict | None:
    """bench/calibrate_units.py (with ``args``) into ``run.out / name``, only this run's: its file,
    with ``complete``, ``units``, ``raw`` and ``errors`` in the step's numbers, or None when it wrote
    none. A calibration without its file, or whose parts did not all run, failed and says why
    (calibrate_units.py exits with status 1 then); a step stopped by its limit keeps its timeout."""
    out = run.out / name
    out.unlink(missing_ok=True)
    run_command(run, step, [*calibrate_command(run, name), *args], limit,
                env={"HF_HUB_OFFLINE": "1", "EDITLIB_CACHE": str(run.work / "calibrate-cache")})
    if not out.is_file():
        if step.status != "timeout":
            step.status, step.reason = "failed", step.reason or f"no {name}"
        return None
    doc = json.loads(out.read_text())
    step.numbers |= {"complete": doc.get("complete", False), "units": doc.get("units", {}),
                     "raw": doc.get("raw", {}), "errors": doc.get("errors", {})}
    if not doc.get("complete") and step.status != "timeout":
        step.status, step.reason = "failed", f"parts failed: {doc.get('errors')}"
    return doc


def measured_unit_files(run: Run) -> list[Path]:
    """The returned files that hold measured units, the slice's first (the calibration's win)."""
    files = [run.out / "phases.json", run.out / "calibration.json"]
    return [f for f in files if f.is_file() and json.loads(f.read_text()).get("units")]


def step_cost(run: Run, step: Step) -> None:
    modelled = _work_file(run, "cost-model.json")
    for stale in (run.out / "cost.json", modelled):  # only this run's totals
        stale.unlink(missing_ok=True)
    sources = measured_unit_files(run)
    if not sources:
        step.status, step.reason = "skipped", "no measured units (neither the slice nor the calibration finished)"
        return
    base = [PY, "bench/paper_cost.py", "--params", "params/llama3-8b.yaml", "--gpu", "h200", "--dtype", "bfloat16"]
    # the measured units first: they are what only this GPU can give
    run_command(run, step, [*base, "--unit-costs", *map(str, sources), "--json", str(run.out / "cost.json")],
                run.caps["cost"][0] / 2)
    if step.status == "passed":
        # arithmetic of the repository alone (rerun it anywhere): kept in the work folder, not returned
        run_command(run, step, [*base, "--json", str(modelled)], run.caps["cost"][0] / 2)
    for key, path in (("modelled", modelled), ("measured_units", run.out / "cost.json")):
        if path.is_file():
            step.numbers[key] = _cost_totals(json.loads(path.read_text()))


def _work_file(run: Run, name: str) -> Path:
    """A file of this run kept under ``run.work`` (not returned: the device tool returns 8 files)."""
    d = run.work / f"out-{run.out.name}"
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def _cost_totals(doc: dict) -> dict:
    """The headline numbers of a paper_cost --json file: its total and floor GPU-hours."""
    return {k: round(doc[k], 2) for k in ("total_gpu_hours", "floor_gpu_hours")}


def step_gram(run: Run, step: Step) -> None:
    size = ["--d", "1024", "--tokens", "2048"] if run.smoke else ["--tokens", "24576"]
    out = run_command(run, step, [PY, "bench/bench_gram.py", "--fast-gram", "--device", run.device,
                                  "--reps", "3", *size], run.caps["gram"][0])
    step.numbers = parse_gram(out)


def parse_gram(out: str) -> dict:
    """The numbers of bench_gram.py --fast-gram's summary lines (the second: 16-bit products, CUDA)."""
    m = re.search(r"float64 products ([\d.]+) s, float32 products .*? ([\d.]+) s: x([\d.]+);.*relative difference ([\d.e+-]+)", out)
    got = {"float64_s": float(m[1]), "float32_s": float(m[2]), "speedup": float(m[3]), "rel_diff": float(m[4])} if m else {}
    h = re.search(r"16-bit products .*? ([\d.]+) s: x([\d.]+) over float64 products, x([\d.]+) over TF32; "
                  r"relative difference ([\d.e+-]+)", out)
    if m and h:
        got.update(bit16_s=float(h[1]), speedup_16bit=float(h[2]), speedup_16bit_over_tf32=float(h[3]),
                   rel_diff_16bit=float(h[4]))
    return got


def step_compiled(run: Run, step: Step) -> None:
    args = ["--n", "4", "--warmup", "1", "--rounds", "1", "--mode", "default"] if run.smoke else \
        ["--n", "20", "--rounds", "2", "--mode", "reduce-overhead", "--set", f"model.device={run.device}"]
    out = run_command(run, step, [PY, "bench/bench_compiled_values.py", "--z-batch-size", "1", *args],
                      run.caps["compiled"][0], env={"HF_HUB_OFFLINE": "1"})
    step.numbers = parse_compiled(out)


def step_compiled_shape(run: Run, step: Step) -> None:
    _shape_values(run, step, "compiled_shape", ["--n", "4", "--rounds", "1", "--mode", "reduce-overhead"])


def step_captured_shape(run: Run, step: Step) -> None:
    """hparams.common.capture_steps (the eager value steps recorded whole as CUDA graphs) against
    eager at B = 1 on the 32-layer shape: no compilation, so a short step. Under model.deterministic
    (both paths), so that z equal to eager's to the bit means something: without it the eager
    step's own index sums vary in order from run to run."""
    _shape_values(run, step, "captured_shape", ["--n", "6", "--rounds", "2", "--mode", "capture",
                                                 "--set", "model.deterministic=true"])


#: the settings under which docs/paper-scale.md estimates the grid within 10 GPU-hours with the
#: committed H200 units: the eager value steps recorded whole, GE's decode steps captured
CAPTURED_GRID = ("hparams.common.capture_steps=true", "evaluation.gen_decode=graph")
#: the units measured eagerly on an H200 that the captured calibration's units go over
H200_UNITS = "bench/units/h200-bfloat16-llama3-8b-shape.json"
#: seconds the captured_units step keeps for its two pricings (paper_cost.py: about 5 s each)
PRICING_S = 30.0


def step_captured_units(run: Run, step: Step) -> None:
    """The cost model's scoring, GE and values units measured under :data:`CAPTURED_GRID` on the
    32-layer shape (calibration-captured.json), then the grid priced with them over the committed
    H200 units, and modelled under the same settings: the estimate those settings are credited
    with, measured. ``--smoke``: the same calls on the miniature, eagerly (a CPU records no graphs)."""
    if not run.smoke and shape_unready(run, step, "the captured calibration"):
        return
    out = run.out / "calibration-captured.json"
    grid = [] if run.smoke else [a for x in CAPTURED_GRID for a in ("--grid-set", x)]
    cap = run.caps["captured_units"][0]
    t0 = time.perf_counter()
    # the two pricings (a few seconds each) keep PRICING_S of the step's time and of the run's
    doc = _calibrate(run, step, out.name, ["--parts", "eval", "values", *grid],
                     min(cap, run.left() - run.reserve) - PRICING_S)
    if doc is None:
        return
    step.numbers["graphs"] = doc.get("graphs", {})
    verdict = (step.status, step.reason, step.command, step.rc)  # the calibration's
    base = [PY, "bench/paper_cost.py", "--params", "params/llama3-8b.yaml", "--gpu", "h200", "--dtype", "bfloat16",
            *set_args(CAPTURED_GRID)]
    unpriced = []
    for key, name, extra in (("measured_units", "cost-captured.json", ["--unit-costs", H200_UNITS, str(out)]),
                             ("modelled", "cost-captured-model.json", [])):
        path = _work_file(run, name)
        path.unlink(missing_ok=True)
        run_command(run, step, [*base, *extra, "--json", str(path)], max(cap - (time.perf_counter() - t0), 1.0))
        if step.status == "passed" and path.is_file():
            step.numbers[key] = _cost_totals(json.loads(path.read_text()))
        else:
            unpriced.append(f"{key} ({step.status})")
    step.status, step.reason, step.command, step.rc = verdict
    step.seconds = round(time.perf_counter() - t0, 1)
    if step.status == "passed" and unpriced:  # pricing is arithmetic: rerun it here on the returned file
        step.status, step.reason = "failed", f"paper_cost.py did not price: {', '.join(unpriced)}"


def step_shared_gpu(run: Run, step: Step) -> None:
    """bench/bench_shared_gpu.py: eager one-fact value optimisations on the 32-layer shape in two
    processes sharing the GPU (what ``executor.gpus_per_unit: 0.5`` would run for one-fact values),
    then each alone at every core, and their throughput over one alone. ``--smoke``: the miniature
    on the CPU, to check the script."""
    if run.smoke:
        argv = [PY, "bench/bench_shared_gpu.py", "--params", "params/tiny.yaml", "--n", "1", "--procs", "2",
                "--threads", "1", "--solo-threads", "1"]
        env = {"HF_HUB_OFFLINE": "1"}
    else:
        if shape_unready(run, step, "the shared-GPU check"):
            return
        argv = [PY, "bench/bench_shared_gpu.py", "--params", "params/llama3-shape-slice.yaml", "--n", "6",
                "--procs", "2", "--draw-device", run.device, "--tokenizer", str(STAGE / "tokenizer"),
                *set_args(shape_sets(run))]
        env = {"HF_HUB_OFFLINE": "1", "EDITLIB_COUNTERFACT": str(staged_counterfact()),
               "EDITLIB_CACHE": str(run.work / "shared-cache")}
    out = run_command(run, step, argv, run.caps["shared_gpu"][0], env=env)
    mode = re.search(r"GPU compute mode: (.*)", out)
    if mode:
        step.numbers["compute_mode"] = mode[1].strip()
    try:
        step.numbers |= last_json(out)
    except ValueError:  # stopped or failed before its summary: the log holds what it printed
        if step.status != "timeout":
            fail = re.search(r"^.*exit statuses.*$", out, re.M)  # the benchmark's own line when a process failed
            step.status, step.reason = "failed", step.reason or (fail[0] if fail else "no summary line")


def _shape_values(run: Run, step: Step, name: str, args: list[str]) -> None:
    """bench_compiled_values.py at B = 1 on the 32-layer shape (one fact's warm-up, ``--profile 1``)."""
    if run.smoke:
        step.status, step.reason = "skipped", "the shape step has no smoke size (the compiled step is its miniature)"
        return
    if unstaged(run, step):
        return
    out = run_command(run, step, [PY, "bench/bench_compiled_values.py", "--params", "params/llama3-shape-slice.yaml",
                                  "--z-batch-size", "1", "--warmup", "1", "--profile", "1", *args,
                                  "--threads", str(os.cpu_count() or 2),
                                  "--draw-device", run.device, "--tokenizer", str(STAGE / "tokenizer"),
                                  *set_args(shape_sets(run))],
                      run.caps[name][0],
                      env={"HF_HUB_OFFLINE": "1", "EDITLIB_COUNTERFACT": str(staged_counterfact()),
                           "EDITLIB_CACHE": str(run.work / "compiled-cache")})
    step.numbers = parse_compiled(out)


def parse_compiled(out: str) -> dict:
    """The numbers of bench_compiled_values.py's summary, z-agreement and ``--profile`` lines (the
    eager numbers and the error when the compiled or captured path failed; device kernels per Adam
    iteration of each path: with the blocks above the edited layer, what refits editlib.cost's
    ``kernels_fused_value``; --mode capture: for how many facts z equals eager's to the bit, and per
    round the one-fact graphs recorded and reused)."""
    kernels = {f"{p}_kernels_per_iteration": int(k) for p, k in
               re.findall(r"profile \((eager|compiled|captured)\): .*?, (\d+) device kernels/iteration", out)}
    graphs = re.search(r"CUDA graphs recorded: (\d+), peak GPU memory reserved ([\d.]+) GiB", out)
    if graphs:
        kernels.update(cuda_graphs_recorded=int(graphs[1]), peak_reserved_gib=float(graphs[2]))
    failed = re.search(r"eager ([\d.]+)-([\d.]+) ms/fact, (compiled|captured) failed: (.*)", out)
    if failed:
        return {"eager_ms_per_fact": [float(failed[1]), float(failed[2])], f"{failed[3]}_error": failed[4].strip(),
                **kernels}
    m = re.search(r"eager ([\d.]+)-([\d.]+) ms/fact, (compiled|captured) ([\d.]+)-([\d.]+)", out)
    if not m:
        return {}
    got = {"eager_ms_per_fact": [float(m[1]), float(m[2])], f"{m[3]}_ms_per_fact": [float(m[4]), float(m[5])], **kernels}
    dz = re.findall(r"max \|Δz\| ([\d.e+-]+), max relative ‖Δz‖ ([\d.e+-]+)", out)
    if dz:
        got["max_abs_dz"], got["max_rel_dz"] = max(float(a) for a, _ in dz), max(float(b) for _, b in dz)
    bits = re.findall(r"z equal to the bit (\d+)/(\d+)", out)
    if bits:
        got["z_bit_equal"] = f"{sum(int(a) for a, _ in bits)}/{sum(int(b) for _, b in bits)}"
    kept = re.findall(r"one-fact graphs kept: (\d+) recorded, (\d+) reused", out)
    if kept:  # per captured round (capture_steps at B = 1: later rounds replay the first's kept graphs)
        got["kept_graphs_recorded"], got["kept_graphs_reused"] = [int(a) for a, _ in kept], [int(b) for _, b in kept]
    return got


def step_decode_shape(run: Run, step: Step) -> None:
    """bench_decode.py, then (if it passed) the calibration's GE units under gen_decode compiled into
    calibration-compiled.json: ``paper_cost.py --set evaluation.gen_decode=compiled --unit-costs``
    with the committed H200 units and that file prices the grid with compiled, captured decode steps."""
    if not run.smoke and unstaged(run, step):
        return
    if run.smoke:
        argv = [PY, "bench/bench_decode.py", "--prompts", "8", "--max-len", "16", "--rounds", "1", "--device", run.device]
    else:
        argv = [PY, "bench/bench_decode.py", "--params", "params/llama3-shape-slice.yaml", "--prompts", "1020", "10",
                "--rounds", "2", "--draw-device", run.device, "--tokenizer", str(STAGE / "tokenizer"),
                *set_args(shape_sets(run))]
    cap = run.caps["decode_shape"][0]
    t0 = time.perf_counter()
    out = run_command(run, step, argv, cap * 0.6, env={"HF_HUB_OFFLINE": "1"})
    step.numbers = parse_decode(out)
    if step.status != "passed":
        return
    units = run.out / "calibration-compiled.json"
    units.unlink(missing_ok=True)
    first = step.seconds
    run_command(run, step, [*calibrate_command(run, units.name), "--parts", "eval",
                            "--grid-set", "evaluation.gen_decode=compiled"], cap - (time.perf_counter() - t0),
                env={"HF_HUB_OFFLINE": "1", "EDITLIB_CACHE": str(run.work / "calibrate-cache")})
    step.seconds = round(first + step.seconds, 1)
    if units.is_file():
        step.numbers["compiled_units"] = json.loads(units.read_text()).get("units", {})
    elif step.status == "passed":
        step.status, step.reason = "failed", "no calibration-compiled.json"


def parse_decode(out: str) -> dict:
    """Per batch size (rows) and mode: bench_decode.py's ms per decode step and texts equal to the
    transformers path's; on a GPU also the kernels one step of each form launches."""
    got: dict = {}
    rows = None
    for line in out.splitlines():
        head = re.search(r"(\d+) decode steps of (\d+) rows", line)
        if head:
            rows = head[2]
            continue
        kern = re.match(r"\s+kernels per decode step of (\d+) rows: (.*)", line)
        if kern:
            got.setdefault(f"rows_{kern[1]}", {})["kernels_per_step"] = {
                m: int(c) for m, c in (x.split() for x in kern[2].split(", "))}
            continue
        m = re.match(r"\s+(\w+): [\d., ]+ s\s+\(([\d., ]+) ms per step\)(?:\s+texts equal to transformers: (\d+)/(\d+))?", line)
        if m and rows is not None:
            entry = {"ms_per_step": [float(x) for x in m[2].split(", ")]}
            if m[3] is not None:
                entry["texts_equal"] = f"{m[3]}/{m[4]}"
            got.setdefault(f"rows_{rows}", {})[m[1]] = entry
    return got


RUNNERS: dict[str, Callable[[Run, Step], None]] = {
    "env": step_env, "cuda_tests": step_cuda_tests, "slice": step_slice, "calibrate": step_calibrate, "cost": step_cost,
    "gram": step_gram, "compiled": step_compiled, "compiled_shape": step_compiled_shape,
    "captured_shape": step_captured_shape, "captured_units": step_captured_units, "shared_gpu": step_shared_gpu,
    "decode_shape": step_decode_shape}


def run_checks(run: Run, names: list[str], runners: dict[str, Callable[[Run, Step], None]] = RUNNERS) -> list[Step]:
    """Run the named steps in order; a step whose least useful time (``run.caps``) no longer fits is skipped."""
    caps = run.caps
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "checks.log").unlink(missing_ok=True)
    run.info.setdefault("python", platform.python_version())
    stop = ""
    for i, name in enumerate(names):
        step = Step(name)
        run.steps.append(step)
        run.reserve = sum(caps[n][1] + RESERVE_MARGIN_S for n in names[i + 1:] if n in RESERVED)
        if stop:
            step.status, step.reason = "skipped", stop
        elif run.left() - run.reserve < caps[name][1]:  # not checked: the run's exit status says so
            step.status, step.reason = "not run", f"{run.left():.0f} s of the budget left, needs {caps[name][1]:.0f}"
        else:
            try:
                runners[name](run, step)
            except Exception as e:  # a broken step is reported, and the others still run
                step.status, step.reason = "failed", f"{type(e).__name__}: {e}"
        if name == "env" and step.status == "failed":  # no GPU or packages missing: every later step would fail
            stop = f"env failed: {step.reason}"
        for tmp in run.out.glob("*.tmp"):  # a step stopped mid-write: its half file would be returned too
            tmp.unlink(missing_ok=True)
        run.save()
    return run.steps


def stage(dest: Path = STAGE) -> None:
    """Write what the GPU machine cannot fetch: the Llama-3 tokenizer and the CounterFact file."""
    from editlib.counterfact import resolve_counterfact
    from editlib.llama3_tokenizer import build_llama3_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    build_llama3_tokenizer().save_pretrained(str(dest / "tokenizer"))
    src = resolve_counterfact(None, download=False)
    for old in dest.glob("counterfact*"):
        old.unlink()
    shutil.copy(src, dest / ("counterfact" + "".join(src.suffixes[-2:])))  # .json, .json.gz or .jsonl
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"staged {dest} ({size / 2**20:.1f} MiB: tokenizer, {src.name}); carry it: run(carry=['.cache/device'])")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", action="store_true", help="write .cache/device here, then stop")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "device-checks" / "out"))
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="small sizes, the miniature instead of the shape model")
    ap.add_argument("--shape-layers", type=int, default=32, help="layers of the Llama-3-8B-shaped model (slice step)")
    ap.add_argument("--slice-set", action="append", default=[], metavar="KEY=VALUE", help="params override of the slice step")
    ap.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS", help="another time cap for a step")
    ap.add_argument("--only", nargs="+", choices=STEPS, default=None)
    ap.add_argument("--skip", nargs="+", choices=STEPS, default=[])
    a = ap.parse_args(argv)
    if a.stage:
        stage()
        return 0
    names = [s for s in (a.only or DEFAULT_STEPS) if s not in a.skip]
    caps = dict(CAPS)
    for c in a.cap:
        step, _, sec = c.partition("=")
        if step not in CAPS or not sec.replace(".", "", 1).isdigit():
            ap.error(f"--cap {c!r}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        caps[step] = (float(sec), CAPS[step][1])
    run = Run(Path(a.out).resolve(), a.budget, a.device, a.smoke, a.shape_layers, a.slice_set, caps=caps)
    steps = run_checks(run, names)
    print("\n| step | status | seconds | note |\n|---|---|---:|---|")
    for s in steps:
        print(f"| {s.name} | {s.status} | {s.seconds} | {s.reason} |")
    print(f"\n{run.out / 'checks.json'}")
    return 0 if all(s.status in ("passed", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
