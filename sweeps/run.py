"""Run one experiment script over named variants x seeds (locally on N workers, CPU threads or GPUs, or as a SLURM
array), then tabulate and plot the results from the run folders alone. Anchor: cleanrl_utils/benchmark.py.

Each (variant, seed) is one run: `python <script> <flags after --> <variant flags> --seed S --out-dir <out-dir>
--exp-name <variant> --device cpu|cuda [--threads T]`, so the script makes its run folder
`<out-dir>/<variant>__<seed>__<unix time>/` (args.json, metrics.jsonl, summary.json, checkpoints/last.pt).
A variant is NAME=FLAGS (FLAGS split like a shell line); `{seed}` in its flags becomes the run's seed.

  * Validation first: the script is imported in a subprocess and its own parse_args(argv) (plus validate_args /
    check_args when it has them) is called on every run's flags. Any refusal, an unknown script, a device that does
    not exist or a seed given twice: one `error:` line on stderr, exit status 2, nothing started or written.
  * Idempotent: a run's state comes from its run folders (newest first): summary.json -> finished, skipped;
    checkpoints/last.pt -> interrupted, continued with `--resume <last.pt>`; neither -> started from scratch.
    While a run runs, the runner and the run hold an flock(2) lock on `<out-dir>/sweep/locks/<variant>__<seed>.lock`
    (inherited by the run, so it stays held if the runner is killed): two sweeps on one folder never run the same
    run; the second reports it as busy. A run folder made with other flags than the sweep asks for is an error.
  * Local: `--workers` runs at a time, seed-major order (every variant of seed 1 first, so a sweep cut short is a
    complete table with fewer seeds). `--devices cuda:0 cuda:1 ...`: each run gets the device with the fewest
    running jobs (round robin) through CUDA_VISIBLE_DEVICES and `--device cuda`; on CPU each run gets
    cores // workers threads (OMP_NUM_THREADS, MKL_NUM_THREADS and the script's --threads when it has one).
    A failed run is reported with its exit status and last stderr line; the others go on (exit status 1 at the end).
  * `--slurm`: writes `<out-dir>/sweep/<job-name>.sbatch`, one array task per run (resources as flags, requeued
    tasks continue from last.pt) and prints the sbatch line. Index i runs exactly the command the local mode would
    run for run i with the same device kind and threads; `SWEEP_DRY_RUN=1 SLURM_ARRAY_TASK_ID=i bash <file>`
    prints it (NUL-separated) instead of running it.
  * `--report`: from the run folders alone, `<out-dir>/report.md` (a table of the script's headline metrics per
    variant: mean +- sample std and per-seed values), report.json (the same numbers, unrounded) and PNG plots of a
    metric over training (mean line, band of +-1 std over seeds), drawn with Pillow.
  * Presets (sweeps/mog_table1.py, sweeps/mnist_ssl.py) import this file and call run_jobs() with their own list of
    (out_dir, exp_name, seed, flags): the same engine, each run's sweep files in its own <out_dir>/sweep/.

Files of the sweep itself: `<out-dir>/sweep/` (locks/, logs/<variant>__<seed>.out|.err, runs.jsonl with the exact
command, device, start/end and exit status of every run, validated.json: flag lists the script accepted, keyed by
the content of the script's folder, so an unchanged sweep does not import the script again).

Examples
    # DCGAN vs DCGAN + top-k on CIFAR-10, seeds 1-3, one GPU per run on a 2-GPU box; then FID curves:
    python sweeps/run.py --script dcgan_cifar_topk.py --variants gan= topk="--topk --mu 64 --gamma 0.99" \\
        --seeds 1 2 3 --workers 2 --devices cuda:0 cuda:1 --out-dir runs/dcgan_seeds
    python sweeps/run.py --report --out-dir runs/dcgan_seeds
    # the same runs as a SLURM array (one GPU per array task):
    python sweeps/run.py --script dcgan_cifar_topk.py --variants gan= topk="--topk --mu 64 --gamma 0.99" \\
        --seeds 1 2 3 --out-dir runs/dcgan_seeds --slurm --slurm-gpus 1 --slurm-time 4:00:00
    # MoG, two CPU runs at a time, flags after -- go to every run:
    python sweeps/run.py --script mog_topk.py --variants gan= topk=--topk --seeds 1 2 3 --workers 2 \\
        --out-dir runs/mog25 -- --n-modes 25
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Flags the runner sets for every run; variants and the flags after -- must not set them.
RUNNER_FLAGS = ("--seed", "--out-dir", "--exp-name", "--device", "--resume")
# args.json entries that may differ between a run folder and the sweep without making it another experiment (the
# last three: how it is computed, not what; the scripts' own --resume check lets them differ too, and a default
# that changed, e.g. --torch-deterministic, must not orphan the run folders made before).
NOT_CONFIG = {"seed", "out_dir", "exp_name", "device", "threads", "resume", "track", "log_every", "download",
              "git_commit", "torch_version", "command", "torch_deterministic", "compile", "check_host_sync"}

# Headline metrics of each script in summary.json: (label, dotted key, scale, decimals).
HEADLINES = {
    "mog_topk": [("HQ %", "high_quality", 100, 1), ("modes %", "modes_recovered", 100, 1),
                 ("reverse KL", "reverse_kl", 1, 3)],
    "dcgan_cifar_topk": [("FID final", "final.fid", 1, 2), ("FID best", "best.fid", 1, 2),
                         ("IS final", "final.is_mean", 1, 2), ("IS at best FID", "best.is_mean", 1, 2),
                         ("best FID epoch", "best.epoch", 1, 0)],
    "improved_gan_mnist": [("test errors (EMA D)", "test_err_ema", 1, 1), ("test error % (EMA D)", "test_err_ema_pct", 1, 2),
                           ("test error % (raw D)", "test_err_raw_pct", 1, 2)],
    "improved_gan_cifar": [("test error %", "test_error", 100, 2), ("FID", "fid", 1, 2), ("IS", "is_mean", 1, 2)],
}
# Curves over training from metrics.jsonl: (file stem, y label, y key, x key, x label, y scale). Records with
# "final": true (dcgan's 50k-sample final evaluation) are left out, so every point has the same sample count.
CURVES = {
    "mog_topk": [("hq", "HQ %", "eval/high_quality", "step", "iteration", 100),
                 ("modes", "modes %", "eval/modes_recovered", "step", "iteration", 100)],
    "dcgan_cifar_topk": [("fid", "FID", "fid", "epoch", "epoch", 1)],
    "improved_gan_mnist": [("test_error", "test error % (EMA D)", "test_err_ema_pct", "epoch", "epoch", 1)],
    "improved_gan_cifar": [("test_error", "test error %", "test_error", "epoch", "epoch", 100),
                           ("fid", "FID", "fid", "epoch", "epoch", 1)],
}
# A variant name (= --exp-name, the run folders' prefix): no "__", which separates name, seed and time in a folder name.
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9.+-]*(_[A-Za-z0-9.+-]+)*"
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def fail(message: str, status: int = 2):
    """A user mistake: one `error:` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default (except None: those say in their help what they mean)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) or action.default == [] else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own complaints: one line too, no usage block
        fail(message)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
               epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--script", type=str, default=None,
                   help="experiment script to run, e.g. dcgan_cifar_topk.py (a path, or a name in the repository root)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME=FLAGS",
                   help='named flag sets, e.g. gan= topk="--topk --mu 64 --gamma 0.99"; {seed} in FLAGS becomes '
                        "the run's seed (default: one variant 'default' with no flags; with --report: every variant found)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds, each passed as --seed (default 1 2 3; with --report: every seed found)")
    p.add_argument("--out-dir", type=str, default="runs/sweep", help="folder of the run folders, sweep/ and the report")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (local mode)")
    p.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="cpu, or cuda:0 cuda:1 ...: each run gets the least busy of these GPUs (default: cpu)")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPU cores shared by the runs: each run gets max(1, cores // workers) threads")
    p.add_argument("--python", type=str, default=sys.executable, help="interpreter that runs the script")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command of every run that would start (and which are finished) and exit")
    g = p.add_argument_group("SLURM (--slurm writes an sbatch array script instead of running)")
    g.add_argument("--slurm", action="store_true", help="write <out-dir>/sweep/<job-name>.sbatch and print the sbatch line")
    g.add_argument("--slurm-job-name", type=str, default=None, help="job name (default: <script>-sweep)")
    g.add_argument("--slurm-partition", type=str, default=None, help="partition (default: the cluster's)")
    g.add_argument("--slurm-account", type=str, default=None, help="account to charge (default: the user's)")
    g.add_argument("--slurm-time", type=str, default="24:00:00", help="time limit of each array task")
    g.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per array task (0: CPU runs, --device cpu)")
    g.add_argument("--slurm-cpus", type=int, default=4, help="CPUs per array task (also the runs' threads)")
    g.add_argument("--slurm-mem", type=str, default="32G", help="memory per array task")
    g.add_argument("--slurm-max-parallel", type=int, default=0, help="array tasks running at once (0: no limit)")
    g.add_argument("--slurm-setup", type=str, default="",
                   help="shell line run before the run, e.g. 'source ~/venv/bin/activate'")
    g = p.add_argument_group("report (--report reads the run folders and runs nothing)")
    g.add_argument("--report", action="store_true", help="write report.md, report.json and plots into --out-dir")
    g.add_argument("--metrics", nargs="+", default=None, metavar="KEY",
                   help="summary.json entries to tabulate, dotted for nested ones (e.g. final.fid); default: the "
                        "script's headline metrics (every numeric entry for other scripts)")
    g.add_argument("--curves", nargs="+", default=None, metavar="KEY",
                   help="metrics.jsonl entries to plot over training (default: the script's curves)")
    g.add_argument("--curve-x", type=str, default="step", help="metrics.jsonl entry on the x axis of --curves")
    g.add_argument("--plot-size", type=str, default="800x500", help="plot size in pixels, WIDTHxHEIGHT")
    p.add_argument("run_flags", nargs="*", metavar="-- FLAGS",
                   help="flags after -- are passed to every run (before the variant's flags)")
    args = p.parse_args(argv)

    # checks that need nothing but the command line
    if sum([args.report, args.slurm, args.dry_run]) > 1:
        fail("--report, --slurm and --dry-run exclude each other")
    if not re.fullmatch(r"\d+x\d+", args.plot_size) or min(map(int, args.plot_size.split("x"))) < 200:
        fail(f"--plot-size must be WIDTHxHEIGHT, each at least 200, got {args.plot_size!r}")
    args.plot_size = tuple(map(int, args.plot_size.split("x")))
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        fail(f"--seeds: seed(s) {', '.join(map(str, twice))} given twice")
    args.variants = parse_variants(args.variants)
    if args.script is not None:
        args.script = find_script(args.script)
    if args.report:
        return args
    if args.script is None:
        fail("--script is required (the experiment to run)")
    if args.seeds is None:
        args.seeds = [1, 2, 3]
    if args.variants is None:
        args.variants = {"default": []}
    if args.workers < 1 or args.cores < 1:
        fail("--workers and --cores must be at least 1")
    if args.slurm and args.devices is not None:
        fail("--devices is for local runs; with --slurm the scheduler assigns --slurm-gpus GPUs per array task")
    if args.slurm_gpus < 0 or args.slurm_cpus < 1 or args.slurm_max_parallel < 0:
        fail("--slurm-gpus and --slurm-max-parallel must be >= 0, --slurm-cpus >= 1")
    args.devices = parse_devices(args.devices or ["cpu"])
    for name, flags in [("flags after --", args.run_flags)] + [(f"variant {v!r}", f) for v, f in args.variants.items()]:
        check_runner_flags(name, flags, "use --seeds, --out-dir, variant names, --devices")
    return args


def check_runner_flags(name: str, flags: list[str], hint: str) -> None:
    """Refuse a flag the runner sets for every run (RUNNER_FLAGS) in `flags`."""
    for flag in RUNNER_FLAGS:
        if any(tok == flag or tok.startswith(flag + "=") for tok in flags):
            fail(f"{name}: {flag} is set by the runner for every run ({hint}; interrupted runs resume by themselves)")


def find_script(name: str) -> Path:
    """The script as given (relative to the working directory) or in the repository root."""
    for path in (Path(name), REPO / name):
        if path.is_file() and path.suffix == ".py":
            return path.resolve()
    fail(f"--script {name}: no such Python script (looked in {Path.cwd()} and {REPO})")


def parse_variants(items: list[str] | None) -> dict[str, list[str]] | None:
    """['gan=', 'topk=--topk --mu 64'] -> {'gan': [], 'topk': ['--topk', '--mu', '64']} (a bare NAME: no flags)."""
    if items is None:
        return None
    variants = {}
    for item in items:
        name, _, flags = item.partition("=")
        if not re.fullmatch(NAME_RE, name):
            fail(f"--variants {item!r}: a variant is NAME=FLAGS with NAME made of letters, digits, '.', '+', '-' "
                 "and single '_' (it becomes --exp-name and the run folder's prefix)")
        if name in variants:
            fail(f"--variants: variant {name!r} given twice")
        try:
            variants[name] = shlex.split(flags)
        except ValueError as e:
            fail(f"--variants {item!r}: {e}")
    return variants


def parse_devices(devices: list[str]) -> list[str]:
    """['cpu'] or distinct ['cuda:0', 'cuda:1', ...] (existence is checked with the script's torch later)."""
    if devices == ["cpu"]:
        return devices
    for d in devices:
        if not re.fullmatch(r"cuda:\d+", d):
            fail(f"--devices {d!r}: use cpu (alone) or cuda:N (one or more)")
    if len(set(devices)) != len(devices):
        fail(f"--devices: a device given twice in {' '.join(devices)} (two jobs share a GPU with --workers > devices)")
    return devices


# ---------------------------------------------------------------------------------------------------------------
# The sweep: runs, their commands and their state on disk
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    index: int        # position in the seed-major order = SLURM array index
    variant: str
    seed: int
    flags: list[str]  # flags after --, then the variant's flags ({seed} filled in)
    out_dir: str | None = None  # folder of its run folder and sweep/ files; None: the sweep's --out-dir (run_jobs sets it)

    @property
    def key(self) -> str:
        return f"{self.variant}__{self.seed}"


def plan(args) -> list[Run]:
    """Every (variant, seed), seed-major."""
    runs = []
    for seed in args.seeds:
        for variant, vflags in args.variants.items():
            flags = [tok.replace("{seed}", str(seed)) for tok in args.run_flags + vflags]
            runs.append(Run(len(runs), variant, seed, flags))
    return runs


def folder(args, run: Run) -> str:
    """Absolute folder of the run's run folders and of its sweep/ files (locks, logs, runs.jsonl)."""
    return run.out_dir or args.out_abs


def command(args, run: Run, device_kind: str, threads: int | None, resume: Path | None = None) -> list[str]:
    """The exact argv of one run. threads is None when the script has no --threads flag."""
    cmd = [args.python, str(args.script), *run.flags, "--seed", str(run.seed), "--out-dir", folder(args, run),
           "--exp-name", run.variant, "--device", device_kind]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    return cmd


def run_state(out_dir: str, run: Run) -> tuple[str, Path | None]:
    """('finished', run folder) | ('resume', its checkpoints/last.pt) | ('new', None), from the newest run folder that
    has either (folder names sort by start time). The sbatch script repeats exactly this logic in bash."""
    for folder in sorted(Path(out_dir).glob(f"{run.key}__*"), reverse=True):
        if (folder / "summary.json").is_file():
            return "finished", folder
        if (folder / "checkpoints" / "last.pt").is_file():
            return "resume", folder / "checkpoints" / "last.pt"
    return "new", None


# ---------------------------------------------------------------------------------------------------------------
# Validation: the script's own parser on every run's flags, in a subprocess (the runner itself never imports torch)
# ---------------------------------------------------------------------------------------------------------------
VALIDATOR = r'''
import contextlib, importlib.util, io, json, os, sys
script, request_path, answer_path = sys.argv[1:4]
request = json.load(open(request_path))
answer = {"import_error": None, "cuda_count": 0, "results": []}
sys.argv = [script]
sys.path.insert(0, os.path.dirname(script))
try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        spec = importlib.util.spec_from_file_location("sweep_target", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not callable(getattr(module, "parse_args", None)):
        raise ImportError("it has no parse_args(argv) function")
except BaseException as e:
    answer["import_error"] = f"{type(e).__name__}: {e}"
else:
    called = []
    def wrap(name, fn):  # a parse_args that already calls its validator must not run it twice
        def wrapper(*a, **k):
            called.append(name)
            return fn(*a, **k)
        return wrapper
    checks = [n for n in ("validate_args", "check_args") if callable(getattr(module, n, None))]
    for n in checks:
        setattr(module, n, wrap(n, getattr(module, n)))
    for argv in request["argvs"]:
        del called[:]
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                args = module.parse_args(argv)
                for n in checks:
                    if n not in called:
                        getattr(module, n)(args)
            answer["results"].append({"ok": True, "resolved": json.loads(json.dumps(vars(args), default=str))})
        except SystemExit as e:
            lines = [l for l in err.getvalue().splitlines() if l.strip()]
            message = lines[-1].split(": error: ", 1)[-1] if lines else f"parse_args exited with status {e.code}"
            answer["results"].append({"ok": False, "error": message})
        except Exception as e:
            answer["results"].append({"ok": False, "error": str(e) or type(e).__name__})
    if request["need_cuda"]:
        try:
            import torch
            answer["cuda_count"] = torch.cuda.device_count()
        except Exception:
            pass
json.dump(answer, open(answer_path, "w"))
'''


def validate(args, runs: list[Run], device_kind: str) -> dict:
    """Check every run's flags with the script's parser; return {'threads': has --threads, 'resolved': [vars]}.
    Answers are cached in <out-dir>/sweep/validated.json, keyed by everything they depend on."""
    argvs = [command(args, run, device_kind, None)[2:] for run in runs]
    need_cuda = args.devices != ["cpu"] and not args.slurm
    folder_hash = hashlib.sha256()
    for path in sorted(args.script.parent.glob("*.py")):  # the script and the modules beside it (common, metrics)
        folder_hash.update(path.name.encode() + b"\0" + path.read_bytes())
    key = hashlib.sha256(json.dumps([args.python, str(args.script), folder_hash.hexdigest(), argvs, need_cuda,
                                     os.environ.get("CUDA_VISIBLE_DEVICES"), socket.gethostname()]).encode()).hexdigest()
    cache_path = Path(args.out_abs) / "sweep" / "validated.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    answer = cache.get(key)
    if answer is None:
        with tempfile.TemporaryDirectory() as tmp:
            request, answer_path = Path(tmp) / "request.json", Path(tmp) / "answer.json"
            request.write_text(json.dumps({"argvs": argvs, "need_cuda": need_cuda}))
            proc = subprocess.run([args.python, "-c", VALIDATOR, str(args.script), str(request), str(answer_path)],
                                  capture_output=True, text=True)
            if not answer_path.is_file():
                last = ([l for l in proc.stderr.splitlines() if l.strip()] or [f"exit status {proc.returncode}"])[-1]
                fail(f"could not check the flags with {args.script.name}: {last}")
            answer = json.loads(answer_path.read_text())
    if answer["import_error"]:
        fail(f"--script {args.script.name} cannot be used: {answer['import_error']}")
    for d in args.devices if need_cuda else []:
        if int(d.split(":")[1]) >= answer["cuda_count"]:
            fail(f"--devices {d}: no such device ({answer['cuda_count']} CUDA device(s) visible)")
    for run, result in zip(runs, answer["results"]):
        if not result["ok"]:
            reason = re.sub(r"^error:\s*", "", str(result["error"]))  # the script's own one-line error, unprefixed
            fail(f"variant {run.variant!r} (seed {run.seed}): {args.script.name} refuses its flags: {reason}")
    resolved = [r["resolved"] for r in answer["results"]]
    has_threads = "threads" in resolved[0]
    if has_threads and any(tok == "--threads" or tok.startswith("--threads=") for run in runs for tok in run.flags):
        fail("--threads is set by the runner (cores // workers, or --slurm-cpus)")
    # a finished or interrupted run folder must have been made with the flags this sweep asks for
    for run, want in zip(runs, resolved):
        state, where = run_state(folder(args, run), run)
        if state == "new":
            continue
        run_dir = where if state == "finished" else where.parent.parent
        try:
            have = json.loads((run_dir / "args.json").read_text())
        except (OSError, ValueError):
            fail(f"{run_dir}: args.json missing or unreadable; move the folder away or use another --out-dir")
        diff = sorted(k for k in want.keys() & have.keys() if k not in NOT_CONFIG and want[k] != have[k])
        if diff:
            k = diff[0]
            fail(f"{run_dir} was made with --{k.replace('_', '-')} {have[k]!r}, this sweep asks for {want[k]!r} "
                 f"({len(diff)} setting(s) differ): use another --out-dir or variant name")
    if key not in cache and not args.dry_run:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache = dict(list(cache.items())[-19:] + [(key, answer)])
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    return {"threads": has_threads, "resolved": resolved}


# ---------------------------------------------------------------------------------------------------------------
# Local mode
# ---------------------------------------------------------------------------------------------------------------
def cuda_visible(device: str, parent: str | None) -> str:
    """CUDA_VISIBLE_DEVICES of a run on `device` (cuda:N): the N-th GPU the runner itself sees."""
    index = int(device.split(":")[1])
    if parent:
        return parent.split(",")[index].strip()
    return str(index)


def journal(out_dir: str, record: dict) -> None:
    """One line of <out-dir>/sweep/runs.jsonl, appended in a single write."""
    fd = os.open(Path(out_dir) / "sweep" / "runs.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def last_line(path: Path, offset: int) -> str:
    """Last non-empty line written to `path` after byte `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    return lines[-1].strip() if lines else "(nothing on stderr)"


@dataclass
class Job:
    run: Run
    proc: subprocess.Popen
    lock_fd: int
    device: str
    err_path: Path
    err_offset: int
    t0: float


def start(args, run: Run, device: str, threads: int | None, tag: str) -> Job | None:
    """Take the run's lock, re-check its state under the lock, start it. None when busy elsewhere or finished."""
    sweep = Path(folder(args, run)) / "sweep"
    lock_fd = os.open(sweep / "locks" / f"{run.key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        print(f"{tag} busy  {run.variant} seed {run.seed}: another sweep is running it", flush=True)
        return None
    state, where = run_state(folder(args, run), run)
    if state == "finished":
        os.close(lock_fd)
        print(f"{tag} skip  {run.variant} seed {run.seed}: finished in {where}", flush=True)
        return None
    kind = "cpu" if device == "cpu" else "cuda"
    cmd = command(args, run, kind, threads, where if state == "resume" else None)
    n_threads = str(max(1, args.cores // args.workers))
    env = dict(os.environ, OMP_NUM_THREADS=n_threads, MKL_NUM_THREADS=n_threads,
               CUDA_VISIBLE_DEVICES="" if device == "cpu" else cuda_visible(device, os.environ.get("CUDA_VISIBLE_DEVICES")))
    out_path, err_path = sweep / "logs" / f"{run.key}.out", sweep / "logs" / f"{run.key}.err"
    with open(out_path, "ab") as out, open(err_path, "ab") as err:
        header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {state}: {shlex.join(cmd)}\n".encode()
        out.write(header)
        out.flush()
        err_offset = err.tell()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, pass_fds=(lock_fd,))
    print(f"{tag} start {run.variant} seed {run.seed} ({state}, {device}, {n_threads} thread(s)): {shlex.join(cmd)}",
          flush=True)
    journal(folder(args, run), {"event": "start", "index": run.index, "variant": run.variant, "seed": run.seed,
                                "state": state, "argv": cmd, "device": device,
                                "cuda_visible_devices": env["CUDA_VISIBLE_DEVICES"],
                                "omp_num_threads": n_threads, "pid": proc.pid, "time": time.time()})
    return Job(run, proc, lock_fd, device, err_path, err_offset, time.time())


def run_local(args, runs: list[Run], has_threads: bool, on_end=None) -> int:
    """Run `runs` in order, args.workers at a time; on_end(run, exit status), if given, after each run that ran."""
    sweeps = sorted({Path(folder(args, run)) / "sweep" for run in runs})
    for sweep in sweeps:
        (sweep / "locks").mkdir(parents=True, exist_ok=True)
        (sweep / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, args.cores // args.workers) if has_threads else None
    queue, running, failed, counts = list(runs), [], [], {"ran": 0, "skipped": 0}
    n_variants, n_seeds = len({run.variant for run in runs}), len({run.seed for run in runs})
    print(f"sweep: {len(runs)} runs of {args.script.name} ({n_variants} variants x {n_seeds} seeds), "
          f"{args.workers} at a time on {' '.join(args.devices)}; logs in "
          f"{' '.join(str(sweep / 'logs') for sweep in sweeps)}", flush=True)

    def stop(signum, frame):  # SIGTERM as Ctrl-C: stop the runs, keep their checkpoints
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            while queue and len(running) < args.workers:
                run = queue.pop(0)
                load = [sum(job.device == d for job in running) for d in args.devices]
                device = args.devices[load.index(min(load))]
                job = start(args, run, device, threads, f"[{run.index + 1}/{len(runs)}]")
                if job is None:
                    counts["skipped"] += 1
                else:
                    running.append(job)
            time.sleep(0.05)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                os.close(job.lock_fd)
                rc, took = job.proc.returncode, time.time() - job.t0
                tag = f"[{job.run.index + 1}/{len(runs)}]"
                record = {"event": "end", "index": job.run.index, "variant": job.run.variant, "seed": job.run.seed,
                          "exit": rc, "seconds": round(took, 3), "time": time.time()}
                if rc == 0:
                    counts["ran"] += 1
                    print(f"{tag} done  {job.run.variant} seed {job.run.seed}: ok, {took:.1f} s", flush=True)
                else:
                    status = f"exit {rc}" if rc > 0 else f"killed by signal {-rc}"
                    record["last_stderr"] = last_line(job.err_path, job.err_offset)
                    failed.append(f"{job.run.variant} seed {job.run.seed}: {status}: {record['last_stderr']}")
                    print(f"{tag} FAILED {failed[-1]} (log {job.err_path})", file=sys.stderr, flush=True)
                journal(folder(args, job.run), record)
                if on_end is not None:
                    on_end(job.run, rc)
    except KeyboardInterrupt:
        for job in running:
            job.proc.terminate()
        for job in running:
            job.proc.wait()
        print(f"interrupted: {len(running)} run(s) stopped; the same command continues them from their last "
              "checkpoint", file=sys.stderr, flush=True)
        return 130
    print(f"sweep: {counts['ran']} ran, {counts['skipped']} skipped, {len(failed)} failed", flush=True)
    if failed:
        print("failed runs:\n  " + "\n  ".join(failed), file=sys.stderr, flush=True)
        return 1
    return 0


def dry_run(args, runs: list[Run], has_threads: bool) -> int:
    threads = max(1, args.cores // args.workers) if has_threads else None
    kind = "cpu" if args.devices == ["cpu"] else "cuda"
    for run in runs:
        state, where = run_state(folder(args, run), run)
        if state == "finished":
            print(f"# {run.variant} seed {run.seed}: finished in {where}")
        else:
            print(shlex.join(command(args, run, kind, threads, where if state == "resume" else None)))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------------------------
def write_slurm(args, runs: list[Run], has_threads: bool) -> int:
    sweep = Path(args.out_abs) / "sweep"
    (sweep / "logs").mkdir(parents=True, exist_ok=True)
    (sweep / "locks").mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", args.slurm_job_name or f"{args.script.stem}-sweep")
    kind = "cuda" if args.slurm_gpus > 0 else "cpu"
    threads = args.slurm_cpus if has_threads else None
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"# Written by sweeps/run.py: {shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
             f"# {len(runs)} runs of {args.script.name}; array index -> run:"]
    lines += [f"#   {r.index}: {r.variant} seed {r.seed}" for r in runs]
    lines += ["# A finished run (summary.json) is skipped; an interrupted one (checkpoints/last.pt) continues with",
              "# --resume, also after a requeue. SWEEP_DRY_RUN=1 SLURM_ARRAY_TASK_ID=i bash <this file> prints the",
              "# command of index i (NUL-separated) instead of running it.",
              f"#SBATCH --job-name={name}",
              f"#SBATCH --array=0-{len(runs) - 1}" + (f"%{args.slurm_max_parallel}" if args.slurm_max_parallel else ""),
              f"#SBATCH --time={args.slurm_time}",
              f"#SBATCH --cpus-per-task={args.slurm_cpus}",
              f"#SBATCH --mem={args.slurm_mem}"]
    lines += [f"#SBATCH --gres=gpu:{args.slurm_gpus}"] if args.slurm_gpus else []
    lines += [f"#SBATCH --partition={args.slurm_partition}"] if args.slurm_partition else []
    lines += [f"#SBATCH --account={args.slurm_account}"] if args.slurm_account else []
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append",
              f"#SBATCH --output={sweep / 'logs' / 'slurm_%A_%a.out'}",
              f"#SBATCH --error={sweep / 'logs' / 'slurm_%A_%a.err'}",
              "set -euo pipefail",
              "export LC_ALL=C  # run folders sort by name as in sweeps/run.py",
              f"cd {q(os.getcwd())}"]
    lines += [args.slurm_setup] if args.slurm_setup else []
    lines += [f"export OMP_NUM_THREADS={args.slurm_cpus} MKL_NUM_THREADS={args.slurm_cpus}"]
    lines += [] if args.slurm_gpus else ['export CUDA_VISIBLE_DEVICES=""']
    lines += [f"OUT_DIR={q(args.out_abs)}",
              'case "${SLURM_ARRAY_TASK_ID:?run this file with sbatch, or set SLURM_ARRAY_TASK_ID}" in']
    for r in runs:
        cmd = " ".join(q(tok) for tok in command(args, r, kind, threads))
        lines.append(f"  {r.index}) NAME={q(r.variant)}; SEED={r.seed}; CMD=({cmd}) ;;")
    lines += ['  *) echo "error: no run has array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
              "esac",
              "# the lock of sweeps/run.py, taken before looking at the run folders: never two processes on one run",
              "# (fd 9 stays open in the run, so the lock is held until it ends)",
              'if [ -z "${SWEEP_DRY_RUN:-}" ]; then',
              '  mkdir -p "$OUT_DIR/sweep/locks"',
              '  exec 9>>"$OUT_DIR/sweep/locks/${NAME}__${SEED}.lock"',
              '  if command -v flock >/dev/null && ! flock -n 9; then echo "busy: ${NAME} seed ${SEED} runs elsewhere"; exit 0; fi',
              "fi",
              "# newest run folder first: finished -> nothing to do; interrupted -> continue it",
              'FOLDERS=("$OUT_DIR/${NAME}__${SEED}__"*)',
              'for (( j=${#FOLDERS[@]}-1; j>=0; j-- )); do',
              '  D=${FOLDERS[j]}',
              '  [ -d "$D" ] || continue',
              '  if [ -f "$D/summary.json" ]; then echo "finished: $D"; exit 0; fi',
              '  if [ -f "$D/checkpoints/last.pt" ]; then CMD+=(--resume "$D/checkpoints/last.pt"); break; fi',
              "done",
              'if [ -n "${SWEEP_DRY_RUN:-}" ]; then printf \'%s\\0\' "${CMD[@]}"; exit 0; fi',
              'echo "run: ${CMD[*]}"',
              'exec "${CMD[@]}"', ""]
    path = sweep / f"{name}.sbatch"
    path.write_text("\n".join(lines))
    print(f"wrote {path} ({len(runs)} array tasks)\nsbatch {q(str(path))}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Report: tables and plots from the run folders alone
# ---------------------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line torn by a crash
                pass
    return records


def number(obj, dotted: str) -> float | None:
    """obj['a']['b'] for 'a.b' when it is a finite number, else None."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    if isinstance(obj, bool) or not isinstance(obj, (int, float)) or not math.isfinite(obj):
        return None
    return float(obj)


def stats(values: list[float]) -> dict:
    return {"values": values, "n": len(values), "mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def fmt(value: float | None, decimals: int | None) -> str:
    if value is None:
        return "–"
    return f"{value:.{decimals}f}" if decimals is not None else f"{value:.4g}"


def fmt_stats(s: dict, decimals: int | None) -> str:
    if s["n"] == 0:
        return "–"
    if s["n"] == 1:
        return fmt(s["mean"], decimals)
    return f"{fmt(s['mean'], decimals)} ± {fmt(s['std'], decimals)}"


def collect(out_dir: Path, script: Path | None) -> tuple[str, dict, list[str]]:
    """(script stem, {variant: {seed: run folder}}, notes) of the finished runs; newest folder per (variant, seed)."""
    finished, unfinished, stems = {}, [], set()
    for folder in sorted(p for p in out_dir.iterdir() if (p / "args.json").is_file()):
        a = json.loads((folder / "args.json").read_text())
        stem = Path(str(a.get("command", "")).split(" ")[0]).stem
        if script is not None and stem != script.stem:
            continue
        if (folder / "summary.json").is_file():
            stems.add(stem)
            finished.setdefault(a["exp_name"], {}).setdefault(a["seed"], []).append(folder)
        else:
            steps = [r.get("step") for r in read_jsonl(folder / "metrics.jsonl") if "step" in r]
            unfinished.append(f"{folder.name} (last logged step {steps[-1] if steps else '–'})")
    if not stems:
        fail(f"--report: no finished run folders (args.json + summary.json) in {out_dir}")
    if len(stems) > 1:
        fail(f"--report: {out_dir} holds runs of several scripts ({', '.join(sorted(stems))}): add --script")
    notes = [f"{v} seed {s}: {len(f)} finished run folders, the newest ({f[-1].name}) is used"
             for v, by_seed in finished.items() for s, f in by_seed.items() if len(f) > 1]
    if unfinished:
        notes.append("unfinished runs, not in the tables: " + ", ".join(unfinished))
    runs = {v: {s: f[-1] for s, f in by_seed.items()} for v, by_seed in finished.items()}
    return stems.pop(), runs, notes


def curve(folders: list[Path], y_key: str, x_key: str, scale: float) -> dict:
    """Mean and sample std over seeds of y at every x that some seed logged (n: seeds at that x)."""
    per_x: dict[float, list[float]] = {}
    for folder in folders:
        for r in read_jsonl(folder / "metrics.jsonl"):
            x, y = number(r, x_key), number(r, y_key)
            if x is not None and y is not None and r.get("final") is not True:
                per_x.setdefault(x, []).append(y * scale)
    xs = sorted(per_x)
    return {"x": xs, "mean": [statistics.mean(per_x[x]) for x in xs],
            "std": [statistics.stdev(per_x[x]) if len(per_x[x]) > 1 else 0.0 for x in xs],
            "n": [len(per_x[x]) for x in xs]}


def nice_ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] (steps 1, 2, 2.5, 5 x 10^k) and the decimals to print them with."""
    if not hi > lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    mult = next(m for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    step = mult * mag
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if mult == 2.5 and mag <= 1 else 0)
    return [i * step for i in range(first, last + 1)], decimals


def draw_plot(path: Path, title: str, x_label: str, y_label: str, series: list[tuple[str, tuple, dict]], size) -> None:
    """Line plot with one line (mean over seeds) and one band (mean ± std over seeds) per variant, axes with ticks
    and labels, a legend; Pillow only."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    font = ImageFont.load_default(size=max(11, H // 40))
    big = ImageFont.load_default(size=max(13, H // 30))
    img = Image.new("RGBA", (W, H), (255, 255, 255, 255))
    d = ImageDraw.Draw(img)
    text_w = lambda s, f=font: d.textbbox((0, 0), s, font=f)[2]  # noqa: E731
    text_h = d.textbbox((0, 0), "Hg0", font=font)[3]
    xs = [x for _, _, c in series for x in c["x"]]
    ys = [v for _, _, c in series for m, s in zip(c["mean"], c["std"]) for v in (m - s, m + s)]
    x_ticks, x_dec = nice_ticks(min(xs), max(xs))
    y_ticks, y_dec = nice_ticks(min(ys), max(ys))
    tick_text = lambda t, dec: f"{0.0 if abs(t) < 1e-12 else t:.{dec}f}"  # noqa: E731  (no "-0.0")
    x_text, y_text = [tick_text(t, x_dec) for t in x_ticks], [tick_text(t, y_dec) for t in y_ticks]
    left = 18 + text_h + 12 + max(text_w(s) for s in y_text) + 8
    top, right, bottom = 18 + text_h * 2, W - 20, H - (2 * text_h + 30)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    # grid, ticks and tick labels
    for t, s in zip(x_ticks, x_text):
        d.line([(px(t), top), (px(t), bottom)], fill=(225, 225, 225))
        d.line([(px(t), bottom), (px(t), bottom + 5)], fill="black")
        d.text((px(t) - text_w(s) / 2, bottom + 8), s, fill="black", font=font)
    for t, s in zip(y_ticks, y_text):
        d.line([(left, py(t)), (right, py(t))], fill=(225, 225, 225))
        d.line([(left - 5, py(t)), (left, py(t))], fill="black")
        d.text((left - 8 - text_w(s), py(t) - text_h / 2 - 1), s, fill="black", font=font)
    # bands (translucent), then lines and markers
    overlay = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)
    for _, color, c in series:
        upper = [(px(x), py(m + s)) for x, m, s in zip(c["x"], c["mean"], c["std"])]
        lower = [(px(x), py(m - s)) for x, m, s in zip(c["x"], c["mean"], c["std"])]
        if len(upper) > 1:
            od.polygon(upper + lower[::-1], fill=color + (55,))
        elif upper:
            od.line([upper[0], lower[0]], fill=color + (120,), width=6)
    img = Image.alpha_composite(img, overlay)
    d = ImageDraw.Draw(img)
    for _, color, c in series:
        points = [(px(x), py(m)) for x, m in zip(c["x"], c["mean"])]
        if len(points) > 1:
            d.line(points, fill=color, width=2)
        if len(points) <= 40:
            for x, y in points:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    d.rectangle([left, top, right, bottom], outline="black")
    # title, axis labels (the y label turned by 90 degrees)
    d.text(((left + right) / 2 - text_w(title, big) / 2, 8), title, fill="black", font=big)
    d.text(((left + right) / 2 - text_w(x_label) / 2, bottom + text_h + 18), x_label, fill="black", font=font)
    label = Image.new("RGBA", (text_w(y_label) + 4, text_h + 4), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2, 0), y_label, fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.alpha_composite(label, (14, int((top + bottom) / 2 - label.height / 2)))
    # legend inside the axes, in the corner that covers the fewest points of the lines
    entries = [(name, color) for name, color, _ in series]
    lw, lh = max(text_w(name) for name, _ in entries) + 44, len(entries) * (text_h + 6) + 8
    on_lines = [(px(xa + (xb - xa) * t / 20), py(ya + (yb - ya) * t / 20)) for _, _, c in series
                for xa, xb, ya, yb in zip(c["x"], c["x"][1:] or c["x"], c["mean"], c["mean"][1:] or c["mean"])
                for t in range(21)]
    corners = [(right - lw - 8, top + 8), (left + 8, top + 8), (right - lw - 8, bottom - lh - 8), (left + 8, bottom - lh - 8)]
    lx, ly = min(corners, key=lambda xy: sum(xy[0] <= x <= xy[0] + lw and xy[1] <= y <= xy[1] + lh for x, y in on_lines))
    d.rectangle([lx, ly, lx + lw, ly + lh], fill="white", outline=(150, 150, 150))
    for i, (name, color) in enumerate(entries):
        y = ly + 6 + i * (text_h + 6) + text_h / 2
        d.line([(lx + 8, y), (lx + 32, y)], fill=color, width=3)
        d.text((lx + 38, y - text_h / 2 - 1), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(path, "PNG")


def report(args) -> int:
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        fail(f"--report: no folder {out_dir}")
    stem, runs, notes = collect(out_dir, args.script)
    pick_seeds = lambda by_seed: sorted(s for s in by_seed if args.seeds is None or s in args.seeds)  # noqa: E731
    variants = [v for v in (args.variants or sorted(runs)) if v in runs and pick_seeds(runs[v])]
    notes += [f"variant {v}: no finished runs of the seeds asked for" for v in (args.variants or []) if v not in variants]
    if not variants:
        fail(f"--report: no finished runs of the variants and seeds asked for in {out_dir}")
    if args.metrics:
        metrics_spec = [(k, k, 1, None) for k in args.metrics]
    elif stem in HEADLINES:
        metrics_spec = HEADLINES[stem]
    else:  # another script: every numeric top-level entry of its summaries
        keys = sorted({k for v in variants for s in runs[v].values()
                       for k, val in json.loads((s / "summary.json").read_text()).items() if number({k: val}, k) is not None})
        metrics_spec = [(k, k, 1, None) for k in keys]
    if args.curves:
        curves_spec = [(re.sub(r"[^A-Za-z0-9_.-]", "_", k), k, k, args.curve_x, args.curve_x, 1) for k in args.curves]
    else:
        curves_spec = CURVES.get(stem, [])

    result = {"script": stem, "out_dir": str(out_dir.resolve()), "variants": {}, "curves": {}, "notes": notes}
    for v in variants:
        seeds = pick_seeds(runs[v])
        summaries = {s: json.loads((runs[v][s] / "summary.json").read_text()) for s in seeds}
        entry = {"seeds": seeds, "runs": {str(s): str(runs[v][s]) for s in seeds}, "metrics": {}}
        for label, key, scale, _ in metrics_spec:
            per_seed = {s: (None if number(summaries[s], key) is None else number(summaries[s], key) * scale)
                        for s in seeds}
            entry["metrics"][label] = dict(stats([x for x in per_seed.values() if x is not None]),
                                           per_seed={str(s): x for s, x in per_seed.items()})
        result["variants"][v] = entry

    lines = [f"# Sweep report: {stem}.py", "",
             f"Run folders in `{out_dir}`: {sum(len(e['seeds']) for e in result['variants'].values())} finished runs. "
             "Mean ± sample standard deviation over seeds (n − 1 in the denominator), per-seed values in seed order; "
             f"made by `python sweeps/run.py --report --out-dir {out_dir}`.", "",
             "| variant | seeds | " + " | ".join(label for label, *_ in metrics_spec) + " |",
             "|---|---|" + "---|" * len(metrics_spec)]
    for v in variants:
        e = result["variants"][v]
        lines.append(f"| {v} | {', '.join(map(str, e['seeds']))} | "
                     + " | ".join(fmt_stats(e["metrics"][label], dec) for label, _, _, dec in metrics_spec) + " |")
    for v in variants:
        e = result["variants"][v]
        first = json.loads((Path(e["runs"][str(e["seeds"][0])]) / "args.json").read_text())
        lines += ["", f"## {v}", "", f"Command (seed {e['seeds'][0]}): `{first.get('command', '?')}`", "",
                  "| metric | n | mean ± std | " + " | ".join(f"seed {s}" for s in e["seeds"]) + " |",
                  "|---|---|---|" + "---|" * len(e["seeds"])]
        for label, _, _, dec in metrics_spec:
            m = e["metrics"][label]
            lines.append(f"| {label} | {m['n']} | {fmt_stats(m, dec)} | "
                         + " | ".join(fmt(m["per_seed"][str(s)], dec) for s in e["seeds"]) + " |")

    plots = []
    for file_stem, y_label, y_key, x_key, x_label, scale in curves_spec:
        series, data = [], {}
        for i, v in enumerate(variants):
            c = curve([runs[v][s] for s in pick_seeds(runs[v])], y_key, x_key, scale)
            if c["x"]:
                data[v] = c
                series.append((f"{v} (n={max(c['n'])})", COLORS[i % len(COLORS)], c))
        if not series:
            notes.append(f"no {y_key} in any metrics.jsonl: no {file_stem}.png")
            continue
        png = out_dir / f"{file_stem}.png"
        draw_plot(png, f"{stem}: {y_label} vs {x_label} (mean ± std over seeds)", x_label, y_label, series,
                  args.plot_size)
        result["curves"][file_stem] = {"file": png.name, "y": y_key, "x": x_key, "scale": scale,
                                       "colors": {v: COLORS[i % len(COLORS)] for i, v in enumerate(variants) if v in data},
                                       "series": data}
        plots.append(f"![{y_label} vs {x_label}]({png.name})")
    if plots:
        lines += ["", "## Curves", ""] + plots
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text, end="")
    print(f"wrote {out_dir / 'report.md'}, report.json" + "".join(f", {c['file']}" for c in result["curves"].values()))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The engine for presets (sweeps/mog_table1.py, sweeps/mnist_ssl.py): a list of runs, each with its own folder
# ---------------------------------------------------------------------------------------------------------------
def run_jobs(jobs, script, out_dir, *, workers: int = 1, cores: int | None = None, devices=("cpu",),
             python: str | None = None, print_only: bool = False, on_end=None) -> int:
    """Run jobs = [(out_dir, exp_name, seed, flags)] of `script` in the given order with the local mode of this
    runner: the same validation (the script's parser on every run's flags, a run folder made with other flags is an
    error), locks, skip/resume from the run folders, `workers` at a time on `devices` with cores // workers threads,
    logs and runs.jsonl, and the same exit status (0, 1 when a run failed, 130 when interrupted; a user mistake: one
    `error:` line, exit 2). Run i is `python <script> <flags> --seed S --out-dir <its out_dir> --exp-name <exp_name>
    --device cpu|cuda [--threads T] [--resume last.pt]`; its sweep files are in <its out_dir>/sweep/, the flag
    check's cache in <out_dir>/sweep/. print_only: print the commands (--dry-run) instead. on_end(run, exit status) is called
    after each run that ran."""
    args = argparse.Namespace(script=find_script(str(script)), python=python or sys.executable, out_dir=str(out_dir),
                              out_abs=os.path.abspath(out_dir), workers=workers,
                              cores=cores or len(os.sched_getaffinity(0)), devices=parse_devices(list(devices)),
                              slurm=False, dry_run=print_only)
    if args.workers < 1 or args.cores < 1:
        fail("workers and cores must be at least 1")
    runs, seen = [], set()
    for job_dir, name, seed, flags in jobs:
        run = Run(len(runs), name, int(seed), [str(tok) for tok in flags], os.path.abspath(job_dir))
        if not re.fullmatch(NAME_RE, name):
            fail(f"run name {name!r}: use letters, digits, '.', '+', '-' and single '_' (it is the run folder's prefix)")
        if (run.out_dir, run.key) in seen:
            fail(f"run {name} seed {seed} in {run.out_dir} is planned twice")
        seen.add((run.out_dir, run.key))
        check_runner_flags(f"run {name} seed {seed}", run.flags, "the sweep sets them")
        runs.append(run)
    if not runs:
        print("sweep: nothing to run", flush=True)
        return 0
    checked = validate(args, runs, "cpu" if args.devices == ["cpu"] else "cuda")
    if print_only:
        return dry_run(args, runs, checked["threads"])
    return run_local(args, runs, checked["threads"], on_end)


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args)
    args.out_abs = os.path.abspath(args.out_dir)
    runs = plan(args)
    kind = ("cuda" if args.slurm_gpus > 0 else "cpu") if args.slurm else ("cpu" if args.devices == ["cpu"] else "cuda")
    checked = validate(args, runs, kind)  # before anything starts; fails with one error line
    if args.slurm:
        return write_slurm(args, runs, checked["threads"])
    if args.dry_run:
        return dry_run(args, runs, checked["threads"])
    return run_local(args, runs, checked["threads"])


if __name__ == "__main__":
    sys.exit(main())
