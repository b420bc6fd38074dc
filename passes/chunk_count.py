"""How many mini-sequences a site is split into.

`chunks="auto"` uses the aspect-ratio rule of Liger-Kernel and torch core's linear cross-entropy:
a chunk's amplified tensor (N/M x I for an MLP, N/M x V for an LM head) should be about the size
of the site's input (N x d). So the chunk is next_pow2(ceil(N / ceil(I / d))) tokens long and
M = ceil(N / chunk). Sites whose whole amplified tensor is small are not worth a rewrite.
"""

from __future__ import annotations

import math

from .graph_utils import CantChunk

# Below this, the amplified tensor is too small for chunking to pay for its extra kernel launches.
MIN_AMPLIFIED_BYTES = 1 << 20


def choose_chunks(option: int | str, tokens: int, in_width: int, amplified_width: int, itemsize: int) -> int:
    """M for one site. `tokens` is a size hint when the token count is symbolic."""
    if option != "auto":
        return max(1, min(int(option), tokens))
    ratio = math.ceil(amplified_width / in_width)
    if ratio < 2:
        raise CantChunk(f"no amplification to cut: width {amplified_width} vs input width {in_width}")
    amplified_bytes = tokens * amplified_width * itemsize
    if amplified_bytes < MIN_AMPLIFIED_BYTES:
        raise CantChunk(
            f"too few tokens to gain: the {tokens} x {amplified_width} intermediate is "
            f"{amplified_bytes} bytes (< {MIN_AMPLIFIED_BYTES}); set chunks=<int> to force"
        )
    chunk = 1 << max(0, math.ceil(tokens / ratio) - 1).bit_length()
    return max(1, math.ceil(tokens / chunk))
