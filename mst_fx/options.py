"""The backend's options: one frozen dataclass, validated once, with errors that say what is allowed.

The layers below read them without importing this module: the passes through
`mst_fx.passes.PassOptions`, the sites they build through `mst_fx.runtime.site_options.SiteOptions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mst_fx.runtime import memory_budget
from mst_fx.runtime.chunk_plan import ChunkPolicy

COMPILERS = ("inductor", "aot_eager", "eager")
GRAD_ACCUMULATIONS = ("fp32", "param")
DEFAULT_BUDGET = "auto"


@dataclasses.dataclass(frozen=True)
class MstOptions:
    """What `torch.compile(..., backend="mst", options={...})` accepts.

    chunk_size:  tokens per chunk: "auto" (from each site's widths and the length at run time,
                 see `mst_fx.runtime.chunk_plan`) or an int >= 1 used for every site.
    chunks:      "auto", or a fixed number of chunks M >= 1 for every site (the chunk size then
                 follows the length). Give chunk_size or chunks, not both.
    mlp:         rewrite linear -> activation -> linear blocks.
    experts:     rewrite the routed experts of mixture-of-experts layers (top-k routing per token,
                 dispatch, expert matmuls, combine) into a loop over chunks of tokens.
    lm_head:     rewrite linear -> cross_entropy, and linear -> values kept per token (log-probs,
                 entropies; see passes/token_head.py): the logits are never materialised.
    attention:   give SDPA calls whose mask is provably causal `is_causal=True` and no mask (with
                 padding possible: a runtime choice between that and the masked call).
    keep_logits: in training, still return the logits the model outputs (costs N x V memory,
                 so the LM head is then left as it is).
    compiler:    what compiles the rewritten graph: "inductor", "aot_eager" or "eager".
    grad_accumulation: where a chunked site sums its weight gradients over chunks: "fp32" (an fp32
                 accumulator, whatever the weight's dtype) or "param" (in place in the weight's
                 own dtype: no extra memory for bf16/fp16 weights, one rounding per chunk).
    memory_budget: the memory the chunked sites may hold (`mst_fx.runtime.memory_budget`): bytes
                 (an int, or a string such as "6GiB"), "auto" (what the limits on this process
                 still allow, a cgroup's or the CUDA allocator's included, read at every call,
                 less what the process holds outside the sites at its most, less 10%), or "off"
                 (always chunk at chunk_size="auto"'s rule and recompute). Within it, a site
                 keeps its intermediates instead of recomputing them, and takes the fewest chunks
                 that fit. Only with chunk_size and chunks "auto".
    """

    chunk_size: int | str = "auto"
    chunks: int | str = "auto"
    mlp: bool = True
    experts: bool = True
    lm_head: bool = True
    attention: bool = True
    keep_logits: bool = False
    compiler: str = "inductor"
    grad_accumulation: str = "fp32"
    memory_budget: int | str = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        for name in ("chunk_size", "chunks"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"mst option {name!r} must be 'auto' or an int >= 1, got {value!r}")
        if self.chunk_size != "auto" and self.chunks != "auto":
            raise ValueError(
                f"mst options 'chunk_size' ({self.chunk_size}) and 'chunks' ({self.chunks}) both fix the "
                "chunking; give one of them"
            )
        for name in ("mlp", "experts", "lm_head", "attention", "keep_logits"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"mst option {name!r} must be True or False, got {value!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"mst option 'compiler' must be one of {COMPILERS}, got {self.compiler!r}")
        if self.grad_accumulation not in GRAD_ACCUMULATIONS:
            raise ValueError(
                f"mst option 'grad_accumulation' must be one of {GRAD_ACCUMULATIONS}, got {self.grad_accumulation!r}"
            )

        budget = memory_budget.parse_budget(self.memory_budget)
        fixed = self.chunk_size != "auto" or self.chunks != "auto"
        if fixed and budget not in (memory_budget.parse_budget(DEFAULT_BUDGET), memory_budget.OFF):
            raise ValueError(
                f"mst option 'memory_budget' ({self.memory_budget!r}) decides the chunking, which "
                "'chunk_size' or 'chunks' fixes; give one of them (or memory_budget='off')"
            )

    @property
    def budget(self) -> int | str:
        """The memory budget's setting: bytes, "auto" or "off" (see `memory_budget`)."""
        return memory_budget.parse_budget(self.memory_budget)

    @property
    def group(self) -> memory_budget.SiteGroup | None:
        """The sites of the graph these options compile, once `in_group` set it (not an option)."""
        return self.__dict__.get("_group")

    def in_group(self, group: memory_budget.SiteGroup) -> MstOptions:
        """These options for one compiled graph: the sites they build join `group`. The group is
        no field, so options compare and hash as the user's do."""
        copy = dataclasses.replace(self)
        object.__setattr__(copy, "_group", group)
        return copy

    @property
    def policy(self) -> ChunkPolicy:
        return ChunkPolicy(
            rows=None if self.chunk_size == "auto" else self.chunk_size,
            count=None if self.chunks == "auto" else self.chunks,
        )

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> MstOptions:
        options = dict(options or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown mst option(s) {unknown}; allowed: {allowed}")
        return cls(**options)
