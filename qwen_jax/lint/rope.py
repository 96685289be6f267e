"""QL-ROPE: rope_theta and the RoPE scaling block as transformers (v4 and v5) and vLLM read them.

The formulas behind the rules (YaRN's ramp, why max_position_embeddings must equal factor x original) are in
docs/long_context.md (§RoPE-config, §YaRN).
"""

from __future__ import annotations

import json
import math

from qwen_jax.lint.core import CONFIG, ERROR, INFO, WARNING, fmt_num, is_int, is_num
from qwen_jax.lint.facts import KNOWN_ROPE_TYPES, KNOWN_THETAS, NATIVE_CONTEXT
from qwen_jax.lint.rules import (
    ROPE_01,
    ROPE_02,
    ROPE_03,
    ROPE_04,
    ROPE_05,
    ROPE_06,
    ROPE_07,
    ROPE_08,
    ROPE_09,
    ROPE_10,
    ROPE_11,
    ROPE_12,
    ROPE_13,
)


def rope_view(cfg):
    """(source key, params dict or None, theta or None, theta path) as transformers 5.x resolves them
    (``convert_rope_params_to_dict``: ``rope_parameters = rope_scaling or rope_parameters``): a non-empty
    rope_scaling replaces rope_parameters entirely; theta from the chosen block, else the top level."""
    rs, rp = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if isinstance(rs, dict) and rs:
        src, params = "rope_scaling", rs
    elif isinstance(rp, dict):
        src, params = "rope_parameters", rp
    else:
        src, params = None, None
    if params is not None and "rope_theta" in params:
        return src, params, params["rope_theta"], (src, "rope_theta")
    if "rope_theta" in cfg:
        return src, params, cfg["rope_theta"], ("rope_theta",)
    return src, params, None, None


def check_rope(ctx):
    """rope_theta, the v4 / v5 RoPE blocks and their scaling parameters (YaRN in `_check_yarn`)."""
    cfg, f = ctx.cfg, ctx.folder
    if cfg is None:
        return
    src, p, theta, tpath = rope_view(cfg)
    mpe, qwen = ctx.mpe, ctx.family is not None
    # --- theta
    if theta is None and "rope_theta" not in cfg:
        if qwen:
            f.add(ROPE_01, ERROR, CONFIG, ("rope_theta",),
                  "rope_theta is missing: transformers and vLLM fall back to 10000 (Qwen uses 1000000): wrong "
                  "RoPE base, output degrades with length", 'add "rope_theta": 1000000.0')
    elif is_num(theta):
        if theta <= 0:
            f.add(ROPE_01, ERROR, CONFIG, tpath, f"rope_theta {fmt_num(theta)} is not positive",
                  "use the family value 1000000.0")
        elif qwen and theta < 1e5:
            if mpe is not None and mpe > 8192:
                f.add(ROPE_01, ERROR, CONFIG, tpath,
                      f"rope_theta {fmt_num(theta)} does not match the Qwen value 1000000 for a "
                      f"{mpe}-token context: wrong RoPE base, output degrades with length",
                      "set rope_theta to 1000000.0 (1e7 for the 1M models)")
            else:
                f.add(ROPE_01, INFO, CONFIG, tpath,
                      f"rope_theta {fmt_num(theta)} is below the usual Qwen 1000000 (fine for short-context "
                      "variants such as Qwen2.5-Math)", "check against the base checkpoint")
        elif qwen and not any(math.isclose(theta, t) for t in KNOWN_THETAS):
            f.add(ROPE_01, INFO, CONFIG, tpath,
                  f"rope_theta {fmt_num(theta)} is not a released Qwen value (1e6, 5e6, 1e7)",
                  "check against the base checkpoint")
    # --- v4 / v5 forms
    rs, rp = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp and isinstance(rs, dict) and rs:
        _check_both_rope_blocks(ctx, rs, rp)
    elif isinstance(rp, dict) and "rope_theta" in cfg:
        top_theta = cfg.get("rope_theta")
        if "rope_theta" in rp and is_num(top_theta) and is_num(rp["rope_theta"]) and \
                not math.isclose(top_theta, rp["rope_theta"]):
            f.add(ROPE_11, WARNING, CONFIG, ("rope_parameters", "rope_theta"),
                  f"rope_parameters.rope_theta {fmt_num(rp['rope_theta'])} != rope_theta {fmt_num(top_theta)}: "
                  "transformers v4 reads the top-level value, v5 the rope_parameters one",
                  "keep one value in both places")
    elif isinstance(rp, dict) and qwen and "rope_theta" not in cfg:
        f.add(ROPE_13, INFO, CONFIG, ("rope_parameters",),
              "RoPE is given only as v5 rope_parameters: transformers < 5 and older runtimes ignore it "
              "(theta 10000, no scaling)", 'also write top-level "rope_theta" for older loaders')
    if p is not None:
        _check_rope_params(ctx, src, p)


