"""The inspection tool: `mst_fx.explain`, `mst_fx.last_report`, the estimate and the `mst-inspect` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mst_fx.passes import SiteReport
from test_saved_for_backward import dynamo_graph
from torch import fx, nn

import mst_fx
from mst_fx import ModelReport
from mst_fx.dynamo_backend import hand_off
from mst_fx.explain_model import inspect_main as main
from mst_fx.inspect.memory_estimate import estimate_peak, estimate_site
from mst_fx.inspect.report_format import graph_code, to_json, to_table
from mst_fx.models import MLPStack, SwiGLU, enable_checkpointing, random_batch, tiny_llama

TOKENS, HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 2048, 64, 256, 500, 3


def llama_on_meta():
    with torch.device("meta"):
        model = tiny_llama(HIDDEN, INTERMEDIATE, LAYERS, VOCAB)
    ids = torch.zeros(1, TOKENS, dtype=torch.long, device="meta")
    return model, ids


def explain_llama(**options) -> ModelReport:
    model, ids = llama_on_meta()
    return mst_fx.explain(model, ids, example_kwargs={"labels": ids, "use_cache": False}, **options)


def row_of(table: str, location: str) -> str:
    """The table's row for the site at `location`."""
    return next(line for line in table.splitlines() if line.startswith(f"| {location} "))


def test_tiny_llama_lists_every_site_as_rewritten_with_the_backends_chunks():
    report = explain_llama(memory_budget="off")  # the lean rule's chunks (the budget's: test_memory_budget)
    # With use_cache=False and no attention_mask, transformers builds an N x N (packed-sequence) mask.
    expected = ["model.layers.0.self_attn"] + [f"model.layers.{i}.mlp" for i in range(LAYERS)] + ["lm_head"]
    assert [s.location for s in report.sites] == expected
    assert [s.kind for s in report.sites] == ["attention"] + ["mlp gated"] * LAYERS + ["lm_head"]
    assert report.sites[0].rewritten and report.sites[0].calls == LAYERS
    assert all(s.rewritten and s.chunks > 1 for s in report.sites[1:])
    assert report.sites[-1].logits_returned  # HF returns the logits too

    # The same model, real and compiled by the backend: the same sites, split the same way.
    torch.manual_seed(0)
    real = tiny_llama(HIDDEN, INTERMEDIATE, LAYERS, VOCAB)
    ids, labels = random_batch(VOCAB, 1, TOKENS)
    compiled = torch.compile(real, backend=mst_fx.backend(compiler="eager", memory_budget="off"))
    compiled(ids, labels=labels, use_cache=False).loss.backward()
    compiled_sites = mst_fx.last_report().sites
    assert [(s.location, s.kind, s.chunks) for s in compiled_sites] == [
        (s.location, s.kind, s.chunks) for s in report.sites
    ]


