"""Run the paper's params file through every notebook offline, on cached stand-ins of its models.

``params/llama3-8b.yaml`` names ``meta-llama/Meta-Llama-3-8B`` and ``meta-llama/Llama-2-7b-hf``;
this script writes small random stand-ins of both into a Hugging Face cache under ``--out``
(:mod:`editlib.hubcache`: the Llama-3 vocabulary and tokenizer, 2 layers), a C0 corpus of
CounterFact sentences as a local parquet file, and a params file that extends the paper's with
small sizes, then runs ``python -m editlib reproduce`` on it with ``HF_HUB_OFFLINE=1`` and
``HF_HUB_CACHE`` pointing at the stand-ins. What it exercises is every notebook's path for a hub
model (Figure 6's second model, the report's text, notebook 07's five editors) that the miniature
params never take; the scores of random models mean nothing. Prints each notebook's seconds and
where the report is.

    EDITLIB_COUNTERFACT=/path/to/counterfact.json.gz python bench/paper_notebooks.py [--out DIR] [--only 01 06]

About 18 minutes on 2 CPU cores (notebook 07 takes over half of it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the paper file's sizes cut to what 2 CPU cores run in minutes; everything else is the file's
SIZES = """\
model: {{device: cpu}}
data: {{fact_list: seeded}}           # the reference's index file needs the full CounterFact
covariance: {{name: parquet, config: null, data_files: {corpus}, n_samples: 200}}
evaluation: {{gen_max_len: 24}}
layer_search: {{n_facts: 3}}
singular: {{n_facts: 3}}
sweep: {{batch_size: 4, total: 4}}
batch: {{total: 8, batch_sizes: [4, 8]}}
sequential: {{total: 8, batch_sizes: [1, 4], degradation_every: 4, heldout_facts: 4}}
beyond:
  orderings: [0, 1]
  batch: {{total: 8, batch_sizes: [1, 4, 8]}}
  sequential: {{total: 8, batch_sizes: [1, 8], degradation_every: 4, heldout_facts: 4}}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / ".cache" / "paper-notebooks"), help="stand-ins, params, results")
    ap.add_argument("--only", nargs="*", default=None, help="notebook numbers, as `reproduce --only`")
    args = ap.parse_args(argv)

    import pandas as pd

    from editlib.counterfact import load_counterfact
    from editlib.hubcache import PAPER_STAND_INS, cache_paper_stand_ins, corpus_documents, repo_dir

    out = Path(args.out).resolve()
    hub = out / "hub"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "EDITLIB_CACHE": str(out / "cache")}
    os.environ.update(EDITLIB_CACHE=env["EDITLIB_CACHE"])
    if not all((repo_dir(hub, r) / "refs" / "main").is_file() for r in PAPER_STAND_INS):
        cache_paper_stand_ins(hub)
    corpus = out / "corpus.parquet"
    if not corpus.is_file():
        pd.DataFrame({"text": corpus_documents(load_counterfact(None))}).to_parquet(corpus)
    params = out / "paper-notebooks.yaml"
    params.write_text(f"extends: {REPO / 'params' / 'llama3-8b.yaml'}\nname: paper-notebooks\n"
                      + SIZES.format(corpus=corpus)
                      + f"results_dir: {out / 'results'}\nfigures_dir: {out / 'figures'}\n")
    cmd = [sys.executable, "-m", "editlib", "reproduce", "--params", str(params)]
    if args.only:
        cmd += ["--only", *args.only]
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    timings = REPO / "runs" / "paper-notebooks" / "timings.json"
    if timings.is_file():
        for nb in json.loads(timings.read_text())["notebooks"]:
            if args.only and not nb["notebook"].startswith(tuple(args.only)):
                continue  # an earlier run's entry (reproduce --only keeps them)
            print(f"{nb['notebook']:40s} {nb['seconds']:8.1f} s  {nb['status']}")
    print(f"reproduce exit {rc} after {time.time() - t0:.0f} s; report: {REPO / 'runs' / 'paper-notebooks' / '06_report.html'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
