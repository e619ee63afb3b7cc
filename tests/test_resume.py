"""A killed sequential run resumed in a *fresh process* equals an uninterrupted one and collects no
C0 (statistics are keyed by the unedited model), for multi-layer MEMIT whose upper-layer C0 would
differ if it were recollected on an edited model (SPEC §5 "C0 is fixed")."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from editlib.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(not (REPO_ROOT / "models" / "tiny-world" / "config.json").is_file(),
                                reason="models/tiny-world is missing")

SCRIPT = textwrap.dedent('''
    import sys
    from editlib import protocols, stats
    from editlib.params import StudyParams, resolve

    results, mode = sys.argv[1], sys.argv[2]
    over = {"hparams.common.v_num_grad_steps": 3, "sequential.total": 4, "sequential.batch_sizes": [1],
            "sequential.methods": ["memit"], "sequential.layer": 0, "sequential.eval_final": True,
            "results_dir": results, "name": "r"}
    p = resolve("params/smoke.yaml", overrides=over)

    real_hp = StudyParams.method_hparams
    def two_layers(self, method, layer, section=None, **kw):  # multi-layer MEMIT over layers 0-1
        hp = real_hp(self, method, layer, section, **kw)
        return type(hp).from_dict({**hp.to_dict(), "layers": [0, 1]})
    StudyParams.method_hparams = two_layers

    if mode == "resume":  # a fresh process must not collect C0 again
        def no_collect(*a, **k):
            raise AssertionError("C0 collected again on resume")
        stats.collect_second_moments = no_collect
    if mode == "kill":  # die after batch 1's cases are stored, before its checkpoint is written
        real_save, calls = protocols._save_ckpt, []
        def dying_save(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise SystemExit(3)
            return real_save(*a, **k)
        protocols._save_ckpt = dying_save
    study = protocols.open_study(p, experiments=["sequential"], log=lambda *a: None)
    protocols.run_sequential(study, log=lambda *a: None)
''')


def run(results: Path, mode: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDITLIB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(results), mode], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_fresh_process_resume_equals_uninterrupted(tmp_path) -> None:
    cache = tmp_path / "cache"
    killed = run(tmp_path / "a", "kill", cache)
    assert killed.returncode == 3, killed.stderr[-2000:]
    root = tmp_path / "a" / "r" / "sequential"
    parts = sorted(p.name for p in (root / "parts").glob("*.cases.parquet"))
    assert parts == ["memit-B00001-o0-b00000.cases.parquet", "memit-B00001-o0-b00001.cases.parquet"]
    assert (root / "checkpoints").is_dir()  # the checkpoint still says "next: batch 1"

    resumed = run(tmp_path / "a", "resume", cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run(tmp_path / "b", "straight", cache)
    assert straight.returncode == 0, straight.stderr[-3000:]

    a = pd.read_parquet(root / "cases.parquet")
    b = pd.read_parquet(tmp_path / "b" / "r" / "sequential" / "cases.parquet")
    key = ["eval", "batch_index", "case_id"]
    assert len(a) == 4 + 4 and (a["eval"] == "final").sum() == 4
    assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
