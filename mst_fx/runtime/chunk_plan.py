"""How the tokens of one site are cut into mini-sequences: the chunk size, and the chunks of a length.

The unit is the chunk size in tokens. The passes fix the *policy* when they rewrite a site; the
runtime applies it to the length it is called with, so under dynamic shapes the number of chunks
follows the length and one compiled graph serves every length.

`chunk_size="auto"` (the default) picks

    C = max(floor, prev_pow2(N * d / W))        N tokens, input width d, amplified width W (I or V)

* `N * d / W` is the aspect-ratio rule of Liger-Kernel and torch core's linear cross-entropy: a
  chunk's amplified tensor (C x W) is then about the size of the site's input (N x d), which the
  step holds anyway. Chunking finer saves nothing that matters next to the rest of the step.
* `floor` is where chunking finer stops paying for itself in time: every chunk reads and writes the
  whole weight gradient it accumulates into (a W x d matrix of s-byte elements), and the chunk's
  weight-gradient matmul does 2·C·W·d flops for those 2·W·d·s bytes, C / s flops per byte. An H100
  needs about 300 flops per byte to stay compute-bound (990 TFLOP/s bf16 over 3.35 TB/s), so
  C >= ~600 in bf16: 1024. A CPU needs a handful; 256 leaves room for the per-chunk overheads.
  At short lengths this floor is what keeps the LM head from being cut into dozens of slivers
  (it used to be 32 chunks of 64 tokens at 2048 tokens, at 0.4-0.57x Inductor's speed).
  Routed experts scale the floor by E/k (`floor_scale`): a chunk's token sends each to k of the
  E experts, so per token it does k/E of the flops against the same whole-weight gradient traffic.

A site whose (static) length fits in one such chunk is left alone: its amplified tensor is already
no bigger than one chunk, so there is no memory to win and only a recompute to pay. A symbolic
length is always rewritten; a short call then runs as one chunk.

`chunk_size=<int>` fixes C; `chunks=<int>` fixes the number of chunks instead (C follows N).

Attention under a mask (`masked_attention.py`) cuts its queries into blocks of its own size under
"auto": as many rows as keep one block's mask (rows x Nkv, which SDPA widens to a float bias) under
MASK_BLOCK_ELEMENTS, and at most MAX_ATTENTION_ROWS, where a block's keys (its window plus its own
rows) stay close to the window. Measured on CPU at 16384 tokens, a window of N/8: 256 rows ran
the forward and backward in 0.62 s, 128 in 0.68 s, 1024 in 0.64 s, and causal SDPA in 0.97 s.
"""

from __future__ import annotations

import dataclasses

# Chunks below this many tokens cost more in weight-gradient traffic than they save (see above).
MIN_AUTO_ROWS = {"cuda": 1024}
MIN_AUTO_ROWS_DEFAULT = 256
MASK_BLOCK_ELEMENTS = 1 << 22
MAX_ATTENTION_ROWS = 256
MIN_ATTENTION_ROWS = 16


def _prev_pow2(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class ChunkPolicy:
    """Fixed rows per chunk, a fixed number of chunks, or (neither) the "auto" rule above."""

    rows: int | None = None
    count: int | None = None

    def rows_for(self, tokens: int, in_width: int, amplified_width: int, device_type: str, floor_scale: float = 1) -> int:
        """Tokens per chunk for a call with `tokens` tokens."""
        if self.rows is not None:
            return self.rows
        if self.count is not None:
            return max(1, -(-tokens // self.count))
        floor = int(MIN_AUTO_ROWS.get(device_type, MIN_AUTO_ROWS_DEFAULT) * max(1, floor_scale))
        return max(floor, _prev_pow2(tokens * in_width // max(1, amplified_width)))

    def chunks(
        self, tokens: int, in_width: int, amplified_width: int, device_type: str, floor_scale: float = 1
    ) -> list[tuple[int, int]]:
        """(start, length) of each chunk of `tokens` rows, in order.

        Fixed count: the rows split as evenly as they go (two chunk lengths at most). Otherwise full
        chunks of C, and what is left over in power-of-two pieces (64 + 16 + 4 for 84), so that a
        site compiles at most log2(C) + 1 chunk bodies over every length it will ever see."""
        if tokens <= 0:
            return []
        if self.count is not None:
            base, extra = divmod(tokens, self.count)
            lengths = [base + 1] * extra + [base] * (self.count - extra) if base else [1] * tokens
        else:
            rows = self.rows_for(tokens, in_width, amplified_width, device_type, floor_scale)
            full, rest = divmod(tokens, rows)
            lengths = [rows] * full + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        return list(zip(starts, lengths))

    def attention_rows(self, q_len: int, kv_len: int) -> int:
        """Queries per block of attention under a mask (see the module's docstring)."""
        if self.rows is not None:
            return self.rows
        if self.count is not None:
            return max(1, -(-q_len // self.count))
        return max(MIN_ATTENTION_ROWS, min(MAX_ATTENTION_ROWS, _prev_pow2(MASK_BLOCK_ELEMENTS // max(1, kv_len))))

    def why_not_rewrite(
        self, tokens: int | None, in_width: int, amplified_width: int, device_type: str, floor_scale: float = 1
    ) -> str | None:
        """Why a site of these sizes is better left alone under "auto", or None. `tokens` None: the
        length is symbolic, nothing is known of the lengths it will run with, and it is rewritten."""
        if self.rows is not None or self.count is not None:
            return None
        if amplified_width < 2 * in_width:
            return f"no amplification to cut: width {amplified_width} vs input width {in_width}"
        if tokens is None:
            return None
        rows = self.rows_for(tokens, in_width, amplified_width, device_type, floor_scale)
        if tokens <= rows:
            return (
                f"{tokens} tokens fit in one chunk of {rows} (chunk_size='auto'): nothing to cut; "
                "set chunk_size=<int> to force"
            )
        return None

    def describe(self) -> str:
        if self.rows is not None:
            return f"chunk_size={self.rows}"
        return f"chunks={self.count}" if self.count is not None else "chunk_size=auto"
