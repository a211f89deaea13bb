"""The sandbox end to end: real zygotes, namespaces, cgroups, seccomp. Skipped, with the missing
layers named, on a host that lacks them (the weaker paths are tested with allow_weaker)."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from sandbox import Limits, Sandbox, SandboxUnavailable, TestCase, probe

ISO = probe()
needs_full = pytest.mark.skipif(not ISO.full, reason=f"host lacks isolation layers: {ISO.missing}")

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
# the fixtures `sb` (a sandbox of 2 workers per module) and `nothing_left` are in conftest.py,
# shared with tests/test_sandbox_reviews.py


def test_stdio_and_call_verdicts(sb):
    program = ADD.replace("a, b", "a, b") + (
        "def half(x):\n    return [x / 2, {'s': str(x)}]\n"
        "class Solution:\n    def twice(self, xs):\n        return [2 * x for x in xs]\n")
    program = "import sys\nif __name__ == '__main__' and sys.stdin.readable():\n" \
              "    line = sys.stdin.readline()\n    if line:\n" \
              "        a, b = map(int, line.split())\n        print(a + b, ' ')\n        print()\n" \
              + program.split("\n", 2)[2]
    tests = [TestCase.stdio("1 2\n", "3"), TestCase.stdio("5 5\n", "11"),
             TestCase.call("half", [3], [1.5000000001, {"s": "3"}]), TestCase.call("half", [3], [1.6, {"s": "3"}]),
             TestCase.call("Solution.twice", [[1, 2]], [2, 4]), TestCase.call("missing", [], 1)]
    r = sb.run(program, tests)
    assert r.verdicts == ["pass", "wrong", "pass", "wrong", "pass", "error"], r.details
    assert r.passed == 3 and r.total == 6 and "KeyError" in r.details[5]


def test_syntax_error_is_an_error_for_every_test(sb):
    r = sb.run("def f(:\n", [TestCase.stdio("", "x"), TestCase.call("f", [], 1)])
    assert r.verdicts == ["error", "error"] and r.details[0].startswith("SyntaxError")


def test_a_test_that_kills_its_process_does_not_take_the_others(sb):
    program = ("import os, sys\ncmd = input()\n"
               "if cmd == 'die': os._exit(3)\n"
               "if cmd == 'loop':\n    while True: pass\n"
               "if cmd == 'segv':\n    import ctypes; ctypes.string_at(0)\n"
               "print(cmd.upper())\n")
    tests = [TestCase.stdio(f"{c}\n", c.upper()) for c in ("a", "die", "b", "loop", "c", "segv", "d")]
    r = sb.run(program, tests)
    assert r.verdicts == ["pass", "error", "pass", "timeout", "pass", "killed", "pass"], r.details
    assert r.details[1] == "exit code 3" and r.details[5] == "killed by SIGSEGV"
    assert r.details[3].startswith("over the wall-time limit")     # the loop was stopped at its limit


def test_a_fresh_process_keeps_the_programs_own_tmp(sb):
    """After a test ends its process, the next process of the same program sees its /tmp."""
    program = ("import os, sys\ncmd = input()\n"
               "if cmd == 'write': open('/tmp/state', 'w').write('kept')\n"
               "if cmd == 'die': os._exit(1)\n"
               "if cmd == 'flood': sys.stdout.write('x' * (2 << 20))\n"
               "print(open('/tmp/state').read())\n")
    tests = [TestCase.stdio(f"{c}\n", "kept") for c in ("write", "die", "read", "flood", "read")]
    r = sb.run(program, tests)
    assert r.verdicts == ["pass", "error", "pass", "output_limit", "pass"], r.details


def test_program_budget_stops_later_tests(sb):
    r = sb.run("while True: pass", [TestCase.stdio("", "x")] * 4, limits=Limits(wall_s=0.4, program_wall_s=1.0))
    assert r.verdicts == ["timeout"] * 4
    assert all(d.startswith("over the wall-time limit") for d in r.details[:3])   # the third gets what is left
    assert r.details[3] == "not run: budget"


def test_programs_do_not_see_each_other(sb):
    writer = "import os\nopen('/tmp/left', 'w').write('x')\nos.makedirs('/tmp/d/e')\nprint('ok')"
    reader = "import os\nprint(sorted(os.listdir('/tmp')), os.getcwd())"
    for _ in range(2 * sb.workers):   # every worker has run the writer before a reader
        assert sb.run(writer, [TestCase.stdio("", "ok")]).ok
    rs = sb.run_many([(reader, [TestCase.stdio("", "[] /tmp")])] * (2 * sb.workers))
    assert all(r.ok for r in rs), [r.details for r in rs]


def test_environment_inside(sb):
    program = ("import os, sys\n"
               "print(os.getuid() >= 1000000, os.getgid() >= 1000000, os.getgroups())\n"
               "print(os.getpid(), os.getppid())\n"             # pid 1 of its own namespace
               "print(set(os.listdir('/')) <= {'bin', 'dev', 'lib', 'lib32', 'lib64', 'libx32', 'usr', 'tmp',\n"
               "                               'root', 'home', 'opt'})\n"  # + the path to Python's stdlib
               "print(sorted(os.listdir('/dev')), os.getcwd(), os.listdir('/tmp'))\n"
               "print(os.access('/usr', os.W_OK), os.access('/tmp', os.W_OK))\n")
    expected = ("True True []\n1 0\nTrue\n['full', 'null', 'random', 'urandom', 'zero'] /tmp []\n"
                "False True")
    r = sb.run(program, [TestCase.stdio("", expected)])
    assert r.ok, r.details


def test_run_many_keeps_order_under_threads(sb):
    jobs = [(ADD, [TestCase.stdio(f"{i} {i}\n", str(2 * i))]) for i in range(40)]
    jobs[7] = (ADD, [TestCase.stdio("1 1\n", "3")])
    rs = sb.run_many(jobs)
    assert [r.passed for r in rs] == [1] * 7 + [0] + [1] * 32


def test_no_expected_value_reaches_the_sandbox(sb):
    """The program looks through all of its memory for the expected answer."""
    secret = "expected-7f3a9c"
    program = ("import gc, sys\n"
               "found = any(isinstance(o, (str, bytes)) and 'expected-7f3a' in str(o) for o in gc.get_objects())\n"
               "frames = []\nf = sys._getframe()\n"
               "while f:\n    frames.append(repr(f.f_locals))\n    f = f.f_back\n"
               "print(found or any('expected-7f3a' in x for x in frames))\n")
    r = sb.run(program.replace("'expected-7f3a'", "'expected-7f3a' + '9c'"), [TestCase.stdio("", secret)])
    assert r.verdicts == ["wrong"] and "got 'False'" in r.details[0]


def test_worker_killed_from_outside_is_replaced(sb):
    victim = sb.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.2)
    rs = sb.run_many([(ADD, [TestCase.stdio("2 2\n", "4")])] * 6)
    assert all(r.ok for r in rs)
    assert victim not in sb.worker_pids() and sb.stats["worker_restarts"] >= 1


def test_close_removes_workers_and_cgroups():
    if not ISO.full:
        pytest.skip(f"host lacks isolation layers: {ISO.missing}")
    s = Sandbox(workers=2)
    pids, base = s.worker_pids(), s._tree.bases
    assert s.run(ADD, [TestCase.stdio("1 1\n", "2")]).ok
    s.close()
    assert all(not os.path.exists(b) for b in base)
    for p in pids:
        assert not os.path.exists(f"/proc/{p}") or "Z" in open(f"/proc/{p}/stat").read().split()[2]
    with pytest.raises(RuntimeError, match="closed"):
        s.run(ADD, [])


def test_missing_layers_refuse_unless_allowed(caplog):
    weaker = ISO.without(["net", "seccomp"])
    with pytest.raises(SandboxUnavailable, match=r"net: turned off by the caller.*allow_weaker=True"):
        Sandbox(workers=1, isolation=weaker)
    with caplog.at_level(logging.WARNING, logger="sandbox"):
        with Sandbox(workers=1, isolation=weaker, allow_weaker=True) as s:
            r = s.run("import socket\nsocket.socket()\nprint('made a socket')", [TestCase.stdio("", "made a socket")])
    assert "WITHOUT these isolation layers" in caplog.text and "seccomp" in caplog.text
    assert r.ok   # it really ran without the filter: nothing is weakened silently, or hidden


def test_runs_with_no_isolation_at_all_when_explicitly_allowed(caplog):
    """What a CI machine without root or namespaces gets with allow_weaker: still a separate
    process per program, rlimits, wall-time kills and judging in the parent."""
    bare = ISO.without(["uid", "cgroup", "net", "mount", "pid", "ipc", "uts", "seccomp"])
    with caplog.at_level(logging.WARNING, logger="sandbox"):
        with Sandbox(Limits(wall_s=0.5), workers=1, isolation=bare, allow_weaker=True) as s:
            r = s.run("import sys, time\nif input() == 'x':\n    time.sleep(5)\nprint('ok')",
                      [TestCase.stdio("a\n", "ok"), TestCase.stdio("x\n", "ok"), TestCase.stdio("b\n", "ok")])
    assert r.verdicts == ["pass", "timeout", "pass"]


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_probe_and_run(tmp_path):
    p = run_cli("probe")
    assert p.returncode == 0 and json.loads(p.stdout)["full"] == ISO.full
    prog, tests = tmp_path / "main.py", tmp_path / "tests.json"
    prog.write_text(ADD + "def f(x):\n    return {'y': x}\n")
    tests.write_text(json.dumps([{"kind": "stdio", "stdin": "2 3\n", "stdout": "5"},
                                 {"kind": "stdio", "stdin": "2 3\n", "stdout": "6"},
                                 {"kind": "call", "fn": "f", "args": [1], "expected": {"y": 1}}]))
    extra = [] if ISO.full else ["--allow-weaker"]
    p = run_cli("run", "--program", str(prog), "--tests", str(tests), "--wall-s", "1", *extra)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    # the call test reads no stdin, so input() fails at import: the program's own bug, an error
    assert out["verdicts"] == ["pass", "wrong", "error"] and out["passed"] == 1 and out["total"] == 3


def test_cli_rejects_bad_input(tmp_path):
    prog, tests = tmp_path / "main.py", tmp_path / "tests.json"
    prog.write_text("print(1)")
    tests.write_text(json.dumps([{"kind": "stdio", "stdin": "", "stdout": "1", "extra": 1}]))
    p = run_cli("run", "--program", str(prog), "--tests", str(tests))
    assert p.returncode == 2 and "tests.json[0]: unknown keys ['extra']" in p.stderr
    tests.write_text("{not json")
    p = run_cli("run", "--program", str(prog), "--tests", str(tests))
    assert p.returncode == 2 and "not valid JSON" in p.stderr
    p = run_cli("run", "--program", str(prog), "--tests", str(tmp_path / "missing.json"))
    assert p.returncode == 2 and "missing.json" in p.stderr


# ---------------------------------------------------------------------------------------------
# Regressions from the security review
# ---------------------------------------------------------------------------------------------
FIND_IN_FRAMES = r'''
import gc, sys
hexed = sys.stdin.readline().strip()
head, tail = bytes.fromhex(hexed[:12]), bytes.fromhex(hexed[12:])   # never whole in our memory


def holds(text: str) -> bool:
    data = text.encode()
    at = data.find(head)
    while at >= 0:
        if data[at + 6:at + 6 + len(tail)] == tail:
            return True
        at = data.find(head, at + 1)
    return False


found = any(holds(o) for o in gc.get_objects() if isinstance(o, str))
f = sys._getframe()
while f:                       # every frame above the program: the harness, the supervisor, ...
    found = found or holds(repr(f.f_locals))
    f = f.f_back
print("FOUND" if found else "clean")
'''


def process_memory_holds(pid: int, needle: bytes) -> bool:
    """Read every readable mapping of a process of ours (we are root) and look for `needle`."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(lo)
                if needle in mem.read(hi - lo):
                    return True
            except OSError:
                continue
    return False


