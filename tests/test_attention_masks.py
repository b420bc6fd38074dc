"""Attention under the masks long-context training uses, without the N x N mask.

Each family is built with transformers' own modeling code, in the form its users train it:
packed documents (position_ids restarting, no attention_mask, as `DataCollatorWithFlattening`
feeds), Mistral's sliding window, Gemma-3's interleaved sliding and full layers, Qwen3's
`max_window_layers`, Llama-4's chunked attention. Parity is the loss and every gradient against
eager, fp32 and bf16, with and without activation checkpointing, unpadded and right-padded. The
report must name the terms read; a structure test checks that no tensor in the rewritten graph
is query x key.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import mst_fx
from mst_fx.models import enable_checkpointing, tiny_llama
from mst_fx.tracing.restored_attributes import mark_mst_backend

from conftest import assert_parity, skipped_reasons

VOCAB, TOKENS, WINDOW = 96, 40, 8
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, attn_implementation="sdpa")  # fmt: skip


def mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=WINDOW))


def gemma3():
    config = transformers.Gemma3TextConfig(
        **SMALL, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16
    )
    return transformers.Gemma3ForCausalLM(config)


def qwen3():
    config = transformers.Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    return transformers.Qwen3ForCausalLM(config)


def llama4():
    config = transformers.Llama4TextConfig(
        **{**SMALL, "intermediate_size_mlp": 64, "num_hidden_layers": 2}, attention_chunk_size=WINDOW,
        moe_layers=[], no_rope_layers=[1, 0], use_qk_norm=False,
    )  # fmt: skip
    return transformers.Llama4ForCausalLM(config)


def llama():
    return tiny_llama(hidden=32, intermediate=64, layers=2, vocab=VOCAB, heads=2)


# What each case reads: the terms its report must name, per mask.
FAMILIES = {
    "documents": (llama, {"causal by position & documents"}),
    "window": (mistral, {"window 8 & causal"}),
    "gemma3": (gemma3, {"window 8 & causal", "causal"}),
    "qwen3": (qwen3, {"window 8 & causal", "causal"}),
    "chunks": (llama4, {"chunks of 8 & causal", "causal"}),
}


def build(family: str, dtype=torch.float32, checkpointing=False):
    torch.manual_seed(0)
    model = FAMILIES[family][0]().to(dtype)
    if checkpointing:
        enable_checkpointing(model)
    return model


def batch(family: str, padded: bool):
    """(ids, labels, attention_mask, position_ids). Documents: three packed in each row, positions
    restarting, no attention_mask; padded, the first row ends in padding that restarts its
    positions too (its own document, as a flattening collator pads). Others: a right-padded mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, TOKENS), generator=g)
    labels = torch.randint(0, VOCAB, (2, TOKENS), generator=g)
    if family == "documents":
        lengths = [[15, 17, 8], [9, 20, 11]]
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
        if padded:
            labels[0, -8:] = -100
        return ids, labels, None, positions
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -11:] = 0
        labels = labels.masked_fill(mask == 0, -100)
    return ids, labels, mask, None


def loss(model, ids, labels, attention_mask, position_ids):
    return model(ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).loss


def attention_sites():
    return [s for r in mst_fx.compiled_reports() for s in r.sites if s.kind == "attention"]


