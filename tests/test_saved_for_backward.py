"""The rewrite shrinks what the partitioned forward graph saves for backward.

Measured on Inductor's partitioned forward graph (bytes of its outputs), so it is exact and
repeatable. Written as visible per-chunk recompute, AOTAutograd's CSE merged each recomputed
matmul with its forward twin and the partitioner saved every chunk's intermediates anyway (the
recompute trap of shared/NOTES.md section 1); a chunked site is now one opaque op, so neither CSE
nor the partitioner can reach into it, and this test keeps it that way.
"""

from __future__ import annotations

import torch
from torch import fx

import mst_fx
from mst_fx.dynamo_backend import hand_off
from mst_fx.models import MLPStack, random_batch
from mst_fx.tracing.restored_attributes import mark_mst_backend


def dynamo_graph(model, *inputs):
    captured = []

    @mark_mst_backend  # as the mst backend traces: restored attributes stay in checkpointed layers
    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=capture)(*inputs)
    (graph,) = captured
    return graph


def forward_output_bytes(gm, example_inputs, compiler: str = "inductor") -> int:
    """Bytes the forward graph returns: the loss plus everything saved for backward."""
    seen = []

    def observe(forward: fx.GraphModule, is_backward: bool):
        if is_backward:
            return
        (output,) = [n for n in forward.graph.nodes if n.op == "output"]
        values = [a.meta.get("val") for a in output.args[0] if isinstance(a, fx.Node)]
        seen.append(sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)))

    hand_off(gm, example_inputs, compiler, observe=observe)
    return seen[0]


def test_rewrite_saves_a_fraction_of_what_the_original_saves():
    torch.manual_seed(0)
    model = MLPStack(vocab=4000, d=64, intermediate=256, layers=2)
    gm, inputs = dynamo_graph(model, *random_batch(4000, 1, 1024))
    original = forward_output_bytes(gm, inputs)

    rewritten, report = mst_fx.rewrite(gm, inputs, mst_fx.MstOptions(chunks=8))
    assert len(report.rewritten()) == 3
    chunked = forward_output_bytes(rewritten, inputs)

    # Original: logits (N x V) and per MLP ~4 N x I tensors. Rewritten: the MLP inputs (N x d), the
    # head's gradients (N x d + V x d) and small things.
    n, d, i, v = 1024, 64, 256, 4000
    assert original > 4 * (n * v + 2 * 3 * n * i)
    assert chunked < 4 * (2 * n * d + (n + v) * d + 2 * n * d) + 64 * 1024
    assert chunked < 0.25 * original
