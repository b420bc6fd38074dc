"""The runtime's side of masks read as expressions: evaluating a block, bounding the keys a block of
queries reaches, and the blocks masked attention runs. Each is checked against the mask written
out in full, element by element, for causal, window, chunk, document and padding masks and their
combinations; and masked attention by blocks against SDPA under the full mask."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from mst_fx.runtime import mask_expressions as mx
from mst_fx.runtime.masked_attention import _blocks, masked_attention

B, N = 2, 37
Q, KV, BATCH = ("var", mx.QUERY), ("var", mx.KEY), ("var", mx.BATCH)
CAUSAL = mx.compare("le", KV, Q)
WINDOW = mx.compare("gt", KV, mx.add(Q, mx.const(-6)))
CHUNKS = mx.compare("eq", mx.floordiv(KV, 8), mx.floordiv(Q, 8))


def documents(leaf: int) -> tuple:
    return mx.compare("eq", ("read", leaf, (BATCH, Q)), ("read", leaf, (BATCH, KV)))


def padding(leaf: int) -> tuple:
    return ("read", leaf, (BATCH, KV))


def leaves() -> list[torch.Tensor]:
    """Document ids (three documents per row, not sorted in the second), and right padding."""
    docs = torch.tensor([[0] * 11 + [1] * 20 + [2] * 6, [5] * 9 + [3] * 14 + [7] * 14])
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[0, -9:] = False
    return [docs, pad]


MASKS = {
    "causal": CAUSAL,
    "window": mx.logic("and", CAUSAL, WINDOW),
    "chunks": mx.logic("and", CAUSAL, CHUNKS),
    "documents": mx.logic("and", CAUSAL, documents(0)),
    "documents or window": mx.logic("and", CAUSAL, mx.logic("or", documents(0), WINDOW)),
    "not window, padding": mx.logic("and", mx.logic("and", CAUSAL, mx.negate(WINDOW)), padding(1)),
    "all": mx.logic("and", mx.logic("and", mx.logic("and", CAUSAL, WINDOW), documents(0)), padding(1)),
}


def written_out(expr: tuple, tensors) -> torch.Tensor:
    """The mask element by element, with Python ints: what the expression means."""
    mask = torch.zeros(B, 1, N, N, dtype=torch.bool)
    for b in range(B):
        for q in range(N):
            for kv in range(N):
                mask[b, 0, q, kv] = bool(mx.evaluate(expr, tensors, {mx.BATCH: b, mx.HEAD: 0, mx.QUERY: q, mx.KEY: kv}))
    return mask


@pytest.mark.parametrize("name", list(MASKS))
def test_a_block_and_the_keys_it_reaches(name):
    expr, tensors = MASKS[name], leaves()
    full = written_out(expr, tensors)
    assert torch.equal(mx.block(expr, tensors, (B, 1), range(N), range(N), "cpu"), full)
    for start in range(0, N, 8):
        queries = range(start, min(N, start + 8))
        seen = full[:, :, start : queries.stop].flatten(0, 2).any(0)
        reach = mx.key_reach(expr, tensors, (B, 1), queries, N, "cpu")
        assert reach is None or not (seen & ~reach).any()  # never fewer keys than the block sees
        if name in ("window", "chunks"):  # bounds from indices alone are exact
            assert torch.equal(reach, seen)


@pytest.mark.parametrize("name", list(MASKS))
def test_blocks_cover_exactly_the_keys_each_block_sees(name):
    expr, tensors = MASKS[name], leaves()
    full = written_out(expr, tensors)
    q, k = torch.randn(B, 2, N, 4), torch.randn(B, 2, N, 4)
    policy = [8, 0]
    covered = 0
    for queries, keys, part in _blocks(q, k, tensors, repr(expr), [True, False], policy):
        rows = slice(queries.start, queries.stop)
        seen = full[:, :, rows].flatten(0, 2).any(0).nonzero().flatten()
        if keys is None:
            assert len(seen) == 0
            continue
        assert (keys.start, keys.stop) == (int(seen[0]), int(seen[-1]) + 1)
        expected = full[:, :, rows, keys.start : keys.stop]
        assert expected.all() if part is None else torch.equal(part.expand_as(expected), expected)
        covered += len(queries)
    assert covered == N


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_attention_is_sdpa_under_the_full_mask(name, dtype):
    expr, tensors = MASKS[name], leaves()
    full = written_out(expr, tensors)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 4, N, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, 4, N, 8, dtype=dtype)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    got = masked_attention(q, k, v, tensors, repr(expr), [1], False, [True, False], [8, 0], None, False)
    have = torch.autograd.grad(got, (q, k, v), grad)
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, expected, **tolerance)
    for g, w in zip(have, want):
        torch.testing.assert_close(g, w, **tolerance)


def test_causal_with_padding_takes_is_causal_when_nothing_is_padded():
    """With the padding all True, the op is one is_causal call: no mask block is ever built."""
    tensors = [torch.ones(B, N, dtype=torch.bool)]
    expr = mx.logic("and", CAUSAL, padding(0))
    q, k, v = (torch.randn(B, 2, N, 8) for _ in range(3))
    with mock.patch("mst_fx.runtime.masked_attention.block", wraps=mx.block) as block:
        got = masked_attention(q, k, v, tensors, repr(expr), [0], True, [True, False], [8, 0], None, False)
    assert block.call_count == 0
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))
