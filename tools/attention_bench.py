"""Benchmark: the attention pass against the is_causal reference, with an all-ones attention mask.

    python tools/attention_bench.py --tokens 8192,16384

The tiny HF Llama (hidden 64, 2 layers) is given an all-ones `attention_mask`, as HF Trainer's
collators always pass one. Under torch.compile transformers then builds a (B, 1, N, N) mask. Each
variant runs in its own process (`step_runner.py`: peak = rise of VmHWM over one training step):

    reference       mst, attention SDPA with is_causal=True and no mask at all (the floor)
    mst             mst with the attention pass (the default)
    mst, no pass    mst with options={"attention": False}: the mask is built and held
    inductor        plain torch.compile

The pass must bring the step's peak within N²/8 bytes of the reference.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
from step_runner import RunSpec, run_in_child
from tabulate import tabulate

VARIANTS = {
    "reference": dict(variant="mst", forced_causal=True),
    "mst": dict(variant="mst"),
    "mst, no pass": dict(variant="mst", options={"attention": False}),
    "inductor": dict(variant="inductor"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="8192,16384", help="comma-separated sequence lengths")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=176)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=1, help="measured steps after one warm-up step")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        results = {}
        for name, settings in VARIANTS.items():
            print(f"running {name} at {tokens} tokens ...", file=sys.stderr, flush=True)
            spec = RunSpec(model="llama", tokens=tokens, hidden=args.hidden, intermediate=args.intermediate,
                           layers=args.layers, vocab=args.vocab, steps=args.steps, attention_mask=True,
                           **settings)  # fmt: skip
            results[name] = run_in_child(spec)
        reference, bound = results["reference"], tokens**2 / 8 / 2**20
        for name, r in results.items():
            over = r.peak_mb - reference.peak_mb
            rows.append([
                tokens, name, f"{r.peak_mb:.0f}", f"{over:+.0f}", f"{r.step_s:.2f}",
                f"{r.step_s / reference.step_s:.2f}x", f"{r.losses[-1]:.6f}",
            ])  # fmt: skip
        verdict = "within" if results["mst"].peak_mb - reference.peak_mb <= bound else "NOT within"
        print(f"{tokens} tokens: mst is {verdict} N²/8 = {bound:.0f} MB of the reference", file=sys.stderr)
    print(
        f"model=llama hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
        f"vocab={args.vocab} attention_mask=all ones torch={torch.__version__} machine={platform.machine()}"
    )
    headers = ["tokens", "variant", "peak MB", "vs reference MB", "step s", "time / reference", "loss"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
