"""`make gpu-check`: the GPU tests, the attention-efficiency, memory, backend-table and training-step benchmarks on one
CUDA machine, each part within its time budget (unused time passes on to the next part), then ONE summary table.

On a CUDA machine (about 6 minutes on one H100 / H200, set-up included):
  setup       wheels from --wheels (`make gpu-wheels`) installed with pip --no-index --no-deps into --site, which goes
              first on every part's PYTHONPATH (the GPU image lacks the suite's transformers / accelerate / peft);
              then the versions every part will import
  tests       pytest -m gpu tests/gpu (kernels, simulated ranks, whole models across processes on the one GPU)
  efficiency  benchmarks/attention_efficiency.py --device cuda at 16K and 64K tokens, P = 4 and 8
  memory      benchmarks/memory.py --device cuda: Llama-3-8B's shape cut to 4 layers, 64K tokens, sp 1
  backends    benchmarks/backend_table.py --device cuda: every kernel backend per (dtype, mask), 32K tokens: the
              order backend='auto' should use (kernels/auto_table.py; `--write` there updates it)
  step        benchmarks/train_step.py --device cuda: one LoRA step of the 4-layer Llama-3-8B shape at 32K tokens,
              hf_seqpar sp=1 against plain transformers SDPA: tokens/s and MFU
Writes <out>/attention_efficiency_cuda.json, memory_cuda.json, backend_table_cuda.json, train_step_cuda.json and
gpu_check_cuda.json (the table, each failed test);
<out> is benchmarks/results by default; each part's output goes to <out>/gpu_check_logs/.

Without CUDA (or with --cpu) the same plan runs on CPU through the CUDA stand-in (HF_SEQPAR_CUDA_STANDIN=1: CPU
tensors take the CUDA dispatch, plans and op contracts, hf_seqpar/kernels/standin.py) at tiny sizes, writing
*_cpu_standin.json under out/gpu_check by default, and exits 0 when every part passed; tests/test_gpu_check.py runs
it so in the default suite.

Usage: python benchmarks/gpu_check.py [--out DIR] [--budget-s 340] [--wheels .whl] [--site DIR] [--cpu] [--quick]
       python benchmarks/gpu_check.py --pins    # the name==version list `make gpu-wheels` downloads
This file is also the tests part's pytest plugin (-p gpu_check): it logs each test's outcome as it happens, so a part
stopped at its budget still reports what it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
OUTCOMES_ENV = "HF_SEQPAR_GPU_CHECK_OUTCOMES"
# What the GPU image lacks or has at other versions (gpu_2026-12.md "How it was run"), at .venv's versions.
CARRIED = ("transformers", "accelerate", "peft", "huggingface_hub", "kernels", "httpx2", "httpcore2", "truststore",
           "click", "hf-xet", "tomlkit", "pytest", "pluggy", "iniconfig")  # fmt: skip
# seconds of the default 340 (6 minutes with the wheels' install and the machine's warm-up)
BUDGET_SHARES = {"setup": 25, "tests": 165, "efficiency": 50, "memory": 45, "backends": 20, "step": 35}


@dataclass
class Part:
    name: str
    argv: list[str]
    env: dict = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    budget: float = 0.0
    passed: int = 0
    failed: int = 0
    headline: str = ""
    failures: list = field(default_factory=list)


# ---- the plan -----------------------------------------------------------------------------------------------------


def plan(opts, cuda: bool, out: Path, tag: str) -> list[Part]:
    py = [sys.executable]
    standin = {} if cuda else {"HF_SEQPAR_CUDA_STANDIN": "1"}
    setup = Part("setup", py + [__file__, "--versions"])
    marker = "gpu" if cuda else "not gpu and not slow"
    tests = Part("tests", py + ["-m", "pytest", "-q", "-p", "gpu_check", "-m", marker, *opts.pytest_args], standin)
    eff_out, mem_out = out / f"attention_efficiency_{tag}.json", out / f"memory_{tag}.json"
    eff = [*py, str(BENCH / "attention_efficiency.py"), "--out", str(eff_out)]
    mem = [*py, str(BENCH / "memory.py"), "--out", str(mem_out), "--sp"]
    if cuda:
        eff += ["--device", "cuda", "--seqs", "16384,65536", "--worlds", "4,8", "--iters", "1", "--warmup", "1"]
        mem += ["1", "--device", "cuda", "--seq", "65536", "--layers", "4",
                "--configs", "ckpt+chunked_loss+tiled_mlp,ckpt+all", "--timeout", "120"]  # fmt: skip
    else:  # tiny: the stand-in computes exact math per sequence on 1 thread
        eff += ["--device", "cpu", "--seqs", "256", "--worlds", "2" if opts.quick else "2,4",
                "--modes", "ring,ulysses" if opts.quick else "ring,allgather,ulysses,usp", "--heads", "4",
                "--kv-heads", "2", "--head-dim", "16", "--dtype", "bfloat16", "--doc-mean", "32", "--iters", "1",
                "--warmup", "0"]  # fmt: skip
        mem += ["1" if opts.quick else "1,2", "--device", "cpu", "--seq", "256", "--layers", "1",
                "--configs", "ckpt+chunked_loss+tiled_mlp", "--timeout", "120"]  # fmt: skip
    backends = [*py, str(BENCH / "backend_table.py"), "--out", str(out / f"backend_table_{tag}.json")]
    step = [*py, str(BENCH / "train_step.py"), "--out", str(out / f"train_step_{tag}.json")]
    if cuda:  # auto's table re-measured (not written into the package: a person reads it and commits it)
        backends += ["--device", "cuda", "--seq", "32768"]
        step += ["--device", "cuda", "--seqs", "32768", "--steps", "2"]
    else:
        backends += ["--device", "cpu"]
        step += ["--device", "cpu", "--steps", "1"]
    parts = [setup, tests, Part("efficiency", eff, standin), Part("memory", mem, standin)]
    # --quick leaves out the backend table and the training step (tests/test_benchmarks.py runs both on CPU)
    return parts if opts.quick else [*parts, Part("backends", backends), Part("step", step, standin)]


# ---- running a part within its budget -----------------------------------------------------------------------------


def run_part(part: Part, env: dict, budget: float, log: Path) -> int | None:
    """Run `part.argv` in its own process group; after `budget` seconds SIGINT (pytest then prints its summary), 10 s
    later (or once it exits) SIGKILL the group. Returns the exit code, None when stopped at the budget."""
    part.budget = budget
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(part.argv, cwd=ROOT, env={**env, **part.env}, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=max(budget, 0.1))
        except subprocess.TimeoutExpired:
            code = None
            for sig, grace in ((signal.SIGINT, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            with contextlib.suppress(ProcessLookupError):  # the part's own children (rank workers) that outlived it
                os.killpg(proc.pid, signal.SIGKILL)
    part.seconds = time.monotonic() - start
    part.status = "ok" if code == 0 else ("over budget" if code is None else f"exit {code}")
    return code


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


# ---- reading each part's results ----------------------------------------------------------------------------------


def read_setup(part: Part, log: Path, installed: int) -> None:
    line = next((x for x in reversed(log.read_text().splitlines()) if x.startswith("VERSIONS ")), None)
    part.passed, part.failed = max(installed, 0), int(installed < 0)
    if installed < 0:
        part.headline = "pip install of the wheels failed (gpu_check_logs/wheels.log); "
    if line is None:
        part.failed = 1
        part.headline += "could not import torch"
        return
    versions = json.loads(line[len("VERSIONS ") :])
    part.headline += ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {max(installed, 0)} wheels installed"


def read_tests(part: Part, outcomes: Path) -> None:
    per_test: dict[str, str] = {}
    messages = {}
    for line in outcomes.read_text().splitlines() if outcomes.exists() else []:
        r = json.loads(line)
        if r["outcome"] == "failed":
            per_test[r["test"]] = "failed"
            messages.setdefault(r["test"], r["message"])
        elif per_test.get(r["test"]) != "failed":
            per_test[r["test"]] = r["outcome"]
    counts = {k: sum(v == k for v in per_test.values()) for k in ("passed", "failed", "skipped")}
    part.passed, part.failed = counts["passed"], counts["failed"]
    part.failures = [f"{t}: {messages[t]}" for t in per_test if per_test[t] == "failed"]
    part.headline = f"{counts['skipped']} skipped"
    if part.status == "ok" and not per_test:
        part.status = "ran no test"


def _results(part: Part, path: Path) -> dict | None:
    """A benchmark part's results file, or None with the part marked failed."""
    if not path.exists():
        part.failed, part.headline = 1, "no results file"
        return None
    return json.loads(path.read_text())


