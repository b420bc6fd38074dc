"""The memory budget inside a container's memory limit (issue 36): each configuration runs in a child
process inside a child memory cgroup (`memory_cgroup.py`), where the kernel kills it for memory past
the limit, as `docker run --memory` or a Kubernetes pod's limit would.

    python tools/limit_bench.py max-length --limit-gib 3 --json docs/limit_bench.json
    python tools/limit_bench.py throughput --limit-gib 3 --tokens 4096 --json docs/limit_bench.json

The docs' Llama-shaped model (hidden 512, intermediate 2048, 2 layers, vocab 32000), AdamW, fp32,
batch 1, two warm-up steps (under "auto" the first runs lean while it is measured, the second is
the first that keeps), then the measured steps (`step_runner.py`). No MALLOC_MMAP_THRESHOLD_: the
allocator behaves as it does for a user, and the limit counts what the process really holds.

`max-length`: the longest sequence whose steps run to the end without being killed, for Inductor,
mst with the budget off, and mst's default ("auto"), by seq_bench's search (its "peak" here is the
cgroup's most used bytes). `throughput`: tokens/s at one length, the variants run in turn, each in
its own process and group, `--repeats` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

from memory_cgroup import MemoryCgroup
from seq_bench import Probe, SearchRule, max_length_table, search_max_length
from step_runner import RunSpec
from tabulate import tabulate

LLAMA = {"model": "llama", "hidden": 512, "intermediate": 2048, "layers": 2, "vocab": 32000}
VARIANTS = {
    "inductor": {"variant": "inductor"},
    "mst-off": {"variant": "mst", "options": {"memory_budget": "off"}},
    "mst": {"variant": "mst"},  # the default: memory_budget="auto"
}
STEP_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_runner.py")


@dataclasses.dataclass
class Limited:
    tokens: int
    variant: str
    finished: bool  # every step ran
    killed_for_memory: bool
    max_usage_mb: float  # the group's most used
    step_s: float | None
    losses: list[float] | None
    wall_s: float
    error: str = ""


def run_limited(variant: str, tokens: int, limit: int, steps: int, timeout: float) -> Limited:
    spec = RunSpec(tokens=tokens, steps=steps, warmup=2, optimizer=True, **LLAMA, **VARIANTS[variant])
    start = time.perf_counter()
    with MemoryCgroup(limit) as group:
        try:
            done = group.run([sys.executable, STEP_RUNNER, json.dumps(dataclasses.asdict(spec))], timeout=timeout)
        except subprocess.TimeoutExpired:
            return Limited(tokens, variant, False, False, group.max_usage() / 2**20, None, None, timeout, "timed out")
        usage = group.max_usage() / 2**20
    wall = time.perf_counter() - start
    if done.returncode != 0:
        why = "killed for memory" if done.killed_for_memory else done.stderr.strip()[-300:]
        return Limited(tokens, variant, False, done.killed_for_memory, usage, None, None, wall, why)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Limited(tokens, variant, True, False, usage, result["step_s"], result["losses"], wall)


def max_length_main(args) -> dict:
    limit = int(args.limit_gib * 2**30)
    searches, runs = [], []
    for variant in args.variants.split(","):
        print(f"searching {variant} under {args.limit_gib} GiB ...", file=sys.stderr, flush=True)

        def probe(tokens: int, variant=variant) -> Probe:
            run = run_limited(variant, tokens, limit, 1, args.timeout)
            runs.append(run)
            print(f"  {tokens:>6} tokens: {'fits' if run.finished else run.error}, group used {run.max_usage_mb:.0f} MB "
                  f"({run.wall_s:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
            note = "" if run.finished else ("over budget" if run.killed_for_memory else run.error)
            return Probe(tokens, run.finished, run.max_usage_mb, run.step_s, run.wall_s, note)

        rule = SearchRule(limit / 2**20, args.start, args.granularity, 0.0, args.max_tokens, args.max_probes)
        searches.append(dataclasses.replace(search_max_length(probe, rule), variant=variant))
        print(max_length_table(searches), file=sys.stderr, flush=True)
    print(header(args))
    print(max_length_table(searches).replace("peak MB at max", "group's most used MB at max"))
    return {"searches": [dataclasses.asdict(s) for s in searches], "runs": [dataclasses.asdict(r) for r in runs]}


def throughput_main(args) -> dict:
    limit = int(args.limit_gib * 2**30)
    runs: dict[str, list[Limited]] = {}
    for _ in range(args.repeats):
        for variant in args.variants.split(","):
            run = run_limited(variant, args.tokens, limit, args.steps, args.timeout)
            print(f"  {variant}: {run.step_s} s/step, group used {run.max_usage_mb:.0f} MB {run.error}", file=sys.stderr, flush=True)
            runs.setdefault(variant, []).append(run)
    rows, base = [], _mean_step(runs.get("mst-off", []))
    for variant, found in runs.items():
        step = _mean_step(found)
        rows.append([
            variant, args.tokens, "killed or failed" if step is None else f"{step:.2f}",
            "-" if step is None else f"{args.tokens / step:.0f}",
            "-" if step is None or base is None else f"{base / step:.2f}x",
            f"{max(r.max_usage_mb for r in found):.0f}",
            "-" if not found[0].losses else f"{found[0].losses[-1]:.6f}",
        ])  # fmt: skip
    headers = ["variant", "tokens", "step s (mean)", "tokens/s", "tokens/s vs mst-off", "group's most used MB", "loss"]
    print(header(args))
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    return {"runs": {v: [dataclasses.asdict(r) for r in found] for v, found in runs.items()}}


def _mean_step(found: list[Limited]) -> float | None:
    steps = [r.step_s for r in found]
    return None if not steps or None in steps else sum(steps) / len(steps)


def header(args) -> str:
    import torch
    import transformers

    return (f"limit {args.limit_gib} GiB (child memory cgroup), llama hidden 512 I 2048 layers 2 vocab 32000, AdamW, "
            f"fp32 cpu; torch={torch.__version__} transformers={transformers.__version__} "
            f"machine={platform.machine()} cores={len(os.sched_getaffinity(0))}")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("max-length", "throughput"):
        s = sub.add_parser(name)
        s.add_argument("--limit-gib", type=float, default=3.0)
        s.add_argument("--variants", default=",".join(VARIANTS))
        s.add_argument("--timeout", type=float, default=1200, help="seconds one child may take")
        s.add_argument("--json", help="write the results here (under the command's key)")
    m = sub.choices["max-length"]
    m.add_argument("--start", type=int, default=4096)
    m.add_argument("--granularity", type=int, default=1024)
    m.add_argument("--max-tokens", type=int, default=65536)
    m.add_argument("--max-probes", type=int, default=6)
    t = sub.choices["throughput"]
    t.add_argument("--tokens", type=int, default=4096)
    t.add_argument("--steps", type=int, default=3, help="measured steps after two warm-up steps")
    t.add_argument("--repeats", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    unavailable = MemoryCgroup.unavailable()
    if unavailable:
        print(unavailable, file=sys.stderr)
        return 2
    result = max_length_main(args) if args.command == "max-length" else throughput_main(args)
    if args.json:
        existing = json.load(open(args.json)) if os.path.exists(args.json) else {}
        existing[args.command.replace("-", "_")] = {**result, "args": {k: v for k, v in vars(args).items() if k != "json"}}
        with open(args.json, "w") as f:
            json.dump(existing, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
