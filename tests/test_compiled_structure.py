"""The memory bound holds by the structure of what Inductor compiles, under any scheduler.

When the chunk loop was unrolled into the graph, Inductor's CUDA scheduler ran every chunk's
logits matmul first and kept all chunks' N/M x V tensors alive at once; on CPU the order happened
to hold, so CPU measurements missed it. These tests read the compiled graphs instead, and would
have failed then: a chunked site must be one opaque op, with no tensor of the amplified width in
the graph that is larger than the weight, and its compile time and peak must not grow with M.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import mst_fx
from mst_fx.models import MLPStack, random_batch

# Widths that appear nowhere else in the shapes, chunks of 512 tokens (> D) at M=4.
TOKENS, D, I, V = 2048, 48, 384, 3000


def outer_post_grad_graphs(model, inputs, **options) -> list[torch.fx.Graph]:
    """Inductor's post-grad graphs of the model's own forward and backward (those holding an mst op);
    the chunk bodies Inductor compiles at run time hold no mst op."""
    graphs = []
    with torch._inductor.config.patch(post_grad_custom_post_pass=graphs.append, fx_graph_cache=False):
        compiled = torch.compile(model, backend=mst_fx.backend(compiler="inductor", **options))
        compiled(*inputs).backward()
    return [g for g in graphs if any(_is_mst_op(n) for n in g.nodes)]


def _is_mst_op(node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "mst"


def test_no_graph_node_holds_an_amplified_tensor_larger_than_the_weight():
    torch.manual_seed(0)
    model = MLPStack(V, D, I, layers=1)
    graphs = outer_post_grad_graphs(model, random_batch(V, 1, TOKENS, ignore_every=7), chunks=4)
    assert len(graphs) == 2  # forward and backward
    ops = {n.target.name() for g in graphs for n in g.nodes if _is_mst_op(n)}
    assert ops == {"mst::mlp_forward", "mst::mlp_backward", "mst::linear_cross_entropy"}
    weight_size = {I: D * I, V: D * V}
    for graph in graphs:
        for node in graph.nodes:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                continue
            for width, limit in weight_size.items():
                assert width not in value.shape or value.numel() <= limit, (node.format_node(), value.shape)


def test_compile_time_and_peak_do_not_grow_with_the_chunk_count():
    """M=64 against M=4, each in a fresh process with Inductor's caches off: the time of the first
    training step less a later one's (compile, bodies included) within 1.5x, and the peak of a
    step (VmHWM rise, MALLOC_MMAP_THRESHOLD_ so that freed memory leaves RSS) within 1.1x. The
    better of two runs each, as a machine's load only ever adds time."""
    runs = {m: [_measure(chunks=m) for _ in range(2)] for m in (4, 64)}
    few, many = ({key: min(r[key] for r in runs[m]) for key in runs[m][0]} for m in (4, 64))
    assert many["compile_s"] <= 1.5 * few["compile_s"], runs
    assert many["peak_kb"] <= 1.1 * few["peak_kb"], runs


_CHILD = """
import json, sys, time, torch
import mst_fx
from mst_fx.models import MLPStack, random_batch
T, D, I, V, chunks = map(int, sys.argv[1:])
# One thread: the first step runs while Inductor's compile workers still hold the cores, and many
# small chunks then wait at OpenMP barriers; that is scheduling noise, not compile time.
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.compile(MLPStack(V, D, I, layers=1), backend=mst_fx.backend(chunks=chunks))
batch = random_batch(V, 1, T, ignore_every=7)

def step():
    start = time.perf_counter()
    model(*batch).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start

def vm_hwm_kb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])

first = step()
step()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = vm_hwm_kb()
again = step()
print(json.dumps({"compile_s": first - again, "peak_kb": vm_hwm_kb() - base}))
"""


def _measure(chunks: int) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
    }
    args = [sys.executable, "-c", _CHILD, *map(str, (TOKENS, D, I, V, chunks))]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_kept_mlp_is_one_op_each_way_and_its_ticket_reaches_the_backward():
    """Under a memory budget that lets the MLP keep: still one opaque op per site in each graph, no
    amplified tensor in either, and the forward op's ticket is what the backward op reads (the
    partitioner saves it; it does not run the forward op again in backward)."""
    torch.manual_seed(0)
    model = MLPStack(V, D, I, layers=1)
    graphs = outer_post_grad_graphs(model, random_batch(V, 1, TOKENS, ignore_every=7), memory_budget="1GiB")
    forward, backward = graphs
    counts = [sorted(n.target.name() for n in g.nodes if _is_mst_op(n)) for g in graphs]
    assert counts == [["mst::linear_cross_entropy", "mst::mlp_forward"], ["mst::mlp_backward"]]
    (mlp_backward,) = [n for n in backward.nodes if _is_mst_op(n)]
    ticket = mlp_backward.args[2]
    assert ticket.op == "placeholder" and ticket.meta["val"].shape == () and ticket.meta["val"].dtype == torch.int64
    (mlp_forward,) = [n for n in forward.nodes if _is_mst_op(n) and n.target.name() == "mst::mlp_forward"]
    saved = [a for a in forward.output_node().args[0] if isinstance(a, torch.fx.Node)]
    assert any(s.op == "call_function" and s.args[:1] == (mlp_forward,) and s.args[1] == 1 for s in saved)
    for graph in graphs:
        for node in graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                assert I not in value.shape or value.numel() <= D * I, (node.format_node(), value.shape)