def read_efficiency(part: Part, path: Path) -> None:
    if (report := _results(part, path)) is None:
        return
    rows = report["results"]
    part.passed = len(rows)
    if not rows:
        return
    seq, world = max(r["seq"] for r in rows), max(r["world"] for r in rows)
    top = [r for r in rows if r["seq"] == seq and r["world"] == world]
    unpacked = " ".join(f"{r['mode']} {r['efficiency_fwd_bwd']:.2f}" for r in top if r["packing"] == "unpacked")
    packed = min((r for r in top if r["packing"] == "packed"), key=lambda r: r["efficiency_fwd_bwd"], default=None)
    first = next((r for r in top if r["packing"] == "unpacked"), top[0])
    part.headline = f"{seq:,} tok P={world} fwd+bwd vs {first.get('reference', 'one kernel')}: {unpacked}"
    part.headline += f"; packed worst {packed['efficiency_fwd_bwd']:.2f} ({packed['mode']})" if packed else ""
    if "kernel_efficiency" in first:  # hf_seqpar's own kernel on the whole sequence against the same reference
        part.headline += f"; sp=1 kernel {first['kernel_efficiency']:.2f}"


def read_memory(part: Part, path: Path) -> None:
    if (report := _results(part, path)) is None:
        return
    points = report["points"]
    good = [p for p in points if p["peak_bytes_max"] is not None]
    part.passed, part.failed = len(good), len(points) - len(good)
    part.failures = [f"sp={p['sp']} seq={p['seq']} {p['config']}: {p['error']}" for p in points if p not in good]
    seq = max((p["seq"] for p in good), default=0)
    part.headline = "; ".join(
        f"sp={p['sp']} {p['seq']:,} tok {p['config']}: {p['peak_bytes_max'] / 2**30:.2f} GiB "
        f"({p['peak_bytes_max'] / p['seq'] / 1000:,.0f} KB/tok)"
        for p in good
        if p["seq"] == seq
    )