def test_explain_on_meta_allocates_nothing_and_the_table_shows_the_sizes():
    report = explain_llama(chunks=4)
    table = to_table(report)
    assert "| mlp gated " in row_of(table, "model.layers.2.mlp")
    assert f"mask {TOKENS} x {TOKENS}, {LAYERS} calls" in row_of(table, "model.layers.0.self_attn")
    assert f"{TOKENS} x {HIDDEN} -> {VOCAB}" in table
    head = report.sites[-1]
    assert head.chunks == 4 and head.largest_intermediate_bytes == (TOKENS * VOCAB * 4, TOKENS // 4 * VOCAB * 4)
    assert "Estimates from shapes" in table
    assert report.estimate.saving > 0


class LeakyBlock(SwiGLU):
    """Its hidden activation is also used outside the MLP: the passes must leave it whole."""

    def __init__(self, d, intermediate, bias=False):
        super().__init__(d, intermediate, bias)
        self.probe = nn.Linear(intermediate, 1, bias=False)

    def forward(self, x):
        hidden = F.silu(self.gate(x)) * self.up(x)
        return self.down(hidden) + self.probe(hidden)


def test_an_mlp_the_passes_dont_handle_is_listed_with_its_reason():
    with torch.device("meta"):
        model = MLPStack(VOCAB, HIDDEN, INTERMEDIATE, layers=2)
        model.blocks[1] = LeakyBlock(HIDDEN, INTERMEDIATE)
    ids = torch.zeros(1, TOKENS, dtype=torch.long)  # moved to meta by explain
    report = mst_fx.explain(model, ids, ids)
    by_location = {s.location: s for s in report.sites}
    assert by_location["blocks.0"].rewritten and by_location["head"].rewritten
    # Named after the second linear it was matched from (the MLP's other linears are not known then).
    leaky = by_location["blocks.1.down"]
    assert not leaky.rewritten and "also used by" in leaky.reason
    row = next(line for line in to_table(report).splitlines() if "| blocks.1.down " in line)
    assert "also used by" in row
    # Left alone: no saving counted for it, and nothing is known of its shapes.
    assert estimate_site(leaky).kept_before == estimate_site(leaky).kept_after == 0


class WideHeadAttention(nn.Module):
    """Attention as x-transformers writes it: q and k projections wider than the model (8 heads of
    64 on d = 64), heads split off the last dim, softmax over the keys."""

    def __init__(self, d, heads=8, head_dim=64):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, heads * head_dim, bias=False) for _ in range(3))
        self.to_out = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return x + self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_attention_projections_are_not_reported_as_heads():
    """A projection whose output is split into heads reaches a softmax over keys, not over its own
    width: it is no LM head, and the report says nothing of it. The real head is one rewritten row;
    the attention, written out, is one row left alone with what it keeps."""
    model = MLPStack(VOCAB, HIDDEN, INTERMEDIATE, layers=1)
    model.blocks.insert(0, WideHeadAttention(HIDDEN))
    ids = torch.zeros(1, TOKENS, dtype=torch.long)
    report = mst_fx.explain(model, ids, ids)
    assert not [s.location for s in report.sites if "to_" in s.location], to_table(report)
    heads = [(s.location, s.rewritten) for s in report.sites if s.kind.startswith("lm_head")]
    assert heads == [("head", True)], to_table(report)
    # The attention itself is no SDPA: its N x N scores stay, and the report says so at its module.
    (attention,) = [s for s in report.sites if s.kind == "attention"]
    assert attention.location == "blocks.0" and not attention.rewritten, to_table(report)
    assert "written out" in attention.reason and f"8 x {TOKENS} x {TOKENS}" in attention.reason, attention.reason


def test_explain_says_nothing_of_dropped_logits(caplog, monkeypatch):
    """An HF model returns its logits next to the loss; compiled for training, mst hands back a
    placeholder and warns (tests/test_options_and_fallback.py). A dry run compiles nothing and drops
    nothing, so it must not say it does."""
    import logging

    monkeypatch.setattr("mst_fx.dynamo_backend._warned", set())
    ids, labels = random_batch(VOCAB, 1, 64)
    with caplog.at_level(logging.INFO, logger="mst_fx"):
        model = tiny_llama(hidden=32, intermediate=96, layers=1, vocab=VOCAB)
        report = mst_fx.explain(model, ids, example_kwargs={"labels": labels}, chunk_size=16)
    assert [s.logits_returned for s in report.sites if s.kind == "lm_head"] == [True]
    assert not [r.getMessage() for r in caplog.records if "logits" in r.getMessage()]


def test_json_round_trips_with_the_documented_keys():
    report = explain_llama()
    data = json.loads(to_json(report))
    assert ModelReport.from_dict(data) == report
    assert ModelReport.from_dict(data).to_dict() == data
    assert set(data) == {"format", "target", "options", "estimate_method", "estimated_peak_bytes", "graphs", "graph_breaks"}
    (graph,) = data["graphs"]
    assert set(graph) == {"compile_id", "blocks", "counted", "estimated_peak_bytes", "sites"}
    assert set(graph["sites"][0]) == {
        "kind", "location", "rewritten", "reason", "chunks", "chunk_rows", "tokens", "in_width", "amplified_width",
        "itemsize",
        "logits_returned", "loss_outside", "checkpointed", "calls", "mask", "token_outputs", "experts", "top_k",
        "kept_row_bytes", "budget", "budget_source", "decision",
        "largest_intermediate_bytes",
        "estimated_bytes",
    }  # fmt: skip
    assert data["estimated_peak_bytes"]["saving"] == report.estimate.saving
    with pytest.raises(ValueError, match="format"):
        ModelReport.from_dict({**data, "format": "something else"})


