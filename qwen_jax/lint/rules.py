"""The rule registry of `qwen-lint`: one entry per rule, the only place a rule id is written.

A family module emits a finding by its entry (``folder.add(ROPE_03, ...)``), never by a string, so an
unregistered id cannot be emitted: the import fails.  The docs tables (docs/lint.md, README.md) and
``qwen-lint --list-rules`` / ``--list-fixes`` are generated from here (tests/test_lint_registry.py checks
both directions: every emitted id is registered, every registered rule has a config that fires it).
"""

from __future__ import annotations

from typing import NamedTuple


class Rule(NamedTuple):
    id: str
    family: str  # the module of qwen_jax.lint that emits it
    severity: str  # the levels it can take, most severe first ("error/warning")
    title: str  # what it catches, one line
    symptom: str  # the run-time symptom it prevents
    fix: str = ""  # what --fix does; empty when the rule has no automatic fix

    @property
    def severities(self) -> tuple[str, ...]:
        return tuple(self.severity.split("/"))

    @property
    def fixable(self) -> bool:
        return bool(self.fix)


RULES: dict[str, Rule] = {}  # id -> entry, in the docs' order


def _register(*fields: str) -> Rule:
    rule = Rule(*fields)
    if rule.id in RULES:
        raise ValueError(f"rule {rule.id} registered twice")
    RULES[rule.id] = rule
    return rule


JSON_01 = _register(
    "QL-JSON-01", "json_syntax", "error", "duplicate key in a JSON object",
    "Python keeps the last value, other parsers the first or reject: runtimes disagree")
JSON_02 = _register(
    "QL-JSON-02", "json_syntax", "error", "invalid JSON (with line and column), not UTF-8, or top level not an object",
    "the checkpoint does not load at all")
JSON_03 = _register(
    "QL-JSON-03", "json_syntax", "error",
    "a known key has the wrong type (string number, float layer count, bool as string...) or a number out of range "
    "(Infinity, beyond 2**53)", "TypeError at load, or a silently wrong value")
JSON_04 = _register(
    "QL-JSON-04", "json_syntax", "warning", "NaN / Infinity literal", "rejected by strict JSON parsers (Rust, JS, Go)")

ROPE_01 = _register(
    "QL-ROPE-01", "rope", "error/info", "rope_theta missing, or unusual for a Qwen model (10000 with a long context)",
    "loaders fall back to theta 10000: wrong RoPE base, output degrades with length")
ROPE_02 = _register(
    "QL-ROPE-02", "rope", "warning", "legacy rope_scaling `type` key without `rope_type`",
    "readers that only look at `rope_type` run without scaling", "rename the legacy `type` key to `rope_type`")
ROPE_03 = _register(
    "QL-ROPE-03", "rope", "error/warning", "YaRN: max_position_embeddings != factor x original_max_position_embeddings",
    "version-dependent scaling factor (transformers 4.45-4.55 use mpe/original); context cap wrong",
    "`max_position_embeddings` = factor x `original_max_position_embeddings` (when the original is right)")
ROPE_04 = _register(
    "QL-ROPE-04", "rope", "error/warning",
    "YaRN original_max_position_embeddings is not Qwen's pre-training length 32768",
    "wrong YaRN frequency ramp; long-context quality drops", "`original_max_position_embeddings` = 32768")
ROPE_05 = _register(
    "QL-ROPE-05", "rope", "info", "static YaRN enabled in the checkpoint config",
    "scaling applies to short prompts too (slight quality loss); enable only for long inputs")
ROPE_06 = _register(
    "QL-ROPE-06", "rope", "error", "`type` and `rope_type` disagree", "transformers uses rope_type, older readers type")
ROPE_07 = _register(
    "QL-ROPE-07", "rope", "error", "YaRN without original_max_position_embeddings",
    "vLLM raises KeyError; transformers assumes max_position_embeddings was the pre-training length",
    "add `original_max_position_embeddings: 32768`")
