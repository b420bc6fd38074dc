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
from torch.utils._python_dispatch import TorchDispatchMode

import mst_fx
from mst_fx.models import MLPStack, random_batch, tiny_llama

VOCAB = 500
BF16_TOL = 2e-2
MODELS = {
    "swiglu-stack": lambda: MLPStack(VOCAB, 32, 96, layers=2),
    "hf-llama": lambda: tiny_llama(hidden=32, intermediate=96, layers=2, vocab=VOCAB),
}


@pytest.mark.parametrize("name", MODELS)
def test_bf16_model_matches_eager(name):
    torch.manual_seed(0)
    model = MODELS[name]().to(torch.bfloat16)
    inputs = random_batch(VOCAB, 2, 37, ignore_every=7)
    kinds = assert_parity(model, loss_of, inputs, rtol=1e-2, scaled_tol=BF16_TOL, chunks=4)
    assert kinds == {"mlp gated": 2, "lm_head": 1}


@pytest.mark.parametrize("name", MODELS)
def test_fp32_model_under_autocast_matches_eager(name):
    torch.manual_seed(0)
    inputs = random_batch(VOCAB, 2, 37, ignore_every=7)
    kinds = assert_parity(MODELS[name](), loss_of, inputs, rtol=1e-2, scaled_tol=BF16_TOL,
                          autocast=torch.bfloat16, chunks=4)  # fmt: skip
    assert kinds == {"mlp gated": 2, "lm_head": 1}


class MatmulDtypes(TorchDispatchMode):
    """The output dtypes of every matmul run under it."""

    MATMULS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MATMULS:
            self.dtypes.add(out.dtype)
        return out


@pytest.mark.parametrize("backend", ["eager", "mst"])
def test_backward_matmuls_run_in_bf16_after_autocast_exits(backend):
    """Backward runs after autocast has exited; the MLP's recompute must still run in bf16, as the
    forward did. The compiler is "eager" so that the chunked ops run as real autograd, and only the
    backward is watched (Dynamo does not compile under a dispatch mode)."""
    torch.manual_seed(0)
    model = MODELS["swiglu-stack"]()
    if backend == "mst":
        model = torch.compile(model, backend=mst_fx.backend(chunks=4, compiler="eager"))
    ids, labels = random_batch(VOCAB, 2, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels)
    assert loss.dtype == torch.float32  # cross_entropy autocasts to fp32
    with MatmulDtypes() as seen:
        loss.backward()
    assert seen.dtypes == {torch.bfloat16}
    assert backend == "eager" or rewritten_kinds() == {"mlp gated": 2, "lm_head": 1}
