"""What the demo prints and draws: the two loss curves side by side, memory per rank, the PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path

STARTUP = re.compile(r"(\d+) tokens per rank \((\d+) x (\d+) of (\d+)\)")


def loss_curve(log_file: Path) -> dict[int, dict]:
    """step -> {"loss", "grad_norm"} from a Trainer log history."""
    rows = json.loads(Path(log_file).read_text())
    return {row["step"]: {k: row[k] for k in ("loss", "grad_norm")} for row in rows if "loss" in row}


def worst_relative_difference(sp: dict[int, dict], plain: dict[int, dict], first: int | None = None):
    """(max |sp - plain| / |plain| over the loss and grad_norm of the first `first` steps (all: None), step, key)."""
    if sorted(sp) != sorted(plain):
        raise ValueError(f"hf_seqpar: the runs logged different steps: SP {sorted(sp)} vs plain {sorted(plain)}")
    worst = (0.0, 0, "loss")
    for step in sorted(plain)[:first]:
        for key in ("loss", "grad_norm"):
            diff = abs(sp[step][key] - plain[step][key]) / max(abs(plain[step][key]), 1e-12)
            worst = max(worst, (diff, step, key))
    return worst


def loss_table(sp: dict[int, dict], plain: dict[int, dict], rows: int = 10) -> str:
    """The first step, then every 1, 2, 5, 10, 20, 50, ... steps: about `rows` rows, the last step included."""
    steps = sorted(plain)
    stride = next(k * 10**e for e in range(9) for k in (1, 2, 5) if k * 10**e * rows >= len(steps))
    shown = sorted({steps[0], steps[-1], *(s for s in steps if s % stride == 0)})
    lines = ["   step   plain loss   SP=2 loss   rel. diff   plain grad_norm   SP=2 grad_norm"]
    for step in shown:
        p, s = plain[step], sp[step]
        diff = abs(s["loss"] - p["loss"]) / max(abs(p["loss"]), 1e-12)
        lines.append(
            f"  {step:>5}   {p['loss']:>10.5f}   {s['loss']:>9.5f}   {diff:>9.1e}"
            f"   {p['grad_norm']:>15.5f}   {s['grad_norm']:>14.5f}"
        )
    return "\n".join(lines)


def memory_records(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("memory_rank*.json"))]


def memory_table(plain: list[dict], sp: list[dict]) -> str:
    lines = ["  run          rank   at start   peak in training   growth in training"]
    for name, records in (("plain (1 x)", plain), ("SP=2", sp)):
        for r in records:
            lines.append(
                f"  {name:<12} {r['rank']:>4}   {r['start_mib']:>6.0f} MiB   {r['peak_mib']:>12.0f} MiB"
                f"   {r['peak_mib'] - r['start_mib']:>14.0f} MiB"
            )
    return "\n".join(lines)


def tokens_per_rank(stdout: str) -> tuple[int, int, int, int] | None:
    """(tokens per rank, batch, local length, full length) from hf_seqpar's startup line."""
    found = STARTUP.search(stdout)
    return tuple(int(g) for g in found.groups()) if found else None


def plot(path: Path, sp: dict, plain: dict, memory_plain: list[dict], memory_sp: list[dict], title: str) -> bool:
    """Loss curves (left) and memory per rank (right) as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    steps = sorted(plain)
    curves.plot(steps, [plain[s]["loss"] for s in steps], lw=3, alpha=0.45, label="plain, 1 process")
    curves.plot(steps, [sp[s]["loss"] for s in steps], "k--", lw=1, label="SP=2 (ring), 2 processes")
    curves.set(xlabel="step", ylabel="training loss (answer tokens)", title="LoRA fine-tune: the same loss curve")
    curves.legend()
    names = [f"plain\nrank {r['rank']}" for r in memory_plain] + [f"SP=2\nrank {r['rank']}" for r in memory_sp]
    records = memory_plain + memory_sp
    start = [r["start_mib"] for r in records]
    growth = [r["peak_mib"] - r["start_mib"] for r in records]
    bars.bar(names, start, color="0.8", label="resident at start")
    bars.bar(names, growth, bottom=start, color="tab:red", label="growth during training (peak)")
    for x, (base, extra) in enumerate(zip(start, growth, strict=True)):
        bars.text(x, base + extra, f"+{extra:.0f} MiB", ha="center", va="bottom")
    bars.set(ylabel="MiB", title="peak memory per rank", ylim=(0, 1.12 * max(r["peak_mib"] for r in records)))
    bars.legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
