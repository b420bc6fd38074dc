"""A seeded randomized differential test against eager PyTorch.

Each case draws a model (MLP form, widths, layers, biases, vocabulary), a batch (size; length 1, a
prime or anything, often below the chunk count), the chunking, the label pattern (none, some or
all ignored; a custom ignore_index), the reduction, label smoothing, the dtype (fp32, bf16, fp16,
fp32 under bf16 autocast) and whether lengths are dynamic. It then compares the loss, every
parameter's gradient and which parameters get none:

* fp32: mst equals eager within rtol 1e-4;
* otherwise: against eager in fp32 as the truth, mst's error is within 4x eager's own (plus a
  quarter of the dtype's resolution, so that an error eager happens to get exactly right does
  not count).

24 cases by default (about a minute on 2 cores); MST_PARITY_CASES=500 widens it for a long run,
MST_PARITY_SEED shifts the seeds.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mst_fx

CASES = int(os.environ.get("MST_PARITY_CASES", "24"))
FIRST_SEED = int(os.environ.get("MST_PARITY_SEED", "0"))
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Case:
    batch: int
    lengths: tuple[int, ...]  # one per step: two when dynamic
    d: int
    intermediate: int
    vocab: int
    layers: int
    mlp: str  # gated | plain | fused
    bias: bool
    head_bias: bool
    chunking: dict
    ignore: str  # none | some | all
    ignore_index: int
    reduction: str
    label_smoothing: float
    precision: str  # fp32 | bf16 | fp16 | autocast
    dynamic: bool

    @classmethod
    def draw(cls, seed: int) -> Case:
        r = random.Random(seed)
        dynamic = r.random() < 0.3
        lengths = tuple(r.choice([1, r.choice(PRIMES), r.randint(2, 48)]) for _ in range(2 if dynamic else 1))
        d = r.choice([8, 16, 24])
        chunking = r.choice([{"chunks": r.choice([1, 2, 3, 4, 7, 16])}, {"chunk_size": r.choice([1, 3, 8, 16])}])
        return cls(
            batch=r.choice([1, 2, 3]), lengths=lengths, d=d, intermediate=r.choice([2 * d, 3 * d + 4, 4 * d]),
            vocab=r.choice([17, 50, 101]), layers=r.choice([1, 2]), mlp=r.choice(["gated", "plain", "fused"]),
            bias=r.random() < 0.4, head_bias=r.random() < 0.3, chunking=chunking,
            ignore=r.choice(["none", "some", "some", "all"]), ignore_index=r.choice([-100, -100, 3]),
            reduction=r.choice(["mean", "sum"]), label_smoothing=r.choice([0.0, 0.0, 0.1]),
            precision=r.choice(["fp32", "fp32", "bf16", "fp16", "autocast"]), dynamic=dynamic,
        )  # fmt: skip


class Block(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        d, i, bias = case.d, case.intermediate, case.bias
        self.form = case.mlp
        self.up = nn.Linear(d, 2 * i if case.mlp == "fused" else i, bias=bias)
        self.gate = nn.Linear(d, i, bias=bias) if case.mlp == "gated" else None
        self.down = nn.Linear(i, d, bias=bias)

    def forward(self, x):
        if self.form == "gated":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.form == "fused":
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(up * F.gelu(gate, approximate="tanh"))
        return self.down(F.gelu(self.up(x)))


class Model(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.case = case
        self.embed = nn.Embedding(case.vocab, case.d)
        self.blocks = nn.ModuleList(Block(case) for _ in range(case.layers))
        self.head = nn.Linear(case.d, case.vocab, bias=case.head_bias)

    def forward(self, ids, labels):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x).float()  # as HF does: the loss in fp32 whatever the model's dtype
        c = self.case
        return F.cross_entropy(logits.view(-1, c.vocab), labels.view(-1), ignore_index=c.ignore_index,
                               reduction=c.reduction, label_smoothing=c.label_smoothing)  # fmt: skip


def batch_of(case: Case, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, case.vocab, (case.batch, length), generator=g)
    labels = torch.randint(0, case.vocab, (case.batch, length), generator=g)
    if case.ignore == "all":
        labels.fill_(case.ignore_index)
    elif case.ignore == "some":
        labels.view(-1)[:: 1 + seed % 4] = case.ignore_index
    return ids, labels


def step(model, batch, precision: str, compiled=None):
    """(loss, {name: grad or None}) of one step of `compiled` (`model` when None)."""
    model.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else torch.enable_grad()
    with context:
        loss = (model if compiled is None else compiled)(*batch)
    loss.backward()
    return loss.detach().float(), {n: None if p.grad is None else p.grad.float() for n, p in model.named_parameters()}


def relative_error(got, truth) -> float:
    scale = truth.abs().max().item() if truth.numel() else 0.0
    return (got - truth).abs().max().item() / max(scale, 1e-12) if truth.numel() else 0.0


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + CASES))
def test_random_case_matches_eager(seed):
    case = Case.draw(seed)
    torch.manual_seed(seed)
    truth_model = Model(case)
    model = copy.deepcopy(truth_model)
    dtype = LOW_PRECISION.get(case.precision)
    if dtype is not None:
        model = model.to(dtype)
    reference = copy.deepcopy(model)
    backend = mst_fx.backend(compiler="aot_eager", **case.chunking)
    compiled = torch.compile(model, backend=backend, dynamic=True if case.dynamic else None)
    for length in case.lengths:
        batch = batch_of(case, length, seed)
        got_loss, got = step(model, batch, case.precision, compiled)
        eager_loss, eager = step(reference, batch, case.precision)
        assert {n for n, g in got.items() if g is None} == {n for n, g in eager.items() if g is None}, case
        if case.precision == "fp32":
            torch.testing.assert_close(got_loss, eager_loss, rtol=1e-4, atol=0, equal_nan=True, msg=str(case))
            for name, g in got.items():
                if g is not None:
                    torch.testing.assert_close(g, eager[name], rtol=1e-4, atol=1e-6, msg=f"{name}: {case}")
            continue
        truth_loss, truth = step(truth_model, batch, "fp32")
        slack = 0.25 * torch.finfo(dtype or torch.bfloat16).eps
        if torch.isnan(truth_loss):  # every label ignored under "mean": NaN for everyone
            assert torch.isnan(got_loss) and torch.isnan(eager_loss), case
        else:
            bound = 4 * relative_error(eager_loss, truth_loss) + slack
            assert relative_error(got_loss, truth_loss) <= bound, ("loss", case)
        for name, t in truth.items():
            if t is None:
                continue
            bound = 4 * relative_error(eager[name], t) + slack
            assert relative_error(got[name], t) <= bound, (name, relative_error(got[name], t), bound, case)
