"""Routed experts of mixture-of-experts layers, chunked over tokens (passes/moe_experts.py): loss
(aux loss included) and every gradient against eager for each expert implementation, fp32 and
bf16, with and without activation checkpointing, each counted as a rewritten expert site; and the
dispatches that are not row-wise, left alone with a reason that names why."""

from __future__ import annotations

import pytest
import torch

import mst_fx
from mst_fx.models.moe_layers import CapacityMoE, ExpertChoiceMoE, LoopMoE, MoEStack
from mst_fx.models import enable_checkpointing

from conftest import assert_parity, skipped_reasons

# 40 tokens in chunks of 16: three chunks, the last one short
OPTIONS = {"chunk_size": 16}
TOKENS = 40


def qwen3_moe(implementation: str, dtype=torch.float32, layers: int = 2, router_logits: bool = True):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
        attn_implementation="sdpa", output_router_logits=router_logits, router_aux_loss_coef=0.01, norm_topk_prob=True,
    )  # fmt: skip
    config._experts_implementation = implementation
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).to(dtype)


def mixtral(dtype=torch.float32, router_logits: bool = True):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=64, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512, attn_implementation="sdpa",
        output_router_logits=router_logits, router_aux_loss_coef=0.02,
    )  # fmt: skip
    torch.manual_seed(0)
    return MixtralForCausalLM(config).to(dtype)


def loss_and_aux(model, ids, labels):
    """The model's loss (which adds coef x aux) plus the aux loss once more: its gradient, through
    the router, weighs in at full strength. Without router logits: the loss alone."""
    out = model(ids, labels=labels)
    return out.loss if out.aux_loss is None else out.loss + out.aux_loss


def _batch(vocab=512, tokens=TOKENS):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (1, tokens), generator=g), torch.randint(0, vocab, (1, tokens), generator=g)


