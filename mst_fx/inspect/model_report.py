"""`ModelReport`: every graph mst inspected or compiled, what it found in each, and the estimated
saving; `to_dict()`/`from_dict()` are its JSON form.

`last_report()` covers the graphs the `mst` backend compiled since the last `mst_fx.clear_reports()`
(at most the last 64), oldest first. Dynamo compiles one graph per frame (a graph break starts a new
frame) and compiles a frame again when its guards fail (new shapes, grad mode). The totals count what
one step runs: within a frame, a later graph replaces every earlier one holding any of its sites (the
same locations), so a recompile for a new length or grad mode replaces its frame's graph, while graphs
of one frame that hold other sites all count: each layer under FSDP2 (its hooks make a layer's
forward a frame of its own, compiled again per layer when a guard on the layer fails, such as HF's
`layer_idx`), each block compiled on its own, each piece DDP's optimizer cuts a graph into. A graph
break adds a frame. A graph that Dynamo reuses unchanged for several layers (their guards all pass)
is compiled and reported once, under the layer it was compiled for; after a real run
(`last_report()`) the graph says how many blocks it served (`blocks`: the distinct weights it ran
with) and the totals count its sites once per block.

JSON (`ModelReport.to_dict()`, stable keys, format "mst-fx-report/1"):

    format                 "mst-fx-report/1"
    target                 what was inspected (free text), or null
    options                the backend options used (`mst_fx.MstOptions` fields), or null when not known
    estimate_method        how the byte estimates are computed (`mst_fx.inspect.memory_estimate`)
    estimated_peak_bytes   {"before", "after", "saving"}: all counted graphs together
    graphs                 list, oldest first, each:
      compile_id             Dynamo's "frame/recompile" id, or null
      blocks                 how many distinct sets of weights the compiled graph ran with (a block
                             compiled on its own serves every block), or null when not counted
                             (explain(), or a graph with no site rewritten)
      counted                whether the graph is in the overall totals (no later graph of its frame
                             holds any of its sites)
      estimated_peak_bytes   {"before", "after", "saving"} of this graph's sites
      sites                  list, in graph order, each:
        kind                   "mlp gated" | "mlp fused" | "mlp plain" | "lm_head" ("mlp" when the form is unknown;
                               "lm_head": the head and a cross-entropy, or any row-wise loss summed over tokens)
                               | "lm_head per-token" (values kept per token: log-probs, entropies, ...)
                               | "attention" (one per attention mask, shared by the SDPA calls that take it; or,
                               left alone, one layer's attention written out as matmuls and a softmax)
                               | "moe experts" (a mixture-of-experts layer's routed experts: dispatch, expert
                               matmuls and combine, chunked over tokens)
        location               owning module, from the parameter names, e.g. "model.layers.3.mlp"
        rewritten              true | false
        reason                 why the site was left alone, or null
        chunks                 M, the number of mini-sequences at the traced length (its size hint
                               when dynamic: the runtime cuts each call's own length), or null
        chunk_rows             tokens in the largest of them, or null (attention: queries per block of each sequence)
        tokens, in_width, amplified_width, itemsize    N, d, I or V, bytes per element (null when unknown);
                               moe experts: W is the elements per token of the largest dispatch tensor;
                               attention: B x Nq rows, head width, Nkv, 1 (the bool mask's)
        logits_returned        lm_head: the graph also returns the N x V logits (null when not known)
        loss_outside           lm_head: the logits leave the graph for a loss computed outside it, and
                               are returned deferred (`mst_fx.runtime.deferred_logits`) (null for other sites)
        checkpointed           mlp: inside an activation-checkpoint body (null when not known)
        calls                  attention: the SDPA calls that take the mask (null for other kinds)
        mask                   attention: the terms read, joined by " & ": "causal", "window w", "chunks of c",
                               "documents", "causal by position", "padding", or a term as written (null
                               when unread or for other kinds). chunks null: is_causal, no mask at all.
        token_outputs          lm_head per-token: the values it keeps per token, "name (op)", named as
                               the traced code names them, e.g. "logps (gather)" (null for other kinds)
        experts, top_k         moe experts: the routed experts and the experts per token (null for other kinds)
        kept_row_bytes         moe experts: bytes per token that keeping its autograd graph holds at most
        budget                 bytes the memory budget's decision was made against (`memory_budget`
                               option; null when off, or for a site it does not decide: attention)
        budget_source          what that budget was read from: "memory_budget" (bytes given), or under
                               "auto" the limit that binds, e.g. "auto: cgroup v2 memory.max 3.00 GiB (/pod)",
                               "auto: MemAvailable", "auto: CUDA per-process memory fraction 0.5 of 79.18 GiB"
        decision               that decision at the traced length: "kept, no recompute" (the MLP keeps its
                               intermediates, routed experts their autograd graph), "one chunk", or "M chunks
                               of C, recomputed"; under "auto", the steps' after the first, which runs lean
                               while it is measured
        largest_intermediate_bytes   {"before", "after"}: one N x W tensor against one chunk's, or null
        estimated_bytes        {"kept_before", "added_before", "kept_after", "added_after"}
    graph_breaks           list, each a graph break Dynamo met while tracing (`mst_fx.tracing.graph_breaks`):
      where                  the user code at which Dynamo cut its graph, "file.py:line in function"
      cause                  the innermost code it could not trace, "file.py:line in function"
      reason, explanation    Dynamo's reason (its first line) and its explanation
      outside                the code below `where` ran in no graph mst saw: its sites were not seen and
                             are not in the estimate
      count                  how often Dynamo met it
      whole_frame            Dynamo gave up on the frame at `where` as a whole

`ModelReport.from_dict` reads the fields back and recomputes the derived figures; the graphs' code
(`code_before`, `code_after`) is not part of the JSON.
"""


