"""Demo: train a tiny Llama-shaped model (Hugging Face LlamaForCausalLM, random weights, nothing
downloaded) a few steps with AdamW under Inductor and under mst, each in its own process, and
print peak memory, step time and the losses side by side.

mst runs twice: with its default memory budget ("auto": on a machine with memory to spare, the
MLPs keep their intermediates and the head runs whole, as fast as Inductor or faster), and with
memory_budget="off" (every site chunked and recomputed: the least memory, what a step that is
short of memory gets).

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
    p.add_argument("--steps", type=int, default=3, help="training steps after two warm-up ones")
    args = p.parse_args(argv)
    shape = dict(model="llama", tokens=args.tokens, hidden=256, intermediate=688, vocab=32000, layers=2)
    print(f"Training a tiny Llama ({shape}) for {args.steps + 2} AdamW steps, each backend in its own process.",
          file=sys.stderr)
    runs = {"inductor": ("inductor", {}), "mst": ("mst", {}), "mst, budget off": ("mst", {"memory_budget": "off"})}
    results = {}
    for name, (variant, options) in runs.items():
        print(f"  {name}: compiling and training ...", file=sys.stderr, flush=True)
        spec = RunSpec(variant, steps=args.steps, warmup=2, optimizer=True, options=options, **shape)
        results[name] = run_in_child(spec)
    base = results["inductor"]
    rows = [
        ["peak memory over a step (MB)", *(f"{r.peak_mb:.0f} ({r.peak_mb / base.peak_mb:.2f}x)" for r in results.values())],
        ["step time (s)", *(f"{r.step_s:.2f} ({r.step_s / base.step_s:.2f}x)" for r in results.values())],
    ] + [
        [f"loss, step {i}", *(f"{r.losses[i]:.6f}" for r in results.values())] for i in range(len(base.losses))
    ]  # fmt: skip
    print(tabulate(rows, headers=["", *results], tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
