"""MLP forms beyond the three basic ones: a fused gate/up linear with the activation on either half,
and the gated product scaled by a Python number before the down projection. Each is rewritten, with
the loss and every gradient equal to eager's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_parity, skipped_reasons

D, I = 32, 96


class GatedMLP(nn.Module):
    def __init__(self, fused: bool, act_half: int, scale):
        super().__init__()
        self.fused, self.act_half, self.scale = fused, act_half, scale
        if fused:
            self.gate_up = nn.Linear(D, 2 * I, bias=False)
        else:
            self.gate, self.up = nn.Linear(D, I, bias=False), nn.Linear(D, I, bias=False)
        self.down = nn.Linear(I, D, bias=False)

    def forward(self, x):
        if self.fused:
            halves = self.gate_up(x).chunk(2, dim=-1)
            gate, up = halves[self.act_half], halves[1 - self.act_half]
        else:
            gate, up = self.gate(x), self.up(x)
        hidden = up * F.gelu(gate, approximate="tanh")
        if self.scale == "mul":
            hidden = hidden * 0.5
        elif self.scale == "rmul-div":
            hidden = 2.0 * hidden / 3.0
        return x + self.down(hidden)


@pytest.mark.parametrize("scale", [None, "mul", "rmul-div"])
@pytest.mark.parametrize("form", ["separate", "fused-act-first-half", "fused-act-second-half"])
def test_gated_mlp_forms(form, scale):
    torch.manual_seed(0)
    mlp = GatedMLP(fused=form != "separate", act_half=1 if form.endswith("second-half") else 0, scale=scale)
    x = torch.randn(2, 40, D)
    kinds = assert_parity(mlp, lambda m, x: m(x).pow(2).mean(), (x,), chunk_size=16)
    expected = "mlp gated" if form == "separate" else "mlp fused"
    assert kinds == {expected: 1}, skipped_reasons()


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_gated_product_scaled_per_channel(fused):
    """`up * act(gate) * self.scale` with a learned (I,) scale: rewritten, the scale's gradient too."""

    class Scaled(GatedMLP):
        def __init__(self):
            super().__init__(fused=fused, act_half=0, scale=None)
            self.channel_scale = nn.Parameter(torch.linspace(0.5, 1.5, I))

        def forward(self, x):
            if self.fused:
                gate, up = self.gate_up(x).chunk(2, dim=-1)
            else:
                gate, up = self.gate(x), self.up(x)
            return x + self.down(up * F.silu(gate) * self.channel_scale)

    torch.manual_seed(0)
    x = torch.randn(2, 40, D)
    kinds = assert_parity(Scaled(), lambda m, x: m(x).pow(2).mean(), (x,), chunk_size=16)
    assert kinds == {"mlp fused" if fused else "mlp gated": 1}, skipped_reasons()
