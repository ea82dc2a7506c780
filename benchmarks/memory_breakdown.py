"""Benchmark: where the bytes per token of a long-context LoRA step go, at the step's peak, by tensor and phase.

The model is Llama-3-8B's layer shape (hidden 4,096, 32 / 8 heads of 128, intermediate 14,336, vocabulary 128,256),
bf16 weights, random init, `--layers` decoder layers, LoRA r=16 on every linear via PEFT (its default: float32
adapters), non-reentrant gradient checkpointing, SDPA attention, and hf_seqpar's savings through
`apply_memory_savings` (chunked loss + tiled MLP + checkpoint offload by default; `--savings` to choose). One forward
+ backward of one random sequence, no optimizer step.

What is measured: every tensor storage created during the step, with a label (phase, module, op), added when created
and subtracted when freed (a TorchDispatchMode, the CPU counterpart of `torch.cuda.max_memory_allocated`); the
labelled live set is copied at each new peak. Phases: `forward`, `recompute` (a module's forward run again by
checkpointing in backward), `backward` (autograd nodes; labelled by node). Checkpoint offload is simulated: what
`CheckpointOffloader` copies to the host is counted as host memory, and the copy back in backward as device memory
again, which is what the offload does on a GPU (on a CPU host and device are one memory, so a plain run would hide it).

`--device cpu` computes (4-8K tokens and 1-2 layers take minutes on 2 cores); `--device meta` computes nothing, only
shapes and lifetimes (any length and layer count in seconds: the same bookkeeping, no numbers), for the GPU's lengths.

Usage: python benchmarks/memory_breakdown.py [--device cpu|meta] [--layers 1] [--seq 4096] [--savings ...]
       [--mlp-chunk-tokens N]
Writes benchmarks/results/memory_breakdown_<device>.json (one entry per run, keyed by its settings) and prints the
"bytes per token by component" table of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0)  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LabelledLiveBytes:
    """Live tensor storages created in the context, summed per label; the labelled set at the device peak."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self
        self.label_fn = lambda func: "?"
        self.host = False  # storages created while True are host memory (the offloader's copies)
        self.live: dict[str, int] = defaultdict(int)
        self.device = self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._seen, self._external = WeakIdKeyDictionary(), WeakIdKeyDictionary()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                for t in tree_flatten((args, kwargs))[0]:
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        if st not in tracker._seen:
                            tracker._external[st] = True
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._track(t.untyped_storage(), func)
                return out

        self._mode = Mode()

    def _track(self, storage, func) -> None:
        if storage in self._external or storage in self._seen:
            return
        size = storage.nbytes()
        label = ("host | " if self.host else "") + self.label_fn(func)
        self._seen[storage] = size
        self.live[label] += size
        if not self.host:
            self.device += size
            if self.device > self.peak:
                self.peak = self.device
                self.at_peak = {k: v for k, v in self.live.items() if v and not k.startswith("host")}
        weakref.finalize(storage, self._release, label, size)

    def _release(self, label: str, size: int) -> None:
        self.live[label] -= size
        if not label.startswith("host"):
            self.device -= size

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class Labeller:
    """The label of an allocation: phase | module path (layer index as *) | op, from module hooks and autograd."""

    def __init__(self, model):
        self.stack: list[str] = []
        self.backward = False
        names = {
            m: re.sub(r"\.\d+(?=\.|$)", ".*", n.replace("base_model.model.", "")) for n, m in model.named_modules()
        }
        pre = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, a: self.stack.append(names.get(m, type(m).__name__))
        )
        post = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: self._pop(), always_call=True)
        self.handles = [pre, post]

    def _pop(self) -> None:  # a forward hook returning something would replace the module's output
        self.stack.pop()

    def __call__(self, func) -> str:
        op = str(func.overloadpacket).replace("aten.", "")
        if self.stack:
            return f"{'recompute' if self.backward else 'forward'} | {self.stack[-1] or 'model'} | {op}"
        node = torch._C._current_autograd_node()
        where = type(node).__name__ if node is not None else "-"
        return f"{'backward' if self.backward else 'forward'} | {where} | {op}"

    def close(self):
        for h in self.handles:
            h.remove()


