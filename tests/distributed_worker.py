"""One rank of the distributed tests (`tests/test_distributed.py` starts two, torchrun-style:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

    python tests/distributed_worker.py ddp|ddp_logits|fsdp2|fsdp2_moe OUT_DIR

Runs one training step of a tiny model under mst (gloo, CPU) and an eager reference of the same
step, and saves to OUT_DIR/<scenario>-rank<R>.pt what the test checks: losses, gradients (after the
all-reduce or reduce-scatter), the reports of the compiled graphs, the mst_fx log records and how
often each chunked op ran.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two ranks on a 2-core machine

import torch
import torch.distributed as dist

import mst_fx
from mst_fx.models import MLPStack, random_batch, tiny_llama

TOKENS = 64
OPTIONS = {"chunk_size": 16, "compiler": "aot_eager"}  # 4 chunks per site; no codegen, fast compile
MST_OPS = ("mst::mlp_forward", "mst::mlp_backward", "mst::linear_cross_entropy", "mst::experts_forward", "mst::experts_backward")


class _Records(logging.Handler):
    """Every record of the `mst_fx` loggers, INFO and above."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str]] = []

    def emit(self, record):
        self.records.append((record.levelname, record.getMessage()))


def main(scenario: str, out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # fail, don't hang, if a rank dies
    rank, world = dist.get_rank(), dist.get_world_size()
    records = _Records()
    logger = logging.getLogger("mst_fx")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        result = {"ddp": _ddp, "ddp_logits": _ddp_logits, "fsdp2": _fsdp2, "fsdp2_moe": _fsdp2_moe}[scenario](rank, world, records)
        torch.save(result, os.path.join(out_dir, f"{scenario}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp(rank: int, world: int, records: _Records) -> dict:
    """DDP with 1 MiB buckets (DDP's smallest: Dynamo's DDPOptimizer refuses a cap under its 1 MiB
    first bucket) and 1 MiB weights, so that a split of the graph as Dynamo traced it would cut
    every MLP: with Dynamo's default `optimize_ddp`; the same with mst seeing only the pieces; then
    with `optimize_ddp = False`."""

    def build():
        torch.manual_seed(0)
        return MLPStack(vocab=512, d=256, intermediate=1024, layers=2)

    def step(model, ids, labels):
        return model(ids, labels)

    default = _ddp_phase(build, step, records)
    pieces = _without_whole_graph(lambda: _ddp_phase(build, step, records))
    torch._dynamo.config.optimize_ddp = False
    return {"default": default, "pieces": pieces, "optimize_ddp_false": _ddp_phase(build, step, records)}


def _without_whole_graph(run):
    """`run()` with DDP's optimizer as torch ships it, handing mst only the pieces (what a torch
    release that moved `DDPOptimizer.compile_fn` would do)."""
    from torch._dynamo.backends.distributed import DDPOptimizer

    wrapped = DDPOptimizer.compile_fn
    DDPOptimizer.compile_fn = wrapped._mst_original
    try:
        return run()
    finally:
        DDPOptimizer.compile_fn = wrapped


def _ddp_phase(build, step, records: _Records) -> dict:
    """DDP with 1 MiB buckets around the model, compiled, one step of `step` against eager."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return _phase(build, step, records, lambda model: DDP(model, bucket_cap_mb=1))

def _ddp_logits(rank: int, world: int, records: _Records) -> dict:
    """A Hugging Face causal LM in train mode, returning its logits with its loss as HF models do,
    under DDP with Dynamo's default graph optimizer and 1 MiB buckets. The optimizer runs each piece
    of the split graph on fake tensors while it compiles them: what mst puts in place of dropped or
    deferred logits must hold there too."""

    def build():
        torch.manual_seed(0)
        return tiny_llama(hidden=128, intermediate=1024, layers=2, vocab=2048, heads=2).train()

    def step(model, ids, labels):
        return model(ids, labels=labels, use_cache=False).loss

    return {"default": _ddp_phase(build, step, records)}


def _fsdp2(rank: int, world: int, records: _Records) -> dict:
    """FSDP2 on each decoder layer and the root of a tiny HF Llama, then torch.compile of the model;
    called as HF's own training step calls it (the cache on), and with `use_cache=False`."""
    from torch.distributed.fsdp import fully_shard

    def build():
        torch.manual_seed(0)
        return tiny_llama(hidden=32, intermediate=128, layers=2, vocab=512, heads=2)

    def phase(**call_kwargs):
        def step(model, ids, labels):
            return model(ids, labels=labels, **call_kwargs).loss

        return _fsdp2_phase(build, step, records)

    def outside(model, ids, labels):  # the loss computed outside the model, on its returned logits
        logits = model(ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    return {"cache": phase(), "no_cache": phase(use_cache=False), "loss_outside": _fsdp2_phase(build, outside, records)}


def _fsdp2_moe(rank: int, world: int, records: _Records) -> dict:
    """FSDP2 on each decoder layer and the root of a tiny HF Qwen3-MoE (grouped_mm experts)."""

    def build():
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16, vocab_size=512,
            attn_implementation="sdpa",
        )  # fmt: skip
        torch.manual_seed(0)
        return Qwen3MoeForCausalLM(config)

    def step(model, ids, labels):
        return model(ids, labels=labels, use_cache=False).loss

    return {"moe": _fsdp2_phase(build, step, records)}


def _fsdp2_phase(build, step, records: _Records) -> dict:
    """FSDP2 on each decoder layer and the root, compiled, one step of `step` against eager."""
    from torch.distributed.fsdp import fully_shard

    def shard(model):
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)

    result = _phase(build, step, records, shard)
    result["grads"] = {name: grad.full_tensor() for name, grad in result["grads"].items()}  # DTensor shards
    return result


def _phase(build, step, records: _Records, wrap) -> dict:
    """`wrap(model)` compiled with mst, one step of `step` on this rank's batch, against eager."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch._dynamo.reset()
    mst_fx.clear_reports()
    records.records.clear()
    model = build()
    compiled = torch.compile(wrap(model), backend=mst_fx.backend(**OPTIONS))
    result = _compiled_step(compiled, model, step, _batch(rank))
    result.update(_reference(build, step, rank, world), logs=list(records.records))
    return result

def _batch(rank: int):
    return random_batch(512, 1, TOKENS, seed=rank)  # each rank its own data


def _compiled_step(compiled, model, step, batch) -> dict:
    """One forward and backward; what the reports say and how often each chunked op ran.

    The step runs twice, gradients cleared in between: the first compiles (and its tracing calls the
    ops too), the second, profiled, is what a training step runs."""
    from torch.profiler import ProfilerActivity, profile

    step(compiled, *batch).backward()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = step(compiled, *batch)
        loss.backward()
    calls = {e.key: e.count for e in prof.key_averages() if e.key in MST_OPS}
    report = mst_fx.last_report()
    return {
        "loss": loss.detach(),
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "reports": [r.to_dict() for r in mst_fx.compiled_reports()],
        "counted_sites": [(s.kind, s.location, s.rewritten) for s in report.counted_sites],
        "op_calls": calls,
    }


def _reference(build, step, rank: int, world: int) -> dict:
    """Eager, one process: this rank's loss, and the gradients averaged over every rank's batch,
    which is what DDP's all-reduce and FSDP's reduce-scatter produce."""
    model = build()
    loss = None
    for other in range(world):
        other_loss = step(model, *_batch(other))
        (other_loss / world).backward()
        if other == rank:
            loss = other_loss.detach()
    return {"expected_loss": loss, "expected_grads": {n: p.grad for n, p in model.named_parameters()}}


if __name__ == "__main__":
    main(*sys.argv[1:3])
