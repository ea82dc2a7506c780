"""The savings of `hf_seqpar.memory` applied to a Hugging Face causal LM (a PeftModel too), at any sp_size.

`apply_memory_savings(model, config)` switches on what `config` asks for, in place, by giving three modules an
instance-level `forward` (bound, so that accelerate's autocast wrapper and `inspect.signature` see the class's):

- chunked_loss, on the causal LM: a training forward with `labels` runs the decoder, then the loss of
  `hf_seqpar.memory.chunked_target_log_probs` through the model's own lm_head and logit post-processing, and returns
  `logits=None`. `num_items_in_batch` (sum / N), `shift_labels` (the SP collator's) and `ignore_index` keep their
  meaning. Everything else takes the model's own forward: eval mode (evaluation, `predict`, `compute_metrics`: they
  need logits), calls without labels (a label smoother or `compute_loss_func` pops them and reads the logits), and
  TRL's `fused_lm_head=True` calls (TRL's fused head already computes its loss in tiles).
- tiled_mlp, on each decoder layer's MLP: `hf_seqpar.memory.tiled_apply` over the sequence.
- offload_checkpoints, on the decoder: its training forward runs under `CheckpointOffloader.saving()`, so the layer
  inputs that gradient checkpointing keeps wait in (pinned) host memory.
- recompute_norms, on each RMSNorm of the decoder: the norm runs over sequence chunks (`hf_seqpar.memory.
  chunked_rowwise`), so its float32 intermediates are not kept (only its input, which the residual stream holds
  anyway), and its backward recomputes and differentiates one chunk at a time: the float32 temporaries of one chunk.
- recompute_lora_inputs, on each PEFT LoRA linear: the adapter branch, lora_B(lora_A(dropout(x))) * scaling, runs
  under non-reentrant checkpointing, so the float32 copy of the input that PEFT makes for float32 adapters on a bf16
  model (one per adapted linear) is not kept; the cast and lora_A are recomputed in backward (r columns: cheap).
  Both recompute the same ops on the same values (checkpointing replays the dropout's RNG), so both are exact; a
  trainable norm weight's gradient is summed over the norm's chunks in float32 (equal to float rounding).

What a saving cannot reproduce exactly is refused here, when it is applied, with a message that starts `hf_seqpar:`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import SeqParConfig
from ..memory import CheckpointOffloader, causal_lm_loss, chunked_target_log_probs
from ..memory.chunked_loss import IGNORE_INDEX
from ..memory.offload import DEFAULT_MIN_BYTES
from .patches import bind_forward, unbind_forward

logger = logging.getLogger("hf_seqpar")
STATE_ATTR = "_hf_seqpar_memory"
SAVINGS_ROW = "PreTrainedModel.forward (memory savings)"  # the PATCHES row of every instance forward given here
LOSS_CHUNK_BYTES = 32 << 20  # float32 logits of one loss chunk: 262 tokens at a 32K vocabulary, 64 at 128K
MIN_LOSS_CHUNK_TOKENS = 64
MIN_MLP_CHUNK_TOKENS = 256  # an MLP chunk is max(this, hidden_size) tokens: its intermediates ~ one weight matrix
NORM_CHUNK_BYTES = 16 << 20  # float32 copy of one recomputed norm's chunk: 1,024 tokens at hidden 4,096

# model_type -> how the family's ForCausalLM.forward turns lm_head's output into the logits of its loss. Each entry was
# read in the family's source and is checked against the plain forward in tests/test_memory.py.
LOGIT_POSTPROCESSING = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2", "gpt_oss"), "none"
    ),
    **dict.fromkeys(("gemma", "gemma2", "gemma3_text"), "softcap"),  # final_logit_softcapping, when set
    "cohere": "scale",  # logits * logit_scale
    "granite": "divide",  # logits / logits_scaling
}


@dataclass
class MemoryState:
    """What `apply_memory_savings` installed on one model, kept on the model (no globals) so it can be undone."""

    config: SeqParConfig
    options: dict
    patched: list = field(default_factory=list)  # (module, forward we installed, instance forward it replaced or None)
    offloader: CheckpointOffloader | None = None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get_base_model = getattr(model, "get_base_model", None)  # PeftModel
    base = get_base_model() if callable(get_base_model) else model
    if not hasattr(base, "config") or not hasattr(base, "get_output_embeddings"):
        raise TypeError(
            f"hf_seqpar: apply_memory_savings needs a transformers causal LM or PeftModel; got {type(model)}"
        )
    return base


def _install(state: MemoryState, module: torch.nn.Module, make_forward) -> None:
    """Give `module` an instance forward `make_forward(original)`, bound like a method, with the class signature."""
    previous = vars(module).get("forward")  # an instance forward already there (TRL's fused head), or None
    saving_forward = make_forward(module.forward)

    @functools.wraps(type(module).forward)
    def forward(self, *args, **kwargs):
        if self is not module:  # copy.deepcopy rebinds the method, but the closure still holds the original module
            raise RuntimeError(
                f"hf_seqpar: this {type(self).__name__} is a copy of a model with memory savings, and its forward "
                "would run the original's modules; remove_memory_savings(model) before copying, then apply them to "
                "each copy"
            )
        return saving_forward(self, *args, **kwargs)

    bind_forward(SAVINGS_ROW, module, forward)
    state.patched.append((module, forward, previous))


def remove_memory_savings(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_memory_savings` (in place; returns the model)."""
    base = _unwrap(model)
    state: MemoryState | None = getattr(base, STATE_ATTR, None)
    if state is None:
        return model
    for module, forward, previous in reversed(state.patched):
        current = vars(module).get("forward")
        if getattr(current, "__func__", None) is not forward:
            raise RuntimeError(
                f"hf_seqpar: {type(module).__name__}.forward was wrapped again after apply_memory_savings (by "
                f"{current!r}); remove that wrapper first"
            )
        unbind_forward(SAVINGS_ROW, module, previous)
    delattr(base, STATE_ATTR)
    return model


