"""The memory budget (`mst_fx.runtime.memory_budget`): each site decides per call between keeping
its intermediates (no recompute) and the fewest chunks that fit; parity in both modes, decisions at
their boundaries, no recompile when the answer changes, and what is said when nothing fits."""

import gc
import logging

import pytest
import torch
from conftest import assert_parity, loss_of

import mst_fx
from mst_fx.inspect import report_format
from mst_fx.models import tiny_llama
from mst_fx.options import MstOptions
from mst_fx.runtime import memory_budget
from mst_fx.runtime.memory_budget import MIN_ROWS, choose

# The tiny Llama below: one gated MLP (d 64 -> I 256) and an LM head (V 1000), fp32, on CPU.
HIDDEN, INTERMEDIATE, VOCAB = 64, 256, 1000
KEEP_ROW = 2 * INTERMEDIATE * 4  # gate and up, kept
MLP_WORK_ROW = 6 * INTERMEDIATE * 4  # one chunk's tensors (`ChunkedSite.WORK_TENSORS`)
HEAD_WORK_ROW = 3 * VOCAB * 4
LEAN_ROWS = 256  # chunk_size="auto" on CPU at these widths and lengths: the floor


def _model(layers=1):
    torch.manual_seed(0)
    return tiny_llama(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=layers, vocab=VOCAB)


def _batch(tokens, seed=1):
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, ::7] = -100
    return ids, labels


def _keep_threshold(tokens: int) -> int:
    """The smallest budget under which the MLP keeps, with nothing held: its keep plus the larger of
    its own one-chunk working memory and the head's lean chunk, which it must leave room for."""
    head_lean_chunk = LEAN_ROWS * HEAD_WORK_ROW
    return tokens * KEEP_ROW + max(tokens * MLP_WORK_ROW, head_lean_chunk)


@pytest.fixture
def fresh_auto(monkeypatch):
    """"auto" as on a device with `free` bytes free and `in_use` bytes held by this process."""
    from mst_fx.runtime import device_memory

    monkeypatch.setattr(memory_budget, "_AUTO", {})

    def on(free: int, in_use: int):
        monkeypatch.setattr(device_memory, "headroom", lambda device: device_memory.Headroom(free, "a test's figure"))
        monkeypatch.setattr(device_memory, "in_use", lambda device: in_use)
        monkeypatch.setattr(device_memory, "peak", lambda device: in_use)

    return on


# ---------------------------------------------------------------- the rule


def test_keeps_when_it_fits_exactly_and_not_one_byte_short():
    tokens, held, reserve = 1000, 5000, 7000
    exact = held + tokens * 10 + max(tokens * 30, reserve)
    assert choose(tokens, exact, held, reserve, 10, 30, True).keep
    short = choose(tokens, exact - 1, held, reserve, 10, 30, True)
    assert not short.keep and short.rows >= tokens  # one chunk still fits; recomputed


def test_reserve_for_later_sites_bounds_keeping():
    tokens = 1000
    # its own working memory is small, but a later site's lean chunk must still fit beside the keep
    assert choose(tokens, tokens * 10 + 50_000, 0, 50_000, 10, 1, True).keep
    assert not choose(tokens, tokens * 10 + 49_999, 0, 50_000, 10, 1, True).keep


def test_one_chunk_fits_exactly_and_not_one_byte_short():
    tokens, held = 1000, 123
    exact = choose(tokens, held + tokens * 30, held, 0, 0, 30, False)
    assert exact.rows >= tokens and exact.fits
    short = choose(tokens, held + tokens * 30 - 1, held, 0, 0, 30, False)
    assert short.rows == 512 and short.fits  # the fewest chunks that fit: power-of-two rows


def test_one_chunk_of_any_length_is_its_binary_pieces():
    """So that chunk bodies compiled per power of two serve every length (one per N would compile
    again at each new length of a dynamic graph)."""
    from mst_fx.runtime.chunk_plan import ChunkPolicy

    for tokens, pieces in [(512, [(0, 512)]), (520, [(0, 512), (512, 8)]), (7, [(0, 4), (4, 2), (6, 1)])]:
        for decision in (choose(tokens, 1 << 40, 0, 0, 10, 30, True), choose(tokens, 1 << 40, 0, 0, 0, 30, False)):
            assert ChunkPolicy(rows=decision.rows).chunks(tokens, 1, 1, "cpu") == pieces


