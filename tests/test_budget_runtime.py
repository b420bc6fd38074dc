"""The memory budget at run time (`mst_fx.runtime.memory_budget`): routed experts keep their
autograd graph when it fits, a keep that runs out of memory retreats to the lean rule, "auto"
follows the memory as it changes, and sites live and reserve room within their own compiled graph.

Memory limits the OS enforces are tested in `test_memory_limits.py`."""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from conftest import assert_parity, loss_of
from test_memory_budget import HEAD_WORK_ROW, LEAN_ROWS, _batch, _keep_threshold, _model
from test_moe_experts import loss_and_aux, mixtral, qwen3_moe

import mst_fx
from mst_fx.runtime import (
    chunk_bodies,
    chunked_experts,
    chunked_ops,
    chunked_token_ops,
    device_memory,
    kept_graphs,
    memory_budget,
)
from mst_fx.runtime.device_memory import Headroom


@pytest.fixture
def fresh_ledger(monkeypatch):
    """A ledger with no ceiling, and the retreat's warning not yet said."""
    monkeypatch.setattr(memory_budget, "_LEDGERS", {})
    monkeypatch.setattr(memory_budget, "_warned_retreat", set())


def _kinds(made, kind):
    return [d for k, _, d in made if k == kind]


# ---------------------------------------------------------------- routed experts keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", ["qwen3-moe grouped_mm", "qwen3-moe batched_mm", "mixtral"])
def test_experts_keep_with_parity_and_no_recompute(decisions, monkeypatch, model, dtype):
    """Under a budget they fit, the experts keep their autograd graph: loss and every gradient as
    eager's (the router's and the aux loss's included), and the backward never runs the chunked
    recompute."""
    build = mixtral if model == "mixtral" else lambda d: qwen3_moe(model.split()[1], d)

    def no_recompute(*args, **kwargs):
        raise AssertionError("a kept expert site recomputed its dispatch")

    monkeypatch.setattr(chunked_experts, "_backward_loop", no_recompute)
    tolerances = {} if dtype == torch.float32 else {"scaled_tol": 2e-2, "rtol": 2e-2}
    counts = assert_parity(build(dtype), loss_and_aux, _moe_batch(), memory_budget="1GiB", **tolerances)
    assert counts["moe experts"] == 2
    experts = _kinds(decisions, "ChunkedExperts")
    assert len(experts) == 2 and all(d.keep for d in experts)
    assert memory_budget.ledger(torch.device("cpu")).held == 0  # both keeps released by their backward


def test_experts_keep_under_activation_checkpointing(decisions):
    from mst_fx.models import enable_checkpointing

    model = qwen3_moe("grouped_mm", router_logits=False)
    enable_checkpointing(model)
    assert assert_parity(model, loss_and_aux, _moe_batch(), memory_budget="1GiB")["moe experts"] == 2
    assert any(d.keep for d in _kinds(decisions, "ChunkedExperts"))
    assert memory_budget.ledger(torch.device("cpu")).held == 0


def test_experts_recompute_where_the_keep_does_not_fit(decisions):
    """A budget with room for one chunk of the dispatch and not for the kept graph: recomputed."""
    counts = assert_parity(qwen3_moe("grouped_mm"), loss_and_aux, _moe_batch(), memory_budget=40_000)
    assert counts["moe experts"] == 2
    experts = _kinds(decisions, "ChunkedExperts")
    assert experts and not any(d.keep for d in experts)


def test_experts_keep_charges_what_autograd_saved():
    """The bytes charged while kept are those autograd saved, within the pass's bound per token."""
    model = qwen3_moe("grouped_mm", layers=1, router_logits=False)
    compiled = torch.compile(model, backend=mst_fx.backend(memory_budget="1GiB", compiler="aot_eager"))
    ids, labels = _moe_batch()
    loss = loss_and_aux(compiled, ids, labels)
    held = memory_budget.ledger(torch.device("cpu")).held
    (site,) = [s for s in mst_fx.last_report().sites if s.kind == "moe experts"]
    assert 0 < held <= site.tokens * site.kept_row_bytes
    loss.backward()
    assert memory_budget.ledger(torch.device("cpu")).held == 0


def _moe_batch():
    return _batch(600)[0].remainder(512), _batch(600, seed=2)[0].remainder(512)  # 600 tokens: over one lean chunk


# ---------------------------------------------------------------- per-token heads keep


