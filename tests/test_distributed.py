"""mst under DDP and FSDP2: two gloo processes on CPU, one training step each, against eager.

Each test starts two ranks of `tests/distributed_worker.py` (torchrun's environment variables, a free
port) and reads back what they saved: parity of the loss and of every gradient after the
all-reduce / reduce-scatter, which sites each rank's graphs rewrote, where the reports place them,
what `mst_fx.last_report()` counts, how often the chunked ops ran, and what mst logged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port


WORLD = 2
WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

# The line mst's warning names when it sees only the pieces of DDP's split.
DDP_FIX = "torch._dynamo.config.optimize_ddp = False"


def _run_ranks(scenario: str, out_dir: Path, timeout: float = 180) -> list[dict]:
    """Both ranks of `scenario`, torchrun-style; each rank's saved results. A rank that fails stops
    the other at once (it would wait in a collective), and the test shows both ranks' output."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(WORLD),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    logs = [out_dir / f"{scenario}-rank{rank}.log" for rank in range(WORLD)]
    ranks = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:  # a file, not a pipe: nothing blocks on a full pipe
            command = [sys.executable, str(WORKER), scenario, str(out_dir)]
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            ranks.append(subprocess.Popen(command, env=rank_env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in ranks) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in ranks):
                break
            time.sleep(0.1)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    for rank, proc in enumerate(ranks):
        if proc.returncode != 0:
            outputs = "\n".join(f"--- rank {r}:\n{log.read_text()[-5000:]}" for r, log in enumerate(logs))
            killed = f" (killed: past {timeout:.0f} s, or the other rank failed)" if proc.returncode < 0 else ""
            pytest.fail(f"{scenario}: rank {rank} exited with {proc.returncode}{killed}\n{outputs}")
    return [torch.load(out_dir / f"{scenario}-rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _assert_parity(result: dict) -> None:
    """The compiled step's loss and every gradient (after DDP/FSDP's reduction) against eager."""
    torch.testing.assert_close(result["loss"], result["expected_loss"], rtol=1e-5, atol=0)
    grads, expected = result["grads"], result["expected_grads"]
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def _sites(result: dict) -> list[dict]:
    return [site for graph in result["reports"] for site in graph["sites"]]


def _rewritten(result: dict) -> list[tuple[str, str]]:
    return sorted((s["kind"], s["location"]) for s in _sites(result) if s["rewritten"])


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict]:
    return _run_ranks("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def ddp_logits(tmp_path_factory) -> list[dict]:
    return _run_ranks("ddp_logits", tmp_path_factory.mktemp("ddp_logits"))


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> list[dict]:
    return _run_ranks("fsdp2", tmp_path_factory.mktemp("fsdp2"))


def _buckets(run: dict) -> int:
    """How many pieces DDP's optimizer split the rewritten graph into, as mst logged it."""
    said = [m for level, m in run["logs"] if "split it at" in m]
    assert len(said) == 1, run["logs"]
    return int(said[0].split("split it at ")[1].split(" ")[0])


@needs_gloo
def test_ddp_default_optimizer_rewrites_every_site_and_keeps_the_buckets(ddp):
    """Dynamo's default `optimize_ddp` with 1 MiB buckets, smaller than the MLPs' weights: mst
    rewrites the whole graph before the optimizer splits it, so no boundary cuts a site; the graph
    is still split at the buckets (DDP's all-reduce overlaps the backward), and nothing is said."""
    for rank, result in enumerate(ddp):
        run = result["default"]
        assert _rewritten(run) == [("lm_head", "head"), ("mlp gated", "blocks.0"), ("mlp gated", "blocks.1")], rank
        assert all(s["rewritten"] for s in _sites(run)), (rank, _sites(run))
        assert not [m for level, m in run["logs"] if level == "WARNING"], rank
        assert run["op_calls"] == ALL_SITES_CHUNKED, (rank, run["op_calls"])
        assert _buckets(run) >= 3, rank  # 4 MiB of weights in 1 MiB buckets
        _assert_parity(run)


@needs_gloo
def test_ddp_pieces_alone_report_the_cut_mlps_and_warn_once_with_the_fix(ddp):
    """Where mst can't take the whole graph first (the optimizer as torch ships it), it sees only
    the pieces: the MLPs the buckets cut are reported as cut, one WARNING names the line that keeps
    them whole, and the step is still correct."""
    from mst_fx.passes.mlp import CUT_REASON

    for rank, result in enumerate(ddp):
        run = result["pieces"]
        warnings = [message for level, message in run["logs"] if level == "WARNING"]
        assert len(warnings) == 1 and DDP_FIX in warnings[0], (rank, warnings)
        cut = sorted(s["location"] for s in _sites(run) if s["reason"] == CUT_REASON)
        assert cut == ["blocks.0.gate", "blocks.0.up", "blocks.1.gate", "blocks.1.up"], (rank, cut)
        assert _rewritten(run) == [("lm_head", "head")], rank  # the head and its loss stay together
        _assert_parity(run)


@needs_gloo
def test_ddp_default_optimizer_on_a_model_returning_logits(ddp_logits):
    """An HF causal LM in train mode returns its logits next to its loss; under DDP's graph optimizer
    its pieces are compiled on fake tensors. Every site is rewritten (the attention mask too: it is
    read in the whole graph, not in the piece that gets it as an input), the logits dropped, with
    parity."""
    for rank, result in enumerate(ddp_logits):
        run = result["default"]
        kinds = sorted(kind for kind, _ in _rewritten(run))
        assert ("lm_head", "lm_head") in _rewritten(run) and kinds.count("mlp gated") == 2, (rank, _rewritten(run))
        # The causal mask is built before the first layer, in what would be another piece: read whole.
        assert [(s["location"], s["rewritten"]) for s in _sites(run) if s["kind"] == "attention"] == [
            ("model.layers.0.self_attn", True)
        ], (rank, _sites(run))
        assert not [m for level, m in run["logs"] if DDP_FIX in m], rank
        assert run["op_calls"].get("mst::linear_cross_entropy") == 1, (rank, run["op_calls"])
        assert run["op_calls"].get("mst::mlp_forward") == 2, (rank, run["op_calls"])
        assert _buckets(run) >= 2, rank
        _assert_parity(run)


# Per step, forward and backward: both MLPs chunked, and the LM head (gradients in its forward).
ALL_SITES_CHUNKED = {"mst::mlp_forward": 2, "mst::mlp_backward": 2, "mst::linear_cross_entropy": 1}


@needs_gloo
def test_ddp_with_the_fix_rewrites_every_site_with_parity(ddp):
    for rank, result in enumerate(ddp):
        run = result["optimize_ddp_false"]
        assert _rewritten(run) == [("lm_head", "head"), ("mlp gated", "blocks.0"), ("mlp gated", "blocks.1")], rank
        assert all(s["rewritten"] for s in _sites(run)), (rank, _sites(run))
        assert not [m for level, m in run["logs"] if level == "WARNING"], rank
        assert run["op_calls"] == ALL_SITES_CHUNKED, rank
        _assert_parity(run)


@needs_gloo
def test_fsdp2_rewrites_every_layer_with_parity_and_full_locations(fsdp2):
    expected = [("lm_head", "lm_head"), ("mlp gated", "model.layers.0.mlp"), ("mlp gated", "model.layers.1.mlp")]
    for rank, result in enumerate(fsdp2):
        run = result["cache"]
        # FSDP2's hooks make each decoder layer a frame of its own. With the cache on, Dynamo compiles
        # the second layer as a recompile of the first's frame (it guards on HF's `layer_idx`): the
        # locations carry each layer's index, and last_report() counts both layers' graphs.
        assert _rewritten(run) == expected, rank
        assert sorted((kind, loc) for kind, loc, rewritten in run["counted_sites"] if rewritten) == expected, rank
        assert all(rewritten for _, _, rewritten in run["counted_sites"]), rank
        assert run["op_calls"] == ALL_SITES_CHUNKED, rank
        _assert_parity(run)


@needs_gloo
def test_fsdp2_without_cache_runs_every_layer_chunked_with_parity(fsdp2):
    """`use_cache=False`, the recipe in the README: one graph serves every layer (no guard differs),
    so a model deeper than Dynamo's recompile limit (8) still has every layer compiled. The report
    holds that graph once, under the layer it was compiled for; the ops show every layer ran chunked."""
    for rank, result in enumerate(fsdp2):
        run = result["no_cache"]
        locations = sorted(loc for _, loc, _ in run["counted_sites"])
        assert locations[0] == "lm_head" and all(loc.startswith("model.layers.") for loc in locations[1:]), locations
        # The attention mask is built in the root's frame and reaches each layer's graph as an input:
        # the attention pass can't read it there, and says so.
        assert all(rewritten for kind, _, rewritten in run["counted_sites"] if kind != "attention"), rank
        assert run["op_calls"] == ALL_SITES_CHUNKED, rank
        _assert_parity(run)


@pytest.fixture(scope="module")
def fsdp2_moe(tmp_path_factory) -> list[dict]:
    return _run_ranks("fsdp2_moe", tmp_path_factory.mktemp("fsdp2_moe"))


@needs_gloo
def test_fsdp2_moe_layers_run_their_experts_chunked_with_parity(fsdp2_moe):
    """Each FSDP2-sharded layer of a Qwen3-MoE is a frame of its own; its routed experts are one
    chunked site there, and the expert weights' gradients reach FSDP2's reduce-scatter whole."""
    for rank, result in enumerate(fsdp2_moe):
        run = result["moe"]
        experts = [loc for kind, loc, rewritten in run["counted_sites"] if kind == "moe experts" and rewritten]
        assert experts and all(loc.startswith("model.layers.") for loc in experts), (rank, run["counted_sites"])
        assert run["op_calls"].get("mst::experts_forward") == 2, (rank, run["op_calls"])  # both layers
        assert run["op_calls"].get("mst::experts_backward") == 2, (rank, run["op_calls"])
        _assert_parity(run)


@needs_gloo
def test_fsdp2_with_the_loss_outside_the_model(fsdp2):
    """The root's graph returns the head's rows and its all-gathered weight in place of the logits;
    the loss computed afterwards must still see that weight whole (FSDP2 reshards after forward)."""
    for rank, result in enumerate(fsdp2):
        run = result["loss_outside"]
        _assert_parity(run)
        heads = [(s["kind"], s["location"], s["rewritten"], s["loss_outside"]) for s in _sites(run) if s["kind"] == "lm_head"]
        assert heads == [("lm_head", "lm_head", True, True)], (rank, heads)
        assert run["op_calls"].get("mst::linear_cross_entropy") == 1, (rank, run["op_calls"])
        # FSDP2 reads `_base` and hooks the output for its pre-backward unshard: neither computes the logits.
        assert not [m for level, m in run["logs"] if level == "WARNING"], (rank, run["logs"])


def test_per_block_compile_names_each_block_and_counts_each_graph():
    """What FSDP2 does to the frames, without processes: each block compiled on its own (torchtitan's
    way). Dynamo compiles the second and third blocks as recompiles of the first's frame (it guards
    on which module `self` is), and names their parameters from the block (`gate.weight`): the
    locations still name each block, and last_report() counts all three graphs."""
    import mst_fx
    from mst_fx.models import MLPStack, random_batch

    torch.manual_seed(0)
    model = MLPStack(vocab=512, d=32, intermediate=128, layers=3)
    for block in model.blocks:
        block.compile(backend=mst_fx.backend(chunk_size=16, compiler="aot_eager"))
    model(*random_batch(512, 1, 64)).backward()
    reports = mst_fx.compiled_reports()
    assert len({r.frame for r in reports}) == 1 and len(reports) == 3  # one frame, compiled three times
    blocks = ["blocks.0", "blocks.1", "blocks.2"]
    assert [(s.kind, s.location, s.rewritten) for r in reports for s in r.sites] == [("mlp gated", b, True) for b in blocks]
    assert [s.location for s in mst_fx.last_report().counted_sites] == blocks