def _tolerances(dtype):
    return {} if dtype == torch.float32 else {"scaled_tol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_transformers_experts_match_eager(implementation, dtype, checkpointing):
    # With checkpointing, transformers 5.25 records router logits by a hook that reads a ContextVar,
    # which Dynamo can't trace: every layer then runs outside any graph (test below). The aux loss
    # is checked without checkpointing.
    model = qwen3_moe(implementation, dtype, router_logits=not checkpointing)
    if checkpointing:
        enable_checkpointing(model)
    counts = assert_parity(model, loss_and_aux, _batch(), **_tolerances(dtype), **OPTIONS)
    assert counts["moe experts"] == 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
def test_mixtral_matches_eager(checkpointing):
    model = mixtral(router_logits=not checkpointing)
    if checkpointing:
        enable_checkpointing(model)
    counts = assert_parity(model, loss_and_aux, _batch(), **OPTIONS)
    assert counts["moe experts"] == 2


def test_router_logits_under_checkpointing_is_a_reported_graph_break():
    """transformers 5.25 collects router logits with a forward hook that appends to a list; inside a
    checkpointed layer Dynamo refuses that side effect, so each layer runs outside every graph.
    Training stays exact, and the report says where and why (a WARNING names the code outside)."""
    model = mixtral(router_logits=True)
    enable_checkpointing(model)
    counts = assert_parity(model, loss_and_aux, _batch(), **OPTIONS)
    assert counts["moe experts"] == 0
    outside = mst_fx.last_report().code_outside
    assert any("output_capturing" in b.cause for b in outside), [b.describe() for b in outside]


def test_router_logits_under_checkpointing_with_forward_side_effects_kept_out_of_recompute():
    """torchtitan's setting: a side effect of a checkpointed forward is not replayed by the
    backward's recompute. The hook's append then stays in the graph, every layer's experts are
    chunked, and the loss with its aux loss matches eager."""
    model = mixtral(router_logits=True)
    enable_checkpointing(model)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        counts = assert_parity(model, loss_and_aux, _batch(), **OPTIONS)
    assert counts["moe experts"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loop_over_expert_modules_matches_eager(dtype):
    """Mixtral's original block: `torch.where(expert_mask[e])` per expert module, `index_add_`.
    Captured whole only when Dynamo keeps nonzero in the graph (unbacked sizes)."""
    torch.manual_seed(0)
    model = MoEStack(LoopMoE).to(dtype)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        counts = assert_parity(model, lambda m, i, l: m(i, l), _batch(), **_tolerances(dtype), **OPTIONS)
    assert counts["moe experts"] == 2
    assert counts["mlp gated"] == 0  # the experts' MLPs are inside the expert site, not sites of their own


def test_loop_without_nonzero_capture_is_a_reported_graph_break():
    """By default Dynamo breaks the graph at nonzero: no graph holds a whole layer's experts, and
    the break is reported (mst can't chunk what it never sees in one graph)."""
    torch.manual_seed(0)
    model = MoEStack(LoopMoE)
    counts = assert_parity(model, lambda m, i, l: m(i, l), _batch(), **OPTIONS)
    assert counts["moe experts"] == 0
    # the expert MLPs returned from the pieces are MLPs, not LM heads with returned logits
    heads = [s.location for r in mst_fx.compiled_reports() for s in r.sites if s.kind.startswith("lm_head")]
    assert all(location == "head" for location in heads), heads
    causes = [b.cause + " " + b.reason for b in mst_fx.last_report().graph_breaks]
    assert any("nonzero" in c or "Dynamic shape" in c or "dynamic" in c.lower() for c in causes), causes


@pytest.mark.parametrize(
    "layer, words", [(CapacityMoE, "capacity"), (ExpertChoiceMoE, "expert-choice")], ids=["capacity", "expert-choice"]
)
def test_dispatch_that_is_not_row_wise_is_left_alone_with_its_reason(layer, words):
    torch.manual_seed(0)
    model = MoEStack(layer)
    counts = assert_parity(model, lambda m, i, l: m(i, l), _batch(), **OPTIONS)
    assert counts["moe experts"] == 0
    reasons = [r for r in skipped_reasons() if r.startswith("moe experts")]
    assert len(reasons) == 2 and all(words in r for r in reasons), reasons


def test_report_names_experts_top_k_and_chunks():
    model = qwen3_moe("grouped_mm")
    compiled = torch.compile(model, backend=mst_fx.backend(compiler="aot_eager", **OPTIONS))
    loss_and_aux(compiled, *_batch()).backward()
    sites = [s for s in mst_fx.last_report().sites if s.kind == "moe experts"]
    assert [s.location for s in sites] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for site in sites:
        assert (site.experts, site.top_k, site.tokens, site.chunks, site.chunk_rows) == (4, 2, TOKENS, 3, 16)
        before, after = site.largest_intermediate_bytes
        assert after * TOKENS == before * 16  # one chunk's dispatch instead of every token's


def test_experts_option_turns_the_rewrite_off():
    model = qwen3_moe("grouped_mm")
    counts = assert_parity(model, loss_and_aux, _batch(), experts=False, **OPTIONS)
    assert counts["moe experts"] == 0
    with pytest.raises(ValueError, match="'experts'"):
        mst_fx.backend(experts="yes")


def test_no_compiled_graph_holds_a_tensor_of_every_slot():
    """Inductor's forward and backward graphs of a rewritten MoE model: the experts are one op
    each way, and no node has a row per (token, expert) slot: those exist one chunk at a time,
    inside the op, under any scheduler."""
    from test_compiled_structure import _is_mst_op, outer_post_grad_graphs

    tokens, top_k = 600, 2  # 1200 slots, a row count nothing else has
    model = _LossOf(qwen3_moe("grouped_mm", router_logits=False))
    graphs = outer_post_grad_graphs(model, _batch(tokens=tokens), chunk_size=128)
    ops = {n.target.name() for g in graphs for n in g.nodes if _is_mst_op(n)}
    assert {"mst::experts_forward", "mst::experts_backward"} <= ops, ops
    for graph in graphs:
        for node in graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.shape[0] != tokens * top_k, (node.format_node(), value.shape)


class _LossOf(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        return self.model(ids, labels=labels).loss


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_dynamic_lengths_share_one_rewritten_graph(implementation):
    """Under dynamic shapes the region's sizes (view(T, k, d), arange(T·k)) are symbolic; the lifted
    region recomputes them from each chunk, and one graph serves every length."""
    model = qwen3_moe(implementation, router_logits=False)
    compiled = torch.compile(model, backend=mst_fx.backend(compiler="aot_eager", **OPTIONS), dynamic=True)
    for tokens in (40, 57):
        reference = qwen3_moe(implementation, router_logits=False)
        reference.load_state_dict(model.state_dict())
        model.zero_grad()
        ids, labels = _batch(tokens=tokens)
        expected = loss_and_aux(reference, ids, labels)
        expected.backward()
        got = loss_and_aux(compiled, ids, labels)
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    (graph,) = [r for r in mst_fx.compiled_reports() if r.rewritten("moe")]
    assert len(graph.rewritten("moe experts")) == 2


class _WeightsPartlyWithoutGrad(LoopMoE):
    """Routing weights with a part computed under no_grad inside the expert region: the lifted
    region must not give that part a gradient the model never had."""

    def route(self, h):
        weights, selected = super().route(h)
        with torch.no_grad():
            doubled = weights * 2.0
        return weights + doubled - weights.detach(), selected


def test_values_computed_without_grad_stay_without_grad():
    torch.manual_seed(0)
    model = MoEStack(_WeightsPartlyWithoutGrad)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        counts = assert_parity(model, lambda m, i, l: m(i, l), _batch(), **OPTIONS)
    assert counts["moe experts"] == 2
