"""`prorl train|validate|make-tiny-model`.

`prorl train SPEC [dotted.key=value ...]` validates the spec first (exit 2 with every
error, nothing started), then joins the Ray cluster named by `ray.address` or RAY_ADDRESS
(as under `ray job submit`) or starts an embedded local Ray on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from prorl_actors.spec import SpecError, load_spec, to_yaml


def _load(args):
    try:
        return load_spec(args.spec, args.overrides)
    except SpecError as e:
        print(f"prorl: invalid spec {args.spec}\n{e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"prorl: {e}", file=sys.stderr)
        sys.exit(2)


def connect_ray(spec) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # with _node_ip_address: loopback only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=spec.ray.namespace, log_to_driver=True)
    else:
        ray.init(num_cpus=spec.ray.num_cpus, namespace=spec.ray.namespace, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=True)


def cmd_validate(args) -> int:
    spec = _load(args)
    print(to_yaml(spec), end="")
    return 0


def cmd_train(args) -> int:
    spec = _load(args)
    from prorl_actors.supervisor import Supervisor, summary_table
    from prorl_actors.tinymodel import resolve_model_path

    t0 = time.time()
    run_dir = spec.run_dir
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    if run_dir.exists() and any(run_dir.iterdir()):
        # never mix two runs' records; resuming a run is a separate feature
        old = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(old)
        log(f"{run_dir} held an earlier run: moved it to {old}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(to_yaml(spec))
    log(f"run {spec.name} -> {run_dir}")
    model_path = resolve_model_path(spec.model, spec.data, log=log)
    connect_ray(spec)
    import ray
    try:
        sup = Supervisor(spec, model_path, log=log)
        try:
            result = sup.run()
        finally:
            sup.shutdown()
    finally:
        ray.shutdown()
    from prorl_actors.plots import plot_run
    table = summary_table(result)
    (run_dir / "summary.txt").write_text(table + "\n")
    print("\n" + table)
    log(f"curves: {plot_run(run_dir)}")
    log(f"done: {run_dir}")
    return 0


def cmd_make_tiny_model(args) -> int:
    from prorl_actors.tinymodel import build_tiny_model
    spec = _load(args)
    build_tiny_model(spec.model.tiny, spec.data, Path(args.out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="prorl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in (("train", cmd_train, "train with a run spec"),
                               ("validate", cmd_validate, "print the resolved spec or every error (exit 2)")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("spec")
        sp.add_argument("overrides", nargs="*", help="dotted.key=value")
        sp.set_defaults(fn=fn)
    sp = sub.add_parser("make-tiny-model", help="build the embedded tiny base model into OUT")
    sp.add_argument("out")
    sp.add_argument("--spec", default=None, help="take model.tiny and data from this spec")
    sp.add_argument("overrides", nargs="*")
    sp.set_defaults(fn=cmd_make_tiny_model)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
