"""Post-training heads: per-token log-probs, entropies, token accuracy and unreduced cross-entropy,
in the same graph as the head, are one chunked per-token site. The loss, the metrics and every
gradient equal eager's; the N x V logits are in no compiled graph."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mst_fx
from mst_fx.models import trl_entropy_from_logits, trl_selective_log_softmax

from conftest import skipped_reasons
from test_compiled_structure import _is_mst_op

V, D = 384, 32
OPTIONS = {"chunk_size": 16, "compiler": "aot_eager"}


class TinyLM(nn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))))


def batch(sequences=4, length=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (sequences, length), generator=g)
    mask = (torch.rand(sequences, length - 1, generator=g) > 0.2).float()
    mask[-1] = 0  # a sequence with no completion tokens
    advantages = torch.randn(sequences, generator=g)
    old, ref = -6 + torch.randn(2, sequences, length - 1, generator=g)
    return ids, mask, advantages, old, ref


def token_logps(logits, ids, temperature=0.7):
    """GRPO's: shift, temperature, upcast, log_softmax, gather the chosen tokens."""
    logits = logits[:, :-1, :] / temperature
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def grpo(model, ids, mask, advantages, old, ref, eps=0.2, beta=0.04):
    logps = token_logps(model(ids), ids)
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
    surrogate = torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    per_token = -(surrogate - beta * kl)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def dpo(model, ids, mask, advantages, old, ref, beta=0.1):
    """Chosen and rejected in one batch; log-probs as `gather - logsumexp`, summed per sequence."""
    logits = model(ids)[:, :-1, :]
    picked = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    logps = ((picked - torch.logsumexp(logits, dim=-1)) * mask).sum(-1)
    references = (ref * mask).sum(-1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = references.chunk(2)
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def entropy_bonus(model, ids, mask, advantages, old, ref):
    """A policy-gradient loss minus an entropy bonus, both differentiated."""
    log_probs = torch.log_softmax(model(ids)[:, :-1, :].float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    logps = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(((logps * advantages[:, None]) + 0.01 * entropy) * mask).sum() / mask.sum()


def entropy_logged(model, ids, mask, advantages, old, ref):
    """The loss, and the entropy and token accuracy a trainer logs, computed without gradients."""
    logits = model(ids)[:, :-1, :]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
        accuracy = (logits.argmax(-1) == ids[:, 1:]).float()
    tokens = mask.sum().clamp(min=1.0)
    loss = -(logps * advantages[:, None] * mask).sum() / tokens
    return loss, (entropy * mask).sum() / tokens, (accuracy * mask).sum() / tokens


def weighted_cross_entropy(model, ids, mask, advantages, old, ref):
    """`reduction="none"` cross-entropy, weighted per token by hand."""
    logits = model(ids)[:, :-1, :]
    losses = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    weights = mask.reshape(-1) * (1 + advantages.repeat_interleave(ids.shape[1] - 1).abs())
    return (losses * weights).sum() / weights.sum()


def softcapped_logps(model, ids, mask, advantages, old, ref, cap=30.0):
    """Gemma-2's soft-cap on the logits, then the chosen tokens' log-probs in fp32."""
    logits = model(ids)[:, :-1, :]
    logits = torch.tanh(logits / cap) * cap
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ratio = torch.exp(logps - old)
    return -(torch.clamp(ratio, 0.8, 1.2) * ratio * advantages[:, None] * mask).sum() / mask.sum()


LOSSES = [grpo, dpo, entropy_bonus, entropy_logged, weighted_cross_entropy, softcapped_logps]


def run_both(loss_fn, model, inputs, **options):
    """(eager results, compiled results) of one step, each with the gradients it left."""
    reference = copy.deepcopy(model)
    expected = _as_tuple(loss_fn(reference, *inputs))
    expected[0].backward()
    compiled = torch.compile(loss_fn, backend=mst_fx.backend(**{**OPTIONS, **options}))
    got = _as_tuple(compiled(model, *inputs))
    got[0].backward()
    return (expected, reference), (got, model)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def assert_same_step(expected, got, rtol=1e-5, atol=1e-6):
    (values, reference), (got_values, model) = expected, got
    for e, g in zip(values, got_values):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


# Losses whose per-token values the graph reduces straight to one scalar are row-wise losses: one
# "lm_head" site, gradients in forward. The others keep values per token.
SCALAR_LOSSES = (entropy_bonus, weighted_cross_entropy, softcapped_logps)


def token_sites():
    return [s for r in mst_fx.compiled_reports() for s in r.sites if s.kind.startswith("lm_head")]


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_post_training_loss_matches_eager(loss_fn):
    torch.manual_seed(0)
    assert_same_step(*run_both(loss_fn, TinyLM(), batch()))
    sites = token_sites()
    assert len(sites) == 1 and sites[0].rewritten and sites[0].location == "model.head", (sites, skipped_reasons())
    assert sites[0].kind == ("lm_head" if loss_fn in SCALAR_LOSSES else "lm_head per-token"), sites
    assert sites[0].chunks == 6  # 4 x 24 tokens in chunks of 16
    assert not [s for r in mst_fx.compiled_reports() for s in r.left_alone()], skipped_reasons()


def test_outputs_are_named_in_the_report():
    torch.manual_seed(0)
    run_both(entropy_logged, TinyLM(), batch())
    (site,) = token_sites()
    ops = sorted(name.split(" ")[1] for name in site.token_outputs)
    assert ops == ["(argmax)", "(gather)", "(logsumexp)", "(sum)"], site.token_outputs
    table = str(mst_fx.last_report())
    assert "per-token" in table and all(name in table for name in site.token_outputs), table


def test_tied_embedding_gets_both_gradients():
    torch.manual_seed(0)
    assert_same_step(*run_both(grpo, TinyLM(tied=True), batch()))
    assert token_sites()[0].rewritten


def test_inductor_compiles_the_same_step():
    torch.manual_seed(0)
    assert_same_step(*run_both(grpo, TinyLM(), batch(), compiler="inductor"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_bf16_within_bf16_rounding_of_eager(loss_fn):
    torch.manual_seed(0)
    (values, reference), (got, trained) = run_both(loss_fn, TinyLM().to(torch.bfloat16), batch())
    for e, g in zip(values, got):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-3)
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        error = (p.grad.float() - q.grad.float()).abs().max().item()
        assert p.grad.dtype == torch.bfloat16 and error <= 0.02 * q.grad.float().abs().max().item(), (name, error)
    assert token_sites()[0].rewritten


def test_lora_on_the_head():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(TinyLM(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["head"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert_same_step(*run_both(grpo, model, batch()))
    (site,) = token_sites()
    assert site.rewritten, site.reason


def test_mst_inspect_names_the_per_token_values(capsys):
    from mst_fx.explain_model import inspect_main as main

    assert main(["mst_fx.models:grpo_llama"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("|") and "per-token" in line]
    assert "model.lm_head" in row and "(gather)" in row and "(logsumexp)" in row and "8192 x 256 -> 32000" in row, row


def test_logits_read_across_tokens_leave_the_head_alone_with_that_op():
    def with_logit_penalty(model, ids, mask, advantages, old, ref):
        logits = model(ids)[:, :-1, :]
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return -(logps * mask).sum() / mask.sum() + 1e-3 * logits.pow(2).mean()

    torch.manual_seed(0)
    assert_same_step(*run_both(with_logit_penalty, TinyLM(), batch()))
    (site,) = [s for r in mst_fx.compiled_reports() for s in r.sites if s.location == "model.head"]
    assert not site.rewritten and "'pow" in site.reason, site  # one report for the head, naming the op


def test_a_slice_of_tokens_after_an_op_on_the_logits_is_named():
    def scaled_then_shifted(model, ids, mask, advantages, old, ref):
        logits = (model(ids) / 0.7)[:, :-1, :]  # the shift after the scaling: rows move under the op
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return -(torch.exp(logps - old) * advantages[:, None] * mask).sum() / mask.sum()

    torch.manual_seed(0)
    assert_same_step(*run_both(scaled_then_shifted, TinyLM(), batch()))
    (site,) = token_sites()
    assert not site.rewritten and "(getitem)" in site.reason and "across tokens" in site.reason, site.reason


def test_no_compiled_graph_holds_the_logits():
    """Inductor's post-grad forward and backward hold the per-token op and nothing N x V wide."""
    torch.manual_seed(0)
    model, inputs = TinyLM(), batch(sequences=8, length=65)

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return grpo(self.model, *inputs)

    graphs = []
    with torch._inductor.config.patch(post_grad_custom_post_pass=graphs.append, fx_graph_cache=False):
        torch.compile(Step(), backend=mst_fx.backend(chunk_size=64))(*inputs).backward()
    outer = [g for g in graphs if any(_is_mst_op(n) for n in g.nodes)]
    ops = {n.target.name() for g in outer for n in g.nodes if _is_mst_op(n)}
    assert ops == {"mst::linear_rows_forward", "mst::linear_rows_backward"}
    for graph in outer:
        for node in graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[-1] == V:
                assert value.numel() <= V * D, (node.name, tuple(value.shape))


# ---------------------------------------------------------------- the logits leave the compiled model


def trl_row_log_softmax(logits, index):
    """TRL's `selective_log_softmax`, bf16 branch: log_softmax and gather, sequence by sequence."""
    rows = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def grpo_outside(log_softmax_fn):
    """A GRPO step as TRL writes it: the model's logits, then log-probs and entropy computed eagerly."""

    def step(model, ids, mask, advantages, old, ref):
        logits = model(ids)[:, :-1, :] / 0.7
        logps = log_softmax_fn(logits, ids[:, 1:])
        entropy = trl_entropy_from_logits(logits, chunk_size=16)
        ratio = torch.exp(logps - old)
        surrogate = torch.min(ratio * advantages[:, None], torch.clamp(ratio, 0.8, 1.2) * advantages[:, None])
        per_token = -surrogate - 0.01 * entropy
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        return loss, (entropy.detach() * mask).sum() / mask.sum()

    return step


def assert_same_step_with_the_model_compiled(step, caplog):
    """`step` eagerly, against `step` on the model compiled by mst (its logits deferred): the same
    results and gradients, and the logits never computed in full."""
    torch.manual_seed(0)
    model, inputs = TinyLM(), batch()
    reference = copy.deepcopy(model)
    expected = step(reference, *inputs)
    expected[0].backward()
    compiled = torch.compile(model, backend=mst_fx.backend(**OPTIONS))
    with caplog.at_level(logging.WARNING, logger="mst_fx"):
        got = step(compiled, *inputs)
        got[0].backward()
    assert_same_step((expected, reference), (got, model))
    assert not [r for r in caplog.records if "computed them in full" in r.getMessage()]


@pytest.mark.parametrize("log_softmax_fn", [trl_selective_log_softmax, trl_row_log_softmax])
def test_trl_style_log_probs_on_deferred_logits(log_softmax_fn, caplog):
    assert_same_step_with_the_model_compiled(grpo_outside(log_softmax_fn), caplog)
    heads = [s for r in mst_fx.compiled_reports() for s in r.sites if s.kind == "lm_head"]
    assert len(heads) == 1 and heads[0].rewritten and heads[0].loss_outside, heads


def test_reference_log_probs_under_no_grad():
    """A reference model's log-probs, computed without gradients, as GRPO's KL term and DPO take them."""
    torch.manual_seed(0)
    model, (ids, *_) = TinyLM(), batch()
    logps = torch.compile(lambda m, ids: token_logps(m(ids), ids), backend=mst_fx.backend(**OPTIONS))
    with torch.no_grad():
        got, expected = logps(model, ids), token_logps(model(ids), ids)
    torch.testing.assert_close(got, expected)
    (site,) = token_sites()
    assert site.rewritten and site.token_outputs == ["gather (gather)"], site


@pytest.mark.parametrize("log_softmax_fn", [trl_selective_log_softmax, trl_row_log_softmax])
def test_trl_loops_compiled_with_the_model_are_one_site(log_softmax_fn):
    """TRL's loops over sequences and row chunks, compiled together with the model (Dynamo unrolls
    them), are fused back into ops on all the logits and become one per-token site."""
    torch.manual_seed(0)
    assert_same_step(*run_both(grpo_outside(log_softmax_fn), TinyLM(), batch()))
    (site,) = token_sites()
    assert site.rewritten, site.reason
    assert "(gather)" in " ".join(site.token_outputs) and "(sum)" in " ".join(site.token_outputs), site.token_outputs


def trl_dpo_outside(model, ids, mask, advantages, old, ref, beta=0.1):
    """DPO as TRL 1.14 writes it: log-probs from the logits, then metrics that read the logits under
    a mask (`logits[mask].mean(-1)`) and their argmax."""
    logits = model(ids)[..., :-1, :]
    logps = (trl_selective_log_softmax(logits, ids[:, 1:]) * mask).sum(-1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = (ref * mask).sum(-1).chunk(2)
    loss = -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    with torch.no_grad():
        kept = mask.bool()
        mean_logits = logits.detach()[kept].mean(-1).sum() / kept.sum()
        accuracy = (logits.argmax(-1) == ids[:, 1:])[kept].float().mean()
    return loss, mean_logits, accuracy


def test_trl_dpo_metrics_on_deferred_logits(caplog):
    assert_same_step_with_the_model_compiled(trl_dpo_outside, caplog)
