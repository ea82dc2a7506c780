"""Every row of integrations/patches.py's PATCHES still fits the installed transformers / accelerate / TRL / PEFT,
and nothing else in hf_seqpar assigns to an upstream object (checked on the source with `ast`).

When an upstream release renames a method, drops a parameter hf_seqpar relies on or removes a private attribute,
this file fails naming the row, instead of a training run computing something else."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from hf_seqpar.integrations import patches
from hf_seqpar.integrations.patches import FIELD, INSTANCE_ONLY, PATCHES, PRIVATE

PACKAGE = Path(__file__).resolve().parents[1] / "hf_seqpar"
UPSTREAM = {"transformers", "accelerate", "trl", "peft", "datasets"}
# Names hf_seqpar's integrations give to upstream instances (a Trainer, its Accelerator and TrainingArguments, a
# model, its config, a module of it): assigning an attribute through them patches an upstream object.
INSTANCE_NAMES = {"trainer", "accelerator", "args", "model", "base", "lm", "module", "cfg", "config", "text_config"}
# Writes that stay where they are, each with its reason.
ALLOWED = {
    ("hf_seqpar.integrations.launch", "_as_multi_process_cpu"): "hf-seqpar launch's own parsed command line",
    ("hf_seqpar.integrations.launch", "launch"): "hf-seqpar launch's own parsed command line",
}
SCRIPTS = (
    "demo",
)  # training scripts shipped with hf_seqpar: they configure their own models, as a user's script does


def _factories(row) -> list[str]:
    names = [n.strip() for part in row.factory.split(" / ") for n in part.split(" + ") if n.strip()]
    return [n if n.startswith("hf_seqpar.") else f"hf_seqpar.integrations.{n}" for n in names]


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_every_row_fits_the_installed_versions(name):
    row = PATCHES[name]
    for path in (row.owner, *row.owners):
        owner = patches.resolve(path)  # the owner imports
        if row.kind == FIELD or name in INSTANCE_ONLY:
            continue
        assert hasattr(owner, row.attr), f"{path}.{row.attr} is gone ({patches.versions()})"
        if row.params:
            params = inspect.signature(getattr(owner, row.attr)).parameters
            missing = [p for p in row.params if p not in params]
            assert not missing, f"{path}.{row.attr} lost the parameters {missing} ({patches.versions()})"
    patches.check_row(name)  # what install / activation checks: the same verdict
    if row.kind == PRIVATE:
        assert row.attr.startswith("_"), f"{name}: a PRIVATE row names a public attribute"
    if row.kind != PRIVATE:
        assert row.factory or row.kind == FIELD, f"{name}: no wrapper factory"
    for factory in _factories(row):
        module, _, qualname = factory.partition(":")
        assert callable(getattr(importlib.import_module(module), qualname, None)), f"{name}: {factory} is gone"


# Instance-only private attributes stored by a public property of the owner (its setter writes, its getter reads).
STORED_BY_PROPERTY = {"PreTrainedModel._loss_function": "loss_function"}


def test_instance_only_private_attributes_exist():
    """Set in the owner's __init__ (or by a public property's setter), so they are checked on a built instance (a
    model config) or on what the pinned __init__ (or the property) stores (TRL trainers, which need datasets)."""
    from transformers import LlamaConfig

    assert hasattr(LlamaConfig(), PATCHES["PretrainedConfig._attn_implementation_internal"].attr)
    for name in sorted(INSTANCE_ONLY - {"PretrainedConfig._attn_implementation_internal"}):
        row = PATCHES[name]
        owner = patches.resolve(row.owner)
        if name in STORED_BY_PROPERTY:
            prop = getattr(owner, STORED_BY_PROPERTY[name])
            for what, fn in (("setter", prop.fset), ("getter", prop.fget)):
                assert row.attr in fn.__code__.co_names, f"{row.owner}.{prop.fget.__name__}'s {what} lost {row.attr}"
            continue
        stored = owner.__init__.__code__.co_names
        assert row.attr in stored, f"{row.owner}.__init__ no longer sets {row.attr}"


def test_a_field_written_through_its_property_is_deleted_loudly():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    default = model.loss_function
    patches.set_attr(model, "PreTrainedModel.loss_function", print)
    assert patches.read(model, "PreTrainedModel._loss_function") is print and model.loss_function is print
    patches.del_attr(model, "PreTrainedModel._loss_function")
    assert model.loss_function is default
    with pytest.raises(RuntimeError, match=r"^hf_seqpar: LlamaForCausalLM._loss_function is gone"):
        patches.del_attr(model, "PreTrainedModel._loss_function")


def test_instance_rows_compose_once():
    class Owner:
        def log(self, logs):
            return logs

    owner = Owner()
    patches.patch_instance(
        owner, {"Trainer.log": [lambda f: lambda logs: f(logs) + ["a"], lambda f: lambda logs: f(logs) + ["b"]]}
    )
    assert owner.log([]) == ["a", "b"]
    with pytest.raises(RuntimeError, match=r"^hf_seqpar: Owner.log is patched twice"):
        patches.patch_instance(owner, {"Trainer.log": [lambda f: f]})
    with pytest.raises(KeyError, match="no instance row"):
        patches.patch_instance(owner, {"Trainer.loss": [lambda f: f]})


def test_private_reads_fail_loudly():
    with pytest.raises(RuntimeError, match=r"^hf_seqpar: object._attn_implementation_internal is gone"):
        patches.read(object(), "PretrainedConfig._attn_implementation_internal")
    assert patches.read(object(), "SFTTrainer._total_train_tokens", None) is None


# ---- nothing outside patches.py assigns to an upstream object ------------------------------------------------


def _upstream_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in UPSTREAM}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in UPSTREAM:
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _ours(node: ast.AST) -> bool:
    """An attribute name held in one of our *_ATTR constants: hf_seqpar's own marker, not an upstream attribute."""
    return isinstance(node, ast.Name) and node.id.endswith("_ATTR")