def test_fewest_chunks_that_fit():
    for room_rows, rows in [(999, 512), (512, 512), (511, 256), (MIN_ROWS, MIN_ROWS)]:
        decision = choose(10_000, room_rows * 30, 0, 0, 0, 30, False)
        assert (decision.rows, decision.fits) == (rows, True), room_rows


def test_nothing_fits_runs_finest_and_says_so():
    decision = choose(10_000, MIN_ROWS * 30 - 1, 0, 0, 0, 30, False)
    assert decision.rows == MIN_ROWS and not decision.fits
    assert decision.needs == MIN_ROWS * 30


def test_a_site_that_cannot_keep_never_keeps():
    assert not choose(10, 1 << 40, 0, 0, 10, 30, False).keep


# ---------------------------------------------------------------- the option


@pytest.mark.parametrize(
    ("value", "parsed"),
    [(0, 0), (123, 123), ("6GiB", 6 << 30), ("512MB", 512 * 10**6), ("1.5 kib", 1536), ("auto", "auto"),
     ("off", "off"), ("OFF", "off")],
)  # fmt: skip
def test_budget_values(value, parsed):
    assert MstOptions(memory_budget=value).budget == parsed


@pytest.mark.parametrize("value", [-1, True, 1.5, None, "", "lots", "6 parsecs", "GiB", [1]])
def test_bad_budget_raises_naming_the_option(value):
    with pytest.raises(ValueError, match="'memory_budget'.*'6GiB'.*'auto'"):
        MstOptions(memory_budget=value)


def test_bad_budget_raises_through_torch_compile():
    ids, labels = _batch(64)
    compiled = torch.compile(_model(), backend="mst", options={"memory_budget": "plenty"})
    with pytest.raises(Exception, match="memory_budget"):
        compiled(ids, labels=labels)


def test_budget_with_fixed_chunking_is_refused():
    with pytest.raises(ValueError, match="'memory_budget'.*'chunk_size' or 'chunks'"):
        MstOptions(memory_budget="1GiB", chunks=4)
    assert MstOptions(chunks=4).policy.count == 4  # the default budget gives way to fixed chunking


# ---------------------------------------------------------------- in a model: parity in both modes


def _mlp_decisions(made, tokens=None):
    return [d for kind, n, d in made if kind == "ChunkedMLP" and tokens in (None, n)]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_parity_when_kept(decisions, compiler):
    ids, labels = _batch(520)
    assert_parity(_model(2), loss_of, (ids, labels), memory_budget="1GiB", compiler=compiler)
    forward = _mlp_decisions(decisions)
    assert len(forward) == 2 and all(d.keep for d in forward)  # the backward replays: it decides nothing


def test_parity_when_recomputed_in_chunks(decisions):
    ids, labels = _batch(520)
    budget = 200 * MLP_WORK_ROW  # room for chunks of 128 rows, no keep
    assert_parity(_model(2), loss_of, (ids, labels), memory_budget=budget)
    mlp = _mlp_decisions(decisions)
    assert mlp and all(not d.keep and d.rows == 128 for d in mlp)
    head = [d for kind, _, d in decisions if kind == "ChunkedLinearCrossEntropy"]
    assert [d.rows for d in head] == [64]  # 200 * 6144 bytes over 12000 per row: 102 rows, 64 as a power of two


def test_parity_when_kept_under_bf16_autocast(decisions):
    ids, labels = _batch(520)
    assert_parity(_model(2), loss_of, (ids, labels), memory_budget="1GiB", autocast=torch.bfloat16,
                  rtol=2e-2, scaled_tol=2e-2)  # fmt: skip
    assert all(d.keep for d in _mlp_decisions(decisions))


