"""Dropout under sequence parallelism: inside a sharded training forward each SP rank draws its own masks.

Every rank of an SP group starts from the same RNG state (the Trainer seeds every process alike). Left alone, the
dropout mask of one rank's shard would repeat, element for element, on every other shard of the same sequence,
where a plain run draws every position's mask independently. So the outermost sharded forward in training mode
forks the generators, and its end joins them again:

1. save the common states: the CPU generator's and, when one is in use, the current accelerator device's;
2. seed those generators with `fork_seed(common state, sp_rank)`: a different stream per SP rank, deterministic
   given the training seed, and a function of the RNG state alone (a run resumed with its saved RNG states draws
   what the uninterrupted run drew). Nothing is drawn from the common stream to fork;
3. after the forward, on error too, restore the states saved in 1. If the forward drew from the fork (dropout is
   on), the common CPU stream then advances by one draw, alike on every SP rank, so the next step forks anew; if it
   drew nothing (dropout 0), the common state is exactly the plain run's. The next step, the data sampler,
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


def fork_seed(states: tuple, sp_rank: int) -> int:
    """The seed of SP rank `sp_rank`'s stream, from the common generator states every SP rank holds (a hash: nearby
    states give unrelated seeds)."""
    digest = hashlib.blake2b(f"hf_seqpar-dropout:{sp_rank}:".encode(), digest_size=8)
    for state in states:
        if state is not None:
            digest.update(state.cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> (64 - _SEED_BITS)


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
        self._saved: list = []  # per entered forward: None, or (common states, device module, forked states)
        self._forked = False  # inside a forward that forked

    def enter(self, fork: bool) -> None:
        if not fork or self.sp_size == 1 or self._forked:
            self._saved.append(None)
            return
        device = self.device_rng()
        common = self._states(device)
        seed = fork_seed(common, self.sp_rank)
        torch.default_generator.manual_seed(seed)  # the CPU alone: torch.manual_seed would seed every CUDA device
        if device is not None:
            device.manual_seed(seed)
        self._saved.append((common, device, self._states(device)))
        self._forked = True

    @staticmethod
    def _states(device) -> tuple:
        return torch.get_rng_state(), device.get_rng_state() if device is not None else None

    def leave(self) -> None:
        saved = self._saved.pop()
        if saved is None:
            return
        (cpu_state, device_state), device, forked = saved
        drew = any(a is not None and not torch.equal(a, b) for a, b in zip(forked, self._states(device), strict=True))
        torch.set_rng_state(cpu_state)
        if device is not None:
            device.set_rng_state(device_state)
        if drew:  # dropout drew from the fork: move the common stream on, alike on every SP rank
            draw_common()
        self._forked = False