def apply_memory_savings(
    model: torch.nn.Module,
    config: SeqParConfig,
    *,
    loss_chunk_tokens: int | None = None,
    mlp_chunk_tokens: int | None = None,
    norm_chunk_rows: int | None = None,
    offload_min_bytes: int = DEFAULT_MIN_BYTES,
) -> torch.nn.Module:
    """Switch on `config.chunked_loss`, `config.tiled_mlp`, `config.offload_checkpoints` for `model` (in place).

    Independent of sequence parallelism (any sp_size); idempotent. The chunk sizes default to about 32 MiB of float32
    logits per loss chunk, max(256, hidden_size) tokens per MLP chunk and 16 MiB of a norm's float32 input per norm
    chunk (`norm_chunk_rows`: vectors the norm normalizes, a token's hidden state or one head's)."""
    if not config.memory_savings:  # nothing to switch on: any module passes, savings applied before are undone
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        return remove_memory_savings(model) if hasattr(base, STATE_ATTR) else model
    base = _unwrap(model)
    options = dict(
        loss_chunk_tokens=loss_chunk_tokens,
        mlp_chunk_tokens=mlp_chunk_tokens,
        norm_chunk_rows=norm_chunk_rows,
        offload_min_bytes=offload_min_bytes,
    )
    current: MemoryState | None = getattr(base, STATE_ATTR, None)
    if current is not None:
        if (current.config.memory_savings, current.options) == (config.memory_savings, options):
            return model
        remove_memory_savings(model)
    # Every check first, so that a refusal leaves the model untouched.
    postprocess = _logit_postprocessing(base) if config.chunked_loss else None
    mlps = _dense_mlps(base) if config.tiled_mlp else []
    decoder = _decoder(base, "offload_checkpoints") if config.offload_checkpoints else None
    norms = _layer_norms(base) if config.recompute_norms else []
    loras = _lora_linears(model) if config.recompute_lora_inputs else []

    state = MemoryState(config=config, options=options)
    if config.chunked_loss:
        _install(state, base, functools.partial(_chunked_loss_forward, base, postprocess, loss_chunk_tokens))
    text_config = base.config.get_text_config()
    mlp_chunk = mlp_chunk_tokens or max(MIN_MLP_CHUNK_TOKENS, getattr(text_config, "hidden_size", 0))
    for mlp in mlps:
        _install(state, mlp, functools.partial(_tiled_mlp_forward, mlp_chunk))
    for norm in norms:
        _install(state, norm, functools.partial(_recomputed_forward, norm_chunk_rows))
    for lora in loras:
        _install(state, lora, _lora_recomputed_input_forward)
    if decoder is not None:
        state.offloader = CheckpointOffloader(min_bytes=offload_min_bytes)
        _install(state, decoder, functools.partial(_offloading_forward, decoder, state.offloader))
    setattr(base, STATE_ATTR, state)
    logger.info("hf_seqpar: %s memory savings on: %s", type(base).__name__, ", ".join(config.memory_savings))
    return model


# ---- chunked loss ------------------------------------------------------------------------------------------------


