"""README's support tables are generated; these tests keep them in sync with their sources.

- The deep-coverage table (every mode, LoRA) from what tests/test_models.py covers, and the TP x SP table from
  tests/test_tensor_parallel.py: regenerate with `python tests/test_readme.py` and paste between their markers.
- The every-family table from the sweep snapshot tests/family_support.json: `make families` re-runs the sweep and
  rewrites both the snapshot and the table.
"""

from __future__ import annotations

import re
from pathlib import Path

from families import causal_lm_families
from models_zoo import FAMILIES
from test_families import COLUMNS as SWEEP_COLUMNS
from test_families import snapshot
from test_models import COVERAGE
from test_tensor_parallel import COVERAGE as TP_COVERAGE

README = Path(__file__).resolve().parents[1] / "README.md"
MODES = ("ring", "allgather", "ulysses", "usp")
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
SWEEP_START, SWEEP_END = "<!-- family-sweep:start -->", "<!-- family-sweep:end -->"
TP_START, TP_END = "<!-- tp-table:start -->", "<!-- tp-table:end -->"
_MARK = {"exact": "✓", "refused": "refused", "WRONG": "**WRONG**", "CRASH": "**CRASH**", "build failed": "not built"}


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


def tp_table() -> str:
    """The TP x SP parity cases of tests/test_tensor_parallel.py (world 4 = TP 2 x SP 2 against the plain model)."""
    lines = ["| case | families | modes |", "|---|---|---|"]
    for case, spec in TP_COVERAGE.items():
        lines.append(f"| {case} | {', '.join(spec['families'])} | {', '.join(spec['modes'])} |")
    return "\n".join(lines)


def _short(outcome: str) -> str:
    """An outcome's reason in a few words: no prefixes, no class name, no numbers that vary, first clause only."""
    kind, _, text = outcome.partition(": ")
    if kind == "WRONG":
        ignored = "; its loss ignores num_items_in_batch" if "ignores num_items_in_batch" in text else ""
        return "loss / gradients differ from the plain model" + ignored
    if kind == "CRASH":
        text = text.partition(": ")[2]  # drop the exception type
    text = text.removeprefix("hf_seqpar:").strip()
    first, _, rest = text.partition(" ")
    if re.fullmatch(r"[A-Za-z]\w*[A-Z]\w*:?", first):  # the model or module class (xLSTMForCausalLM too)
        text = rest
    text = re.sub(r" \(\d+(, \d+)*\)", "", text.split("; ")[0].split(": recurrent")[0]).replace("|", "/")
    return text if len(text) <= 120 else text[:117] + "..."


def family_table(results: dict) -> str:
    """One row per family of the sweep: each mode's outcome, and why it is refused (or skipped, or failing)."""
    lines = ["| family | " + " | ".join(SWEEP_COLUMNS) + " | note |", "|---|" + "---|" * (len(SWEEP_COLUMNS) + 1)]
    for family, outcome in sorted(results.items()):
        if "skipped" in outcome:
            lines.append(
                f"| {family} | " + " | ".join("-" for _ in SWEEP_COLUMNS) + f" | skipped: {outcome['skipped']} |"
            )
            continue
        cells = [next((v for k, v in _MARK.items() if outcome[m].startswith(k)), "**?**") for m in SWEEP_COLUMNS]
        notes = dict.fromkeys(_short(outcome[m]) for m in SWEEP_COLUMNS if outcome[m] != "exact")
        lines.append(f"| {family} | " + " | ".join(cells) + " | " + " / ".join(notes) + " |")
    return "\n".join(lines)


def replace_section(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def test_readme_family_table_matches_the_sweep_snapshot():
    text = README.read_text()
    assert SWEEP_START in text and SWEEP_END in text, "README lost its family-sweep markers"
    current = text.split(SWEEP_START, 1)[1].split(SWEEP_END, 1)[0].strip()
    assert current == family_table(snapshot()), "README family table is stale: run `make families`"


def test_sweep_snapshot_covers_every_causal_lm_family():
    """A transformers upgrade that adds a family (or a builder change) shows up here until `make families` runs."""
    results = snapshot()
    assert sorted(results) == causal_lm_families()
    for family, outcome in results.items():
        assert "skipped" in outcome or sorted(outcome) == sorted(SWEEP_COLUMNS), (family, outcome)


def test_readme_support_table_is_current():
    text = README.read_text()
    assert START in text and END in text, "README lost its support-table markers"
    current = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert current == support_table(), "README support table is stale: run `python tests/test_readme.py`"


def test_readme_tp_table_is_current():
    text = README.read_text()
    assert TP_START in text and TP_END in text, "README lost its tp-table markers"
    current = text.split(TP_START, 1)[1].split(TP_END, 1)[0].strip()
    assert current == tp_table(), "README TP table is stale: run `python tests/test_readme.py`"


if __name__ == "__main__":
    print(support_table())
    print()
    print(tp_table())
