"""Benchmark: packed documents and a sliding window against the same model attending plain-causal.

    python tools/mask_bench.py --tokens 4096,16384 --repeats 2 --json-out docs/mask_bench.json

One Hugging Face `MistralForCausalLM` shape (hidden 64, 2 layers, SDPA), compiled with mst, one
sequence per step. Each variant runs in its own process (`step_runner.py`: peak = rise of VmHWM
over one training step); the variants of one length alternate `--repeats` times, and each figure
is the best of its repeats (the least disturbed run):

    causal                   no window, no packing: SDPA with is_causal, no mask (the reference)
    documents                4 documents packed in the row (position_ids restarting, no attention_mask)
    window N/8               sliding_window = N/8
    ..., pass off            the same with options={"attention": False}: the N x N mask is built

The issue's targets: documents and window within +2% of the causal peak, and the window's step
time at most the causal one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import transformers
from step_runner import RunSpec, run_in_child
from tabulate import tabulate


def variants(tokens: int) -> dict[str, dict]:
    window = tokens // 8
    return {
        "causal": {},
        "documents": {"documents": 4},
        "window N/8": {"window": window},
        "documents, pass off": {"documents": 4, "options": {"attention": False}},
        "window N/8, pass off": {"window": window, "options": {"attention": False}},
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,16384", help="comma-separated sequence lengths")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=176)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    p.add_argument("--repeats", type=int, default=2, help="runs of every variant, alternating")
    p.add_argument("--json-out", help="write the figures here as JSON")
    return p.parse_args(argv)


def best(runs: list) -> tuple[float, float, float]:
    """(peak MB, step s, last loss): the lowest peak and time over the repeats."""
    return min(r.peak_mb for r in runs), min(r.step_s for r in runs), runs[0].losses[-1]


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, figures = [], []
    for tokens in (int(t) for t in args.tokens.split(",")):
        runs: dict[str, list] = {}
        for repeat in range(args.repeats):
            for name, settings in variants(tokens).items():
                print(f"running {name} at {tokens} tokens ({repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                spec = RunSpec(variant="mst", model="mistral", tokens=tokens, hidden=args.hidden,
                               intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                               steps=args.steps, **settings)  # fmt: skip
                runs.setdefault(name, []).append(run_in_child(spec))
        causal_peak, causal_time, _ = best(runs["causal"])
        for name, results in runs.items():
            peak, step, loss = best(results)
            figures.append({"tokens": tokens, "variant": name, "peak_mb": peak, "step_s": step, "loss": loss,
                            "peak_vs_causal": peak / causal_peak, "time_vs_causal": step / causal_time})  # fmt: skip
            rows.append([tokens, name, f"{peak:.0f}", f"{peak - causal_peak:+.0f}", f"{100 * (peak / causal_peak - 1):+.1f}%",
                         f"{step:.2f}", f"{step / causal_time:.2f}x", f"{loss:.4f}"])  # fmt: skip
    print(
        f"model=mistral hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} vocab={args.vocab} "
        f"steps={args.steps} repeats={args.repeats} torch={torch.__version__} transformers={transformers.__version__} "
        f"machine={platform.machine()}"
    )
    headers = ["tokens", "variant", "peak MB", "vs causal MB", "vs causal", "step s", "time / causal", "loss"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "figures": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
