"""Bytes each rank sends per attention call, forward and backward, equal the formulas of each algorithm exactly;
and ring attention posts the next hop before computing the current block (overlap).

Bodies replace `torch.distributed.<collective>` with counting wrappers (hf_seqpar looks them up at call time)
and restore them in a `finally`. Inputs and accumulation are float64, so every element is E = 8 bytes.
"""

from __future__ import annotations

import contextlib
import inspect
from fractions import Fraction

import pytest
import torch

import hf_seqpar

E = 8
_GROUPS: dict = {}


def _groups(cfg):
    if cfg not in _GROUPS:
        _GROUPS[cfg] = hf_seqpar.init_groups(cfg)
    return _GROUPS[cfg]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _counting(dist, sent: dict) -> dict:
    """Counting wrappers {name: fn} for the collectives; each adds what this rank sends to `sent[kind]`."""

    def collective(name, kind, share):
        orig, sig = getattr(dist, name), inspect.signature(getattr(dist, name))

        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs).arguments
            tensor = bound.get("input", bound.get("input_tensor"))
            n = dist.get_world_size(bound.get("group"))
            sent[kind] = sent.get(kind, 0) + _nbytes(tensor) * share(n)
            return orig(*args, **kwargs)

        return wrapper

    orig_p2p = dist.batch_isend_irecv

    def p2p(ops):
        sent["p2p"] = sent.get("p2p", 0) + sum(_nbytes(op.tensor) for op in ops if op.op is dist.isend)
        return orig_p2p(ops)

    wrappers = {"batch_isend_irecv": p2p}
    for name, kind, share in [
        ("all_to_all_single", "all_to_all", lambda n: Fraction(n - 1, n)),  # keeps its own 1/n
        ("all_gather_single", "all_gather", lambda n: n - 1),  # its input goes to every other rank
        ("all_gather_into_tensor", "all_gather", lambda n: n - 1),
        ("reduce_scatter_single", "reduce_scatter", lambda n: Fraction(n - 1, n)),
        ("reduce_scatter_tensor", "reduce_scatter", lambda n: Fraction(n - 1, n)),
    ]:
        if hasattr(dist, name):
            wrappers[name] = collective(name, kind, share)
    return wrappers


