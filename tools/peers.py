"""Peers on the same shapes, in the same run: the LM head + loss alone and the MLP block alone,
each peer in its own process, peak memory and time of one training step, ratios to Inductor.

    python tools/peers.py                       # both cases, CPU defaults below
    python tools/peers.py --case lm-head --tokens 8192 --hidden 512 --vocab 32000
    python tools/peers.py --case mlp --tokens 16384 --hidden 512 --intermediate 2048

LM head + loss: `F.cross_entropy(F.linear(x, W).float(), y)` (one label in 7 ignored) under eager,
Inductor and mst; torch core's `F.linear_cross_entropy` with its chunking options, eager and
under torch.compile; Inductor with its own auto-chunker on.
MLP block: a SwiGLU under eager, Inductor and mst, and a tiled MLP written the way DeepSpeed ALST
and Liger-Kernel write theirs (forward under no_grad per shard, backward recomputes each shard and
accumulates the parameters' gradients), eager and under torch.compile.
Peers that can't run here (CUDA-only ones, or a failure) are reported as such, never dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys

import torch
from step_runner import OverBudget, measure, run_script_in_child
from tabulate import tabulate

# Peers built on Triton kernels: run on CUDA only; a CPU run lists them as not measured.
LIGER_HEAD = "Liger-Kernel LigerFusedLinearCrossEntropyLoss"
LIGER_MLP = "Liger-Kernel LigerTiledSwiGLUMLP"
CUDA_ONLY = {LIGER_HEAD, LIGER_MLP}


@dataclasses.dataclass
class Case:
    case: str  # lm-head | mlp
    peer: str  # a key of LM_HEAD_PEERS / MLP_PEERS
    tokens: int
    hidden: int
    vocab: int
    intermediate: int
    steps: int
    device: str = "cpu"
    dtype: str = "float32"


# ---------------------------------------------------------------- LM head + loss


def head_loss(x, weight, target):
    import torch.nn.functional as F

    return F.cross_entropy(F.linear(x, weight).float(), target)


def liger_loss(x, weight, target):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss()(weight, x, target)  # (weight, input, target): its order
    return out[0] if isinstance(out, tuple) else out


def core_linear_cross_entropy(**options):
    """torch core's fused op; `options=None` means its reference (unchunked) path."""

    def loss(x, weight, target):
        import torch.nn.functional as F
        from torch.nn import LinearCrossEntropyOptions

        chosen = None if options.get("reference") else LinearCrossEntropyOptions(**options)
        return F.linear_cross_entropy(x, weight, target, options=chosen)

    return loss


LM_HEAD_PEERS = {
    "eager": ("eager", head_loss),
    "inductor": ("inductor", head_loss),
    "inductor + auto_chunker": ("inductor+auto_chunker", head_loss),
    "mst": ("mst", head_loss),
    "torch F.linear_cross_entropy, options=None (reference path)": ("eager", core_linear_cross_entropy(reference=1)),
    "torch F.linear_cross_entropy, LinearCrossEntropyOptions()": ("eager", core_linear_cross_entropy()),
    "torch F.linear_cross_entropy, LinearCrossEntropyOptions(), compiled": (
        "inductor",
        core_linear_cross_entropy(),
    ),
    "torch F.linear_cross_entropy, chunking_method='aspect_ratio'": (
        "eager",
        core_linear_cross_entropy(chunking_method="aspect_ratio"),
    ),
    LIGER_HEAD: ("eager", liger_loss),
}


def lm_head_step(case: Case):

    from mst_fx.models import random_batch

    torch.manual_seed(0)
    compiler, loss_fn = LM_HEAD_PEERS[case.peer]
    dtype = getattr(torch, case.dtype)
    x = torch.randn(case.tokens, case.hidden, device=case.device, dtype=dtype, requires_grad=True)
    weight = torch.randn(case.vocab, case.hidden, device=case.device, dtype=dtype) / math.sqrt(case.hidden)
    weight.requires_grad_()
    _, labels = random_batch(case.vocab, 1, case.tokens, ignore_every=7)
    target = labels.view(-1).to(case.device)
    fn = compile_with(compiler, loss_fn)

    def step() -> float:
        loss = fn(x, weight, target)
        loss.backward()
        x.grad = weight.grad = None
        return loss.item()

    return step


# ---------------------------------------------------------------- MLP block


