"""The loss under SP. Token-weighted loss across the SP group (eval, logging): every valid target counted once, shards
without targets contribute nothing (never NaN). `LossCountCheck`: a model whose loss ignores the global
`num_items_in_batch` is refused at its first sharded forward."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from .patches import del_attr, read, set_attr


def token_weighted_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor, *, group=None) -> torch.Tensor:
    """sum over the group of `loss_sum` / sum of `num_tokens`; 0 when the group has no valid target at all.

    `loss_sum` is this rank's summed token loss (e.g. `model(**batch, num_items_in_batch=1).loss`), `num_tokens`
    its count of targets != -100 (`(batch["shift_labels"] != -100).sum()`). Not differentiable: for reporting.
    """
    totals = torch.stack([loss_sum.detach().double(), num_tokens.detach().double().to(loss_sum.device)])
    if group is not None or (dist.is_available() and dist.is_initialized()):
        dist.all_reduce(totals, group=group)
    return (totals[0] / totals[1].clamp(min=1)).to(loss_sum.dtype)


# ---- does the model's loss take the global count? -----------------------------------------------------------------


class LossCountCheck:
    """Whether a model's loss divides by the `num_items_in_batch` it is given, decided from what its forward does.

    Under SP that count is the whole batch's (DESIGN.md, "Loss and gradients"); a forward that averages over the
    targets it was given instead divides each rank's shard by its own count. So a sharded forward given labels and
    the count is watched: the called model (and any PreTrainedModel inside it called with labels too) gets, for that
    call, a `loss_function` that notes the count it receives (`counting`; PATCHES 'PreTrainedModel.loss_function').
    A forward that returned a loss while its loss functions did not all receive that count is refused from the
    forward itself, before any gradient is taken. Not judged: forwards whose loss hf_seqpar computes (`own_loss`:
    chunked_loss; TRL's fused head: `fused_lm_head`), forwards that failed or returned no loss. The first forward
    that passes ends the watch (the model's code path does not change between steps)."""

    def __init__(self) -> None:
        self.passed = False
        self._depth: int | None = None  # nesting depth of the watched forward (None: nothing watched now)
        self._given = None  # its num_items_in_batch
        self._saved: list = []  # (model, its own loss function or None)
        self._calls: list = []  # the count each loss-function call received (None: none)

    def enter(self, model, kwargs: dict, depth: int) -> None:
        """Forward pre-hook of a sharded forward of `model` (a PreTrainedModel), `depth` its nesting."""
        if self.passed or kwargs.get("fused_lm_head") or kwargs.get("num_items_in_batch") is None:
            return
        # Inside a watched forward, only models given `labels` themselves: decoders that get shift_labels and the
        # count passed along in **kwargs compute no loss (and reading their loss_function logs a warning).
        targets = ("labels",) if self._depth is not None else ("labels", "shift_labels")
        if all(kwargs.get(k) is None for k in targets) or any(m is model for m, _ in self._saved):
            return
        if self._depth is None:
            self._depth, self._given, self._calls = depth, kwargs["num_items_in_batch"], []
        self._saved.append((model, read(model, "PreTrainedModel._loss_function", None)))
        set_attr(model, "PreTrainedModel.loss_function", counting(model.loss_function, self._calls))

    def leave(self, model, output, depth: int, own_loss: bool) -> None:
        """Take the watch off (at the depth that put it on); then the verdict, which may raise."""
        if depth != self._depth:
            return
        self._depth = None
        for module, own in reversed(self._saved):
            if own is None:
                del_attr(module, "PreTrainedModel._loss_function")
            else:
                set_attr(module, "PreTrainedModel.loss_function", own)
        self._saved = []
        if output is None or _loss_of(output) is None or (own_loss and not self._calls):
            return
        wrong = [c for c in self._calls if c is None or not _same_count(c, self._given)]
        if self._calls and not wrong:
            self.passed = True
            return
        what = f"received num_items_in_batch={_count_text(wrong[0])}" if self._calls else "was never called"
        raise NotImplementedError(
            f"hf_seqpar: {type(model).__name__}.forward computes its own mean loss and never sees num_items_in_batch, "
            "so under sequence parallelism each rank would average its own shard; this family is not supported "
            f"(found in the first sharded forward given labels and num_items_in_batch={_count_text(self._given)}: "
            f"its loss_function {what})"
        )


def counting(loss_function, calls: list):
    """`loss_function`, noting in `calls` the num_items_in_batch each call receives (by name or position)."""

    def counted(*args, **kwargs):
        count = kwargs.get("num_items_in_batch")
        if count is None:
            try:
                count = inspect.signature(loss_function).bind(*args, **kwargs).arguments.get("num_items_in_batch")
            except (TypeError, ValueError):  # not bindable: a count passed only by name was looked at above
                count = None
        calls.append(count)
        return loss_function(*args, **kwargs)

    return counted


def _loss_of(output):
    """A forward's loss: a ModelOutput's `loss`, or the scalar first element of a return_dict=False tuple."""
    if isinstance(output, dict):
        return output.get("loss")
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]) and output[0].dim() == 0:
        return output[0]
    return None


def _same_count(got, given) -> bool:
    """One host read of two scalars (this check runs once)."""
    return got is given or float(torch.as_tensor(got).detach().cpu()) == float(torch.as_tensor(given).detach().cpu())


def _count_text(count) -> str:
    return "None" if count is None else f"{float(torch.as_tensor(count).detach().cpu()):g}"