def _check_both_rope_blocks(ctx, rs, rp):
    """Both rope_scaling and rope_parameters: transformers 5.x reads rope_scaling only (and its rope_theta, else
    the top-level one); readers of the v5 form read rope_parameters.  Flag it, and say how they differ."""
    top = ctx.cfg.get("rope_theta")
    used_theta, other_theta = rs.get("rope_theta", top), rp.get("rope_theta", top)
    diffs = []
    if _norm_rope(rs) != _norm_rope(rp):
        diffs.append(f"scaling {_rope_summary(rs)} vs {_rope_summary(rp)}")
    if is_num(used_theta) and is_num(other_theta) and not math.isclose(used_theta, other_theta):
        diffs.append(f"theta {fmt_num(used_theta)} vs {fmt_num(other_theta)}")
    ignored = "ignores rope_parameters entirely"
    if diffs:
        ctx.folder.add(ROPE_11, WARNING, CONFIG, ("rope_parameters",),
                       f"both rope_scaling and rope_parameters are set and differ ({'; '.join(diffs)}): transformers "
                       f"5.x uses rope_scaling (theta from it, else the top level) and {ignored}; readers of the v5 "
                       "form use rope_parameters: two different RoPEs from one folder",
                       "keep one block: the one the model was trained with")
    else:
        ctx.folder.add(ROPE_11, INFO, CONFIG, ("rope_parameters",),
                       f"both rope_scaling and rope_parameters are set (they agree): transformers 5.x uses "
                       f"rope_scaling and {ignored}", "keep one block to avoid drift")


def _rope_summary(d):
    kind = d.get("rope_type", d.get("type", "default"))
    return json.dumps(kind) + (f" x{fmt_num(d['factor'])}" if is_num(d.get("factor")) else "")


def _norm_rope(d):
    d = {k: v for k, v in d.items() if k not in ("type", "rope_theta")}
    d.setdefault("rope_type", (d.get("type") or "default"))
    return json.dumps(d, sort_keys=True, default=str)


def _check_rope_params(ctx, src, p):
    f, mpe, qwen = ctx.folder, ctx.mpe, ctx.family is not None
    has_rt, has_t = "rope_type" in p, "type" in p
    same = {"mrope": "default"}  # Qwen2-VL's config class rewrites type "mrope" to rope_type "default"
    if has_rt and has_t and same.get(p["rope_type"], p["rope_type"]) != same.get(p["type"], p["type"]):
        f.add(ROPE_06, ERROR, CONFIG, (src, "type"),
              f"{src}.type {json.dumps(p['type'])} conflicts with rope_type {json.dumps(p['rope_type'])}: "
              "transformers uses rope_type, readers of the legacy key use type", "delete the legacy type key")
    if has_t and not has_rt and isinstance(p["type"], str) and p["type"] != "mrope":
        f.add(ROPE_02, WARNING, CONFIG, (src, "type"),
              f'{src} uses the legacy "type" key: readers that only look at "rope_type" run without scaling',
              'rename "type" to "rope_type"', edit=("rename_key", (src, "type"), "rope_type"))
    kind = p.get("rope_type", p.get("type", "default"))
    if not isinstance(kind, str):
        return
    if kind not in KNOWN_ROPE_TYPES:
        f.add(ROPE_09, ERROR, CONFIG, (src, "rope_type" if has_rt else "type"),
              f"unknown rope type {json.dumps(kind)}: transformers has no init function for it and the model "
              "fails to build", f"use one of {', '.join(KNOWN_ROPE_TYPES[:4])}")
        return
    if kind in ("default", "mrope"):
        return
    if "factor" not in p:
        if kind in ("linear", "dynamic", "yarn", "longrope"):
            f.add(ROPE_12, ERROR, CONFIG, (src,),
                  f"{kind} scaling without a factor: KeyError when the rotary embedding is built",
                  'add "factor" (4.0 for Qwen\'s YaRN recipe)')
        return
    factor = p["factor"]
    if not is_num(factor):
        return  # QL-JSON-03
    if factor < 1:
        f.add(ROPE_08, ERROR, CONFIG, (src, "factor"),
              f"{kind} factor {fmt_num(factor)} < 1: positions are stretched instead of compressed",
              "use a factor > 1 (4.0 for 4x context) or remove the scaling block")
        return
    if factor == 1:
        f.add(ROPE_08, WARNING, CONFIG, (src, "factor"),
              f"{kind} factor 1: the scaling is a no-op", "remove the scaling block or set the intended factor")
        return
    if is_int(factor):
        f.add(ROPE_08, INFO, CONFIG, (src, "factor"),
              f"{kind} factor is the integer {factor}: transformers warns that it should be a float",
              f"write {float(factor)}")
    if kind == "yarn":
        _check_yarn(ctx, src, p, float(factor))
    elif kind in ("linear", "dynamic") and qwen and mpe is not None and mpe >= NATIVE_CONTEXT * factor:
        f.add(ROPE_10, WARNING, CONFIG, ("max_position_embeddings",),
              f"{kind} factor {fmt_num(factor)} with max_position_embeddings {mpe} already multiplied: scaling "
              f"applied twice (vLLM allows {fmt_num(mpe * factor)} positions; dynamic NTK only starts at {mpe})",
              f"set max_position_embeddings to the pre-training length {NATIVE_CONTEXT}",
              edit=("set_value", ("max_position_embeddings",), NATIVE_CONTEXT))