class TiledMLP(torch.autograd.Function):
    """DeepSpeed ALST's / Liger-Kernel's TiledMLP: no_grad forward per shard of tokens; backward
    recomputes each shard with grad and lets autograd accumulate the parameters' .grad."""

    @staticmethod
    def forward(ctx, mlp, shards, x, *params):
        ctx.mlp, ctx.shards = mlp, shards
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([mlp(piece) for piece in x.chunk(shards, dim=0)])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        pieces = zip(x.chunk(ctx.shards), grad_out.chunk(ctx.shards), grad_x.chunk(ctx.shards))
        for piece, grad_piece, grad_x_piece in pieces:
            piece = piece.detach().requires_grad_()
            with torch.enable_grad():
                out = ctx.mlp(piece)
            torch.autograd.backward(out, grad_piece)  # the parameters' .grad accumulate here
            grad_x_piece.copy_(piece.grad)
        return None, None, grad_x, *(None for _ in ctx.mlp.parameters())


def tiled(mlp, x):
    # The libraries' default shard count: ceil(seqlen / hidden_size), so a shard's N/M x I
    # intermediate is about I x d, the size of a weight.
    shards = max(1, math.ceil(x.shape[0] / x.shape[-1]))
    return TiledMLP.apply(mlp, shards, x, *mlp.parameters())


MLP_PEERS = {
    "eager": ("eager", None),
    "inductor": ("inductor", None),
    "inductor + auto_chunker": ("inductor+auto_chunker", None),
    "mst": ("mst", None),
    "mst, chunks = tiled MLP's shards": ("mst-as-tiled", None),
    "tiled MLP (ALST/Liger way), eager": ("eager", tiled),
    "tiled MLP (ALST/Liger way), compiled": ("inductor", tiled),
    LIGER_MLP: ("eager", None),
}