class _FlashLike(torch.autograd.Function):
    """Meta runs only: FlashAttention's lifetimes (saves q, k, v, out and float32 lse; backward makes dq, dk, dv and
    a float32 dq accumulator), since SDPA on the meta device takes its math path (a [S, S] matrix per head)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        accum = torch.empty_like(q, dtype=torch.float32)  # noqa: F841 (FA2's dq accumulator, live during the call)
        softmax_d = torch.empty_like(lse)  # noqa: F841
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _meta_attention(module, query, key, value, attention_mask, **kwargs):
    out = _FlashLike.apply(query, key, value)  # [B, H, S, D]
    return out.transpose(1, 2).contiguous(), None


def _no_autocast_on_meta() -> None:
    """Meta runs only: the chunked loss and the chunked norms (recompute_norms) read and restore the autocast state of
    the tensors' device (`chunked_loss._autocast_state`), which torch does not define for 'meta'; there it is off."""
    import contextlib

    from hf_seqpar.memory import chunked_loss

    real = torch.autocast
    chunked_loss._autocast_state = lambda device_type: (False, torch.bfloat16)
    torch.autocast = lambda device_type, *a, **k: (
        contextlib.nullcontext() if device_type == "meta" else real(device_type, *a, **k)
    )


def build(opts):
    import transformers
    from peft import LoraConfig, get_peft_model

    import hf_seqpar
    from hf_seqpar.integrations.memory import apply_memory_savings

    attn = "sdpa"
    if opts.device == "meta":
        _no_autocast_on_meta()
        transformers.AttentionInterface.register("breakdown_meta", _meta_attention)
        attn = "breakdown_meta"
    config = transformers.LlamaConfig(**LLAMA3_8B, num_hidden_layers=opts.layers,
                                      max_position_embeddings=max(opts.seq, 8192))  # fmt: skip
    torch.manual_seed(0)
    with torch.device(opts.device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # what Trainer does for PEFT + checkpointing
    savings = {name: True for name in opts.savings.split(",") if name}
    apply_memory_savings(model, hf_seqpar.SeqParConfig(sp_size=1, **savings), mlp_chunk_tokens=opts.mlp_chunk_tokens)
    ids = torch.randint(0, config.vocab_size, (1, opts.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids.to(opts.device), "labels": ids.to(opts.device)}
    return model, batch


def _simulate_offload(model, tracker):
    """Count the offloader's host copies as host memory and its copy back as device memory (see the docstring)."""
    from hf_seqpar.integrations.memory import STATE_ATTR

    offloader = getattr(model.get_base_model(), STATE_ATTR).offloader
    if offloader is None:
        return

    def pack(tensor):
        if isinstance(tensor, torch.nn.Parameter) or tensor.numel() * tensor.element_size() < offloader.min_bytes:
            return tensor
        tracker.host = True
        try:
            host = torch.empty_like(tensor, device=tensor.device)
            if tensor.device.type != "meta":
                host.copy_(tensor.detach())
        finally:
            tracker.host = False
        return host

    def unpack(packed):
        return packed if isinstance(packed, torch.nn.Parameter) else packed.clone()

    offloader._pack, offloader._unpack = pack, unpack


def run(opts) -> dict:
    torch.set_num_threads(opts.threads)
    model, batch = build(opts)
    labeller = Labeller(model)
    tracker = LabelledLiveBytes()
    tracker.label_fn = labeller
    _simulate_offload(model, tracker)
    start = time.perf_counter()
    with tracker:
        loss = model(**batch, num_items_in_batch=torch.tensor(opts.seq - 1, device=opts.device)).loss
        labeller.backward = True
        loss.backward()
    seconds = time.perf_counter() - start
    labeller.close()
    return dict(
        device=opts.device, layers=opts.layers, seq=opts.seq, savings=opts.savings, seconds=round(seconds, 1),
        peak_bytes=tracker.peak, at_peak=dict(sorted(tracker.at_peak.items(), key=lambda kv: -kv[1])),
    )  # fmt: skip


# ---- components: the labels grouped into what a reader can act on ------------------------------------------------

COMPONENTS = [  # (name, phase, test on "phase | module | op", what it is); first match wins
    ("layer inputs (checkpoints)", "forward", lambda p, m, o: p == "forward" and m.startswith("model.layers.*"),
     "each layer's input, kept by checkpointing (8 KB bf16 per layer)"),
    ("embeddings / final norm / loss input", "forward", lambda p, m, o: p == "forward",
     "embedding output, final RMSNorm's float32 temporaries and output (the loss's saved input), rotary cos / sin"),
    ("checkpoint copied back", "backward", lambda p, m, o: p == "backward" and o == "clone",
     "offload only: a layer input copied back from the host for its recompute"),
    ("LoRA float32 input copies", "recompute", lambda p, m, o: p == "recompute" and o == "_to_copy" and "proj" in m,
     "PEFT casts each adapted linear's input to the float32 adapters' dtype and lora_A saves the copy"),
    ("LoRA float32 outputs", "recompute", lambda p, m, o: p == "recompute" and "proj" in m and o in ("add", "mul"),
     "base output + float32 LoRA delta: a float32 output per adapted linear, cast back"),
    ("RMSNorm float32", "recompute", lambda p, m, o: p == "recompute" and "layernorm" in m,
     "input_layernorm / post_attention_layernorm: float32 input, normalized float32, bf16 output"),
    ("q / k / v / o projections", "recompute", lambda p, m, o: p == "recompute" and "self_attn" in m and "proj" in m,
     "base-layer outputs of q, k, v, o (bf16)"),
    ("rotary + attention", "recompute", lambda p, m, o: p == "recompute" and "self_attn" in m,
     "q, k after RoPE (and RoPE's temporaries), attention output and float32 logsumexp"),
    ("MLP tile", "recompute", lambda p, m, o: p == "recompute" and "mlp" in m,
     "the intermediates of one MLP tile"),
    ("residual adds", "recompute", lambda p, m, o: p == "recompute",
     "the decoder layer's own ops (residual adds, views)"),
    ("attention backward", "backward", lambda p, m, o: p == "backward" and "Attention" in m,
     "dq, dk, dv (and the kernel's float32 scratch)"),
    ("loss backward", "backward", lambda p, m, o: p == "backward" and "ChunkedTargetLogProbs" in m,
     "the loss's gradient into the hidden states, one float32 logits chunk"),
    ("other gradients", "backward", lambda p, m, o: p == "backward",
     "activation gradients flowing back through the layer (bf16 and float32)"),
]  # fmt: skip


def components(at_peak: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for label, size in at_peak.items():
        phase, module, op = (part.strip() for part in label.split("|"))
        name = next((c[0] for c in COMPONENTS if c[2](phase, module, op)), "other")
        out[name] += size
    return dict(out)


def table(result: dict) -> str:
    parts = components(result["at_peak"])
    seq = result["seq"]
    lines = ["| component | phase | KB/token | what it is |", "|---|---|---|---|"]
    for name, phase, _, what in COMPONENTS:
        if parts.get(name):
            lines.append(f"| {name} | {phase} | {parts[name] / seq / 1000:,.1f} | {what} |")
    if parts.get("other"):
        lines.append(f"| other | | {parts['other'] / seq / 1000:,.1f} | |")
    lines.append(f"| **total at the peak** | | **{result['peak_bytes'] / seq / 1000:,.1f}** | |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "meta"), default="cpu")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--savings", default="chunked_loss,tiled_mlp,offload_checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mlp-chunk-tokens", type=int, default=None,
                        help="tiled_mlp's tile (default max(256, hidden) = 4,096): smaller lets a CPU run at a few K "
                             "tokens show the layer's other peaks instead of one whole-sequence tile")  # fmt: skip
    parser.add_argument("--top", type=int, default=0, help="also print the N largest labels at the peak")
    opts = parser.parse_args(argv)
    result = run(opts)
    out = RESULTS / f"memory_breakdown_{opts.device}.json"
    stored = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    stored.update(machine=machine_name("cpu"), torch=torch.__version__)
    key = f"layers={opts.layers} seq={opts.seq} savings={opts.savings}"
    key += f" mlp_chunk_tokens={opts.mlp_chunk_tokens}" if opts.mlp_chunk_tokens else ""
    stored["runs"][key] = {**result, "components": components(result["at_peak"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stored, indent=1) + "\n")
    print(f"{key}: peak {result['peak_bytes'] / 2**20:,.0f} MiB = {result['peak_bytes'] / opts.seq / 1000:.1f} "
          f"KB/token, {result['seconds']} s")  # fmt: skip
    print(table(result))
    for label, size in list(result["at_peak"].items())[: opts.top]:
        print(f"  {size / opts.seq / 1000:8.2f} KB/token  {label}")
    return result


if __name__ == "__main__":
    main()
