"""Regressions from the sandbox's second and third security reviews, end to end on real
zygotes (the sandbox and its checks are tests/test_sandbox.py's)."""
import os
import subprocess
import sys
import time

from sandbox import Limits, TestCase
from tests.test_sandbox import ADD

# ---------------------------------------------------------------------------------------------
# Regressions from the second security review
# ---------------------------------------------------------------------------------------------
PYRIVAL_FASTIO = '''
import os, sys
from io import BytesIO, IOBase
BUFSIZE = 8192
class FastIO(IOBase):
    newlines = 0
    def __init__(self, file):
        self._fd = file.fileno()
        self.buffer = BytesIO()
        self.writable = "x" in file.mode or "r" not in file.mode
        self.write = self.buffer.write if self.writable else None
    def read(self):
        while True:
            b = os.read(self._fd, max(os.fstat(self._fd).st_size, BUFSIZE))
            if not b:
                break
            ptr = self.buffer.tell()
            self.buffer.seek(0, 2), self.buffer.write(b), self.buffer.seek(ptr)
        self.newlines = 0
        return self.buffer.read()
    def readline(self):
        while self.newlines == 0:
            b = os.read(self._fd, max(os.fstat(self._fd).st_size, BUFSIZE))
            self.newlines = b.count(b"\\n") + (not b)
            ptr = self.buffer.tell()
            self.buffer.seek(0, 2), self.buffer.write(b), self.buffer.seek(ptr)
        self.newlines -= 1
        return self.buffer.readline()
    def flush(self):
        if self.writable:
            os.write(self._fd, self.buffer.getvalue())
            self.buffer.truncate(0), self.buffer.seek(0)
class IOWrapper(IOBase):
    def __init__(self, file):
        self.buffer = FastIO(file)
        self.flush = self.buffer.flush
        self.writable = self.buffer.writable
        self.write = lambda s: self.buffer.write(s.encode("ascii"))
        self.read = lambda: self.buffer.read().decode("ascii")
        self.readline = lambda: self.buffer.readline().decode("ascii")
sys.stdin, sys.stdout = IOWrapper(sys.stdin), IOWrapper(sys.stdout)
input = lambda: sys.stdin.readline().rstrip("\\r\\n")
a, b = map(int, input().split())
print(a + b)
'''


def test_programs_that_rebind_the_standard_streams(sb):
    cases = [
        "import sys\nsys.stdin = open(0)\na, b = map(int, sys.stdin.readline().split())\nprint(a + b)",
        "import os, sys\nsys.stdin = os.fdopen(0)\nprint(sum(map(int, sys.stdin.read().split())))",
        "import sys\nsys.stdout = open(1, 'w')\nprint(sum(map(int, input().split())))",
        "import os, sys\nsys.stdout = os.fdopen(sys.stdout.fileno(), 'w', 1 << 16)\nprint(sum(map(int, input().split())))",
        "import io, sys\nsys.stdout = io.TextIOWrapper(open(1, 'wb'))\nprint(sum(map(int, input().split())))",
        PYRIVAL_FASTIO,
    ]
    tests = [TestCase.stdio(f"{i} {i}\n", str(2 * i)) for i in range(4)]
    for program in cases:
        r = sb.run(program, tests)
        assert r.verdicts == ["pass"] * 4, (program[:60], r.details)


def test_the_interpreter_looks_like_plain_python(sb):
    program = ("import os, pickle, socket, sys\n"
               "class P:\n    pass\n"
               "data = sys.stdin.read()\n"
               "print(len(data), sys.stdin.name, sys.stdout.mode, sys.stdout.name)\n"   # no newline translation
               "print(len(pickle.dumps(P())) > 0, sys.modules['__main__'].P is P)\n"
               "os.mkfifo('/tmp/fifo')\nprint(socket.gethostname(), 'sock_fd' in ' '.join(sys.orig_argv))\n")
    r = sb.run(program, [TestCase.stdio("a\r\nb\rc\n", "7 <stdin> w <stdout>\nTrue True\nsandbox False")])
    assert r.ok, r.details


def test_later_inputs_are_not_in_the_process_and_nothing_runs_between_tests(sb):
    program = ("import gc, sys, threading, time\n"
               "line = input()\n"
               "if line == 'first':\n"
               "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
               "    def holds(text):\n"       # looks for SECOND without ever building it
               "        at = text.find('SEC')\n"
               "        while at >= 0:\n"
               "            if text[at + 3:at + 6] == 'OND':\n                return True\n"
               "            at = text.find('SEC', at + 1)\n"
               "        return False\n"
               "    seen = any(holds(repr(o)) for o in gc.get_objects() if isinstance(o, (tuple, list, dict)))\n"
               "    f = sys._getframe()\n"
               "    while f:\n        seen = seen or holds(repr(f.f_locals))\n        f = f.f_back\n"
               "    print('seen' if seen else 'not seen')\n"
               "else:\n    print(threading.active_count())\n")
    r = sb.run(program, [TestCase.stdio("first\n", "not seen"), TestCase.stdio("SECOND\n", "1")])
    assert r.ok, r.details


def test_a_program_that_was_not_ended_still_leaves_nothing_in_tmp(sb, monkeypatch):
    import sandbox.core as core
    real = core._Worker.stop_process
    monkeypatch.setattr(core._Worker, "stop_process",                      # as if the end were lost
                        lambda self, end_of_program=False: real(self))
    for _ in range(sb.workers):
        sb.run("open('/tmp/planted', 'w').write('x')\nprint('x')", [TestCase.stdio("", "x")])
    monkeypatch.undo()
    rs = sb.run_many([("import os\nprint(os.listdir('/tmp'))", [TestCase.stdio("", "[]")])] * (2 * sb.workers))
    assert all(r.ok for r in rs), [r.details for r in rs]


