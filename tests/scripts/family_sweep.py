"""Sweep every causal-LM family under SP (world 2; ring and ulysses; packed and padded) and record the outcomes.

    python tests/scripts/family_sweep.py             # all: writes tests/family_support.json and README's table
    python tests/scripts/family_sweep.py llama qwen3 # just these, printed (--out FILE merges them into FILE;
                                                     # --out tests/family_support.json also redoes README's table)
    python tests/scripts/family_sweep.py --check     # also exit 1 if any family is WRONG, crashes or is not built

Outcomes per column: "exact", "refused: <message>", "WRONG: <errors>", "CRASH: <error and where>",
"build failed: <error>" (the tiny-config builder's fault); or the whole family is {"skipped": <reason>}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # spawned rank workers inherit sys.path and import the body by module name

from _ranks import RankFailure, shared_pool  # noqa: E402
from families import SKIPPED, causal_lm_families, tiny_model  # noqa: E402
from test_families import COLUMNS, SNAPSHOT, sweep_case  # noqa: E402
from test_readme import README, SWEEP_END, SWEEP_START, family_table, replace_section  # noqa: E402

FAILING = ("WRONG", "CRASH", "build failed", "ranks disagree")


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _builds(family: str) -> str | None:
    """None if the plain tiny model runs forward and backward, else the builder's error."""
    import torch

    try:
        model = tiny_model(family)
        ids = torch.randint(3, 100, (1, 16))
        model(input_ids=ids, labels=ids).loss.backward()
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        return f"build failed: {type(err).__name__}: {_tail(str(err), 2)}"
    return None


def sweep_family(family: str) -> dict:
    if family in SKIPPED:
        return {"skipped": SKIPPED[family]}
    if (error := _builds(family)) is not None:
        return dict.fromkeys(COLUMNS, error)
    result = {}
    for column, (mode, kind) in COLUMNS.items():
        try:
            pool = shared_pool(2)
            outcomes = pool.run(sweep_case, family, mode, kind, timeout=180)
        except RankFailure as err:  # a rank died or hung: the pool is replaced on the next call
            result[column] = "CRASH: " + _tail(str(err).split("rank 1:")[0], 8)
            continue
        result[column] = outcomes[0] if len(set(outcomes)) == 1 else f"ranks disagree: {outcomes}"
        if len(set(outcomes)) > 1:
            pool.close()  # an asymmetric outcome may leave collectives unmatched: start afresh
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("families", nargs="*")
    parser.add_argument("--out", default=None, help="results file to merge into (default: the snapshot, full sweep)")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if any family is WRONG, crashes or fails to build"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    full = not args.families
    out = Path(args.out).resolve() if args.out else (SNAPSHOT if full else None)
    results = json.loads(out.read_text()) if out is not None and out.exists() and not full else {}
    for family in args.families or causal_lm_families():
        start = time.monotonic()
        try:
            results[family] = sweep_family(family)
        except Exception:  # noqa: BLE001 - the harness's own failure, recorded as such
            results[family] = dict.fromkeys(COLUMNS, "CRASH: harness error: " + _tail(traceback.format_exc()))
        print(f"{family} ({time.monotonic() - start:.1f}s): {json.dumps(results[family])[:300]}", flush=True)
        if out is not None:
            out.write_text(json.dumps(dict(sorted(results.items())), indent=1, ensure_ascii=False) + "\n")
    if out == SNAPSHOT:
        README.write_text(replace_section(README.read_text(), SWEEP_START, SWEEP_END, family_table(results)))
    failing = sorted(f for f, r in results.items() if any(str(v).startswith(FAILING) for v in r.values()))
    print(f"{len(results)} families; failing: {' '.join(failing) or 'none'}")
    if args.check and failing:
        sys.exit(1)


if __name__ == "__main__":
    main()
