"""Show what the model is trained on: ``python -m qwen_jax.data --config=configs/demo.py --show 3``.

Prints ``--show`` packed rows decoded, segment by segment.  Tokens the loss is computed on (targets with
``loss_mask`` 1) are printed normally; the other tokens (prompt, template, context) are dimmed on a terminal, or, with
``--color=never``/no tty, shown inside ``⟪…⟫``.  Then statistics over ``--stats_steps`` batches: tokens, packing
efficiency, truncations/splits, bad records, mask ratio.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file with a .data field")
_SHOW = flags.DEFINE_integer("show", 3, "packed rows to print")
_STATS_STEPS = flags.DEFINE_integer("stats_steps", 50, "batches to compute statistics over")
_COLOR = flags.DEFINE_enum("color", "auto", ["auto", "always", "never"], "dim untrained tokens with ANSI colors")
_PROCESS = flags.DEFINE_string("process", "0/1", "process_index/process_count to simulate")

DIM, RESET = "\x1b[2m", "\x1b[0m"


def render_row(pipeline, batch: dict, r: int, color: bool) -> str:
    ids, seg, mask = batch["input_ids"][r], batch["segment_ids"][r], batch["loss_mask"][r]
    trained = np.zeros(len(ids), bool)
    trained[1:] = mask[:-1] > 0  # token t+1 is trained when loss_mask[t] == 1
    lines = []
    for s in [int(x) for x in np.unique(seg) if x > 0]:
        idx = np.where(seg == s)[0]
        lines.append(f"── segment {s}: {len(idx)} tokens, {int(trained[idx].sum())} trained ──")
        out, start = [], idx[0]
        for k in range(idx[0] + 1, idx[-1] + 2):
            if k > idx[-1] or trained[k] != trained[start]:
                text = pipeline.decode(ids[start:k])
                if trained[start]:
                    out.append(text)
                else:
                    out.append(f"{DIM}{text}{RESET}" if color else f"⟪{text}⟫")
                start = k
        lines.append("".join(out))
    pad = int((seg == 0).sum())
    if pad:
        lines.append(f"── padding: {pad} tokens ──")
    return "\n".join(lines)


def main(argv):
    del argv
    from qwen_jax.data import make_pipeline

    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required")
    color = _COLOR.value == "always" or (_COLOR.value == "auto" and sys.stdout.isatty())
    pi, pc = (int(x) for x in _PROCESS.value.split("/"))
    pipeline = make_pipeline(cfg.data, process_index=pi, process_count=pc)
    print(pipeline.chat_setup.describe())
    it = pipeline.iterator()
    shown, steps = 0, 0
    try:
        while steps < max(_STATS_STEPS.value, 1) or shown < _SHOW.value:
            step = it.step
            batch = next(it)
            steps += 1
            for r in range(batch["input_ids"].shape[0]):
                if shown >= _SHOW.value:
                    break
                print(f"════ step {step}, row {r} (seq_len {batch['input_ids'].shape[1]}) ════")
                print(render_row(pipeline, batch, r, color))
                shown += 1
    except StopIteration:
        print("(end of data)")
    finally:
        it.close()
    st = it.stats()
    print(f"════ statistics over {steps} batches (process {pi}/{pc}) ════")
    print(f"stages:              {', '.join(f'{s.seq_len}x{s.global_batch_size} from step {s.start_step}' for s in pipeline.stages)}")  # noqa: E501
    print(f"examples read:       {st.get('examples', 0)}")
    print(f"tokens:              {st.get('tokens', 0)} in {st.get('slots', 0)} slots")
    print(f"packing efficiency:  {st['packing_efficiency']:.2%} ({st.get('segments', 0)} segments in "
          f"{st.get('rows', 0)} rows)")
    print(f"truncated examples:  {st.get('truncated_examples', 0)} ({st.get('truncated_tokens', 0)} tokens dropped)")
    print(f"split examples:      {st.get('split_examples', 0)}")
    print(f"bad records skipped: {st.get('bad_records', 0)}")
    print(f"loss tokens:         {st.get('loss_tokens', 0)} (mask ratio {st['mask_ratio']:.2%} of real tokens)")


if __name__ == "__main__":
    app.run(main)
