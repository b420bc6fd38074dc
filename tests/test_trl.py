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
import torch

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


# A metric that thresholds a difference of logged values: (the metric, the difference it thresholds).
THRESHOLDED = {"rewards/accuracies": "rewards/margins"}  # DPO: mean(chosen reward > rejected reward)


def at_a_tie(logged: dict) -> set[str]:
    """The thresholded metrics of a step whose difference is at a tie (within the tolerance the
    values are compared with): DPO's first step, where the policy is its reference and every reward
    is 0. There a rounding-sized reward flips the `>`, so the metric says nothing of parity; the
    rewards themselves are still compared."""
    return {metric for metric, difference in THRESHOLDED.items() if abs(logged.get(difference, 1.0)) <= 1e-5}


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
        for key in expected.keys() - TIMING - at_a_tie(expected):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), (got["step"], key)
    assert "lm_head (loss outside)" in mst["mst_last_report"], mst["mst_last_report"]
    assert not [line for line in mst["mst_fx_log"] if "computed them in full" in line], mst["mst_fx_log"]


def test_padding_free_sft_step_matches_eager(tmp_path):
    """TRL's SFTTrainer with `padding_free=True` (a batch flattened into one row, positions
    restarting per document, no attention_mask) under bf16 autocast, its loss compiled with mst:
    the documents' mask is read and run by blocks, and one SGD step moves every weight as eager's
    does (the step is the learning rate times the gradient)."""
    import copy
    import random

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    import mst_fx

    sys.path.insert(0, os.path.dirname(TRL_RUN))
    from trl_run import _sentence, build_tokenizer

    tokenizer = build_tokenizer()
    rng = random.Random(0)
    data = Dataset.from_dict({"text": [_sentence(rng, 5, 14) for _ in range(8)]})
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         attn_implementation="sdpa")  # fmt: skip
    start = LlamaForCausalLM(config)

    def one_step(compiled: bool):
        model = copy.deepcopy(start)
        args = trl.SFTConfig(output_dir=str(tmp_path), padding_free=True, max_length=None, per_device_train_batch_size=4,
                             max_steps=1, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0,
                             bf16=True, use_cpu=True, report_to=[], save_strategy="no", seed=0, data_seed=0)  # fmt: skip
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        if compiled:
            trainer.compute_loss = torch.compile(trainer.compute_loss, backend=mst_fx.backend(chunk_size=8))
        return trainer.train().training_loss, model

    plain_loss, plain = one_step(False)
    mst_loss, mst = one_step(True)
    assert mst_loss == pytest.approx(plain_loss, rel=1e-4)
    for (name, got), (_, expected), (_, before) in zip(mst.named_parameters(), plain.named_parameters(),
                                                       start.named_parameters()):  # fmt: skip
        moved, expected_move = (got - before).detach(), (expected - before).detach()
        assert (moved - expected_move).abs().max() <= 2e-2 * expected_move.abs().max(), name
    sites = [s for r in mst_fx.compiled_reports() for s in r.sites if s.kind == "attention"]
    assert [(s.rewritten, s.mask) for s in sites] == [(True, "causal by position & documents")]
    assert sites[0].chunks > 1