def test_limits_can_change_between_programs(sb):
    hog = "x = bytearray(200 << 20)\nx[::4096] = b'1' * len(x[::4096])\nprint('x')"
    assert sb.run(hog, [TestCase.stdio("", "x")]).ok
    for _ in range(2):
        r = sb.run(hog, [TestCase.stdio("", "x")], limits=Limits(wall_s=2, memory_mib=64))
        assert r.verdicts == ["memory"], r.details
    assert sb.run(hog, [TestCase.stdio("", "x")]).ok


def test_the_parent_leaks_no_descriptors_when_a_worker_dies_mid_program(sb):
    def open_fds():
        return len(os.listdir("/proc/self/fd"))
    sb.run(ADD, [TestCase.stdio("1 1\n", "2")])
    before = open_fds()
    for _ in range(3):
        victim = sb.worker_pids()
        killer = subprocess.Popen([sys.executable, "-c", f"import os, time\ntime.sleep(0.3)\n"
                                   f"[os.kill(p, 9) for p in {victim}]"])
        rs = sb.run_many([("import time\ntime.sleep(0.8)\nprint(1)", [TestCase.stdio("", "1")])] * sb.workers)
        killer.wait()
        assert all(r.verdicts in (["killed"], ["pass"]) for r in rs)
    assert sb.run(ADD, [TestCase.stdio("1 1\n", "2")]).ok
    assert open_fds() <= before + 2 * sb.workers   # a restarted worker's socket, nothing per program


# ---------------------------------------------------------------------------------------------
# Regressions from the third review
# ---------------------------------------------------------------------------------------------
def test_programs_that_close_or_wrap_the_standard_streams(sb):
    cases = [
        "print(sum(map(int, input().split())))\nimport sys\nsys.stdout.close()",
        "import sys\nwith sys.stdout as f:\n    print(sum(map(int, input().split())), file=f)",
        "import io, sys\nsys.stdout = io.TextIOWrapper(sys.stdout.buffer, encoding='utf-8')\n"
        "print(sum(map(int, input().split())))",
        "import io, sys\nsys.stdout = io.TextIOWrapper(sys.stdout.detach(), encoding='utf-8')\n"
        "print(sum(map(int, input().split())))",
        "import io, sys\nprint(sum(map(int, io.TextIOWrapper(sys.stdin.buffer).read().split())))",
        "import sys\nprint(sum(map(int, input().split())))\nsys.stderr.close()\nsys.stdin.close()",
    ]
    tests = [TestCase.stdio(f"{i} {i}\n", str(2 * i)) for i in range(3)]
    for program in cases:
        r = sb.run(program, tests)
        assert r.verdicts == ["pass"] * 3, (program, r.details)


def test_an_executor_that_is_never_shut_down(sb):
    program = ("from concurrent.futures import ThreadPoolExecutor\n"
               "ex = ThreadPoolExecutor(2)\nprint(sum(ex.map(int, input().split())))")
    r = sb.run(program, [TestCase.stdio(f"{i} {i}\n", str(2 * i)) for i in range(3)])
    assert r.verdicts == ["pass"] * 3, r.details


def test_a_process_that_dies_between_tests_is_not_judged_on_old_output(sb):
    program = "import os\nprint(input())\nos.close(6)"     # breaks its own channel to the parent
    r = sb.run(program, [TestCase.stdio("YES\n", "YES"), TestCase.stdio("NO\n", "YES"),
                         TestCase.stdio("NO\n", "NO")])
    assert r.verdicts == ["pass", "error", "pass"], r.details


def test_a_program_that_runs_out_of_budget_leaves_no_tmp_charge(sb):
    filler = ("import os, time\nif not os.path.exists('/tmp/f0'):\n"
              "    for k in range(3):\n        open(f'/tmp/f{k}', 'wb').write(b'x' * (15 << 20))\n"
              "time.sleep(0.6)\nprint('x')")
    for _ in range(sb.workers):
        r = sb.run(filler, [TestCase.stdio("", "x")] * 4, limits=Limits(wall_s=1, program_wall_s=1.0))
        assert "timeout" in r.verdicts
    rs = sb.run_many([("print('small')", [TestCase.stdio("", "small")])] * (2 * sb.workers),
                     limits=Limits(memory_mib=40))
    assert all(r.ok for r in rs), [r.details for r in rs]
    assert sb.stats["sandbox_errors"] == 0


def test_closing_the_input_channel_does_not_spin_the_parent(sb):
    import resource
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    r = sb.run("import os, time\nos.close(6)\ntime.sleep(0.9)\nprint(1)", [TestCase.stdio("", "1")] * 2)
    after, waited = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
    assert r.verdicts[0] == "pass"
    # a parent spinning on the closed channel burns CPU for the whole wait; a waiting one nearly none
    # (the bound is a third of the wait, far above the ~0.02 s a wait costs)
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < waited / 3


def test_the_program_is_compiled_as_its_own_module(sb):
    r = sb.run("def f(x: int) -> str:\n    pass\nprint(f.__annotations__)",
               [TestCase.stdio("", "{'x': <class 'int'>, 'return': <class 'str'>}")])
    assert r.ok, r.details
