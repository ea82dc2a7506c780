"""SequenceShardingCollator: every rank emulated in one process, unsharded and compared with plain references.

The reference is written by hand from documents (tokens, labels): positions restart per document, each document's
shifted labels are labels[1:] + [-100], and the row is padded to the layout's multiple by one pad document.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForPermutationLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedTokenizerFast,
)
from transformers.trainer_utils import RemoveColumnsCollator
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator

from hf_seqpar import SeqParConfig, SeqParGroups, layout
from hf_seqpar.integrations import SequenceShardingCollator
from hf_seqpar.kernels import DocumentOffsets

CONFIGS = {
    "ring-zigzag-2": SeqParConfig(sp_size=2, mode="ring"),
    "ring-zigzag-4": SeqParConfig(sp_size=4, mode="ring"),
    "ulysses-contiguous-2": SeqParConfig(sp_size=2, mode="ulysses"),
    "usp-2x2": SeqParConfig(sp_size=4, mode="usp", ulysses_size=2),
}
SEQ_KEYS = ("input_ids", "labels", "shift_labels", "position_ids")
DOCS = [[4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [19, 20]]  # 17 tokens: crosses shards


def _tokenizer(padding_side: str) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "[MASK]": 3, **{f"w{i}": i for i in range(4, 40)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]", mask_token="[MASK]"
    )
    tok.padding_side = padding_side
    return tok


def _groups(rank: int, size: int) -> SeqParGroups:
    return SeqParGroups(sp_group=None, sp_rank=rank, sp_size=size, dp_group=None, dp_rank=0, dp_size=1)


def _padded_len(n: int, cfg: SeqParConfig) -> int:
    m = {"zigzag": 2 * cfg.sp_size, "contiguous": cfg.sp_size}[cfg.resolved_layout]
    return -(-n // m) * m


def _reference(rows, s_pad: int, pad_id: int = 0) -> dict[str, torch.Tensor | list]:
    """rows: per row a list of documents (tokens, labels). Plain python loops, no shared code with the collator."""
    out = {"input_ids": [], "shift_labels": [], "position_ids": [], "cu_seqlens": []}
    for docs in rows:
        ids, shift, pos, offsets = [], [], [], []
        for tokens, labels in docs:
            offsets.append(len(ids))
            ids += tokens
            shift += list(labels[1:]) + [-100]
            pos += list(range(len(tokens)))
        if len(ids) < s_pad:  # the padding is one document of its own
            offsets.append(len(ids))
            pos += list(range(s_pad - len(ids)))
            shift += [-100] * (s_pad - len(ids))
            ids += [ids[0]] * (s_pad - len(ids))  # padding takes the row's first token (not the pad id)
        for key, value in (("input_ids", ids), ("shift_labels", shift), ("position_ids", pos)):
            out[key].append(value)
        out["cu_seqlens"].append(offsets + [s_pad])
    width = max(len(o) for o in out["cu_seqlens"])
    out["cu_seqlens"] = [o + [s_pad] * (width - len(o)) for o in out["cu_seqlens"]]
    return {k: torch.tensor(v) for k, v in out.items()}


def _all_ranks(base, features, cfg: SeqParConfig, **kwargs) -> tuple[dict, list[dict]]:
    """Run the collator as every rank of the SP group; return the unsharded batch and the per-rank batches."""
    shards = [
        SequenceShardingCollator(base, config=cfg, groups=_groups(r, cfg.sp_size), **kwargs)(features)
        for r in range(cfg.sp_size)
    ]
    keys = set(shards[0])
    assert all(set(s) == keys for s in shards)
    assert {"input_ids", "labels", "shift_labels", "position_ids", "seqpar_cu_seqlens"} <= keys
    assert not keys & {"attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
    for s in shards:
        assert torch.equal(s["labels"], s["shift_labels"])
        assert isinstance(s["seqpar_cu_seqlens"], DocumentOffsets)  # host-side: attention reads it with no sync
        assert s["seqpar_cu_seqlens"] == shards[0]["seqpar_cu_seqlens"]
    s_pad = shards[0]["input_ids"].shape[1] * cfg.sp_size
    placement = layout.Placement.build(s_pad, cfg.sp_size, cfg.resolved_layout)
    tensors = [k for k in keys if k != "seqpar_cu_seqlens" and isinstance(shards[0][k], torch.Tensor)]
    full = {k: layout.unshard([s[k] for s in shards], placement, dim=1) for k in tensors}
    rows = shards[0]["seqpar_cu_seqlens"].rows  # back to the padded [B, K] form the references are written in
    width = max(len(r) for r in rows)
    full["cu_seqlens"] = torch.tensor([list(r) + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.int32)
    return full, shards


def _check(full, ref, shards, base_count: int | None = None) -> None:
    for key in ("input_ids", "shift_labels", "position_ids", "cu_seqlens"):
        assert torch.equal(full[key], ref[key]), f"{key}: {full[key].tolist()} != {ref[key].tolist()}"
    ref_count = int((ref["shift_labels"] != -100).sum())
    assert sum(int((s["labels"] != -100).sum()) for s in shards) == ref_count  # each target counted once
    if base_count is not None:  # ... and that is what the Trainer counts without sequence parallelism
        assert ref_count == base_count


def _nonparallel_count(base, features) -> int:
    return int((base(features)["labels"][..., 1:] != -100).sum())


@pytest.fixture(params=list(CONFIGS))
def cfg(request) -> SeqParConfig:
    return CONFIGS[request.param]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causal_lm_collator(cfg, padding_side):
    tok = _tokenizer(padding_side)
    features = [tok(" ".join(f"w{t}" for t in doc)) for doc in (DOCS[0], DOCS[3], DOCS[2])]
    base = DataCollatorForLanguageModeling(tok, mlm=False)
    full, shards = _all_ranks(base, features, cfg)
    ref = _reference([[(d, d)] for d in (DOCS[0], DOCS[3], DOCS[2])], _padded_len(9, cfg))
    # Left padding is rolled to right padding, so both sides give the right-padded reference. (Without sequence
    # parallelism a left-padded row has one extra target: the last pad token "predicts" the first real token.)
    _check(full, ref, shards, _nonparallel_count(base, features) if padding_side == "right" else None)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_seq2seq_collator(cfg, padding_side):
    tok = _tokenizer(padding_side)
    labels = [[-100, -100, 6, 7, 8], [-100, 20], [-100] * 4 + DOCS[2][4:]]
    features = [
        {"input_ids": d, "attention_mask": [1] * len(d), "labels": lab}
        for d, lab in zip((DOCS[0], DOCS[3], DOCS[2]), labels, strict=True)
    ]
    base = DataCollatorForSeq2Seq(tok)
    full, shards = _all_ranks(base, features, cfg)
    ref = _reference(
        [[(d, lab)] for d, lab in zip((DOCS[0], DOCS[3], DOCS[2]), labels, strict=True)], _padded_len(9, cfg)
    )
    _check(full, ref, shards, _nonparallel_count(base, features) if padding_side == "right" else None)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"return_flash_attn_kwargs": True, "return_seq_idx": True},
        {"return_position_ids": False, "return_seq_idx": True},
        {"return_position_ids": False, "return_flash_attn_kwargs": True},
    ],
    ids=["positions", "positions+fa+seq_idx", "seq_idx-only", "cu_seq_lens-only"],
)
def test_flattening_collator(cfg, options):
    features = [{"input_ids": d} for d in DOCS]
    base = DataCollatorWithFlattening(**options)
    full, shards = _all_ranks(base, features, cfg)
    ref = _reference([[(d, d) for d in DOCS]], _padded_len(17, cfg))
    _check(full, ref, shards, _nonparallel_count(base, features))


@pytest.mark.parametrize("return_position_ids", [False, True])
def test_trl_padded_collator(cfg, return_position_ids):
    features = [{"input_ids": d} for d in (DOCS[0], DOCS[3], DOCS[2])]
    base = TRLCollator(pad_token_id=0, return_position_ids=return_position_ids)
    full, shards = _all_ranks(base, features, cfg)
    ref = _reference([[(d, d)] for d in (DOCS[0], DOCS[3], DOCS[2])], _padded_len(9, cfg))
    _check(full, ref, shards, _nonparallel_count(base, features))


def test_trl_padding_free_collator(cfg):
    features = [{"input_ids": d, "labels": [-100] + d[1:]} for d in DOCS]
    base = TRLCollator(pad_token_id=0, padding_free=True)
    full, shards = _all_ranks(base, features, cfg)
    _check(
        full, _reference([[(d, d) for d in DOCS]], _padded_len(17, cfg)), shards, _nonparallel_count(base, features)
    )


def test_trl_packed_seq_lengths_with_pad_to_multiple(cfg):
    # Two packed rows (seq_lengths) padded by TRL to a multiple of 3: TRL pads position_ids with 0, so by the
    # transformers rule each of its pad tokens is a one-token document (label -100); our padding follows.
    features = [
        {"input_ids": DOCS[0] + DOCS[1], "seq_lengths": [5, 1]},
        {"input_ids": DOCS[3] + DOCS[2][:3], "seq_lengths": [2, 3]},
    ]
    base = TRLCollator(pad_token_id=0, padding_free=True, pad_to_multiple_of=3)
    full, shards = _all_ranks(base, features, cfg)
    trl_pad = ([0], [-100])
    docs = [(DOCS[0], DOCS[0]), (DOCS[1], DOCS[1]), (DOCS[3], DOCS[3]), (DOCS[2][:3], DOCS[2][:3]), trl_pad]
    _check(full, _reference([docs], _padded_len(12, cfg)), shards, _nonparallel_count(base, features))


def test_plain_function_with_extra_sequence_tensor(cfg):
    def collate(features):  # packed, no labels, an extra [B, S] tensor
        ids = [t for f in features for t in f]
        pos = [p for f in features for p in range(len(f))]
        return {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([pos]),
            "token_type_ids": torch.ones(1, len(ids), dtype=torch.long),
            "meta": "kept",
        }

    full, shards = _all_ranks(collate, DOCS, cfg)
    s_pad = _padded_len(17, cfg)
    _check(full, _reference([[(d, d) for d in DOCS]], s_pad), shards)
    assert torch.equal(full["token_type_ids"], torch.tensor([[1] * 17 + [0] * (s_pad - 17)]))
    assert all(s["meta"] == "kept" for s in shards)


def test_pads_to_the_layout_multiple():
    cfg = CONFIGS["ring-zigzag-2"]
    doc = list(range(4, 17))  # 13 tokens -> 16
    full, shards = _all_ranks(lambda f: {"input_ids": torch.tensor(f)}, [doc], cfg)
    assert [s["input_ids"].shape for s in shards] == [torch.Size([1, 8])] * 2
    _check(full, _reference([[(doc, doc)]], 16), shards)
    assert full["cu_seqlens"].tolist() == [[0, 13, 16]]


def test_sp_size_one_keeps_keys_and_values():
    cfg = SeqParConfig(sp_size=1)
    features = [{"input_ids": d} for d in DOCS]
    full, shards = _all_ranks(DataCollatorWithFlattening(), features, cfg)
    _check(full, _reference([[(d, d) for d in DOCS]], 17), shards)
    assert full["cu_seqlens"].tolist() == [[0, 5, 6, 15, 17]]


def test_random_collators_refused():
    tok = _tokenizer("right")
    groups = _groups(0, 2)
    cfg = CONFIGS["ring-zigzag-2"]
    for base in (
        DataCollatorForLanguageModeling(tok, mlm=True),
        DataCollatorForPermutationLanguageModeling(tok),
        RemoveColumnsCollator(DataCollatorForLanguageModeling(tok), ["input_ids"]),
    ):
        with pytest.raises(ValueError, match="same masks"):
            SequenceShardingCollator(base, config=cfg, groups=groups)
    SequenceShardingCollator(DataCollatorForLanguageModeling(tok), config=cfg, groups=groups, allow_random=True)


def test_bad_batches_refused():
    cfg = CONFIGS["ring-zigzag-2"]

    def shards(batch):
        return SequenceShardingCollator(lambda f: batch, config=cfg, groups=_groups(0, 2))([])

    with pytest.raises(ValueError, match=r"labels has shape \(1, 3\) but input_ids is \[1, 5\]"):
        shards({"input_ids": torch.ones(1, 5, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="padding between real tokens"):
        shards({"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 0, 1, 0]])})
    with pytest.raises(ValueError, match="sp_size=4"):
        SequenceShardingCollator(lambda f: f, config=CONFIGS["ring-zigzag-4"], groups=_groups(0, 2))
