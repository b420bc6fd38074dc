"""Sites are named as users name their modules: through PEFT's wrapper, torch.distributed's
checkpoint wrapper, a model handed to a compiled function, and a head tied to its embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mst_fx
from mst_fx.models import MLPStack, random_batch, tiny_llama

OPTIONS = {"chunk_size": 16, "compiler": "aot_eager"}


def locations() -> list[tuple[str, str]]:
    return [(s.kind, s.location) for r in mst_fx.compiled_reports() for s in r.sites]


def test_peft_model_sites_read_as_its_named_modules():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, intermediate=96, layers=1, vocab=96)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"]))
    names = {name.rpartition(".")[0] for name, _ in model.named_modules()}
    ids, labels = random_batch(96, 1, 64)
    torch.compile(model, backend=mst_fx.backend(**OPTIONS))(input_ids=ids, labels=labels).loss.backward()
    found = locations()
    assert ("mlp gated", "base_model.model.model.layers.0.mlp") in found, found
    assert ("lm_head", "base_model.model.lm_head") in found, found
    assert all("dict" not in location for _, location in found), found
    assert "base_model.model.model.layers.0" in names  # the paths are the model's own


def test_checkpoint_wrapped_blocks_are_named_without_the_wrapper():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = MLPStack(vocab=256, d=32, intermediate=128, layers=2)
    model.blocks = nn.ModuleList(checkpoint_wrapper(block) for block in model.blocks)
    torch.compile(model, backend=mst_fx.backend(**OPTIONS))(*random_batch(256, 1, 64)).backward()
    mlps = sorted(location for kind, location in locations() if kind.startswith("mlp"))
    assert mlps == ["blocks.0", "blocks.1"], locations()


class TiedLM(nn.Module):
    def __init__(self, vocab=256, d=32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.output = nn.Linear(d, vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight

    def forward(self, ids, labels):
        logits = self.output(torch.tanh(self.proj(self.tok_embeddings(ids))))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def test_a_tied_head_is_named_as_the_head_and_says_what_it_shares():
    torch.manual_seed(0)
    model = TiedLM()
    torch.compile(model, backend=mst_fx.backend(**OPTIONS))(*random_batch(256, 1, 64)).backward()
    assert ("lm_head", "output (tied to tok_embeddings)") in locations(), locations()


def test_a_model_handed_to_a_compiled_function_is_named_by_its_argument():
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, intermediate=96, layers=1, vocab=96)
    ids, labels = random_batch(96, 1, 64)
    mask = torch.ones_like(ids)  # transformers then builds the mask the attention pass reads

    def step(model, ids, labels):
        return model(ids, attention_mask=mask, labels=labels).loss

    torch.compile(step, backend=mst_fx.backend(**OPTIONS))(model, ids, labels).backward()
    found = dict((kind, location) for kind, location in locations())
    assert found["attention"] == "model.model.layers.0.self_attn", found
    assert found["mlp gated"] == "model.model.layers.0.mlp", found
