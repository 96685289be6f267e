"""Qwen facts the rules check against: special-token ids, released vocabulary and context sizes, RoPE values.

Where they come from: the released checkpoints' config / tokenizer files and transformers' Qwen configs; the
RoPE / YaRN / DCA numbers are derived in docs/long_context.md (§RoPE-config, §YaRN, §DCA).
"""

from __future__ import annotations

ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
QWEN_BPE_SIZE = 151643  # ordinary BPE tokens 0..151642
QWEN_SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
    "<think>": 151667, "</think>": 151668,
}
TERMINATORS = {ENDOFTEXT, IM_END}
PADDED_VOCABS = (151936, 152064)  # embedding rows of the released checkpoints (padded past the tokenizer)
# Smallest tokenizer of each family: Qwen2 shipped 151646 entries, Qwen2.5 151665, Qwen3 151669 (<think> tokens).
FAMILY_TOKENIZER_MIN = {"qwen2": 151646, "qwen3": 151669}
NATIVE_CONTEXT = 32768  # pre-training length of Qwen2 / Qwen2.5 / Qwen3 (YaRN's original_max_position_embeddings)
CHAT_CONTEXT = 40960  # 32768 + 8192 generation budget (Qwen3, QwQ)
# Longest context a released Qwen checkpoint runs with plain RoPE (no YaRN, no DCA): Qwen2/2.5 base models ship
# 131072; Qwen3-2507 models 262144.  The 1M models (Qwen2.5-*-1M) reach 1010000 only through DCA.
RELEASED_STATIC_WINDOW = {"qwen2": 131072, "qwen3": 262144}
KNOWN_THETAS = (1e6, 5e6, 1e7)
TEXT_MODEL_TYPES = {"qwen2": "qwen2", "qwen2_moe": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3"}
TEXT_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                      "Qwen3MoeForCausalLM": "qwen3"}
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
KNOWN_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "mrope")
