"""ActorGroup on a real local Ray: actors killed by pid in the middle of a call, a hung call, a
restart limit, a stateful role, a bug in a method, and a stop request while waiting."""
import os
import signal
import sys
import threading
import time

import pyarrow as pa
import pytest
import ray
from ray import cloudpickle

from prorl_actors.group import ActorGroup, ActorLost, PieceFailed, Preempted, TooManyRestarts, WorkPool
from prorl_actors.roles import Restart

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import this test module


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    ray.shutdown()


class Worker:
    """hang_once: the first actor of a rank to see this file's absence hangs (a stuck call)."""

    def __init__(self, tag: str, hang_once: str | None = None, broken_if: str | None = None):
        if broken_if and os.path.exists(broken_if):
            raise RuntimeError("cannot start")
        self.tag, self.hang_once, self.weights = tag, hang_once, None

    def ping(self):
        return "ok"

    def pid(self):
        return os.getpid()

    def work(self, table, delay=0.0, slow_tag=None, slow_s=1.0):
        if self.hang_once and not os.path.exists(self.hang_once):
            open(self.hang_once, "w").close()
            time.sleep(3600)
        time.sleep(delay + (slow_s if self.tag == slow_tag else 0.0))
        return table.append_column("by", pa.array([f"{self.tag}:{self.weights}"] * table.num_rows))

    def set_weights(self, w):
        self.weights = w

    def fail(self):
        raise ValueError("a bug in the method")

    def fail_on(self, table, tags):
        if self.tag in tags:
            raise ValueError(f"cannot do this on {self.tag}")
        return table.append_column("by", pa.array([self.tag] * table.num_rows))


def _group(n, events, extra=(), **kw):
    return ActorGroup(Worker, n, num_cpus=0.1, args=lambda rank: (f"w{rank}", *extra),
                      on_event=lambda kind, **f: events.append((kind, f)), **kw)


def _kill_later(pid, after_s):
    threading.Timer(after_s, os.kill, (pid, signal.SIGKILL)).start()


def test_dead_actor_is_replaced_brought_up_to_date_and_its_shard_resent(local_ray):
    events, current = [], {"w": 7}
    grp = _group(2, events, on_restart=lambda a: ray.get(a.set_weights.remote(current["w"])))
    grp.call_all(Worker.set_weights, 7)
    _kill_later(ray.get(grp.actors[1].pid.remote()), 0.5)
    table = pa.table({"x": list(range(10))})
    out = grp.map_table(Worker.work, table, 2.0, step=3)
    assert out["x"].to_pylist() == list(range(10))            # every row, in order
    assert out["by"].to_pylist() == ["w0:7"] * 5 + ["w1:7"] * 5  # the replacement got the weights first
    kinds = [k for k, _ in events]
    assert kinds == ["actor_died", "actor_restarted", "work_redispatched"]
    assert events[0][1]["role"] == "Worker" and events[0][1]["rank"] == 1 and events[0][1]["step"] == 3
    assert "ActorDiedError" in events[0][1]["cause"] and events[2][1]["rows"] == 5
    assert grp.restarts == 1
    grp.kill()


def test_chunks_go_to_whichever_actor_is_free(local_ray):
    grp = _group(2, [])
    grp.ping()                 # both up: an actor's start-up is no part of the split
    out = grp.map_table(Worker.work, pa.table({"x": list(range(12))}), 0.0, "w1", 5.0, num_chunks=6)
    assert out["x"].to_pylist() == list(range(12))                 # chunk order, whoever ran them
    by = out["by"].to_pylist()
    # w1 takes 5 s per chunk: w0 does the five other chunks (instant ones) meanwhile
    assert by[2:4] == ["w1:None"] * 2 and by.count("w0:None") == 10
    grp.kill()


def test_hung_call_is_killed_and_sent_again(local_ray, tmp_path):
    events = []
    grp = _group(1, events, call_timeout_s=1.5, extra=(str(tmp_path / "hung"),))
    grp.ping()                 # up: the timeout measures the hung call, not the actor's start-up
    out = grp.map_table(Worker.work, pa.table({"x": [1, 2]}))
    assert out.num_rows == 2
    assert [k for k, _ in events] == ["actor_died", "actor_restarted", "work_redispatched"]
    assert "no answer in 1.5 s" in events[0][1]["cause"]
    grp.kill()


def test_a_call_has_the_deadline_it_is_given(local_ray, tmp_path):
    """A group with no call_timeout_s still bounds a call given timeout_s (the weight sync's)."""
    events = []
    grp = _group(1, events, extra=(str(tmp_path / "hung"),))
    grp.ping()
    out = grp.call_all(Worker.work, pa.table({"x": [1]}), timeout_s=1.5)
    assert out[0].num_rows == 1
    assert [k for k, _ in events] == ["actor_died", "actor_restarted"]
    assert "no answer in 1.5 s" in events[0][1]["cause"]
    grp.kill()


