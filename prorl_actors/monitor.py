"""`prorl monitor [RUN]`: watch runs on one machine.

Starts Debian's `prometheus` binary on 127.0.0.1 with monitoring/prometheus/prometheus.yml
(which finds every live run through the target files runs write into /tmp/prorl/prometheus,
and evaluates monitoring/prometheus/alerts.yml) and says where to look, with links to RUN's
curves (RUN: a run directory, `<output_dir>/<name>`; it need not exist yet). Prometheus keeps
its data beside the runs, in `<output_dir>/.prometheus` (not inside a run's directory, which a
fresh start moves aside), or in ~/.cache/prorl_actors/prometheus without RUN.
Ctrl-C or SIGTERM stops it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from prorl_actors.exporter import pid_alive, target_file_pid

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
TARGETS_DIR = Path("/tmp/prorl/prometheus")   # what prometheus.yml reads (metrics.prometheus.targets_dir)


def find_prometheus() -> str | None:
    return shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.access(p, os.X_OK)), None)


def live_runs(targets_dir: Path = TARGETS_DIR) -> list[tuple[str, list[str], bool]]:
    """(target file, targets, whether its process is alive) for every run exporter listed."""
    out = []
    for f in sorted(targets_dir.glob("*.prorl.json")):
        alive = pid_alive(target_file_pid(f))
        try:
            targets = [t for group in json.loads(f.read_text()) for t in group["targets"]]
        except (OSError, ValueError, KeyError, TypeError):
            targets = []
        out.append((f.name, targets, alive))
    return out


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"prometheus not ready at {url} after {timeout_s:.0f}s")


def cmd_monitor(args) -> int:
    binary = find_prometheus()
    if binary is None:
        print("prorl monitor: no `prometheus` binary; install Debian's package: apt-get install prometheus",
              file=sys.stderr)
        return 2
    config = Path(args.config) if args.config else MONITORING / "prometheus" / "prometheus.yml"
    if not config.exists():
        print(f"prorl monitor: {config} not found (run from a clone of prorl-actors, or pass --config)",
              file=sys.stderr)
        return 2
    run_dir = Path(args.run) if args.run else None
    storage = run_dir.parent / ".prometheus" if run_dir else Path.home() / ".cache" / "prorl_actors" / "prometheus"
    storage.mkdir(parents=True, exist_ok=True)
    listen = f"127.0.0.1:{args.port}"
    url = f"http://{listen}"
    log = storage / "prometheus.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([binary, f"--config.file={config.resolve()}", f"--storage.tsdb.path={storage.resolve()}",
                                 f"--web.listen-address={listen}", f"--storage.tsdb.retention.time={args.retention}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        try:
            wait_ready(url, proc)
        except RuntimeError as e:
            print(f"prorl monitor: {e}; its log: {log}", file=sys.stderr)   # its config or its port
            return 2
        runs = live_runs()
        print(f"Prometheus {url} ready (config {config}, data {storage}, log {log})")
        print(f"  graphs: {url}/graph   alerts: {url}/alerts   targets: {url}/targets")
        print(f"  Grafana: provision {MONITORING / 'grafana' / 'provisioning'} (datasource {url}, "
              f"dashboards {MONITORING / 'grafana' / 'dashboards'}); see the README")
        if not runs:
            print(f"  no run exporting yet: every `prorl train` lists itself in {TARGETS_DIR}")
        for name, targets, alive in runs:
            print(f"  run target {name}: {', '.join(targets)}{'' if alive else '  (its process is gone: down)'}")
        if run_dir is not None:
            sel = f'{{run="{run_dir.name}"}}'
            links = {"entropy": f"prorl_learner_entropy{sel}", "reward per task": f"prorl_verifier_task_reward{sel}",
                     "KL": f"prorl_learner_kl{sel}"}
            print(f"  run {run_dir.name}:")
            for what, expr in links.items():
                print(f"    {what}: {url}/graph?" + urllib.parse.urlencode({"g0.expr": expr, "g0.range_input": "1h"}))
        print("Ctrl-C stops it.", flush=True)
        proc.wait()
        print(f"prorl monitor: prometheus exited with code {proc.returncode}; its log: {log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
