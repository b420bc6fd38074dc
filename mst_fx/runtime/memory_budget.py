"""The memory budget: each chunked site decides, per call, whether to keep its intermediates for
backward or to recompute them, and how many chunks it needs.

What the budget covers: the memory the chunked sites themselves hold, i.e. the intermediates a
site keeps from its forward to its backward, plus the working memory of the chunk being computed
(a chunk's N/M x I or N/M x V tensors). It does not cover the weights, their gradients, the
optimizer's state, or the activations outside the sites (attention, norms, the residual stream):
those are the same with and without mst. Attention blocks keep their own size rule (`chunk_plan`).

Per call, with `held` the bytes that sites have kept and not yet released (on this device, across
every site and every forward since their backward), a site of N tokens decides:

    keep      when  held + N·keep_row + max(N·work_row, reserve) <= budget
              one chunk, its intermediates kept for backward: no recompute (MLP sites only; the
              LM head computes its gradients in forward and never recomputes anyway)
    one chunk when  held + N·work_row <= budget
              (one chunk: N itself when a power of two, else N's binary pieces, 512 + 8 for 520,
              so that bodies compiled per power of two serve every length)
    chunks    of the most rows c (a power of two, at least MIN_ROWS) with held + c·work_row <= budget,
              recomputed in backward; when not even MIN_ROWS fit, the step is over the budget:
              it runs at MIN_ROWS and says so once, at WARNING, with the numbers

`reserve` is what makes a greedy choice safe across the sites of a step. Kept intermediates add up
until backward frees them, and the forward decides early layers before it sees late ones. A site
may keep only what leaves every other site of its budget room for one chunk at today's lean rule
(`ChunkPolicy.rows_for`, the aspect-ratio rule) at the same length: `reserve` is the largest such
chunk. So keeping never pushes a later site finer than mst would chunk it without a budget, and
never over the budget: each later call checks `held + its chunk <= budget` against the `held` that
includes every earlier site's keep. The sites are known before the first call (the passes build
them at compile time), so a fixed budget plans the first step as every later one. Chosen over a
plan replayed from a recorded previous step because the rule needs no step boundary: several
forwards before one backward (gradient accumulation, chosen + rejected in DPO) just add to `held`.
("auto" does wait one step, but only to measure the memory outside the sites.)

Kept intermediates live in a stash behind a ticket, a small CPU tensor that the op returns and the
graph saves for backward. The backward op takes them by ticket and releases their bytes; if the
ticket dies first (no backward: an evaluation forward with grad on, a checkpointed region's first
forward), a finalizer releases them. A ticket without its stash (id 0, or already taken) means
recompute: the op is correct either way, only slower.

`"auto"` (the default) is the memory the device has for this process, less what the process holds
apart from the sites' keeps. At a site's first call it reads what the device has: free memory (CUDA
`mem_get_info`; on CPU the kernel's `MemAvailable`) plus what the process holds already (CUDA's
cached blocks; on CPU its resident size). At every call it samples what the process holds then
(CUDA `memory_allocated`, CPU resident size), less the sites' keeps, and keeps the largest sample:
the weights, gradients, optimizer state and activations outside the sites at their most. The
budget is 90% of what the device has, less that largest sample. The 10% margin is for what the
samples miss: the allocator's fragmentation and a peak between two sites' calls (an attention
backward, the optimizer's step). Until a backward has run, the budget is unknown and every site
runs lean: the first step is the lean step, and it is measured. So a step that is short of memory
finds a small or zero budget and runs as lean as mst without one; a short step on a roomy device
keeps everything. A step longer than any measured before is planned from the largest sample so
far, which grows with it only as its own calls are sampled.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MIN_ROWS = 16  # the finest chunking a budget can ask for
AUTO = "auto"
OFF = "off"
AUTO_MARGIN = 0.1  # of what "auto" finds: fragmentation, and peaks between two sites' calls

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_budget(value) -> int | str:
    """The option's value as bytes (an int), "auto" or "off"; ValueError naming the option otherwise."""
    allowed = "an int of bytes >= 0, a string such as '6GiB' or '512MB', 'auto' or 'off'"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (AUTO, OFF):
            return text
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
        if match and match.group(2) in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"mst option 'memory_budget' must be {allowed}, got {value!r}")


