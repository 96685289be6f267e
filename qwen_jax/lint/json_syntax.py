"""QL-JSON: the files parse as one JSON object each, without duplicate keys or NaN literals, and the keys the
other rules read have the JSON type transformers expects (a wrong type is reported here and read as absent by
the other rules)."""

from __future__ import annotations

import json
import math

from qwen_jax.lint.core import (
    CONFIG,
    ERROR,
    GENCONFIG,
    TOKCONFIG,
    WARNING,
    is_int,
    is_num,
    token_content,
)
from qwen_jax.lint.rules import JSON_01, JSON_02, JSON_03, JSON_04


def _out_of_range(v):
    """A number (not a bool) that the rules cannot compute with: Infinity/NaN or beyond MAX_JSON_NUMBER."""
    return isinstance(v, int | float) and not isinstance(v, bool) and not is_num(v)


CONFIG_TYPES = {
    "vocab_size": "int", "max_position_embeddings": "int", "num_hidden_layers": "int", "max_window_layers": "int",
    "hidden_size": "int", "intermediate_size": "int", "num_attention_heads": "int", "num_key_value_heads": "int?",
    "head_dim": "int?", "sliding_window": "int?", "use_sliding_window": "bool", "tie_word_embeddings": "bool",
    "rope_theta": "num", "rope_scaling": "dict?", "rope_parameters": "dict?", "dual_chunk_attention_config": "dict?",
    "bos_token_id": "id?", "eos_token_id": "ids?", "pad_token_id": "id?", "model_type": "str",
    "layer_types": "strlist?", "architectures": "strlist?", "original_max_position_embeddings": "int?",
    "norm_topk_prob": "bool", "router_aux_loss_coef": "num?", "qkv_bias": "bool",
}
GEN_TYPES = {"bos_token_id": "id?", "eos_token_id": "ids?", "pad_token_id": "id?", "max_new_tokens": "int?",
             "max_length": "int?", "do_sample": "bool", "temperature": "num?", "top_p": "num?", "top_k": "int?"}
TOK_TYPES = {"eos_token": "tok?", "bos_token": "tok?", "pad_token": "tok?", "added_tokens_decoder": "dict",
             "add_bos_token": "bool", "model_max_length": "num?"}
ROPE_TYPES = {"rope_type": "str", "type": "str", "factor": "num", "original_max_position_embeddings": "int",
              "rope_theta": "num", "beta_fast": "num?", "beta_slow": "num?", "attention_factor": "num?",
              "mscale": "num?", "mscale_all_dim": "num?", "truncate": "bool"}
DCA_TYPES = {"chunk_size": "int", "local_size": "int", "original_max_position_embeddings": "int"}


def _type_ok(kind, v):
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if v is None:
        return optional
    if kind == "int":
        return is_int(v)
    if kind == "num":
        return is_num(v)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind == "dict":
        return isinstance(v, dict)
    if kind == "strlist":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind == "id":
        return is_int(v)
    if kind == "ids":
        return is_int(v) or (isinstance(v, list) and all(is_int(x) for x in v))
    if kind == "tok":
        return token_content(v) is not None
    return True


_KIND_WORDS = {"int": "an integer", "num": "a number", "bool": "true/false", "str": "a string", "dict": "an object",
               "strlist": "a list of strings", "id": "an integer token id", "ids": "an integer or a list of integers",
               "tok": "a token string (or an AddedToken object)"}


def check_files(folder):
    """Every known file of `folder`: parse errors, duplicates, NaN literals, then the key types."""
    for name, jf in folder.files.items():
        if jf is None:
            continue
        if jf.error is not None:
            line, col, msg = jf.error
            folder.add(JSON_02, ERROR, name, (), f"{msg} (line {line}, column {col})",
                       "fix the syntax; every loader refuses this file", line=line)
            continue
        if not isinstance(jf.data, dict):
            folder.add(JSON_02, ERROR, name, (), f"top level is {type(jf.data).__name__}, not an object",
                       "the file must hold one JSON object")
            continue
        for path, loc in jf.duplicates:
            key = ".".join(str(p) for p in path)
            first = jf.locs[path][0].line
            folder.add(JSON_01, ERROR, name, path,
                       f'duplicate key "{key}" (first at line {first}): Python json keeps the last value, other '
                       "parsers keep the first or reject the file", "delete one of the two entries", line=loc.line)
        for lit in sorted(set(jf.nonfinite)):
            folder.add(JSON_04, WARNING, name, (), f"non-standard literal {lit}: strict JSON parsers reject it",
                       "use a finite number or null")
        if name == CONFIG and not {"model_type", "architectures", "vocab_size"} & set(jf.data):
            continue  # some other tool's config.json (the hook matches any file of that name)
        schema = {CONFIG: CONFIG_TYPES, GENCONFIG: GEN_TYPES, TOKCONFIG: TOK_TYPES}[name]
        _check_types(folder, name, (), jf.data, schema)
        if name == CONFIG:
            for sub, sch in (("rope_scaling", ROPE_TYPES), ("rope_parameters", ROPE_TYPES),
                             ("dual_chunk_attention_config", DCA_TYPES)):
                if isinstance(jf.data.get(sub), dict):
                    _check_types(folder, name, (sub,), jf.data[sub], sch)


def _check_types(folder, name, base, obj, schema):
    for key, kind in schema.items():
        if key not in obj:
            continue
        v = obj[key]
        if not _type_ok(kind, v):
            big = isinstance(v, int) and abs(v) >= 10 ** 30
            shown = f"a {len(str(abs(v)))}-digit number" if big else json.dumps(v)
            if len(shown) > 40:
                shown = shown[:37] + "..."
            dotted = ".".join(base + (key,))
            if _out_of_range(v) and (isinstance(v, int) or math.isfinite(v)):
                folder.add(JSON_03, ERROR, name, base + (key,),
                           f"{dotted} is {shown}: out of range (beyond 2**53 no JSON reader holds it exactly; "
                           "float64 overflows at 1.8e308, int64 at 9.2e18): loaders crash or misread it",
                           "write the intended value")
                continue
            folder.add(JSON_03, ERROR, name, base + (key,),
                       f"{dotted} is {shown}, expected {_KIND_WORDS[kind.rstrip('?')]}"
                       f"{' or null' if kind.endswith('?') else ''}: loaders crash or misread it",
                       "write the value with the right JSON type")
