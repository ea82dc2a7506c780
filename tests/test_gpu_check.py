"""`make gpu-check`'s driver (benchmarks/gpu_check.py): its whole plan runs on CPU through the CUDA stand-in at the
smallest sizes, prints one summary table and writes its JSON files; a part past its budget is stopped and reported."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PARTS = ["setup", "tests", "efficiency", "memory"]


def _driver():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import gpu_check

    return gpu_check


def test_table_names_every_part_and_failure():
    # also the one test the plan's own pytest part runs below (a light module: no torch at import)
    gc = _driver()
    parts = [gc.Part(name, []) for name in PARTS]
    parts[1].failures = ["tests/gpu/x.py::test_a: boom"]
    text = gc.table(parts, "title")
    assert text.splitlines()[0] == "title"
    assert [line.split(" | ")[0][2:] for line in text.splitlines()[3:7]] == PARTS
    assert text.splitlines()[-1] == "tests FAILED tests/gpu/x.py::test_a: boom"


def test_a_part_past_its_budget_is_stopped(tmp_path):
    gc = _driver()
    part = gc.Part("tests", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    start = time.monotonic()
    assert gc.run_part(part, {}, 1.0, tmp_path / "log") is None
    assert part.status == "over budget" and time.monotonic() - start < 15  # SIGINT ends the sleep at once
    assert (tmp_path / "log").read_text().startswith("started")


def test_pytest_outcomes_are_counted_per_test(tmp_path):
    gc = _driver()
    lines = [("a", "call", "passed"), ("b", "setup", "skipped"), ("c", "call", "passed"), ("c", "teardown", "failed"),
             ("d", "call", "failed")]  # fmt: skip
    (tmp_path / "o.jsonl").write_text("".join(json.dumps(dict(test=t, when=w, outcome=o, message=f"{t} {w}")) + "\n"
                                              for t, w, o in lines))  # fmt: skip
    part = gc.Part("tests", [], status="ok")
    gc.read_tests(part, tmp_path / "o.jsonl")
    assert (part.passed, part.failed, part.headline) == (1, 2, "1 skipped")
    assert part.failures == ["c: c teardown", "d: d call"]


def test_cpu_plan_runs_end_to_end(tmp_path):
    # the CPU plan at its smallest (--quick); its pytest part runs one light test of this file
    light = "tests/test_gpu_check.py::test_table_names_every_part_and_failure"
    cmd = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--cpu", "--quick", "--wheels", "", "--budget-s", "200",
           "--out", str(tmp_path), "--pytest-args", light]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("gpu-check on CPU, CUDA stand-in") :].splitlines()
    assert [row.split(" | ")[:2] for row in table[3:7]] == [[f"| {p}", "ok"] for p in PARTS]

    summary = json.loads((tmp_path / "gpu_check_cpu_standin.json").read_text())
    parts = {p["name"]: p for p in summary["parts"]}
    assert summary["table"] == "\n".join(table)
    assert (parts["tests"]["passed"], parts["tests"]["failed"]) == (1, 0)
    assert "transformers" in parts["setup"]["headline"] and "P=2" in parts["efficiency"]["headline"]
    assert all(p["seconds"] <= p["budget"] for p in parts.values())

    efficiency = json.loads((tmp_path / "attention_efficiency_cpu_standin.json").read_text())
    assert efficiency["settings"]["dtype"] == "bfloat16"  # the stand-in's FA2 varlen path
    assert {(r["world"], r["mode"], r["packing"]) for r in efficiency["results"]} == {
        (2, m, k) for m in ("ring", "ulysses") for k in ("unpacked", "packed")
    }
    memory = json.loads((tmp_path / "memory_cpu_standin.json").read_text())
    assert memory["model_config"]["num_hidden_layers"] == 1
    assert [(p["sp"], p["seq"]) for p in memory["points"]] == [(1, 256)] and memory["points"][0]["peak_bytes_max"] > 0
