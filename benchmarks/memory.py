"""Benchmark: peak memory per rank of one training step against sequence length, sp 1 / 2 / 4, each saving on and off.

One fresh set of processes per (sp, sequence, configuration): `sp` ranks (gloo on CPU, nccl on CUDA) each build the
model from the same seed, shard one random full-length sequence with SequenceShardingCollator (sp > 1), and run one
forward + backward (no optimizer step) with `num_items_in_batch` = the sequence's targets.

What is measured, per rank: the peak of live tensor bytes during the step, above what was live before it (parameters
and the batch). On CUDA that is `torch.cuda.max_memory_allocated() - memory_allocated()`. On CPU there is no such
counter, so a TorchDispatchMode adds up the bytes of every tensor storage created during the step and subtracts them
when the storage is freed (weakref finalizers): the CPU analogue of the CUDA counter, blind to allocator caching. The
resident-set growth (ru_maxrss, with glibc's mmap threshold fixed so freed tensors go back to the OS) is recorded too,
as a cross-check. Offloading to the host cannot save anything where host and device are one memory, so
`offload_checkpoints` rows exist on CUDA only.

Models: `--model small` (CPU default): Llama, hidden 256, intermediate 1024, 4 layers, 8 heads / 4 KV heads, vocab
32,000, float32, full fine-tuning. `--model llama3-8b` (CUDA default): Llama-3-8B's shape (hidden 4096, 32 layers,
32 / 8 heads, intermediate 14,336, vocab 128,256), random init, bfloat16, LoRA r=16 on the attention projections.

Usage: python benchmarks/memory.py [--device cpu|cuda] [--sp 1,2,4] [--seq 2048,4096,8192] [--configs ...] [--layers N]
Writes benchmarks/results/memory_<device>.json (and .png with matplotlib), and prints the table of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name -> (gradient checkpointing, SeqParConfig savings)
    "plain": (False, {}),
    "chunked_loss": (False, {"chunked_loss": True}),
    "tiled_mlp": (False, {"tiled_mlp": True}),
    "ckpt": (True, {}),
    "ckpt+chunked_loss": (True, {"chunked_loss": True}),
    "ckpt+chunked_loss+tiled_mlp": (True, {"chunked_loss": True, "tiled_mlp": True}),
    "ckpt+offload": (True, {"offload_checkpoints": True}),
    "ckpt+all": (True, {"chunked_loss": True, "tiled_mlp": True, "offload_checkpoints": True}),
}
CPU_CONFIGS = [name for name in CONFIGS if "offload" not in name and name != "ckpt+all"]
MODELS = {
    "small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}


# ---- one rank ----------------------------------------------------------------------------------------------------


class LiveTensorBytes:
    """Peak bytes of tensor storages created inside the context and still alive (a TorchDispatchMode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self
        self.current = self.peak = 0
        self._created, self._external = WeakIdKeyDictionary(), WeakIdKeyDictionary()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                for t in tree_flatten((args, kwargs))[0]:  # storages that existed before are not the step's
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        if st not in tracker._created:
                            tracker._external[st] = True
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        tracker._track(t.untyped_storage())
                return out

        self._mode = Mode()

    def _track(self, storage) -> None:
        if storage in self._external or storage in self._created:
            return
        size = storage.nbytes()
        self._created[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.current -= size

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(opts, device, world):
    import torch
    import transformers

    import hf_seqpar
    from hf_seqpar.integrations.memory import apply_memory_savings

    ckpt, savings = CONFIGS[opts.config]
    config = hf_seqpar.SeqParConfig(sp_size=world, mode=opts.mode if world > 1 else "ring", **savings)
    shape = {**MODELS[opts.model], **({"num_hidden_layers": opts.layers} if opts.layers else {})}
    model_config = transformers.LlamaConfig(**shape, max_position_embeddings=max(opts.seq, 8192))
    dtype = torch.bfloat16 if opts.model == "llama3-8b" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation="sdpa")
    if opts.model == "llama3-8b":
        from peft import LoraConfig, get_peft_model

        attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=attention, task_type="CAUSAL_LM"))
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, model_config.vocab_size, (1, opts.seq), generator=torch.Generator().manual_seed(1))
    full = {"input_ids": ids, "labels": ids.clone()}
    batch = full
    if world > 1:
        groups = hf_seqpar.init_groups(config)
        hf_seqpar.apply_sequence_parallel(model, config=config, groups=groups)
        batch = hf_seqpar.SequenceShardingCollator(lambda _: dict(full), config=config, groups=groups)([None])
    apply_memory_savings(model, config)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return model, batch, torch.tensor(opts.seq - 1, device=device)


