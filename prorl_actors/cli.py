"""`prorl train|validate|eval|monitor|convert|tasks|make-tiny-model|checkpoint verify`.

`prorl train SPEC [dotted.key=value ...]` validates the spec first (exit 2 with every
error, nothing started), then joins the Ray cluster named by `ray.address` or RAY_ADDRESS
(as under `ray job submit`) or starts an embedded local Ray on 127.0.0.1. With `resume:
auto` (the default) a run directory that holds a checkpoint is continued from its newest
one. SIGTERM (what `ray job stop` sends) or Ctrl-C checkpoints the last complete step and
exits 0; a second Ctrl-C stops at once.

`prorl eval --model RUN_DIR|CHECKPOINT|MODEL_DIR [--base [DIR]]` samples the run's held-out
prompts many times, scores them with the task verifiers and writes pass@k per task; with
--base, the boundary report against the base model (evaluate.py).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from prorl_actors.config import load_spec
from prorl_actors.errors import InputError
from prorl_actors.events import Event
from prorl_actors.quiet import quiet_known_noise
from prorl_actors.spec import FAMILIES, SpecError, to_yaml
from prorl_actors.tasks import OOD_EVAL_DATASETS, check_sources
from prorl_actors.tasks.checks import generator_names
from prorl_actors.tasks.convert import convert_file
from prorl_actors.tasks.files import DataError

# torch, Ray, transformers and matplotlib come in through checkpoint, supervisor, tinymodel,
# evaluate, monitor and plots: those are imported inside the commands that use them, so that
# `prorl validate` and `prorl tasks` start in a fraction of a second (no circle needs it:
# tests/test_architecture.py)


def _load(args):
    try:
        return load_spec(args.spec, args.overrides)
    except SpecError as e:
        raise InputError(f"invalid spec {args.spec}\n{e}") from None


def _check_sources(spec) -> list[str]:
    """The model directory there and every data file of the spec read and every row checked,
    before anything starts -> what each task holds."""
    if spec.model.path is not None and not (Path(spec.model.path) / "config.json").is_file():
        raise InputError(f"model.path {spec.model.path}: not a model directory (no config.json there)")
    return (["data.tasks:"] + [f"  {ln}" for ln in check_sources(spec.data.tasks)]
            + (["validation.tasks:"] + [f"  {ln}" for ln in check_sources(spec.validation.tasks)]
               if spec.validation.tasks else []))


def connect_ray(spec) -> None:
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:   # the embedded Ray, before `import ray` reads these:
        # loopback only (with _node_ip_address); never for a cluster's driver, whose node would then
        # call itself 127.0.0.1 and not be found among the cluster's nodes (see docs/gpu-cluster.md)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    if address:
        ray.init(address=address, namespace=spec.ray.namespace, log_to_driver=True)
    else:
        # "local": a new embedded Ray even when `ray start` left a cluster (or its address file) here
        ray.init(address="local", num_cpus=spec.ray.num_cpus, namespace=spec.ray.namespace, include_dashboard=False,
                 _node_ip_address="127.0.0.1", _metrics_export_port=spec.ray.metrics_export_port or None,
                 log_to_driver=True)


def cmd_validate(args) -> int:
    spec = _load(args)
    sources = _check_sources(spec)
    print(to_yaml(spec), end="")
    print("".join(f"# {ln}\n" for ln in sources), end="")   # YAML comments: the output stays a spec
    return 0


def _start_from(spec, log) -> tuple[Path | None, list[tuple[Path, Path, str]]]:
    """The checkpoint this run continues from (None: a fresh start), after moving an earlier,
    unresumable run's directory aside, and the damaged checkpoints moved aside on the way
    (checkpoint, where it went, what is wrong)."""
    from prorl_actors.checkpoint import damage, format_problem, latest_checkpoint, newest_intact
    run_dir = spec.run_dir
    ckpt, why, damaged = None, "resume: never", []
    if spec.resume == "auto":
        ckpt, why = latest_checkpoint(run_dir / "checkpoints"), "it has no complete checkpoint to resume from"
        if ckpt is not None and format_problem(ckpt):
            ckpt, why = None, f"its newest checkpoint cannot be resumed: {format_problem(ckpt)}"
        elif ckpt is not None:
            ckpt, bad = newest_intact(run_dir / "checkpoints")
            if ckpt is None:
                raise InputError(f"{run_dir}: every checkpoint is damaged, none to resume from: "
                                 + "; ".join(w for _, w in bad) + " (resume=never starts afresh)")
            for c, w in bad:    # newer than the intact one: kept for a look, out of the resume's way
                aside = c.with_name(f"damaged-{c.name}")
                os.replace(c, aside)
                damaged.append((c, aside, w))
                log(f"checkpoint {c} is damaged ({w}): moved to {aside}; resuming from an older one")
    elif spec.resume != "never":
        ckpt = Path(spec.resume).resolve()
        if problem := format_problem(ckpt) or damage(ckpt):      # damage reads every file: once
            raise InputError(f"resume={spec.resume}: {problem}")
    if ckpt is None and run_dir.exists() and any(run_dir.iterdir()):
        # never mix two runs' records
        old = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(old)
        log(f"{run_dir} held an earlier run ({why}): moved it to {old}")
    return ckpt, damaged


def _spec_changes(old_yaml: str, new_yaml: str) -> dict:
    """Keys whose values differ between two resolved specs -> {key: [old, new]}."""
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(yaml.safe_load(old_yaml)), flat(yaml.safe_load(new_yaml))
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def cmd_train(args) -> int:
    spec = _load(args)
    from prorl_actors.checkpoint import read_state
    from prorl_actors.supervisor import StopFlag, Supervisor, summary_table
    from prorl_actors.tinymodel import resolve_model_path

    t0 = time.time()
    run_dir = spec.run_dir
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    stop = StopFlag()

    def on_signal(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: now
        stop.requested, stop.signal = True, signal.Signals(signum).name
        log(f"{stop.signal}: stopping at the next safe point, then a checkpoint")

    _check_sources(spec)   # a bad data row stops the run here, before Ray and the actors start
    ckpt, damaged = _start_from(spec, log)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_yaml = to_yaml(spec)
    changes = {}
    if ckpt is not None:
        state = read_state(ckpt)
        if state.get("complete") and state["step"] >= spec.num_steps:
            log(f"{run_dir}: the run is complete at step {state['step']} (num_steps {spec.num_steps}): nothing "
                "to do; raise num_steps to go on, or resume=never to start afresh")
            if (run_dir / "summary.txt").exists():
                print("\n" + (run_dir / "summary.txt").read_text(), end="")
            return 0
        log(f"resuming {run_dir} from {ckpt} (step {state['step']})")
        if (run_dir / "spec.yaml").exists():
            changes = _spec_changes((run_dir / "spec.yaml").read_text(), spec_yaml)
            changes.pop("resume", None)
            for k, (a, b) in changes.items():
                log(f"spec changed since the last start: {k}: {a!r} -> {b!r}")
    (run_dir / "spec.yaml").write_text(spec_yaml)
    log(f"run {spec.name} -> {run_dir}")
    model_path = resolve_model_path(spec.model, spec.data, log=log)
    connect_ray(spec)
    signal.signal(signal.SIGTERM, on_signal)   # after ray.init, which installs its own
    signal.signal(signal.SIGINT, on_signal)
    import ray
    try:
        sup = Supervisor(spec, model_path, log=log, resume_from=ckpt, stop=stop)
        for c, aside, why in damaged:
            sup.records.event(Event.CHECKPOINT_DAMAGED, sup.step, checkpoint=str(c), moved_to=str(aside), problem=why)
        if changes:
            sup.records.event(Event.SPEC_CHANGED, sup.step, changes=changes)
        try:
            result = sup.run()
        finally:
            sup.shutdown()
    finally:
        ray.shutdown()
    from prorl_actors.plots import plot_run
    if result["history"]:
        table = summary_table(result)
        if not result["preempted"]:
            (run_dir / "summary.txt").write_text(table + "\n")
        print("\n" + table)
        log("plots: " + ", ".join(str(p) for p in plot_run(run_dir)))
    log(f"{'stopped' if result['preempted'] else 'done'}: {run_dir}")
    return 0


def _eval_paths(args) -> tuple[Path, Path, Path | None]:
    """--model (a run directory: its newest checkpoint; a checkpoint; an HF model directory) ->
    (the model's directory, the spec file: --spec, else the run's spec.yaml, the run directory)."""
    from prorl_actors.checkpoint import STATE_FILE, damage, latest_checkpoint
    p, run_dir = Path(args.model).resolve(), None
    if (p / "spec.yaml").is_file() and (p / "checkpoints").is_dir():
        run_dir, p = p, latest_checkpoint(p / "checkpoints")
        if p is None:
            raise InputError(f"{args.model} has no complete checkpoint")
    elif (p / STATE_FILE).is_file() and (p.parent.parent / "spec.yaml").is_file():
        run_dir = p.parent.parent
    if not (p / "config.json").is_file():
        raise InputError(f"{args.model} is neither a run directory, a checkpoint nor a model directory "
                         "(config.json)")
    if (p / STATE_FILE).is_file() and (why := damage(p)):     # damage reads every file: once
        raise InputError(f"checkpoint {p} is damaged: {why} (name an intact one with --model)")
    spec = args.spec or (run_dir / "spec.yaml" if run_dir else None)
    if spec is None:
        raise InputError(f"{args.model} is not in a run directory: give the run spec with --spec")
    return p, Path(spec), run_dir


def cmd_eval(args) -> int:
    from prorl_actors.evaluate import run_eval
    from prorl_actors.tinymodel import resolve_model_path
    model, args.spec, run_dir = _eval_paths(args)
    flags = {"n": "evaluation.num_samples", "num_prompts": "evaluation.num_prompts_per_task"}
    args.overrides = [f"{key}={getattr(args, a)}" for a, key in flags.items() if getattr(args, a) is not None] + \
        [f"evaluation.{key}=[{getattr(args, key)}]" for key in ("ks", "tasks") if getattr(args, key) is not None] + \
        args.overrides
    spec = _load(args)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    base = None
    if args.base is not None:   # --base alone: the base model of the run spec (built if missing)
        base = Path(args.base).resolve() if args.base else resolve_model_path(spec.model, spec.data, log=log)
        if not (base / "config.json").is_file():
            hint = (f"; to use the run's base model with the override {args.base}, write --base= {args.base}"
                    if "=" in args.base and not base.exists() else "")
            raise InputError(f"--base {base} is not a model directory (config.json){hint}")
    out = Path(args.out) if args.out else (run_dir or spec.run_dir) / "eval" / model.name
    connect_ray(spec)
    import ray
    try:
        report = run_eval(spec, model, base, out, log=log)
    finally:
        ray.shutdown()
    if base is not None:
        print("\n" + (out / "boundary.md").read_text())
    else:
        for task, r in report["tasks"].items():
            print(f"{task}: " + ", ".join(f"pass@{k} {v:.3f}" for k, v in r["pass@k"].items()) +
                  f", solved {r['solved_frac']:.3f}")
    log(f"done: {', '.join(sorted(p.name for p in out.iterdir()))} in {out}")
    return 0


def cmd_monitor(args) -> int:
    from prorl_actors.monitor import cmd_monitor as run
    return run(args)


def cmd_make_tiny_model(args) -> int:
    from prorl_actors.tinymodel import build_tiny_model
    spec = _load(args)
    build_tiny_model(spec.model.tiny, spec.data, Path(args.out))
    return 0


def cmd_convert(args) -> int:
    try:
        convert_file(args.format, args.input, args.output, strict=args.strict)
    except FileNotFoundError as e:
        raise DataError(f"{args.input}: no such file") from e
    return 0


def cmd_checkpoint_verify(args) -> int:
    """Every file of a checkpoint against its manifest, then every part loaded as a resume loads
    it and the policy checked against its recorded digest."""
    from prorl_actors.checkpoint import STATE_FILE, format_problem, verify_checkpoint
    ckpt = Path(args.dir)
    if not (ckpt / STATE_FILE).is_file():
        raise InputError(f"{ckpt}: not a checkpoint (no {STATE_FILE})")
    if problem := format_problem(ckpt):
        raise InputError(f"{ckpt}: {problem}")
    try:
        st = verify_checkpoint(ckpt)
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    print(f"{ckpt}: intact: step {st['step']}, {len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} "
          f"MiB" + (", every one as its manifest says" if st.get("manifest") else ", saved before manifests")
          + f"; the policy's weights match their digest {st['weights_sha256'][:12]}")
    return 0


def cmd_tasks(args) -> int:
    if args.yaml:   # the default training mix: every generator of the family but the held-out ones
        for fam in [args.family] if args.family else FAMILIES:
            for n in generator_names(fam):
                if n not in OOD_EVAL_DATASETS:
                    print(f"- {{name: {fam}-{n}, family: {fam}, dataset: {n}}}")
        return 0
    for fam in [args.family] if args.family else FAMILIES:
        names = [f"{n} (held out: evaluation only)" if n in OOD_EVAL_DATASETS else n for n in generator_names(fam)]
        print(f"{fam} ({len(names)}): {', '.join(names)}" if names else f"{fam}: files only")
    return 0


def main(argv=None) -> int:
    quiet_known_noise()
    p = argparse.ArgumentParser(prog="prorl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in (("train", cmd_train, "train with a run spec"),
                               ("validate", cmd_validate, "print the resolved spec or every error (exit 2)")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("spec")
        sp.add_argument("overrides", nargs="*", help="dotted.key=value")
        sp.set_defaults(fn=fn)
    sp = sub.add_parser("eval", help="pass@k of a trained model on the run's held-out prompts; with --base, the "
                                     "boundary report against the base model (JSON, Markdown, PNG)")
    sp.add_argument("--model", required=True, help="a run directory (its newest checkpoint), a checkpoint "
                                                   "(step_NNNNNN) or an HF model directory")
    sp.add_argument("--base", nargs="?", const="", default=None,
                    help="the base model to compare with; --base alone (or --base= when overrides follow): the run "
                         "spec's (model.path, or the embedded tiny model)")
    sp.add_argument("--spec", default=None, help="the run spec (default: the run directory's spec.yaml)")
    sp.add_argument("--tasks", default=None, help="comma-separated task names (evaluation.tasks; default: all of "
                                                  "data.tasks and validation.tasks)")
    sp.add_argument("--n", type=int, default=None, help="samples per prompt (evaluation.num_samples)")
    sp.add_argument("--k", dest="ks", default=None, help="comma-separated k (evaluation.ks; default: 1, 2, 4, "
                                                         "... up to n)")
    sp.add_argument("--num-prompts", type=int, default=None, help="prompts per task "
                                                                  "(evaluation.num_prompts_per_task)")
    sp.add_argument("--out", default=None, help="output directory (default: <run dir>/eval/<model dir name>)")
    sp.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. validation.temperature=1.0")
    sp.set_defaults(fn=cmd_eval)
    sp = sub.add_parser("monitor", help="start Prometheus on 127.0.0.1 with monitoring/prometheus/prometheus.yml "
                                        "(it finds every live run; alerts from alerts.yml)")
    sp.add_argument("run", nargs="?", help="the run directory to link to (<output_dir>/<name>; it need not exist yet): "
                                                "Prometheus keeps its data beside it, in <output_dir>/.prometheus")
    sp.add_argument("--port", type=int, default=9090)
    sp.add_argument("--retention", default="90d", help="how long Prometheus keeps samples")
    sp.add_argument("--config", default=None, help="another prometheus.yml")
    sp.set_defaults(fn=cmd_monitor)
    sp = sub.add_parser("make-tiny-model", help="build the embedded tiny base model into OUT")
    sp.add_argument("out")
    sp.add_argument("--spec", default=None, help="take model.tiny and data from this spec")
    sp.add_argument("overrides", nargs="*")
    sp.set_defaults(fn=cmd_make_tiny_model)
    sp = sub.add_parser("convert", help="convert a dataset (DeepScaleR, Eurus-2-RL, SCP-116K, Llama-Nemotron IF) "
                                        "to the task format")
    sp.add_argument("format", choices=["deepscaler", "eurus", "scp116k", "nemotron-if"])
    sp.add_argument("input")
    sp.add_argument("output", help=".jsonl or .parquet")
    sp.add_argument("--strict", action="store_true", help="stop at the first bad row instead of leaving it out")
    sp.set_defaults(fn=cmd_convert)
    sp = sub.add_parser("checkpoint", help="check a checkpoint by hand")
    csub = sp.add_subparsers(dest="action", required=True)
    v = csub.add_parser("verify", help="every file against the checkpoint's manifest, then every part loaded")
    v.add_argument("dir", help="a checkpoint directory (step_NNNNNN)")
    v.set_defaults(fn=cmd_checkpoint_verify)
    sp = sub.add_parser("tasks", help="list the generators each task family can name as `dataset`")
    sp.add_argument("family", nargs="?", choices=FAMILIES)
    sp.add_argument("--yaml", action="store_true", help="print data.tasks entries for every generator but "
                                                        "the held-out evaluation ones (a default training mix)")
    sp.set_defaults(fn=cmd_tasks)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except InputError as e:   # the user's input: one message, no traceback (a bug keeps its traceback)
        print(f"prorl {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
