"""Router auxiliary losses of mixture-of-experts models, exact under sequence parallelism.

transformers computes the Switch-Transformer load-balancing loss in a module-level `load_balancing_loss_func` of
each MoE family's modeling module: `E * sum_e (count_e / T) * (prob_e / T)` over the T (non-padding) tokens of
all layers. Both statistics are sums over tokens, so on a shard the exact loss needs the whole sequence's
`count_e` and `T` (no gradient: all-reduced) and this rank's `prob_e` (its share of the gradient): summed over the
SP group, the shares are the plain run's loss. There is no public hook, so the function is wrapped here, once per
modeling module; at install the family's function is checked against that formula on random logits, and a family
that computes something else is refused rather than reduced wrongly.
"""

from __future__ import annotations

import contextvars
import sys

import torch
import torch.distributed as dist

from .patches import install

LOSS_FN = "load_balancing_loss_func"
# The sharded forward in progress on this thread (innermost): (its SeqParState, real-token mask). Set by the forward
# hooks of integrations/transformers.py; read by the router loss, which upstream computes in a module-level function
# that sees neither the model nor the batch.
SHARDED_FORWARD: contextvars.ContextVar = contextvars.ContextVar("hf_seqpar_sharded_forward", default=None)
EXACT_ATTR = "__hf_seqpar_exact__"


def _router_stats(gate_logits: tuple, num_experts: int, top_k: int, token_mask: torch.Tensor | None):
    """(top-k assignment counts [E], routing-probability sums [E], token-rows) over every layer's valid tokens."""
    device = gate_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for layer_gate in gate_logits:
        weights = torch.softmax(layer_gate.to(device), dim=-1)
        mask = (
            torch.ones(weights.shape[0], device=device)
            if token_mask is None
            else token_mask.reshape(-1).to(device=device, dtype=torch.float32)
        )
        selected = torch.topk(weights, top_k, dim=-1).indices
        counts = counts.scatter_add(0, selected.reshape(-1), mask.repeat_interleave(top_k))
        probs = probs + (weights.float() * mask[:, None]).sum(0)
        rows = rows + mask.sum()
    return counts, probs, rows


def router_loss_share(gate_logits: tuple, num_experts: int, top_k: int, token_mask, group) -> torch.Tensor:
    """This rank's share of the whole sequence's load-balancing loss (`group=None`: the loss of these tokens)."""
    counts, probs, rows = _router_stats(gate_logits, num_experts, top_k, token_mask)
    totals = torch.cat([counts, rows[None]]).detach()
    if group is not None:
        dist.all_reduce(totals, group=group)
    counts, rows = totals[:-1], totals[-1].clamp(min=1)
    return num_experts * torch.sum(counts / rows * probs / rows)


def _is_switch_form(original) -> bool:
    """Does the family's function compute the formula above? Checked on random logits, with and without a mask."""
    gen = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(6, 4, generator=gen) for _ in range(2))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    try:
        for attention_mask in (None, mask):
            theirs = original(logits, 4, 2, attention_mask)
            ours = router_loss_share(logits, 4, 2, attention_mask, None)
            if not torch.allclose(torch.as_tensor(theirs, dtype=torch.float32), ours, rtol=1e-5, atol=1e-6):
                return False
    except Exception:  # another signature or shape convention: not the formula we reduce
        return False
    return True


def _sharded_router_loss(original):
    exact = _is_switch_form(original)

    def load_balancing_loss_func(gate_logits, num_experts=None, top_k=2, attention_mask=None, *args, **kwargs):
        current = SHARDED_FORWARD.get()
        if current is None or not isinstance(gate_logits, tuple):
            return original(gate_logits, num_experts, top_k, attention_mask, *args, **kwargs)
        if not exact or args or kwargs:
            raise NotImplementedError(
                f"hf_seqpar: {original.__module__}.{LOSS_FN} is not the Switch-Transformer load-balancing loss that "
                "hf_seqpar reduces exactly over ranks; set output_router_logits=False to train under sequence "
                "parallelism"
            )
        state, real_tokens = current
        return router_loss_share(gate_logits, num_experts, top_k, real_tokens, state.groups.sp_group)

    setattr(load_balancing_loss_func, EXACT_ATTR, exact)
    return load_balancing_loss_func


def install_router_loss(model: torch.nn.Module, groups) -> None:
    """Make the router loss of `model`'s family exact on shards; refuse (at apply time) a family whose loss is
    on (`output_router_logits=True`) but not of the form we can reduce."""
    module = sys.modules[type(model).__module__]
    if not callable(getattr(module, LOSS_FN, None)):
        return
    install(LOSS_FN, _sharded_router_loss, owner=module)  # PATCHES["load_balancing_loss_func"]
    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", False) and not getattr(getattr(module, LOSS_FN), EXACT_ATTR):
        raise NotImplementedError(
            f"hf_seqpar: {type(model).__name__} computes its router auxiliary loss differently from the Switch-"
            "Transformer form that hf_seqpar reduces exactly over ranks; set output_router_logits=False"
        )
