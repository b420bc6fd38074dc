"""What the passes found in one graph: one `SiteReport` per site, rewritten or left alone.

Both convert to and from plain dicts (`to_dict` / `from_dict`, JSON-ready, `from_dict(to_dict(r)) == r`);
`mst_fx.inspect.model_report` documents the keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class SiteReport:
    kind: str  # "mlp gated", "mlp fused", "mlp plain", "moe experts", "lm_head", "lm_head per-token" or "attention" (one per mask)
    location: str  # owning module, recovered from parameter names, e.g. "model.layers.0.mlp"
    rewritten: bool
    reason: str | None = None  # why the site was left alone
    chunks: int | None = None  # at the traced length (its size hint when dynamic)
    chunk_rows: int | None = None  # tokens in the largest chunk, at the traced length
    tokens: int | None = None  # N (a size hint when symbolic)
    in_width: int | None = None  # d
    amplified_width: int | None = None  # I or V; moe experts: elements per token of the largest dispatch tensor
    itemsize: int | None = None
    logits_returned: bool | None = None  # lm_head: the graph also returns the N x V logits (None: not read)
    loss_outside: bool | None = None  # lm_head: the logits leave the graph for a loss computed outside it
    checkpointed: bool | None = None  # mlp: inside an activation-checkpoint body
    calls: int | None = None  # attention: the SDPA calls that take this mask (one per layer)
    mask: str | None = None  # attention: the mask's terms as read, e.g. "causal & window 4096 & padding"
    token_outputs: list[str] | None = None  # lm_head per-token: the values kept per token, "name (op)"
    experts: int | None = None  # moe experts: routed experts in the layer
    top_k: int | None = None  # moe experts: experts per token
    kept_row_bytes: int | None = None  # moe experts: bytes per token that keeping its autograd graph holds at most
    budget: int | None = None  # bytes the memory budget's decision was made against (None: no budget)
    budget_source: str | None = None  # what the budget was read from, e.g. "auto: cgroup v2 memory.max 3.00 GiB (/x)"
    decision: str | None = None  # the budget's decision at the traced length, e.g. "kept, no recompute"

    @property
    def has_shapes(self) -> bool:
        return None not in (self.tokens, self.in_width, self.amplified_width, self.itemsize)

    @property
    def largest_chunk_tokens(self) -> int | None:
        """Rows of the largest mini-sequence (all N when the site is left alone)."""
        if self.tokens is None:
            return None
        if not self.rewritten or self.chunk_rows is None:
            return self.tokens
        return min(self.chunk_rows, self.tokens)

    @property
    def largest_intermediate_bytes(self) -> tuple[int, int] | None:
        """(before, after): one N x I (or N x V) tensor against the largest chunk's N/M x I."""
        if None in (self.tokens, self.amplified_width, self.itemsize):
            return None
        row_bytes = self.amplified_width * self.itemsize
        if self.kind == "attention":  # the mask, B*Nq rows of Nkv booleans: one block of queries', or none
            whole = self.tokens * row_bytes
            if not self.rewritten:
                return whole, whole
            return whole, 0 if not self.chunks else -(-self.tokens // self.chunks) * row_bytes
        return self.tokens * row_bytes, self.largest_chunk_tokens * row_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteReport:
        """Reads the fields and ignores other keys (such as derived figures written next to them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _current_compile_id() -> str | None:
    """Dynamo's id of the frame being compiled ("frame/recompile", as in TORCH_LOGS), if any."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return None if compile_id is None else str(compile_id)


@dataclasses.dataclass
class GraphReport:
    sites: list[SiteReport] = dataclasses.field(default_factory=list)
    # Set when the report is made during a Dynamo compile: which frame (graph breaks make more) and
    # which recompile of it (new shapes, grad mode, ...) the graph is.
    compile_id: str | None = dataclasses.field(default_factory=_current_compile_id)
    # How many distinct sets of weights the compiled graph has run with, when counted: a block
    # compiled on its own (torchtitan's per-block compile) is one graph that runs for every block.
    blocks: int | None = None

    @property
    def runs(self) -> int:
        """How many times one step runs this graph's sites: once, or once per block it serves."""
        return self.blocks or 1

    @property
    def frame(self) -> str | None:
        """The compiled frame without the recompile count: "3/1" -> "3"."""
        return None if self.compile_id is None else self.compile_id.rsplit("/", 1)[0]

    def rewritten(self, kind_prefix: str = "") -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten and s.kind.startswith(kind_prefix)]

    def left_alone(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def undone(self, reason: str) -> GraphReport:
        """The same sites, every rewrite taken back for `reason`."""
        sites = [dataclasses.replace(s, rewritten=False, reason=s.reason or reason) for s in self.sites]
        return GraphReport(sites, self.compile_id, self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"compile_id": self.compile_id, "blocks": self.blocks, "sites": [s.to_dict() for s in self.sites]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphReport:
        return cls([SiteReport.from_dict(s) for s in data["sites"]], data.get("compile_id"), data.get("blocks"))
