"""PEFT LoRA on the MLP's linears: the MLP is still chunked, with the same loss and gradients.

A linear with an adapter is `base(x) + B(A(dropout(x))) * s` (passes/adapters.py). Parity covers
the adapters' gradients and the frozen base's (none); a bf16 base with PEFT's fp32 adapters is
compared within bf16 tolerance; a random adapter dropout is refused with its reason.
"""

from __future__ import annotations

import pytest
import torch

import mst_fx
from mst_fx.models import random_batch, tiny_gpt2, tiny_llama

from conftest import assert_parity, rewritten_kinds, skipped_reasons

peft = pytest.importorskip("peft")

VOCAB = 96
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


def with_lora(model, targets, dropout=0.0, **config):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, **config)
    model = peft.get_peft_model(model, lora)
    for name, p in model.named_parameters():  # B starts at zero: make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def llama(dtype=torch.float32):
    torch.manual_seed(0)
    return tiny_llama(hidden=32, intermediate=96, layers=2, vocab=VOCAB).to(dtype)


def hf_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


@pytest.mark.parametrize(
    "targets, kinds",
    [
        (LLAMA_MLP, {"mlp gated": 2, "lm_head": 1}),
        (["up_proj"], {"mlp gated": 2, "lm_head": 1}),  # an adapter on one linear only
        (["q_proj", "v_proj"], {"mlp gated": 2, "lm_head": 1}),  # attention only: MLP untouched
    ],
    ids=["all-mlp-linears", "up-only", "attention-only"],
)
def test_lora_mlp_parity(targets, kinds):
    model = with_lora(llama(), targets)
    assert_parity(model, hf_loss, random_batch(VOCAB, 2, 40, ignore_every=7), chunk_size=16)
    assert rewritten_kinds() == kinds
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_on_gpt2_conv1d_mlp():
    """GPT-2's c_fc/c_proj are Conv1D (weights stored in x out); PEFT wraps them with fan_in_fan_out."""
    torch.manual_seed(0)
    model = with_lora(tiny_gpt2(hidden=32, layers=2, vocab=VOCAB), ["c_fc", "mlp.c_proj"], fan_in_fan_out=True)
    assert_parity(model, hf_loss, random_batch(VOCAB, 2, 40), chunk_size=16)
    assert rewritten_kinds()["mlp plain"] == 2


def test_bf16_base_with_fp32_adapters():
    """PEFT keeps the adapters in fp32 on a bf16 base: x is cast up for A and B, the sum cast back."""
    model = with_lora(llama(torch.bfloat16), LLAMA_MLP)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert_parity(model, hf_loss, random_batch(VOCAB, 2, 40), rtol=2e-2, scaled_tol=2e-2, chunk_size=16)
    assert rewritten_kinds()["mlp gated"] == 2


def test_adapter_dropout_is_refused_with_its_reason():
    model = with_lora(llama(), LLAMA_MLP, dropout=0.1)
    ids, labels = random_batch(VOCAB, 1, 40)
    compiled = torch.compile(model, backend=mst_fx.backend(chunk_size=16, compiler="aot_eager"))
    hf_loss(compiled, ids, labels).backward()
    assert "mlp gated" not in rewritten_kinds()
    reasons = [r for r in skipped_reasons() if "LoRA adapter's dropout" in r]
    assert len(reasons) == 2, skipped_reasons()


@pytest.mark.parametrize("loss_where", ["in the graph", "outside"])
def test_lora_on_the_lm_head(loss_where):
    """A LoRA adapter on lm_head: the head is still chunked (loss in the graph) or deferred (loss
    outside), and the adapter's gradients equal eager's."""
    model = with_lora(llama(), ["lm_head", *LLAMA_MLP])
    ids, labels = random_batch(VOCAB, 2, 40, ignore_every=7)

    def outside(m, ids, labels):
        logits = m(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1))

    assert_parity(model, hf_loss if loss_where == "in the graph" else outside, (ids, labels), chunk_size=16)
    assert rewritten_kinds() == {"mlp gated": 2, "lm_head": 1}, skipped_reasons()
    head = next(s for r in mst_fx.compiled_reports() for s in r.rewritten("lm_head"))
    assert head.loss_outside == (True if loss_where == "outside" else None)
