"""`prorl eval`: pass@k of a trained model, and its reasoning boundary against the base model.

ProRL's claim is read off pass@k curves: a model that beats its base at every k, up to a
large k, solves problems the base cannot solve however often it is sampled, not only the
ones it already solved, more often. This measures that for a run.

1. Prompts: the held-out prompts validation uses (data.validation_seed; file tasks' held-out
   rows), `evaluation.num_prompts_per_task` (null: validation's) per task, of data.tasks (in
   distribution) and of validation.tasks (held out: never trained on); `evaluation.tasks`
   picks some. Each model tokenizes them with its own tokenizer and chat template; a prompt
   too long for either model's generator is compared for neither.
2. Sampling: n = evaluation.num_samples responses per prompt at validation.temperature and
   top_p (the paper's 0.6 and 0.95), the same seeds for both models, by a group of
   GeneratorActors (`generator.*`: engine, num_actors, GPUs); scoring by VerifierActors, as in
   training. A response is correct when its reward is 1.
3. Per task and model: pass@k (unbiased, mean over prompts, with its standard error) for the
   reported k, pass@1 (the accuracy of all n samples) and the share of prompts solved at least
   once in n (= pass@n).
4. With a base model, per task and over the prompts both answered: the prompts the model
   solves that the base never does in n samples and the reverse, the verdict on the boundary
   (algo.passk.VERDICTS, from the pass@k differences at k = 1 and the largest k), the
   novelty of the model's correct responses (algo.novelty), and each model's share of
   responses in the family's answer format. An "expands" whose base answered mostly outside
   that format (under FORMAT_MAJORITY) is flagged `format_driven`: the base may have held the
   answers and not the format the verifier reads, so the gain may be the format, not the
   boundary.

Writes, into the output directory: model.json, samples-model.parquet (every response, its
reward and format) and passk.png (pass@k against log-scaled k, per task), and with a base
model base.json, samples-base.parquet, boundary.json, boundary.md and passk.png with both
models. A task left without a usable prompt is listed with `num_prompts: 0`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prorl_actors import batch as rb
from prorl_actors.actors.generator import GENERATOR_ENV, GeneratorActor
from prorl_actors.actors.verifier import VerifierActor
from prorl_actors.algo import VERDICTS, boundary_verdict, novel_ngrams, pass_at_k_diff, pass_at_k_mean
from prorl_actors.engines.generation import SamplingSpec, generation_chunks
from prorl_actors.group import ActorGroup
from prorl_actors.plots import plot_passk
from prorl_actors.roles import Generator, Role, Verifier
from prorl_actors.spec import RunSpec
from prorl_actors.tasks import Item, validation_items
from prorl_actors.tinymodel import load_tokenizer

SAMPLE_COLUMNS = (rb.TASK, rb.ITEM_INDEX, rb.RESPONSE_TEXT, rb.REWARD, rb.FORMATTED, rb.TRUNCATED, rb.VERIFY_ERROR,
                  rb.VERIFY_TIMEOUT)


# ------------------------------------------------------------------------------ prompts
def eval_items(spec: RunSpec, rejected: list[dict]) -> tuple[list[Item], dict[str, dict]]:
    """-> (the held-out items of the tasks evaluated, {task: {"family", "held_out"}}); items
    whose generator raised go to `rejected`."""
    ev, data = spec.evaluation, spec.data
    picked = lambda t: not ev.tasks or t.name in ev.tasks  # noqa: E731
    train = [t for t in data.tasks if picked(t)]
    held_out = [t for t in spec.validation.tasks if picked(t)]
    num = ev.num_prompts_per_task or spec.validation.num_prompts_per_task
    items = validation_items(dataclasses.replace(data, tasks=train), num, rejected, extra=held_out)
    info = {t.name: {"family": t.family, "held_out": False} for t in train}
    info |= {t.name: {"family": t.family, "held_out": True} for t in held_out}
    return items, info


def prompt_tables(items: list[Item], tokenizers: dict, max_prompt_tokens: int,
                  rejected: list[dict]) -> dict[str, pa.Table]:
    """{label: tokenizer} -> {label: the prompt table of the items that fit every model's
    tokenization}; the others go to `rejected`, once each."""
    tables, too_long = {}, {}
    for label, tok in tokenizers.items():
        tables[label], bad = rb.make_prompts(items, tok, max_prompt_tokens, 0)
        for it, why in bad:
            too_long.setdefault((it.task, it.index), f"prompt too long for the {label} model: {why}")
    rejected += [{"task": t, "item_index": i, "error": why} for (t, i), why in too_long.items()]
    fits = lambda table: pa.array([(t, i) not in too_long for t, i in zip(  # noqa: E731
        table[rb.TASK].to_pylist(), table[rb.ITEM_INDEX].to_pylist())], pa.bool_())
    return {label: table.filter(fits(table)) for label, table in tables.items()}


# ------------------------------------------------------------------------------ sampling
class Evaluator:
    """Samples and scores the prompts for one model after another, with the run's actors:
    a verifier group for the whole evaluation, a generator group per model."""

    def __init__(self, spec: RunSpec, log=print):
        self.spec, self.log = spec, log
        ft = spec.fault_tolerance
        self.common = dict(max_restarts=ft.max_actor_restarts, call_timeout_s=ft.call_timeout_s,
                           on_event=lambda kind, step=None, **f: log(f"{kind.replace('_', ' ')}: {f}"))
        self.verifiers = ActorGroup.for_role(Role.VERIFIER, VerifierActor, spec.verifier.num_actors,
                                             num_cpus=spec.verifier.num_cpus,
                                             args=(spec.data, spec.verifier, spec.validation.tasks), **self.common)
        self.verifiers.ping(timeout_s=600)

    def sampling(self) -> SamplingSpec:
        v, g = self.spec.validation, self.spec.generator
        return SamplingSpec(n=self.spec.evaluation.num_samples, temperature=v.temperature, top_p=v.top_p,
                            max_new_tokens=g.max_new_tokens, seed=self.spec.seed)

    def run(self, label: str, model_path: Path, prompts: pa.Table) -> pa.Table:
        """-> the scored responses of `model_path` to `prompts` (tokenized for it), n
        consecutive rows per prompt, task by task (one progress line each)."""
        spec, g, sp = self.spec, self.spec.generator, self.sampling()
        t0 = time.time()
        gens = ActorGroup.for_role(Role.GENERATOR, GeneratorActor, g.num_actors, num_cpus=g.num_cpus,
                                   num_gpus=g.num_gpus, env=GENERATOR_ENV,
                                   args=lambda rank: (str(model_path), spec.model.dtype, g, spec.seed + rank),
                                   **self.common)
        try:
            gens.ping(timeout_s=600)
            self.log(f"{label}: {len(gens)} generator ({g.engine}) up in {time.time() - t0:.0f}s: {model_path}")
            fill = g.vllm.max_num_seqs if g.engine == "vllm" else g.hf_batch_size
            out = []
            for task in dict.fromkeys(prompts[rb.TASK].to_pylist()):   # in order
                t1 = time.time()
                rows = prompts.filter(pc.equal(prompts[rb.TASK], task))
                chunks = generation_chunks(rows.num_rows, sp.n, g.num_actors, g.chunks_per_actor, fill)
                rollouts = gens.map_table(Generator.generate, rows, sp, num_chunks=chunks)
                rollouts = self.verifiers.map_table(Verifier.verify, rollouts, rows_per_unit=sp.n)
                tokens = pc.sum(pc.list_value_length(rollouts[rb.RESPONSE_IDS])).as_py() or 0
                correct = rollouts[rb.REWARD].to_numpy().reshape(-1, sp.n) >= 1.0           # (P, n)
                self.log(f"{label}: {task}: {rows.num_rows} prompts x {sp.n}: pass@1 {correct.mean():.3f}, "
                         f"solved {correct.any(1).mean():.3f} ({time.time() - t1:.0f}s, "
                         f"{tokens / max(time.time() - t1, 1e-9):,.0f} tokens/s)")
                out.append(rollouts)
        finally:
            gens.kill()
        return pa.concat_tables(out)

    def close(self) -> None:
        self.verifiers.kill()


# ------------------------------------------------------------------------------ results
def by_prompt(rollouts: pa.Table, n: int) -> dict[str, dict[int, tuple[np.ndarray, list[str]]]]:
    """-> {task: {item index: (correct (n,) bool, the n response texts)}} in row order."""
    correct = rollouts[rb.REWARD].to_numpy().reshape(-1, n) >= 1.0                      # (P, n)
    texts = rollouts[rb.RESPONSE_TEXT].to_pylist()
    keys = list(zip(rollouts[rb.TASK].to_pylist(), rollouts[rb.ITEM_INDEX].to_pylist()))
    out: dict = {}
    for p in range(len(keys) // n):
        block = keys[p * n:(p + 1) * n]
        if block.count(block[0]) != n:
            raise ValueError(f"rows {p * n}..{(p + 1) * n - 1} are not the {n} samples of one prompt: {set(block)}")
        out.setdefault(block[0][0], {})[block[0][1]] = (correct[p], texts[p * n:(p + 1) * n])
    return out


def curve(counts: list[int], n: int, ks: list[int]) -> dict:
    """Correct samples per prompt -> pass@k and its standard error for each k."""
    pk = {k: pass_at_k_mean(counts, n, k) for k in ks}
    return {"pass@k": {str(k): m for k, (m, _) in pk.items()}, "pass@k_se": {str(k): se for k, (_, se) in pk.items()}}


def task_results(rollouts: pa.Table, n: int, ks: list[int], info: dict[str, dict]) -> dict[str, dict]:
    """Per task: pass@1 over all samples, pass@k, the share solved at least once, how often the
    answer format was followed and the response cut, verifier failures, per-prompt counts."""
    out = {task: {**i, "num_prompts": 0} for task, i in info.items()}   # a task left without a prompt stays
    for task, prompts in by_prompt(rollouts, n).items():
        rows = rollouts.filter(pc.equal(rollouts[rb.TASK], task))
        counts = [int(c.sum()) for c, _ in prompts.values()]
        out[task] = {**info[task], "num_prompts": len(counts),
                     "pass@1": float(np.mean([c.mean() for c, _ in prompts.values()])),
                     **curve(counts, n, ks),
                     "solved_frac": float(np.mean([c > 0 for c in counts])),
                     "format_frac": float(rows[rb.FORMATTED].to_numpy(zero_copy_only=False).mean()),
                     "truncated_frac": float(rows[rb.TRUNCATED].to_numpy(zero_copy_only=False).mean()),
                     "response_tokens_mean": float(pc.mean(pc.list_value_length(rows[rb.RESPONSE_IDS])).as_py()),
                     "verify_errors": int(rows[rb.VERIFY_ERROR].to_numpy(zero_copy_only=False).sum()),
                     "verify_timeouts": int(rows[rb.VERIFY_TIMEOUT].to_numpy(zero_copy_only=False).sum()),
                     "correct_per_prompt": dict(zip(map(str, prompts), counts))}
    return out


FORMAT_MAJORITY = 0.5   # a base with fewer of its responses in the answer format flags an "expands"


def format_share(rollouts: pa.Table, task: str, items: list[int]) -> float:
    """The share of `task`'s responses to the prompts `items` that are in the family's answer format."""
    rows = rollouts.filter(pc.and_(pc.equal(rollouts[rb.TASK], task),
                                   pc.is_in(rollouts[rb.ITEM_INDEX], pa.array(items, pa.int64()))))
    return float(rows[rb.FORMATTED].to_numpy(zero_copy_only=False).mean())


def boundary(model: pa.Table, base: pa.Table, n: int, ks: list[int], info: dict[str, dict], ngram: int,
             margin: float, z: float) -> dict[str, dict]:
    """Per task, over the prompts both models answered: both pass@k curves, the prompts each
    solves (at least once in n) that the other never does, the verdict, the novelty of the
    model's correct responses against the base's responses to the same prompt, and each model's
    share of responses in the answer format (an "expands" on a base mostly out of it flagged)."""
    m_all, b_all = by_prompt(model, n), by_prompt(base, n)
    out = {task: {**i, "num_prompts": 0, "verdict": "too few prompts"} for task, i in info.items()}
    for task in [t for t in m_all if t in b_all]:
        m, b = m_all[task], b_all[task]
        items = [i for i in m if i in b]
        if not items:
            continue
        cm, cb = [int(m[i][0].sum()) for i in items], [int(b[i][0].sum()) for i in items]
        novel = total = 0
        for i in items:
            right = [text for ok, text in zip(*m[i]) if ok]
            v, t = novel_ngrams(right, b[i][1], ngram)
            novel, total = novel + v, total + t
        model_curve, base_curve = curve(cm, n, ks), curve(cb, n, ks)
        p1 = {"model": float(np.mean(cm)) / n, "base": float(np.mean(cb)) / n}   # pass@1 = c / n
        d1, dmax = pass_at_k_diff(cm, cb, n, 1), pass_at_k_diff(cm, cb, n, max(ks))   # (mean, paired se)
        fmt = {"model": format_share(model, task, items), "base": format_share(base, task, items)}
        verdict = boundary_verdict(d1, dmax, margin, z, len(items))
        out[task] = {**info[task], "num_prompts": len(items), "model": model_curve, "base": base_curve,
                     "pass@1": p1,
                     "solved_frac": {"model": float(np.mean([c > 0 for c in cm])),
                                     "base": float(np.mean([c > 0 for c in cb]))},
                     "solved_by_model_only": [i for i, a, c in zip(items, cm, cb) if a > 0 and c == 0],
                     "solved_by_base_only": [i for i, a, c in zip(items, cm, cb) if c > 0 and a == 0],
                     "novelty": novel / total if total else None, "novelty_ngrams": total,
                     "delta_pass@1": d1[0], "delta_pass@1_se": d1[1],
                     f"delta_pass@{max(ks)}": dmax[0], f"delta_pass@{max(ks)}_se": dmax[1],
                     "format_frac": fmt, "verdict": verdict,
                     "format_driven": verdict == "expands" and fmt["base"] < FORMAT_MAJORITY}
    return out


# ------------------------------------------------------------------------------ reports
def markdown(report: dict) -> str:
    """The boundary report as Markdown: a summary row per task, then pass@k per k."""
    s, ks = report["settings"], report["settings"]["ks"]
    kmax = max(ks)
    lines = [f"# Boundary report: {report['model']} vs {report['base']}", "",
             f"{s['num_samples']} samples per prompt at temperature {s['temperature']}, top_p {s['top_p']}, "
             f"max {s['max_new_tokens']} new tokens; pass@k unbiased, mean over prompts; novelty: share of the "
             f"{s['novelty_ngram']}-grams of correct responses absent from the base's responses to the prompt.", "",
             f"| task | split | prompts | in format base → model | pass@1 base → model | pass@{kmax} base → model "
             f"| Δ pass@{kmax} | solved only by model | solved only by base | novelty | verdict |",
             "|---|---|---:|---|---|---|---:|---:|---:|---:|---|"]
    for task, r in report["tasks"].items():
        split = f"{'held out' if r['held_out'] else 'trained'} ({r['family']})"
        if not r["num_prompts"]:
            lines.append(f"| {task} | {split} | 0 | – | – | – | – | – | – | – | {r['verdict']} |")
            continue
        p1 = f"{r['pass@1']['base']:.3f} → {r['pass@1']['model']:.3f}"
        pk = f"{r['base']['pass@k'][str(kmax)]:.3f} → {r['model']['pass@k'][str(kmax)]:.3f}"
        nov = "–" if r["novelty"] is None else f"{r['novelty']:.2f}"
        fmt = f"{r['format_frac']['base']:.2f} → {r['format_frac']['model']:.2f}"
        verdict = r["verdict"] + (" (format-driven: the base was mostly out of format)" if r["format_driven"] else "")
        lines.append(f"| {task} | {split} | {r['num_prompts']} | {fmt} "
                     f"| {p1} | {pk} | {r[f'delta_pass@{kmax}']:+.3f} ± {r[f'delta_pass@{kmax}_se']:.3f} "
                     f"| {len(r['solved_by_model_only'])} | {len(r['solved_by_base_only'])} "
                     f"| {nov} | {verdict} |")
    for who, other, key in (("the model", "the base", "solved_by_model_only"), ("the base", "the model",
                                                                             "solved_by_base_only")):
        found = [f"{t} ({len(r[key])})" for t, r in report["tasks"].items() if r.get(key)]
        lines += ["", f"Tasks where {who} solves prompts {other} never does in {s['num_samples']} samples: "
                  + (", ".join(found) if found else "none") + "."]
    lines += ["", "pass@k (± standard error over prompts):", "",
              "| task | model | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---:|" * len(ks)]
    for task, r in report["tasks"].items():
        for who in ("base", "model") if r["num_prompts"] else ():
            pk, se = r[who]["pass@k"], r[who]["pass@k_se"]
            lines.append(f"| {task} | {who} | " + " | ".join(f"{pk[str(k)]:.3f} ± {se[str(k)]:.3f}" for k in ks) + " |")
    lines += ["", "Verdicts: " + "; ".join(f"**{k}**: {v}" for k, v in VERDICTS.items()) +
              f" (a difference counts when larger than {s['margin']} and than {s['z']:g} paired standard errors "
              f"over prompts). An expansion is format-driven when under {FORMAT_MAJORITY:.0%} of the base's "
              "responses were in the family's answer format: it may have known answers the verifier could not read."]
    return "\n".join(lines) + "\n"


def write_samples(rollouts: pa.Table, path: Path) -> None:
    """Every response with its reward and flags (the token columns left out), zstd Parquet."""
    table = rollouts.select(list(SAMPLE_COLUMNS)).append_column(
        "response_tokens", pc.list_value_length(rollouts[rb.RESPONSE_IDS]))
    pq.write_table(table, path, compression="zstd")


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def run_eval(spec: RunSpec, model_path: Path, base_path: Path | None, out_dir: Path, log=print) -> dict:
    """Evaluate `model_path` (and `base_path`) on the run's held-out prompts, write the reports
    into `out_dir` -> the boundary report (with a base) or the model's results. Ray must be up."""
    ev, g, v = spec.evaluation, spec.generator, spec.validation
    n, ks = ev.num_samples, ev.reported_ks
    out_dir.mkdir(parents=True, exist_ok=True)
    rejected: list[dict] = []
    items, info = eval_items(spec, rejected)
    models = {"model": Path(model_path)} | ({"base": Path(base_path)} if base_path else {})
    prompts = prompt_tables(items, {label: load_tokenizer(p) for label, p in models.items()},
                            g.max_model_len - g.max_new_tokens, rejected)
    for bad in rejected:
        log(f"left out: {bad}")
    if not prompts["model"].num_rows:
        raise ValueError("no prompt to evaluate (every one was rejected: see above)")
    settings = {"num_samples": n, "ks": ks, "temperature": v.temperature, "top_p": v.top_p,
                "max_new_tokens": g.max_new_tokens, "seed": spec.seed, "validation_seed": spec.data.validation_seed,
                "novelty_ngram": ev.novelty_ngram, "margin": ev.margin, "z": ev.z, "engine": g.engine}
    log(f"evaluating {prompts['model'].num_rows} prompts of {len(info)} tasks x {n} samples "
        f"(temperature {v.temperature}, top_p {v.top_p}, max {g.max_new_tokens} new tokens) -> {out_dir}")
    evaluator = Evaluator(spec, log=log)
    rollouts, results = {}, {}
    try:
        for label, path in models.items():
            rollouts[label] = evaluator.run(label, path, prompts[label])
            write_samples(rollouts[label], out_dir / f"samples-{label}.parquet")
            results[label] = {"model": str(path), "settings": settings, "rejected": rejected,
                              "tasks": task_results(rollouts[label], n, ks, info)}
            write_json(results[label], out_dir / f"{label}.json")
    finally:
        evaluator.close()
    if base_path is None:
        plot_passk({"model": results["model"]["tasks"]}, ks, out_dir / "passk.png", title=f"pass@k: {model_path}")
        return results["model"]
    report = {"model": str(model_path), "base": str(base_path), "settings": settings, "rejected": rejected,
              "tasks": boundary(rollouts["model"], rollouts["base"], n, ks, info, ev.novelty_ngram, ev.margin,
                                ev.z)}
    write_json(report, out_dir / "boundary.json")
    (out_dir / "boundary.md").write_text(markdown(report))
    answered = {t: r for t, r in report["tasks"].items() if r["num_prompts"]}
    plot_passk({who: {t: r[who] | {"held_out": r["held_out"]} for t, r in answered.items()}
                for who in ("base", "model")}, ks, out_dir / "passk.png",
               title=f"pass@k: {model_path} vs base {base_path}")
    return report