from __future__ import annotations

import dataclasses
from typing import Any

from mst_fx.passes.report import GraphReport, SiteReport
from mst_fx.tracing.graph_breaks import GraphBreak

from .memory_estimate import METHOD, PeakEstimate, estimate_peak, estimate_site
from .report_format import to_table

FORMAT = "mst-fx-report/1"


@dataclasses.dataclass
class InspectedGraph:
    """One Dynamo graph: what the passes found in it, and its code before and after the rewrite."""

    report: GraphReport
    code_before: str | None = dataclasses.field(default=None, compare=False, repr=False)
    code_after: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def estimate(self) -> PeakEstimate:
        return estimate_peak(self.report.sites)


@dataclasses.dataclass
class ModelReport:
    """Every graph of one model (or of the graphs compiled so far) and the estimated saving."""

    graphs: list[InspectedGraph]
    options: dict[str, Any] | None = None
    target: str | None = None
    graph_breaks: list[GraphBreak] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        """The table `mst-inspect` prints."""
        return to_table(self)

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.report.sites]

    @property
    def code_outside(self) -> list[GraphBreak]:
        """The graph breaks whose code ran in no graph mst saw: sites there were never found."""
        return [b for b in self.graph_breaks if b.outside]

    @property
    def counted_graphs(self) -> list[InspectedGraph]:
        """What one step runs: of each Dynamo frame, the graphs no later graph replaces (module doc)."""
        counted = self._counted_indices()
        return [g for i, g in enumerate(self.graphs) if i in counted]

    def _counted_indices(self) -> set[int]:
        # A graph replaces the earlier graphs of its frame that hold any of its sites (a recompile for
        # a new length or grad mode), not those holding other sites: FSDP2 compiles each layer as a
        # recompile of one frame, and by frame alone the layers would replace each other.
        kept: dict[str, list[tuple[int, set[str]]]] = {}
        for index, graph in enumerate(self.graphs):
            locations = {site.location for site in graph.report.sites}
            same_frame = kept.setdefault(graph.report.frame or f"#{index}", [])
            same_frame[:] = [(i, held) for i, held in same_frame if not _replaces(locations, held)]
            same_frame.append((index, locations))
        return {i for same_frame in kept.values() for i, _ in same_frame}

    @property
    def counted_sites(self) -> list[SiteReport]:
        """The sites one step runs, in order: a graph serving several blocks once per block."""
        return [s for g in self.counted_graphs for _ in range(g.report.runs) for s in g.report.sites]

    @property
    def estimate(self) -> PeakEstimate:
        return estimate_peak(self.counted_sites)

    def to_dict(self) -> dict[str, Any]:
        counted = self._counted_indices()
        return {
            "format": FORMAT,
            "target": self.target,
            "options": self.options,
            "estimate_method": METHOD,
            "estimated_peak_bytes": self.estimate.to_dict(),
            "graphs": [_graph_dict(g, i in counted) for i, g in enumerate(self.graphs)],
            "graph_breaks": [b.to_dict() for b in self.graph_breaks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelReport:
        if data.get("format") != FORMAT:
            raise ValueError(f"not an mst-fx report: format {data.get('format')!r}, expected {FORMAT!r}")
        graphs = [InspectedGraph(GraphReport.from_dict(g)) for g in data["graphs"]]
        breaks = [GraphBreak.from_dict(b) for b in data.get("graph_breaks", [])]
        return cls(graphs, data.get("options"), data.get("target"), breaks)


def _replaces(later: set[str], earlier: set[str]) -> bool:
    """A later graph of a frame replaces an earlier one holding any of its sites (a graph with none
    replaces only one with none)."""
    return bool(later & earlier) or not (later or earlier)


def _graph_dict(graph: InspectedGraph, counted: bool) -> dict[str, Any]:
    data = graph.report.to_dict()
    for site_dict, site in zip(data["sites"], graph.report.sites):
        largest = site.largest_intermediate_bytes
        site_dict["largest_intermediate_bytes"] = None if largest is None else dict(zip(("before", "after"), largest))
        site_dict["estimated_bytes"] = dataclasses.asdict(estimate_site(site))
    return {"compile_id": data["compile_id"], "blocks": data["blocks"], "counted": counted,
            "estimated_peak_bytes": graph.estimate.to_dict(), "sites": data["sites"]}  # fmt: skip