@contextlib.contextmanager
def _patched(owner, replacements: dict):
    """Set attributes of `owner` (a module or class) for the duration; restore the originals on exit."""
    saved = {name: getattr(owner, name) for name in replacements}
    try:
        for name, fn in replacements.items():
            setattr(owner, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(owner, name, fn)


def _body_bytes(cfg_kwargs, shape):
    import torch.distributed as dist

    b, c, h, hkv, d = shape
    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size(), **cfg_kwargs)
    groups = _groups(cfg)
    gen = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(b, c, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, c, hkv, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, c, hkv, d, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(b, c, h, d, generator=gen, dtype=torch.float64)
    forward, backward = {}, {}
    with _patched(dist, _counting(dist, forward)):
        out = hf_seqpar.sequence_parallel_attention(q, k, v, config=cfg, groups=groups)
    with _patched(dist, _counting(dist, backward)):
        torch.autograd.grad(out, [q, k, v], dout)
    return forward, backward


def _ring(p, b, c, hkv, d):
    """(forward, backward) p2p bytes of ring attention over p ranks on [b, c, hkv, d] K/V shards."""
    kv = 2 * b * c * hkv * d * E
    return (p - 1) * kv, (p - 1) * kv + (p - 1) * kv  # backward: K/V again + dK/dV partial sums, p-1 hops each


def _ulysses(p, b, c, h, hkv_sent, d):
    """all-to-all bytes of q, k, v and out (each direction the same): (p-1)/p of each tensor leaves the rank."""
    return Fraction(p - 1, p) * b * c * d * E * (2 * h + 2 * hkv_sent)


def _expected(mode, p, shape):
    b, c, h, hkv, d = shape
    kv = 2 * b * c * hkv * d * E
    if mode == "ring":
        fwd, bwd = _ring(p, b, c, hkv, d)
        return {"p2p": fwd}, {"p2p": bwd}
    if mode == "allgather":
        return {"all_gather": (p - 1) * kv}, {"all_gather": (p - 1) * kv, "reduce_scatter": (p - 1) * kv}
    # K/V heads as the all-to-all sees them: as is when p divides them, one per rank when they divide p,
    # otherwise one per query head
    sent = hkv if hkv % p == 0 else p if p % hkv == 0 else h
    if mode == "ulysses":
        return {"all_to_all": _ulysses(p, b, c, h, sent, d)}, {"all_to_all": _ulysses(p, b, c, h, sent, d)}
    u, r = 2, p // 2  # usp with ulysses_size=2
    sent = hkv if hkv % u == 0 else u if u % hkv == 0 else h
    a2a = _ulysses(u, b, c, h, sent, d)
    ring_fwd, ring_bwd = _ring(r, b, u * c, sent // u, d)
    return {"all_to_all": a2a, "p2p": ring_fwd}, {"all_to_all": a2a, "p2p": ring_bwd}


CASES = [  # (world, mode, (batch, local length, heads_q, heads_kv, head_dim))
    (2, "ring", (2, 6, 4, 2, 3)),
    (4, "ring", (2, 6, 4, 2, 3)),
    (2, "allgather", (2, 6, 4, 2, 3)),
    (4, "allgather", (2, 6, 4, 2, 3)),
    (2, "ulysses", (2, 6, 4, 2, 3)),
    (4, "ulysses", (2, 6, 8, 4, 3)),
    (4, "ulysses", (2, 6, 8, 2, 3)),  # heads_kv < P: one replicated K/V head per rank
    (4, "ulysses", (2, 6, 8, 1, 3)),  # MQA
    (4, "ulysses", (1, 4, 12, 6, 2)),  # 6 and 4 do not divide each other: one K/V head per query head
    (2, "ulysses", (2, 6, 4, 1, 3)),
    (4, "usp", (2, 6, 8, 2, 3)),
    (4, "usp", (2, 6, 8, 1, 3)),  # heads_kv < ulysses_size: replicated to 2, then 1 per ring rank
]


@pytest.mark.parametrize(
    "ranks,mode,shape", CASES, indirect=["ranks"], ids=[f"{m}-P{p}-{'x'.join(map(str, s))}" for p, m, s in CASES]
)
def test_bytes_sent_match_the_formulas(ranks, mode, shape):
    cfg_kwargs = {"mode": mode} if mode != "usp" else {"mode": "usp", "ulysses_size": 2}
    want_fwd, want_bwd = _expected(mode, ranks.world_size, shape)
    for rank, (fwd, bwd) in enumerate(ranks.run(_body_bytes, cfg_kwargs, shape)):
        assert (fwd, bwd) == (want_fwd, want_bwd), f"rank {rank}"


def _body_ring_order():
    import torch.distributed as dist

    from hf_seqpar.algorithms import comm, ring

    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size(), mode="ring")
    groups = _groups(cfg)
    q, k, v = (torch.randn(1, 4, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    events, exchanges = [], []
    start, wait, fwd, bwd = comm.RingExchange.start, comm.RingExchange.wait, ring.attend_fwd, ring.attend_bwd

    def tag(self):  # in backward the K/V ring is created (and started) before the dK/dV ring
        if self not in exchanges:
            exchanges.append(self)
        return ["kv", "dkv"][exchanges.index(self)]

    def logged(label, fn, is_exchange):
        def wrapper(*args, **kwargs):
            events.append(f"{tag(args[0])}.{label}" if is_exchange else label)
            return fn(*args, **kwargs)

        return wrapper

    replacements = {"start": logged("start", start, True), "wait": logged("wait", wait, True)}
    with (
        _patched(comm.RingExchange, replacements),
        _patched(ring, {"attend_fwd": logged("compute", fwd, False), "attend_bwd": logged("compute", bwd, False)}),
    ):
        out = hf_seqpar.sequence_parallel_attention(q, k, v, config=cfg, groups=groups)
        forward = list(events)
        events.clear()
        exchanges.clear()
        torch.autograd.grad(out.sum(), [q, k, v])
    return forward, events


@pytest.mark.parametrize("ranks", [2, 4], indirect=True)
def test_ring_posts_the_next_hop_before_computing(ranks):
    p = ranks.world_size
    want_fwd = ["kv.start", "compute", "kv.wait"] * (p - 1) + ["compute"]
    want_bwd = []
    for step in range(p):  # a shard's dK/dV partial sums start at the next rank: no send at step 0
        want_bwd += ["kv.start"] if step < p - 1 else []
        want_bwd += ["compute"] + (["dkv.wait"] if step > 1 else []) + (["dkv.start"] if step > 0 else [])
        want_bwd += ["kv.wait"] if step < p - 1 else []
    want_bwd += ["dkv.wait"]
    for forward, backward in ranks.run(_body_ring_order):
        assert forward == want_fwd
        assert backward == want_bwd
