"""mst under DDP: Dynamo's default graph optimizer (split at gradient buckets) against
`torch._dynamo.config.optimize_ddp = False` (one graph), both with mst; step time and peak.

    cd tools && python ddp_bench.py                          # 2 ranks, gloo, CPU, Llama-shaped
    python ddp_bench.py --tokens 2048 --bucket-mb 25 --json ../docs/ddp_bench.json

With the default optimizer mst rewrites the whole graph before the optimizer splits it
(`mst_fx/tracing/ddp_split.py`), so each piece's backward ends with its bucket's gradients ready
and DDP all-reduces them while the next piece runs; with `optimize_ddp=False` the backward is one
compiled function and every all-reduce waits for its end. Each configuration runs in its own pair
of processes (torchrun-style environment, one thread each), with MALLOC_MMAP_THRESHOLD_=65536:
two warm-up steps (the first compiles, the second runs under the memory budget's "auto" as later
steps do), then the measured ones. Peak is the rise of VmHWM over the first measured step, per
rank; time is the mean over the measured steps, the slower rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"default": "ddp_optimizer", "optimize_ddp=False": False}


def rank_main(payload: dict) -> dict:
    """One rank: DDP around the model, compiled with mst, warm-up and measured steps."""
    import datetime

    import torch
    import torch.distributed as dist
    from step_runner import PeakMemory
    from torch.nn.parallel import DistributedDataParallel as DDP

    import mst_fx
    from mst_fx.models import random_batch, tiny_llama

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    torch._dynamo.config.optimize_ddp = payload["optimize_ddp"]
    torch.manual_seed(0)
    model = tiny_llama(hidden=payload["hidden"], intermediate=payload["intermediate"], layers=payload["layers"],
                       vocab=payload["vocab"], heads=payload["hidden"] // 64).train()  # fmt: skip
    compiled = torch.compile(DDP(model, bucket_cap_mb=payload["bucket_mb"]), backend="mst")
    ids, labels = random_batch(payload["vocab"], 1, payload["tokens"], seed=dist.get_rank())

    def step():
        loss = compiled(ids, labels=labels, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(2):
        step()
    times, peaks = [], []
    for _ in range(payload["steps"]):
        dist.barrier()
        with PeakMemory("cpu") as peak:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peaks.append(peak.peak)
    report = mst_fx.last_report()
    result = {
        "step_s": sum(times) / len(times), "peak_mb": peaks[0] / 2**20,
        "rewritten": sorted(f"{s.kind} {s.location}" for s in report.counted_sites if s.rewritten),
        "left_alone": len(report.counted_sites) - len([s for s in report.counted_sites if s.rewritten]),
    }  # fmt: skip
    dist.destroy_process_group()
    return result


def run_config(args, optimize_ddp) -> list[dict]:
    """Both ranks of one configuration; each rank's result."""
    payload = {k: getattr(args, k) for k in ("tokens", "hidden", "intermediate", "layers", "vocab", "bucket_mb", "steps")}
    payload["optimize_ddp"] = optimize_ddp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), WORLD_SIZE="2", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        ranks = []
        for rank in range(2):
            out = open(os.path.join(tmp, f"rank{rank}.out"), "w")
            command = [sys.executable, os.path.abspath(__file__), "--rank-payload", json.dumps(payload)]
            ranks.append((subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                           stdout=out, stderr=subprocess.STDOUT), out))  # fmt: skip
        for proc, out in ranks:
            proc.wait(timeout=args.timeout)
            out.close()
        results = []
        for rank, (proc, _) in enumerate(ranks):
            text = open(os.path.join(tmp, f"rank{rank}.out")).read()
            if proc.returncode != 0:
                raise RuntimeError(f"rank {rank} failed:\n{text[-3000:]}")
            results.append(json.loads(text.strip().splitlines()[-1]))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bucket-mb", dest="bucket_mb", type=float, default=25.0, help="DDP's bucket_cap_mb (its default: 25)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="each configuration this many times, in turn")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--rank-payload", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_payload:
        print(json.dumps(rank_main(json.loads(args.rank_payload))))
        return
    runs = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):  # in turn, so that drift on a shared machine hits both alike
        for name, mode in CONFIGS.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            runs[name].append(run_config(args, mode))
    rows, summary = [], {}
    for name, rounds in runs.items():
        step = min(max(r["step_s"] for r in ranks) for ranks in rounds)  # the slower rank; the best round
        peak = max(r["peak_mb"] for ranks in rounds for r in ranks)
        summary[name] = {"step_s": step, "peak_mb": peak, "rewritten": rounds[0][0]["rewritten"], "left_alone": rounds[0][0]["left_alone"]}
    base = summary["optimize_ddp=False"]
    for name, r in summary.items():
        rows.append([name, f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}x", f"{r['peak_mb']:.0f}",
                     f"{r['peak_mb'] / base['peak_mb']:.2f}x", len(r["rewritten"]), r["left_alone"]])  # fmt: skip
    import torch

    print(f"2 ranks (gloo, CPU, 1 thread each), tiny_llama hidden={args.hidden} intermediate={args.intermediate} "
          f"layers={args.layers} vocab={args.vocab}, 1x{args.tokens} tokens per rank, bucket_cap_mb={args.bucket_mb}, "
          f"fp32, torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores")  # fmt: skip
    headers = ["optimize_ddp", "step s", "vs one graph", "peak MiB (per rank)", "vs one graph", "sites rewritten", "left alone"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "rank_payload"}, "runs": runs, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