def _logit_postprocessing(base):
    """The function the family applies to lm_head's output before its loss; refuses what the chunked loss cannot
    reproduce exactly."""
    name, model_type = type(base).__name__, base.config.model_type
    if model_type not in LOGIT_POSTPROCESSING or not name.endswith("ForCausalLM"):
        raise NotImplementedError(
            f"hf_seqpar: chunked_loss does not know how {name} (model_type={model_type!r}) turns lm_head's output "
            f"into the logits of its loss; it supports the causal LMs of model types {sorted(LOGIT_POSTPROCESSING)}. "
            "Set chunked_loss: false for this model"
        )
    from transformers.loss.loss_utils import LOSS_MAPPING

    if base.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        raise NotImplementedError(
            f"hf_seqpar: {name} computes its loss with {base.loss_function!r}, not transformers' ForCausalLMLoss; "
            "chunked_loss reproduces only the latter. Set chunked_loss: false"
        )
    text_config = base.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        raise NotImplementedError(
            f"hf_seqpar: {name} has output_router_logits=True, so its forward adds the router's auxiliary loss to the "
            "loss; chunked_loss computes only the language-model loss. Set output_router_logits=False in the model "
            "config, or chunked_loss: false"
        )
    if base.get_output_embeddings() is None:
        raise NotImplementedError(f"hf_seqpar: {name} has no output embeddings (lm_head) for chunked_loss")
    kind = LOGIT_POSTPROCESSING[model_type]
    cap = getattr(text_config, "final_logit_softcapping", None)
    if kind == "softcap" and cap:
        return lambda logits: torch.tanh(logits / cap) * cap
    if kind == "scale":
        return lambda logits: logits * base.logit_scale
    if kind == "divide":
        return lambda logits: logits / text_config.logits_scaling
    return lambda logits: logits


def _flat_kwargs(base, args, kwargs) -> dict:
    """The call's arguments by name, as the class forward would see them (positional ones included)."""
    signature = inspect.signature(type(base).forward)
    bound = signature.bind(base, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(signature.parameters)))  # self
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