def liger_tiled_mlp(hidden: int, intermediate: int):
    from types import SimpleNamespace

    from liger_kernel.transformers import LigerTiledSwiGLUMLP

    config = SimpleNamespace(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    return LigerTiledSwiGLUMLP(config)  # shards: ceil(seqlen / hidden_size), its default


def mlp_step(case: Case):

    from mst_fx.models import SwiGLU

    torch.manual_seed(0)
    compiler, wrap = MLP_PEERS[case.peer]
    liger = case.peer == LIGER_MLP
    mlp = liger_tiled_mlp(case.hidden, case.intermediate) if liger else SwiGLU(case.hidden, case.intermediate)
    mlp = mlp.to(case.device, getattr(torch, case.dtype))
    x = torch.randn(case.tokens, case.hidden, device=case.device, dtype=getattr(torch, case.dtype), requires_grad=True)

    def loss_fn(x):
        out = wrap(mlp, x) if wrap else mlp(x)
        return out.float().square().mean()

    if compiler == "mst-as-tiled":
        compiler = {"chunks": max(1, math.ceil(case.tokens / case.hidden))}
    fn = compile_with(compiler, loss_fn)

    def step() -> float:
        loss = fn(x)
        loss.backward()
        x.grad = None
        mlp.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---------------------------------------------------------------- shared


def compile_with(compiler, fn):
    """fn under eager, Inductor, Inductor with its auto-chunker, or mst (a dict: mst with options)."""

    if compiler == "eager":
        return fn
    if compiler == "inductor":
        return torch.compile(fn)
    if compiler == "inductor+auto_chunker":
        watch_auto_chunker()
        return torch.compile(fn)
    if compiler == "mst":
        return torch.compile(fn, backend="mst")
    if isinstance(compiler, dict):
        return torch.compile(fn, backend="mst", options=compiler)
    raise ValueError(f"unknown compiler {compiler!r}")


AUTO_CHUNKER_OUTCOMES: list[str] = []  # what Inductor's auto-chunker did with each joint graph


def watch_auto_chunker() -> None:
    """Turns Inductor's auto-chunker on and records, per joint graph, whether it chunked or why not.

    Inductor's compile caches are turned off: a cache hit skips the joint-graph passes.
    """
    import torch._inductor.compile_fx  # registers prims.fma, which auto_chunker needs at import
    from torch._inductor.fx_passes import auto_chunker

    torch._inductor.config.auto_chunker.enable = True
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    chunk = auto_chunker.chunk

    def recorded(gm):
        try:
            out = chunk(gm)
        except auto_chunker.CantChunk as why:
            AUTO_CHUNKER_OUTCOMES.append(f"auto-chunker did not chunk: {why}")
            raise
        if out is not gm:  # gm itself back: a graph without tangents, or one the chunker produced
            chunks = torch._inductor.config.auto_chunker.num_chunk or auto_chunker.decide_num_chunks(gm)
            AUTO_CHUNKER_OUTCOMES.append(f"auto-chunker chunked ({chunks} chunks)")
        return out

    auto_chunker.chunk = recorded  # joint_graph_passes looks it up on the module at each call


def child_main(case: Case) -> dict:
    step = lm_head_step(case) if case.case == "lm-head" else mlp_step(case)
    result = measure(step, case.steps, case.device)
    result["note"] = "; ".join(dict.fromkeys(AUTO_CHUNKER_OUTCOMES))
    return result


@dataclasses.dataclass
class Outcome:
    peer: str
    peak_mb: float | None = None
    step_s: float | None = None
    loss: float | None = None
    note: str = ""  # why there is no figure


def run_peer(case: Case, timeout: float) -> Outcome:
    try:
        result = run_script_in_child(os.path.abspath(__file__), dataclasses.asdict(case), timeout, case.peer)
    except (RuntimeError, OverBudget) as error:
        return Outcome(case.peer, note=f"failed: {last_error_line(str(error))}")
    return Outcome(case.peer, result["peak_mb"], result["step_s"], result["losses"][-1], result.get("note", ""))


def last_error_line(stderr: str) -> str:
    """The exception line of a traceback (the last line naming an Error), else the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    return (errors or lines or ["no output"])[-1][:300]


def run_case(args, case_name: str) -> list[Outcome]:
    peers = LM_HEAD_PEERS if case_name == "lm-head" else MLP_PEERS
    outcomes = []
    for peer in peers:
        if peer in CUDA_ONLY and not args.device.startswith("cuda"):
            outcomes.append(Outcome(peer, note="not measured (no CUDA)"))
            continue
        print(f"{case_name}: {peer} ...", file=sys.stderr, flush=True)
        case = Case(case_name, peer, args.tokens[case_name], args.hidden[case_name], args.vocab,
                    args.intermediate, args.steps, args.device, args.dtype)  # fmt: skip
        outcomes.append(run_peer(case, args.timeout))
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    base = next((o for o in outcomes if o.peer == "inductor" and o.peak_mb is not None), None)
    mst = next((o for o in outcomes if o.peer == "mst" and o.peak_mb is not None), None)
    rows = []
    for o in outcomes:
        if o.peak_mb is None:
            rows.append([o.peer, "-", "-", "-", "-", "-", "", o.note])
            continue
        rows.append([
            o.peer, f"{o.peak_mb:.0f}", _ratio(o.peak_mb, base and base.peak_mb),
            f"{o.step_s:.2f}", _ratio(o.step_s, base and base.step_s), f"{o.loss:.6f}", mst_loses_on(o, mst), o.note,
        ])  # fmt: skip
    headers = ["peer", "peak MB", "peak / inductor", "step s", "time / inductor", "loss", "mst loses on", "note"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def mst_loses_on(o: Outcome, mst: Outcome | None, margin: float = 0.05) -> str:
    """What this peer does better than mst, beyond a 5% margin: "memory", "time" or both."""
    if mst is None or o is mst or "mst" in o.peer:
        return ""
    better = [
        name
        for name, mine, theirs in (("memory", o.peak_mb, mst.peak_mb), ("time", o.step_s, mst.step_s))
        if mine < theirs * (1 - margin)
    ]
    return ", ".join(better)


def parse_args(argv=None) -> argparse.Namespace:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="lm-head,mlp", help="lm-head, mlp or both (comma-separated)")
    p.add_argument("--head-tokens", type=int, default=8192)
    p.add_argument("--head-hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mlp-tokens", type=int, default=16384)
    p.add_argument("--mlp-hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    p.add_argument("--timeout", type=float, default=900, help="seconds one peer may take")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)
    args.tokens = {"lm-head": args.head_tokens, "mlp": args.mlp_tokens}
    args.hidden = {"lm-head": args.head_hidden, "mlp": args.mlp_hidden}
    return args


def main(argv=None) -> int:

    args = parse_args(argv)
    results = {}
    for case_name in args.case.split(","):
        results[case_name] = run_case(args, case_name)
    print(f"torch={torch.__version__} device={args.device} machine={platform.machine()} "
          f"cores={len(os.sched_getaffinity(0))} dtype={args.dtype} steps={args.steps}")  # fmt: skip
    for case_name, outcomes in results.items():
        if case_name == "lm-head":
            print(f"\nLM head + loss: x {args.head_tokens}x{args.head_hidden}, W {args.vocab}x{args.head_hidden}")
        else:
            print(f"\nSwiGLU MLP: {args.mlp_tokens} tokens, d={args.mlp_hidden}, I={args.intermediate}")
        print(table(outcomes))
    if args.json:
        payload = {k: [dataclasses.asdict(o) for o in v] for k, v in results.items()}
        payload["args"] = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if base else "-"


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # the child: one peer, one process
        print(json.dumps(child_main(Case(**json.loads(sys.argv[1])))))
    else:
        sys.exit(main())
