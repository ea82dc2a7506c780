"""Every change hf_seqpar makes to an object of transformers, accelerate, TRL or PEFT, declared in one table.

`PATCHES` has one row per rewiring: the owner (a class, a module, or the class whose instances are changed), the
attribute, the parameters hf_seqpar relies on (checked with `inspect.signature` when installed, so an upstream rename
fails at activation, naming the versions), the wrapper factory, and when it happens. Private upstream attributes that
hf_seqpar reads or writes are rows too, each checked where it is used. Nothing else in hf_seqpar assigns to an
upstream object (tests/test_patches.py scans the source); it calls this module:

- `install` / `uninstall`: a class method or module function, replaced by `factory(original)`. Each wrap carries a
  key (the config it serves): `install` with the same key finds its own wrapper and does nothing; with another key
  the new wrapper replaces ours (the latest activation wins, never a silent mix of two).
- `patch_instance`: the per-instance rebinding of one object's methods (a Trainer's compute_loss, log, ...), every
  attribute once, each a chain of factories composed explicitly in the given order.
- `set_attr` / `read` / `del_attr`: a declared field of an upstream instance written, or a private one read (or
  deleted), loudly.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types

import torch.distributed as dist

ORIGINAL_ATTR = "__hf_seqpar_original__"  # set on every wrapper: the function it replaced
KEY_ATTR = "__hf_seqpar_key__"  # set on every wrapper: what it was installed for (e.g. ("trainer", config))
INSTANCE_ATTR = "__hf_seqpar_instance_patches__"  # on a patched instance: the rows applied to it
TRAINER_OWNED_ATTR = "_hf_seqpar_trainer_owned"  # on an Accelerator a Trainer built (the prepare hook leaves it be)

CLASS, MODULE, INSTANCE, FIELD, PRIVATE = "class", "module", "instance", "field", "private"


@dataclasses.dataclass(frozen=True)
class Patch:
    """One row: `kind` is CLASS / MODULE (`owner.attr` replaced by `factory(original)`), INSTANCE (a method of
    one instance of `owner` rebound by `factory(bound original)`), FIELD (a field of an instance of `owner`
    written) or PRIVATE (a private upstream attribute read or written; `factory` is ''). `owner` is
    'module:Class' or 'module'; `params` must be parameters of the original (INSTANCE / CLASS / MODULE) or, for a
    PRIVATE method, of the method."""

    kind: str
    owner: str
    attr: str
    params: tuple[str, ...] = ()
    # 'hf_seqpar.integrations.module:function' that makes the wrapper (or the value); 'a + b': a chain (b wraps
    # a's result), 'a / b': one or the other (the generic and the whole-sequence path); later names may drop the
    # 'hf_seqpar.integrations.' prefix
    factory: str = ""
    when: str = ""
    owners: tuple[str, ...] = ()  # further owners of the same binding (modules that import the function too)


_T = "transformers.trainer:Trainer"
_ATTACH = "Trainer.__init__ (attach)"
_ACCELERATOR = "accelerate.accelerator:Accelerator"
_SFT, _DPO, _KTO = (
    "trl.trainer.sft_trainer:SFTTrainer",
    "trl.trainer.dpo_trainer:DPOTrainer",
    "trl.trainer.kto_trainer:KTOTrainer",
)
_MODEL = "transformers.modeling_utils:PreTrainedModel"
_CONFIG = "transformers.configuration_utils:PretrainedConfig"
_I = "hf_seqpar.integrations."

# fmt: off
PATCHES: dict[str, Patch] = {
    # ---- classes and module functions, replaced at activation (python -m hf_seqpar, hf-seqpar launch)
    "Trainer.__init__": Patch(
        CLASS, _T, "__init__", ("model", "args", "data_collator"), _I + "trainer:_attaching_init",
        "activate(): sp_size > 1, or sp_size = 1 with memory savings",
    ),
    "Accelerator.prepare": Patch(
        CLASS, _ACCELERATOR, "prepare", ("args",), _I + "accelerator:_switching_prepare", "activate()",
    ),
    "prepare_data_loader": Patch(
        MODULE, "accelerate.data_loader", "prepare_data_loader",
        ("dataloader", "num_processes", "process_index", "dispatch_batches", "torch_device_mesh"),
        _I + "loaders:_dp_sharded", "activate() with sp_size > 1, SequenceParallelPlugin.prepare",
        owners=("accelerate.accelerator",),
    ),
    "load_balancing_loss_func": Patch(
        MODULE, "transformers.models.mixtral.modeling_mixtral", "load_balancing_loss_func",
        ("gate_logits", "num_experts", "top_k", "attention_mask"), _I + "moe:_sharded_router_loss",
        "apply_sequence_parallel, in the modeling module of an MoE family that defines it",
    ),
    # ---- one Trainer's methods, rebound at the end of its __init__ (trainer.attach, composed there)
    "Trainer.compute_loss": Patch(
        INSTANCE, _T, "compute_loss", ("model", "inputs", "return_outputs", "num_items_in_batch"),
        _I + "evaluation:exact_compute_loss + logs:trl_num_tokens / trl:_wrapping_forwards_first", _ATTACH,
    ),
    "Trainer.prediction_step": Patch(
        INSTANCE, _T, "prediction_step", ("model", "inputs", "prediction_loss_only", "ignore_keys"),
        _I + "evaluation:exact_prediction_step", _ATTACH,
    ),
    "Trainer.evaluation_loop": Patch(
        INSTANCE, _T, "evaluation_loop", ("dataloader",), _I + "evaluation:exact_evaluation_loop", _ATTACH
    ),
    "Trainer.predict": Patch(INSTANCE, _T, "predict", ("test_dataset",), _I + "logs:plain_predict_steps", _ATTACH),
    "Trainer.log": Patch(INSTANCE, _T, "log", ("logs",), _I + "logs:plain_eval_steps", _ATTACH),
    "Trainer.call_model_init": Patch(INSTANCE, _T, "call_model_init", (), _I + "trainer:_switch_model_init", _ATTACH),
    "Trainer.get_total_train_batch_size": Patch(
        INSTANCE, _T, "get_total_train_batch_size", ("args",), _I + "logs:per_sp_group", _ATTACH
    ),
    "Trainer.floating_point_ops": Patch(
        INSTANCE, _T, "floating_point_ops", ("inputs",), _I + "logs:plain_flops / logs:counted_once", _ATTACH
    ),
    "Trainer._track_num_input_tokens": Patch(
        INSTANCE, _T, "_track_num_input_tokens", ("inputs",), _I + "logs:plain_tokens / logs:tokens_once", _ATTACH
    ),
    "Trainer._move_model_to_device": Patch(
        INSTANCE, _T, "_move_model_to_device", ("model", "device"), _I + "tp_training:split_models_only",
        "Trainer.__init__ with tp_size > 1 (before the stock init: the whole model is not placed before the split)",
    ),
    "Trainer.save_model": Patch(
        INSTANCE, _T, "save_model", ("output_dir", "_internal_call"), _I + "tp_training:_whole_weights",
        _ATTACH + " with tp_size > 1",
    ),
    "Trainer._save_optimizer_and_scheduler": Patch(
        INSTANCE, _T, "_save_optimizer_and_scheduler", ("output_dir",), _I + "tp_training:_save_optimizer_pieces",
        _ATTACH + " with tp_size > 1",
    ),
    "Trainer._load_optimizer_and_scheduler": Patch(
        INSTANCE, _T, "_load_optimizer_and_scheduler", ("checkpoint",), _I + "tp_training:_load_optimizer_pieces",
        _ATTACH + " with tp_size > 1",
    ),
    "DPOTrainer._precompute_ref_logps": Patch(
        INSTANCE, _DPO, "_precompute_ref_logps", ("dataset", "name", "batch_size"),
        _I + "trl:_wrapping_forwards_first", _ATTACH + " of a DPO / KTO trainer", owners=(_KTO,),
    ),
    "Accelerator.gather_for_metrics": Patch(
        INSTANCE, _ACCELERATOR, "gather_for_metrics", ("input_data", "use_gather_object"),
        _I + "evaluation:dp_gather_for_metrics", _ATTACH + " (DPO / KTO); Accelerator.prepare of a loop",
    ),
    "PreTrainedModel.save_pretrained (TP)": Patch(
        INSTANCE, _MODEL, "save_pretrained", ("save_directory", "state_dict"), _I + "tp_weights:whole_saves_only",
        "apply_sequence_parallel with tp_size > 1 (a save of this rank's pieces is refused)",
    ),
    "PeftModel.save_pretrained (TP)": Patch(
        INSTANCE, "peft.peft_model:PeftModel", "save_pretrained", ("save_directory",),
        _I + "tp_weights:whole_saves_only", "apply_sequence_parallel with tp_size > 1 on a PeftModel",
    ),
    "Accelerator.clip_grad_norm_": Patch(
        INSTANCE, _ACCELERATOR, "clip_grad_norm_", ("parameters", "max_norm", "norm_type"),
        _I + "tp_training:_whole_norm", "Accelerator.prepare of a model split by tp_size > 1 (a Trainer's too)",
    ),
    "PreTrainedModel.forward (TRL fused head)": Patch(
        INSTANCE, _MODEL, "forward", (), _I + "trl:sharded_fused_forward",
        "first compute_loss / _precompute_ref_logps of a DPO / KTO trainer (after TRL's add_fused_lm_head)",
    ),
    "PreTrainedModel.forward (memory savings)": Patch(
        INSTANCE, _MODEL, "forward", (), _I + "memory:_install",
        "apply_memory_savings (also on decoders, MLPs, RMSNorms and PEFT LoRA linears: their instance forward)",
    ),
    # ---- fields of upstream instances that hf_seqpar writes
    "PreTrainedModel.loss_function": Patch(
        FIELD, _MODEL, "loss_function", (), _I + "loss:counting",
        "a sharded forward given labels and num_items_in_batch, until one passes the count check (put back as it "
        "returns: the instance's own function, else PreTrainedModel._loss_function deleted)",
    ),
    "Trainer.data_collator": Patch(FIELD, _T, "data_collator", (), _I + "collator:SequenceShardingCollator", _ATTACH),
    "Trainer.gather_function": Patch(
        FIELD, _T, "gather_function", (), _I + "evaluation:dp_gather_for_metrics", "each evaluation_loop; attach (DPO)"
    ),
    "Trainer.preprocess_logits_for_metrics": Patch(
        FIELD, _T, "preprocess_logits_for_metrics", (), "", "None during evaluation_loop (prediction_step applies it)"
    ),
    "TrainingArguments.average_tokens_across_devices": Patch(
        FIELD, "transformers.training_args:TrainingArguments", "average_tokens_across_devices", (), "", _ATTACH
    ),
    "TrainerState.num_input_tokens_seen": Patch(
        FIELD, "transformers.trainer_callback:TrainerState", "num_input_tokens_seen", (), "",
        "Trainer._track_num_input_tokens (its replacement counts the plain batch)",
    ),
    "Accelerator (trainer-owned mark)": Patch(
        FIELD, _ACCELERATOR, TRAINER_OWNED_ATTR, (), "", _ATTACH + ": the prepare hook leaves its objects be"
    ),
    # ---- private upstream attributes read or written (each checked where used: `read`, `set_attr`)
    "PretrainedConfig._attn_implementation_internal": Patch(
        PRIVATE, _CONFIG, "_attn_implementation_internal", (), "",
        "apply / remove_sequence_parallel and every forward of a switched model (sharded or not)",
    ),
    "PretrainedConfig._attn_implementation": Patch(
        PRIVATE, _CONFIG, "_attn_implementation", (), "", "apply_sequence_parallel (did the switch take?)"
    ),
    "PreTrainedModel._can_set_attn_implementation": Patch(
        PRIVATE, _MODEL, "_can_set_attn_implementation", (), "", "apply_sequence_parallel (is attention pluggable?)"
    ),
    "PreTrainedModel._loss_function": Patch(
        PRIVATE, _MODEL, "_loss_function", (), "",
        "the loss-count check: where the loss_function setter stores the function (read, and deleted after the check)",
    ),
    "Trainer._save": Patch(
        PRIVATE, _T, "_save", ("output_dir", "state_dict"), "",
        "Trainer.save_model with tp_size > 1: writes the whole tensors it gathered",
    ),
    "SFTTrainer._total_train_tokens": Patch(
        PRIVATE, _SFT, "_total_train_tokens", (), "", "each training compute_loss of an SFTTrainer (num_tokens)"
    ),
    "SFTTrainer._metrics": Patch(PRIVATE, _SFT, "_metrics", (), "", "each training compute_loss of an SFTTrainer"),
    "SFTTrainer._tp_size": Patch(PRIVATE, _SFT, "_tp_size", (), "", "each training compute_loss of an SFTTrainer"),
    "DPOTrainer._is_vision_dataset": Patch(PRIVATE, _DPO, "_is_vision_dataset", (), "", _ATTACH + " of DPO / KTO"),
    "LoraLayer._cast_input_dtype": Patch(
        PRIVATE, "peft.tuners.lora.layer:Linear", "_cast_input_dtype", ("x", "dtype"), "",
        "apply_memory_savings(recompute_lora_inputs): each adapted linear's forward",
    ),
}
# fmt: on
# Private attributes that exist on instances only (set in the owner's __init__): tests/test_patches.py builds one.
INSTANCE_ONLY = {
    "PretrainedConfig._attn_implementation_internal",
    "PreTrainedModel._loss_function",  # set by the public loss_function setter, not in __init__
    "SFTTrainer._total_train_tokens",
    "SFTTrainer._metrics",
    "SFTTrainer._tp_size",
    "DPOTrainer._is_vision_dataset",
}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def versions() -> str:
    import accelerate
    import transformers

    return f"transformers {transformers.__version__}, accelerate {accelerate.__version__}"


def resolve(path: str):
    """'module:Class' -> the class, 'module' -> the module (imported on demand)."""
    module, _, name = path.partition(":")
    owner = importlib.import_module(module)
    return functools.reduce(getattr, name.split("."), owner) if name else owner


def check_params(fn, names: tuple[str, ...], what: str) -> None:
    """Fail at install time, naming the version, if `fn` lost a parameter the hook relies on."""
    missing = [name for name in names if name not in inspect.signature(fn).parameters]
    if missing:
        raise RuntimeError(
            f"hf_seqpar: cannot hook {what}: its parameters {missing} are gone in the installed version "
            f"({versions()}); hf_seqpar supports transformers 5.x and accelerate 1.1x"
        )


def _row(name: str, *kinds: str) -> Patch:
    row = PATCHES.get(name)
    if row is None or row.kind not in kinds:
        raise KeyError(f"hf_seqpar: {name!r} is no {'/'.join(kinds)} row of integrations/patches.py's PATCHES")
    return row


def install(name: str, make_wrapper, *, key=None, owner=None) -> None:
    """Replace the row's `owner.attr` (or that attribute of `owner`, for a module that binds the same function) by
    `make_wrapper(original)`, after checking the row's parameters on the original. A second call with an equal
    `key` finds the wrapper and does nothing; with another key it replaces our wrapper (the new key wins)."""
    row = _row(name, CLASS, MODULE)
    owner = resolve(row.owner) if owner is None else owner
    current = getattr(owner, row.attr)
    original = getattr(current, ORIGINAL_ATTR, current)
    check_params(original, row.params, f"{getattr(owner, '__name__', owner)}.{row.attr}")
    if current is not original:
        if getattr(current, KEY_ATTR, None) == key:
            return
        current = original
    wrapper = functools.wraps(current)(make_wrapper(current))
    setattr(wrapper, ORIGINAL_ATTR, current)
    setattr(wrapper, KEY_ATTR, key)
    setattr(owner, row.attr, wrapper)


def uninstall(name: str, owner=None) -> None:
    """Put back what `install` replaced (nothing to do when the attribute is not our wrapper, or its module was
    never imported)."""
    import sys

    row = _row(name, CLASS, MODULE)
    if owner is None:
        module, _, _ = row.owner.partition(":")
        if module not in sys.modules:
            return
        owner = resolve(row.owner)
    current = getattr(owner, row.attr)
    if hasattr(current, ORIGINAL_ATTR):
        setattr(owner, row.attr, getattr(current, ORIGINAL_ATTR))


def installed(name: str, owner=None):
    """Our wrapper at the row's place, or None."""
    row = _row(name, CLASS, MODULE)
    current = getattr(resolve(row.owner) if owner is None else owner, row.attr, None)
    return current if hasattr(current, ORIGINAL_ATTR) else None


