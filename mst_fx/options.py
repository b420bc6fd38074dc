"""The backend's options: one frozen dataclass, validated once, with errors that say what is allowed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class MstOptions:
    """What `torch.compile(..., backend="mst", options={...})` accepts.

    chunks:      "auto" (pick M per site from its shapes) or an int >= 1 used for every site.
    mlp:         rewrite linear -> activation -> linear blocks.
    lm_head:     rewrite linear -> cross_entropy (the logits are never materialised).
    keep_logits: in training, still return the logits the model outputs (costs N x V memory,
                 so the LM head is then left as it is).
    compiler:    what compiles the rewritten graph: "inductor", "aot_eager" or "eager".
    """

    chunks: int | str = "auto"
    mlp: bool = True
    lm_head: bool = True
    keep_logits: bool = False
    compiler: str = "inductor"

    def __post_init__(self) -> None:
        chunks = self.chunks
        if chunks != "auto" and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
            raise ValueError(f"mst option 'chunks' must be 'auto' or an int >= 1, got {chunks!r}")
        for name in ("mlp", "lm_head", "keep_logits"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"mst option {name!r} must be True or False, got {value!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"mst option 'compiler' must be one of {COMPILERS}, got {self.compiler!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> MstOptions:
        options = dict(options or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown mst option(s) {unknown}; allowed: {allowed}")
        return cls(**options)
