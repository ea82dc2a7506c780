"""Sweep every causal-LM family under SP (world 2, ring and ulysses) and record each outcome.

    python tests/scripts/family_sweep.py                # all families -> tests/family_support.json + README
    python tests/scripts/family_sweep.py llama qwen3    # just these, printed (snapshot untouched)

Outcomes per mode: "exact", "refused: <message>", "WRONG: <errors>", "CRASH: <traceback tail>",
"build failed: <error>" (the tiny-config builder's fault), or the family is "skipped: <reason>".
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
from test_families import MODES, SNAPSHOT, sweep_case  # noqa: E402

README = TESTS.parent / "README.md"


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def sweep_family(family: str, kinds=("packed",)) -> dict:
    if family in SKIPPED:
        return {"skipped": SKIPPED[family]}
    try:  # the builder's own check: the plain tiny model runs forward and backward
        import torch

        model = tiny_model(family)
        ids = torch.randint(3, 100, (1, 16))
        model(input_ids=ids, labels=ids).loss.backward()
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        return {mode: f"build failed: {type(err).__name__}: {_tail(str(err), 2)}" for mode in MODES}
    result = {}
    for mode in MODES:
        for kind in kinds:
            key = mode if kind == "packed" else f"{mode} {kind}"
            try:
                pool = shared_pool(2)
                outcomes = pool.run(sweep_case, family, mode, kind, timeout=180)
                result[key] = outcomes[0] if len(set(outcomes)) == 1 else f"ranks disagree: {outcomes}"
                if any(o.startswith("CRASH") for o in outcomes) and len(set(outcomes)) > 1:
                    pool.close()  # an asymmetric crash may leave collectives unmatched: start afresh
            except RankFailure as err:
                result[key] = "CRASH: " + _tail(str(err).split("rank 1:")[0], 8)
    return result


def category(outcome: str) -> str:
    for prefix, name in (
        ("exact", "exact"),
        ("refused", "refused"),
        ("WRONG", "wrong"),
        ("skipped", "skipped"),
        ("build failed", "build failed"),
    ):
        if outcome.startswith(prefix):
            return name
    return "crash"


def counts(results: dict) -> dict:
    """Per family: its worst outcome over the modes (crash > wrong > build failed > refused > exact)."""
    order = ["exact", "refused", "skipped", "build failed", "wrong", "crash"]
    tally = dict.fromkeys(order, 0)
    for outcome in results.values():
        cats = ["skipped"] if "skipped" in outcome else [category(v) for v in outcome.values()]
        tally[max(cats, key=order.index)] += 1
    return tally


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("families", nargs="*")
    parser.add_argument("--padded", action="store_true", help="also run a padded batch of 2")
    parser.add_argument("--out", default=None, help="results file (default: the snapshot, full sweep only)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    names = args.families or causal_lm_families()
    out = Path(args.out) if args.out else (None if args.families else SNAPSHOT)
    kinds = ("packed", "padded") if args.padded else ("packed",)
    results = json.loads(out.read_text()) if out is not None and out.exists() and args.families else {}
    for family in names:
        start = time.monotonic()
        try:
            results[family] = sweep_family(family, kinds)
        except Exception:  # noqa: BLE001
            results[family] = {"harness error": _tail(traceback.format_exc())}
        print(f"{family} ({time.monotonic() - start:.1f}s): {json.dumps(results[family])[:400]}", flush=True)
        if out is not None:
            out.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")


if __name__ == "__main__":
    main()