def free_bytes(device: torch.device) -> int:
    """Memory free on `device` now: CUDA's free memory, or the RAM the kernel says is available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def in_use_bytes(device: torch.device) -> int:
    """Memory this process holds on `device` now: CUDA's allocated tensors, or the resident size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Auto:
    """`"auto"` on one device (see the module docstring): the sites may hold what the device has
    for this process, less a margin, less the most the process has held apart from them."""

    def __init__(self, device: torch.device):
        self.device = device
        in_use = in_use_bytes(device)
        cached = torch.cuda.memory_reserved(device) if device.type == "cuda" else in_use
        self.capacity = free_bytes(device) + cached
        self.base = in_use
        self.learned = False  # a backward has run: one step's forward has been measured

    def sample(self, held: int) -> None:
        self.base = max(self.base, in_use_bytes(self.device) - held)

    def budget(self, held: int) -> int | None:
        """Bytes, or None while the first step runs lean and is measured."""
        self.sample(held)
        return max(0, int(self.capacity * (1 - AUTO_MARGIN)) - self.base) if self.learned else None


_AUTO: dict[str, _Auto] = {}


def auto(device: torch.device) -> _Auto:
    name = str(device)
    if name not in _AUTO:
        _AUTO[name] = _Auto(device)
        log.info("mst: memory_budget='auto' on %s: %d bytes for this process", name, _AUTO[name].capacity)
    return _AUTO[name]


def preview(setting: int | str, device: torch.device) -> int | None:
    """The budget a call would be given now, for a report: "auto" as it would be once learned,
    from the memory in use at this moment (nothing is recorded)."""
    if setting == OFF:
        return None
    if setting != AUTO:
        return setting
    in_use = in_use_bytes(device)
    cached = torch.cuda.memory_reserved(device) if device.type == "cuda" else in_use
    return max(0, int((free_bytes(device) + cached) * (1 - AUTO_MARGIN)) - in_use)


def note_backward(setting: int | str, device: torch.device) -> None:
    """A site's backward begins: "auto" measures the memory in use, and has seen a forward whole."""
    if setting == AUTO:
        budget = auto(device)
        budget.sample(ledger(device).held)
        budget.learned = True


def resolve(setting: int | str, device: torch.device, held: int = 0) -> int | None:
    """The budget in bytes; None when off, or while "auto" is learning."""
    if setting == OFF:
        return None
    return auto(device).budget(held) if setting == AUTO else setting


# ---------------------------------------------------------------- the decision


