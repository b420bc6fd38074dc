"""mst composed with sequence parallelism: DeepSpeed-Ulysses attention on 2 gloo ranks of this machine.

Each rank holds a contiguous half of one sequence. Attention all-to-alls the heads across the
ranks so that every rank attends over the whole sequence for its share of the heads, then all-to-alls
back; everything else (norms, MLPs, the LM head and the loss) sees only the rank's own tokens, and
that is where mst rewrites. The worker (`tests/sequence_parallel_worker.py`) runs one rank; the
checks are here.

The `funcol` engine is our own Ulysses attention on torch's functional collectives, registered with
`transformers.AttentionInterface`: the layout of DeepSpeed's `DistributedAttention` / ALST
`UlyssesSPAttentionHF`, which is also what accelerate's `ParallelismConfig(sp_size=..., sp_backend=
"deepspeed")` runs. The `deepspeed` engine is DeepSpeed's `UlyssesSPAttentionHF` itself, run when
deepspeed is installed (it is not a dependency of this project; see `_deepspeed_importable`).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sequence_parallel_worker as worker
from conftest import free_port

WORLD = 2
TIMEOUT_S = 180  # both ranks together; a hung collective fails the test instead of the run


def _why_no_gloo() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this build"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
    except OSError as error:
        return f"cannot listen on 127.0.0.1 for the rendezvous ({error})"
    return None


pytestmark = pytest.mark.skipif(_why_no_gloo() is not None, reason=str(_why_no_gloo()))


def _deepspeed_importable() -> bool:
    """DeepSpeed (with DS_BUILD_OPS=0, pure Python) runs Ulysses on CPU/gloo; it is optional here."""
    return all(importlib.util.find_spec(name) is not None for name in ("deepspeed", "einops"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{(engine, rank): what that rank's worker saved}; both engines share one launch of 2 processes."""
    out = tmp_path_factory.mktemp("sequence_parallel")
    engines = ["funcol"] + (["deepspeed"] if _deepspeed_importable() else [])
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(worker.__file__).resolve()), str(rank), str(WORLD), port, str(out), *engines],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = [proc.communicate()[0] for proc in procs]
        pytest.fail(f"the ranks did not finish in {TIMEOUT_S} s:\n" + _tails(logs))
    if any(proc.returncode for proc in procs):
        pytest.fail(f"a rank failed (exit {[p.returncode for p in procs]}):\n" + _tails(logs))
    return {
        (engine, rank): torch.load(out / f"{engine}.rank{rank}.pt")
        for engine in engines
        for rank in range(WORLD)
    }


def _tails(logs: list[str]) -> str:
    return "\n".join(f"--- rank {rank} ---\n{log[-3000:]}" for rank, log in enumerate(logs))


def _check_engine(results, engine: str) -> None:
    shard = worker.TOKENS // WORLD
    chunks = -(-shard // worker.CHUNK_SIZE)
    for rank in range(WORLD):
        r = results[(engine, rank)]
        where = f"{engine}, rank {rank}"

        # Every MLP and the LM head rewritten on this rank, over this rank's tokens only.
        rewritten = collections.Counter(s["kind"] for s in r["sites"] if s["rewritten"])
        assert rewritten == {"mlp gated": worker.LAYERS, "lm_head": 1}, (where, r["sites"])
        assert not [s for s in r["sites"] if not s["rewritten"]], (where, r["sites"])
        assert {s["location"] for s in r["sites"]} == {f"model.layers.{i}.mlp" for i in range(worker.LAYERS)} | {
            "lm_head"
        }, where
        for site in r["sites"]:
            assert (site["tokens"], site["chunks"]) == (shard, chunks), (where, site)
        assert r["logits_shape"] == (0,), where  # in training the rewritten head returns no logits

        # One graph, holding the sequence-parallel attention: q, k, v in and the output back, per layer.
        assert r["graphs"] == 1, (where, r["graphs"])
        assert r["all_to_alls_traced"] == 4 * worker.LAYERS, (where, r["traced_ops"])

        # The ranks' losses (shard sums over the global label count) add up to the full-sequence loss.
        torch.testing.assert_close(r["combined_loss"], r["expected_loss"], rtol=1e-5, atol=0, msg=where)
        assert r["local_loss"] < r["combined_loss"], where  # one shard's share, not the whole

        # The gradients, summed over the ranks, are the full-sequence gradients, every parameter.
        assert not r["missing_grads"], (where, r["missing_grads"])
        assert r["local_grad_is_partial"], where
        assert r["grads"].keys() == r["expected_grads"].keys(), where
        for name, expected in r["expected_grads"].items():
            torch.testing.assert_close(r["grads"][name], expected, rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")


def test_ulysses_functional_collectives_compose_with_mst(results):
    """Our Ulysses attention (functional all-to-alls traced into the graph) with every site rewritten."""
    _check_engine(results, "funcol")


@pytest.mark.skipif(not _deepspeed_importable(), reason="deepspeed is not installed (optional: pip install deepspeed)")
def test_deepspeed_ulysses_composes_with_mst(results):
    """DeepSpeed's own `UlyssesSPAttentionHF` (ALST), as accelerate's sp_backend="deepspeed" registers it."""
    _check_engine(results, "deepspeed")


def test_sharded_attention_is_needed_for_the_full_loss(results):
    """The control: attention over each rank's own tokens only (no all-to-all) gives another loss
    and other gradients, by far more than the tolerances above, so matching the full-sequence ones
    depends on the attention seeing the whole sequence. (At random init attention matters little to
    the loss, hence the loss margin of 10x the tolerance; the attention weights' gradients move
    far more.)"""
    for rank in range(WORLD):
        r = results[("funcol", rank)]
        gap = (r["shard_only_attention_loss"] - r["expected_loss"]).abs().item()
        assert gap > 10 * 1e-5 * r["expected_loss"].abs().item(), (rank, gap)
        for name, expected in r["expected_grads"].items():
            if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
                error = (r["shard_only_attention_grads"][name] - expected).abs().max().item()
                assert error > 1e-2 * expected.abs().max().item(), (rank, name, error)
