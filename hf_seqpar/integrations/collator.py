"""`SequenceShardingCollator`: wrap any data collator so each SP rank gets its shard of the full batch.

Everything that depends on the whole sequence (positions, document boundaries, label shift, padding) is computed
on the FULL batch first, identically on every rank of the SP group; only then is each [B, S] tensor cut with
`layout.shard`. Left-padded rows are rolled to right padding (exact for RoPE models: attention only sees position
differences, and the pad tokens become a separate document that nothing attends into).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import layout
from ..config import SeqParConfig
from ..kernels import DocumentOffsets
from ..mesh import SeqParGroups
from .tp_collectives import tp_piece

IGNORE_INDEX = -100
# Describe the FULL sequence, so a model would misread them next to sharded tensors; `seqpar_cu_seqlens` replaces
# them. attention_mask goes too: no mask is built for our attention names, padding lives in the document offsets.
_DROPPED = ("attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_SEQUENCE_KEYS = ("labels", "shift_labels", "attention_mask", "position_ids", "token_type_ids", "seq_idx")


UNSHARDED_KEY = "seqpar_unsharded"  # with keep_unsharded=True; the Trainer integration pops it before the model


def collator_chain(collate_fn: Any) -> Iterator[Any]:
    """`collate_fn`, then each collator it wraps (transformers' `RemoveColumnsCollator` keeps the wrapped one in
    `.data_collator`); the one walk of that chain."""
    seen = set()
    while collate_fn is not None and id(collate_fn) not in seen:
        seen.add(id(collate_fn))
        yield collate_fn
        collate_fn = getattr(collate_fn, "data_collator", None)


def _random_reason(collator: Any) -> str | None:
    """Why `collator` (or a collator it wraps) draws random numbers (MLM / PLM masking); None when it is
    deterministic as far as we can tell."""
    for layer in collator_chain(collator):
        name = type(layer).__name__
        if getattr(layer, "mlm", False):
            return f"{name}(mlm=True) masks tokens at random"
        if not hasattr(layer, "mlm") and getattr(layer, "mlm_probability", None):
            return f"{name}(mlm_probability={layer.mlm_probability}) masks tokens at random"
        if getattr(layer, "plm_probability", None):
            return f"{name} samples permutation masks at random"
    return None


def _row_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, s], ...] for a [B, S, ...] tensor and a [B, S] index."""
    return x.gather(1, index.view(index.shape + (1,) * (x.dim() - 2)).expand(x.shape))


def _roll_left(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Roll each row b of a [B, S, ...] tensor left by shift[b] (left padding -> right padding; negative undoes)."""
    idx = torch.arange(x.shape[1], device=x.device)
    return _row_gather(x, (idx + shift.to(x.device)[:, None]) % x.shape[1])


@dataclass(frozen=True)
class UnshardedRows:
    """The base collator's batch as the plain run would see it, for what must report on whole rows (eval metrics,
    token counts). Rides in the batch under `UNSHARDED_KEY` when the collator has `keep_unsharded=True`."""

    seq_len: int  # S of the base batch
    padded_len: int  # S_pad: S padded to the layout's multiple
    left_pad: torch.Tensor  # [B] leading pad tokens of each row, rolled to the right by the collator
    labels: torch.Tensor | None  # [B, S] the base batch's own labels (None: it had none)
    attention_mask_sum: int | None  # real tokens by the base batch's attention_mask (None: it had none)
    input_ids: torch.Tensor | None = None  # [B, S] the base batch's own input_ids (padding ids included)

    def arrange(self, x: torch.Tensor, fill) -> torch.Tensor:
        """[B, S, ...] in the base batch's order -> [B, S_pad, ...] in the collator's order (before sharding)."""
        x = _roll_left(x, self.left_pad) if self.left_pad.any() else x
        return torch.cat([x, x.new_full((x.shape[0], self.padded_len - self.seq_len) + x.shape[2:], fill)], 1)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `arrange`: [B, S_pad, ...] (gathered from the shards) -> [B, S, ...] in the base order."""
        x = x[:, : self.seq_len]
        return _roll_left(x, -self.left_pad) if self.left_pad.any() else x


def _starts_to_positions(starts: torch.Tensor) -> torch.Tensor:
    """[B, S] bool document starts -> positions counting 0, 1, ... from each start."""
    idx = torch.arange(starts.shape[1]).expand_as(starts)
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