@dataclasses.dataclass(frozen=True)
class Decision:
    keep: bool  # one chunk, intermediates kept for backward
    rows: int  # tokens per chunk (at least all of them: one chunk)
    budget: int | None  # bytes; None: no budget (the lean rule)
    held: int = 0  # bytes kept by sites when the decision was made
    needs: int = 0  # bytes this call adds on top of `held` at its largest
    fits: bool = True

    def describe(self, tokens: int, recomputes: bool) -> str:
        """For a report; `recomputes`: the site recomputes its chunks in backward (all but the LM head)."""
        if self.keep:
            return "kept, no recompute"
        if self.rows >= tokens:
            return "one chunk"
        chunks = -(-tokens // max(1, self.rows))
        return f"{chunks} chunks of {self.rows}" + (", recomputed" if recomputes else "")


def choose(
    tokens: int, budget: int, held: int, reserve: int, keep_row: int, work_row: int, can_keep: bool
) -> Decision:
    """The decision of the module docstring, as a pure function of its numbers."""
    whole = 1 << max(0, tokens - 1).bit_length()  # rows that take all tokens: N's binary pieces
    if can_keep:
        needs = tokens * keep_row + max(tokens * work_row, reserve)
        if held + needs <= budget:
            return Decision(True, whole, budget, held, needs)
    room = budget - held
    if tokens * work_row <= room:
        return Decision(False, whole, budget, held, tokens * work_row)
    rows = MIN_ROWS
    if work_row > 0 and room // work_row >= MIN_ROWS:
        rows = 1 << (int(room // work_row).bit_length() - 1)
    return Decision(False, rows, budget, held, rows * work_row, fits=rows * work_row <= room)


# ---------------------------------------------------------------- what sites expect of each other

# budget setting -> site key -> bytes of that site's lean chunk at a length, on a device type
_LEAN_CHUNKS: dict[int | str, dict[str, Callable[[int, str], int]]] = {}


def expect(setting: int | str, key: str, lean_chunk: Callable[[int, str], int]) -> None:
    """Register a site built under `setting`, and the bytes its chunk takes at the lean rule."""
    if setting != OFF:
        _LEAN_CHUNKS.setdefault(setting, {})[key] = lean_chunk


def reserve(setting: int | str, tokens: int, device_type: str, excluding: str) -> int:
    """The largest lean chunk of any other site under the same budget (see the module docstring)."""
    others = (f for key, f in _LEAN_CHUNKS.get(setting, {}).items() if key != excluding)
    return max((f(tokens, device_type) for f in others), default=0)


# ---------------------------------------------------------------- kept intermediates


class _Ledger:
    """The bytes sites keep on one device, and the kept tensors behind their tickets."""

    def __init__(self) -> None:
        self.held = 0
        self._kept: dict[int, tuple[object, int]] = {}

    def keep(self, kept: object, nbytes: int) -> Tensor:
        """A ticket for `kept` (tensors of `nbytes` bytes), charged to `held` until it is taken."""
        ticket_id = next(_TICKET_IDS)
        self._kept[ticket_id] = (kept, nbytes)
        self.held += nbytes
        ticket = torch.tensor(ticket_id, dtype=torch.int64)
        weakref.finalize(ticket, self._release, ticket_id)
        return ticket

    def take(self, ticket: Tensor) -> object | None:
        return self._release(int(ticket))

    def _release(self, ticket_id: int) -> object | None:
        entry = self._kept.pop(ticket_id, None)
        if entry is None:
            return None
        self.held -= entry[1]
        return entry[0]


_TICKET_IDS = itertools.count(1)
_LEDGERS: dict[str, _Ledger] = {}


def ledger(device: torch.device) -> _Ledger:
    return _LEDGERS.setdefault(str(device), _Ledger())


def no_ticket() -> Tensor:
    """The ticket of a call that kept nothing: its backward recomputes."""
    return torch.zeros((), dtype=torch.int64)


# ---------------------------------------------------------------- a site's call


_warned_over_budget: set = set()


def decide(
    setting: int | str, key: str, x: Tensor, keep_row: int, work_row: int, lean_rows: int, can_keep: bool
) -> Decision:
    """The decision for one call of site `key` on the rows `x` (N x d)."""
    held = ledger(x.device).held
    budget = resolve(setting, x.device, held)
    if budget is None:
        return Decision(False, lean_rows, None)
    tokens = x.shape[0]
    decision = choose(tokens, budget, held, reserve(setting, tokens, x.device.type, key), keep_row, work_row, can_keep)
    if not decision.fits and setting not in _warned_over_budget:
        _warned_over_budget.add(setting)
        log.warning(
            "mst: the step does not fit memory_budget=%d bytes even at the finest chunking: a site of %d "
            "tokens needs %d bytes for a chunk of %d rows on top of %d bytes kept by other sites "
            "(short by %d bytes); running it at %d rows",
            budget, tokens, decision.needs, decision.rows, held, held + decision.needs - budget, decision.rows,
        )  # fmt: skip
    return decision
