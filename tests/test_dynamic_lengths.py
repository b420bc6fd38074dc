"""Dynamic shapes: the chunk size is the unit, so one graph serves every length, the number of
chunks follows the length at run time, and no length is refused or left unrewritten by the first."""

from __future__ import annotations

import copy

import pytest
import torch

import mst_fx
from mst_fx.runtime import chunk_bodies
from mst_fx.runtime.chunk_plan import ChunkPolicy
from mst_fx.models import MLPStack, random_batch

VOCAB = 500


def stack():
    torch.manual_seed(0)
    return MLPStack(VOCAB, 32, 96, layers=2)


def train_steps(model, lengths, batch=1, **compile_kwargs):
    """One step per length under mst and eager, with loss and gradient parity at each."""
    reference = copy.deepcopy(model)
    backend = compile_kwargs.pop("backend", mst_fx.backend(compiler="aot_eager"))
    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    for tokens in lengths:
        ids, labels = random_batch(VOCAB, batch, tokens, ignore_every=7, seed=tokens)
        got, expected = compiled(ids, labels), reference(ids, labels)
        got.backward(), expected.backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0, equal_nan=True)  # 1 token: all ignored
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)


def rewritten_per_graph() -> list[set[str]]:
    return [{s.kind for s in r.rewritten()} for r in mst_fx.compiled_reports()]


@pytest.mark.parametrize("lengths", [(3, 5, 2, 37), (37, 2, 100)])
def test_every_length_runs_on_one_graph_even_below_the_chunk_count(lengths):
    """chunks=4 with lengths under 2 x 4 tokens: stock backends run these, and so must mst."""
    train_steps(stack(), lengths, backend=mst_fx.backend(chunks=4, compiler="aot_eager"), dynamic=True)
    assert rewritten_per_graph() == [{"mlp gated", "lm_head"}]


def test_one_token():
    """Dynamo gives a length of 1 its own graph under any backend (it specializes sizes 0 and 1)."""
    train_steps(stack(), (1, 2), backend=mst_fx.backend(chunks=4, compiler="aot_eager"), dynamic=True)
    assert rewritten_per_graph() == [{"mlp gated", "lm_head"}] * 2


def test_mark_dynamic_with_a_short_first_length():
    model, reference = stack(), stack()
    compiled = torch.compile(model, backend=mst_fx.backend(chunks=4, compiler="aot_eager"))
    for tokens in (3, 41):
        ids, labels = random_batch(VOCAB, 1, tokens, seed=tokens)
        torch._dynamo.mark_dynamic(ids, 1)
        torch._dynamo.mark_dynamic(labels, 1)
        torch.testing.assert_close(compiled(ids, labels), reference(ids, labels), rtol=1e-5, atol=0)
    assert rewritten_per_graph() == [{"mlp gated", "lm_head"}]


def test_the_number_of_chunks_follows_the_length(monkeypatch):
    """chunk_size=16: 37 tokens run as 16 + 16 + 4 + 1, 100 as six 16s + 4, on the same graph."""
    calls = []
    real_run = chunk_bodies.run

    def counting_run(entry, inputs):
        calls.append(inputs[0].shape[0])
        return real_run(entry, inputs)

    monkeypatch.setattr(chunk_bodies, "run", counting_run)
    model = stack()
    compiled = torch.compile(model, backend=mst_fx.backend(chunk_size=16, compiler="aot_eager"), dynamic=True)
    seen = {}
    for tokens in (37, 100):
        calls.clear()
        with torch.no_grad():
            compiled(*random_batch(VOCAB, 1, tokens))
        seen[tokens] = calls[:]
    # Forward only, no grad: 2 MLPs, then the head (which computes the loss chunk by chunk).
    assert seen[37] == [16, 16, 4, 1] * 3
    assert seen[100] == ([16] * 6 + [4]) * 3
    assert len(mst_fx.compiled_reports()) == 1


def test_a_short_first_call_does_not_leave_later_long_calls_unrewritten():
    """chunk_size="auto": 16 tokens fit in one chunk, so that static graph is left alone; the
    next length makes Dynamo compile a dynamic graph, which is rewritten, and serves 4096 tokens."""
    train_steps(stack(), (16, 24, 4096))
    first, dynamic = rewritten_per_graph()
    assert first == set() and dynamic == {"mlp gated", "lm_head"}
    sizes = mst_fx.compiled_reports()[-1].rewritten()
    assert all(s.chunk_rows is not None for s in sizes)


def test_dynamic_from_the_start_rewrites_whatever_the_first_length():
    train_steps(stack(), (16, 4096), dynamic=True)
    assert rewritten_per_graph() == [{"mlp gated", "lm_head"}]


def test_plan_pieces_cover_every_length_with_few_shapes():
    policy = ChunkPolicy(rows=64)
    shapes = set()
    for n in range(1, 300):
        chunks = policy.chunks(n, 8, 64, "cpu")
        assert [s for s, _ in chunks] == [sum(length for _, length in chunks[:i]) for i in range(len(chunks))]
        assert sum(length for _, length in chunks) == n
        shapes.update(length for _, length in chunks)
    assert shapes == {1, 2, 4, 8, 16, 32, 64}  # log2(64) + 1 bodies serve every length
    assert [length for _, length in ChunkPolicy(count=4).chunks(10, 8, 64, "cpu")] == [3, 3, 2, 2]
    assert [length for _, length in ChunkPolicy(count=4).chunks(3, 8, 64, "cpu")] == [1, 1, 1]
