"""Inside a checkpointed layer, an attribute set and restored before the layer returns is no side
effect (`mst_fx.tracing.restored_attributes`): the layer stays in the graph and mst rewrites it.
Any other mutation still breaks the graph, as Dynamo decides, and other backends keep Dynamo's rule.

The blocks below copy the pattern of `kernels`' `use_kernelized_func` (transformers >= 5.25), which
sets a module-level holder to a dict around every attention layer's forward and resets it in a
`finally`, without importing either.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_parity, loss_of

import mst_fx
from mst_fx.models import MLPStack, SwiGLU, random_batch
from mst_fx.tracing import restored_attributes

VOCAB = 500


class Holder:
    def __init__(self):
        self.active = None
        self.compiling = False


STATE = Holder()
CALLS: list[int] = []


@pytest.fixture(autouse=True)
def _fresh_state():
    STATE.active, STATE.compiling = None, False
    CALLS.clear()
    yield


class RestoresInFinally(SwiGLU):
    """kernels' pattern: a dict while the layer runs, the value before (and a flag) once it returns."""

    def forward(self, x):
        previous = STATE.active
        STATE.active = {"layer": self}
        STATE.compiling = True
        try:
            return super().forward(x)
        finally:
            STATE.active = previous
            STATE.compiling = previous is not None


class LeavesItChanged(SwiGLU):
    def forward(self, x):
        STATE.active = {"layer": self}
        return super().forward(x)


class AppendsToAList(SwiGLU):
    def forward(self, x):
        CALLS.append(1)
        return super().forward(x)


def checkpointed(block) -> MLPStack:
    torch.manual_seed(0)
    return MLPStack(VOCAB, 32, 96, layers=2, mlp=block, checkpointing=True)


def test_an_attribute_restored_in_finally_keeps_the_layers_in_the_graph():
    inputs = random_batch(VOCAB, batch=2, tokens=37, ignore_every=7)
    kinds = assert_parity(checkpointed(RestoresInFinally), loss_of, inputs, chunks=4)
    assert kinds == {"mlp gated": 2, "lm_head": 1}
    assert mst_fx.last_report().graph_breaks == []
    assert (STATE.active, STATE.compiling) == (None, False)


def test_an_object_held_before_and_put_back_counts_as_restored():
    """The value before is a dict (not a constant): restoring that very object is a restore."""
    outer = {"outer": True}
    STATE.active, STATE.compiling = outer, True
    inputs = random_batch(VOCAB, batch=2, tokens=37)
    kinds = assert_parity(checkpointed(RestoresInFinally), loss_of, inputs, chunks=4)
    assert kinds == {"mlp gated": 2, "lm_head": 1}
    assert STATE.active is outer and STATE.compiling is True


@pytest.mark.parametrize(
    "block, reason",
    [(LeavesItChanged, "HOP: Non-nullified side effect"), (AppendsToAList, "HOP: Unsafe side effect")],
    ids=["attribute-left-changed", "list-appended"],
)
def test_a_side_effect_that_stays_still_breaks_the_graph(block, reason):
    """Not restored: Dynamo's graph break stands, the layer runs as eager checkpointing runs it (its
    side effect replayed in backward, as in eager), and the report says the MLPs were not seen."""
    inputs = random_batch(VOCAB, batch=2, tokens=37)
    reference = checkpointed(block)
    loss_of(reference, *inputs).backward()
    eager_calls = len(CALLS)
    CALLS.clear()

    kinds = assert_parity(checkpointed(block), loss_of, inputs, chunks=4)
    assert "mlp gated" not in kinds
    assert len(CALLS) == 2 * eager_calls  # assert_parity ran eager once more, then compiled
    outside = mst_fx.last_report().code_outside
    assert any(b.reason.startswith(reason) for b in outside), [b.reason for b in outside]


def test_other_backends_keep_dynamos_rule():
    """The rule is mst's: a backend that is not marked sees Dynamo break the graph as before."""
    from torch._dynamo.utils import counters

    counters.clear()
    inputs = random_batch(VOCAB, batch=2, tokens=37)
    compiled = torch.compile(checkpointed(RestoresInFinally), backend="aot_eager")
    loss_of(compiled, *inputs).backward()
    met = [*counters["graph_break"], *counters["unimplemented"]]  # a break, or the whole frame given up
    assert any("Unsafe side effect" in reason for reason in met), met
    assert (STATE.active, STATE.compiling) == (None, False)


def test_where_dynamo_differs_the_store_is_left_to_dynamo(monkeypatch, caplog):
    """A torch whose Dynamo internals moved (as torch 2.15 renamed the attribute reader): the trace
    must not fail. The rule steps aside with one WARNING, and Dynamo breaks the graph as without mst."""

    def moved(*args):
        raise AttributeError("'UserDefinedObjectVariable' object has no attribute 'var_getattr'")

    monkeypatch.setattr(restored_attributes, "_record", moved)
    monkeypatch.setattr(restored_attributes, "_given_up", False)
    inputs = random_batch(VOCAB, batch=2, tokens=37)
    kinds = assert_parity(checkpointed(RestoresInFinally), loss_of, inputs, chunks=4)
    assert "mlp gated" not in kinds and mst_fx.last_report().code_outside
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "differs" in r.getMessage()]
    assert len(warned) == 1 and "var_getattr" in warned[0]