def test_parity_when_kept_under_activation_checkpointing(decisions):
    ids, labels = _batch(520)
    model = _model(2)
    model.gradient_checkpointing_enable()
    model.train()
    assert_parity(model, loss_of, (ids, labels), memory_budget="1GiB")
    # the forward keeps what checkpointing drops; the recomputed forward keeps what its backward replays
    assert all(d.keep for d in _mlp_decisions(decisions))


@pytest.mark.parametrize("form", ["separate", "fused", "scaled", "plain gelu"])
def test_every_mlp_form_keeps_with_parity(decisions, form):
    """The replay stands in for each linear the chunk calls, whatever combines them: a fused gate/up
    split in two, a Python scale on the product, a plain (non-gated) MLP."""
    from test_mlp_forms import D, GatedMLP

    torch.manual_seed(0)
    if form == "plain gelu":
        mlp = torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.GELU(), torch.nn.Linear(4 * D, D))
    else:
        mlp = GatedMLP(fused=form == "fused", act_half=1, scale="rmul-div" if form == "scaled" else None)
    x = torch.randn(2, 300, D)  # 600 rows: more than one lean chunk, so the site is rewritten
    assert_parity(mlp, lambda m, x: m(x).pow(2).mean(), (x,), memory_budget="1GiB")
    assert _mlp_decisions(decisions) and all(d.keep for d in _mlp_decisions(decisions))


def test_gpt2_conv1d_mlp_keeps_with_parity(decisions):
    from mst_fx.models import tiny_gpt2

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, 600))
    assert_parity(tiny_gpt2(), loss_of, (ids, ids.clone()), memory_budget="1GiB")
    assert _mlp_decisions(decisions) and all(d.keep for d in _mlp_decisions(decisions))


def test_lora_mlp_keeps_with_parity(decisions):
    """LoRA on gate, up and down: the adapters' linears are replayed too, and their A and B get
    gradients from the kept outputs."""
    from test_lora import LLAMA_MLP, with_lora

    model = with_lora(_model(), LLAMA_MLP)
    ids, labels = _batch(520)
    assert_parity(model, lambda m, i, l: m(input_ids=i, labels=l).loss, (ids, labels), memory_budget="1GiB")
    assert _mlp_decisions(decisions) and all(d.keep for d in _mlp_decisions(decisions))


# ---------------------------------------------------------------- boundaries in a model, and the report


@pytest.mark.parametrize(("below", "kept"), [(0, True), (1, False)])
def test_model_decides_at_the_boundary(decisions, below, kept):
    tokens = 520
    budget = _keep_threshold(tokens) - below
    ids, labels = _batch(tokens)
    assert_parity(_model(), loss_of, (ids, labels), memory_budget=budget)
    mlp = _mlp_decisions(decisions)[0]  # the forward's (a recomputing backward decides again)
    assert (mlp.keep, mlp.budget, mlp.held) == (kept, budget, 0)
    if not kept:
        assert mlp.rows >= tokens  # its one chunk fits: one chunk, recomputed
    report = mst_fx.explain(_model(), ids, example_kwargs={"labels": labels}, memory_budget=budget)
    (site,) = [s for s in report.sites if s.kind == "mlp gated"]
    assert site.budget == budget
    assert site.decision == ("kept, no recompute" if kept else "one chunk")


def test_report_gives_every_budgeted_site_its_decision():
    ids, labels = _batch(520)
    report = mst_fx.explain(_model(2), ids, example_kwargs={"labels": labels}, memory_budget=200 * MLP_WORK_ROW)
    decided = {s.kind: s.decision for s in report.sites if s.rewritten}
    # the LM head computes its gradients in forward: chunked, it recomputes nothing
    assert decided == {"mlp gated": "5 chunks of 128, recomputed", "lm_head": "9 chunks of 64"}
    assert "5 chunks of 128, recomputed; of 1.17 MiB" in report_format.to_table(report)


# ---------------------------------------------------------------- across a step, and across calls