ROPE_08 = _register(
    "QL-ROPE-08", "rope", "error/warning/info", "scaling factor < 1, == 1 or not a float",
    "factor < 1 compresses nothing and extrapolates; 1 is a no-op")
ROPE_09 = _register(
    "QL-ROPE-09", "rope", "error", "unknown rope type", "model construction fails (no RoPE init function)")
ROPE_10 = _register(
    "QL-ROPE-10", "rope", "warning", "linear/dynamic scaling with max_position_embeddings already multiplied",
    "scaling applied twice: vLLM allows factor^2 x context, dynamic NTK starts too late",
    "`max_position_embeddings` back to 32768")
ROPE_11 = _register(
    "QL-ROPE-11", "rope", "warning/info",
    "both rope_scaling and rope_parameters (transformers 5.x uses rope_scaling), or v4 rope_theta / a top-level "
    "original_max_position_embeddings disagreeing with the v5 block",
    "transformers v4, v5 and v5-form readers build different RoPE from the same folder")
ROPE_12 = _register(
    "QL-ROPE-12", "rope", "error", "scaling block without `factor`", "KeyError when the rotary embedding is built")
ROPE_13 = _register(
    "QL-ROPE-13", "rope", "info", "RoPE only in the v5 `rope_parameters` form",
    "transformers < 5 and older runtimes ignore it (theta 10000, no scaling)")

CTX_01 = _register(
    "QL-CTX-01", "context_length", "warning", "context longer than the trained window with static RoPE and no scaling",
    "garbage output past the trained length (chat models are tuned at 32768)")
CTX_02 = _register(
    "QL-CTX-02", "context_length", "error",
    "context far beyond any released Qwen window (Qwen2/2.5 131072, Qwen3 262144) with plain RoPE: neither rope "
    "scaling nor dual_chunk_attention_config",
    "garbage past the trained length (e.g. a 1M model whose DCA block was deleted)")

DCA_01 = _register(
    "QL-DCA-01", "dca", "error/warning/info", "malformed dual_chunk_attention_config",
    "vLLM fails to build the DCA rotary embedding / chunking")
DCA_02 = _register(
    "QL-DCA-02", "dca", "error", "DCA combined with rope scaling",
    "vLLM ignores the scaling, transformers ignores DCA: runtimes compute different attention")
DCA_03 = _register(
    "QL-DCA-03", "dca", "info", "DCA is read by vLLM only", "transformers runs plain full attention over the context")

SWA_01 = _register(
    "QL-SWA-01", "sliding_window", "warning/info", "sliding-window attention active on some layers",
    "those layers only see the last `sliding_window` tokens (Qwen releases never trained with it)")
SWA_02 = _register(
    "QL-SWA-02", "sliding_window", "warning/info", "inactive sliding_window smaller than max_position_embeddings",
    "runtimes that ignore use_sliding_window cap the usable context to the window",
    "inactive `sliding_window` -> `null`")
SWA_03 = _register(
    "QL-SWA-03", "sliding_window", "error/warning",
    "layer_types inconsistent with num_hidden_layers / use_sliding_window",
    "transformers v4 and v5 window different layers, or v5 refuses the config")

EOS_01 = _register(
    "QL-EOS-01", "eos", "error", "chat model whose effective stop set lacks the chat turn end <|im_end|>",
    "generation never stops: the model runs on past the end of its turn",
    "add the turn end (151645) to the front of `generation_config.json`'s `eos_token_id` (inserting the key if "
    "absent)")
EOS_02 = _register(
    "QL-EOS-02", "eos", "warning", "config.json eos not contained in generation_config.json eos",
    "runtimes reading config.json stop on different tokens than transformers/vLLM")
EOS_03 = _register(
    "QL-EOS-03", "eos", "error/warning", "chat model whose config.json eos_token_id is not <|im_end|>",
    "runtimes that read config.json only never stop at the end of a turn",
    "`config.json` `eos_token_id` 151643 -> 151645 on a chat model")
