"""Run improved_gan_mnist.py over label counts × seeds (optionally also the supervised-only baseline) and print a
markdown table of test errors, mean ± std over seeds.

A preset of the sweep runner `sweeps/run.py`: the runs go through run.py's engine (run_jobs). Run (label count,
method, seed) is `improved_gan_mnist.py --num-labels N --seed-data S [--supervised-only] <arguments after --> --seed S
--out-dir <out-dir> --exp-name mnist_{ssl|sup}_{N}[_{tag}] --device cpu|cuda`, so a seed changes both the
weights/noise and which digits carry labels (as the paper's error bars do). Runs go to `--out-dir`, one folder each.
As in run.py: a run whose folder has a summary.json is skipped and an interrupted one (checkpoints/last.pt) is resumed,
so an interrupted sweep is continued by running the same command again; each run is locked while it runs
(<out-dir>/sweep/locks/); a run folder made with other flags is an error; every run's flags are checked by the
script's parser before anything starts; logs in <out-dir>/sweep/logs/; a failed run is reported, the others go on
(exit status 1). `--device X` after `--` picks where the runs go (cpu, cuda = cuda:0, cuda:N; auto or none: cuda:0
when torch sees a GPU, else cpu); `--devices cuda:0 cuda:1 ...` spreads them over several GPUs instead. Each run gets
`--cores` // `--jobs` threads. The table groups every finished run folder in --out-dir by label count and method
from its args.json, also runs started by hand; run folders whose args.json or summary.json cannot be read (or lack
what the table shows) are left out and listed below it. A user mistake (a bad flag value, an unwritable --out-dir,
arguments after -- that set what names a run: --num-labels, --seed-data, --supervised-only) is one `error:` line and
exit status 2; the engine's exit statuses otherwise (1 a run failed, 3 a run was busy in another sweep, 130
interrupted).

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
import importlib.util
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "improved_gan_mnist.py"
_spec = importlib.util.spec_from_file_location("sweep_runner", Path(__file__).resolve().parent / "run.py")
engine = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # sweeps/run.py, the engine of the runs
_spec.loader.exec_module(engine)
common, UserError = engine.common, engine.UserError
# improved_gan_mnist.py flags that make a run what its name says (mnist_{ssl|sup}_{N}): the preset sets them
RUN_FLAGS = ("--num-labels", "--seed-data", "--supervised-only", "--no-supervised-only")


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--num-labels", type=int, nargs="+", default=[20, 50, 100, 200], help="label counts")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (used as --seed and --seed-data)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=False,
                   help="also run --supervised-only with the same labels")
    p.add_argument("--tag", type=str, default="", help="suffix of the runs' --exp-name (e.g. topk), so that variants "
                   "sharing an --out-dir are told apart when finished runs are skipped")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--cores", type=int, default=engine.available_cores(),
                   help="CPU cores shared by the runs: each gets max(1, cores // jobs) threads (at most the cores "
                        "this process may use)")
    p.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="cpu, or cuda:0 cuda:1 ...: each run gets the least busy of these GPUs (default: from --device "
                        "after --, else cuda:0 when torch sees a GPU, else cpu)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command of every run that would start (and which are finished), run nothing")
    p.add_argument("--out-dir", type=str, default="runs/mnist_ssl", help="folder of the run folders and logs")
    p.add_argument("--at-epoch", type=int, default=None,
                   help="tabulate the test errors logged at this epoch (finished or running runs) instead of the final ones")
    p.add_argument("--table-only", action=argparse.BooleanOptionalAction, default=False,
                   help="run nothing, tabulate the finished runs in --out-dir")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    elif extra:
        raise UserError(f"unknown arguments {' '.join(extra)}: put arguments for the runs after --")
    if args.jobs < 1 or args.cores < 1:
        raise UserError("--jobs and --cores must be at least 1")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds: a seed given twice in {' '.join(map(str, args.seeds))}")
    engine.check_flags("arguments after --", extra, RUN_FLAGS, "names the run, so the preset sets it (use "
                       "--num-labels, --seeds, --baseline)")
    engine.check_out_dir(args.out_dir)
    return args, extra


def split_device(extra: list[str]) -> tuple[str | None, list[str]]:
    """(the value of --device in the run arguments or None, the run arguments without it): run.py sets --device."""
    device, rest, i = None, [], 0
    while i < len(extra):
        if extra[i] == "--device" and i + 1 < len(extra):
            device, i = extra[i + 1], i + 2
        elif extra[i].startswith("--device="):
            device, i = extra[i].split("=", 1)[1], i + 1
        else:
            rest.append(extra[i])
            i += 1
    return device, rest


def engine_devices(devices: list[str] | None, device: str | None) -> list[str]:
    """run.py's device list: --devices as given, else the --device after -- (cpu, cuda, cuda:N, auto)."""
    if devices is not None:
        if device is not None:
            raise UserError("give either --devices or --device after --, not both")
        return devices
    if device in ("cpu", "cuda") or (device or "").startswith("cuda:"):
        return ["cuda:0"] if device == "cuda" else [device]
    if device not in (None, "auto"):
        raise UserError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    # auto, as the script's own default: a GPU when torch sees one (asked in a subprocess: this process stays light)
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True)
    return ["cuda:0"] if probe.returncode == 0 and probe.stdout.strip() not in ("", "0") else ["cpu"]


