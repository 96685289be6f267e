"""QL-SWA: sliding-window attention as transformers v4 (`use_sliding_window`, `max_window_layers`) and v5
(`layer_types`) decide which layers it windows."""

from __future__ import annotations

from qwen_jax.lint.core import CONFIG, ERROR, INFO, WARNING, is_int
from qwen_jax.lint.rules import SWA_01, SWA_02, SWA_03


def check_sliding_window(ctx):
    cfg, f = ctx.cfg, ctx.folder
    if cfg is None:
        return
    use = cfg.get("use_sliding_window") is True
    sw = cfg.get("sliding_window") if is_int(cfg.get("sliding_window")) else None
    nl = cfg.get("num_hidden_layers") if is_int(cfg.get("num_hidden_layers")) else None
    mwl = cfg.get("max_window_layers") if is_int(cfg.get("max_window_layers")) else 28
    lt = cfg.get("layer_types")
    mpe = ctx.mpe
    v4 = set(range(mwl, nl)) if use and sw is not None and nl is not None else set()
    v5 = v4
    if isinstance(lt, list) and all(isinstance(x, str) for x in lt):
        bad = sorted({x for x in lt if x not in ("full_attention", "sliding_attention")})
        if nl is not None and len(lt) != nl:
            f.add(SWA_03, ERROR, CONFIG, ("layer_types",),
                  f"layer_types has {len(lt)} entries for {nl} layers: transformers v5 refuses the config",
                  "one entry per layer")
        elif bad and ctx.family:
            f.add(SWA_03, ERROR, CONFIG, ("layer_types",), f"layer_types contains {bad}: not a Qwen layer kind",
                  "use full_attention / sliding_attention")
        v5 = {i for i, x in enumerate(lt) if x == "sliding_attention"} if use and sw is not None else set()
        if v5 != v4 and nl is not None and len(lt) == nl:
            f.add(SWA_03, WARNING, CONFIG, ("layer_types",),
                  f"layer_types windows layers {_ranges(v5) or 'none'} but use_sliding_window/max_window_layers "
                  f"give {_ranges(v4) or 'none'}: transformers v4 and v5 window different layers",
                  "make layer_types match use_sliding_window and max_window_layers")
    windowed = v5
    if use and sw is not None:
        if windowed and (mpe is None or sw < mpe):
            f.add(SWA_01, WARNING, CONFIG, ("use_sliding_window",),
                  f"sliding-window attention is on: layers {_ranges(windowed)} only attend to the last {sw} tokens "
                  "(Qwen releases never trained with it; v4 applies it only with flash-attention)",
                  'set "use_sliding_window": false unless the model was trained with it')
        elif not windowed:
            f.add(SWA_01, INFO, CONFIG, ("use_sliding_window",),
                  f"use_sliding_window is true but max_window_layers {mwl} >= num_hidden_layers {nl}: no layer is "
                  "windowed", "set use_sliding_window to false to say what runs")
    elif sw is not None and mpe is not None and sw < mpe and not use:
        dca = isinstance(cfg.get("dual_chunk_attention_config"), dict)  # 1M models: DCA bounds attention anyway
        f.add(SWA_02, INFO if dca else WARNING, CONFIG, ("sliding_window",),
              f"inactive sliding_window {sw} < max_position_embeddings {mpe}: runtimes that ignore "
              f"use_sliding_window cap the usable context/KV window at {sw}",
              'set "sliding_window": null (or equal to max_position_embeddings)',
              edit=("set_value", ("sliding_window",), None))


def _ranges(s):
    s = sorted(s)
    if not s:
        return ""
    out, a, b = [], s[0], s[0]
    for x in s[1:]:
        if x == b + 1:
            b = x
            continue
        out.append(f"{a}-{b}" if a != b else str(a))
        a = b = x
    out.append(f"{a}-{b}" if a != b else str(a))
    return ",".join(out)