def upstream_writes(source: str) -> list[tuple[str, int, str]]:
    """(function, line, what) for every setattr / delattr / attribute (or __dict__ item) assignment on an imported
    upstream object or a name that holds an upstream instance (`self` too, in functions that are not methods of
    our own classes)."""
    tree = ast.parse(source)
    upstream = _upstream_names(tree)
    found = []

    def scan(node, function: str, self_is_ours: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):  # its methods' self is ours; functions nested in them get upstream's
                for item in child.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        scan(item, item.name, True)
                continue
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                scan(child, getattr(child, "name", function) if function == "<module>" else function, False)
                continue
            roots = upstream | INSTANCE_NAMES | (set() if self_is_ours else {"self"})
            targets = []
            if isinstance(child, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
                targets = child.targets if isinstance(child, ast.Assign | ast.Delete) else [child.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and _root(target) in roots:
                    found.append((function, child.lineno, ast.unparse(target)))
                elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute):
                    if target.value.attr == "__dict__" and _root(target) in roots and not _ours(target.slice):
                        found.append((function, child.lineno, ast.unparse(target)))
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Name):
                if child.func.id in ("setattr", "delattr") and len(child.args) >= 2:
                    if _root(child.args[0]) in roots and not _ours(child.args[1]):
                        found.append((function, child.lineno, ast.unparse(child)))
            scan(child, function, self_is_ours)

    scan(tree, "<module>", False)
    return found