def test_no_program_can_find_an_earlier_programs_data(sb):
    """Programs' sources, inputs and outputs never enter a zygote (a per-program supervisor
    receives the job), so nothing forked from it can find them, not even in freed memory."""
    marker = "MARK-" + os.urandom(8).hex()
    for _ in range(2 * sb.workers):   # both workers run it: its source, its output
        assert sb.run(f"print({marker!r})", [TestCase.stdio(f"{marker}\n", marker)]).ok
    for pid in sb.worker_pids():
        assert not process_memory_holds(pid, marker.encode()), "a zygote holds a program's data"
        assert process_memory_holds(pid, b"def solve(a, b):")      # the reader does work
    r = sb.run(FIND_IN_FRAMES, [TestCase.stdio(marker.encode().hex() + "\n", "clean")])
    assert r.ok, r.details
    r = sb.run(f"kept = {marker!r}\n" + FIND_IN_FRAMES, [TestCase.stdio(marker.encode().hex() + "\n", "FOUND")])
    assert r.ok, r.details    # and the search does find it where it is


def test_a_hostile_tmp_does_not_outlive_its_program(sb):
    deep = "import os\nfor _ in range(40):\n    os.mkdir('d' * 200)\n    os.chdir('d' * 200)\nprint('x')"
    marks = ("import os\nos.setxattr('/tmp', 'user.note', b'answer=42')\nos.utime('/tmp', (1, 987654321))\n"
             "os.chmod('/tmp', 0o751)\nprint('x')")
    for program in [deep, marks] * sb.workers:
        sb.run(program, [TestCase.stdio("", "x")])
    check = ("import os\nst = os.stat('/tmp')\n"
             "print(oct(st.st_mode & 0o777), st.st_mtime > 1e9, os.listxattr('/tmp'), os.listdir('/tmp'))")
    rs = sb.run_many([(check, [TestCase.stdio("", "0o700 True [] []")])] * (2 * sb.workers))
    assert all(r.ok for r in rs), [r.details for r in rs]
    assert sb.stats["sandbox_errors"] == 0


