"""Shared test helpers: compile with mst, run one training step, compare with eager."""

from __future__ import annotations

import collections
import contextlib
import copy
import socket

import pytest
import torch

import mst_fx


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    mst_fx.clear_reports()
    yield
    torch._dynamo.reset()


@pytest.fixture
def decisions(monkeypatch):
    """(site kind, tokens, Decision) of every decision the memory budget makes (`memory_budget.decide`)."""
    from mst_fx.runtime import memory_budget

    made = []
    decide = memory_budget.decide

    def recorded(setting, group, key, x, *rest):
        decision = decide(setting, group, key, x, *rest)
        made.append((key.split("-")[0], x.shape[0], decision))
        return decision

    monkeypatch.setattr(memory_budget, "decide", recorded)
    return made


def assert_parity(
    model, call, inputs, rtol=1e-5, atol=1e-6, compile_kwargs=None, autocast=None, scaled_tol=None, **options
):
    """One training step under mst and in eager: same loss, same gradient for every parameter.

    `autocast`: a dtype to run both forwards under `torch.autocast`. `scaled_tol`: compare each
    gradient as max|got - expected| <= scaled_tol * max|expected| instead of element by element
    (for bf16, where one rounding in a different place moves a small element by a whole ulp).
    Returns how many sites of each kind the backend rewrote."""
    reference = copy.deepcopy(model)

    def context():
        return torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()

    with context():
        expected = call(reference, *inputs)
    expected.backward()
    options = {"compiler": "aot_eager", **options}
    compiled = torch.compile(model, backend=mst_fx.backend(**options), **(compile_kwargs or {}))
    with context():
        got = call(compiled, *inputs)
    got.backward()
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0, equal_nan=True)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:
            continue
        assert p.grad.dtype == q.grad.dtype, name
        if scaled_tol is None:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)
        else:
            error = (p.grad.float() - q.grad.float()).abs().max().item()
            assert error <= scaled_tol * q.grad.float().abs().max().item(), (name, error)
    return rewritten_kinds()


class SiteCounts(collections.Counter):
    """How many sites of each kind mst rewrote, with what mst and Dynamo said meanwhile: a failed
    comparison prints it (`pytest_assertrepr_compare`), so that when a new upstream release breaks
    a rewrite, the failure names the cause (a graph break and where, a site's reason), not a count."""

    causes: list[str]


def rewritten_kinds() -> SiteCounts:
    counts = SiteCounts(s.kind for r in mst_fx.compiled_reports() for s in r.rewritten())
    counts.causes = what_mst_said()
    return counts


def what_mst_said() -> list[str]:
    """The versions, Dynamo's graph breaks and the sites left alone, for an assertion's message."""
    import importlib.metadata as metadata

    report = mst_fx.last_report()
    versions = []
    for package in ("torch", "transformers", "kernels"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    lines = [", ".join(versions)]
    lines += [f"graph break: {b.describe()}" for b in report.graph_breaks]
    lines += [f"left alone: {s.kind} at {s.location}: {s.reason}" for s in report.sites if not s.rewritten]
    return lines


def pytest_assertrepr_compare(op, left, right):
    counts = left if isinstance(left, SiteCounts) else right if isinstance(right, SiteCounts) else None
    if op != "==" or counts is None:
        return None
    return [
        f"rewritten sites: {dict(left)} == {dict(right)}",
        "what mst and Dynamo said (the cause, when a new upstream release changed the traced graph):",
        *(f"  {line}" for line in counts.causes),
    ]


def skipped_reasons() -> list[str]:
    return [f"{s.kind}: {s.reason}" for r in mst_fx.compiled_reports() for s in r.left_alone()]


def loss_of(model, ids, labels):
    """Loss of a model called as model(ids, labels) or, for HF models, model(ids, labels=labels)."""
    if hasattr(model, "config") or hasattr(getattr(model, "_orig_mod", None), "config"):
        return model(ids, labels=labels).loss
    return model(ids, labels)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a 2-process rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
