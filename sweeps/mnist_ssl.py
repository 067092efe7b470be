"""Run improved_gan_mnist.py over label counts × seeds (optionally also the supervised-only baseline) and print a
markdown table of test errors, mean ± std over seeds.

Each run uses `--seed S --seed-data S`, so a seed changes both the weights/noise and which digits carry labels
(as the paper's error bars do). Runs go to `--out-dir`, one folder each; a configuration whose run folder already
has a summary.json is skipped, so an interrupted sweep is continued by running the same command again.
Arguments after `--` are passed to every run.

Examples
    # full MNIST, the paper's table (GPU):
    python sweeps/mnist_ssl.py --num-labels 20 50 100 200 --seeds 1 2 3 --out-dir runs/mnist_full
    # 5,000-digit subset, SSL vs supervised-only, 100 labels, 100 epochs, two CPU processes at a time:
    python sweeps/mnist_ssl.py --num-labels 100 --seeds 1 2 3 --baseline --jobs 2 --out-dir runs/mnist5k \
        -- --data-dir ../shared/data/mnist5k --no-download --epochs 100 --ema-decay 0.999 --device cpu
    # the same with top-k generator updates (another --tag, so the runs are not mistaken for the plain ones):
    python sweeps/mnist_ssl.py --num-labels 100 --seeds 1 2 3 --tag topk --out-dir runs/mnist_full -- --topk
    # only print the table of what is in a folder:
    python sweeps/mnist_ssl.py --table-only --out-dir runs/mnist5k
    # ... or of the errors every run logged at epoch 20 (a matched comparison while runs are still going):
    python sweeps/mnist_ssl.py --table-only --at-epoch 20 --out-dir runs/mnist5k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "improved_gan_mnist.py"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-labels", type=int, nargs="+", default=[20, 50, 100, 200], help="label counts")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (used as --seed and --seed-data)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=False,
                   help="also run --supervised-only with the same labels")
    p.add_argument("--tag", type=str, default="", help="suffix of the runs' --exp-name (e.g. topk), so that variants "
                   "sharing an --out-dir are told apart when finished runs are skipped")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--out-dir", type=str, default="runs/mnist_ssl", help="folder of the run folders and logs")
    p.add_argument("--at-epoch", type=int, default=None,
                   help="tabulate the test errors logged at this epoch (finished or running runs) instead of the final ones")
    p.add_argument("--table-only", action=argparse.BooleanOptionalAction, default=False,
                   help="run nothing, tabulate the finished runs in --out-dir")
    args, extra = p.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    elif extra:
        p.error(f"unknown arguments {extra}: put arguments for the runs after --")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args, extra


def finished_runs(out_dir: Path) -> list[tuple[dict, dict]]:
    """(args.json, summary.json) of every finished run folder in out_dir."""
    runs = []
    for summary in sorted(out_dir.glob("*/summary.json")):
        runs.append((json.loads((summary.parent / "args.json").read_text()), json.loads(summary.read_text())))
    return runs


def runs_at_epoch(out_dir: Path, epoch: int) -> list[tuple[dict, dict]]:
    """(args.json, the metrics.jsonl evaluation record of `epoch`) of every run folder that has evaluated it,
    finished or not, shaped like a summary (epochs_done = epoch)."""
    runs = []
    for metrics in sorted(out_dir.glob("*/metrics.jsonl")):
        a = json.loads((metrics.parent / "args.json").read_text())
        for line in metrics.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("epoch") == epoch and "test_err_ema" in r:
                n_test = round(100.0 * r["test_err_ema"] / r["test_err_ema_pct"]) if r["test_err_ema_pct"] else None
                runs.append((a, dict(r, seed=a["seed"], n_test=n_test, epochs_done=epoch)))
    return runs


def exp_name(num_labels: int, supervised: bool, tag: str = "") -> str:
    return f"mnist_{'sup' if supervised else 'ssl'}_{num_labels}" + (f"_{tag}" if tag else "")


def run_all(args, extra) -> None:
    out_dir = Path(args.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    done = {(a["exp_name"], a["seed"]) for a, _ in finished_runs(out_dir)}
    queue = []
    for n in args.num_labels:
        for supervised in ([False, True] if args.baseline else [False]):
            for seed in args.seeds:
                name = exp_name(n, supervised, args.tag)
                if (name, seed) in done:
                    print(f"skip {name} seed {seed}: finished run in {out_dir}", flush=True)
                    continue
                cmd = [sys.executable, str(SCRIPT), "--num-labels", str(n), "--seed", str(seed), "--seed-data", str(seed),
                       "--out-dir", str(out_dir), "--exp-name", name] + (["--supervised-only"] if supervised else []) + extra
                queue.append((name, seed, cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    running = []
    failed = []
    while queue or running:
        while queue and len(running) < args.jobs:
            name, seed, cmd = queue.pop(0)
            log = open(out_dir / "logs" / f"{name}__{seed}.log", "w")
            print(f"start {name} seed {seed}: {' '.join(cmd)}", flush=True)
            running.append((name, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
        time.sleep(2)
        for item in list(running):
            name, seed, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"done  {name} seed {seed}: exit {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(f"{name} seed {seed} (see {log.name})")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)


def fmt(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(out_dir: Path, at_epoch: int | None = None) -> str:
    groups: dict[tuple, list[dict]] = {}
    for a, s in (finished_runs(out_dir) if at_epoch is None else runs_at_epoch(out_dir, at_epoch)):
        method = "supervised-only" if a["supervised_only"] else ("SSL + top-k" if a.get("topk") else "SSL (K+1 GAN)")
        groups.setdefault((a["num_labels"], method, a["exp_name"], s["n_test"], s["epochs_done"]), []).append(s)
    lines = ["| labels | method | runs (--exp-name) | epochs | seeds | test errors (EMA D), per seed | EMA D: errors mean ± std | EMA D: % | "
             "raw D: errors mean ± std |",
             "|---:|---|---|---:|---|---|---:|---:|---:|"]
    for (n, method, name, n_test, epochs), runs in sorted(groups.items()):
        runs.sort(key=lambda s: s["seed"])
        ema = [s["test_err_ema"] for s in runs]
        lines.append(f"| {n} | {method} | {name} | {epochs} | {', '.join(str(s['seed']) for s in runs)} | "
                     f"{', '.join(map(str, ema))} | {fmt(ema, 1)} / {n_test} | "
                     f"{fmt([s['test_err_ema_pct'] for s in runs], 2)} | {fmt([s['test_err_raw'] for s in runs], 1)} / {n_test} |")
    lines.append("")
    lines.append("std: sample standard deviation over seeds (n - 1); seed = --seed = --seed-data.")
    return "\n".join(lines)


def main():
    args, extra = parse_args()
    if not args.table_only:
        run_all(args, extra)
    print(table(Path(args.out_dir), args.at_epoch))


if __name__ == "__main__":
    main()
