"""Building blocks of the Qwen decoder, one per file (MaxText-style)."""
