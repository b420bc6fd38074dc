"""mst inside the stacks people train with: `mst_fx.compile`, Hugging Face Trainer, accelerate.

Each test trains the same model twice from the same seed, eagerly and under mst, and compares the
losses and the parameters (or gradients); and it checks that the sites were rewritten, so that a
"parity" that only holds because nothing was chunked can't pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mst_fx
from mst_fx.models import random_batch, tiny_gpt2, tiny_llama

from conftest import assert_parity, rewritten_kinds, skipped_reasons

VOCAB = 96
OPTIONS = {"chunk_size": 16, "compiler": "aot_eager"}


def llama(layers=2):
    torch.manual_seed(0)
    return tiny_llama(hidden=32, intermediate=96, layers=layers, vocab=VOCAB)


def test_compile_is_in_place_and_validates_options():
    model = llama()
    assert mst_fx.compile(model, **OPTIONS) is model
    with pytest.raises(ValueError, match="chunk_size"):
        mst_fx.compile(llama(), chunk_size=0)


def test_logits_are_dropped_in_train_mode_only():
    """Liger-Kernel's rule: a model in eval mode keeps its logits, even with gradients on."""
    ids, labels = random_batch(VOCAB, 2, 24)
    reference = llama()
    model = mst_fx.compile(copy.deepcopy(reference), **OPTIONS)
    out = model(ids, labels=labels)
    assert type(out.logits).__name__ == "DroppedLogits"
    model.eval(), reference.eval()
    out, expected = model(ids, labels=labels), reference(ids, labels=labels)
    assert out.logits.requires_grad and type(out.logits) is torch.Tensor
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
    out.loss.backward()  # the eval-mode graph still trains: its MLPs are chunked
    assert any("eval mode" in r for r in skipped_reasons())
    model.train()
    assert type(model(ids, labels=labels).logits).__name__ == "DroppedLogits"


class _ReturnsLogits(nn.Module):
    """Never reads `self.training` itself, so only mst_fx.compile's guard tells the modes apart."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, ids, labels):
        logits = self.head(self.embed(ids))
        return F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1)), logits


def test_the_mode_guard_holds_for_a_model_that_never_reads_its_mode():
    torch.manual_seed(0)
    model = mst_fx.compile(_ReturnsLogits(), **OPTIONS)
    ids, labels = random_batch(VOCAB, 1, 32)
    assert type(model(ids, labels)[1]).__name__ == "DroppedLogits"
    model.eval()
    logits = model(ids, labels)[1]
    assert type(logits) is torch.Tensor and logits.shape == (1, 32, VOCAB)


def test_gpt2_as_users_build_it_has_its_head_rewritten():
    """A plain GPT2Config leaves `loss_type=None`; transformers then calls `logger.warning_once`
    between the head and the loss, a graph break unless mst tells Dynamo to trace through it."""
    torch.manual_seed(0)
    model = tiny_gpt2(hidden=32, layers=2, vocab=VOCAB)
    assert model.loss_type is None
    ids, labels = random_batch(VOCAB, 2, 24)
    kinds = assert_parity(model, lambda m, i, y: m(i, labels=y).loss, (ids, labels), **OPTIONS)
    assert kinds == {"mlp plain": 2, "lm_head": 1}


def test_from_pretrained_then_compile(tmp_path):
    llama().save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not model.training  # from_pretrained returns eval mode: in it, the logits would be kept
    model.train()
    ids, labels = random_batch(VOCAB, 1, 40)
    reference = copy.deepcopy(model)
    loss = mst_fx.compile(model, **OPTIONS)(ids, labels=labels).loss
    expected = reference(ids, labels=labels).loss
    loss.backward(), expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    _assert_same_gradients(model, reference)
    assert rewritten_kinds() == {"mlp gated": 2, "lm_head": 1}


def _assert_same_gradients(model, reference):
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def _dataset(count=8, tokens=40):
    ids, _ = random_batch(VOCAB, count, tokens, seed=1)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt the loss ignores: uneven counts per batch
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def _trainer(model, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, max_steps=2, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(4))


def test_hf_trainer_trains_and_evaluates_like_eager(tmp_path):
    """Train with gradient accumulation (the loss divided by `num_items_in_batch`), then evaluate:
    the same training losses, weights and eval_loss as the eager model."""
    reference = _trainer(llama(), tmp_path / "eager")
    reference.train()
    trainer = _trainer(mst_fx.compile(llama(), **OPTIONS), tmp_path / "mst")
    trainer.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (trainer, reference)]
    assert len(losses[0]) == 2
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), reference.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert rewritten_kinds()["lm_head"] >= 1 and rewritten_kinds()["mlp gated"] >= 2
    metrics, expected = trainer.evaluate(), reference.evaluate()
    torch.testing.assert_close(metrics["eval_loss"], expected["eval_loss"], rtol=1e-5, atol=0)


def test_accelerate_prepare_after_compile():
    from accelerate import Accelerator

    ids, labels = random_batch(VOCAB, 2, 40)
    reference = llama()
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(mst_fx.compile(copy.deepcopy(reference), **OPTIONS))
    loss = model(ids, labels=labels).loss
    accelerator.backward(loss)
    expected = reference(ids, labels=labels).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    _assert_same_gradients(accelerator.unwrap_model(model), reference)
    assert rewritten_kinds() == {"mlp gated": 2, "lm_head": 1}
