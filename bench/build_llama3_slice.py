"""Build the Llama-3-8B-shaped slice (random weights, real Llama-3 tokenizer) into the git-ignored
``.cache/`` folder at the repository root; nothing is committed. Skips an identical existing build.

    python bench/build_llama3_slice.py [--layers 2] [--seed 0] [--dtype float32] [--out DIR]
        [--tokenizer DIR]   # any tokenizer directory instead of the Llama-3 one (development)
        [--draw-device cuda]  # draw the random weights on a GPU (much faster; another model)
"""
from __future__ import annotations

import argparse
import time

from editlib.paths import repo_path
from editlib.shapes import BUILD_DTYPES, build_llama3_shape_model, slice_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=BUILD_DTYPES)
    ap.add_argument("--out", default=None, help="default: .cache/llama3-8b-shape-<layers>L")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the real Llama-3 one)")
    ap.add_argument("--draw-device", default="cpu", help="where the random weights are drawn (cpu | cuda)")
    a = ap.parse_args(argv)
    t0 = time.time()
    out = build_llama3_shape_model(repo_path(a.out or slice_dir(a.layers)), a.layers, a.seed, a.dtype,
                                   tokenizer=a.tokenizer and str(repo_path(a.tokenizer)),
                                   draw_device=a.draw_device)
    print(f"{out} ready ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