@pytest.mark.parametrize("loss_name", ["grpo", "dpo", "entropy_logged"])
def test_per_token_heads_keep_with_parity_and_no_recompute(decisions, monkeypatch, loss_name):
    """GRPO's log-probs, DPO's gather - logsumexp, and values computed without grad beside them:
    kept as one autograd graph over every token, the backward runs no head matmul again."""
    import test_token_heads as heads

    def no_recompute(*args, **kwargs):
        raise AssertionError("a kept per-token head recomputed its chunks")

    monkeypatch.setattr(chunked_token_ops, "_gradient_loop", no_recompute)
    torch.manual_seed(0)
    inputs = heads.batch(length=100)  # 4 x 99 tokens: over one lean chunk, so the head is rewritten
    both = heads.run_both(getattr(heads, loss_name), heads.TinyLM(), inputs, chunk_size="auto", memory_budget="1GiB")
    heads.assert_same_step(*both)
    rows = _kinds(decisions, "ChunkedLinearRows")
    assert rows and all(d.keep for d in rows)
    assert memory_budget.ledger(torch.device("cpu")).held == 0


# ---------------------------------------------------------------- a keep that runs out of memory


def _failing_once(function, error):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return function(*args, **kwargs)

    return failing, calls


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")],
    ids=["cuda", "cpu"],
)  # fmt: skip
def test_mlp_keep_out_of_memory_retreats_lean(decisions, monkeypatch, fresh_ledger, caplog, error):
    """The first keep fails to allocate: that call runs at the lean rule, the budget is capped at
    half of what it had reached, one WARNING says so, and training is exact."""
    failing, calls = _failing_once(chunked_ops._keeping_forward, error)
    monkeypatch.setattr(chunked_ops, "_keeping_forward", failing)
    with caplog.at_level(logging.WARNING, logger="mst_fx"):
        assert_parity(_model(2), loss_of, _batch(520), memory_budget="1GiB")
    first = _kinds(decisions, "ChunkedMLP")[0]
    assert first.keep and len(calls) >= 1
    ceiling = memory_budget.ledger(torch.device("cpu")).ceiling
    assert ceiling == (first.held + first.needs) // 2
    said = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert len(said) == 1 and "ChunkedMLP" in said[0] and str(ceiling) in said[0]
    later = [d for d in _kinds(decisions, "ChunkedMLP")[1:] if d.budget is not None]
    assert later and all(d.budget <= ceiling for d in later)


def test_experts_keep_out_of_memory_retreats_lean(decisions, monkeypatch, fresh_ledger):
    failing, _ = _failing_once(kept_graphs.run_keeping, torch.OutOfMemoryError("CUDA out of memory"))
    monkeypatch.setattr(kept_graphs, "run_keeping", failing)
    assert_parity(qwen3_moe("grouped_mm"), loss_and_aux, _moe_batch(), memory_budget="1GiB")
    assert memory_budget.ledger(torch.device("cpu")).ceiling is not None


def test_other_errors_are_not_taken_for_memory(monkeypatch, fresh_ledger):
    failing, _ = _failing_once(chunked_ops._keeping_forward, RuntimeError("shapes do not match"))
    monkeypatch.setattr(chunked_ops, "_keeping_forward", failing)
    compiled = torch.compile(_model(), backend=mst_fx.backend(memory_budget="1GiB", compiler="aot_eager"))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        loss_of(compiled, *_batch(520))


# ---------------------------------------------------------------- "auto" follows the memory


def test_auto_budget_shrinks_when_memory_is_taken_between_steps(decisions, monkeypatch):
    """Another process takes memory after the first steps: the next call's budget is smaller by
    what it took, and with too little left the MLP no longer keeps; the step stays exact."""
    monkeypatch.setattr(memory_budget, "_AUTO", {})
    free = [1 << 34]
    monkeypatch.setattr(device_memory, "headroom", lambda device: Headroom(free[0], "a test's figure"))
    monkeypatch.setattr(device_memory, "in_use", lambda device: 1 << 30)
    monkeypatch.setattr(device_memory, "peak", lambda device: 1 << 30)
    model = _model()
    compiled = torch.compile(model, backend=mst_fx.backend(compiler="aot_eager"))
    for _ in range(2):
        loss_of(compiled, *_batch(520)).backward()
    before = _kinds(decisions, "ChunkedMLP")[-1]
    assert before.keep
    decisions.clear()
    free[0] = _keep_threshold(520) // 2  # another process took all but this
    model.zero_grad(set_to_none=True)
    assert_parity(model, loss_of, _batch(520))
    after = [d for d in _kinds(decisions, "ChunkedMLP") if d.budget is not None]
    assert after and not after[0].keep and after[0].budget < before.budget


