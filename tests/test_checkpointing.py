"""Activation checkpointing: the MLP inside each checkpointed layer's body is rewritten too.

Dynamo puts a checkpointed call in a `tag_activation_checkpoint` higher-order op whose body is a
child graph; the backward recomputes that body, and without the rewrite inside it the recompute
holds the layer's whole N x I intermediates again.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_parity, loss_of
from test_saved_for_backward import dynamo_graph
from torch import fx

import mst_fx
from mst_fx.runtime.chunked_ops import ChunkedMLP
from mst_fx.dynamo_backend import hand_off
from mst_fx.models import MLPStack, enable_checkpointing, random_batch, tiny_llama

VOCAB = 500


def checkpointed_llama(layers=2):
    model = tiny_llama(hidden=32, intermediate=96, layers=layers, vocab=VOCAB)
    enable_checkpointing(model)
    return model


@pytest.mark.parametrize(
    "build, mlp_paths, masks",
    [
        # HF with checkpointing runs with use_cache=False: transformers builds an N x N mask.
        (lambda: checkpointed_llama(), ["layers.0.mlp", "layers.1.mlp"], 1),
        (lambda: MLPStack(VOCAB, 32, 96, layers=2, checkpointing=True), ["blocks.0", "blocks.1"], 0),
    ],
    ids=["hf-gradient-checkpointing", "torch-utils-checkpoint"],
)
def test_checkpointed_models_match_eager_and_are_rewritten(build, mlp_paths, masks):
    torch.manual_seed(0)
    inputs = random_batch(VOCAB, batch=2, tokens=37, ignore_every=7)
    kinds = assert_parity(build(), loss_of, inputs, chunks=4)
    assert kinds == {"mlp gated": 2, "lm_head": 1, **({"attention": masks} if masks else {})}
    locations = [s.location for r in mst_fx.compiled_reports() for s in r.rewritten("mlp")]
    assert len(locations) == 2 and all(loc.endswith(path) for loc, path in zip(locations, mlp_paths))


def test_rewrite_goes_into_the_checkpoint_body_and_leaves_the_original_alone():
    model = MLPStack(VOCAB, 32, 96, layers=1, checkpointing=True)
    gm, inputs = dynamo_graph(model, *random_batch(VOCAB, 1, 64))
    assert _checkpoint_calls(gm) == 1

    rewritten, report = mst_fx.rewrite(gm, inputs, mst_fx.MstOptions(chunks=4, lm_head=False))
    assert [s.kind for s in report.rewritten()] == ["mlp gated"]
    assert _checkpoint_calls(rewritten) == 1  # still checkpointed: the rewrite is inside the body
    assert _chunked_mlps(rewritten) == 1
    assert _chunked_mlps(gm) == 0  # the original (the fallback) keeps its own body


def test_backward_recompute_holds_one_chunk_of_the_mlp_at_a_time():
    """Largest tensor in Inductor's backward graph: N x I unrewritten, N/M x I after."""
    n, d, i, chunks = 1024, 64, 512, 8
    model = MLPStack(64, d, i, layers=2, checkpointing=True)
    gm, inputs = dynamo_graph(model, *random_batch(64, 1, n))
    original = _largest_backward_tensor(gm, inputs)
    rewritten, _ = mst_fx.rewrite(gm, inputs, mst_fx.MstOptions(chunks=chunks, lm_head=False))
    chunked = _largest_backward_tensor(rewritten, inputs)
    assert original >= n * i
    # The chunks' N/M x I tensors are inside the chunked op, not in the graph at all.
    assert chunked <= max(n * d, d * i)


def _largest_backward_tensor(gm, inputs) -> int:
    sizes = []

    def observe(graph_module: fx.GraphModule, is_backward: bool):
        if is_backward:
            values = [n.meta.get("val") for n in graph_module.graph.nodes]
            sizes.append(max(v.numel() for v in values if isinstance(v, torch.Tensor)))

    compiled = hand_off(gm, inputs, "inductor", observe=observe)
    compiled(*inputs)[0].backward()  # the backward graph is compiled on first use
    return sizes[0]


def _checkpoint_calls(gm: fx.GraphModule) -> int:
    checkpoint = torch.ops.higher_order.tag_activation_checkpoint
    return sum(n.op == "call_function" and n.target is checkpoint for n in gm.graph.nodes)


def _chunked_mlps(gm: fx.GraphModule) -> int:
    return sum(isinstance(m, ChunkedMLP) for m in gm.modules())