def test_second_forward_before_backward_sees_the_first_ones_keep(decisions):
    """Gradient accumulation: two forwards, one backward. The budget holds one MLP's keep and the
    head's chunk; the second forward finds the first's keep held, and recomputes."""
    tokens = 520
    budget = _keep_threshold(tokens) + tokens * KEEP_ROW - 1
    model = _model()
    reference = _copy(model)
    compiled = torch.compile(model, backend=mst_fx.backend(memory_budget=budget, compiler="aot_eager"))
    batches = [_batch(tokens, seed) for seed in (1, 2)]
    (loss_of(compiled, *batches[0]) + loss_of(compiled, *batches[1])).backward()
    (loss_of(reference, *batches[0]) + loss_of(reference, *batches[1])).backward()
    first, second = _mlp_decisions(decisions)[:2]  # the forwards'; the second's backward decides again
    assert first.keep and not second.keep and second.held == tokens * KEEP_ROW
    _assert_same_grads(model, reference)
    assert memory_budget.ledger(torch.device("cpu")).held == 0


def test_no_recompile_when_length_or_answer_changes(decisions):
    budget = _keep_threshold(520)  # 520 tokens keep; 1040 do not fit a keep
    model = _model()
    compiled = torch.compile(model, backend=mst_fx.backend(memory_budget=budget), dynamic=True)
    loss_of(compiled, *_batch(520)).backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in (1040, 520, 700):
            reference = _copy(model)
            model.zero_grad()
            loss = loss_of(compiled, *_batch(tokens))
            loss.backward()
            expected = loss_of(reference, *_batch(tokens))
            expected.backward()
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
            _assert_same_grads(model, reference)
    assert [d.keep for d in _mlp_decisions(decisions, 520)] == [True, True]
    assert not any(d.keep for d in _mlp_decisions(decisions, 1040))


def test_kept_intermediates_are_released_without_backward():
    model = _model()
    compiled = torch.compile(model, backend=mst_fx.backend(memory_budget="1GiB", compiler="aot_eager"))
    ledger = memory_budget.ledger(torch.device("cpu"))
    loss = loss_of(compiled, *_batch(520))
    assert ledger.held == 520 * KEEP_ROW
    del loss  # an evaluation with grad on: no backward ever comes
    gc.collect()
    assert ledger.held == 0


def test_over_budget_warns_once_with_the_numbers(caplog):
    ids, labels = _batch(520)
    budget = MIN_ROWS * MLP_WORK_ROW - 1  # not even MIN_ROWS rows of the MLP fit
    with caplog.at_level(logging.WARNING, logger="mst_fx"):
        kinds = assert_parity(_model(), loss_of, (ids, labels), memory_budget=budget)
    assert kinds["mlp gated"] == 1
    said = [r.getMessage() for r in caplog.records if "does not fit memory_budget" in r.getMessage()]
    assert len(said) == 1
    assert f"memory_budget={budget} bytes" in said[0] and f"needs {MIN_ROWS * MLP_WORK_ROW} bytes" in said[0]


# ---------------------------------------------------------------- "auto"


def test_auto_runs_the_first_step_lean_then_keeps(decisions, fresh_auto):
    fresh_auto(free=1 << 34, in_use=1 << 30)
    model = _model()
    compiled = torch.compile(model, backend=mst_fx.backend(compiler="aot_eager"))  # the default: "auto"
    loss_of(compiled, *_batch(520)).backward()
    first = _mlp_decisions(decisions)
    assert first[0].budget is None and first[0].rows == LEAN_ROWS
    decisions.clear()
    loss_of(compiled, *_batch(520)).backward()
    (second,) = _mlp_decisions(decisions)
    capacity = (1 << 34) + (1 << 30)
    assert second.keep and second.budget == int(capacity * (1 - memory_budget.AUTO_MARGIN)) - (1 << 30)


def test_auto_recomputes_when_the_device_is_short(decisions, fresh_auto):
    fresh_auto(free=_keep_threshold(520) // 2, in_use=1 << 20)
    model = _model()
    compiled = torch.compile(model, backend=mst_fx.backend(compiler="aot_eager"))
    for _ in range(2):
        decisions.clear()
        loss_of(compiled, *_batch(520)).backward()
    second = _mlp_decisions(decisions)[0]
    assert second.budget is not None and not second.keep


# ---------------------------------------------------------------- helpers


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _assert_same_grads(model, reference):
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