def patch_instance(obj, chains: dict[str, list]) -> None:
    """Rebind methods of one upstream instance: `chains` maps a row name to its factories, applied in order (each
    wraps the previous result, the first the bound original). The one place per-instance rewiring happens: an
    attribute patched twice on one instance is refused (compose the chain instead)."""
    done = obj.__dict__.setdefault(INSTANCE_ATTR, set())
    for name, factories in chains.items():
        row = _row(name, INSTANCE)
        if name in done:
            raise RuntimeError(f"hf_seqpar: {type(obj).__name__}.{row.attr} is patched twice on one instance")
        method = getattr(obj, row.attr)
        for factory in factories:
            method = factory(method)
        obj.__dict__[row.attr] = method
        done.add(name)


def check_row(name: str) -> None:
    """The row's owner (each of them) has its attribute and the parameters hf_seqpar relies on; raises naming the
    versions. Rows of instance-only private attributes are checked on an instance (`read`, `set_attr`)."""
    row = PATCHES[name]
    for path in (row.owner, *row.owners):
        owner = resolve(path)
        if name in INSTANCE_ONLY or row.kind == FIELD:
            continue
        what = f"{path.replace(':', '.')}.{row.attr}"
        if not hasattr(owner, row.attr):
            raise RuntimeError(f"hf_seqpar: {what} is gone in the installed version ({versions()})")
        if row.params:
            check_params(getattr(owner, row.attr), row.params, what)