def test_a_piece_that_raises_is_tried_again_elsewhere_then_given_up(local_ray):
    """A pool with retries (the generators'): a piece whose method raises goes to another actor;
    one that raises on every try comes back as PieceFailed with its cause, each failure recorded;
    no actor is replaced (a method that raises is not a death)."""
    events = []
    grp = _group(2, events)
    pool = WorkPool(grp, retries=1)
    pool.submit("a", Worker.fail_on, pa.table({"x": [1]}), ["w0"])
    pool.submit("b", Worker.fail_on, pa.table({"x": [2]}), ["w0", "w1"])
    done = {}
    while pool.pending():
        done.update(pool.poll(1.0, step=4))
    assert done["a"]["by"].to_pylist() == ["w1"]
    assert isinstance(done["b"], PieceFailed) and done["b"].cause.startswith("ValueError: cannot do this on w")
    failed = [f for k, f in events if k == "work_failed"]
    assert sorted((f["method"], f["attempt"]) for f in failed) == [("fail_on", 1), ("fail_on", 1), ("fail_on", 2)]
    assert all(f["step"] == 4 for f in failed) and grp.restarts == 0
    with pytest.raises(Exception, match="a bug in the method"):   # without retries: raised, as before
        plain = WorkPool(grp)
        plain.submit(0, Worker.fail)
        while plain.pending():
            plain.poll(1.0)
    grp.kill()


def test_restart_limit(local_ray):
    """max_restarts 1: the first death (0.3 s into a 5 s call) is survived, the second is not."""
    events = []
    grp = _group(1, events, max_restarts=1)
    _kill_later(ray.get(grp.actors[0].pid.remote()), 0.3)
    grp.call_all(Worker.work, pa.table({"x": [1]}), 5.0)          # replaced, and the call sent again
    assert grp.restarts == 1
    _kill_later(ray.get(grp.actors[0].pid.remote()), 0.3)
    with pytest.raises(TooManyRestarts, match="max_actor_restarts"):
        grp.call_all(Worker.work, pa.table({"x": [1]}), 5.0)
    assert [k for k, _ in events] == ["actor_died", "actor_restarted", "actor_died"]
    grp.kill()


def test_stateful_role_leaves_restoring_to_the_caller(local_ray):
    events = []
    grp = _group(1, events, restart=Restart.ROLL_BACK)
    _kill_later(ray.get(grp.actors[0].pid.remote()), 0.3)
    with pytest.raises(ActorLost) as e:
        grp.call_one(Worker.work, pa.table({"x": [1]}), 2.0)
    assert e.value.role == "Worker" and [k for k, _ in events] == ["actor_died"]
    grp.replace(0, e.value.cause)
    assert grp.call_one(Worker.work, pa.table({"x": [1]}))["x"].to_pylist() == [1] and grp.restarts == 1
    grp.kill()


def test_rebuild_restores_the_replacement_and_makes_the_whole_call_again(local_ray):
    """REBUILD (the reference): a death mid-call starts a replacement, gives it the state kept
    for it (on_restart) and repeats the call on every actor; no piece is re-dispatched."""
    events, restored = [], []

    def restore(actor):
        restored.append(1)
        ray.get(actor.set_weights.remote("kept"))

    grp = _group(2, events, restart=Restart.REBUILD, on_restart=restore)
    grp.call_all(Worker.set_weights, "kept")
    _kill_later(ray.get(grp.actors[1].pid.remote()), 0.5)
    out = grp.map_table(Worker.work, pa.table({"x": list(range(4))}), 1.5)
    assert out["x"].to_pylist() == [0, 1, 2, 3]
    assert set(out["by"].to_pylist()) == {"w0:kept", "w1:kept"}     # the replacement holds what was kept
    assert [k for k, _ in events] == ["actor_died", "actor_restarted"] and restored == [1] and grp.restarts == 1
    with pytest.raises(TypeError, match="needs on_restart"):
        _group(1, [], restart=Restart.REBUILD)
    grp.kill()


def test_a_group_takes_only_methods_of_its_interface(local_ray):
    """Methods are passed as functions of the interface, never as strings; anything else fails
    before a call is sent."""
    grp = _group(1, [])
    for wrong in ("work", len, _Other.work):      # a name; a function not of Worker; another class's "work"
        with pytest.raises(TypeError, match="is not a method of Worker"):
            grp.call_one(wrong, pa.table({"x": [1]}))
        with pytest.raises(TypeError, match="is not a method of Worker"):
            WorkPool(grp).submit(0, wrong)
    with pytest.raises(TypeError, match="_Other lacks ping, pid, set_weights, fail, fail_on of Worker"):
        ActorGroup(_Other, 1, num_cpus=0.1, interface=Worker)     # refused before any actor starts
    grp.kill()


class _Other:
    def work(self, table):
        return table


def test_a_bug_in_a_method_is_raised_not_restarted(local_ray):
    events = []
    grp = _group(1, events)
    with pytest.raises(ray.exceptions.RayTaskError, match="a bug in the method"):
        grp.call_one(Worker.fail)
    assert events == [] and grp.restarts == 0
    grp.kill()


def test_a_replacement_that_cannot_start_is_an_error_not_a_loop(local_ray, tmp_path):
    events = []
    flag = tmp_path / "broken"
    grp = _group(1, events, extra=(None, str(flag)))
    grp.ping()
    flag.touch()              # from now on the constructor raises
    _kill_later(ray.get(grp.actors[0].pid.remote()), 0.3)
    with pytest.raises(RuntimeError, match="no replacement can start"):
        grp.call_one(Worker.work, pa.table({"x": [1]}), 2.0)
    assert grp.restarts == 1
    grp.kill()


def test_stop_request_interrupts_a_wait(local_ray):
    stop = {"now": False}
    grp = _group(1, [], should_stop=lambda: stop["now"])
    threading.Timer(0.5, stop.update, kwargs={"now": True}).start()
    t0 = time.time()
    with pytest.raises(Preempted):
        grp.map_table(Worker.work, pa.table({"x": [1]}), 600.0)
    assert time.time() - t0 < 300     # a deadline, not a speed: the call itself would take 600 s
    grp.kill()
