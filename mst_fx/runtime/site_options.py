"""What a chunked site reads of the backend's options.

The runtime is handed the backend's options object (`mst_fx.MstOptions`) and reads only these
fields. Sites are cached by it, so it must be hashable (a frozen dataclass is).
"""

from __future__ import annotations

from typing import Protocol

from .chunk_plan import ChunkPolicy
from .memory_budget import SiteGroup


class SiteOptions(Protocol):
    @property
    def policy(self) -> ChunkPolicy:
        """How many tokens each chunk takes (`chunk_plan.py`)."""

    @property
    def compiler(self) -> str:
        """What compiles a site's per-chunk bodies: "inductor", "aot_eager" or "eager"."""

    @property
    def grad_accumulation(self) -> str:
        """Where a site sums its weight gradients over chunks: "fp32" or "param"."""

    @property
    def budget(self) -> int | str:
        """The memory budget's setting (`memory_budget.py`): bytes, "auto" or "off"."""

    @property
    def group(self) -> SiteGroup | None:
        """The sites of the compiled graph a site is built for (`memory_budget.SiteGroup`), or None."""
