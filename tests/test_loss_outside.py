"""The loss computed outside the compiled model: the logits come back deferred, cross-entropy on
them runs chunked, and anything else computes them once, with a warning.

Every test checks the loss and every parameter's gradient against eager PyTorch, and that the head
was taken out of the graph (a parity that holds because nothing was rewritten can't pass).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import mst_fx
from mst_fx.runtime.deferred_logits import DeferredLogits

from conftest import assert_parity, skipped_reasons

D, I, V, N = 32, 96, 200, 48
OPTIONS = {"chunk_size": 16, "compiler": "aot_eager"}


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(a, b, bias=False) for a, b in ((D, I), (D, I), (I, D)))

    def forward(self, h):
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLM(nn.Module):
    """Embedding, two SwiGLU blocks, norm, head: returns logits, as torchtitan's and litgpt's do."""

    def __init__(self, tied=False, softcap=None, checkpointed=False, bias=False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(SwiGLU() for _ in range(2))
        self.norm = nn.RMSNorm(D)
        self.head = nn.Linear(D, V, bias=bias)
        if tied:
            self.head.weight = self.embed.weight
        self.softcap, self.checkpointed = softcap, checkpointed

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=False) if self.checkpointed else b(h)
        logits = self.head(self.norm(h))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def model(**kwargs):
    torch.manual_seed(0)
    return TinyLM(**kwargs)


def batch(b=2, n=N):
    torch.manual_seed(1)
    ids = torch.randint(0, V, (b, n))
    labels = torch.randint(0, V, (b, n))
    labels[0, :5] = -100
    return ids, labels


def shifted_ce(logits, labels):
    """The usual next-token loss: shift, flatten, upcast."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1))


def litgpt_chunked_ce(logits, targets, chunk_size=16, ignore_index=-100):
    """litgpt.utils.chunked_cross_entropy as litgpt 0.5 writes it."""
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    logit_chunks, target_chunks = logits.split(chunk_size), targets.split(chunk_size)
    losses = [F.cross_entropy(lc, tc, ignore_index=ignore_index, reduction="none") for lc, tc in zip(logit_chunks, target_chunks)]
    non_masked = (targets != ignore_index).sum()
    return torch.cat(losses).sum() / non_masked.maximum(torch.ones_like(non_masked))


def torchtitan_ce(pred, labels):
    """torchtitan's cross-entropy: flatten, upcast, summed."""
    return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum", ignore_index=-100)


def class_dim_first_ce(logits, labels):
    return F.cross_entropy(logits.transpose(1, 2), labels)


def module_ce(logits, labels):
    return nn.CrossEntropyLoss(label_smoothing=0.1)(logits.view(-1, V), labels.view(-1))


def per_token_weighted(logits, labels):
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    weights = torch.linspace(0.5, 1.5, losses.numel())
    return (losses * weights).sum() / weights.sum()


def assert_head_deferred(location="head"):
    heads = [s for r in mst_fx.compiled_reports() for s in r.rewritten("lm_head")]
    assert len(heads) == 1 and heads[0].loss_outside and heads[0].location == location, heads


@pytest.mark.parametrize(
    "loss_fn", [shifted_ce, litgpt_chunked_ce, torchtitan_ce, class_dim_first_ce, module_ce, per_token_weighted]
)
def test_loss_outside_the_model(loss_fn, caplog):
    with caplog.at_level(logging.WARNING, logger="mst_fx"):
        kinds = assert_parity(model(), lambda m, ids, y: loss_fn(m(ids), y), batch(), rtol=1e-5, atol=1e-6, **OPTIONS)
    assert kinds["mlp gated"] == 2
    assert_head_deferred()
    assert not [r for r in caplog.records if "computed them in full" in r.getMessage()]


def test_the_model_returns_deferred_logits_that_read_like_logits():
    compiled = torch.compile(model(), backend=mst_fx.backend(**OPTIONS))
    ids, _ = batch()
    logits = compiled(ids)
    assert isinstance(logits, DeferredLogits)
    assert logits.shape == (2, N, V) and logits.dtype == torch.float32 and logits.requires_grad
    assert logits.size(-1) == V and logits.dim() == 3 and "DeferredLogits" in repr(logits)
    assert logits._logits is None


@pytest.mark.parametrize("variant", [{"tied": True}, {"softcap": 3.0}, {"checkpointed": True}, {"bias": True}])
def test_head_variants(variant):
    kinds = assert_parity(model(**variant), lambda m, ids, y: shifted_ce(m(ids), y), batch(), **OPTIONS)
    assert kinds["lm_head"] == 1
    assert_head_deferred("head (tied to embed)" if "tied" in variant else "head")


def test_loss_compiled_in_its_own_region():
    """torchtitan compiles its loss function separately: the deferred logits enter that region."""
    compiled_loss = torch.compile(torchtitan_ce)
    assert_parity(model(), lambda m, ids, y: compiled_loss(m(ids), y), batch(), **OPTIONS)
    assert_head_deferred()


def test_head_compiled_alone():
    """torchtitan compiles only the blocks; the recipe compiles the head on its own with mst."""
    reference, trained = model(), model()
    mst_fx.compile(trained.head, **OPTIONS)
    ids, labels = batch()
    expected, got = shifted_ce(reference(ids), labels), shifted_ce(trained(ids), labels)
    expected.backward(), got.backward()
    torch.testing.assert_close(got, expected)
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert_head_deferred()