EOS_04 = _register(
    "QL-EOS-04", "eos", "error", "tokenizer eos_token not in the effective stop set",
    "a model fine-tuned with this tokenizer emits a token generation does not stop on")
EOS_05 = _register(
    "QL-EOS-05", "eos", "warning", "tokenizer eos_token disagrees with config.json eos_token_id",
    "training (tokenizer) and inference (config) use different end tokens")
EOS_06 = _register(
    "QL-EOS-06", "eos", "warning", "pad token equal to the chat turn end",
    "collators mask pad labels, so the model never learns to emit its stop token")
EOS_07 = _register(
    "QL-EOS-07", "eos", "error", "no stop token at all", "generation only ends at max_new_tokens")

TOK_01 = _register(
    "QL-TOK-01", "tokens", "error", "special token id >= vocab_size",
    "index out of range in the embedding (CUDA assert)")
TOK_02 = _register(
    "QL-TOK-02", "tokens", "error", "bos equal to a stop token (other than Qwen's unused <|endoftext|> bos)",
    "a prepended bos ends generation immediately / prompts start with end-of-turn")
TOK_03 = _register(
    "QL-TOK-03", "tokens", "error/warning", "non-terminator (<|im_start|>, <think>, text token) in the eos list",
    "generation stops at the start of a turn, inside reasoning, or on ordinary text")

VOC_01 = _register(
    "QL-VOC-01", "vocab", "error", "vocab_size below the tokenizer size",
    "token ids past the embedding: crash or garbage")
VOC_02 = _register(
    "QL-VOC-02", "vocab", "warning", "vocab_size not a released Qwen size (151936 / 152064): embeddings resized",
    "weights, LoRA adapters and downstream tools must all agree on the new shape")
VOC_03 = _register(
    "QL-VOC-03", "vocab", "warning", "vocab_size far below the Qwen tokenizer (no tokenizer in the folder to check)",
    "Qwen token ids index past the embedding unless a custom tokenizer is used")

GEN_01 = _register(
    "QL-GEN-01", "general", "info", "no config.json next to the linted files", "nothing to check the token ids against")

MOE_01 = _register(
    "QL-MOE-01", "moe", "error",
    "MoE expert count (num_experts) or num_experts_per_tok missing or not a positive integer",
    "the router has no experts to choose from: model construction fails or every layer is dense")
MOE_02 = _register(
    "QL-MOE-02", "moe", "error", "num_experts_per_tok larger than num_experts",
    "torch.topk raises 'selected index k out of range' on the first forward pass")
MOE_03 = _register(
    "QL-MOE-03", "moe", "error", "moe_intermediate_size / shared_expert_intermediate_size not a positive integer",
    "zero-size or negative expert weights: construction fails or the experts output nothing")
MOE_04 = _register(
    "QL-MOE-04", "moe", "error/warning", "mlp_only_layers not a list of layer indices in [0, num_hidden_layers)",
    "out-of-range entries are silently ignored: the layers meant to be dense stay sparse")
MOE_05 = _register(
    "QL-MOE-05", "moe", "error/warning", "decoder_sparse_step < 1, or no layer left sparse",
    "ZeroDivisionError when the model is built (step 0), or a MoE config that runs no experts")

def rules_markdown() -> str:
    """The rule table of docs/lint.md and README.md (`qwen-lint --list-rules`)."""
    lines = ["| id | severity | what it catches | run-time symptom it prevents |", "|---|---|---|---|"]
    lines += [f"| `{r.id}` | {r.severity} | {r.title} | {r.symptom} |" for r in RULES.values()]
    return "\n".join(lines)


def fixes_markdown() -> str:
    """The `--fix` table of docs/lint.md (`qwen-lint --list-fixes`): what --fix does per fixable rule."""
    lines = ["| rule | fix |", "|---|---|"]
    lines += [f"| `{r.id}` | {r.fix} |" for r in RULES.values() if r.fixable]
    return "\n".join(lines)
