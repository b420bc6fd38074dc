"""The attention pass on causal masks: SDPA's is_causal, padding decided at run time.

Parity is against eager for batches without an attention_mask, with an all-ones one, right- and
left-padded, batch 2, with and without activation checkpointing: the loss and every gradient. The
structure test checks that no N x N tensor is left in the rewritten graph; the others that masks
the pass can't read are left alone with their reason. Windows, chunks and packed documents:
test_attention_masks.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mst_fx
from mst_fx.models import enable_checkpointing, random_batch, tiny_llama
from mst_fx.tracing.restored_attributes import mark_mst_backend

from conftest import assert_parity, rewritten_kinds, skipped_reasons

VOCAB, TOKENS = 96, 24


def llama(checkpointing=False, **overrides):
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, intermediate=96, layers=2, vocab=VOCAB, heads=2, **overrides)
    if checkpointing:
        enable_checkpointing(model)
    return model


def padding(kind: str, ids: torch.Tensor) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones_like(ids)
    if kind == "right":
        mask[0, -7:] = 0  # the first sequence ends early
    elif kind == "left":
        mask[1, :5] = 0  # the second starts late
    return mask


def loss_with_mask(model, ids, labels, mask):
    return model(ids, labels=labels, attention_mask=mask).loss


def attention_sites():
    return [s for r in mst_fx.compiled_reports() for s in r.sites if s.kind == "attention"]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["flat", "checkpointed"])
@pytest.mark.parametrize("kind", ["none", "all-ones", "right", "left"])
def test_parity(kind, checkpointing):
    ids, labels = random_batch(VOCAB, 2, TOKENS, ignore_every=5)
    labels = labels.masked_fill(padding(kind, ids) == 0, -100) if kind in ("right", "left") else labels
    assert_parity(llama(checkpointing), loss_with_mask, (ids, labels, padding(kind, ids)), chunk_size=8)
    sites = attention_sites()
    assert all(s.rewritten for s in sites), skipped_reasons()
    if kind != "none":  # transformers builds a mask whenever an attention_mask is given
        assert [s.calls for s in sites] == [2]


def test_parity_under_inductor_padded():
    ids, labels = random_batch(VOCAB, 2, TOKENS)
    assert_parity(llama(), loss_with_mask, (ids, labels, padding("left", ids)), compiler="inductor", chunk_size=8)
    assert [s.rewritten for s in attention_sites()] == [True]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["flat", "checkpointed"])
def test_no_n_by_n_tensor_is_left_in_the_graph(checkpointing):
    """With an all-ones attention_mask, nothing in the rewritten graph (or a checkpoint body) is
    N x N, and no SDPA takes a mask: the mask is not built, nor passed into a checkpoint."""
    ids, labels = random_batch(VOCAB, 2, TOKENS)
    graphs = []

    @mark_mst_backend  # as the mst backend traces: restored attributes stay in checkpointed layers
    def capture(gm, example_inputs):
        rewritten, _ = mst_fx.rewrite(gm, example_inputs, mst_fx.MstOptions(chunk_size=8))
        graphs.append(rewritten)
        return rewritten.forward

    model = llama(checkpointing)
    torch.compile(model, backend=capture)(ids, labels=labels, attention_mask=torch.ones_like(ids))
    (graph,) = graphs
    nodes = [n for module in graph.modules() if isinstance(module, torch.fx.GraphModule) for n in module.graph.nodes]
    assert not [n.name for n in nodes if _is_square(n)]
    assert not [n for n in nodes if "scaled_dot_product" in str(n.target) and n.kwargs.get("attn_mask") is not None]
    assert sum("masked_attention" in str(n.target) for n in nodes) == 2  # one per layer


def _is_square(node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == value.shape[-2] == TOKENS


def test_attention_dropout_with_padding_is_refused():
    ids, labels = random_batch(VOCAB, 2, TOKENS)
    report = mst_fx.explain(llama(attention_dropout=0.1), ids, example_kwargs={"labels": labels,
                            "attention_mask": torch.ones_like(ids)}, chunk_size=8)  # fmt: skip
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert not site.rewritten and "attention dropout" in site.reason


class GivenMask(nn.Module):
    """Attention with a mask handed in as a tensor: nothing says what it holds."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum()


def test_a_mask_given_as_a_tensor_is_left_alone():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 12, 16), torch.rand(2, 1, 12, 12) > 0.3
    mask[..., 0] = True  # no row fully masked
    assert_parity(GivenMask(), lambda m, x, mask: m(x, mask), (x, mask))
    (site,) = attention_sites()
    assert not site.rewritten and "not built from index comparisons" in site.reason


def test_the_option_switches_the_pass_off():
    ids, labels = random_batch(VOCAB, 2, TOKENS)
    assert_parity(llama(), loss_with_mask, (ids, labels, torch.ones_like(ids)), chunk_size=8, attention=False)
    assert not attention_sites() and "attention" not in rewritten_kinds()


class VmapMaskAttention(nn.Module):
    """Builds its mask as transformers 4.5x does: the mask functions mapped over (batch, head, q, kv)
    with nested torch.vmap, the padding read with aten.index, then sliced per call."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, padding):
        batch, tokens = padding.shape

        def mask_function(b, h, q, kv):
            causal = x.new_ones((), dtype=torch.bool) & (kv <= q)
            return causal & torch.ops.aten.index(padding, [b, kv])

        for dims in [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)]:
            mask_function = torch.vmap(mask_function, in_dims=dims, out_dims=0)
        mask = mask_function(torch.arange(batch), torch.arange(1), torch.arange(tokens), torch.arange(tokens))
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, :, :tokens]).square().mean()


@pytest.mark.parametrize("kind", ["all-ones", "left"])
def test_a_vmap_built_mask_is_read_too(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 16)
    mask = padding(kind, torch.zeros(2, 12, dtype=torch.long)).bool()
    assert_parity(VmapMaskAttention(), lambda m, x, mask: m(x, mask), (x, mask))
    assert [s.rewritten for s in attention_sites()] == [True], skipped_reasons()


class ScoreMask(nn.Module):
    """Causal, and only where the tokens' inputs agree in sign: a mask computed from data, N x N."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        tokens = x.shape[1]
        positions = torch.arange(tokens)
        agree = (x[:, None, :, :1] * x[:, None, None, :, 0]) > 0
        mask = (positions[None, None, None, :] <= positions[None, None, :, None]) & agree
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask | torch.eye(tokens, dtype=torch.bool)).sum()


def test_a_mask_read_from_data_at_both_positions_is_left_alone_naming_the_op():
    torch.manual_seed(0)
    assert_parity(ScoreMask(), lambda m, x: m(x), (torch.randn(2, 12, 16),))
    (site,) = attention_sites()
    assert not site.rewritten and "reads `gt`" in site.reason and "both the query and the key" in site.reason, site.reason