def check_rows(prefix: str) -> None:
    """`check_row` for every row whose owner starts with `prefix` (e.g. 'transformers.trainer:', 'accelerate.')."""
    for name, row in PATCHES.items():
        if row.owner.startswith(prefix):
            check_row(name)


def set_attr(obj, name: str, value) -> None:
    """Write the declared field (or private attribute) `name` of an upstream instance."""
    row = _row(name, FIELD, PRIVATE, INSTANCE)
    if row.kind == PRIVATE and not hasattr(obj, row.attr):
        raise RuntimeError(
            f"hf_seqpar: {type(obj).__name__}.{row.attr} is gone in the installed version ({versions()})"
        )
    setattr(obj, row.attr, value)


def bind_forward(name: str, module, forward) -> None:
    """Give one upstream module (a model, decoder, MLP, norm, LoRA linear) the instance `forward` of row `name`:
    `forward(self, ...)` bound to it, in place of the class's (or an earlier instance forward)."""
    _row(name, INSTANCE)
    module.forward = types.MethodType(forward, module)


def unbind_forward(name: str, module, previous) -> None:
    """Undo `bind_forward`: put back the instance forward the module had before (`previous`), or the class's."""
    _row(name, INSTANCE)
    if previous is None:
        del module.forward
    else:
        module.forward = previous


