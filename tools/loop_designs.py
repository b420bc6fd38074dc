"""Why the chunked runtime is an opaque op: the LM head's chunk loop written three ways, compiled
by Inductor, at a few chunk counts M; compile time and peak memory of each, side by side.

    python tools/loop_designs.py                      # 8192 x 512 -> 32000, fp32, M = 4, 16, 64
    python tools/loop_designs.py --tokens 4096 --chunks 4,64

All three compute the loss and the gradients of x and W chunk by chunk in one call (as mst's LM
head does in its forward):

    unrolled   a Python loop inside the compiled function: Dynamo unrolls it into one flat graph,
               and the scheduler may interleave the chunks (mst's runtime before issue 10)
    region     each chunk one `torch.compiler.nested_compile_region` call (an invoke_subgraph in
               the graph), the weight-gradient accumulator passed through the calls (the way
               torch's auto-chunker does it)
    mst        `torch.ops.mst.linear_cross_entropy`: an opaque op that loops at run time over a
               body Inductor compiled once per chunk shape, accumulating in place

Each (design, M) runs in its own process, Inductor's caches off: "compile s" is the first call's
time less a later call's; "peak MB" the rise of VmHWM over a call, with MALLOC_MMAP_THRESHOLD_ so
that freed memory leaves RSS (CPU). Ratios are to the same design at the smallest M.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from tabulate import tabulate

DESIGNS = ("unrolled", "region", "mst")

_CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F

design, tokens, hidden, vocab, chunks = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)
x, w = torch.randn(tokens, hidden), torch.randn(vocab, hidden) / hidden**0.5
y = torch.randint(0, vocab, (tokens,))
y[::7] = -100
size = tokens // chunks


def chunk_step(x_c, w, y_c, scale, acc_w):
    logits = x_c @ w.t()
    valid = y_c != -100
    safe = torch.where(valid, y_c, 0)
    loss = ((torch.logsumexp(logits, -1) - logits.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
    dz = (torch.softmax(logits, -1) - F.one_hot(safe, logits.shape[-1])) * (valid[:, None] * scale)
    return loss, dz @ w, acc_w + dz.t() @ x_c


def loop(step):
    def run(x, w, y):
        scale = 1.0 / (y != -100).sum()
        loss, acc, dxs = x.new_zeros(()), torch.zeros_like(w), []
        for i in range(chunks):
            part = slice(i * size, (i + 1) * size)
            loss_c, dx, acc = step(x[part], w, y[part], scale, acc)
            loss, dxs = loss + loss_c, dxs + [dx]
        return loss * scale, torch.cat(dxs), acc * 1.0

    return run


if design == "mst":
    import mst_fx
    from mst_fx.runtime.chunked_ops import ChunkedLinearCrossEntropy, CrossEntropyForm
    from torch import fx

    form = CrossEntropyForm("mean", -100, 0.0, False)
    graph = fx.Graph()
    graph.output(graph.placeholder("logits"))
    transform = fx.GraphModule(torch.nn.Module(), graph)
    site = ChunkedLinearCrossEntropy(form, transform, (hidden, vocab), mst_fx.MstOptions(chunks=chunks))

    def fn(x, w, y):
        loss, dx, dw = torch.ops.mst.linear_cross_entropy(site.key, x, [w, None], y, None, [True, True, False], None)
        return loss, dx, dw
else:
    step = torch.compiler.nested_compile_region(chunk_step) if design == "region" else chunk_step
    fn = loop(step)

compiled = torch.compile(fn)


def call():
    start = time.perf_counter()
    compiled(x, w, y)
    return time.perf_counter() - start


def vm_hwm_kb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


first = call()
call()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = vm_hwm_kb()
again = call()
print(json.dumps({"compile_s": first - again, "call_s": again, "peak_mb": (vm_hwm_kb() - base) / 1024}))
"""


def run(design: str, tokens: int, hidden: int, vocab: int, chunks: int, timeout: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}  # fmt: skip
    args = [sys.executable, "-c", _CHILD, design, *map(str, (tokens, hidden, vocab, chunks))]
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunks", default="4,16,64", help="comma-separated M; each must divide --tokens")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    counts = [int(m) for m in args.chunks.split(",")]
    rows = []
    for design in DESIGNS:
        base = None
        for m in counts:
            print(f"{design}, M={m} ...", file=sys.stderr, flush=True)
            r = run(design, args.tokens, args.hidden, args.vocab, m, args.timeout)
            if "error" in r:
                rows.append([design, m, "-", "-", "-", "-", "-", r["error"]])
                continue
            base = base or r
            rows.append([design, m, f"{r['compile_s']:.1f}", _ratio(r["compile_s"], base["compile_s"]),
                         f"{r['call_s']:.2f}", f"{r['peak_mb']:.0f}", _ratio(r["peak_mb"], base["peak_mb"]), "ok"])  # fmt: skip
    print(f"{args.tokens} x {args.hidden} -> {args.vocab}, fp32, CPU, loss and gradients of x and W in one call")
    headers = ["design", "M", "compile s", "vs smallest M", "call s", "peak MB", "vs smallest M", "status"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
