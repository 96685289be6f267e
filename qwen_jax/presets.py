"""Hugging Face `config.json`-shaped presets for the Qwen2, Qwen2.5 and Qwen3 models (dense and MoE).

Each entry reproduces the architecture keys of the published `config.json` of one Hugging Face
repository (named in the comment above it, with where the values were read).  Keys that only
matter to transformers' runtime (`use_cache`, `attention_dropout`, `initializer_range`,
`transformers_version`, `use_mrope`) are kept where they are part of the file, except
`use_mrope` (an unused legacy flag of some Qwen2.5 files), which is left out.

Released sizes.  Qwen2: 0.5B, 1.5B, 7B, 72B and the 57B-A14B MoE.
There is no Qwen2-3B/14B/32B.  Qwen2.5: 0.5B, 1.5B, 3B, 7B, 14B, 32B, 72B.  Qwen3 dense:
0.6B, 1.7B, 4B, 8B, 14B, 32B; Qwen3 MoE: 30B-A3B, 235B-A22B.  Before them Qwen1.5-MoE-A2.7B
(model_type qwen2_moe).

Qwen2 / Qwen2.5 presets are the *base* (pre-trained) repos.  Qwen3 presets are the
`Qwen/Qwen3-<size>` repos (the released post-trained, hybrid-thinking checkpoints): those are
the configs verified below, and Qwen3-32B has **no** `-Base` release.  The `Qwen/Qwen3-<size>-Base`
repos (0.6B to 14B) have the same architecture; derived copies found show them with
`max_position_embeddings` 32768 and `eos_token_id` 151643 instead of 40960 / 151645, which was
not verified against the Qwen files themselves.

Notes on values that look odd but are as published:
* `sliding_window` / `max_window_layers` are inactive (`use_sliding_window` false everywhere);
  `max_window_layers` differs from `num_hidden_layers` in some files (Qwen2-72B: 28 of 80).
* `vocab_size` 151936 / 152064 are padded above the tokenizer's 151665 ids.
* `rms_norm_eps` is 1e-5 for Qwen2-72B, Qwen2.5-14B/32B/72B and 1e-6 elsewhere.
* Qwen2.5-3B was published with 32768 positions while its siblings say 131072
  (https://huggingface.co/Qwen/Qwen2.5-3B/discussions/2 proposes the change).

`get_preset(name)` returns a deep copy; `PRESETS` itself must not be mutated.
"""

from __future__ import annotations

import copy

__all__ = ["PRESETS", "get_preset", "preset_names"]


def _qwen2(**arch) -> dict:
    """A Qwen2/Qwen2.5 config.json: the keys common to every published file, then `arch`."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        **arch,
    }


def _qwen3(**arch) -> dict:
    """A Qwen3 (dense) config.json: the keys common to every published file, then `arch`."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "head_dim": 128,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        **arch,
    }


def _qwen2_moe(**arch) -> dict:
    """A Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) config.json: common keys, then `arch`."""
    return _qwen2(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", decoder_sparse_step=1,
                  norm_topk_prob=False, output_router_logits=False, router_aux_loss_coef=0.001, rms_norm_eps=1e-06,
                  vocab_size=151936, tie_word_embeddings=False, **arch)


def _qwen3_moe(**arch) -> dict:
    """A Qwen3-MoE config.json: the Qwen3 keys plus the expert keys common to 30B-A3B and 235B-A22B."""
    return _qwen3(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", decoder_sparse_step=1,
                  mlp_only_layers=[], norm_topk_prob=True, num_experts=128, num_experts_per_tok=8,
                  output_router_logits=False, router_aux_loss_coef=0.001, max_position_embeddings=40960,
                  num_key_value_heads=4, tie_word_embeddings=False, **arch)


_QWEN2_57B_A14B = dict(  # architecture shared by Qwen2-57B-A14B and its -Instruct
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_window_layers=28, moe_intermediate_size=2560, shared_expert_intermediate_size=20480, num_experts=64,
    num_experts_per_tok=8,
)

