"""GPU smoke run: the learner, the reference and HF generation on a model of Qwen2.5-1.5B's shape
(DeepSeek-R1-Distill-Qwen-1.5B's, with tied embeddings), randomly initialised, in ONE process
without Ray or vLLM: what a bare GPU machine with torch, transformers and pyarrow runs.

    python benchmarks/gpu_smoke.py            # the 1.5B shape, on the GPU, bf16
    python benchmarks/gpu_smoke.py --tiny     # a few-MB shape: the same phases on a CPU in seconds

Phases, each printed as it ends:
  model       hidden 1536, 28 layers, 12 heads / 2 KV heads, intermediate 8960, vocabulary 151936,
              tied embeddings (--tiny: 64, 2, 2 / 1, 128, 1024); random weights saved in bf16
  generation  HF `generate`, sampled at temperature 1, every sequence to --new-tokens: tokens/s
  reference   ReferenceActor.logprobs (bf16 weights) on a synthetic rollout batch (random tokens,
              random advantages): response tokens scored per second
  learner     LearnerActor.update with the reference's log-probs and a KL term, per engine: torch
              (fp32 master weights, bf16 autocast) and DeepSpeed (ZeRO-1, bf16, one rank) when it
              imports; one warm-up update, then --updates timed ones of one optimizer step each:
              seconds per step. The weights must move and stay finite.
  nan guard   one update whose batch has a NaN advantage: counted as skipped, weights unchanged
Then one table (peak memory: torch.cuda.max_memory_allocated per phase on a GPU, the process's peak
RSS so far on a CPU), and exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prorl_actors import batch as rb  # noqa: E402 - after the repository root is on sys.path

SHAPES = {   # Qwen2 configs: the 1.5B's and a tiny one
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, vocab_size=1024),
}
PAD = 0
TEMPERATURE = 1.0


class Smoke:
    """Runs the phases, prints a line per phase, keeps the table's rows and the failed checks."""

    def __init__(self, device: torch.device):
        self.device, self.rows, self.failures = device, [], []

    def check(self, ok: bool, what: str) -> None:
        print(f"  check: {what}: {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            self.failures.append(what)

    def start_phase(self) -> float:
        gc.collect()                 # the last phase's models
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10     # KiB on Linux

    def row(self, phase: str, engine: str, figure: str, value: float) -> None:
        self.rows.append((phase, engine, figure, value, self.peak_mib()))
        print(f"== {phase} ({engine}): {value:.4g} {figure}, peak {self.rows[-1][4]:.0f} MiB", flush=True)


def build_model(shape: dict, path: str, device: torch.device) -> int:
    """Random weights of the shape, saved in bf16 under path -> the parameter count."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=32768, pad_token_id=PAD)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def synthetic_rollouts(num_prompts: int, group: int, prompt_len: int, response_len: int, vocab: int, seed: int):
    """num_prompts x group rows of random tokens (responses of response_len/2 to response_len tokens)
    with random group-centred advantages: what the learner and the reference take."""
    rng = np.random.default_rng(seed)
    n = num_prompts * group
    prompts = [rng.integers(1, vocab, prompt_len).tolist() for _ in range(num_prompts)]
    responses = [rng.integers(1, vocab, int(rng.integers(response_len // 2, response_len + 1))).tolist()
                 for _ in range(n)]
    t = rb.make_rollouts(prompt_ids=[prompts[i // group] for i in range(n)], response_ids=responses,
                        sample_logp=[[-1.0] * len(r) for r in responses], response_text=[""] * n, task=["smoke"] * n,
                        item_index=[i // group for i in range(n)], reference=[""] * n,
                        group_id=[i // group for i in range(n)], truncated=[False] * n, policy_version=[0] * n)
    adv = rng.standard_normal((num_prompts, group))
    return rb.with_column(t, rb.ADV, (adv - adv.mean(1, keepdims=True)).ravel().astype(np.float32))


def response_tokens(rollouts) -> int:
    return sum(len(r) for r in rollouts[rb.RESPONSE_IDS].to_pylist())


def phase_generation(s: Smoke, path: str, args) -> None:
    from transformers import GenerationConfig

    from prorl_actors.engines.torch_policy import load_causal_lm
    model = load_causal_lm(path, "bfloat16").to(s.device).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (args.prompts * args.group, args.prompt_len), device=s.device)   # (b, P)
    cfg = lambda n: GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,  # noqa: E731
                                     max_new_tokens=n, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg(2))   # warm-up
        t0 = s.start_phase()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg(args.new_tokens))
        if s.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    new = out[:, args.prompt_len:]                                                                    # (b, new)
    s.check(new.shape == (len(ids), args.new_tokens) and bool(((new >= 0) & (new < vocab)).all()),
            f"generate sampled {len(ids)} x {args.new_tokens} tokens in the vocabulary")
    s.row("generation", "hf", "tokens/s", new.numel() / dt)


def phase_reference(s: Smoke, path: str, rollouts, args):
    """-> the rollouts with REF_LOGP."""
    from prorl_actors.actors.reference import ReferenceActor
    from prorl_actors.spec import ReferenceSpec
    spec = ReferenceSpec(num_gpus=1 if s.device.type == "cuda" else 0, max_tokens_per_micro_batch=args.micro_tokens,
                         num_threads=args.threads)
    ref = ReferenceActor(path, "bfloat16", spec, TEMPERATURE, PAD)
    ref.logprobs(rollouts)                                                                           # warm-up
    t0 = s.start_phase()
    out = ref.logprobs(rollouts)
    dt = time.perf_counter() - t0
    logp = np.concatenate(out[rb.REF_LOGP].to_numpy(zero_copy_only=False))
    s.check(bool(np.isfinite(logp).all() and (logp <= 0).all()), "reference log-probs finite and <= 0")
    s.row("reference", "bf16", "tokens/s", response_tokens(rollouts) / dt)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phase_learner(s: Smoke, path: str, engine: str, rollouts, args) -> None:
    """Timed updates, then the NaN guard, on one engine."""
    from prorl_actors.actors.learner import LearnerActor
    from prorl_actors.spec import AlgorithmSpec, DeepSpeedSpec, LearnerSpec
    spec = LearnerSpec(engine=engine, num_gpus=1 if s.device.type == "cuda" else 0, num_threads=args.threads, lr=1e-3,
                       num_prompts_per_mini_batch=args.prompts, max_tokens_per_micro_batch=args.micro_tokens,
                       gradient_checkpointing=True, autocast_bf16=engine == "torch",
                       deepspeed=DeepSpeedSpec(zero_stage=1, bf16=True))
    learner = LearnerActor(path, spec, AlgorithmSpec(), TEMPERATURE, args.group, args.response_len, PAD, args.seed,
                           dist_url=f"tcp://127.0.0.1:{_free_port()}")
    learner.update(rollouts, args.kl_coef)                                                           # warm-up
    w0 = learner.get_weights()
    step_s = []
    t0 = s.start_phase()
    for _ in range(args.updates):
        t1 = time.perf_counter()
        stats = learner.update(rollouts, args.kl_coef)
        step_s.append((time.perf_counter() - t1) / max(stats["optimizer_steps"], 1))
        s.check(stats["optimizer_steps"] == 1 and stats["skipped_updates"] == 0, "an update takes one step")
    print(f"  {args.updates} updates in {time.perf_counter() - t0:.2f} s; last: pg_loss {stats['pg_loss']:.4g}, "
          f"kl {stats['kl']:.3g}, grad_norm {stats['grad_norm']:.3g}", flush=True)
    s.row("learner", engine, "s/step", statistics.median(step_s))          # (the peak before get_weights' copies)
    w1 = learner.get_weights()
    s.check(any(not torch.equal(w0[k], w1[k]) for k in w0) and all(torch.isfinite(v).all() for v in w1.values()),
            f"{engine}: the weights moved and are finite")
    del w0
    nan_adv = rollouts[rb.ADV].to_numpy().copy()
    nan_adv[0] = np.nan
    stats = learner.update(rb.with_column(rollouts, rb.ADV, nan_adv), args.kl_coef)
    w2 = learner.get_weights()
    unchanged = all(torch.equal(w1[k], w2[k]) for k in w1)
    s.check(stats["skipped_updates"] == 1 and stats["optimizer_steps"] == 0 and unchanged,
            f"{engine}: a NaN advantage skips the update, weights unchanged")


def deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 - absent, or present and broken (no CUDA toolkit, ...): not this run's
        print(f"deepspeed does not import ({type(e).__name__}: {e}): the torch engine only", flush=True)
        return False
    return True


def print_table(s: Smoke) -> None:
    print(f"\n{'phase':<12}{'engine':<11}{'figure':<10}{'value':>12}{'peak MiB':>11}")
    for phase, engine, figure, value, peak in s.rows:
        print(f"{phase:<12}{engine:<11}{figure:<10}{value:>12.4g}{peak:>11.0f}")
    what = "torch.cuda.max_memory_allocated per phase" if s.device.type == "cuda" else "peak RSS of the process so far"
    print(f"(peak MiB: {what})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a few-MB model and batch (CPU, seconds)")
    p.add_argument("--engines", default="torch,deepspeed", help="learner engines, in order (deepspeed: if it imports)")
    p.add_argument("--updates", type=int, default=3, help="timed updates per engine, after one warm-up")
    p.add_argument("--prompts", type=int, help="prompts per batch (default 8; --tiny 4)")
    p.add_argument("--group", type=int, default=4, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 512; --tiny 16)")
    p.add_argument("--response-len", type=int, help="longest response (default 1024; --tiny 16)")
    p.add_argument("--new-tokens", type=int, help="tokens generate() samples per sequence (default 256; --tiny 16)")
    p.add_argument("--micro-tokens", type=int, help="tokens per micro-batch (default 16384; --tiny 128)")
    p.add_argument("--kl-coef", type=float, default=1e-4)
    p.add_argument("--threads", type=int, help="torch CPU threads (default 4; --tiny 1: a tiny model's ops are too "
                                               "small to share, and a busy core would stall every one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sizes = dict(prompts=4, prompt_len=16, response_len=16, new_tokens=16, micro_tokens=128, threads=1) if args.tiny \
        else dict(prompts=8, prompt_len=512, response_len=1024, new_tokens=256, micro_tokens=16384, threads=4)
    for k, v in sizes.items():
        setattr(args, k, getattr(args, k) or v)
    import transformers
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {name}", flush=True)
    engines = [e for e in args.engines.split(",") if e != "deepspeed" or deepspeed_importable()]
    s = Smoke(device)
    with tempfile.TemporaryDirectory(prefix="prorl-gpu-smoke-") as path:
        n = build_model(SHAPES["tiny" if args.tiny else "1.5b"], path, device)
        print(f"== model: {n / 1e6:.1f}M parameters, random, saved in bf16", flush=True)
        phase_generation(s, path, args)
        rollouts = synthetic_rollouts(args.prompts, args.group, args.prompt_len, args.response_len,
                                      SHAPES["tiny" if args.tiny else "1.5b"]["vocab_size"], args.seed)
        rollouts = phase_reference(s, path, rollouts, args)
        for engine in engines:
            phase_learner(s, path, engine, rollouts, args)
    print_table(s)
    print("checks: all passed" if not s.failures else f"checks FAILED: {'; '.join(s.failures)}", flush=True)
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
