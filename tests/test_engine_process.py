"""engine_process._Worker's messages to the HTTP processes, over real pipes from a real engine on
the CPU: tokens go out every step, stats alone at most every STATS_INTERVAL_S while the engine
runs, and every connection hears the idle engine's stats before it waits."""
from __future__ import annotations

import sys
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine_process  # noqa: E402
from engine import Engine  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def received(conn: Connection) -> list[tuple]:
    out = []
    while conn.poll(0):
        out.append(engine_process.pickle.loads(conn.recv_bytes()))
    return out


@pytest.mark.parametrize("interval_s", [0.0, 3600.0])
def test_idle_connections_hear_stats_at_most_every_interval_and_the_final_ones(
        monkeypatch: pytest.MonkeyPatch, interval_s: float) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=192, n_layer=2, n_head=4, n_embd=64)).eval()
    worker = engine_process._Worker(Engine(model, max_batch=4), {})
    monkeypatch.setattr(engine_process, "STATS_INTERVAL_S", interval_s)
    ends = []
    for owner in (True, False, False):  # one connection submits, two idle ones (other HTTP workers)
        to_child, from_parent = Pipe()
        from_child, to_parent = Pipe()
        ends.append((worker.add_client(from_parent, to_parent, owner), from_child))
    busy, busy_conn = ends[0]
    worker.submit(busy, 7, [1, 2, 3, 4], (20, 0.0, 0, 1.0, None, ()))
    steps = 0
    while worker.engine.has_work():
        worker.engine.step()  # on_step_end is worker.flush
        steps += 1
    busy_msgs = received(busy_conn)
    tokens = [t for msg in busy_msgs for _, new in msg[1] for t in new]
    assert len(tokens) == 20 and [f[:2] for msg in busy_msgs for f in msg[2]] == [(7, "length")]
    for _, conn in ends[1:]:
        idle_msgs = received(conn)
        assert all(not msg[1] and not msg[2] for msg in idle_msgs)  # others' tokens never go here
        if interval_s == 0.0:  # stats change every step (counters, KV usage): one message per step
            assert len(idle_msgs) == steps, (len(idle_msgs), steps)
        else:  # only the first stats they ever hear, then nothing until the engine idles
            assert len(idle_msgs) == 1, len(idle_msgs)
    worker.flush(idle=True)  # what run() does before it blocks
    final = busy_msgs[-1][3]
    assert final[:2] == (0, 0) and final[5]["decode_steps"] >= 19
    for _, conn in ends[1:]:
        msgs = received(conn)
        assert msgs[-1][3] == final if interval_s else not msgs  # already current without the limit
    # a change of health goes to every connection at once, engine running or not
    worker.engine.healthy = False
    worker.flush()
    assert all(received(conn)[-1][3][3] is False for _, conn in ends)
