"""Benchmark (a script, not a test): C0 of layer 1 of the Llama-3-8B-shaped slice loaded in
bfloat16, with float64 products and with ``covariance.fast_gram``, into a fresh cache: seconds,
cache files and the relative difference of the two C0s.

    python bench/build_llama3_slice.py
    EDITLIB_COUNTERFACT=/path/to/counterfact.json.gz python bench/slice_fast_gram.py
"""
import os
import tempfile
import time
import warnings

import torch

from editlib import protocols
from editlib.params import resolve
from editlib.stats import layer_covariance
torch.set_num_threads(2)
p = resolve("params/llama3-shape-slice.yaml", overrides={"model.dtype": "bfloat16"})
st = protocols.open_study(p, log=lambda *a: None)
cp = p.covariance
print("model dtype", next(st.model.parameters()).dtype, "corpus", cp.kind, cp.n_samples, cp.max_length)
out = {}
with tempfile.TemporaryDirectory() as d:
    for fast in (False, True):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = layer_covariance(st.model, st.tok, [1], protocols.corpus_spec(cp), records=st.records, cache_dir=d,
                                 dtype=cp.dtype, batch_size=cp.batch_size, max_batch_tokens=cp.max_batch_tokens,
                                 progress=False, log=print, fast_gram=fast)[1]
        out[fast] = s
        print(f"fast_gram={fast}: {time.perf_counter() - t:.1f} s, {s.count} tokens, key gram={s.key.get('gram')}")
    print("files", sorted(os.listdir(os.path.join(d, os.listdir(d)[0]))))
a, b = out[False].mom2, out[True].mom2
print(f"relative difference of C0: {float((b - a).norm() / a.norm()):.2e}; max abs diag rel "
      f"{float(((b.diag() - a.diag()).abs() / a.diag().abs()).max()):.2e}")
