"""Block plans: the varlen plan computes exactly the math path's attention (float64), in a number of kernel calls that
does not grow with the number of packed documents; plans are built once per (runs, mask, batch) and reused by
every layer, hop and the backward; a forward + backward with host-side document offsets reads nothing back from
tensors (on a GPU, that would be a device sync)."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

import hf_seqpar
from hf_seqpar.kernels import DocumentOffsets, MaskSpec, attend_bwd, attend_fwd, plan_cache_info, standin, varlen_impl
from hf_seqpar.kernels.plan import varlen_plan
from hf_seqpar.layout import Placement


def _random_docs(rng: random.Random, seq_len: int, n_docs: int) -> tuple[int, ...]:
    return tuple([0, *sorted(rng.sample(range(1, seq_len), n_docs - 1)), seq_len])


def _hop_cases():
    """(q runs, k runs, spec, batch): every (rank, source) hop of zigzag / contiguous placements and USP's outer
    placement, with packed documents (one row or one per batch row), windows, causal and not."""
    rng = random.Random(0)
    seq = 48
    placements = [Placement.build(seq, 1, "contiguous"), Placement.build(seq, 4, "zigzag")]
    placements += [Placement.build(seq, 3, "contiguous"), Placement.build(seq, 4, "zigzag").outer(2)]
    cases = []
    for placement in placements:
        for causal, window, docs in [
            (True, None, None),
            (True, 5, None),
            (False, 7, None),
            (True, None, (_random_docs(rng, seq, 6),)),
            (True, 4, (_random_docs(rng, seq, 5), _random_docs(rng, seq, 9))),
            (False, None, (_random_docs(rng, seq, 7), (0, seq))),
            (False, 3, (_random_docs(rng, seq, 4),)),
        ]:
            spec = MaskSpec(causal=causal, window=window, docs=docs)
            for rank in sorted({0, placement.world - 2}):  # the first and the next-to-last rank against every source
                for source in range(placement.world):
                    cases.append((placement.ranks[rank], placement.ranks[source], spec, 2))
    return cases


def test_varlen_plan_matches_math_float64(one_thread):
    # The CUDA stand-in follows FA2's rules (bottom-right windows, its reading of wide and one-sided windows), so a
    # plan that is exact here is exact on flash-attn / torch's FA2. float64: agreement to rounding (measured ~1e-15).
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for q_segs, k_segs, spec, batch in _hop_cases():
        lq, lk = sum(s.length for s in q_segs), sum(s.length for s in k_segs)
        q = torch.randn(batch, lq, 4, 8, generator=gen, dtype=torch.float64)
        k = torch.randn(batch, lk, 2, 8, generator=gen, dtype=torch.float64)
        v = torch.randn(batch, lk, 2, 8, generator=gen, dtype=torch.float64)
        dout = torch.randn(batch, lq, 4, 8, generator=gen, dtype=torch.float64)
        kw = {"scale": 0.3, "softcap": 2.0 if spec.window else None}
        ref_out, ref_lse = attend_fwd(q, k, v, q_segs, k_segs, spec, backend="math", **kw)
        with standin.cuda_standin(flash_attn=True, float64=True):
            assert varlen_impl("flash_attn", q, v, kw["softcap"]) == "flash_attn"
            out, lse = attend_fwd(q, k, v, q_segs, k_segs, spec, backend="flash_attn", **kw)
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
        ref_lse_final = torch.where(torch.isneginf(ref_lse), 0.0, ref_lse)  # as a ring would pass the final lse
        ref = attend_bwd(dout, q, k, v, ref_out, ref_lse_final, q_segs, k_segs, spec, backend="math", **kw)
        with standin.cuda_standin(flash_attn=True, float64=True):
            got = attend_bwd(dout, q, k, v, ref_out, ref_lse_final, q_segs, k_segs, spec, backend="flash_attn", **kw)
        for a, b in zip(got, ref, strict=True):
            worst = max(worst, (a - b).abs().max().item())
    assert worst < 1e-12


@pytest.mark.parametrize("window", [None, 512])
def test_kernel_calls_per_hop_do_not_grow_with_documents(window):
    # A 16K-token row over 8 zigzag ranks, packed from 8 or from 500 documents: the same handful of calls per hop.
    seq, world = 16384, 8
    placement = Placement.build(seq, world, "zigzag")
    rng = random.Random(1)
    calls = {}
    for n_docs in (8, 500):
        spec = MaskSpec(causal=True, window=window, docs=(_random_docs(rng, seq, n_docs),))
        calls[n_docs] = max(
            len(varlen_plan(placement.ranks[r], placement.ranks[s], spec, 1))
            for r in range(world)
            for s in range(world)
        )
    assert calls[500] <= 4 and calls[8] <= 4, calls


def _count_host_reads():
    """Patch the tensor methods that read values back to the host (on a GPU: device syncs); count their calls."""
    counts = {}
    names = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return saved[name](self, *args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def patched():
        try:
            for name in names:
                setattr(torch.Tensor, name, counting(name))
            yield counts
        finally:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)

    return patched()


def _body_plans_and_host_reads(mode, layers):
    import torch.distributed as dist

    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size(), mode=mode)
    groups = hf_seqpar.init_groups(cfg)
    seq = 64
    docs = DocumentOffsets(((0, 9, 30, 31, 50, seq),))
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, seq, h, 8, generator=gen) for h in (4, 2, 2)]
    local = [hf_seqpar.shard_sequence(t, config=cfg, groups=groups).requires_grad_() for t in inputs]
    before = plan_cache_info()
    with _count_host_reads() as reads:
        outs = [
            hf_seqpar.sequence_parallel_attention(*local, config=cfg, groups=groups, cu_seqlens=docs, window=20)
            for _ in range(layers)
        ]
        torch.autograd.grad(sum(o.sum() for o in outs), local)
    after = plan_cache_info()
    built = {kind: after[kind].misses - before[kind].misses for kind in after}
    used = {kind: after[kind].hits + after[kind].misses - before[kind].hits - before[kind].misses for kind in after}
    return built, used, dict(reads)


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_plans_built_once_per_step_and_no_host_reads(ranks, mode):
    # 3 layers forward + backward: a ring rank needs one plan per source rank (2), Ulysses one; built once, used by
    # every layer, hop and the backward. Host offsets in, nothing read back from a tensor during the step.
    for built, used, reads in ranks.run(_body_plans_and_host_reads, mode, 3):
        want = 2 if mode == "ring" else 1
        assert built["block"] == want, built
        assert used["block"] == want * 3 * 2, used  # 3 layers x (forward + backward)
        assert reads == {}, reads


def test_cuda_varlen_path_plumbing_on_meta_tensors():
    # torch's FA2 varlen ops have meta kernels: the CUDA path's calls, shapes and layouts (flattened batch, lse
    # [H, total], GQA gradients) run here without a GPU; the values are checked on a GPU (tests/gpu).
    from hf_seqpar.kernels import blocks

    placement = Placement.build(64, 4, "zigzag")
    spec = MaskSpec(causal=True, window=9, docs=((0, 5, 30, 64), (0, 40, 64)))
    q_segs, k_segs = placement.ranks[1], placement.ranks[2]
    q = torch.empty(2, 16, 4, 8, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 16, 2, 8, dtype=torch.bfloat16, device="meta")
    out, lse = blocks._varlen_fwd("aten", q, k, k, q_segs, k_segs, spec, 0.3, None, None, None)
    assert (out.shape, lse.shape, out.dtype) == ((2, 16, 4, 8), (2, 4, 16), torch.float32)
    grads = tuple(torch.zeros(t.shape, dtype=torch.float32, device="meta") for t in (q, k, k))
    dq, dk, dv = blocks._varlen_bwd("aten", q, q, k, k, out.bfloat16(), lse, q_segs, k_segs, spec, 0.3, None, grads)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)


def test_attention_state_reads_host_offsets_without_tensor_reads():
    # The integration's per-step document cache: the collator's padded int32 tensor and DocumentOffsets give the same
    # rows; DocumentOffsets (what the collator should emit, see kernels/mask.py) are read without touching a tensor.
    from hf_seqpar.integrations.transformers import SeqParState

    config = hf_seqpar.SeqParConfig(sp_size=1)
    groups = hf_seqpar.init_groups(config)
    padded = torch.tensor([[0, 5, 9, 16, 16], [0, 16, 16, 16, 16]], dtype=torch.int32)
    from_tensor = SeqParState(config=config, groups=groups, impl="x", originals=[]).documents(padded)
    host = DocumentOffsets.from_padded(padded)
    with _count_host_reads() as reads:
        from_host = SeqParState(config=config, groups=groups, impl="x", originals=[]).documents(host, chunk=4)
        plain = SeqParState(config=config, groups=groups, impl="x", originals=[]).documents(host)
    assert reads == {}
    assert plain == from_tensor == ((0, 5, 9, 16), (0, 16))
    assert from_host == ((0, 4, 5, 9, 13, 16), (0, 4, 8, 12, 16))  # Llama-4 chunks from each document's start