def test_a_deeply_nested_value_is_an_error_not_a_crash(sb):
    program = "import sys\nsys.setrecursionlimit(20000)\ndef f():\n    x = []\n    for _ in range(5000):\n" \
              "        x = [x]\n    return x\n"
    r = sb.run(program, [TestCase.call("f", [], [])])
    assert r.verdicts == ["error"]


def test_what_plain_python_would_print_is_what_is_judged(sb):
    cases = {
        "a, b = map(int, open(0).read().split())\nprint(a + b)": None,           # open(0) on every test
        "print(42)\nexit()": "42",
        "print(42)\nquit(0)": "42",
        "import atexit\natexit.register(lambda: print(42))": "42",
        "import threading, time\ndef late():\n    time.sleep(0.1)\n    print(42)\n"
        "threading.Thread(target=late).start()": "42",
        "import sys\nsys.__stdout__.write('42')": "42",
        "import sys, os\nprint(42)\nsys.stdout.flush()\nos._exit(0)": "42",
        "import sys\nout = open(1, 'w', closefd=False)\nout.write('42')": "42",   # flushed when collected
        "import sys\nsys.stdout = open(1, 'w', closefd=False)\nprint(42)": "42",
    }
    for program, expected in cases.items():
        tests = ([TestCase.stdio(f"{i} {i}\n", str(2 * i)) for i in range(3)] if expected is None
                 else [TestCase.stdio("", expected)] * 3)
        r = sb.run(program, tests)
        assert r.verdicts == ["pass"] * 3, (program, r.details)


