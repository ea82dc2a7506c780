"""`make demo`: start 2 gloo ranks on this machine and show that every mode computes exact attention.

For each mode it shards a random float64 sequence (packed documents, causal, GQA), runs
`sequence_parallel_attention` forward and backward, gathers the result, and compares it with torch's own
`scaled_dot_product_attention` on the whole sequence.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hf_seqpar

WORLD, SEQ, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 4, 2, 16
DOCS = [0, 10, 37, 41, 64]


def _reference(q, k, v):
    pos = torch.arange(SEQ)
    doc = torch.bucketize(pos, torch.tensor(DOCS), right=True)
    mask = (pos[None, :] <= pos[:, None]) & (doc[None, :] == doc[:, None])
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True).transpose(
        1, 2
    )


def _worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, SEQ, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, SEQ, KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, SEQ, KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = _reference(q, k, v)
    ref_dq = torch.autograd.grad(ref.sum(), q)[0]
    for mode in ("ring", "allgather", "ulysses"):
        cfg = hf_seqpar.SeqParConfig(sp_size=WORLD, mode=mode)
        groups = hf_seqpar.init_groups(cfg)
        local = [hf_seqpar.shard_sequence(t.detach(), config=cfg, groups=groups).requires_grad_() for t in (q, k, v)]
        out = hf_seqpar.sequence_parallel_attention(
            *local, config=cfg, groups=groups, cu_seqlens=torch.tensor(DOCS, dtype=torch.int32)
        )
        (dq,) = torch.autograd.grad(out.sum(), local[0])
        err_out = (hf_seqpar.gather_sequence(out.detach(), config=cfg, groups=groups) - ref).abs().max().item()
        err_dq = (hf_seqpar.gather_sequence(dq, config=cfg, groups=groups) - ref_dq).abs().max().item()
        if rank == 0:
            status = "ok" if max(err_out, err_dq) < 1e-10 else "MISMATCH"
            print(f"{cfg.describe():<60} max|out-ref|={err_out:.1e}  max|dq-ref|={err_dq:.1e}  {status}")
            if status != "ok":
                raise SystemExit(1)
    dist.destroy_process_group()


def main() -> None:
    print(
        f"hf_seqpar {WORLD} gloo ranks: causal, GQA {HEADS}/{KV_HEADS} heads, {len(DOCS) - 1} packed documents, "
        f"sequence {SEQ} (float64, against torch SDPA on the whole sequence)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"),), nprocs=WORLD)


if __name__ == "__main__":
    main()