def test_any_other_use_computes_the_logits_once_and_warns(caplog):
    def top2_margin(logits, labels):  # topk is not a reduction the deferred logits run chunked
        top2 = torch.topk(logits, 2, dim=-1).values
        return shifted_ce(logits, labels) - 0.01 * (top2[..., 0] - top2[..., 1]).mean()

    with caplog.at_level(logging.WARNING, logger="mst_fx"):
        assert_parity(model(), lambda m, ids, y: top2_margin(m(ids), y), batch(), **OPTIONS)
    warnings = [r.getMessage() for r in caplog.records if "computed them in full" in r.getMessage()]
    assert len(warnings) == 1 and "topk" in warnings[0] and "keep_logits" in warnings[0]


@pytest.mark.parametrize("how", ["keep_logits", "eval mode", "no_grad"])
def test_logits_stay_plain_when_asked_or_not_training(how):
    reference, m = model(), model()
    ids, labels = batch()
    if how == "keep_logits":
        compiled = torch.compile(m, backend=mst_fx.backend(keep_logits=True, **OPTIONS))
    else:
        compiled = mst_fx.compile(m, **OPTIONS)
        m.eval(), reference.eval()
    with torch.no_grad() if how == "no_grad" else torch.enable_grad():
        got, expected = compiled(ids), reference(ids)
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if how != "no_grad":
        assert any("lm_head: the logits leave this graph" in r and how.split("_")[0] in r for r in skipped_reasons())


def test_a_cut_mlp_is_not_taken_for_a_head():
    """A widening linear whose output leaves the graph through an activation is an MLP cut in two
    (a graph break), reported as such; only casts, scaling and tanh may follow a head."""

    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)

        def forward(self, x):
            h = F.gelu(self.up(x))
            torch._dynamo.graph_break()
            return self.down(h)

    torch.manual_seed(0)
    x = torch.randn(2, N, D)
    assert_parity(Cut(), lambda m, x: m(x).sum(), (x,), **OPTIONS)
    reasons = skipped_reasons()
    assert any(r.startswith("mlp:") and "cut across two graphs" in r for r in reasons), reasons
    assert not any(s.kind == "lm_head" for r in mst_fx.compiled_reports() for s in r.sites)


def test_a_backward_hook_observes_the_rows_gradient():
    """Lightning Fabric registers a hook on every output; on deferred logits it must not compute them."""
    calls = []

    def loss_with_hook(logits, labels):
        logits.register_hook(lambda grad: calls.append(grad.shape))
        return shifted_ce(logits, labels)

    assert_parity(model(), lambda m, ids, y: loss_with_hook(m(ids), y), batch(), **OPTIONS)
    assert calls == [(2, N, V), (2, N, D)]  # eager: the logits' gradient; mst: the rows'


def test_per_token_losses_summed_are_one_reduced_loss():
    """litgpt's loss: cross_entropy(reduction="none") per split, cat, sum. The sum runs as the
    reduced loss does (gradients in forward); other uses compute the values per token."""
    from mst_fx.runtime.per_token_loss import DeferredTokenLosses

    logits = torch.compile(model(), backend=mst_fx.backend(**OPTIONS))(batch()[0])
    targets = batch()[1].reshape(-1)
    pieces = [F.cross_entropy(z, t, reduction="none") for z, t in zip(logits.reshape(-1, V).split(16), targets.split(16))]
    joined = torch.cat(pieces)
    assert isinstance(joined, DeferredTokenLosses) and joined.shape == (2 * N,)
    assert "LinearCrossEntropy" in type(joined.sum().grad_fn).__name__
    assert joined._values is None
    assert type(joined * 2.0) is torch.Tensor and joined._values is not None


def _around_compiled_model(how: str):
    """A loss computed outside a compiled model that something else wraps or transforms."""

    def step(m, ids, labels):
        compiled = torch.compile(m, backend=mst_fx.backend(**OPTIONS))
        if how == "checkpoint":  # activation checkpointing around the whole model
            return shifted_ce(checkpoint(compiled, ids, use_reentrant=False), labels)
        params = dict(m.named_parameters())
        return shifted_ce(torch.func.functional_call(compiled, params, (ids,)), labels)

    return step


@pytest.mark.parametrize("how", ["checkpoint", "functional_call"])
def test_deferred_logits_under_wrappers_of_the_model(how):
    reference, trained = model(), model()
    ids, labels = batch()
    expected = shifted_ce(reference(ids), labels)
    expected.backward()
    got = _around_compiled_model(how)(trained, ids, labels)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert_head_deferred()


def test_torch_func_grad_through_the_compiled_model():
    """Under torch.func's transforms Dynamo skips the model's frame and runs it eagerly (its graph
    break, not mst's): training stays exact, and no graph reaches mst to rewrite or report."""
    reference, trained = model(), model()
    ids, labels = batch()
    expected = shifted_ce(reference(ids), labels)
    expected.backward()
    compiled = torch.compile(trained, backend=mst_fx.backend(**OPTIONS))
    params = {k: v.detach() for k, v in trained.named_parameters()}
    loss_of = lambda p: shifted_ce(torch.func.functional_call(compiled, p, (ids,)), labels)  # noqa: E731
    grads, loss = torch.func.grad_and_value(loss_of)(params)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for name, q in reference.named_parameters():
        torch.testing.assert_close(grads[name], q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not mst_fx.compiled_reports()