def test_signals_to_itself_act_as_in_plain_python(sb):
    r = sb.run("import os, signal\nprint(1)\nos.kill(os.getpid(), signal.SIGTERM)\nprint(2)",
               [TestCase.stdio("", "1")])
    assert r.verdicts == ["error"] and r.details[0].startswith("exit code 143")


def test_cpu_time_is_limited_per_test(sb):
    if "cpu" not in ISO.cgroup["roots"]:
        pytest.skip("no cgroup CPU accounting on this host: CPU is limited per process only")
    r = sb.run("x = 0\nwhile True:\n    x += 1", [TestCase.stdio("", "x")], limits=Limits(wall_s=30, cpu_s=0.5))
    assert r.verdicts == ["timeout"] and r.details == ["over the CPU-time limit"]   # not the wall-time one


def test_third_party_packages_are_not_visible(sb):
    program = ("import os, sys\nd = os.path.join(os.path.dirname(os.__file__), 'site-packages')\n"
               "print(os.listdir(d) if os.path.isdir(d) else [])\n"
               "import importlib.util\nprint(importlib.util.find_spec('pip') is not None)")
    r = sb.run(program, [TestCase.stdio("", "[]\nFalse")])
    assert r.ok, r.details


def test_an_interrupted_run_does_not_poison_the_worker(sb, monkeypatch):
    import sandbox.core as core
    real = core._Worker._recv
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(core._Worker, "_recv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sb.run(ADD, [TestCase.stdio("1 1\n", "2")])
    monkeypatch.setattr(core._Worker, "_recv", real)
    rs = sb.run_many([(ADD, [TestCase.stdio("1 1\n", "2")])] * 6)
    assert all(r.ok for r in rs), [r.details for r in rs]


def test_two_sandboxes_never_share_a_uid():
    from sandbox.core import allocate_uids
    a, b = allocate_uids(4), allocate_uids(4)
    assert len(set(a) | set(b)) == 8 and min(a + b) >= 10_000_000
