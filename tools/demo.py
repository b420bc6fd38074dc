"""Demo: train a tiny Llama-shaped model (Hugging Face LlamaForCausalLM, random weights, nothing
downloaded) a few steps with AdamW under Inductor and under mst, each in its own process, and
print peak memory, step time and the losses side by side.

    python tools/demo.py                  # 4096 tokens, hidden 256, vocab 32000, 2 layers
    python tools/demo.py --tokens 8192
"""

from __future__ import annotations

import argparse
import sys

from step_runner import RunSpec, run_in_child
from tabulate import tabulate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="training steps after the compiling one")
    args = p.parse_args(argv)
    shape = dict(model="llama", tokens=args.tokens, hidden=256, intermediate=688, vocab=32000, layers=2)
    print(f"Training a tiny Llama ({shape}) for {args.steps + 1} AdamW steps, each backend in its own process.",
          file=sys.stderr)
    results = {}
    for variant in ("inductor", "mst"):
        print(f"  {variant}: compiling and training ...", file=sys.stderr, flush=True)
        results[variant] = run_in_child(RunSpec(variant, steps=args.steps, optimizer=True, **shape))
    inductor, mst = results["inductor"], results["mst"]
    rows = [
        ["peak memory over a step (MB)", f"{inductor.peak_mb:.0f}", f"{mst.peak_mb:.0f}",
         f"{mst.peak_mb / inductor.peak_mb:.2f}x"],
        ["step time (s)", f"{inductor.step_s:.2f}", f"{mst.step_s:.2f}", f"{mst.step_s / inductor.step_s:.2f}x"],
    ] + [
        [f"loss, step {i}", f"{a:.6f}", f"{b:.6f}", f"{abs(a - b):.1e} apart"]
        for i, (a, b) in enumerate(zip(inductor.losses, mst.losses))
    ]  # fmt: skip
    print(tabulate(rows, headers=["", "inductor", "mst", "mst vs inductor"], tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