def tolerances(dtype):
    return {} if dtype == torch.float32 else {"scaled_tol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right-padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_without_the_n_by_n_mask(family, padded, dtype, checkpointing):
    model = build(family, dtype, checkpointing)
    assert_parity(model, loss, batch(family, padded), chunk_size=8, **tolerances(dtype))
    sites = attention_sites()
    assert sites and all(s.rewritten for s in sites), skipped_reasons()
    padding = " & padding" if padded and family != "documents" else ""
    assert {s.mask.replace(" & padding", "") for s in sites} == FAMILIES[family][1]
    assert all(s.mask.endswith(padding) for s in sites if s.mask != "causal" or padded)


@pytest.mark.parametrize("family", ["window", "documents"])
def test_no_query_by_key_tensor_is_left_in_the_graph(family):
    """Nothing in the rewritten graph is Nq x Nkv, no SDPA takes a mask, and each layer's attention
    is one masked-attention op."""
    graphs = []

    @mark_mst_backend
    def capture(gm, example_inputs):
        rewritten, _ = mst_fx.rewrite(gm, example_inputs, mst_fx.MstOptions(chunk_size=8))
        graphs.append(rewritten)
        return rewritten.forward

    ids, labels, mask, positions = batch(family, padded=True)
    torch.compile(build(family), backend=capture)(ids, labels=labels, attention_mask=mask, position_ids=positions,
                                                  use_cache=False)  # fmt: skip
    (graph,) = graphs
    nodes = list(graph.graph.nodes)
    square = [n.name for n in nodes if _is_query_by_key(n)]
    assert not square
    assert not [n for n in nodes if "scaled_dot_product" in str(n.target) and n.kwargs.get("attn_mask") is not None]
    assert sum("masked_attention" in str(n.target) for n in nodes) == 2


def _is_query_by_key(node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == value.shape[-2] == TOKENS


def test_fully_masked_rows_give_what_eager_gives():
    """Left padding under a window: the leading padded queries see no key at all."""
    ids, labels, mask, _ = batch("window", padded=False)
    mask[1, :13] = 0
    labels = labels.masked_fill(mask == 0, -100)
    assert_parity(build("window"), loss, (ids, labels, mask, None), chunk_size=8)
    assert [s.rewritten for s in attention_sites()] == [True], skipped_reasons()


def test_the_report_names_the_form_and_the_blocks():
    ids, labels, mask, positions = batch("gemma3", padded=True)
    report = mst_fx.explain(build("gemma3"), ids, example_kwargs={"labels": labels, "attention_mask": mask,
                            "use_cache": False}, chunk_size=8)  # fmt: skip
    sites = {s.mask: s for s in report.sites if s.kind == "attention"}
    assert set(sites) == {"window 8 & causal & padding", "causal & padding"}
    window = sites["window 8 & causal & padding"]
    assert (window.chunk_rows, window.chunks, window.calls) == (8, TOKENS // 8, 1)
    assert f"{TOKENS // 8} x 8" in str(report) and "window 8 & causal & padding" in str(report)


def test_dropout_under_a_window_is_refused():
    model = build("window")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    ids, labels, mask, _ = batch("window", padded=False)
    report = mst_fx.explain(model, ids, example_kwargs={"labels": labels, "attention_mask": mask}, chunk_size=8)
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert not site.rewritten and "attention dropout" in site.reason and site.mask == "window 8 & causal & padding"


def test_one_dynamic_graph_serves_every_length():
    """dynamic=True: one graph, the window's blocks cut from each call's own length; loss and every
    gradient match eager at two lengths."""
    model = build("window")
    reference = build("window")
    compiled = torch.compile(model, backend=mst_fx.backend(chunk_size=8, compiler="aot_eager"), dynamic=True)
    for tokens in (40, 57):
        ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0
        for m in (model, reference):
            m.zero_grad()
        got = loss(compiled, ids, ids, mask, None)
        expected = loss(reference, ids, ids, mask, None)
        got.backward()
        expected.backward()
        torch.testing.assert_close(got, expected)
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert len(mst_fx.compiled_reports()) == 1
    assert [s.rewritten for s in attention_sites()] == [True]


def test_the_debug_log_says_what_was_done_with_each_mask(caplog):
    ids, labels, mask, _ = batch("gemma3", padded=False)
    with caplog.at_level("DEBUG", logger="mst_fx"):
        assert_parity(build("gemma3"), loss, (ids, labels, mask, None), chunk_size=8)
    lines = [r.getMessage() for r in caplog.records if "rewrote attention" in r.getMessage()]
    assert any("mask window 8 & causal & padding: 5 blocks of 8 queries" in line for line in lines), lines
