"""`SeqParConfig`: what sequence parallelism to run, validated once, at construction."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

MODES = ("ring", "ulysses", "usp", "allgather", "auto")
LAYOUTS = ("zigzag", "contiguous", "auto")
# The local attention kernels (SeqParConfig.backend) -> the module of hf_seqpar/kernels/ implementing each. A new
# backend is one module there plus one row here; "auto" picks per mask, dtype and device (kernels/auto_table.py).
KERNEL_BACKENDS = {"torch": "torch_backend", "flash_attn": "flash_backend", "cudnn": "cudnn_backend"}
BACKENDS = ("auto", *KERNEL_BACKENDS)

_ENV_PREFIX = "HF_SEQPAR_"
_INT_FIELDS = ("sp_size", "ulysses_size", "ring_size", "tp_size")
_BOOL_FIELDS = (
    "chunked_loss",
    "tiled_mlp",
    "offload_checkpoints",
    "recompute_norms",
    "recompute_lora_inputs",
)  # the savings of hf_seqpar.memory, any sp_size
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True, kw_only=True)
class SeqParConfig:
    """Sequence-parallel settings. Fields double as `HfArgumentParser` / YAML keys (see `metadata["help"]`)."""

    sp_size: int = field(default=1, metadata={"help": "Ranks that share one sequence; world_size % sp_size == 0."})
    tp_size: int = field(
        default=1,
        metadata={
            "help": "Tensor-parallel ranks per sequence shard (Megatron-SP: weights split by heads / MLP columns, "
            "norms and residuals on sequence pieces); world_size % (sp_size * tp_size) == 0."
        },
    )
    mode: str = field(
        default="ring", metadata={"help": "Distributed attention: ring | ulysses | usp | allgather | auto."}
    )
    ulysses_size: int | None = field(
        default=None, metadata={"help": "For mode='usp': the inner (all-to-all) degree; ulysses * ring = sp_size."}
    )
    ring_size: int | None = field(default=None, metadata={"help": "For mode='usp': the outer (ring) degree."})
    layout: str = field(
        default="auto",
        metadata={"help": "Token placement: zigzag | contiguous | auto (zigzag when a ring or all-gather is used)."},
    )
    backend: str = field(
        default="auto",
        metadata={"help": "Local attention kernel: " + " | ".join(BACKENDS) + " (auto: fastest exact)."},
    )
    chunked_loss: bool = field(
        default=False,
        metadata={
            "help": "Training loss over sequence chunks, logits recomputed in backward: no [tokens, vocab] logits."
        },
    )
    tiled_mlp: bool = field(
        default=False, metadata={"help": "Each decoder MLP over sequence chunks, recomputed in backward."}
    )
    offload_checkpoints: bool = field(
        default=False,
        metadata={"help": "Keep the activations gradient checkpointing saves in (pinned) CPU memory."},
    )
    recompute_norms: bool = field(
        default=False,
        metadata={"help": "Decoder RMSNorms keep only their input; their float32 intermediates are recomputed."},
    )
    recompute_lora_inputs: bool = field(
        default=False,
        metadata={"help": "PEFT LoRA's float32 copy of each adapted linear's input is recomputed, not kept."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.sp_size, int) or self.sp_size < 1:
            raise ValueError(f"hf_seqpar: sp_size={self.sp_size!r} must be a positive integer")
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"hf_seqpar: tp_size={self.tp_size!r} must be a positive integer")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"hf_seqpar: {name}={getattr(self, name)!r} must be True or False")
        for name, allowed in (("mode", MODES), ("layout", LAYOUTS), ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"hf_seqpar: {name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("ulysses_size", "ring_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"hf_seqpar: {name}={value!r} must be a positive integer or None")
        if self.mode == "usp":
            self._check_usp_split()
        elif self.mode != "auto" and (self.ulysses_size, self.ring_size) != (None, None):
            u, r = self.split
            if (self.ulysses_size or u, self.ring_size or r) != (u, r):
                raise ValueError(
                    f"hf_seqpar: mode={self.mode!r} fixes ulysses_size={u}, ring_size={r} for "
                    f"sp_size={self.sp_size}; got "
                    f"ulysses_size={self.ulysses_size}, ring_size={self.ring_size}. Use mode='usp' to choose a split"
                )

    def _check_usp_split(self) -> None:
        u, r = self.ulysses_size, self.ring_size
        if u is None and r is None:
            raise ValueError(
                f"hf_seqpar: mode='usp' needs ulysses_size or ring_size (ulysses_size * ring_size == "
                f"sp_size={self.sp_size}); "
                "or use mode='auto' to pick a split from the head counts"
            )
        u = u if u is not None else self.sp_size // r if self.sp_size % r == 0 else None
        r = r if r is not None else self.sp_size // u if u and self.sp_size % u == 0 else None
        if u is None or r is None or u * r != self.sp_size:
            raise ValueError(
                f"hf_seqpar: mode='usp' needs ulysses_size * ring_size == sp_size; got "
                f"ulysses_size={self.ulysses_size}, "
                f"ring_size={self.ring_size}, sp_size={self.sp_size}"
            )

    @property
    def split(self) -> tuple[int, int]:
        """(ulysses_size, ring_size) of this mode. 'auto' is resolved by `resolve()` first."""
        if self.mode == "usp":
            u = self.ulysses_size or self.sp_size // self.ring_size
            return u, self.sp_size // u
        if self.mode == "ulysses":
            return self.sp_size, 1
        if self.mode == "auto":
            raise ValueError("hf_seqpar: mode='auto' has no split until resolve(num_heads_q, num_heads_kv) picks one")
        return 1, self.sp_size  # ring, allgather

    @property
    def resolved_layout(self) -> str:
        """The layout tokens are placed with. 'auto' is zigzag whenever a ring or all-gather dimension exists."""
        if self.layout != "auto":
            return self.layout
        if self.mode == "ulysses" or self.sp_size == 1:
            return "contiguous"
        return "zigzag"

    def resolve(self, num_heads_q: int, num_heads_kv: int) -> SeqParConfig:
        """A concrete config for these head counts ('auto' -> ulysses, usp or ring); validates head constraints.
        With tp_size > 1 the sequence-parallel attention sees each tensor-parallel rank's own heads."""
        if self.tp_size > 1:
            if num_heads_q % self.tp_size or num_heads_kv % self.tp_size:
                fits = [t for t in range(1, num_heads_kv + 1) if num_heads_kv % t == 0 == num_heads_q % t]
                raise ValueError(
                    f"hf_seqpar: tp_size={self.tp_size} must divide num_attention_heads={num_heads_q} and "
                    f"num_key_value_heads={num_heads_kv} (each tensor-parallel rank holds whole heads); use a "
                    f"tp_size among {fits}"
                )
            num_heads_q, num_heads_kv = num_heads_q // self.tp_size, num_heads_kv // self.tp_size
        cfg = self
        if self.mode == "auto":
            u = max(d for d in range(1, self.sp_size + 1) if self.sp_size % d == 0 and num_heads_q % d == 0)
            if u == self.sp_size:
                mode = "ulysses"
            elif u == 1:
                mode = "ring"
            else:
                mode = "usp"
            layout = self.layout if self.layout != "auto" else "zigzag"  # the auto layout never depends on heads
            cfg = dataclasses.replace(
                self, mode=mode, layout=layout, ulysses_size=u if mode == "usp" else None, ring_size=None
            )
        u, _ = cfg.split
        if num_heads_q % u != 0:
            raise ValueError(
                f"hf_seqpar: sp_size={self.sp_size} (ulysses degree {u}) must divide "
                f"num_attention_heads={num_heads_q}{' per tensor-parallel rank' if self.tp_size > 1 else ''} for "
                f"mode={cfg.mode!r}; use mode='ring', 'allgather' or 'usp' with a ulysses_size dividing the heads"
            )
        if num_heads_q % num_heads_kv != 0:
            raise ValueError(
                f"hf_seqpar: num_attention_heads={num_heads_q} must be a multiple of "
                f"num_key_value_heads={num_heads_kv}"
            )
        return cfg

    @property
    def memory_savings(self) -> tuple[str, ...]:
        """The names of the memory savings switched on (they apply at any sp_size, 1 included)."""
        return tuple(name for name in _BOOL_FIELDS if getattr(self, name))

    def describe(self) -> str:
        savings = "".join(f" {name}" for name in self.memory_savings)
        tp = f" tp_size={self.tp_size}" if self.tp_size > 1 else ""
        if self.mode == "auto":
            return f"sp_size={self.sp_size}{tp} mode=auto layout={self.resolved_layout}{savings}"
        u, r = self.split
        return (
            f"sp_size={self.sp_size}{tp} mode={self.mode} (ulysses {u} x ring {r}) "
            f"layout={self.resolved_layout}{savings}"
        )

    @property
    def parallel_size(self) -> int:
        """Ranks that hold pieces of one sequence: sp_size * tp_size (world_size must be a multiple)."""
        return self.sp_size * self.tp_size

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SeqParConfig:
        """Build from `HF_SEQPAR_SP_SIZE`, `HF_SEQPAR_MODE`, ... (unset variables keep their defaults)."""
        environ = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(_ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name in _INT_FIELDS:
                try:
                    kwargs[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"hf_seqpar: {_ENV_PREFIX}{f.name.upper()}={raw!r} must be an integer") from None
            elif f.name in _BOOL_FIELDS:
                if raw.lower() not in _TRUE + _FALSE:
                    raise ValueError(
                        f"hf_seqpar: {_ENV_PREFIX}{f.name.upper()}={raw!r} must be one of {_TRUE + _FALSE}"
                    )
                kwargs[f.name] = raw.lower() in _TRUE
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)

    def to_env(self) -> dict[str, str]:
        """The `HF_SEQPAR_*` variables that `from_env` reads back into this config (savings and tp_size only when
        not their defaults)."""
        return {
            _ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)).lower()
            if f.name in _BOOL_FIELDS
            else str(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
            and not ((f.name in _BOOL_FIELDS or f.name == "tp_size") and getattr(self, f.name) == f.default)
        }
