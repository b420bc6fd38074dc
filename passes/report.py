"""What the passes found in one graph: one `SiteReport` per site, rewritten or left alone."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SiteReport:
    kind: str  # "mlp gated", "mlp fused", "mlp plain" or "lm_head"
    location: str  # owning module, recovered from parameter names, e.g. "model.layers.0.mlp"
    rewritten: bool
    reason: str | None = None  # why the site was left alone
    chunks: int | None = None
    tokens: int | None = None  # N (a size hint when symbolic)
    in_width: int | None = None  # d
    amplified_width: int | None = None  # I or V
    itemsize: int | None = None

    @property
    def largest_intermediate_bytes(self) -> tuple[int, int] | None:
        """(before, after): one N x I (or N x V) tensor against one chunk's N/M x I."""
        if None in (self.tokens, self.amplified_width, self.itemsize):
            return None
        before = self.tokens * self.amplified_width * self.itemsize
        per_chunk = -(-self.tokens // (self.chunks or 1))
        return before, (per_chunk * self.amplified_width * self.itemsize if self.rewritten else before)


@dataclasses.dataclass
class GraphReport:
    sites: list[SiteReport] = dataclasses.field(default_factory=list)

    def rewritten(self, kind_prefix: str = "") -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten and s.kind.startswith(kind_prefix)]

    def left_alone(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def undone(self, reason: str) -> GraphReport:
        """The same sites, every rewrite taken back for `reason`."""
        return GraphReport([dataclasses.replace(s, rewritten=False, reason=s.reason or reason) for s in self.sites])
