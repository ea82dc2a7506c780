"""Dropout under sequence parallelism: inside a sharded training forward each SP rank draws its own masks.

Every rank of an SP group starts from the same RNG state (the Trainer seeds every process alike). Left alone, the
dropout mask of one rank's shard would repeat, element for element, on every other shard of the same sequence,
where a plain run draws every position's mask independently. So the outermost sharded forward in training mode
forks the generators, and its end joins them again:

1. draw one 64-bit number from the global CPU generator. All SP ranks hold the same state, so all draw the same
   number, and the common stream advances by the same step on every rank;
2. save the common states: the CPU generator's and, when one is in use, the current accelerator device's;
3. seed those generators with `fork_seed(number, sp_rank)`: a different stream per SP rank, deterministic given
   the training seed, and a function of the RNG state alone (a run resumed with its saved RNG states draws what
   the uninterrupted run drew);
4. after the forward, on error too, restore the states saved in 2: the CPU stream one draw further than before
   the forward, the accelerator's as it was (the forward drew from the fork). The next step, the data sampler,
   `generate` and anything else drawing from the global generators see the same state on every SP rank.

Unsharded forwards (`generate`, a prompt on one rank), eval-mode forwards and `sp_size=1` touch no generator, so
they draw exactly what the plain model draws. Different DP groups fork alike; they hold different data, as in a plain
data-parallel run. Gradient checkpointing (torch's, reentrant or not) saves the RNG state each checkpointed layer
saw in forward, the forked one, and replays it in the recompute: the recompute draws the forward's masks. Only the
current accelerator device forks: a model spread over several devices of one process would draw the other
devices' masks alike on every SP rank.

Masks are therefore drawn independently per position, with the plain run's distribution, but not the plain run's
numbers: with dropout on, SP and plain runs agree statistically (benchmarks/dropout_parity.py), not bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from types import ModuleType

import torch

_SEED_BITS = 63  # manual_seed takes any integer below 2**64; 63 bits keep the seed a non-negative int64 too


def draw_common() -> int:
    """One 64-bit number from the global CPU generator (the same on every rank that holds the same state)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


def fork_seed(common: int, sp_rank: int) -> int:
    """The seed of SP rank `sp_rank`'s stream, from the number all SP ranks drew (a hash: nearby inputs give
    unrelated seeds, and no rank's seed is another's common draw)."""
    digest = hashlib.blake2b(f"hf_seqpar-dropout:{common}:{sp_rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def accelerator_rng() -> ModuleType | None:
    """The RNG functions of the current accelerator (`torch.cuda`, `torch.xpu`, ...) when it is initialised, else
    None (a CPU run; initialising CUDA here would be a side effect). They act on the current device, as torch's
    checkpoint does."""
    accelerator = getattr(torch, "accelerator", None)
    device = accelerator.current_accelerator() if accelerator is not None else None
    if device is None:
        return None
    module = torch.get_device_module(device.type)
    initialised = getattr(module, "is_initialized", None)
    if initialised is not None and not initialised():
        return None
    if not all(hasattr(module, f) for f in ("get_rng_state", "set_rng_state", "manual_seed")):
        return None
    return module


class ShardedRng:
    """Fork and join the global generators around a model's sharded training forwards (see the module docstring).

    `enter(fork)` / `leave()` pair up with the model's forward pre / post hooks, nested calls included: only the
    outermost forward that asks for a fork forks, and its `leave` joins."""

    def __init__(self, sp_rank: int, sp_size: int, device_rng: Callable[[], ModuleType | None] = accelerator_rng):
        self.sp_rank, self.sp_size = sp_rank, sp_size
        self.device_rng = device_rng
        self._saved: list = []  # per entered forward: None, or (cpu state, device module, device state)
        self._forked = False  # inside a forward that forked

    def enter(self, fork: bool) -> None:
        if not fork or self.sp_size == 1 or self._forked:
            self._saved.append(None)
            return
        common = draw_common()  # advances the common CPU stream by one draw, alike on every SP rank
        device = self.device_rng()
        saved = (torch.get_rng_state(), device, device.get_rng_state() if device is not None else None)
        seed = fork_seed(common, self.sp_rank)
        torch.default_generator.manual_seed(seed)  # the CPU alone: torch.manual_seed would seed every CUDA device
        if device is not None:
            device.manual_seed(seed)
        self._saved.append(saved)
        self._forked = True

    def leave(self) -> None:
        saved = self._saved.pop()
        if saved is None:
            return
        cpu_state, device, device_state = saved
        torch.set_rng_state(cpu_state)
        if device is not None:
            device.set_rng_state(device_state)
        self._forked = False
