"""A representative handful of Hugging Face families, built as `tools/coverage.py` builds them
(`mst_fx.models.tiny_configs`): every layer's MLP and the LM head are rewritten, with eager's loss and
gradients. `docs/coverage.md` has every family."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import assert_parity, loss_of

from mst_fx.models import random_batch
from mst_fx.models.tiny_configs import mlp_layer_count, tiny_model, why_not_built

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# family -> the MLP form the pass should see in each of its layers
FAMILIES = {
    "llama": "mlp gated",
    "mistral": "mlp gated",
    "qwen2": "mlp gated",  # biased q/k/v projections
    "gemma2": "mlp gated",  # gelu-tanh gate; the head's logits are soft-capped before the loss
    "phi3": "mlp fused",  # one gate_up linear split with chunk(2, -1)
    "gpt2": "mlp plain",  # Conv1D: addmm with a transposed weight
    "gpt_neox": "mlp plain",  # GELU between two biased linears
}


@pytest.mark.parametrize("family, mlp_kind", FAMILIES.items(), ids=FAMILIES)
def test_every_mlp_and_the_lm_head_are_rewritten_with_parity(family, mlp_kind):
    model = tiny_model(family)
    if family == "gemma2":
        assert model.config.final_logit_softcapping, "the soft-capped head is what this family is here for"
    inputs = random_batch(model.config.vocab_size, batch=2, tokens=17, ignore_every=7)  # 34 tokens: uneven chunks
    kinds = assert_parity(model, loss_of, inputs, chunks=4)
    # The attention mask, where one is built and proved causal (not with sliding windows): one site.
    assert kinds.pop("attention", 0) <= 1
    assert kinds == {mlp_kind: mlp_layer_count(family, model.config), "lm_head": 1}


def test_multimodal_and_draft_models_are_not_built_and_say_why():
    assert why_not_built("llama") is None
    assert why_not_built("gemma3").startswith("multimodal")
    assert "draft model" in why_not_built("gemma4_assistant")
    with pytest.raises(ValueError, match="multimodal"):
        tiny_model("gemma3")


def test_coverage_tool_runs_each_family_in_its_own_process(tmp_path):
    output = tmp_path / "coverage.md"
    command = [sys.executable, "tools/coverage.py", "--families", "gpt2,gemma3", "--output", str(output)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    text = output.read_text()
    assert "| gpt2 " in text and "| 2/2/2 " in text and "| yes " in text
    assert "not built: multimodal" in text
    assert "python tools/coverage.py --families gpt2,gemma3" in text
