"""The data package's error for unusable input: a data file, or a `data.*` setting.

The message is one line that names what to fix: the file (and line) or the config key, so that a
launcher can print it as is and exit.  Records that parse but lack their kind's fields are reported
when the stream reaches them (`BadRecordError`, qwen_jax/data/tokenization.py).
"""

from __future__ import annotations


class DataError(ValueError):
    """A data file (missing, empty, unreadable, malformed JSON line, not UTF-8) or a `data.*` value the pipeline
    cannot use; the message names the file (and line) or the key."""