def test_auto_counts_a_peak_between_calls_as_the_process_own(monkeypatch):
    """A peak reached between two site calls (the optimizer's step, an attention backward) is
    memory outside the sites: it lowers the budget. One reached inside a call is the site's own."""
    monkeypatch.setattr(memory_budget, "_AUTO", {})
    in_use, mark = [100], [100]
    monkeypatch.setattr(device_memory, "in_use", lambda device: in_use[0])
    monkeypatch.setattr(device_memory, "peak", lambda device: mark[0])
    monkeypatch.setattr(device_memory, "headroom", lambda device: Headroom(10_000, "a test's figure"))
    cpu = torch.device("cpu")
    with memory_budget.site_call(memory_budget.AUTO, cpu):
        assert memory_budget.resolve(memory_budget.AUTO, cpu, held=0, tokens=10) is None  # not measured yet
        mark[0] = 5_000  # the call's own chunks
    memory_budget.note_backward(memory_budget.AUTO, cpu)
    assert memory_budget.auto(cpu).base == 100
    mark[0] = 3_000 + 5_000  # the optimizer's step, after the call ended
    budget = memory_budget.resolve(memory_budget.AUTO, cpu, held=0, tokens=10)
    assert memory_budget.auto(cpu).base == 8_000
    assert budget == int(10_100 * 0.9) - 8_000


def test_a_longer_sequence_runs_lean_once_to_be_measured(decisions, monkeypatch):
    monkeypatch.setattr(memory_budget, "_AUTO", {})
    monkeypatch.setattr(device_memory, "headroom", lambda device: Headroom(1 << 34, "a test's figure"))
    compiled = torch.compile(_model(), backend=mst_fx.backend(compiler="aot_eager"), dynamic=True)
    budgeted = []
    for tokens in (520, 520, 1040, 1040, 520):
        decisions.clear()
        loss_of(compiled, *_batch(tokens)).backward()
        budgeted.append(_kinds(decisions, "ChunkedMLP")[0].budget is not None)
    assert budgeted == [False, True, False, True, True]


def test_report_and_log_say_which_limit_auto_read(monkeypatch, caplog):
    monkeypatch.setattr(memory_budget, "_AUTO", {})
    ids, labels = _batch(520)
    report = mst_fx.explain(_model(), ids, example_kwargs={"labels": labels})
    source = device_memory.headroom(torch.device("cpu")).source  # this machine's: MemAvailable, or a cgroup
    assert {s.budget_source for s in report.sites if s.rewritten} == {f"auto: {source}"}
    assert f"memory budget read from: auto: {source}" in str(report)
    with caplog.at_level(logging.INFO, logger="mst_fx"):
        compiled = torch.compile(_model(), backend=mst_fx.backend(compiler="aot_eager"))
        loss_of(compiled, ids, labels).backward()
    said = [r.getMessage() for r in caplog.records if "memory_budget='auto'" in r.getMessage()]
    assert len(said) == 1 and f"reads {source}" in said[0]


# ---------------------------------------------------------------- sites: their lifetime and their group


def test_one_models_sites_do_not_reserve_room_in_anothers(decisions):
    """Model A's head has a lean chunk far above model B's budget. B's MLP reserves room for B's
    head only, and keeps; before groups, A's head counted in every site's reserve."""
    budget = _keep_threshold(520)
    backend = mst_fx.backend(memory_budget=budget, compiler="aot_eager")
    wide = torch.compile(_model_with_vocab(50_000), backend=backend)
    loss_of(wide, *_batch(520)).backward()
    assert 256 * 3 * 50_000 * 4 > budget  # A's head lean chunk alone is over B's budget
    decisions.clear()
    narrow = torch.compile(_model(), backend=backend)
    loss_of(narrow, *_batch(520)).backward()
    assert _kinds(decisions, "ChunkedMLP")[0].keep
    assert LEAN_ROWS * HEAD_WORK_ROW < budget


def test_sites_go_with_their_compiled_graph():
    """Once Dynamo drops the compiled graph, its sites and their compiled bodies are gone: the
    registry held them only while the graph did."""
    before = chunked_ops.live_site_keys()
    compiled = torch.compile(_model_with_vocab(1234), backend=mst_fx.backend(memory_budget="1GiB"))
    loss_of(compiled, *_batch(520)).backward()
    ours = chunked_ops.live_site_keys() - before
    assert len(ours) == 2  # the MLP and the head
    assert all(any(b[0][0] == k for b in chunk_bodies._BODIES) for k in ours)  # each compiled its bodies
    del compiled
    torch._dynamo.reset()
    gc.collect()
    assert not ours & chunked_ops.live_site_keys()
    assert not [b for b in chunk_bodies._BODIES if b[0][0] in ours]


def _model_with_vocab(vocab: int):
    from mst_fx.models import tiny_llama
    from test_memory_budget import HIDDEN, INTERMEDIATE

    torch.manual_seed(0)
    return tiny_llama(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=1, vocab=vocab)
