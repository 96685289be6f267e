"""Two local CPU processes (jax.distributed, one device each) give the losses of one process with two devices."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tests import train_launch as tl

pytestmark = pytest.mark.slow
STEPS = ["--config.total_steps=6", "--config.save_every=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    result = tl.run(single, *STEPS, devices=2)
    assert result.returncode == 0, result.stdout + result.stderr

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [tl.launch(multi, *STEPS, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                       f"--process_id={i}", devices=1, log=tmp_path / f"p{i}.log") for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    assert "over 2 process(es)" in logs[0]
    a, b = tl.losses(single), tl.losses(multi)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)
    assert (multi / "checkpoints" / "6").is_dir()
