"""Version shims for the integrations layer: each names the transformers release that changed what it papers over."""

from __future__ import annotations

from dataclasses import fields


def output_cache_field(output_class) -> str:
    """The name a transformers output dataclass gives its KV cache: `cache` from transformers 5.24 on (where
    `past_key_values` is a deprecated alias that logs a warning), `past_key_values` before."""
    names = {f.name for f in fields(output_class)}
    return "cache" if "cache" in names else "past_key_values"
