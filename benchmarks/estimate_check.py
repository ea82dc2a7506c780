"""`hf-seqpar estimate` against benchmarks/memory.py's measurements: the step's peak memory per rank, both ways.

Reads benchmarks/results/memory_<device>.json (python benchmarks/memory.py writes it), computes the estimate for every
point whose configuration the estimate models (gradient checkpointing, chunked loss, tiled MLP; not checkpoint
offload), and writes benchmarks/results/estimate_vs_memory_<device>.json with the relative error of each.

Usage: python benchmarks/estimate_check.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402

from hf_seqpar.estimate import ModelShape, estimate_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELED = ("plain", "ckpt", "chunked_loss", "ckpt+chunked_loss", "tiled_mlp", "ckpt+chunked_loss+tiled_mlp")


def compare(measured: dict) -> list[dict]:
    model = memory.MODELS[measured["model"]]
    shape = ModelShape.from_config({**model, "tie_word_embeddings": False})
    dtype = "bfloat16" if measured["model"] == "llama3-8b" else "float32"
    lora = measured["model"] == "llama3-8b"
    rows = []
    for p in measured["points"]:
        if p["config"] not in MODELED or not p["peak_bytes_max"]:
            continue
        ckpt, savings = memory.CONFIGS[p["config"]]
        est = estimate_memory(shape, p["seq"], p["sp"], mode=measured.get("mode", "ring"), dtype=dtype, lora=lora,
                              grad_ckpt=ckpt, tiled_mlp=savings.get("tiled_mlp", False))  # fmt: skip
        estimated = est["step_peak_chunked" if savings.get("chunked_loss") else "step_peak_plain"]
        rows.append(
            {
                "sp": p["sp"],
                "seq": p["seq"],
                "config": p["config"],
                "measured_bytes": p["peak_bytes_max"],
                "estimated_bytes": estimated,
                "error": estimated / p["peak_bytes_max"] - 1,
            }
        )
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args(argv)
    source = RESULTS / f"memory_{opts.device}.json"
    measured = json.loads(source.read_text())
    rows = compare(measured)
    out = RESULTS / f"estimate_vs_memory_{opts.device}.json"
    report = {"machine": measured["machine"], "model": measured["model"], "source": source.name, "results": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'sp':>3} {'seq':>7} {'config':<28} {'measured MiB':>13} {'estimated MiB':>14} {'error':>7}")
    for r in rows:
        print(
            f"{r['sp']:>3} {r['seq']:>7} {r['config']:<28} {r['measured_bytes'] / 2**20:>13.1f} "
            f"{r['estimated_bytes'] / 2**20:>14.1f} {r['error']:>+7.1%}"
        )
    worst = max((abs(r["error"]) for r in rows), default=float("nan"))
    print(f"largest |error|: {worst:.1%} over {len(rows)} points; wrote {out}")
    return rows


if __name__ == "__main__":
    main()