def test_estimate_follows_the_stated_formula():
    n, d, i, v, s = 1000, 10, 40, 500, 4
    mlp = SiteReport("mlp gated", "a", True, chunks=4, chunk_rows=n // 4, tokens=n, in_width=d, amplified_width=i,
                     itemsize=s)  # fmt: skip
    head = SiteReport("lm_head", "h", True, chunks=10, chunk_rows=n // 10, tokens=n, in_width=d, amplified_width=v,
                      itemsize=s, logits_returned=True)  # fmt: skip
    peak = estimate_peak([mlp, mlp, head])
    # Before: backward starts at the head with everything kept (3NI per MLP, NV) plus 2NV for the
    # returned logits; after: the head's gradients (N+V)d, and on top either a chunk's logits and
    # their gradient 2cV (its forward) or the scaled copies of its gradients (N+V)d (its backward).
    assert peak.before == s * (2 * 3 * n * i + n * v + 2 * n * v)
    assert peak.after == s * max((n + v) * d + max(2 * (n // 10) * v, (n + v) * d), 6 * (n // 4) * i)
    # A site left alone costs the same on both sides; a checkpointed MLP keeps nothing for backward.
    alone = SiteReport("mlp plain", "p", False, "reason", tokens=n, in_width=d, amplified_width=i, itemsize=s)
    assert estimate_peak([alone]).saving == 0 and estimate_peak([alone]).before == s * 3 * n * i
    checkpointed = SiteReport("mlp gated", "c", True, chunks=4, chunk_rows=n // 4, tokens=n, in_width=d, amplified_width=i,
                              itemsize=s, checkpointed=True)  # fmt: skip
    assert estimate_site(checkpointed).kept_before == 0 and estimate_peak([checkpointed]).before == s * 4 * n * i


def test_kept_bytes_are_what_the_partitioner_saves_for_backward():
    """The estimate's "kept for backward" against the partitioned forward graph's saved N x W tensors."""
    torch.manual_seed(0)
    n, vocab, intermediate = 1024, 3000, 256
    model = MLPStack(vocab, d=64, intermediate=intermediate, layers=2)
    batch = random_batch(vocab, 1, n)
    gm, inputs = dynamo_graph(model, *batch)
    saved = []

    def observe(graph_module: fx.GraphModule, is_backward: bool):
        if not is_backward:
            (output,) = [node for node in graph_module.graph.nodes if node.op == "output"]
            saved.extend(a.meta["val"] for a in output.args[0] if isinstance(a, fx.Node))

    hand_off(gm, inputs, "aot_eager", observe=observe)
    # N x I and N x V tensors (not the N x d ones that the rewrite keeps too, nor the weights)
    wide = {
        id(t): t
        for t in saved
        if isinstance(t, torch.Tensor)
        and t.dim()
        and t.shape[-1] in (intermediate, vocab)
        and t.numel() == n * t.shape[-1]
    }
    saved_bytes = sum(t.numel() * t.element_size() for t in wide.values())
    report = mst_fx.explain(model, *batch)
    assert sum(estimate_site(s).kept_before for s in report.sites) == saved_bytes


def test_checkpointed_mlps_are_marked_and_keep_nothing_before():
    with torch.device("meta"):
        model = tiny_llama(HIDDEN, INTERMEDIATE, 2, VOCAB)
    enable_checkpointing(model)
    ids = torch.zeros(1, TOKENS, dtype=torch.long, device="meta")
    report = mst_fx.explain(model, ids, example_kwargs={"labels": ids, "use_cache": False})
    mlps = [s for s in report.sites if s.kind.startswith("mlp")]
    assert [(s.kind, s.checkpointed, s.rewritten) for s in mlps] == [("mlp gated", True, True)] * 2
    assert "mlp gated (checkpointed)" in to_table(report)


class TwoFrames(nn.Module):
    """A graph break between the blocks: Dynamo compiles two frames."""

    def __init__(self):
        super().__init__()
        self.first, self.second = SwiGLU(HIDDEN, INTERMEDIATE), SwiGLU(HIDDEN, INTERMEDIATE)

    def forward(self, x):
        x = x + self.first(x)
        torch._dynamo.graph_break()
        return (x + self.second(x)).sum()


def test_last_report_covers_graph_breaks_and_counts_a_recompile_once():
    model = torch.compile(TwoFrames(), backend=mst_fx.backend(compiler="eager", chunks=2))
    model(torch.randn(256, HIDDEN, requires_grad=True)).backward()
    report = mst_fx.last_report()
    assert [len(g.report.sites) for g in report.graphs] == [1, 1]
    assert len(report.counted_graphs) == 2  # a graph break adds a graph to the step

    mst_fx.clear_reports()
    model = torch.compile(MLPStack(VOCAB, HIDDEN, INTERMEDIATE, layers=1), backend=mst_fx.backend(compiler="eager"))
    for tokens in (1024, 2048):  # the second length recompiles the same frame
        model(*random_batch(VOCAB, 1, tokens))
    report = mst_fx.last_report()
    assert [g.report.frame for g in report.graphs] == [report.graphs[0].report.frame] * 2
    assert report.counted_graphs == report.graphs[1:]
    assert report.estimate == report.graphs[1].estimate


def test_graph_code_before_and_after():
    report = explain_llama()
    assert "mst_mlp_0" in graph_code(report, "after") and "mst_lm_head_0" in graph_code(report, "after")
    assert "mst_mlp_0" not in graph_code(report, "before")


def test_cli_prints_the_table_for_a_family(capsys):
    assert main(["llama", "--tokens", "2048", "--layers", "1", "--options", '{"chunks": 2}']) == 0
    out = capsys.readouterr().out
    assert "| mlp gated | 2048 x 256 -> 688" in row_of(out, "model.layers.0.mlp") and row_of(out, "lm_head")
    assert "est. saving" in out and "Estimates from shapes" in out


def test_cli_real_llama_3_8b_shapes_as_json(capsys):
    assert main(["llama-3-8b", "--layers", "1", "--tokens", "32768", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    attention, mlp, head = data["graphs"][0]["sites"]
    assert (attention["kind"], attention["rewritten"], attention["tokens"]) == ("attention", True, 32768)
    assert (mlp["tokens"], mlp["in_width"], mlp["amplified_width"], mlp["chunks"]) == (32768, 4096, 14336, 4)
    assert (head["amplified_width"], head["chunks"]) == (128256, 32)
    assert mlp["largest_intermediate_bytes"] == {"before": 32768 * 14336 * 4, "after": 8192 * 14336 * 4}


def test_cli_config_json_and_factory_targets(tmp_path, monkeypatch, capsys):
    tiny_llama(HIDDEN, INTERMEDIATE, 1, VOCAB).config.save_pretrained(tmp_path)
    assert main([str(tmp_path / "config.json"), "--tokens", "2048"]) == 0
    assert "| model.layers.0.mlp " in capsys.readouterr().out

    (tmp_path / "my_factory.py").write_text(
        textwrap.dedent(f"""
        import torch
        from mst_fx.models import MLPStack

        def build():
            model = MLPStack({VOCAB}, {HIDDEN}, {INTERMEDIATE}, layers=2)
            assert next(model.parameters()).is_meta  # built under torch.device("meta")
            ids = torch.zeros(1, {TOKENS}, dtype=torch.long)
            return model, (ids, ids)

        def wrong():
            return 42
    """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["my_factory:build", "--json"]) == 0
    assert [s["location"] for s in json.loads(capsys.readouterr().out)["graphs"][0]["sites"]] == [
        "blocks.0", "blocks.1", "head"
    ]  # fmt: skip
    assert main(["my_factory:wrong"]) == 2
    assert "must return (model, args)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-model"], "unknown target 'no-such-model'"),
        (["no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
        (["json:no_such_function"], "has no function 'no_such_function'"),
        (["llama", "--options", "{not json"], "--options is not JSON"),
        (["llama", "--options", '{"chunk": 4}'], "unknown mst option"),
        (["json:loads", "--tokens", "4"], "--tokens apply to family and config targets"),
        (["llama", "--tokens", "-5"], "--tokens: must be a positive integer, got -5"),
        (["llama", "--tokens", "0"], "--tokens: must be a positive integer, got 0"),
        (["llama", "--batch", "0"], "--batch: must be a positive integer"),
        (["llama", "--layers", "0"], "--layers: must be a positive integer"),
        (["llama", "--vocab", "0"], "--vocab: must be a positive integer"),
        (["llama", "--tokens", "many"], "--tokens: must be a positive integer, got 'many'"),
        (["llama", "--hidden", "102"], "--hidden 102 is not a multiple of the model's 4 attention heads"),
        (["llama", "--hidden", "100"], "odd width 25; rotary embeddings need an even one"),
    ],
)
def test_cli_bad_target_exits_2_with_one_clear_line(argv, message, capsys):
    try:
        assert main(argv) == 2
    except SystemExit as exit:  # argparse's own checks end the parse
        assert exit.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("mst-inspect: error: ") and message in line


def test_console_entry_point_exit_code():
    console_script = Path(sys.executable).with_name("mst-inspect")  # installed by pip next to python
    done = subprocess.run([str(console_script), "not/a/config.json"], check=False, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "mst-inspect: error: unknown target 'not/a/config.json': not a family (llama, llama-3-8b, gpt2, "
        "gpt2-124m or a Hugging Face model type such as mistral), not an existing config.json or folder, "
        "not module:function"
    )


def test_cli_any_hugging_face_family_by_model_type(capsys):
    from mst_fx.models import tiny_configs

    assert main(["phi3", "--json"]) == 0  # tiny, from mst_fx.models.tiny_configs
    sites = json.loads(capsys.readouterr().out)["graphs"][0]["sites"]
    expected = [("attention", True)] + [("mlp fused", True)] * 2 + [("lm_head", True)]
    assert [(s["kind"], s["rewritten"]) for s in sites] == expected
    unbuildable = next(f for f in tiny_configs.causal_lm_families() if tiny_configs.why_not_built(f))
    assert main([unbuildable]) == 2
    assert f"{unbuildable} can't be inspected" in capsys.readouterr().err


def test_cli_refuses_a_config_written_for_another_kind_of_model(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
               architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)  # fmt: skip
    assert main([str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is a BertForMaskedLM (bert), not a causal language model" in line


class BareHead(nn.Module):
    """An embedding and an LM head whose logits are not returned."""

    def __init__(self, d, vocab):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids, labels):
        return F.cross_entropy(self.head(self.embed(ids)).view(-1, self.head.out_features), labels.view(-1))


@pytest.mark.parametrize("hidden, rewritten", [(256, True), (4096, False)])
def test_auto_leaves_a_head_alone_where_the_estimate_says_the_rewrite_costs(hidden, rewritten):
    with torch.device("meta"):
        model = BareHead(hidden, 32000)
    ids = torch.zeros(1, 4096, dtype=torch.long, device="meta")
    (head,) = mst_fx.explain(model, ids, ids).sites
    assert head.rewritten == rewritten
    assert rewritten or "the estimate says the rewrite would cost memory" in head.reason
    assert mst_fx.explain(model, ids, ids).estimate.saving >= 0
    (forced,) = mst_fx.explain(model, ids, ids, chunk_size=512).sites
    assert forced.rewritten


def test_one_graph_compiled_per_block_counts_every_block():
    """torchtitan compiles each block on its own: Dynamo compiles one graph and runs it for every
    block. The report says so and the totals count its sites once per block."""
    from test_loss_outside import OPTIONS, TinyLM, batch

    torch.manual_seed(0)
    model = TinyLM()
    backend = mst_fx.backend(**OPTIONS)  # one backend for all, as torchtitan passes one name
    for block in model.blocks:
        block.compile(backend=backend)
    ids, labels = batch()
    for _ in range(2):  # a second step runs the same blocks: still 2
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), labels.flatten()).backward()
    report = mst_fx.last_report()
    (graph,) = report.graphs
    assert graph.report.blocks == 2 and len(graph.report.rewritten("mlp")) == 1
    assert len([s for s in report.counted_sites if s.kind.startswith("mlp")]) == 2
    assert report.estimate.saving == 2 * graph.estimate.saving
    assert "one graph for 2 blocks" in str(report)
