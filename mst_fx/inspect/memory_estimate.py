"""Peak memory of one training step, estimated from the shapes of the sites a report lists.

An estimate, not a measurement: nothing is allocated, so it works for models far bigger than the
machine. Only the sites' own tensors are counted (attention, norms and the residual stream are the
same with and without mst, so they drop out of the saving). For a site with N tokens, input width d,
amplified width W (I for an MLP, V for an LM head), element size s and chunks of at most c tokens:

    site             kept for backward          added in its backward       kept after    added after
    mlp gated/fused  3·N·I·s (gate, up, h)      1·N·I·s                     0             6·c·I·s
    mlp plain        2·N·I·s (fc out, act)      1·N·I·s                     0             4·c·I·s
    mlp, checkpointed  0                        (kept + added)·N·I·s        0             as above
    lm_head          N·V·s (logits)             0, or 2·N·V·s when the      (N+V)·d·s     max(2·c·V·s, (N+V)·d·s)
                                                logits are returned
    attention        B·Nq·Nkv (the bool mask)   0                           0             0, or 5·B·c·Nkv
    moe experts      2·N·W·s                    1·N·W·s                     0             4·c·W·s

(A routed-experts site's W is the elements per token of its largest dispatch tensor, k·2I for
gate/up of k experts; its gathered input, activation and outputs are counted as about one more such
tensor. A rough rule, not read off generated code as the MLP's is.)

(An attention site is one mask, whatever the number of layers sharing it; its N is B·Nq rows and
its W is Nkv. Rewritten to is_causal, no mask is built. Rewritten to blocks of c queries (windows,
chunks, documents, and padding in a padded batch), one block's bool mask and the float bias SDPA
makes of it are live: 5·B·c·Nkv bytes, an upper bound when the block reaches fewer keys.)

Backward visits the sites in reverse (the report's order: MLPs in graph order, then the LM head;
graphs in compile order), and a site's kept tensors are freed once its backward is done, so

    peak = max over sites i of (kept by sites 1..i + added by site i)     saving = peak before - peak after

The coefficients are read off Inductor's code for SwiGLU and GELU MLPs and the HF LM head: "kept"
is what the partitioner saves for backward; in an MLP's backward one N x I gradient is live on top
(the others reuse the buffers of saved tensors past their last use). The LM head's gradient takes
the place of the logits (their last use) unless the logits are returned: then that buffer stays, a
compiled backward gets an N x V zero gradient for them, and the gradient needs its own.

Rewritten (`mst_fx.runtime.chunked_ops`): a chunked MLP keeps only its input, which the unrewritten MLP
keeps too; its backward's chunk body recomputes gate and up and makes h, d(h), d(gate), d(up): six
c x I tensors (four for a plain MLP). The weight gradients are accumulated in place, so no more
than the gradients themselves. The chunked LM head keeps the input and weight gradients it
computes in forward; while it does, one chunk's logits and their gradient are live (2·c·V·s), and
in its backward the gradients are scaled into new tensors ((N+V)·d·s); the larger of the two is
what it adds. An MLP inside an activation-checkpoint body keeps nothing (the checkpoint keeps the
layer's input, either way) and recomputes its intermediates in its backward. A site left alone
counts the same before and after; one without shapes counts 0. An MLP that the memory budget lets
keep its intermediates (`mst_fx.runtime.memory_budget`) keeps gate and up (2·N·I·s; N·I·s plain)
and its backward replays them as one chunk of N.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from mst_fx.passes.budget_report import kept_row_bytes
from mst_fx.passes.report import SiteReport

# Per kind: (N x W tensors kept for backward, N x W tensors its backward adds, chunk x W tensors a
# rewritten site adds). The LM head's extras (returned logits, kept gradients) are in `estimate_site`.
_COEFFICIENTS = {
    "mlp gated": (3, 1, 6),
    "mlp fused": (3, 1, 6),
    "mlp plain": (2, 1, 4),
    "lm_head": (1, 0, 2),
    "lm_head per-token": (2, 1, 4),  # logits and their log-softmax kept; recompute, like an MLP
    "attention": (1, 0, 5),  # rewritten: one block's bool mask and SDPA's float bias of it
    "moe experts": (2, 1, 4),  # in units of the largest dispatch tensor (see the docstring)
}

METHOD = (
    "Estimates from shapes, not measurements (nothing is allocated), for one training step, counting only "
    "the sites' own tensors: the rest of the model is the same with and without mst. Per site, N tokens, "
    "width d -> W (I or V), s bytes per element, chunks of c tokens: kept for backward 3NIs (gated MLP), "
    "2NIs (plain MLP), NVs (LM head), 2NVs (per-token head: logits, log-softmax); its backward adds NIs (MLP), NVs "
    "(per-token head) or 0 (LM head; 2NVs if the logits are returned); an attention mask keeps B Nq Nkv bytes, 0 rewritten to is_causal and 5 B c Nkv by blocks of c queries; routed experts keep about 2NWs and add NWs (W: elements per token of the largest dispatch tensor), 4cWs rewritten; a checkpointed MLP keeps 0 and adds the sum. Rewritten, an MLP keeps nothing extra and adds 6cIs (4cIs plain), a per-token head 4cVs; the LM head keeps (N+V)ds "
    "of gradients and adds the larger of 2cVs (a chunk's logits and their gradient) and (N+V)ds (the gradients scaled in its backward). Backward runs the sites in reverse: peak = max over sites i of (kept by "
    "sites 1..i + added by site i); saving = peak before - peak after."
)


@dataclasses.dataclass(frozen=True)
class SiteMemory:
    """Bytes one site contributes to the peak: kept from its forward until its backward, and added on
    top of that during its backward; before and after the rewrite."""

    kept_before: int = 0
    added_before: int = 0
    kept_after: int = 0
    added_after: int = 0


@dataclasses.dataclass(frozen=True)
class PeakEstimate:
    before: int
    after: int

    @property
    def saving(self) -> int:
        return self.before - self.after

    def to_dict(self) -> dict[str, int]:
        return {"before": self.before, "after": self.after, "saving": self.saving}


def estimate_site(site: SiteReport) -> SiteMemory:
    coefficients = _COEFFICIENTS.get(site.kind)
    if coefficients is None or not site.has_shapes:
        return SiteMemory()
    kept, added, chunk_tensors = coefficients
    full = site.tokens * site.amplified_width * site.itemsize  # one N x W tensor
    returned = 2 * full if site.kind == "lm_head" and site.logits_returned else 0
    kept_before, added_before = kept * full, added * full + returned
    if site.checkpointed:  # recomputed in backward instead of kept
        kept_before, added_before = 0, kept_before + added_before
    if not site.rewritten:
        return SiteMemory(kept_before, added_before, kept_before, added_before)
    if site.kind == "attention":  # is_causal: no mask at all; blocks: B·c rows of the mask
        block_rows = -(-site.tokens // site.chunks) if site.chunks else 0
        return SiteMemory(kept_before, added_before, 0, chunk_tensors * block_rows * site.amplified_width)
    chunk = chunk_tensors * site.largest_chunk_tokens * site.amplified_width * site.itemsize
    if site.kind != "lm_head":
        kept = site.tokens * kept_row_bytes(site) if (site.decision or "").startswith("kept") else 0
        return SiteMemory(kept_before, added_before, kept, chunk)
    gradients = (site.tokens + site.amplified_width) * site.in_width * site.itemsize
    return SiteMemory(kept_before, added_before, gradients, max(chunk, gradients))


def estimate_peak(sites: Iterable[SiteReport]) -> PeakEstimate:
    """Peak of these sites (in forward order) over one step, before and after the rewrite."""
    memory = [estimate_site(s) for s in sites]
    before = _backward_peak([m.kept_before for m in memory], [m.added_before for m in memory])
    after = _backward_peak([m.kept_after for m in memory], [m.added_after for m in memory])
    return PeakEstimate(before, after)


def _backward_peak(kept: list[int], added: list[int]) -> int:
    """Backward reaches site i with sites 1..i still holding what they kept, and adds its own."""
    peak, held = 0, 0
    for kept_here, added_here in zip(kept, added):
        held += kept_here
        peak = max(peak, held + added_here)
    return peak
