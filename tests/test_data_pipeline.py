"""Packing, schedule, mixture, determinism, resume and per-process sharding of the input pipeline."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from qwen_jax.data import default_config, make_pipeline, parse_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "omicron", "pi", "rho", "sigma"]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def text_file(tmp_path, name="t.jsonl", n=60, max_words=60, seed=0):
    rng = random.Random(seed)
    recs = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))} for _ in range(n)]
    return write_jsonl(tmp_path / name, recs), recs


def cfg_for(sources, **kw):
    c = default_config()
    c.sources = sources
    c.seq_len = 64
    c.global_batch_size = 4
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def check_row_invariants(b):
    ids, pos, seg, tgt, lm = (b[k] for k in ("input_ids", "positions", "segment_ids", "targets", "loss_mask"))
    assert ids.dtype == pos.dtype == seg.dtype == tgt.dtype == np.int32 and lm.dtype == np.float32
    for r in range(ids.shape[0]):
        s = seg[r]
        n = int((s > 0).sum())
        assert (s[:n] > 0).all() and (s[n:] == 0).all()  # real tokens first, then padding
        assert (ids[r, n:] == 0).all() and (lm[r, n:] == 0).all()
        if n:
            assert s[0] == 1 and set(np.diff(s[:n])) <= {0, 1}  # segments numbered 1, 2, ... in order
        for k in range(1, int(s.max()) + 1 if n else 1):
            idx = np.where(s == k)[0]
            assert (pos[r, idx] == np.arange(len(idx))).all()  # positions restart at 0 per segment
            assert (tgt[r, idx[:-1]] == ids[r, idx[1:]]).all()  # targets: next token in the same segment
            assert lm[r, idx[-1]] == 0  # never predict across a segment end
        assert ((lm[r] == 0) | (lm[r] == 1)).all()


def segments(batches):
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            s = b["segment_ids"][r]
            for k in range(1, int(s.max()) + 1):
                out.append(tuple(b["input_ids"][r][s == k].tolist()))
    return out


def tokenized(p, recs, source=0):
    return [p.encode(r, source)["ids"].tolist() for r in recs]


@pytest.mark.parametrize("mode", ["truncate", "split"])
def test_packing_invariants_and_no_token_lost(tmp_path, mode):
    path, recs = text_file(tmp_path, n=80, max_words=90)
    p = make_pipeline(cfg_for([{"path": path, "kind": "text", "weight": 1.0}], num_epochs=1, long_examples=mode))
    it = p.iterator()
    batches = list(it)
    for b in batches:
        check_row_invariants(b)
        assert b["input_ids"].shape == (4, 64)
    docs = tokenized(p, recs)
    S = 64
    long_docs = [d for d in docs if len(d) > S]
    assert long_docs  # the fixture has examples longer than seq_len
    st = it.stats()
    if mode == "truncate":
        want = collections.Counter(tuple(d[:S]) for d in docs)
        assert st["truncated_examples"] == len(long_docs)
        assert st["truncated_tokens"] == sum(len(d) - S for d in long_docs)
        assert st["tokens"] == sum(min(len(d), S) for d in docs)
    else:
        want = collections.Counter(tuple(d[i:i + S]) for d in docs for i in range(0, len(d), S))
        assert st["split_examples"] == len(long_docs) and st.get("truncated_examples", 0) == 0
        assert st["tokens"] == sum(len(d) for d in docs)
    assert collections.Counter(segments(batches)) == want
    assert st["packing_efficiency"] > 0.75


def test_no_packing_one_example_per_row(tmp_path):
    path, recs = text_file(tmp_path, n=10, max_words=20)
    p = make_pipeline(cfg_for([{"path": path, "kind": "text", "weight": 1.0}], num_epochs=1, pack=False))
    batches = list(p.iterator())
    for b in batches:
        check_row_invariants(b)
        assert b["segment_ids"].max() <= 1
    assert sum(int((b["segment_ids"].max(axis=1) == 1).sum()) for b in batches) == 10


def test_schedule_parsing():
    st = parse_schedule("2048:0,8192:1000,32768:3000", seq_len=0, global_batch_size=32)
    assert [(s.seq_len, s.start_step, s.global_batch_size) for s in st] == [(2048, 0, 32), (8192, 1000, 8),
                                                                            (32768, 3000, 2)]
    assert len({s.tokens_per_batch for s in st}) == 1
    st = parse_schedule("2048:0,8192:1000", seq_len=0, global_batch_size=32, hold_tokens_per_batch=False)
    assert [s.global_batch_size for s in st] == [32, 32]
    st = parse_schedule("1024:0,4096:10:6", seq_len=0, global_batch_size=8)
    assert [s.global_batch_size for s in st] == [8, 6]
    assert parse_schedule("", seq_len=512, global_batch_size=4)[0].seq_len == 512
    for bad in ["2048:5", "2048", "a:0", "2048:0,4096:0", "2048:0,3000:10"]:
        with pytest.raises(ValueError):
            parse_schedule(bad, seq_len=0, global_batch_size=8)


def sched_cfg(tmp_path, **kw):
    path, _ = text_file(tmp_path, n=200, max_words=70, seed=1)
    chat = {"path": "bundled:chat.jsonl", "kind": "chat", "weight": 2.0}
    return cfg_for([chat, {"path": path, "kind": "text", "weight": 1.0}], seq_len_schedule="64:0,128:3,256:5",
                   global_batch_size=8, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_schedule_batch_shapes_and_token_budget(tmp_path):
    p = make_pipeline(sched_cfg(tmp_path))
    assert p.num_lanes == 2
    it = p.iterator()
    shapes = []
    for step in range(8):
        b = next(it)
        check_row_invariants(b)
        shapes.append(b["input_ids"].shape)
        assert b["input_ids"].shape == (p.per_process_batch_at(step), p.seq_len_at(step))
    assert shapes == [(8, 64)] * 3 + [(4, 128)] * 2 + [(2, 256)] * 3  # shape changes only at stage boundaries
    assert {a * b for a, b in shapes} == {512}
    p2 = make_pipeline(sched_cfg(tmp_path))
    b = next(p2.iterator(start_step=4))
    assert b["input_ids"].shape == (4, 128)


def test_mixture_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(50)])
    p = make_pipeline(cfg_for([{"path": a, "kind": "text", "weight": 3.0}, {"path": b, "kind": "text", "weight": 1.0}],
                              global_batch_size=2))
    it = p.iterator()
    take(it, 30)
    st = it.stats()
    n0, n1 = st["examples/source0"], st["examples/source1"]
    assert n0 + n1 > 300
    assert abs(n0 / (n0 + n1) - 0.75) < 0.02


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_determinism_by_seed(tmp_path):
    c = sched_cfg(tmp_path)
    x = take(make_pipeline(c).iterator(), 6)
    assert_same(x, take(make_pipeline(c).iterator(), 6))
    c.seed = 1
    y = take(make_pipeline(c).iterator(), 6)
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("n", [0, 2, 4, 6])
def test_resume_is_bit_identical(tmp_path, n):
    c = sched_cfg(tmp_path, long_examples="split")
    it = make_pipeline(c).iterator()
    take(it, n)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    rest = take(it, 4)
    it2 = make_pipeline(c).iterator()
    it2.set_state(state)
    assert it2.step == n
    assert_same(take(it2, 4), rest)
    assert it2.get_state() == it.get_state()


def test_resume_refuses_other_config(tmp_path):
    c = sched_cfg(tmp_path)
    state = make_pipeline(c).iterator().get_state()
    c.seed = 7
    with pytest.raises(ValueError, match="different data config"):
        make_pipeline(c).iterator().set_state(state)


def test_grain_checkpoint_handler_roundtrip(tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler, CheckpointRestore, CheckpointSave

    c = sched_cfg(tmp_path)
    it = make_pipeline(c).iterator()
    take(it, 3)
    h = CheckpointHandler()
    ckpt = epath.Path(tmp_path / "ckpt")
    ckpt.mkdir()
    h.save(ckpt, args=CheckpointSave(it))
    assert (ckpt / "process_0-of-1.json").exists()
    rest = take(it, 3)
    it2 = h.restore(ckpt, args=CheckpointRestore(make_pipeline(c).iterator()))
    assert_same(take(it2, 3), rest)


@pytest.mark.parametrize("process_count", [2])
def test_per_process_shards_concatenate_to_global_batch(tmp_path, process_count):
    c = sched_cfg(tmp_path)
    full = take(make_pipeline(c).iterator(), 7)
    parts = [take(make_pipeline(c, process_index=i, process_count=process_count).iterator(), 7)
             for i in range(process_count)]
    for step, b in enumerate(full):
        for k in b:
            np.testing.assert_array_equal(np.concatenate([pp[step][k] for pp in parts]), b[k])
    # Disjoint documents: each process tokenizes only its lanes' documents.
    p0 = make_pipeline(c, process_index=0, process_count=2)
    p1 = make_pipeline(c, process_index=1, process_count=2)
    g0 = {p0.lane_records.global_index(j) for j in range(100)}
    g1 = {p1.lane_records.global_index(j) for j in range(100)}
    assert not g0 & g1 and len(g0 | g1) == 200
    with pytest.raises(ValueError, match="must divide data.num_lanes"):
        make_pipeline(c, process_index=0, process_count=4)


def test_worker_processes_match_in_process(tmp_path):
    c = sched_cfg(tmp_path)
    it0 = make_pipeline(c).iterator()
    ref = take(it0, 6)
    c.worker_count = 2
    it = make_pipeline(c).iterator()
    try:
        assert_same(take(it, 3), ref[:3])
        state = it.get_state()
    finally:
        it.close()
    c.worker_count = 0  # the state does not depend on the worker count
    it2 = make_pipeline(c).iterator()
    it2.set_state(state)
    assert_same(take(it2, 3), ref[3:])


def test_cli_show(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "qwen_jax.data", "--config=configs/demo.py", "--show", "3",
                          "--stats_steps", "5", "--color", "never"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s = out.stdout
    assert s.count("════ step 0, row") == 3
    assert "⟪<|im_start|>user\n" in s and "<|im_end|>⟪\n" in s  # prompt marked untrained, reply + <|im_end|> trained
    for key in ("tokens:", "packing efficiency:", "truncated examples:", "mask ratio", "bad records skipped:"):
        assert key in s


def test_token_cache_gives_identical_batches(tmp_path):
    c = sched_cfg(tmp_path, long_examples="split")
    ref_it = make_pipeline(c).iterator()
    ref = take(ref_it, 7)
    c.cache_dir = str(tmp_path / "cache")
    p = make_pipeline(c)
    assert p.cached and len(os.listdir(c.cache_dir)) == 2
    it = p.iterator()
    assert_same(take(it, 7), ref)
    assert it.get_state()["lanes"] == ref_it.get_state()["lanes"]
    p2 = make_pipeline(c)  # cache hit
    it2 = p2.iterator()
    it2.set_state(json.loads(json.dumps(make_pipeline(c).iterator().get_state())))
    assert_same(take(it2, 3), ref[:3])


def test_token_cache_keeps_bad_record_semantics(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": "fine"}, {"oops": 1}, {"text": "also fine"}])
    c = cfg_for([{"path": path, "kind": "text", "weight": 1.0}], num_epochs=1, shuffle=False,
                cache_dir=str(tmp_path / "cache"))
    with pytest.raises(Exception, match=r"b\.jsonl:2: text record"):
        list(make_pipeline(c).iterator())
    c.skip_bad_records = True
    it = make_pipeline(c).iterator()
    list(it)
    assert it.stats()["bad_records"] == 1 and it.stats()["examples"] == 2