def test_the_scan_sees_upstream_writes():
    source = (
        "from transformers import Trainer\n"
        "import accelerate.data_loader\n"
        "STATE_ATTR = 'x'\n"
        "def f(trainer, model, x):\n"
        "    Trainer.log = None\n"
        "    setattr(accelerate.data_loader, 'prepare_data_loader', None)\n"
        "    trainer.compute_loss = None\n"
        "    model.config._attn_implementation_internal = 'sdpa'\n"
        "    trainer.accelerator.__dict__['gather_for_metrics'] = None\n"
        "    setattr(model, STATE_ATTR, 1)\n"  # our own marker: fine
        "    x.y = 1\n"  # not an upstream object
        "    def g(self):\n"
        "        self.gather_for_metrics = None\n"  # a wrapper's self: the upstream instance
        "class Ours:\n"
        "    def __init__(self):\n"
        "        self.config = 1\n"  # our own class
    )
    assert [line for _, line, _ in upstream_writes(source)] == [5, 6, 7, 8, 9, 13]


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "patches.py" and p.relative_to(PACKAGE).parts[0] not in SCRIPTS
    ],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_only_patches_py_writes_upstream_objects(path):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    writes = [w for w in upstream_writes(path.read_text()) if (module, w[0]) not in ALLOWED]
    assert writes == [], f"{module} writes upstream objects outside integrations/patches.py: {writes}"


def test_allowed_writes_name_declared_rows():
    rows = [reason.split("'")[1] for reason in ALLOWED.values() if reason.startswith("row ")]
    assert all(row in PATCHES for row in rows)


def test_instance_forwards_are_bound_through_declared_rows_only():
    import torch

    module, x = torch.nn.Linear(2, 2), torch.ones(1, 2)
    with pytest.raises(KeyError, match="no instance row"):
        patches.bind_forward("Linear.forward", module, lambda self, x: x)
    patches.bind_forward("PreTrainedModel.forward (memory savings)", module, lambda self, x: x * 0)
    assert torch.equal(module(x), torch.zeros(1, 2))
    patches.unbind_forward("PreTrainedModel.forward (memory savings)", module, None)
    assert "forward" not in vars(module) and not torch.equal(module(x), torch.zeros(1, 2))


# ---- the config is resolved once per model on a Trainer launch path ---------------------------------------------


def _body_resolve_once(mode: str):
    from unittest import mock

    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_seqpar import SeqParConfig
    from hf_seqpar.integrations.activate import activate

    calls = []
    resolve = SeqParConfig.resolve

    def counting(self, *args):
        calls.append((self.mode, args))
        return resolve(self, *args)

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    args = TrainingArguments(output_dir=f"/tmp/hf_seqpar_resolve_{dist.get_rank()}", use_cpu=True, report_to=[])
    with mock.patch.object(SeqParConfig, "resolve", counting):
        activate(SeqParConfig.from_env({"HF_SEQPAR_SP_SIZE": "2", "HF_SEQPAR_MODE": mode}))  # as python -m hf_seqpar
        try:
            trainer = Trainer(model=LlamaForCausalLM(config), args=args)
            per_model = len(calls)
            Trainer(model_init=lambda: LlamaForCausalLM(config), args=args).call_model_init()
        finally:
            activate(SeqParConfig())  # nothing to do: every hook goes
    switched = trainer.data_collator.config.mode
    return per_model, len(calls), switched, calls[0]


@pytest.mark.parametrize("mode", ["auto", "ring"])
def test_one_trainer_launch_resolves_the_config_once_per_model(ranks, mode):
    for per_model, total, switched, first in ranks.run(_body_resolve_once, mode):
        assert per_model == 1  # activate + Trainer(...): apply_sequence_parallel resolves, the rest share it
        assert total == 3  # a model_init Trainer: its first model, and the one call_model_init re-creates
        assert first == (mode, (4, 2))
        assert switched == ("ulysses" if mode == "auto" else "ring")  # the collator got the resolved config


@pytest.mark.parametrize(
    ("family", "builds"),
    [("mistral", True), ("qwen2", True), ("phimoe", True), ("gemma2", True), ("moshi", False), ("llama", False)],
)
def test_sliding_mask_probe_reads_the_modeling_module(family, builds):
    """The probe that replaced a source search: whether the modeling module holds masking_utils' sliding builder
    (on transformers 5.25 it agrees with the source search for all 543 modeling modules)."""
    import inspect

    from hf_seqpar.integrations.transformers import _builds_sliding_masks

    name = f"transformers.models.{family}.modeling_{family}"
    module = importlib.import_module(name)
    assert _builds_sliding_masks(name) is builds
    assert ("create_sliding_window_causal_mask" in inspect.getsource(module)) is builds