def _chunked_loss_forward(base, postprocess, chunk_tokens, original):
    def forward(self, *args, **kwargs):
        if not self.training or kwargs.get("fused_lm_head"):
            return original(*args, **kwargs)
        named = _flat_kwargs(base, args, kwargs)
        labels = named.pop("labels", None)
        if labels is None or named.get("logits_to_keep", 0) not in (0, None):
            return original(*args, **kwargs)
        named.pop("logits_to_keep", None)
        if named.get("output_router_logits"):
            raise NotImplementedError(
                "hf_seqpar: output_router_logits=True adds the router's auxiliary loss to the loss, which "
                "chunked_loss does not compute; drop the argument or set chunked_loss: false"
            )
        return_dict = named.pop("return_dict", None)
        lm_head = base.get_output_embeddings()
        params = list(lm_head.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            raise NotImplementedError(
                "hf_seqpar: chunked_loss reads lm_head's parameters in backward, which DeepSpeed ZeRO-3 partitions "
                "away; use ZeRO-2, FSDP or DDP, or set chunked_loss: false"
            )
        ignore_index = named.get("ignore_index", IGNORE_INDEX)
        shift_labels = named.get("shift_labels")
        targets = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        outputs = base.base_model(**named)  # what the family's forward passes its decoder: everything but labels
        vocab = lm_head.weight.shape[0]
        log_probs = chunked_target_log_probs(
            outputs.last_hidden_state,
            targets,
            lambda hidden: postprocess(lm_head(hidden)).float(),
            params,
            chunk_tokens=chunk_tokens or max(MIN_LOSS_CHUNK_TOKENS, LOSS_CHUNK_BYTES // (4 * vocab)),
            ignore_index=ignore_index,
        )
        loss = causal_lm_loss(log_probs, targets, named.get("num_items_in_batch"), ignore_index)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from ._compat import output_cache_field

        cache = output_cache_field(CausalLMOutputWithPast)  # the decoder's output names it the same way
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            **{cache: getattr(outputs, cache, None)},
        )
        return result.to_tuple() if return_dict is False else result

    return forward


# ---- tiled MLP ---------------------------------------------------------------------------------------------------


def _decoder(base, saving: str):
    decoder = base.base_model
    if decoder is base or not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise NotImplementedError(
            f"hf_seqpar: {saving} needs a decoder with a `layers` list; {type(base).__name__} has none. Set "
            f"{saving}: false for this model"
        )
    return decoder


def _dense_mlps(base) -> list[torch.nn.Module]:
    mlps = []
    for i, layer in enumerate(_decoder(base, "tiled_mlp").layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise NotImplementedError(
                f"hf_seqpar: tiled_mlp found no `mlp` in layer {i} ({type(layer).__name__}); set tiled_mlp: false"
            )
        routed = [n for n, _ in mlp.named_modules() if "expert" in n.lower() or "router" in n.lower()]
        if routed:
            raise NotImplementedError(
                f"hf_seqpar: tiled_mlp tiles dense MLPs; layer {i}'s {type(mlp).__name__} routes tokens to experts "
                f"({routed[0]}), and its router statistics depend on the whole sequence. Set tiled_mlp: false"
            )
        mlps.append(mlp)
    return mlps


def _tiled_mlp_forward(chunk_tokens, original):
    def forward(self, hidden_states, *args, **kwargs):
        if args or kwargs:
            raise NotImplementedError(
                f"hf_seqpar: tiled_mlp handles an MLP called with the hidden states alone; {type(self).__name__} got "
                f"more arguments ({len(args)} positional, {sorted(kwargs)}). Set tiled_mlp: false"
            )
        from ..memory import tiled_apply

        return tiled_apply(original, hidden_states, chunk_tokens=chunk_tokens)

    return forward


# ---- checkpoint offload ------------------------------------------------------------------------------------------


def _offloading_forward(decoder, offloader, original):
    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return original(*args, **kwargs)
        if not any(getattr(layer, "gradient_checkpointing", False) for layer in decoder.layers):
            raise ValueError(
                "hf_seqpar: offload_checkpoints moves what gradient checkpointing keeps to the CPU, but gradient "
                "checkpointing is off, so every activation of every layer would be copied. Turn it on "
                "(TrainingArguments(gradient_checkpointing=True) or model.gradient_checkpointing_enable()), or set "
                "offload_checkpoints: false"
            )
        with offloader.saving():
            return original(*args, **kwargs)

    return forward


# ---- recomputed norms and LoRA inputs ------------------------------------------------------------------------------


def _layer_norms(base) -> list[torch.nn.Module]:
    """Every RMSNorm of the decoder: the layers' (input / post-attention, per-head q / k norms) and the final one."""
    return [m for m in _decoder(base, "recompute_norms").modules() if type(m).__name__.endswith("RMSNorm")]


def _recomputed_forward(chunk_rows, original):
    """The norm over sequence chunks (`hf_seqpar.memory.chunked_rowwise`): it keeps its input only, and its backward
    recomputes and differentiates one chunk at a time, so that its float32 temporaries are those of one chunk."""

    def forward(self, hidden_states, *args, **kwargs):
        grads = torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if args or kwargs or not grads or hidden_states.dim() < 2:
            return original(hidden_states, *args, **kwargs)
        from ..memory import chunked_rowwise

        row = hidden_states.shape[-1]  # a chunk's float32 copy is about NORM_CHUNK_BYTES
        chunk = chunk_rows * row if chunk_rows else max(row, NORM_CHUNK_BYTES // 4)
        return chunked_rowwise(original, hidden_states, list(self.parameters()), chunk_elements=chunk)

    return forward


def _lora_linears(model) -> list[torch.nn.Module]:
    """PEFT's LoRA `Linear` layers (their class, found by what they hold: lora_A, lora_B, base_layer)."""
    return [
        m
        for m in model.modules()
        if type(m).__name__ == "Linear" and all(hasattr(m, a) for a in ("lora_A", "lora_B", "base_layer", "scaling"))
    ]


def _lora_recomputed_input_forward(original):
    """PEFT's vanilla LoRA forward (base output + the float32 adapter branch, cast back) with the branch checkpointed;
    anything else (merged, disabled, variants such as DoRA, several adapters, extra arguments) takes PEFT's forward."""

    def forward(self, x, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self.lora_A.keys()]
        plain = args or kwargs or self.disable_adapters or self.merged or len(active) != 1
        if plain or active[0] in getattr(self, "lora_variant", {}) or not torch.is_grad_enabled():
            return original(x, *args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        name = active[0]
        lora_A, lora_B, dropout, scaling = (
            self.lora_A[name],
            self.lora_B[name],
            self.lora_dropout[name],
            self.scaling[name],
        )
        result = self.base_layer(x)
        result_dtype = result.dtype

        def branch(inp):
            return lora_B(lora_A(dropout(self._cast_input_dtype(inp, lora_A.weight.dtype)))) * scaling

        result = result + checkpoint(branch, x, use_reentrant=False)
        return result.to(result_dtype)

    return forward
