"""mst on third-party model code from the package index, run as its own trainer runs it: torchtitan
0.3.0's Llama-3 (blocks compiled one by one, head and loss outside: the README's one line brings the
head in), litgpt 0.5.13's GPT (model compiled, `chunked_cross_entropy` outside, under Lightning
Fabric) and x-transformers 2.31.10's decoder (its AutoregressiveWrapper compiled whole, its own
stable cross_entropy inside). Loss and every gradient against eager; the head must be chunked.
Skipped unless the stacks are installed (`tools/stacks_install.sh`: they need --no-deps and pinned
side packages on torch 2.13 CPU, so they are not test extras)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mst_fx

from third_party_stacks import build_litgpt, build_torchtitan, build_torchtitan_moe, build_x_transformers, training_step

OPTIONS = {"chunk_size": 64, "compiler": "aot_eager"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _step_against_eager(build, tokens: int, options: dict, recipe=None, **size):
    """One training step of a stack compiled with mst (after `recipe(model)`, if any) against the
    same step in eager: the loss and every gradient. (the stack, the sites its graphs reported)"""
    reference, stack = build(tokens, **size), build(tokens, **size)
    expected = training_step(reference.model, reference.inputs, reference.labels, reference.loss_fn)
    if recipe is not None:
        recipe(stack.model)
    model, loss_fn = stack.compile_model_fn(stack.model, mst_fx.backend(**options))
    got = training_step(model, stack.inputs, stack.labels, loss_fn)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for (n, p), (_, q) in zip(stack.model.named_parameters(), reference.model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    return stack, [s for r in mst_fx.compiled_reports() for s in r.sites]


def _rows(sites) -> str:
    """The report's rows, one a line, for an assertion's message: what mst did at each site and why."""
    return "\n".join(f"{s.kind} at {s.location}: {'rewritten' if s.rewritten else s.reason}" for s in sites)


# chunk_size 64 at 256 tokens; or a memory budget that lets every MLP keep its intermediates, at a
# length past one lean chunk (under a budget a site whose static length fits one is left alone)
SETTINGS = {"chunked": (256, OPTIONS), "kept": (520, {"memory_budget": "1GiB", "compiler": "aot_eager"})}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", ["torchtitan", "litgpt"])
def test_stack_trains_with_the_head_chunked(name, setting):
    if not _installed(name):
        pytest.skip(f"{name} is not installed (tools/stacks_install.sh)")
    tokens, options = SETTINGS[setting]
    build = build_torchtitan if name == "torchtitan" else build_litgpt
    recipe = (lambda model: mst_fx.compile(model.lm_head, **options)) if name == "torchtitan" else None  # its one line
    _, sites = _step_against_eager(build, tokens, options, recipe, vocab=2000)
    heads = [s for s in sites if s.kind == "lm_head"]
    assert len(heads) == 1 and heads[0].rewritten and heads[0].loss_outside, sites
    mlps = [s for s in sites if s.kind.startswith("mlp") and s.rewritten]
    assert mlps, sites
    if setting == "kept":  # torchtitan: one graph serves every block; each call keeps its own
        assert all(s.decision == "kept, no recompute" for s in mlps), mlps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torchtitan_moe_trains_with_the_routed_experts_chunked(dtype):
    """torchtitan's Qwen3-MoE blocks, compiled one by one as its trainer does: the routed experts
    (argsort dispatch, torch._grouped_mm, its deterministic_scatter_add combine) are one site."""
    if not _installed("torchtitan"):
        pytest.skip("torchtitan is not installed (tools/stacks_install.sh)")
    reference, stack = build_torchtitan_moe(96, dtype=dtype), build_torchtitan_moe(96, dtype=dtype)
    expected = training_step(reference.model, reference.inputs, reference.labels, reference.loss_fn)
    model, loss_fn = stack.compile_model_fn(stack.model, mst_fx.backend(chunk_size=32, compiler="aot_eager"))
    got = training_step(model, stack.inputs, stack.labels, loss_fn)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for (n, p), (_, q) in zip(stack.model.named_parameters(), reference.model.named_parameters()):
        # torchtitan's experts run in bf16 whatever the weights: per-chunk sums round differently
        error = (p.grad.float() - q.grad.float()).abs().max().item()
        assert error <= 1e-2 * q.grad.float().abs().max().item(), (n, error)
    experts = [s for r in mst_fx.compiled_reports() for s in r.sites if s.kind == "moe experts"]
    assert experts and all(s.rewritten for s in experts), experts
    assert (experts[0].experts, experts[0].top_k, experts[0].chunks) == (8, 2, 3)


def test_torchtitan_moe_experts_keep_under_a_budget(decisions):
    """The same blocks, compiled one by one, under a budget the experts fit: each block's call keeps
    its autograd graph (one graph serves both blocks, each call its own ticket), its backward runs no
    dispatch again, and every keep is released."""
    if not _installed("torchtitan"):
        pytest.skip("torchtitan is not installed (tools/stacks_install.sh)")
    from mst_fx.runtime import memory_budget

    tokens = 1100  # past one lean chunk of the experts (256 rows x E/k = 1024), so the site is rewritten
    reference, stack = build_torchtitan_moe(tokens), build_torchtitan_moe(tokens)
    expected = training_step(reference.model, reference.inputs, reference.labels, reference.loss_fn)
    model, loss_fn = stack.compile_model_fn(stack.model, mst_fx.backend(memory_budget="1GiB", compiler="aot_eager"))
    got = training_step(model, stack.inputs, stack.labels, loss_fn)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for (n, p), (_, q) in zip(stack.model.named_parameters(), reference.model.named_parameters()):
        error = (p.grad.float() - q.grad.float()).abs().max().item()  # bf16 experts, as above
        assert error <= 1e-2 * q.grad.float().abs().max().item(), (n, error)
    kept = [d for kind, _, d in decisions if kind == "ChunkedExperts"]
    assert len(kept) == 2 and all(d.keep for d in kept), kept  # both blocks' calls
    assert memory_budget.ledger(torch.device("cpu")).held == 0


def test_x_transformers_trains_with_its_stable_cross_entropy_chunked():
    """x-transformers' AutoregressiveWrapper compiled whole: one graph holds the decoder, the head
    and torch_einops_utils' `cross_entropy`, which is no F.cross_entropy but its stable form (one-hot
    `arange == target`, gather, logsumexp of a where, softplus, a where on valid labels, sum / count).
    Every feed-forward (GELU-GLU) is chunked and the head is one chunked site; the attention
    projections, which widen 4x at dim 64 (x-transformers' dim_head is 64 whatever the width), are no
    site at all."""
    if not _installed("x_transformers"):
        pytest.skip("x_transformers is not installed (tools/stacks_install.sh)")
    from x_transformers.x_transformers import FeedForward

    size = {"dim": 64, "layers": 2, "heads": 4, "vocab": 512}
    stack, sites = _step_against_eager(build_x_transformers, 256, OPTIONS, **size)
    feed_forwards = [n for n, m in stack.model.named_modules() if isinstance(m, FeedForward)]
    mlps = [s.location for s in sites if s.kind.startswith("mlp") and s.rewritten]
    assert len(feed_forwards) == size["layers"] and len(mlps) == len(feed_forwards), _rows(sites)
    assert all(any(loc == n or loc.startswith(n + ".") for loc in mlps) for n in feed_forwards), _rows(sites)
    heads = [s for s in sites if s.kind.startswith("lm_head") or s.location == "net.to_logits"]
    assert [(h.location, h.rewritten) for h in heads] == [("net.to_logits", True)], _rows(sites)
    assert heads[0].kind.startswith("lm_head"), _rows(sites)
    projections = {"to_q", "to_k", "to_v", "to_out"}
    assert not [s for s in sites if projections & set(s.location.split("."))], _rows(sites)