def del_attr(obj, name: str) -> None:
    """Delete the declared private attribute `name` of an upstream instance (one that hf_seqpar created by writing a
    public field, such as PreTrainedModel.loss_function); a missing one raises, naming the versions."""
    row = _row(name, PRIVATE)
    if row.attr not in vars(obj):
        raise RuntimeError(
            f"hf_seqpar: {type(obj).__name__}.{row.attr} is gone in the installed version ({versions()})"
        )
    delattr(obj, row.attr)


def read(obj, name: str, *default):
    """Read the declared private attribute `name`; a missing one raises, naming the versions (unless a default
    is given: for attributes that appear later in the owner's life, such as SFTTrainer's counters)."""
    row = _row(name, PRIVATE)
    if default:
        return getattr(obj, row.attr, default[0])
    if not hasattr(obj, row.attr):
        raise RuntimeError(
            f"hf_seqpar: {type(obj).__name__}.{row.attr} is gone in the installed version ({versions()})"
        )
    return getattr(obj, row.attr)


def mark_trainer_accelerator(accelerator) -> None:
    """The Trainer switches this accelerator's model and loaders itself: the prepare hook must not."""
    accelerator.__dict__[TRAINER_OWNED_ATTR] = True


def trainer_owned(accelerator) -> bool:
    return bool(accelerator.__dict__.get(TRAINER_OWNED_ATTR))
