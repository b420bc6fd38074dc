"""Real TRL trainers (TRL 1.14: log-probs and entropy from the model's full logits), GRPO and DPO, run
for a few steps with the model compiled by mst: the same losses and logged metrics as without mst,
and the head rewritten, its logits deferred, never computed in full.

tools/trl_run.py builds everything in code (a tiny Llama, a word-level tokenizer, an in-memory data
set, a reward in Python): nothing is downloaded. TRL >= 1.15 computes log-probs with its own chunked
kernel instead of the logits (the README says so); this test is for the versions that do not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

trl = pytest.importorskip("trl")

TRL_RUN = os.path.join(os.path.dirname(__file__), "..", "tools", "trl_run.py")
TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def run(trainer: str, mode: str, tmp_path) -> dict:
    out = tmp_path / f"{trainer}-{mode}.json"
    command = [sys.executable, TRL_RUN, "--trainer", trainer, "--steps", "3", "--mode", mode, "--json-out", str(out),
               "--chunk-size", "16"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["error"] is None, result["error"]
    return result


@pytest.mark.skipif(not trl.__version__.startswith("1.14."), reason="TRL >= 1.15 replaces the head with its own kernel")
@pytest.mark.parametrize("trainer", ["grpo", "dpo"])
def test_trainer_with_mst_logs_what_it_logs_without(trainer, tmp_path):
    """GRPO: log-probs, a reference model's, entropy. DPO: chosen and rejected log-probs, and metrics
    read off the (detached, masked) logits and their argmax."""
    plain, mst = run(trainer, "plain", tmp_path), run(trainer, "mst-model", tmp_path)
    assert mst["completions"] == plain["completions"]  # generation is the same
    assert mst["exact_losses"] == pytest.approx(plain["exact_losses"], rel=1e-5, abs=1e-7)
    assert len(mst["logs"]) == len(plain["logs"]) == 4  # 3 steps, then the summary
    for got, expected in zip(mst["logs"], plain["logs"]):
        assert got.keys() == expected.keys()
        for key in expected.keys() - TIMING:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), (got["step"], key)
    assert "lm_head (loss outside)" in mst["mst_last_report"], mst["mst_last_report"]
    assert not [line for line in mst["mst_fx_log"] if "computed them in full" in line], mst["mst_fx_log"]