def _rank_main(opts) -> None:
    import resource

    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.world))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{rank}") if opts.device == "cuda" else torch.device("cpu")
    if opts.device == "cuda":
        torch.cuda.set_device(device)
    if opts.world > 1:
        dist.init_process_group("nccl" if opts.device == "cuda" else "gloo")
    model, batch, num_items = _build(opts, device, opts.world)
    rss_before = _rss_bytes()
    start = time.perf_counter()
    try:
        if opts.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            model(**batch, num_items_in_batch=num_items).loss.backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with LiveTensorBytes() as live:
                model(**batch, num_items_in_batch=num_items).loss.backward()
            peak = live.peak
        error = None
    except torch.OutOfMemoryError:
        peak, error = None, "out of memory"
    seconds = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        "RESULT "
        + json.dumps(
            dict(rank=rank, peak_bytes=peak, rss_growth_bytes=rss_peak - rss_before, seconds=seconds, error=error)
        ),
        flush=True,
    )
    if opts.world > 1:
        dist.destroy_process_group()


# ---- the sweep ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_point(opts, sp: int, seq: int, config: str) -> dict:
    """One (sp, seq, config) measurement in fresh processes; the per-rank results."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(sp),
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "TOKENIZERS_PARALLELISM": "0",
    }
    args = [
        sys.executable,
        __file__,
        "--rank-main",
        "--device",
        opts.device,
        "--model",
        opts.model,
        "--world",
        str(sp),
        "--seq",
        str(seq),
        "--config",
        config,
        "--mode",
        opts.mode,
        *(["--layers", str(opts.layers)] if opts.layers else []),
    ]
    procs = [
        subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in range(sp)
    ]
    ranks = []
    for proc in procs:
        out, _ = proc.communicate(timeout=opts.timeout)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            ranks.append({"error": f"exit code {proc.returncode}"})
        else:
            ranks.append(json.loads(lines[-1][len("RESULT ") :]))
    peaks = [r.get("peak_bytes") for r in ranks]
    ok = all(p is not None for p in peaks)
    return dict(
        sp=sp,
        seq=seq,
        config=config,
        tokens_per_rank=seq // sp,
        ranks=ranks,
        peak_bytes_max=max(peaks) if ok else None,
        error=None if ok else next(r.get("error") for r in ranks if r.get("peak_bytes") is None),
    )


def _machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if device == "cuda":
        import torch

        text = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}; host {text}"
    return text


def table(points: list[dict]) -> str:
    """Markdown: one row per (sp, seq), one column per configuration, KB (1000 B) per token of the rank's shard."""
    configs = list(dict.fromkeys(p["config"] for p in points))
    rows = sorted({(p["sp"], p["seq"]) for p in points})
    lines = ["| sp | sequence | tokens / rank | " + " | ".join(configs) + " |", "|---" * (3 + len(configs)) + "|"]
    for sp, seq in rows:
        cells = []
        for config in configs:
            point = next((p for p in points if (p["sp"], p["seq"], p["config"]) == (sp, seq, config)), None)
            if point is None:
                cells.append("")
            elif point["peak_bytes_max"] is None:
                cells.append(point["error"])
            else:
                mib, per_token = point["peak_bytes_max"] / 2**20, point["peak_bytes_max"] / seq / 1000
                cells.append(f"{mib:,.0f} MiB ({per_token:,.0f} KB/tok)")
        lines.append(f"| {sp} | {seq:,} | {seq // sp:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_token_table(points: list[dict]) -> str:
    """Markdown: per configuration and sp measured at 3 or more lengths, the growth per token of the sequence (slope
    between the shortest and the longest) and what is left at zero length (parameter gradients, fixed-size chunk
    buffers). With fewer points a line could hide a change of the phase that holds the peak."""
    lines = ["| configuration | sp | bytes per token of the sequence | fixed part |", "|---|---|---|---|"]
    for config in dict.fromkeys(p["config"] for p in points):
        for sp in sorted({p["sp"] for p in points}):
            mine = sorted((p["seq"], p["peak_bytes_max"]) for p in points
                          if p["config"] == config and p["sp"] == sp and p["peak_bytes_max"] is not None)  # fmt: skip
            if len(mine) < 3:
                continue
            (s0, b0), (s1, b1) = mine[0], mine[-1]
            slope = (b1 - b0) / (s1 - s0)
            lines.append(f"| {config} | {sp} | {slope / 1000:,.1f} KB | {(b0 - slope * s0) / 2**20:,.0f} MiB |")
    return "\n".join(lines)


def plot(points: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:  # a GPU image without matplotlib: the JSON and the table are the results
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sps = sorted({p["sp"] for p in points})
    fig, axes = plt.subplots(1, len(sps), figsize=(4.2 * len(sps), 3.8), sharey=True, squeeze=False)
    for ax, sp in zip(axes[0], sps, strict=True):
        for config in dict.fromkeys(p["config"] for p in points):
            mine = sorted(
                (p["seq"], p["peak_bytes_max"] / 2**20)
                for p in points
                if p["sp"] == sp and p["config"] == config and p["peak_bytes_max"] is not None
            )
            if mine:
                ax.plot(*zip(*mine, strict=True), marker="o", label=config)
        ax.set_title(f"sp={sp}")
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("peak memory per rank (MiB)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=tuple(MODELS), default=None)
    parser.add_argument("--sp", default="1,2,4")
    parser.add_argument("--seq", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--configs", default=None, help=f"comma-separated, of {list(CONFIGS)}")
    parser.add_argument("--mode", default="ring", help="SeqParConfig.mode for sp > 1")
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers instead of the model's own")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--resume", action="store_true", help="keep the points already in the results file")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/memory_<device>.json)")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--config", default="plain", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.model = opts.model or ("llama3-8b" if opts.device == "cuda" else "small")
    if opts.rank_main:
        opts.seq = int(opts.seq)
        return _rank_main(opts)

    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; this mode awaits a machine with a GPU")
    sps = [int(s) for s in opts.sp.split(",")]
    if opts.device == "cuda":  # one GPU per rank
        sps = [s for s in sps if s <= torch.cuda.device_count()]
    default_seqs = "8192,16384,32768,65536" if opts.model == "llama3-8b" else "2048,4096,8192"
    seqs = [int(s) for s in (opts.seq or default_seqs).split(",")]
    configs = (opts.configs or ",".join(CONFIGS if opts.device == "cuda" else CPU_CONFIGS)).split(",")
    out = Path(opts.out) if opts.out else RESULTS / f"memory_{opts.device}.json"
    measure = "torch.cuda.max_memory_allocated" if opts.device == "cuda" else "live tensor bytes (TorchDispatchMode)"
    model_config = {**MODELS[opts.model], **({"num_hidden_layers": opts.layers} if opts.layers else {})}
    result = dict(machine=_machine(opts.device), torch=torch.__version__, model=opts.model,
                  model_config=model_config, measure=measure, mode=opts.mode, points=[])  # fmt: skip
    if opts.resume and out.exists():  # keep the points measured before with the same model and measure
        previous = json.loads(out.read_text())
        same = (previous["model"], previous["model_config"], previous["measure"], previous["mode"])
        if same == (opts.model, model_config, measure, opts.mode):
            result["points"] = previous["points"]
    points = result["points"]
    out.parent.mkdir(parents=True, exist_ok=True)
    for sp in sps:
        for seq in seqs:
            for config in configs:
                done = [p for p in points if (p["sp"], p["seq"], p["config"]) == (sp, seq, config)]
                if done and done[0]["peak_bytes_max"] is not None:
                    continue
                points[:] = [p for p in points if p not in done]  # a failed point is measured again
                points.append(run_point(opts, sp, seq, config))
                out.write_text(json.dumps(result, indent=2) + "\n")  # after every point: a long sweep can resume
                peak = points[-1]["peak_bytes_max"]
                shown = f"{peak / 2**20:,.0f} MiB" if peak is not None else points[-1]["error"]
                print(f"sp={sp} seq={seq} {config}: {shown}", flush=True)
    points.sort(key=lambda p: (p["sp"], p["seq"], list(CONFIGS).index(p["config"])))
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(points, out.with_suffix(".png"), f"{opts.model} on {result['machine']}: peak memory per rank, one step")
    print(table(points))
    print()
    print(per_token_table(points))


if __name__ == "__main__":
    main()