class SequenceShardingCollator:
    """`collator(features)` -> this SP rank's shard of `base_collator(features)` (a plain dict of tensors).

    Output keys (each [B, S_pad / sp_size], this rank's shard, `S_pad` = S padded to the layout's multiple):
    `input_ids`; `shift_labels` (labels shifted on the full sequence, -100 at padding and at every document's
    last token; with tp_size > 1 only this TP rank's contiguous 1/tp_size piece of the shard, whose loss it computes);
    `labels` (the same tensor, so a Trainer counting `labels` counts each target once); global
    `position_ids` (restarting at 0 per packed document); any other [B, S] tensor of the batch. Plus
    `seqpar_cu_seqlens`: a `DocumentOffsets`, per row the document offsets into the FULL padded row (0 ... S_pad),
    held on the host (Trainer and accelerate do not move it, so attention reads it without a device sync); the
    padding of each row is a document of its own. And `seqpar_real_tokens`:
    bool [B, S_pad / sp_size], this rank's tokens that are not padding (what attention_mask said).
    Dropped: `attention_mask`, `cu_seq_lens_q/k`, `max_length_q/k`, `seq_idx`. Other entries pass through unchanged.

    Collators that draw random numbers (MLM masking) are refused: every SP rank would mask differently. Pass
    `allow_random=True` only if you guarantee identical RNG state on every rank of an SP group.
    `keep_unsharded=True` adds `seqpar_unsharded`: an `UnshardedRows` record of the base batch (length, left
    padding, its own labels, token count), which is no model input: pop it before the forward.
    """

    def __init__(
        self,
        base_collator: Callable[[list[Any]], Mapping[str, Any]],
        *,
        config: SeqParConfig,
        groups: SeqParGroups,
        pad_token_id: int = 0,
        allow_random: bool = False,
        keep_unsharded: bool = False,
    ) -> None:
        if (config.sp_size, config.tp_size) != (groups.sp_size, groups.tp_size):
            raise ValueError(
                f"hf_seqpar: config has sp_size={config.sp_size}, tp_size={config.tp_size} but the groups have "
                f"sp_size={groups.sp_size}, tp_size={groups.tp_size}"
            )
        reason = None if allow_random else _random_reason(base_collator)
        if reason is not None:
            raise ValueError(
                f"hf_seqpar: {reason}; every rank of a sequence-parallel group must draw the same masks for the "
                "same sample. "
                "Mask in the dataset (before collation), or pass allow_random=True if you guarantee the same RNG "
                "state on every SP rank"
            )
        self.base_collator = base_collator
        self.config = config
        self.groups = groups
        self.pad_token_id = pad_token_id
        self.keep_unsharded = keep_unsharded
        # tp_size > 1: each TP rank's piece of the shard must be whole tokens
        self.multiple = layout.required_multiple(config.sp_size, config.resolved_layout) * config.tp_size

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        batch = dict(self.base_collator(features))
        input_ids = batch.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"hf_seqpar: the base collator must return input_ids as a [batch, seq] tensor; got {got}")
        b, s = input_ids.shape
        for key in _SEQUENCE_KEYS:
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and (value.dim() < 2 or tuple(value.shape[:2]) != (b, s)):
                raise ValueError(
                    f"hf_seqpar: {key} has shape {tuple(value.shape)} but input_ids is [{b}, {s}]; every sequence "
                    "tensor must "
                    "be [batch, seq] with the same length (encoder-decoder labels and 3-D M-RoPE position_ids are "
                    "not supported)"
                )
        seq_keys = [
            k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == (b, s)
        ]
        idx = torch.arange(s).expand(b, s)
        base_labels, base_input_ids = batch.get("labels"), input_ids

        pad = torch.zeros(b, s, dtype=torch.bool)
        lead, mask_sum = torch.zeros(b, dtype=torch.long), None
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            real = batch["attention_mask"] != 0
            lead = (real.cumsum(1) == 0).sum(1)  # leading pad tokens of each row (left padding)
            n_real = real.sum(1)
            contiguous = real == ((idx >= lead[:, None]) & (idx < (lead + n_real)[:, None]))
            if not contiguous.all():
                row = int((~contiguous).any(1).nonzero()[0])
                raise ValueError(
                    f"hf_seqpar: attention_mask row {row} has padding between real tokens "
                    f"({real[row].int().tolist()}); only "
                    "left or right padding can be sharded"
                )
            if lead.any():  # left padding -> right padding: roll each row left by its pad count
                for key in seq_keys:
                    batch[key] = _roll_left(batch[key], lead)
            pad = idx >= n_real[:, None]
            mask_sum = int(n_real.sum())

        labels = batch.get("labels", batch["input_ids"]).masked_fill(pad, IGNORE_INDEX)
        if "shift_labels" in batch:
            shift_labels = batch["shift_labels"].masked_fill(pad, IGNORE_INDEX)
        else:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]

        if isinstance(batch.get("position_ids"), torch.Tensor):
            position_ids = batch["position_ids"].long()
        elif isinstance(batch.get("seq_idx"), torch.Tensor):
            seq_idx = batch["seq_idx"]
            position_ids = _starts_to_positions(F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True))
        elif isinstance(batch.get("cu_seq_lens_q"), torch.Tensor | list):
            starts = torch.zeros(b * s, dtype=torch.bool)  # offsets into the flattened (row-major) batch
            starts[[int(c) for c in batch["cu_seq_lens_q"] if int(c) < b * s]] = True
            position_ids = _starts_to_positions(starts.view(b, s) | (idx == 0))
        else:
            position_ids = idx.clone()

        # Pad to the layout's multiple; the padding joins each row's pad region, one trailing document per row.
        s_pad = max(self.multiple, -(-s // self.multiple) * self.multiple)
        extra = s_pad - s
        fill = {"labels": IGNORE_INDEX, "shift_labels": IGNORE_INDEX}
        for key in seq_keys:
            value = batch[key]
            batch[key] = torch.cat([value, value.new_full((b, extra) + value.shape[2:], fill.get(key, 0))], 1)
        shift_labels = F.pad(shift_labels, (0, extra), value=IGNORE_INDEX)
        pad = F.pad(pad, (0, extra), value=True)
        # Padding tokens are a document nobody attends to and nothing predicts: give them a real token's id, not the
        # pad id, whose zero embedding (padding_idx) turns some models' norm gradients into NaN (Gemma3n).
        batch["input_ids"] = torch.where(pad, batch["input_ids"][:, :1], batch["input_ids"])
        idx = torch.arange(s_pad).expand(b, s_pad)
        pad_start = (~pad).sum(1, keepdim=True)
        position_ids = torch.where(pad, idx - pad_start, F.pad(position_ids, (0, extra)))

        # transformers' rule (find_packed_sequence_indices): a document starts where positions do not count up by 1.
        starts = F.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (1, 0), value=True) | (idx == pad_start)
        # A document's last token must not predict the next document's first token.
        shift_labels = shift_labels.masked_fill(F.pad(starts[:, 1:], (0, 1), value=True), IGNORE_INDEX)
        k = int(starts.sum(1).max()) + 1
        cu_seqlens = torch.full((b, k), s_pad, dtype=torch.int32)
        for row in range(b):
            offsets = starts[row].nonzero().view(-1)
            cu_seqlens[row, : len(offsets)] = offsets.to(torch.int32)

        batch.update(shift_labels=shift_labels, position_ids=position_ids)
        for key in _DROPPED:
            batch.pop(key, None)
        placement = layout.Placement.build(s_pad, self.groups.sp_size, self.config.resolved_layout)
        for key in {*seq_keys, "shift_labels", "position_ids"}.difference(_DROPPED, ["labels"]):
            batch[key] = layout.shard(batch[key], placement, self.groups.sp_rank, dim=1)
        if self.groups.tp_size > 1:  # the model computes the loss of this TP rank's piece only (tensor_parallel.py)
            batch["shift_labels"] = tp_piece(batch["shift_labels"], self.groups)
        batch["labels"] = batch["shift_labels"]  # a Trainer counting `labels` then counts each target once
        batch["seqpar_cu_seqlens"] = DocumentOffsets.from_padded(cu_seqlens)  # stays on the host: no sync to read it
        batch["seqpar_real_tokens"] = layout.shard(~pad, placement, self.groups.sp_rank, dim=1)  # MoE router stats
        if self.keep_unsharded:
            batch[UNSHARDED_KEY] = UnshardedRows(s, s_pad, lead, base_labels, mask_sum, base_input_ids)
        return batch
