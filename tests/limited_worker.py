"""A training step run by `test_memory_limits.py` in a child process, inside a memory cgroup.

    python limited_worker.py '{"tokens": 4096, "steps": 3, "options": {"memory_budget": "off"}, ...}'

A Llama-shaped model with random weights (hidden, intermediate, layers, vocab as given), AdamW, as
a trainer runs it. With "hog": {"after_step": k, "bytes": n}, a second process is started after
step k that allocates n bytes, touches them and holds them until this one ends: memory that another
process takes while this one trains. Prints one JSON line: every step's loss, and every decision
the memory budget made, per step.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import torch

import mst_fx
from mst_fx.models import random_batch, tiny_llama
from mst_fx.runtime import memory_budget

HOG = "import sys; held = b'\\x01' * int(sys.argv[1]); print('held', flush=True); sys.stdin.read()"


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(spec: dict) -> dict:
    said = _Lines()
    logging.getLogger("mst_fx").addHandler(said)
    logging.getLogger("mst_fx").setLevel(logging.INFO)
    decisions: list[list[dict]] = []
    decide = memory_budget.decide

    def recorded(setting, group, key, x, *rest):
        decision = decide(setting, group, key, x, *rest)
        decisions[-1].append({"site": key.split("-")[0], "tokens": x.shape[0], "keep": decision.keep,
                              "rows": decision.rows, "budget": decision.budget})  # fmt: skip
        return decision

    memory_budget.decide = recorded
    torch.manual_seed(0)
    model = tiny_llama(spec["hidden"], spec["intermediate"], spec["layers"], spec["vocab"])
    compiled = torch.compile(model, backend="mst", options=spec["options"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels = random_batch(spec["vocab"], 1, spec["tokens"], ignore_every=7, seed=0)
    hog, losses = None, []
    for step in range(spec["steps"]):
        decisions.append([])
        loss = compiled(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if spec.get("hog") and step == spec["hog"]["after_step"]:
            hog = subprocess.Popen([sys.executable, "-c", HOG, str(spec["hog"]["bytes"])], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert hog.stdout.readline().strip() == "held"
    if hog is not None:
        hog.kill()
    return {"losses": losses, "decisions": decisions, "log": said.lines}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
