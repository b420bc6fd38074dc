"""One rank of a Ulysses sequence-parallel training step under the mst backend.

Started twice by `tests/test_sequence_parallel.py` (ranks 0 and 1 of a gloo group on 127.0.0.1):

    python tests/sequence_parallel_worker.py RANK WORLD PORT OUT_DIR ENGINE [ENGINE ...]

Each ENGINE is one attention engine that all-to-alls between "this rank's tokens, all heads" and
"all tokens, this rank's heads" around causal SDPA:

- `funcol`: our own, registered with `transformers.AttentionInterface`, its all-to-all done with
  `torch.distributed._functional_collectives.all_to_all_single_autograd` (Dynamo traces it into the
  graph). The layout is DeepSpeed-Ulysses's (`deepspeed.sequence.layer.DistributedAttention` and
  ALST's `UlyssesSPAttentionHF`), which is also what accelerate's `ParallelismConfig(sp_size=...)`
  runs.
- `deepspeed`: DeepSpeed's own `UlyssesSPAttentionHF.register_with_transformers` (only if
  deepspeed imports).

For each engine the worker builds the same tiny HF Llama (same seed), computes the full-sequence
loss and gradients eagerly on the whole sequence (no sharding, plain SDPA), then runs the model
compiled with mst on this rank's contiguous shard of the sequence: labels are shifted on the full
sequence first, then cut, and each rank's loss is its shard's summed cross-entropy divided by the
global count of labels that are not ignored (HF's `num_items_in_batch`), so the ranks' losses add
up to the full mean loss and their gradients add up to the full gradients. Writes
`OUT_DIR/<engine>.rank<R>.pt` for the test to check; the test, not this script, asserts.
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.distributed as dist

SEED = 0
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 512, 64, 176, 2, 4
TOKENS = 128  # the full sequence; each of the 2 ranks holds 64
CHUNK_SIZE = 16  # so each rank's MLPs and head run in 4 chunks
IGNORE_EVERY = 7  # every 7th label is -100, so that the global count of labels matters

ATTENTION_NAME = "mst_test_ulysses"


# --- Ulysses attention on functional collectives ------------------------------------------------


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange equal slices of dim 0 with every rank (slice r goes to rank r), differentiably."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    # Traced, this is `_c10d_functional.all_to_all_single` + `wait_tensor` in the graph (no break);
    # in eager, a tensor that waits for the collective when first used.
    return all_to_all_single_autograd(x.contiguous(), None, None, group)


def sequence_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[B, H, S, D] with S this rank's tokens -> [B, H/P, P*S, D], all tokens of this rank's heads."""
    b, h, s, d = x.shape
    x = x.reshape(b, world, h // world, s, d).permute(1, 0, 2, 3, 4)  # [P (head group), B, H/P, S, D]
    x = _all_to_all(x, group)  # now [P (sequence shard), B, H/P, S, D]
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * s, d)


