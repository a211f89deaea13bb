"""Hostile programs. Each must end with a clear verdict, harm nothing outside the sandbox and
leave no process behind (checked after every case). The bombs run only once the probe has
confirmed the uid drop and the process limit, and with small bounds."""
import os
import socket
import subprocess

import pytest

from sandbox import Limits, Sandbox, TestCase, probe

ISO = probe()
pytestmark = pytest.mark.skipif(not ISO.full, reason=f"host lacks isolation layers: {ISO.missing}")
LIMITS = Limits(wall_s=1.0, program_wall_s=5.0, memory_mib=256, num_processes=32)


@pytest.fixture(scope="module")
def sb():
    with Sandbox(LIMITS, workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Things outside the sandbox that must come through unharmed."""
    d = tmp_path_factory.mktemp("host")
    secret = d / "secret.txt"
    secret.write_text("SECRET-4242")
    os.chmod(secret, 0o644)        # world-readable: only the sandbox's view keeps it out
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    victim = subprocess.Popen(["sleep", "600"])
    yield {"secret": secret, "port": listener.getsockname()[1], "victim": victim, "listener": listener}
    victim.kill()
    victim.wait()
    listener.close()


@pytest.fixture(autouse=True)
def unharmed(sb, host):
    zygotes = sb.worker_pids()
    yield
    assert sb.leftover_processes() == [], "a process of the program outlived it"
    assert host["secret"].read_text() == "SECRET-4242"
    assert host["victim"].poll() is None, "a host process was killed"
    assert sb.worker_pids() == zygotes and all(os.path.exists(f"/proc/{p}") for p in zygotes)
    with pytest.raises(BlockingIOError):
        host["listener"].accept()


def verdict(sb, program, expected="x", call=None):
    test = TestCase.call(call, [], expected) if call else TestCase.stdio("", expected)
    r = sb.run(program, [test])
    return r.verdicts[0], r.details[0]


def test_infinite_loop(sb):
    assert verdict(sb, "while True:\n    pass")[0] == "timeout"


def test_sleeping_forever(sb):
    assert verdict(sb, "import time\ntime.sleep(10 ** 6)")[0] == "timeout"


def test_threads_burning_cpu_faster_than_the_wall_clock(sb):
    program = ("import threading\ndef spin():\n    while True: pass\n"
               "for _ in range(4): threading.Thread(target=spin, daemon=True).start()\nspin()")
    assert verdict(sb, program)[0] == "timeout"


def pids_events(sb):
    total = 0
    for k in range(sb.workers):
        with open(os.path.join(sb._tree.slot_dirs(k)["pids"], "pids.events")) as f:
            total += int(f.read().split()[1])
    return total


def test_fork_bomb(sb):
    assert "uid" in ISO.layers and "cgroup" in ISO.layers   # the bomb needs both limits in place
    before = pids_events(sb)
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    v, _ = verdict(sb, program)
    assert v == "timeout"
    assert pids_events(sb) > before, "the cgroup's process limit was never reached"


def test_memory_bomb_allocate(sb):
    assert verdict(sb, "x = bytearray(3 << 30)") == ("memory", "MemoryError: ")
    assert verdict(sb, "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))")[0] == "memory"


def test_memory_bomb_touch_via_mmap(sb):
    """Address space allows the mapping; touching it goes over the cgroup: the OOM killer."""
    program = "import mmap\nm = mmap.mmap(-1, 400 << 20)\nfor i in range(0, len(m), 4096):\n    m[i] = 1\nprint('x')"
    assert verdict(sb, program) == ("memory", "killed by the out-of-memory killer")


def test_memory_outside_the_address_space_is_still_counted(sb):
    program = ("import os\nfds = []\nfor _ in range(30):\n    fd = os.memfd_create('m')\n    fds.append(fd)\n"
               "    for _ in range(15):\n        os.write(fd, b'x' * (1 << 20))\nprint('x')")
    assert verdict(sb, program)[0] == "memory"


def test_a_5gb_file(sb):
    assert verdict(sb, "f = open('big', 'wb')\nf.seek(5 << 30)\nf.write(b'x')\nf.close()")[0] == "output_limit"
    assert verdict(sb, "f = open('big', 'wb')\nfor _ in range(5 << 10):\n    f.write(b'x' * (1 << 20))")[0] == \
        "output_limit"


def test_many_files(sb):
    v, d = verdict(sb, "for i in range(100000):\n    open(f'f{i}', 'w').close()")
    assert v == "error" and "No space left on device" in d
    v, d = verdict(sb, "fs = [open('/dev/null') for _ in range(1000)]")
    assert v == "error" and "Too many open files" in d


def test_reading_host_files(sb, host):
    v, d = verdict(sb, "print(open('/etc/shadow').read())")
    assert v == "error" and "No such file" in d
    # The program would pass if it could read the world-readable host file: it must not.
    v, d = verdict(sb, f"print(open({str(host['secret'])!r}).read())", expected="SECRET-4242")
    assert v == "error" and "No such file" in d
    for path in ("/etc/passwd", os.path.abspath(__file__), os.path.expanduser("~/.bashrc")):
        v, _ = verdict(sb, f"print(open({path!r}).read())")
        assert v == "error", path


def test_listing_host_processes(sb, host):
    v, d = verdict(sb, "import os\nprint(os.listdir('/proc'))")
    assert v == "error" and "No such file" in d
    v, d = verdict(sb, f"import os\nos.kill({host['victim'].pid}, 0)\nprint('x')")   # probing a pid
    assert v == "error"


def test_connecting_to_localhost_and_outside(sb, host):
    v, d = verdict(sb, f"import socket\nsocket.create_connection(('127.0.0.1', {host['port']}), timeout=1)")
    assert v == "error" and "Operation not permitted" in d
    v, d = verdict(sb, "import socket\nsocket.create_connection(('10.1.2.3', 80), timeout=1)")
    assert v == "error" and "Operation not permitted" in d
    v, d = verdict(sb, "import socket\nsocket.socket(socket.AF_UNIX).connect('/var/run/docker.sock')")
    assert v == "error"


def test_killing_the_parent(sb):
    for target in ("os.getppid()", str(os.getpid()), str(sb.worker_pids()[0]), "1"):
        v, d = verdict(sb, f"import os, signal\nos.kill({target}, signal.SIGKILL)\nprint('x')")
        # kill(1) is the program itself (pid 1 of its namespace): allowed, and ignored by the kernel
        assert (v, d) in (("error", "PermissionError: [Errno 1] Operation not permitted"), ("pass", "")), target


def test_kill_minus_one(sb, host):
    v, d = verdict(sb, "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('x')")
    assert v == "error" and "Operation not permitted" in d


def test_deleting_host_files(sb, host):
    v, d = verdict(sb, f"import os\nos.remove({str(host['secret'])!r})\nprint('x')")
    assert v == "error" and "No such file" in d
    v, d = verdict(sb, "import os\nos.remove('/usr/lib/os-release')\nprint('x')")
    assert v == "error" and ("Read-only" in d or "Permission denied" in d)
    assert os.path.exists("/usr/lib/os-release")


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit(0)",
                                       "import sys\nsys.stdout.flush()\nimport os\nos._exit(0)"])
def test_faking_success_by_exiting(sb, exit_call):
    assert verdict(sb, exit_call, expected="42")[0] == "wrong"
    v, _ = verdict(sb, "def f():\n" + "\n".join("    " + line for line in exit_call.split("\n")),
                   expected=42, call="f")
    assert v == "error"


def test_an_object_equal_to_everything(sb):
    always = "    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
    v, d = verdict(sb, f"class A:\n{always}def f():\n    return A()", expected=42, call="f")
    assert v == "error" and "not JSON-serialisable" in d
    for base, value in (("int", "0"), ("str", "'no'"), ("list", "[]"), ("float", "0.0")):
        v, _ = verdict(sb, f"class A({base}):\n{always}def f():\n    return A({value})", expected=42, call="f")
        assert v == "wrong", base


def test_forging_result_lines(sb):
    program = ("import os, struct, sys\n"
               "print('ALL TESTS PASSED')\nprint('{\"passed\": 1, \"total\": 1, \"verdicts\": [\"pass\"]}')\n"
               "sys.stdout.flush()\n"
               "for fd in range(3, 64):\n"
               "    try:\n        os.write(fd, b'pass\\n' + struct.pack('<cIiQQIII', b'D', 0, 0, 0, 0, 0, 0, 0))\n"
               "    except OSError:\n        pass\n")
    v, _ = verdict(sb, program, expected="42")
    assert v in ("wrong", "error")
    v, _ = verdict(sb, program.replace("print('ALL", "def f():\n    return 0\nprint('ALL"), expected=42, call="f")
    assert v in ("wrong", "error")


def test_a_gigabyte_of_output(sb):
    v, _ = verdict(sb, "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)")
    assert v == "output_limit"
    v, _ = verdict(sb, "import os\nwhile True:\n    os.write(2, b'e' * 65536)")
    assert v == "output_limit"
    v, _ = verdict(sb, "def f():\n    return 'x' * (8 << 20)", call="f")
    assert v == "output_limit"


def test_a_daemon_left_behind(sb):
    program = ("import os, time\n"
               "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1000)\n    os._exit(0)\n"
               "time.sleep(0.2)\nprint(42)")
    assert verdict(sb, program, expected="42") == ("pass", "")
    # and the autouse check finds no process of it afterwards


def test_escaping_the_namespaces(sb):
    for call in ("import os\nos.unshare(0x10000000)" if hasattr(os, "unshare") else
                 "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0",
                 "import ctypes\nassert ctypes.CDLL(None).mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0",
                 "import ctypes\nassert ctypes.CDLL(None).ptrace(16, 1, 0, 0) == 0",
                 "import ctypes\nassert ctypes.CDLL(None).setuid(0) == 0",
                 "import os\nos.execv('/usr/bin/id', ['id'])"):
        v, _ = verdict(sb, call + "\nprint('x')")
        assert v == "error", call
