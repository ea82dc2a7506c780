"""README's support table is generated from what tests/test_models.py covers; this keeps the two in sync.

Regenerate with `python tests/test_readme.py` and paste between the markers.
"""

from __future__ import annotations

from pathlib import Path

from models_zoo import FAMILIES
from test_models import COVERAGE

README = Path(__file__).resolve().parents[1] / "README.md"
MODES = ("ring", "allgather", "ulysses", "usp")
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"


def _features(family: str) -> str:
    extra = FAMILIES[family][1]
    found = []
    if "sliding_window" in extra:
        found.append("sliding window")
    if "attn_logit_softcapping" in extra:
        found.append("softcap")
    if family == "gpt_oss":
        found.append("attention sinks")
    if "v_head_dim" in extra:
        found.append("MLA (value head_dim != query head_dim)")
    if "attention_chunk_size" in extra:
        found.append("chunked attention, NoPE layer")
    return ", ".join(found) or "-"


def support_table() -> str:
    covered = {(f, m) for spec in COVERAGE.values() for f in spec["families"] for m in spec["modes"]}
    lora = {
        (f, m)
        for f in COVERAGE["LoRA (PEFT), packed, 2 ranks"]["families"]
        for m in COVERAGE["LoRA (PEFT), packed, 2 ranks"]["modes"]
    }
    lines = [
        "| family | attention features exercised | " + " | ".join(MODES) + " | LoRA |",
        "|---|---|" + "---|" * (len(MODES) + 1),
    ]
    for family in FAMILIES:
        cells = ["✓" if (family, m) in covered else "" for m in MODES]
        lora_modes = ", ".join(m for m in MODES if (family, m) in lora) or ""
        lines.append(f"| {family} | {_features(family)} | " + " | ".join(cells) + f" | {lora_modes} |")
    return "\n".join(lines)


def test_readme_support_table_is_current():
    text = README.read_text()
    assert START in text and END in text, "README lost its support-table markers"
    current = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert current == support_table(), "README support table is stale: run `python tests/test_readme.py`"


if __name__ == "__main__":
    print(support_table())
