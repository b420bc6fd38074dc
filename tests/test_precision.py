"""bf16 models and fp32 models under autocast: the rewrite keeps every op's dtype and matches eager
within bf16's resolution.

Tolerance: bf16 keeps 8 significant bits (a relative step of 2^-8 = 0.4%). Chunking sums a weight's
gradient over chunks, in fp32, where eager's matmul sums it over all tokens at once, so the two
round differently; measured gaps are under 1% of a gradient's largest element, and 2% is allowed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_parity, loss_of, rewritten_kinds

import mst_fx
from mst_fx.runtime import chunk_bodies
from mst_fx.models import MLPStack, random_batch, tiny_llama

VOCAB = 500
BF16_TOL = 2e-2
MODELS = {
    "swiglu-stack": lambda: MLPStack(VOCAB, 32, 96, layers=2),
    "hf-llama": lambda: tiny_llama(hidden=32, intermediate=96, layers=2, vocab=VOCAB),
}


@pytest.mark.parametrize("accumulation", ["fp32", "param"])
@pytest.mark.parametrize("name", MODELS)
def test_bf16_model_matches_eager(name, accumulation):
    torch.manual_seed(0)
    model = MODELS[name]().to(torch.bfloat16)
    inputs = random_batch(VOCAB, 2, 37, ignore_every=7)
    kinds = assert_parity(model, loss_of, inputs, rtol=1e-2, scaled_tol=BF16_TOL, chunks=4,
                          grad_accumulation=accumulation)  # fmt: skip
    assert kinds == {"mlp gated": 2, "lm_head": 1}


@pytest.mark.parametrize("name", MODELS)
def test_fp32_model_under_autocast_matches_eager(name):
    torch.manual_seed(0)
    inputs = random_batch(VOCAB, 2, 37, ignore_every=7)
    kinds = assert_parity(MODELS[name](), loss_of, inputs, rtol=1e-2, scaled_tol=BF16_TOL,
                          autocast=torch.bfloat16, chunks=4)  # fmt: skip
    assert kinds == {"mlp gated": 2, "lm_head": 1}


def test_backward_recompute_runs_in_bf16_after_autocast_exits(monkeypatch):
    """Backward runs after autocast has exited; the MLP's recompute must still run in bf16, as the
    forward did. The chunk bodies are traced with the forward's autocast state baked in, so every
    matmul of the MLP's gradient body is a bf16 one (the compiler is "eager": the bodies are then
    the traced ATen graphs, which can be read)."""
    monkeypatch.setattr(chunk_bodies, "_BODIES", {})
    torch.manual_seed(0)
    model = torch.compile(MODELS["swiglu-stack"](), backend=mst_fx.backend(chunks=4, compiler="eager"))
    ids, labels = random_batch(VOCAB, 2, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels)
    assert loss.dtype == torch.float32  # cross_entropy autocasts to fp32
    loss.backward()
    assert rewritten_kinds() == {"mlp gated": 2, "lm_head": 1}
    gradient_bodies = {key: fn for key, (fn, _) in chunk_bodies._BODIES.items() if key[0][1] == "gradient"}
    assert {key[0][0].split("-")[0] for key in gradient_bodies} == {"ChunkedMLP", "ChunkedLinearCrossEntropy"}
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    dtypes = {n.meta["val"].dtype for g in gradient_bodies.values() for n in g.graph.nodes if n.target in matmuls}
    assert dtypes == {torch.bfloat16}


def test_fp16_loss_scale_reaches_the_lm_head_gradients_in_fp32():
    """GradScaler's default scale, 65536, is inf in fp16. The LM head's gradients, computed in its
    forward, are scaled by the loss's gradient in fp32, so they come out finite and equal to eager's."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, intermediate=96, layers=1, vocab=VOCAB).to(torch.float16)
    inputs = random_batch(VOCAB, 2, 37, ignore_every=7)

    def scaled_loss(m, ids, labels):
        return m(ids, labels=labels).loss * 65536.0  # HF upcasts the logits: the loss is fp32

    kinds = assert_parity(model, scaled_loss, inputs, rtol=1e-2, scaled_tol=BF16_TOL, chunks=4)
    assert kinds["lm_head"] == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
