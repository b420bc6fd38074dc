"""Code that ran outside every graph is reported, never silent (`mst_fx.tracing.graph_breaks`).

A layer that graph-breaks on purpose: under checkpointing (the whole layer then runs outside), as a
`torch.compiler.disable`d function, and as a break whose code is compiled in graphs of its own (no
saving lost: INFO, not WARNING).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from conftest import assert_parity, loss_of
from torch import nn
from torch.utils.checkpoint import checkpoint

import mst_fx
from mst_fx.inspect.model_report import ModelReport
from mst_fx.models import MLPStack, SwiGLU, random_batch

VOCAB = 500
LOGGER = "mst_fx.tracing.graph_breaks"


class BreaksOnPurpose(SwiGLU):
    def forward(self, x):
        torch._dynamo.graph_break()
        return super().forward(x)


class Disabled(SwiGLU):
    @torch.compiler.disable
    def forward(self, x):
        return super().forward(x)


class TwoBlocks(nn.Module):
    """Two residual MLPs written out (no loop, so a break in one leaves Dynamo the rest of the frame)."""

    def __init__(self, block=SwiGLU, checkpointing=False, break_between=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.first, self.second = block(32, 96), block(32, 96)
        self.head = nn.Linear(32, VOCAB, bias=False)
        self.checkpointing, self.break_between = checkpointing, break_between

    def run(self, block, x):
        return x + (checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x))

    def forward(self, ids, labels):
        x = self.run(self.first, self.embed(ids))
        if self.break_between:
            torch._dynamo.graph_break()
        x = self.run(self.second, x)
        return F.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())


def outside_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def one_step(model, chunks=4):
    inputs = random_batch(VOCAB, batch=2, tokens=37, ignore_every=7)
    return assert_parity(model, loss_of, inputs, chunks=chunks)


def test_a_checkpointed_layer_that_breaks_is_reported_as_run_outside(caplog):
    torch.manual_seed(0)
    kinds = one_step(TwoBlocks(BreaksOnPurpose, checkpointing=True))
    assert kinds == {"lm_head": 1}  # both MLPs ran outside: nothing to rewrite there

    report = mst_fx.last_report()
    (brk,) = report.code_outside
    assert brk.outside and brk.reason == "Call to `torch._dynamo.graph_break()`"
    assert brk.where.startswith("test_graph_breaks.py:") and brk.where.endswith("in run")  # the checkpoint call
    assert brk.cause.startswith("test_graph_breaks.py:") and brk.cause.endswith("in forward")  # the break

    (warning,) = outside_warnings(caplog)
    assert "outside every graph" in warning and brk.where in warning and "MLP" in warning
    table = str(report)
    # The calls above it (forward -> run) were compiled as frames of their own: reported, not outside.
    assert "1 where code ran outside every graph" in table and brk.cause in table
    assert len(report.graph_breaks) > 1 and all(b.outside == (b is brk) for b in report.graph_breaks)


def test_the_warning_is_said_once(caplog):
    torch.manual_seed(0)
    model = torch.compile(TwoBlocks(BreaksOnPurpose, checkpointing=True), backend="mst", options={"chunks": 4})
    inputs = random_batch(VOCAB, batch=2, tokens=37)
    for _ in range(3):
        loss_of(model, *inputs).backward()
    mst_fx.last_report()
    assert len(outside_warnings(caplog)) == 1


def test_a_disabled_layer_in_a_loop_is_reported_with_the_frame_dynamo_gave_up(caplog):
    """A disabled block inside MLPStack's loop: Dynamo skips the whole forward ("graph break in
    loop"), head and loss included, and compiles no graph at all; the report still says so."""
    torch.manual_seed(0)
    kinds = one_step(MLPStack(VOCAB, 32, 96, layers=2, mlp=Disabled))
    assert kinds == {}
    (brk,) = mst_fx.last_report().code_outside
    assert brk.whole_frame and "disable()" in brk.reason and "graph break in loop" in brk.reason
    assert brk.where.startswith("mst_fx/models/mlp_stack.py:") or brk.where.startswith("mlp_stack.py:")
    assert len(outside_warnings(caplog)) == 1


def test_a_break_whose_code_is_compiled_elsewhere_costs_nothing_and_is_info(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    torch.manual_seed(0)
    kinds = one_step(TwoBlocks(break_between=True))
    assert kinds == {"mlp gated": 2, "lm_head": 1}  # both halves compiled: every site seen
    (brk,) = mst_fx.last_report().graph_breaks
    assert not brk.outside and brk.where.endswith("in forward")
    assert outside_warnings(caplog) == []
    assert any(r.levelno == logging.INFO and "graph break at" in r.getMessage() for r in caplog.records)


def test_explain_reports_the_breaks_and_the_json_keeps_them():
    torch.manual_seed(0)
    model = TwoBlocks(BreaksOnPurpose, checkpointing=True)
    report = mst_fx.explain(model, *random_batch(VOCAB, batch=2, tokens=37))
    assert [b.reason for b in report.code_outside] == ["Call to `torch._dynamo.graph_break()`"]
    assert not [s for s in report.sites if s.kind.startswith("mlp")]  # never seen, so not listed
    again = ModelReport.from_dict(report.to_dict())
    assert again.graph_breaks == report.graph_breaks