PRESETS: dict[str, dict] = {
    # ------------------------------------------------------------------ Qwen2 (June 2024)
    # Qwen/Qwen2-0.5B.  Read: github.com/rwth-i6/i6_experiments
    # users/juanola/experiments/e25_11_13_ctc/configurations/qwen2/qwen2_configs.py ("Qwen2-0_5B",
    # transformers_version 4.40.1, i.e. the file as released); same values in HF copies with
    # _name_or_path Qwen/Qwen2-0.5B (wanghaikuan/Qwen2-0.5B_merge_v2.9, chgk13/Qwen2-0.5B-openvino).
    "qwen2-0.5b": _qwen2(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072,
        rms_norm_eps=1e-06, tie_word_embeddings=True, sliding_window=131072, max_window_layers=24,
        eos_token_id=151643, transformers_version="4.40.1",
    ),
    # Qwen/Qwen2-1.5B.  Read: HF copy with _name_or_path Qwen/Qwen2-1.5B
    # (huggingface.co/glouriousgautam/Qwen2-1.5b-oasstguanaco-qdora-merged config.json, re-saved by
    # transformers 4.41.2, so transformers_version there is not Qwen's; the released file's version
    # string was not found).
    "qwen2-1.5b": _qwen2(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
        rms_norm_eps=1e-06, tie_word_embeddings=True, sliding_window=131072, max_window_layers=28,
        eos_token_id=151643,
    ),
    # Qwen/Qwen2-7B.  Read: HF copies with _name_or_path Qwen/Qwen2-7B (huggingface.co/alielfilali01/
    # PG7BB, heegyu/0713-qwen2-infini-qarv config.json, re-saved by transformers 4.41.2; released
    # version string not found).
    "qwen2-7b": _qwen2(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rms_norm_eps=1e-06, tie_word_embeddings=False, sliding_window=131072, max_window_layers=28,
        eos_token_id=151643,
    ),
    # Qwen/Qwen2-72B.  Read: the Qwen file itself,
    # huggingface.co/Qwen/Qwen2-72B/blob/c03367ee2f85a5f870d5aa3feb9928c9156e048f/config.json
    # (docs corpus).  max_window_layers 28 (of 80) is as published.
    "qwen2-72b": _qwen2(
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-05, tie_word_embeddings=False, sliding_window=131072, max_window_layers=28,
        eos_token_id=151643, transformers_version="4.40.1",
    ),
    # ---------------------------------------------------------------- Qwen2.5 (Sept 2024)
    # Qwen/Qwen2.5-0.5B.  Read: a code-corpus excerpt headed "# Qwen/Qwen2.5-0.5B / model config"
    # (transformers_version 4.40.1, the released file); same shapes in HF copies with
    # _name_or_path Qwen/Qwen2.5-0.5B (osllmai-community/Qwen2.5-0.5B, archit11/qwen_worldmodel).
    "qwen2.5-0.5b": _qwen2(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-06, tie_word_embeddings=True, sliding_window=32768, max_window_layers=24,
        eos_token_id=151643, transformers_version="4.40.1",
    ),
    # Qwen/Qwen2.5-1.5B.  Read: the Qwen commit 8faed76 "Update config.json"
    # (huggingface.co/Qwen/Qwen2.5-1.5B/commit/8faed761d45a263340a0528343f099c05c9a4323), which sets
    # max_position_embeddings and sliding_window 32768 -> 131072 and shows the other keys as context;
    # num_hidden_layers 28 / eos from the copy kaitchup/Qwen2.5-1.5B-AutoRound-GPTQ-asym-4bit
    # (_name_or_path Qwen/Qwen2.5-1.5B).
    "qwen2.5-1.5b": _qwen2(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
        rms_norm_eps=1e-06, tie_word_embeddings=True, sliding_window=131072, max_window_layers=28,
        eos_token_id=151643, transformers_version="4.40.1",
    ),
    # Qwen/Qwen2.5-3B.  Read: github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md
    # ("LLM-Prof Model_Config.md" below).  32768 positions as published (the 1.5B sibling's published
    # config was later moved to 131072).
    "qwen2.5-3b": _qwen2(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-06, tie_word_embeddings=True, sliding_window=32768, max_window_layers=36,
        eos_token_id=151643, transformers_version="4.40.1",
    ),
    # Qwen/Qwen2.5-7B.  Read: LLM-Prof Model_Config.md; same values in HF copy
    # fblgit/cybertron-v4-qw7B-MGS (_name_or_path Qwen/Qwen2.5-7B).
    "qwen2.5-7b": _qwen2(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rms_norm_eps=1e-06, tie_word_embeddings=False, sliding_window=131072, max_window_layers=28,
        eos_token_id=151643, transformers_version="4.40.1",
    ),
    # Qwen/Qwen2.5-14B.  Read: LLM-Prof Model_Config.md.
    "qwen2.5-14b": _qwen2(
        vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-05, tie_word_embeddings=False, sliding_window=131072, max_window_layers=48,
        eos_token_id=151643, transformers_version="4.43.1",
    ),
    # Qwen/Qwen2.5-32B.  Read: github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md, section
    # "Qwen2.5-32B" (commit 8434c8d1).  rms_norm_eps 1e-5 also stated in
    # huggingface.co/Qwen/QwQ-32B/discussions/9 ("For Qwen 2.5 32B, rms_norm_eps is 1e-05").
    "qwen2.5-32b": _qwen2(
        vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
        num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-05, tie_word_embeddings=False, sliding_window=131072, max_window_layers=64,
        eos_token_id=151643, transformers_version="4.43.1",
    ),
    # Qwen/Qwen2.5-72B.  Read: HF copy huggingface.co/BitStack/BitStack-Qwen2.5-72B config.json
    # (_name_or_path .../Qwen/Qwen2.5-72B, re-saved by transformers 4.45.2).  NOT FOUND: the released
    # `sliding_window` value (the re-save writes null because use_sliding_window is false) and the
    # released transformers_version.  131072 follows Qwen2.5-7B/14B/32B; it is inactive either way.
    "qwen2.5-72b": _qwen2(
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-05, tie_word_embeddings=False, sliding_window=131072, max_window_layers=80,
        eos_token_id=151643,
    ),
    # ------------------------------------------------------------------ Qwen3 (April 2025)
    # Qwen/Qwen3-0.6B.  Read: HF copies of the Qwen file (huggingface.co/TensorStack/TextEncoder
    # Qwen-3-06B/config.json, bfuzzy1/Railz-R config.json; transformers_version 4.51.0, identical keys).
    "qwen3-0.6b": _qwen3(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, max_position_embeddings=40960, tie_word_embeddings=True, max_window_layers=28,
    ),
    # Qwen/Qwen3-1.7B.  Read: github.com/mlc-ai/mlc-llm
    # python/mlc_llm/model/model_preset.py "qwen3_1.7b".
    "qwen3-1.7b": _qwen3(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, max_position_embeddings=40960, tie_word_embeddings=True, max_window_layers=28,
    ),
    # Qwen/Qwen3-4B.  Read: LLM-Prof Model_Config.md (that copy says
    # transformers 4.51.2 / use_cache false, possibly re-saved); shapes also in HF copy
    # MultiRL/qwen3_4b_instruct_sft (transformers 4.51.0).
    "qwen3-4b": _qwen3(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=40960, tie_word_embeddings=True, max_window_layers=36,
    ),
    # Qwen/Qwen3-8B.  Read: LLM-Prof Model_Config.md and
    # HF commit "Copy config.json from Qwen/Qwen3-8B" (huggingface.co/thejaminator/qwen-hook-layer-9/
    # commit/478fb720f1f3ced834fce0275b55b2732d438edc): identical.
    "qwen3-8b": _qwen3(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=40960, tie_word_embeddings=False, max_window_layers=36,
    ),
    # Qwen/Qwen3-14B.  Read: LLM-Prof Model_Config.md.
    "qwen3-14b": _qwen3(
        hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=8, max_position_embeddings=40960, tie_word_embeddings=False, max_window_layers=40,
    ),
    # Qwen/Qwen3-32B (no Qwen3-32B-Base was released).  Read: LLM-Prof
    # Model_Config.md; same in HF copy ronnywebdevs1/d-m-1.  64 heads x 128 = 8192 != hidden 5120.
    "qwen3-32b": _qwen3(
        hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=40960, tie_word_embeddings=False, max_window_layers=64,
    ),
    # ------------------------------------------------------------------ mixture of experts
    # Qwen/Qwen1.5-MoE-A2.7B (14.3B total, 2.7B active).  Expert keys read: the planner table "Qwen/
    # Qwen1.5-MoE-A2.7B-Chat (config.json ...)" and a GPTQ copy's config.json (router_aux_loss_coef 0.001,
    # sliding_window 32768, max_window_layers 21); max_position_embeddings 8192 for the base repo (the
    # -Chat file says 32768), from an HfConfigExtractor test fixture of the base config.
    "qwen1.5-moe-a2.7b": _qwen2_moe(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=8192, sliding_window=32768, max_window_layers=21,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
        eos_token_id=151643,
    ),
    # Qwen/Qwen2-57B-A14B.  Read: QWEN2_57B_A14B_CONFIG of a TensorRT-LLM-style test (transformers 4.40.1):
    # every key below as there.
    "qwen2-57b-a14b": _qwen2_moe(
        **_QWEN2_57B_A14B, max_position_embeddings=131072, sliding_window=131072, eos_token_id=151643,
    ),
    # Qwen/Qwen2-57B-A14B-Instruct: the base architecture; the instruct file ends turns at <|im_end|>
    # (eos 151645) and says 32768 positions (65536 with the YaRN recipe of its model card).  These two
    # values are from the published file as remembered, not found in the searchable copies.
    "qwen2-57b-a14b-instruct": _qwen2_moe(
        **_QWEN2_57B_A14B, max_position_embeddings=32768, sliding_window=32768, eos_token_id=151645,
    ),
    # Qwen/Qwen3-30B-A3B (30.5B total, 3.3B active).  Shapes read: slime scripts/models/qwen3-30B-A3B.sh
    # (48 layers, hidden 2048, ffn 6144, moe ffn 768, 128 experts, top-8, 32 q / 4 kv heads, kv channels 128);
    # total 30532122624 in keras-hub's qwen3_moe preset metadata, equal to num_params of this preset.
    "qwen3-30b-a3b": _qwen3_moe(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        moe_intermediate_size=768, max_window_layers=48,
    ),
    # Qwen/Qwen3-235B-A22B.  Shapes read: slime scripts/models/qwen3-235B-A22B.sh (94 layers, hidden 4096,
    # ffn 12288, moe ffn 1536, 128 experts, top-8, 64 q / 4 kv heads).
    "qwen3-235b-a22b": _qwen3_moe(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=94, num_attention_heads=64,
        moe_intermediate_size=1536, max_window_layers=94,
    ),
    # ------------------------------------------------------------------ demos / tests
    # Not a released model: random-init toy (~9.8M parameters, almost all embedding) whose vocab covers
    # every Qwen tokenizer id (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645).
    "tiny": _qwen2(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-06, tie_word_embeddings=True, sliding_window=None, max_window_layers=2,
        eos_token_id=151643, torch_dtype="float32",
    ),
}


def preset_names() -> list[str]:
    """All preset names, in definition order."""
    return list(PRESETS)


def get_preset(name: str) -> dict:
    """A deep copy of preset `name` (safe to modify); KeyError listing the valid names otherwise."""
    try:
        return copy.deepcopy(PRESETS[name])
    except (KeyError, TypeError):
        raise KeyError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