def _check_yarn(ctx, src, p, factor):
    f, cfg, mpe, qwen = ctx.folder, ctx.cfg, ctx.mpe, ctx.family is not None
    orig = p.get("original_max_position_embeddings")
    top = cfg.get("original_max_position_embeddings")
    if is_int(top):
        if is_int(orig) and orig != top:
            f.add(ROPE_11, WARNING, CONFIG, ("original_max_position_embeddings",),
                  f"top-level original_max_position_embeddings {top} != {src}.original_max_position_embeddings "
                  f"{orig}: transformers v5 uses the top-level value, v4 and vLLM the {src} one",
                  "keep one value (Qwen: 32768 inside the rope block)")
        orig = top  # v5: a top-level value overrides the dict
    if orig is None:
        edit = None
        if qwen and mpe in (NATIVE_CONTEXT, int(NATIVE_CONTEXT * factor)):
            edit = ("insert_key", (src,), "original_max_position_embeddings", NATIVE_CONTEXT)
        f.add(ROPE_07, ERROR, CONFIG, (src,),
              f"yarn without original_max_position_embeddings: vLLM raises KeyError, transformers assumes the "
              f"pre-training length was max_position_embeddings ({mpe})",
              f'add "original_max_position_embeddings": {NATIVE_CONTEXT}' if qwen else
              'add "original_max_position_embeddings" (the pre-training length)', edit=edit)
        return
    if not is_int(orig) or orig <= 0:
        return
    f.add(ROPE_05, INFO, CONFIG, (src,),
          "static YaRN is enabled in the checkpoint config: it also applies to short prompts (Qwen recommends "
          "adding it only when long inputs are expected)", "keep it only for long-context deployments")
    bad_orig = qwen and orig != NATIVE_CONTEXT
    if bad_orig:
        f.add(ROPE_04, ERROR if orig > NATIVE_CONTEXT else WARNING, CONFIG,
              (src, "original_max_position_embeddings"),
              f"original_max_position_embeddings {orig} != Qwen's native pre-training length {NATIVE_CONTEXT}: "
              "the YaRN frequency ramp is computed for the wrong length",
              f"set original_max_position_embeddings to {NATIVE_CONTEXT}",
              edit=("set_value", (src, "original_max_position_embeddings"), NATIVE_CONTEXT))
    if mpe is None:
        return
    target = factor * orig
    target_i = int(target) if float(target).is_integer() else None
    if mpe == target:
        return
    edit = None if bad_orig or target_i is None else ("set_value", ("max_position_embeddings",), target_i)
    fix = f"set max_position_embeddings to factor x original = {fmt_num(target)}"
    eff = f"transformers 4.45-4.55 use {mpe}/{orig} = {fmt_num(round(mpe / orig, 4))} as the effective factor"
    if mpe > target:
        f.add(ROPE_03, ERROR, CONFIG, ("max_position_embeddings",),
              f"yarn: max_position_embeddings {mpe} > factor x original ({fmt_num(target)}): scaling applied "
              f"twice, positions past {fmt_num(target)} are extrapolated; {eff}", fix, edit=edit)
    elif mpe == orig:
        f.add(ROPE_03, WARNING, CONFIG, ("max_position_embeddings",),
              f"yarn: max_position_embeddings left at the original {mpe} instead of factor x original "
              f"({fmt_num(target)}): {eff} (YaRN silently off); servers cap the context at {mpe}", fix, edit=edit)
    else:
        f.add(ROPE_03, WARNING, CONFIG, ("max_position_embeddings",),
              f"yarn: max_position_embeddings {mpe} != factor x original ({fmt_num(target)}); {eff} "
              "(long-context quality drop)", fix, edit=edit)