def heads_to_sequence(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[B, H/P, P*S, D] -> [B, H, S, D]: the inverse of `sequence_to_heads`."""
    b, hp, n, d = x.shape
    x = x.reshape(b, hp, world, n // world, d).permute(2, 0, 1, 3, 4)  # [P (sequence shard), B, H/P, S, D]
    x = _all_to_all(x, group)  # now [P (head group), B, H/P, S, D]
    return x.permute(1, 0, 2, 3, 4).reshape(b, world * hp, n // world, d)


def ulysses_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF attention function (signature of `sdpa_attention_forward`): inputs [B, H, S_local, D],
    output [B, S_local, H, D]. The mask HF built for the local shard would be wrong for the
    gathered sequence, so it is not used: the full sequence is causal (no padding, no packing)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    group, world = dist.group.WORLD, dist.get_world_size()
    if module.config.num_attention_heads % world or module.config.num_key_value_heads % world:
        raise ValueError(f"Ulysses needs the head counts divisible by the {world} ranks")
    q, k, v = (sequence_to_heads(t, group, world) for t in (query, key, value))
    out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)
    out = heads_to_sequence(out.transpose(1, 2), group, world)  # sdpa_attention_forward gives [B, N, H/P, D]
    return out.transpose(1, 2).contiguous(), None


# --- the step -------------------------------------------------------------------------------------


def build_model():
    from mst_fx.models import tiny_llama

    torch.manual_seed(SEED)
    return tiny_llama(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS, vocab=VOCAB, heads=HEADS)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM shift, done once on the full sequence: position t predicts token t + 1."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


def run_engine(engine: str, rank: int, world: int) -> dict:
    import mst_fx
    from mst_fx.models import random_batch

    model = build_model()
    ids, labels = random_batch(VOCAB, 1, TOKENS, ignore_every=IGNORE_EVERY, seed=SEED)

    # The reference: the same weights, eager, the whole sequence on this one process.
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    expected = reference(ids, labels=labels, use_cache=False).loss
    expected.backward()

    shard = TOKENS // world
    cut = slice(rank * shard, (rank + 1) * shard)
    targets = shifted_labels(labels)
    num_items = (targets != -100).sum()  # global, so that the per-rank losses add up to the mean
    positions = torch.arange(TOKENS).unsqueeze(0)
    shard_inputs = dict(
        position_ids=positions[:, cut], labels=targets[:, cut], shift_labels=targets[:, cut],
        num_items_in_batch=num_items, use_cache=False,
    )  # fmt: skip

    # The control: the same shards, eager, with plain SDPA, each rank attending only to its own
    # tokens. Its summed loss and gradients must differ from the full ones, or matching them would
    # prove nothing.
    control = copy.deepcopy(model)
    control.set_attn_implementation("sdpa")
    shard_only = control(ids[:, cut], **shard_inputs).loss
    shard_only.backward()
    shard_only = shard_only.detach()
    dist.all_reduce(shard_only)
    shard_only_grads = {}
    for name, p in control.named_parameters():
        dist.all_reduce(p.grad)
        shard_only_grads[name] = p.grad

    if engine == "funcol":
        model.set_attn_implementation(ATTENTION_NAME)
    elif engine == "deepspeed":
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        # Replaces ALL_ATTENTION_FUNCTIONS["sdpa"] in this process with DeepSpeed's Ulysses wrapper
        # (the reference above has already run); the model keeps asking for "sdpa".
        UlyssesSPAttentionHF.register_with_transformers(
            model, core_attn_implementation="sdpa", sequence_parallel_size=world, micro_batch_size=1,
            seq_length=TOKENS, seq_length_is_variable=False,
        )  # fmt: skip
    else:
        raise ValueError(engine)

    mst_fx.clear_reports()
    torch._dynamo.reset()
    mst = mst_fx.backend(chunk_size=CHUNK_SIZE, compiler="aot_eager")
    traced_ops: list[str] = []  # what Dynamo handed to mst: the collectives must be in the graph

    def mst_seeing_graph(gm, example_inputs, **kwargs):
        traced_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return mst(gm, example_inputs, **kwargs)

    compiled = torch.compile(model, backend=mst_seeing_graph)
    start = time.perf_counter()
    out = compiled(ids[:, cut], **shard_inputs)
    local = out.loss
    local.backward()
    seconds = time.perf_counter() - start

    combined = local.detach().clone()
    dist.all_reduce(combined)  # sum of the shards' sums / global count = the full mean
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)  # each rank's gradient covers only its tokens' terms
        grads[name] = g

    sites = [
        {"kind": s.kind, "location": s.location, "rewritten": s.rewritten, "reason": s.reason,
         "chunks": s.chunks, "tokens": s.tokens}
        for r in mst_fx.compiled_reports() for s in r.sites
    ]  # fmt: skip
    return {
        "engine": engine,
        "rank": rank,
        "local_loss": local.detach(),
        "combined_loss": combined,
        "expected_loss": expected.detach(),
        "shard_only_attention_loss": shard_only,
        "shard_only_attention_grads": shard_only_grads,
        "grads": grads,
        "expected_grads": {n: p.grad.detach().clone() for n, p in reference.named_parameters()},
        "missing_grads": [n for n, p in model.named_parameters() if p.grad is None],
        "local_grad_is_partial": any(
            not torch.allclose(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None
        ),
        "logits_shape": tuple(out.logits.shape),
        "sites": sites,
        "graphs": len(mst_fx.compiled_reports()),
        "all_to_alls_traced": sum("all_to_all" in op for op in traced_ops),
        "traced_ops": sorted(set(traced_ops)),
        "step_seconds": seconds,
    }


def main(argv: list[str]) -> None:
    rank, world, port, out_dir = int(argv[0]), int(argv[1]), argv[2], argv[3]
    engines = argv[4:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)

    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ulysses_attention)

    if "deepspeed" in engines:
        import deepspeed
        import deepspeed.comm.torch

        # deepspeed.comm's CPU backend JIT-builds a shared-memory all-reduce kernel (C++, ninja,
        # ~50 s on 2 cores) when it starts; this step never uses it (its all-reduces are torch's).
        # (`deepspeed.comm.torch` the attribute is the torch package, hence sys.modules.)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        # Initialises torch.distributed on gloo (DeepSpeed's CPU accelerator) through deepspeed.comm.
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for engine in engines:  # "deepspeed", when given, goes last: it replaces the "sdpa" attention
            result = run_engine(engine, rank, world)
            torch.save(result, os.path.join(out_dir, f"{engine}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