def read_backends(part: Part, path: Path) -> None:
    if (report := _results(part, path)) is None:
        return
    rows = report["rows"]
    part.passed = len(rows)
    part.headline = "; ".join(
        f"{r['dtype']} {r['mask']}: " + " < ".join(f"{n} {r['seconds'][n] * 1e3:.1f} ms" for n in r["order"])
        for r in rows
    )


def read_step(part: Part, path: Path) -> None:
    if (report := _results(part, path)) is None:
        return
    rows = report["results"]
    part.passed = len(rows)
    by_seq: dict = {}
    for r in rows:
        by_seq.setdefault(r["seq"], {})[r["arm"]] = r
    part.headline = "; ".join(
        f"{seq:,} tok: "
        + ", ".join(f"{arm} {r['tokens_per_s']:,.0f} tok/s MFU {r['mfu']:.2f}" for arm, r in arms.items())
        for seq, arms in by_seq.items()
    )


READERS = {"efficiency": "attention_efficiency", "memory": "memory", "backends": "backend_table", "step": "train_step"}


# ---- the driver ---------------------------------------------------------------------------------------------------


def print_versions() -> int:
    """What the parts will import (the first of each on sys.path, so the installed wheels where they are)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = {"torch": f"{torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPUs)"}
    for name in ("transformers", "accelerate", "peft", "pytest"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "MISSING"
    print("VERSIONS " + json.dumps(found))
    return 0 if "MISSING" not in found.values() else 1


def install_wheels(wheels: Path | None, site: Path, env: dict, log: Path) -> int:
    """pip install --no-index --no-deps --target site every wheel in `wheels`: the number installed, -1 on failure."""
    found = sorted(wheels.glob("*.whl")) if wheels and wheels.is_dir() else []
    if not found:
        return 0
    shutil.rmtree(site, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
    with open(log, "w") as sink:
        done = subprocess.run(cmd + [str(w) for w in found], env=env, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        print(f"--- pip install of {len(found)} wheels failed:\n{_tail(log)}", flush=True)
        return -1
    return len(found)


def table(parts: list[Part], title: str) -> str:
    lines = [title, "| part | status | seconds / budget | passed | failed | headline |", "|---|---|---|---|---|---|"]
    for p in parts:
        lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} / {p.budget:.0f} | {p.passed} | {p.failed} | "
                     f"{p.headline} |")  # fmt: skip
    for p in parts:
        lines += [f"{p.name} FAILED {f}" for f in p.failures]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: see the docstring)")
    parser.add_argument("--budget-s", type=float, default=sum(BUDGET_SHARES.values()), help="seconds for all parts")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheels to install first ('' for none)")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "hf_seqpar_site")
    parser.add_argument("--cpu", action="store_true", help="the CPU stand-in plan even where CUDA is available")
    parser.add_argument("--quick", action="store_true", help="CPU plan only: the smallest benchmark grids")
    parser.add_argument("--pytest-args", default="tests/gpu", help="what pytest runs (split on spaces)")
    parser.add_argument("--pins", action="store_true", help="print CARRIED as name==version of this python, exit")
    parser.add_argument("--versions", action="store_true", help=argparse.SUPPRESS)  # the setup part's probe
    opts = parser.parse_args(argv)
    if opts.pins:
        from importlib.metadata import version

        print(" ".join(f"{name}=={version(name)}" for name in CARRIED))
        return 0
    if opts.versions:
        return print_versions()
    opts.pytest_args = opts.pytest_args.split()

    import torch

    cuda = torch.cuda.is_available() and not opts.cpu
    tag = "cuda" if cuda else "cpu_standin"
    out = opts.out or (BENCH / "results" if cuda else ROOT / "out" / "gpu_check")
    logs = out / "gpu_check_logs"
    logs.mkdir(parents=True, exist_ok=True)
    outcomes = logs / "tests_outcomes.jsonl"
    outcomes.unlink(missing_ok=True)
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "HF_SEQPAR_CUDA_STANDIN"}
    env[OUTCOMES_ENV] = str(outcomes)
    scale = opts.budget_s / sum(BUDGET_SHARES.values())
    parts = plan(opts, cuda, out, tag)
    installed = 0
    if opts.wheels and str(opts.wheels) not in ("", "."):
        installed = install_wheels(opts.wheels, opts.site, env, logs / "wheels.log")
    paths = ([str(opts.site)] if installed > 0 else []) + [str(ROOT), str(BENCH), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    spare = 0.0
    for part in parts:
        log = logs / f"{part.name}.log"
        budget = BUDGET_SHARES[part.name] * scale + spare
        if part.name == "setup":
            budget -= time.monotonic() - start  # the wheels came out of the set-up's budget
        print(f"gpu-check: {part.name} (budget {budget:.0f} s) ...", flush=True)
        run_part(part, env, budget, log)
        spare = max(budget - part.seconds, 0.0)
        if part.name == "setup":
            read_setup(part, log, installed)
        elif part.name == "tests":
            read_tests(part, outcomes)
        else:
            reader = {"efficiency": read_efficiency, "memory": read_memory, "backends": read_backends,
                      "step": read_step}[part.name]  # fmt: skip
            reader(part, out / f"{READERS[part.name]}_{tag}.json")
        if part.status != "ok" or part.failed:
            print(f"--- {part.name}: last lines of {log}\n{_tail(log)}", flush=True)
    machine = torch.cuda.get_device_name(0) if cuda else "CPU, CUDA stand-in"
    title = (f"gpu-check on {machine} (torch {torch.__version__}): {time.monotonic() - start:.0f} s of "
             f"{opts.budget_s:.0f} s")  # fmt: skip
    report = table(parts, title)
    summary = {"machine": machine, "torch": torch.__version__, "budget_s": opts.budget_s, "table": report,
               "parts": [vars(p) for p in parts]}  # fmt: skip
    (out / f"gpu_check_{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report, flush=True)
    return 0 if all(p.status == "ok" and not p.failed for p in parts) else 1


# ---- pytest plugin (the tests part runs pytest -p gpu_check) ------------------------------------------------------


def pytest_runtest_logreport(report) -> None:
    """One JSON line per test phase that decides its outcome: each failure or skip, and each passed call."""
    path = os.environ.get(OUTCOMES_ENV)
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        message = crash.message
    elif isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        message = report.longrepr[-1]
    else:
        message = str(report.longrepr or "")
    line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome, "message": message[:500]}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main())