ARGS_KEYS, RESULT_KEYS = ("num_labels", "seed"), ("test_err_ema", "test_err_ema_pct", "test_err_raw")


def usable(a: dict | None, s: dict | None) -> bool:
    """Whether args.json `a` and a summary-shaped record `s` hold what the table shows."""
    return a is not None and s is not None and isinstance(a.get("exp_name"), str) \
        and all(type(a.get(k)) is int for k in ARGS_KEYS) and all(engine.number(s, k) is not None for k in RESULT_KEYS)


def finished_runs(out_dir: Path, skipped: list) -> list[tuple[dict, dict]]:
    """(args.json, summary.json) of every finished run folder in out_dir; the names of folders with a summary.json
    that cannot be used go to `skipped`."""
    runs = []
    for summary in sorted(out_dir.glob("*/summary.json")):
        a, s = engine.read_json(summary.parent / "args.json"), engine.read_json(summary)
        if usable(a, s) and engine.number(s, "n_test") is not None and engine.number(s, "epochs_done") is not None:
            runs.append((a, dict(s, seed=a["seed"])))
        else:
            skipped.append(summary.parent.name)
    return runs


def runs_at_epoch(out_dir: Path, epoch: int, skipped: list) -> list[tuple[dict, dict]]:
    """(args.json, the metrics.jsonl evaluation record of `epoch`) of every run folder that has evaluated it,
    finished or not, shaped like a summary (epochs_done = epoch); folders whose args.json cannot be used go to
    `skipped`."""
    runs = []
    for metrics in sorted(out_dir.glob("*/metrics.jsonl")):
        a = engine.read_json(metrics.parent / "args.json")
        for r in engine.read_jsonl(metrics):
            if r.get("epoch") == epoch and usable(a, r):
                n_test = round(100.0 * r["test_err_ema"] / r["test_err_ema_pct"]) if r["test_err_ema_pct"] else None
                runs.append((a, dict(r, seed=a["seed"], n_test=n_test, epochs_done=epoch)))
            elif r.get("epoch") == epoch and "test_err_ema" in r:
                skipped.append(metrics.parent.name)
    return runs


def exp_name(num_labels: int, supervised: bool, tag: str = "") -> str:
    return f"mnist_{'sup' if supervised else 'ssl'}_{num_labels}" + (f"_{tag}" if tag else "")


def run_all(args, extra) -> int:
    """Every (label count, method, seed) through run.py's engine, `--jobs` at a time; its exit status."""
    out_dir = Path(args.out_dir)
    device, extra = split_device(extra)
    jobs = [(out_dir, exp_name(n, supervised, args.tag), seed,
             ["--num-labels", str(n), "--seed-data", str(seed), *(["--supervised-only"] if supervised else []), *extra],
             {"num_labels": n, "seed_data": seed, "supervised_only": supervised})  # abbreviations in extra cannot win
            for n in args.num_labels for supervised in ([False, True] if args.baseline else [False])
            for seed in args.seeds]
    return engine.run_jobs(jobs, SCRIPT, out_dir, workers=args.jobs, cores=args.cores,
                           devices=engine_devices(args.devices, device), print_only=args.dry_run)


def fmt(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(out_dir: Path, at_epoch: int | None = None) -> str:
    groups: dict[tuple, list[dict]] = {}
    skipped = []
    for a, s in (finished_runs(out_dir, skipped) if at_epoch is None else runs_at_epoch(out_dir, at_epoch, skipped)):
        method = "supervised-only" if a.get("supervised_only") else ("SSL + top-k" if a.get("topk") else "SSL (K+1 GAN)")
        groups.setdefault((a["num_labels"], method, a["exp_name"], s["n_test"], s["epochs_done"]), []).append(s)
    lines = ["| labels | method | runs (--exp-name) | epochs | seeds | test errors (EMA D), per seed | EMA D: errors mean ± std | EMA D: % | "
             "raw D: errors mean ± std |",
             "|---:|---|---|---:|---|---|---:|---:|---:|"]
    for (n, method, name, n_test, epochs), runs in sorted(groups.items(), key=lambda g: (*g[0][:3], g[0][3] or -1, g[0][4])):
        runs.sort(key=lambda s: s["seed"])
        ema = [s["test_err_ema"] for s in runs]
        lines.append(f"| {n} | {method} | {name} | {epochs} | {', '.join(str(s['seed']) for s in runs)} | "
                     f"{', '.join(map(str, ema))} | {fmt(ema, 1)} / {n_test} | "
                     f"{fmt([s['test_err_ema_pct'] for s in runs], 2)} | {fmt([s['test_err_raw'] for s in runs], 1)} / {n_test} |")
    lines.append("")
    lines.append("std: sample standard deviation over seeds (n - 1); seed = --seed = --seed-data.")
    if skipped:
        lines.append(f"Left out, run files unreadable or incomplete: {', '.join(sorted(set(skipped)))}.")
    return "\n".join(lines)


def main(argv=None):
    args, extra = parse_args(argv)
    status = 0
    if not args.table_only:
        status = run_all(args, extra)
        if status == 130 or args.dry_run:
            return status
    print(table(Path(args.out_dir), args.at_epoch))
    return status


if __name__ == "__main__":
    common.run_cli(lambda: sys.exit(main()))
