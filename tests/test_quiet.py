"""Known library noise is dropped at its source, exactly: the same logger's other messages, and
other warnings of the same kind, still show."""
import logging
import os
import subprocess
import sys
import warnings

import pytest

from prorl_actors.quiet import KNOWN_LOG_LINES, KNOWN_WARNINGS, quiet_known_noise


class Catch(logging.Handler):
    def __init__(self):
        super().__init__()
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


@pytest.fixture
def caught():
    """What reaches a handler on each logger in question (ray and torch stop propagation to the
    root logger once imported, so the handler sits on the loggers themselves)."""
    quiet_known_noise()
    quiet_known_noise()   # idempotent: one filter per logger
    h = Catch()
    loggers = {logging.getLogger(name) for name, _, _ in KNOWN_LOG_LINES}
    for lg in loggers:
        lg.addHandler(h)
    yield h
    for lg in loggers:
        lg.removeHandler(h)


# each library's own call, as it makes it (format and arguments), in the order of KNOWN_LOG_LINES
VLLM_CPU = "https://docs.vllm.ai/en/latest/getting_started/installation/cpu/"
EMITTED = [
    ("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights", ("RotaryEmbedding",)),
    ("vllm.v1.worker.cpu_worker", "CPU backend doesn't allow to use `torch.set_num_threads` after the thread "
                                  "binding, skip it.", ()),
    ("vllm.v1.worker.cpu_worker", "%s is not found in LD_PRELOAD. For best performance, please follow the section "
                                  "`set LD_PRELOAD` in " + VLLM_CPU + " to setup required pre-loaded libraries.",
     ("libtcmalloc",)),
    ("vllm.engine.arg_utils", "The global random seed is set to %d. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to "
                              "False, this may affect the random state of the Python process that launched vLLM.",
     (0,)),
    ("vllm.config.vllm", "Enforce eager set, disabling torch.compile, CUDAGraphs, and JIT kernel warmup. This is "
                         "equivalent to setting -cc.mode=none -cc.cudagraph_mode=none and "
                         "--kernel_config.enable_jit_warmup=False", ()),
    ("vllm.config.vllm", "Inductor compilation was disabled by user settings, optimizations settings that are only "
                         "active during inductor compilation will be ignored.", ()),
    ("vllm.config.vllm", "Model Runner V2 requires Triton; using the V1 model runner instead.", ()),
    ("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected on x86 CPUs.", ()),
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. For more "
     "information, see https://docs.ray.io/en/latest/ray-security/token-auth.html", ()),
    ("torch._library.triton", "Triton not available, find_triton_kernels = []", ()),
]
# the same loggers, other messages: a layer that really failed to load, anything else
NEIGHBOURS = [
    ("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights", ("QKVParallelLinear",)),
    ("vllm.v1.worker.cpu_worker", "Node %s is not in available memory nodes %s.", (1, [0])),
    ("vllm.v1.worker.cpu_worker", "%s is not found in LD_PRELOAD.", ("libtcmalloc",)),
    ("vllm.engine.arg_utils", "The global random seed is set to %d.", (0,)),
    ("vllm.config.vllm", "Model Runner V2 requires Triton.", ()),
    ("ray._private.authentication.authentication_token_setup", "Token authentication is disabled for this Ray "
                                                                "cluster.", ()),
    ("torch._library.triton", "Triton not available, find_triton_kernels = [] (again)", ()),
]


def test_each_known_log_line_is_dropped_and_its_neighbours_are_not(caught):
    assert [name for name, _, _ in EMITTED] == [name for name, _, _ in KNOWN_LOG_LINES]
    for name, msg, args in EMITTED:
        logger = logging.getLogger(name)
        assert sum(type(f).__name__ == "_DropKnown" for f in logger.filters) == 1
        logger.warning(msg, *args)
        assert caught.seen == [], (name, msg)
    for name, msg, args in NEIGHBOURS:
        logging.getLogger(name).warning(msg, *args)
    assert sorted(caught.seen) == sorted(msg % args for _, msg, args in NEIGHBOURS)


def test_each_known_warning_is_dropped_only_from_its_module():
    (category, _, module, _), = KNOWN_WARNINGS
    msg = "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn_explicit(msg, category, "dispatcher.py", 138, module="vllm.triton_utils.dispatcher")
        warnings.warn_explicit(msg, category, "mine.py", 1, module="prorl_actors.mine")      # our own use: shown
        warnings.warn_explicit("something else", category, "dispatcher.py", 139, module="vllm.triton_utils.dispatcher")
    assert [(str(w.message), w.filename) for w in seen] == [(msg, "mine.py"), ("something else", "dispatcher.py")]


def test_progress_bars_off_without_importing_transformers():
    # a fresh process: the filters cost no transformers import; transformers, imported after, has its bars off
    code = ("import sys; from prorl_actors.quiet import quiet_known_noise; quiet_known_noise(); "
            "assert 'transformers' not in sys.modules; "
            "from transformers.utils import logging; assert not logging.is_progress_bar_enabled(); print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
    # a process that imported transformers first: switched off in place
    from transformers.utils import logging as hf_logging
    hf_logging.enable_progress_bar()
    quiet_known_noise()
    assert not hf_logging.is_progress_bar_enabled()
