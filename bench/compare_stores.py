"""Benchmark helper (a script, not a test): are two runs' stored results identical, value for
value? For every experiment with a ``cases.parquet`` in both results folders, the rows are sorted
by their unit columns and every column is compared exactly (floats bit for bit, missing equal to
missing). Used to check a Ray run against a serial one (docs/cluster.md).

    python bench/compare_stores.py results/tiny /tmp/other-results/tiny
"""
import sys, pandas as pd, numpy as np
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
keys = ["method", "lam", "layer", "batch_size", "ordering", "eval", "batch_index", "case_id"]
bad = 0
for d in sorted(p for p in a.iterdir() if (p / "cases.parquet").is_file()):
    x = pd.read_parquet(d / "cases.parquet"); y = pd.read_parquet(b / d.name / "cases.parquet")
    k = [c for c in keys if c in x.columns]
    x = x.sort_values(k).reset_index(drop=True); y = y.sort_values(k).reset_index(drop=True)
    assert list(x.columns) == list(y.columns), (d.name, set(x.columns) ^ set(y.columns))
    diff = []
    for c in x.columns:
        xa, ya = x[c].to_numpy(), y[c].to_numpy()
        if xa.dtype.kind == "f":
            same = np.array_equal(xa, ya, equal_nan=True)
        else:
            same = ((x[c].isna() & y[c].isna()) | (x[c] == y[c])).all()
        if not same:
            diff.append(c)
    bad += bool(diff)
    print(f"{d.name:32s} rows {len(x):5d} vs {len(y):5d}  identical columns {len(x.columns) - len(diff)}/{len(x.columns)}" + (f"  DIFFER: {diff}" if diff else ""))
sys.exit(1 if bad else 0)
