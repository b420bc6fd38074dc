"""Benchmark: eager, Inductor and mst side by side on one model, each in its own process.

    python tools/bench.py --model mlp-stack --tokens 8192
    python tools/bench.py --model llama --hidden 256 --intermediate 688 --layers 2 --tokens 4096
    python tools/bench.py --model llama --hidden 256 --intermediate 688 --layers 2 --tokens 4096 --checkpointing

Prints peak memory over one training step (forward + backward) and step time, with ratios to
Inductor measured in the same run. A benchmark, not a test: absolute CPU times vary by machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from step_runner import VARIANTS, RunSpec, run_in_child
from tabulate import tabulate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp-stack", choices=["mlp-stack", "llama", "gpt2"])
    p.add_argument("--tokens", type=int, default=8192, help="sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    p.add_argument("--optimizer", action="store_true", help="AdamW step after backward")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of eager,inductor,mst")
    p.add_argument("--options", default="{}", help="mst backend options as JSON, e.g. '{\"chunks\": 8}'")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = args.variants.split(",")
    common = {
        k: getattr(args, k)
        for k in (
            "model",
            "tokens",
            "batch",
            "hidden",
            "intermediate",
            "vocab",
            "layers",
            "steps",
            "optimizer",
            "checkpointing",
            "device",
            "dtype",
        )
    }
    results = {}
    for variant in variants:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        results[variant] = run_in_child(RunSpec(variant, options=json.loads(args.options), **common))
    base = results.get("inductor")
    rows = []
    for variant, r in results.items():
        rows.append([
            variant, f"{r.peak_mb:.0f}", _ratio(r.peak_mb, base and base.peak_mb),
            f"{r.step_s:.2f}", _ratio(r.step_s, base and base.step_s), f"{r.losses[-1]:.6f}",
        ])  # fmt: skip
    print(
        f"model={args.model} tokens={args.batch}x{args.tokens} hidden={args.hidden} "
        f"intermediate={args.intermediate} vocab={args.vocab} layers={args.layers} dtype={args.dtype} "
        f"checkpointing={'on' if args.checkpointing else 'off'} "
        f"device={args.device} torch={torch.__version__} machine={platform.machine()} cores={_cores()}"
    )
    print(
        tabulate(
            rows,
            headers=["variant", "peak MB", "peak / inductor", "step s", "time / inductor", "loss"],
            tablefmt="github",
            disable_numparse=True,
        )
    )
    return 0


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if base else "-"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
