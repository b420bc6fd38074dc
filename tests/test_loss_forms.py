"""Cross-entropy written every way people write it, in the same graph as the head: each is one
chunked LM-head site at the head's location, with the loss and every gradient equal to eager's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mst_fx

from conftest import rewritten_kinds, skipped_reasons
from test_loss_outside import OPTIONS, D, V, batch, litgpt_chunked_ce, model


def transposed(z, y):
    return F.cross_entropy(z.transpose(1, 2), y)


def permuted_sum(z, y):
    return F.cross_entropy(z.permute(0, 2, 1).float(), y, reduction="sum")


def module(z, y):
    return nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.05)(z.reshape(-1, V), y.reshape(-1))


def nll_of_log_softmax(z, y):
    return F.nll_loss(F.log_softmax(z.reshape(-1, V).float(), dim=-1), y.reshape(-1))


def summed_chunks(z, y, pieces=4):
    """Sums of cross-entropy over chunks of the logits, cast per chunk, added from 0.0 (the loop of
    torchtune's CEWithChunkedOutputLoss, over chunks of one logits tensor)."""
    total = (y != -100).sum()
    labels = y.reshape(-1).chunk(pieces)
    logits = [c.float() for c in z.reshape(-1, V).chunk(pieces)]
    loss = 0.0
    for lc, tc in zip(logits, labels):
        loss += F.cross_entropy(lc, tc, ignore_index=-100, reduction="sum")
    return loss / total


@pytest.mark.parametrize(
    "loss_fn", [transposed, permuted_sum, module, nll_of_log_softmax, litgpt_chunked_ce, summed_chunks]
)
def test_loss_form_in_the_graph(loss_fn):
    reference, trained = model(), model()
    ids, labels = batch()
    expected = loss_fn(reference(ids), labels)
    expected.backward()
    step = torch.compile(lambda ids, y: loss_fn(trained(ids), y), backend=mst_fx.backend(**OPTIONS))
    got = step(ids, labels)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    heads = [s for r in mst_fx.compiled_reports() for s in r.sites if s.kind == "lm_head"]
    assert len(heads) == 1 and heads[0].rewritten and heads[0].location == "trained.head", (heads, skipped_reasons())
    assert not heads[0].loss_outside
    assert rewritten_kinds()["mlp gated"] == 2


def gathered_log_probs(z, y):
    """A per-token loss: masked log-probs of the targets, summed, over the count of valid ones."""
    log_probs = F.log_softmax(z.float(), dim=-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(log_probs * (y != -100)).sum() / (y != -100).sum()


def logsumexp_minus_target(z, y):
    """The NLL written out: logsumexp minus the target logit, averaged, times a number."""
    picked = z.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return 0.5 * (torch.logsumexp(z, dim=-1) - picked).mean()


@pytest.mark.parametrize("loss_fn", [gathered_log_probs, logsumexp_minus_target])
def test_per_token_loss_form_in_the_graph(loss_fn):
    test_loss_form_in_the_graph(loss_fn)


def test_entropy_bonus_is_a_row_wise_loss_site():
    """An entropy reads each row of logits in a way no loss form covers; it is row-wise up to its
    mean over tokens, so it is one LM-head site (gradients in forward) all the same."""

    def with_entropy(z, y):
        p = F.softmax(z, dim=-1)
        return -(p * F.log_softmax(z, dim=-1)).sum(-1).mean()

    trained, reference = model(), model()
    ids, labels = batch()
    with_entropy(reference(ids), labels).backward()
    step = torch.compile(lambda ids, y: with_entropy(trained(ids), y), backend=mst_fx.backend(**OPTIONS))
    step(ids, labels).backward()
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert rewritten_kinds() == {"lm_head": 1, "mlp gated": 2}, skipped_reasons()


def test_softmax_across_tokens_is_reported_at_the_head():
    """A softmax over the token dim is not row-wise: the head is left alone, and the op is named."""
    trained = model()
    ids, labels = batch()
    step = torch.compile(lambda ids: F.softmax(trained(ids), dim=1).amax(-1).sum(), backend=mst_fx.backend(**OPTIONS))
    step(ids).backward()
    reasons = skipped_reasons()
    assert any(r.startswith("lm_head per-token:") and "'softmax'" in r and "token dim" in r for r in reasons), reasons


def test_per_token_weights_that_need_a_gradient_make_a_per_token_site():
    """Weights computed from parameters need their own gradient, which the reduced-loss site does
    not compute: the log-probs are kept per token instead, and the weighting stays in the graph
    (parity covers the weights' gradient)."""
    trained, reference = model(), model()
    ids, labels = batch()

    def weighted(m, ids, y):
        weights = torch.sigmoid(m.embed(ids).sum(-1))
        log_probs = F.log_softmax(m(ids), dim=-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -(log_probs * weights).sum()

    expected = weighted(reference, ids, labels)
    expected.backward()
    got = torch.compile(lambda ids, y: weighted(trained, ids, y), backend=mst_fx.backend(**OPTIONS))(ids, labels)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert [s.kind for r in mst_fx.compiled_reports() for s in r.rewritten("lm_head")] == ["lm_head per-token"]


# ---------------------------------------------------------------- any row-wise loss, no table of forms


def stable_cross_entropy(z, y, ignore_index=-100):
    """x-transformers 2.31's loss (torch_einops_utils.cross_entropy, written out here): classes
    moved to dim 1 by the caller and back by the loss, a one-hot mask from `arange == target`, the
    logsumexp of the other classes' margins, softplus, a `where` on the valid labels, sum / count."""
    z = torch.movedim(z.permute(0, 2, 1), 1, -1)
    valid = y != ignore_index
    target = torch.where(valid, y, 0)[..., None]
    is_target = torch.arange(z.shape[-1], device=z.device) == target
    margin = -torch.logsumexp(torch.where(is_target, -float("inf"), z - z.gather(-1, target)), dim=-1)
    loss = torch.where(valid, F.softplus(-margin), 0.0)
    return loss.sum() / valid.sum()


def focal_loss(z, y, gamma=2.0):
    """Focal loss (Lin et al.): the per-token cross-entropy weighted by (1 - p_target)^gamma, averaged."""
    ce = F.cross_entropy(z.reshape(-1, V).float(), y.reshape(-1), reduction="none")
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()


def cross_entropy_and_z_loss(z, y, weight=1e-4):
    """PaLM's z-loss added to the mean cross-entropy: two sums over tokens of the same logits."""
    return F.cross_entropy(z.reshape(-1, V), y.reshape(-1)) + weight * torch.logsumexp(z, dim=-1).pow(2).mean()


@pytest.mark.parametrize(
    "loss_fn, kind, op",
    [
        (stable_cross_entropy, "lm_head", "mst::linear_row_loss"),
        (focal_loss, "lm_head", "mst::linear_row_loss"),
        # Two sums: the per-token values (cross-entropy and logsumexp) are kept, the graph adds them.
        (cross_entropy_and_z_loss, "lm_head per-token", "mst::linear_rows_forward"),
    ],
)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_any_row_wise_loss_is_one_site_at_the_head(loss_fn, kind, op, compiler):
    """No table lists these forms: each reduces the logits row by row to values per token, then to
    a scalar, so the head and every op up to the per-token values are one chunked site."""
    from torch.profiler import ProfilerActivity, profile

    reference, trained = model(), model()
    ids, labels = batch()
    expected = loss_fn(reference(ids), labels)
    expected.backward()
    step = torch.compile(lambda ids, y: loss_fn(trained(ids), y), backend=mst_fx.backend(chunk_size=16, compiler=compiler))
    step(ids, labels).backward()  # compiles
    trained.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = step(ids, labels)
        got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    heads = [s for r in mst_fx.compiled_reports() for s in r.sites if s.kind.startswith("lm_head")]
    assert [(s.kind, s.location, s.rewritten, s.chunks) for s in heads] == [(kind, "trained.head", True, 6)], skipped_reasons()
    calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("mst::")}
    assert calls.get(op) == 1, calls
    assert "mst::linear_rows_backward" in calls if kind == "lm_head per-token" else "mst::linear_rows_backward" not in calls


def test_a_row_wise_loss_leaves_no_logits_sized_tensor_in_the_graph():
    """The stable cross-entropy's one-hot mask is N x V booleans, made from the labels, not the
    logits: the site makes it per chunk too. After the rewrite no node of the graph is N x V."""
    from test_saved_for_backward import dynamo_graph

    from mst_fx.options import MstOptions
    from mst_fx.passes import rewrite

    trained = model()
    ids, labels = batch()
    gm, inputs = dynamo_graph(lambda ids, y: stable_cross_entropy(trained(ids), y), ids, labels)

    def logits_sized(graph_module):
        values = (n.meta.get("example_value") for n in graph_module.graph.nodes)
        return [v.shape for v in values if isinstance(v, torch.Tensor) and v.dim() > 1 and v.shape[-1] == V and v.shape.numel() > V * D]

    assert logits_sized(gm)  # the logits, the mask, the margins
    rewritten, report = rewrite(gm, inputs, MstOptions(chunk_size=16))
    assert [(s.kind, s.rewritten) for s in report.sites if s.kind.startswith("lm_head")] == [("lm_head", True)]
    assert logits_sized(rewritten) == []


@pytest.mark.parametrize("loss_fn", [stable_cross_entropy, focal_loss])
def test_a_row_wise_loss_serves_every_length_from_one_graph(loss_fn):
    """Under dynamic shapes the site's chunk count follows the length: three lengths, one graph,
    the loss and every gradient equal to eager's at each."""
    reference, trained = model(), model()
    step = torch.compile(lambda ids, y: loss_fn(trained(ids), y), backend=mst_fx.backend(**OPTIONS), dynamic=True)
    for n in (48, 40, 33):
        ids, labels = batch(n=n)
        reference.zero_grad(), trained.zero_grad()
        expected = loss_fn(reference(ids), labels)
        expected.backward()
        got = step(ids, labels)
        got.backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    reports = mst_fx.compiled_reports()
    assert len(reports) == 1, "recompiled"
    assert [(s.kind, s.rewritten) for s in reports[0].sites if s.kind.startswith("lm_head")] == [("lm_head", True)]
