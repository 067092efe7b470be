"""Run one experiment script over named variants x seeds (locally on N workers, CPU threads or GPUs, or as a SLURM
array), then tabulate and plot the results from the run folders alone. Anchor: cleanrl_utils/benchmark.py.

Each (variant, seed) is one run: `python <script> <flags after --> <variant flags> --seed S --out-dir <out-dir>
--exp-name <variant> --device cpu|cuda [--threads T]`, so the script makes its run folder
`<out-dir>/<variant>__<seed>__<unix time>/` (args.json, metrics.jsonl, summary.json, checkpoints/last.pt).
A variant is NAME=FLAGS (FLAGS split like a shell line); `{seed}` in its flags becomes the run's seed.

  * Validation first: the script is imported in a subprocess and its own parse_args(argv) (plus validate_args /
    check_args when it has them) is called on every run's flags; the values it resolves for the flags the runner
    sets (seed, out-dir, exp-name, device, no resume) must be the runner's, so an abbreviation (`--resum X`) cannot
    slip one in. Any refusal, an unknown script, a device that does not exist, a seed given twice, an --out-dir that
    cannot hold folders: one `error:` line on stderr, exit status 2, nothing started or written.
  * Idempotent: a run's folders are those whose args.json records its script, exp_name and seed (newest first):
    a readable summary.json -> finished, skipped; checkpoints/last.pt -> interrupted, continued with `--resume
    <last.pt>`; neither -> started from scratch. A run folder made with other flags than the sweep asks for, or
    one with a checkpoint or summary but no readable args.json, is an error.
    While a run runs, the runner and the run hold an flock(2) lock on `<out-dir>/sweep/locks/<variant>__<seed>.lock`
    (inherited by the run, so it stays held if the runner is killed): two sweeps on one folder never run the same
    run; the second reports it as busy.
  * Local: `--workers` runs at a time, seed-major order (every variant of seed 1 first, so a sweep cut short is a
    complete table with fewer seeds). `--devices cuda:0 cuda:1 ...`: each run gets the device with the fewest
    running jobs (round robin) through CUDA_VISIBLE_DEVICES and `--device cuda`; on CPU each run gets
    cores // workers threads (OMP_NUM_THREADS, MKL_NUM_THREADS and the script's --threads when it has one; --cores
    is capped at the cores this process may use). A failed run is reported with its exit status and last stderr
    line; the others go on.
  * Ctrl-C: the runs are in the runner's process group, so the terminal's Ctrl-C reaches them too and each saves a
    checkpoint at its next step boundary and exits; the runner starts nothing more, waits for them, records their
    ends in runs.jsonl (status interrupted, last_pt: the checkpoint the same command continues from, or null) and
    says which runs continue and which start again. A second Ctrl-C stops the runs without saving (theirs to
    handle); the runner still waits and records. SIGTERM to the runner is passed on to the runs as SIGINT, once.
    A SIGINT sent to the runner alone (kill -INT <pid>) lets the running runs finish.
  * Exit status: 0 every run finished or skipped; 1 a run failed; 2 a user mistake, or a file system that refused a
    write of the runner (one `error:` line; running runs are stopped as by Ctrl-C first); 3 nothing failed but a
    run was busy in another sweep (run the command again when that one has ended); 130 interrupted.
  * `--slurm`: writes `<out-dir>/sweep/<job-name>.sbatch`, one array task per run (resources as flags, requeued
    tasks continue from last.pt) and prints the sbatch line. Index i runs exactly the command the local mode would
    run for run i with the same device kind and threads; `SWEEP_DRY_RUN=1 SLURM_ARRAY_TASK_ID=i bash <file>`
    prints it (NUL-separated) instead of running it. Every value in the file is shell-quoted; #SBATCH values with
    control characters or backslashes (which sbatch cannot take literally) are refused; --slurm-setup is the
    user's shell code, run with eval.
  * `--report`: from the run folders alone, `<out-dir>/report.md` (a table of the script's headline metrics per
    variant: mean +- sample std and per-seed values), report.json (the same numbers, unrounded) and PNG plots of a
    metric over training (mean line, band of +-1 std over seeds), drawn with Pillow. Run folders whose args.json is
    unreadable are skipped and listed; one with an unreadable summary.json counts as unfinished.
  * Presets (sweeps/mog_table1.py, sweeps/mnist_ssl.py) import this file and call run_jobs() with their own list of
    (out_dir, exp_name, seed, flags[, expected values]): the same engine, each run's sweep files in its own
    <out_dir>/sweep/.

Files of the sweep itself: `<out-dir>/sweep/` (locks/, logs/<variant>__<seed>.out|.err, runs.jsonl with the exact
command, device, start/end and exit status of every run (the start record is written before the run starts),
validated.json: flag lists the script accepted, keyed by the content of the script's folder, so an unchanged sweep
does not import the script again).

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
import inspect
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
try:
    import common  # noqa: E402  (the scripts' one-line errors: UserError, run_cli, ArgumentParser)
except KeyboardInterrupt:  # Ctrl-C while torch is being imported: nothing has been written yet
    print("interrupted: during the start-up, before anything was written", file=sys.stderr)
    sys.exit(130)
from common import UserError  # noqa: E402

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
PLOT_SIZES = (200, 4000)  # smallest and largest plot side in pixels
EXIT_BUSY = 3  # nothing failed, but a run was busy in another sweep


@contextmanager
def os_errors(what: str):
    """An OSError in the block (a file system that refuses, a missing program) becomes a UserError: one line."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) not in what else ""
        raise UserError(f"{what}: {e.strerror or common.describe(e)}{where}") from None


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cap_cores(flag: str, cores: int) -> int:
    """`cores`, refused below 1 and capped (with a warning) at the cores this process may use."""
    if cores < 1:
        raise UserError(f"{flag} must be at least 1, got {cores}")
    if cores > available_cores():
        print(f"warning: {flag} {cores} is more than the {available_cores()} core(s) this process may use: using "
              f"{available_cores()}", file=sys.stderr, flush=True)
    return min(cores, available_cores())


def check_out_dir(out_dir: str, flag: str = "--out-dir") -> None:
    """Refuse an out-dir that is a file or lies below one, or whose nearest existing folder refuses writes (what
    access(2) can tell; a refused mkdir later is one line too)."""
    probe = Path(out_dir).absolute()
    with os_errors(f"{flag} {out_dir}"):
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise UserError(f"{flag} {out_dir}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out_dir}: cannot create folders in {probe} (read-only or no permission)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default (except None: those say in their help what they mean)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) or action.default == [] else super()._get_help_string(action)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1], allow_abbrev=False)
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
    p.add_argument("--cores", type=int, default=available_cores(),
                   help="CPU cores shared by the runs: each run gets max(1, cores // workers) threads (at most the "
                        "cores this process may use)")
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
                   help="shell code run (with eval) before the run, e.g. 'source ~/venv/bin/activate'")
    g = p.add_argument_group("report (--report reads the run folders and runs nothing)")
    g.add_argument("--report", action="store_true", help="write report.md, report.json and plots into --out-dir")
    g.add_argument("--metrics", nargs="+", default=None, metavar="KEY",
                   help="summary.json entries to tabulate, dotted for nested ones (e.g. final.fid); default: the "
                        "script's headline metrics (every numeric entry for other scripts)")
    g.add_argument("--curves", nargs="+", default=None, metavar="KEY",
                   help="metrics.jsonl entries to plot over training (default: the script's curves)")
    g.add_argument("--curve-x", type=str, default="step", help="metrics.jsonl entry on the x axis of --curves")
    g.add_argument("--plot-size", type=str, default="800x500",
                   help=f"plot size in pixels, WIDTHxHEIGHT, each {PLOT_SIZES[0]} to {PLOT_SIZES[1]}")
    p.add_argument("run_flags", nargs="*", metavar="-- FLAGS",
                   help="flags after -- are passed to every run (before the variant's flags)")
    args = p.parse_args(argv)

    # checks that need nothing but the command line
    if sum([args.report, args.slurm, args.dry_run]) > 1:
        raise UserError("--report, --slurm and --dry-run exclude each other")
    size = tuple(map(int, args.plot_size.split("x"))) if re.fullmatch(r"\d{1,6}x\d{1,6}", args.plot_size) else ()
    if not size or not all(PLOT_SIZES[0] <= n <= PLOT_SIZES[1] for n in size):
        raise UserError(f"--plot-size must be WIDTHxHEIGHT, each between {PLOT_SIZES[0]} and {PLOT_SIZES[1]}, "
                        f"got {args.plot_size!r}")
    args.plot_size = size
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        raise UserError(f"--seeds: seed(s) {', '.join(map(str, twice))} given twice")
    args.variants = parse_variants(args.variants)
    if args.script is not None:
        args.script = find_script(args.script)
    if args.report:
        return args
    if args.script is None:
        raise UserError("--script is required (the experiment to run)")
    if args.seeds is None:
        args.seeds = [1, 2, 3]
    if args.variants is None:
        args.variants = {"default": []}
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    args.cores = cap_cores("--cores", args.cores)
    if args.slurm and args.devices is not None:
        raise UserError("--devices is for local runs; with --slurm the scheduler assigns --slurm-gpus GPUs per array task")
    if args.slurm_gpus < 0 or args.slurm_cpus < 1 or args.slurm_max_parallel < 0:
        raise UserError("--slurm-gpus and --slurm-max-parallel must be >= 0, --slurm-cpus >= 1")
    args.devices = parse_devices(args.devices or ["cpu"])
    for name, flags in [("flags after --", args.run_flags)] + [(f"variant {v!r}", f) for v, f in args.variants.items()]:
        check_flags(name, flags, RUNNER_FLAGS, "is set by the runner for every run (use --seeds, --out-dir, variant "
                    "names, --devices; interrupted runs resume by themselves)")
    check_out_dir(args.out_dir)
    if args.slurm:
        sbatch_options(args)  # refused values: before anything is written
    return args


def check_flags(name: str, flags: list[str], banned, why: str) -> None:
    """Refuse any of the `banned` flags (e.g. RUNNER_FLAGS) in `flags`; the values the script resolves are checked
    again after validation, which also catches abbreviations."""
    for flag in banned:
        if any(tok == flag or tok.startswith(flag + "=") for tok in flags):
            raise UserError(f"{name}: {flag} {why}")


def find_script(name: str) -> Path:
    """The script as given (relative to the working directory) or in the repository root."""
    for path in (Path(name), REPO / name):
        if path.is_file() and path.suffix == ".py":
            return path.resolve()
    raise UserError(f"--script {name}: no such Python script (looked in {Path.cwd()} and {REPO})")


def parse_variants(items: list[str] | None) -> dict[str, list[str]] | None:
    """['gan=', 'topk=--topk --mu 64'] -> {'gan': [], 'topk': ['--topk', '--mu', '64']} (a bare NAME: no flags)."""
    if items is None:
        return None
    variants = {}
    for item in items:
        name, _, flags = item.partition("=")
        if not re.fullmatch(NAME_RE, name):
            raise UserError(f"--variants {item!r}: a variant is NAME=FLAGS with NAME made of letters, digits, '.', "
                            "'+', '-' and single '_' (it becomes --exp-name and the run folder's prefix)")
        if name in variants:
            raise UserError(f"--variants: variant {name!r} given twice")
        try:
            variants[name] = shlex.split(flags)
        except ValueError as e:
            raise UserError(f"--variants {item!r}: {e}") from None
    return variants


def parse_devices(devices: list[str]) -> list[str]:
    """['cpu'] or distinct ['cuda:0', 'cuda:1', ...] (existence is checked with the script's torch later)."""
    if devices == ["cpu"]:
        return devices
    for d in devices:
        if not re.fullmatch(r"cuda:\d+", d):
            raise UserError(f"--devices {d!r}: use cpu (alone) or cuda:N (one or more)")
    if len(set(devices)) != len(devices):
        raise UserError(f"--devices: a device given twice in {' '.join(devices)} (two jobs share a GPU with --workers "
                        "> devices)")
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
    expect: dict = field(default_factory=dict)  # values the script must resolve from the flags (a preset's own)

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


# read_json, run_folders and run_state use only json and pathlib: the sbatch script runs them too (STATE_PY)
def read_json(path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable, not UTF-8, not JSON or not an object."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def run_folders(out_dir, variant: str, seed: int, stem: str) -> list:
    """[(run folder, its args.json)] of run (variant, seed) of script `stem` in out_dir, newest first: the folders
    whose args.json records that exp_name, seed (an int) and script. A folder named like one whose args.json cannot
    be read comes as (folder, None). The name is only a first filter: an exp_name may itself contain '__2'."""
    found = []
    for path in sorted(Path(out_dir).glob(f"{variant}__{seed}__*"), reverse=True):  # names sort by start time
        a = read_json(path / "args.json")
        if a is None:
            found.append((path, None))
        elif (a.get("exp_name") == variant and type(a.get("seed")) is int and a["seed"] == seed
              and Path(str(a.get("command", "")).split(" ")[0]).stem == stem):
            found.append((path, a))
    return found


def run_state(out_dir, variant: str, seed: int, stem: str) -> tuple:
    """('finished', run folder) | ('resume', its checkpoints/last.pt) | ('new', None) from the newest run folder
    (run_folders) with a readable summary.json or a last.pt; ('unreadable', folder) for a folder of the run's name
    that holds either but no readable args.json. An unreadable summary.json is an unfinished run."""
    for path, a in run_folders(out_dir, variant, seed, stem):
        summary, last = path / "summary.json", path / "checkpoints" / "last.pt"
        if a is None:
            if summary.exists() or last.exists():
                return "unreadable", path
        elif read_json(summary) is not None:
            return "finished", path
        elif last.is_file():
            return "resume", last
    return "new", None


STATE_PY = "\n".join(["from __future__ import annotations", "import json, sys", "from pathlib import Path", "",
                      *map(inspect.getsource, (read_json, run_folders, run_state)),
                      "state, where = run_state(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])",
                      "print(f\"{state}:{where or ''}\")", ""])


def state_of(args, run: Run) -> tuple:
    """run_state of a run of this sweep; a folder of its name without a readable args.json is an error."""
    state, where = run_state(folder(args, run), run.variant, run.seed, args.script.stem)
    if state == "unreadable":
        raise UserError(f"{where}: args.json missing or unreadable, so it cannot be told whose run it is; move the "
                        "folder away or use another --out-dir")
    return state, where


# ---------------------------------------------------------------------------------------------------------------
# Validation: the script's own parser on every run's flags, in a subprocess (the script is never imported here)
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
    cache = read_json(cache_path) or {}
    answer = cache.get(key)
    if answer is None:
        with tempfile.TemporaryDirectory() as tmp:
            request, answer_path = Path(tmp) / "request.json", Path(tmp) / "answer.json"
            request.write_text(json.dumps({"argvs": argvs, "need_cuda": need_cuda}))
            with os_errors(f"--python {args.python}: cannot run it"):
                proc = subprocess.run([args.python, "-c", VALIDATOR, str(args.script), str(request), str(answer_path)],
                                      capture_output=True, text=True)
            answer = read_json(answer_path)
            if answer is None:
                last = ([l for l in proc.stderr.splitlines() if l.strip()] or [f"exit status {proc.returncode}"])[-1]
                raise UserError(f"could not check the flags with {args.script.name}: {last}")
    if answer["import_error"]:
        raise UserError(f"--script {args.script.name} cannot be used: {answer['import_error']}")
    for d in args.devices if need_cuda else []:
        if int(d.split(":")[1]) >= answer["cuda_count"]:
            raise UserError(f"--devices {d}: no such device ({answer['cuda_count']} CUDA device(s) visible)")
    for run, result in zip(runs, answer["results"]):
        if not result["ok"]:
            reason = re.sub(r"^error:\s*", "", str(result["error"]))  # the script's own one-line error, unprefixed
            raise UserError(f"variant {run.variant!r} (seed {run.seed}): {args.script.name} refuses its flags: {reason}")
    resolved = [r["resolved"] for r in answer["results"]]
    has_threads = "threads" in resolved[0]
    if has_threads and any(tok == "--threads" or tok.startswith("--threads=") for run in runs for tok in run.flags):
        raise UserError("--threads is set by the runner (cores // workers, or --slurm-cpus)")
    for run, got in zip(runs, resolved):  # the runner's flags come last and win, except --resume (absent here)
        for k, v in {"resume": None, **run.expect}.items():
            if k in got and got[k] != v:
                raise UserError(f"variant {run.variant!r} (seed {run.seed}): its flags set --{k.replace('_', '-')} "
                                f"(to {got[k]!r}), which the sweep sets itself ({v!r} for this run): drop it")
    # a finished or interrupted run folder must have been made with the flags this sweep asks for
    for run, want in zip(runs, resolved):
        state, where = state_of(args, run)
        if state == "new":
            continue
        run_dir = where if state == "finished" else where.parent.parent
        have = read_json(run_dir / "args.json")
        diff = sorted(k for k in want.keys() & have.keys() if k not in NOT_CONFIG and want[k] != have[k])
        if diff:
            k = diff[0]
            raise UserError(f"{run_dir} was made with --{k.replace('_', '-')} {have[k]!r}, this sweep asks for "
                            f"{want[k]!r} ({len(diff)} setting(s) differ): use another --out-dir or variant name")
    if key not in cache and not args.dry_run:
        with os_errors(f"--out-dir {args.out_dir}: cannot write {cache_path}"):
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            common.write_json(cache_path, dict(list(cache.items())[-19:] + [(key, answer)]))  # unique temporary file
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


def append(path: Path, text: str) -> None:
    """Append `text` to `path` in a single write (O_APPEND: lines of concurrent writers never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def journal(out_dir: str, record: dict) -> None:
    """One line of <out-dir>/sweep/runs.jsonl; a refused write is a UserError."""
    path = Path(out_dir) / "sweep" / "runs.jsonl"
    with os_errors(f"cannot write {path}"):
        append(path, json.dumps(record) + "\n")


def last_line(path: Path, offset: int) -> str:
    """Last non-empty line written to `path` after byte `offset` (looking at its last 64 KB)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(offset, f.seek(0, os.SEEK_END) - 65536))
            lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    except OSError as e:
        return f"(its log {path} cannot be read: {e.strerror})"
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


INTERRUPTED = {130, 143, -signal.SIGINT, -signal.SIGTERM}  # exit statuses of a run stopped by SIGINT / SIGTERM


def start(args, run: Run, device: str, threads: int | None, tag: str):
    """Take the run's lock, re-check its state under the lock, record the start in runs.jsonl, start the run.
    The Job, or 'busy' (another sweep runs it) or 'finished'. A refused write is a UserError before the run starts."""
    sweep = Path(folder(args, run)) / "sweep"
    with os_errors(f"cannot open the lock of {run.variant} seed {run.seed}"):
        lock_fd = os.open(sweep / "locks" / f"{run.key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{tag} busy  {run.variant} seed {run.seed}: another sweep is running it", flush=True)
            os.close(lock_fd)
            return "busy"
        state, where = state_of(args, run)
        if state == "finished":
            print(f"{tag} skip  {run.variant} seed {run.seed}: finished in {where}", flush=True)
            os.close(lock_fd)
            return "finished"
        kind = "cpu" if device == "cpu" else "cuda"
        cmd = command(args, run, kind, threads, where if state == "resume" else None)
        n_threads = str(max(1, args.cores // args.workers))
        env = dict(os.environ, OMP_NUM_THREADS=n_threads, MKL_NUM_THREADS=n_threads,
                   CUDA_VISIBLE_DEVICES="" if device == "cpu" else cuda_visible(device, os.environ.get("CUDA_VISIBLE_DEVICES")))
        out_path, err_path = sweep / "logs" / f"{run.key}.out", sweep / "logs" / f"{run.key}.err"
        with os_errors(f"cannot write the logs of {run.variant} seed {run.seed}"), \
                open(out_path, "ab") as out, open(err_path, "ab") as err:
            out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {state}: {shlex.join(cmd)}\n".encode())
            out.flush()
            err_offset = err.tell()
            journal(folder(args, run), {"event": "start", "index": run.index, "variant": run.variant, "seed": run.seed,
                                        "state": state, "argv": cmd, "device": device,
                                        "cuda_visible_devices": env["CUDA_VISIBLE_DEVICES"],
                                        "omp_num_threads": n_threads, "time": time.time()})
            with os_errors(f"cannot start {cmd[0]}"):
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, pass_fds=(lock_fd,))
    except BaseException:
        os.close(lock_fd)
        raise
    print(f"{tag} start {run.variant} seed {run.seed} ({state}, {device}, {n_threads} thread(s)): {shlex.join(cmd)}",
          flush=True)
    return Job(run, proc, lock_fd, device, err_path, err_offset, time.time())


def end(args, job: Job) -> dict:
    """Record the end of an ended job in runs.jsonl (status finished, interrupted or failed; last_pt: the checkpoint
    the same command continues from, or None) and release its lock; the record."""
    rc = job.proc.returncode
    try:
        state, where = run_state(folder(args, job.run), job.run.variant, job.run.seed, args.script.stem)
        record = {"event": "end", "index": job.run.index, "variant": job.run.variant, "seed": job.run.seed,
                  "exit": rc, "status": "finished" if rc == 0 else "interrupted" if rc in INTERRUPTED else "failed",
                  "last_pt": str(where) if state == "resume" else None, "pid": job.proc.pid,
                  "seconds": round(time.time() - job.t0, 3), "time": time.time()}
        if rc != 0:
            record["last_stderr"] = last_line(job.err_path, job.err_offset)
        journal(folder(args, job.run), record)
        return record
    finally:
        os.close(job.lock_fd)


def run_local(args, runs: list[Run], has_threads: bool, on_end=None) -> int:
    """Run `runs` in order, args.workers at a time; on_end(run, exit status), if given, after each run that ran.

    SIGINT and SIGTERM only set a flag here, acted on between polls: nothing more starts, a SIGTERM is passed on to
    the runs as SIGINT (once; the terminal's Ctrl-C reaches them by itself), and the runner waits for every run to
    end and records it. Any error of the runner itself stops the running runs the same way before it is reported."""
    sweeps = sorted({Path(folder(args, run)) / "sweep" for run in runs})
    with os_errors(f"--out-dir {args.out_dir}: cannot create the sweep's folders"):
        for sweep in sweeps:
            (sweep / "locks").mkdir(parents=True, exist_ok=True)
            (sweep / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, args.cores // args.workers) if has_threads else None
    queue, running, failed, stopped = list(runs), [], [], []
    counts = {"ran": 0, "skipped": 0, "busy": 0}
    n_variants, n_seeds = len({run.variant for run in runs}), len({run.seed for run in runs})
    print(f"sweep: {len(runs)} runs of {args.script.name} ({n_variants} variants x {n_seeds} seeds), "
          f"{args.workers} at a time on {' '.join(args.devices)}; logs in "
          f"{' '.join(str(sweep / 'logs') for sweep in sweeps)}", flush=True)
    signals, seen = [], 0
    previous = {s: signal.signal(s, lambda signum, frame: signals.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (queue and not signals):
            if len(signals) > seen:
                if not seen:
                    print(f"interrupted: starting no more runs; waiting for the {len(running)} running run(s) to save "
                          "a checkpoint and stop (a second Ctrl-C stops them without saving)", flush=True)
                if signal.SIGTERM in signals[seen:] and signal.SIGTERM not in signals[:seen]:
                    for job in running:
                        job.proc.send_signal(signal.SIGINT)
                seen = len(signals)
            while queue and not signals and len(running) < args.workers:
                run = queue.pop(0)
                load = [sum(job.device == d for job in running) for d in args.devices]
                job = start(args, run, args.devices[load.index(min(load))], threads, f"[{run.index + 1}/{len(runs)}]")
                if isinstance(job, Job):
                    running.append(job)
                else:
                    counts["busy" if job == "busy" else "skipped"] += 1
            time.sleep(0.05)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                record, name = end(args, job), f"{job.run.variant} seed {job.run.seed}"
                tag = f"[{job.run.index + 1}/{len(runs)}]"
                if record["status"] == "finished":
                    counts["ran"] += 1
                    print(f"{tag} done  {name}: ok, {record['seconds']:.1f} s", flush=True)
                elif record["status"] == "interrupted" and signals:
                    stopped.append(record)
                    print(f"{tag} stopped {name}: {record['last_stderr']}", flush=True)
                else:
                    status = f"exit {record['exit']}" if record["exit"] > 0 else f"killed by signal {-record['exit']}"
                    failed.append(f"{name}: {status}: {record['last_stderr']}")
                    print(f"{tag} FAILED {failed[-1]} (log {job.err_path})", file=sys.stderr, flush=True)
                if on_end is not None:
                    on_end(job.run, record["exit"])
    except BaseException:  # a refused write or a bug: the running runs save and stop first, then it is reported
        if running:
            print(f"stopping the {len(running)} running run(s) (SIGINT: each saves a checkpoint)", flush=True)
        for job in running:
            job.proc.send_signal(signal.SIGINT)
        for job in running:
            job.proc.wait()
            try:
                end(args, job)
            except (UserError, OSError):
                pass
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signals:
        saved = [f"{r['variant']} seed {r['seed']}" for r in stopped if r["last_pt"]]
        lost = [f"{r['variant']} seed {r['seed']}" for r in stopped if not r["last_pt"]]
        parts = [f"{len(stopped)} run(s) stopped"]
        parts += [f"the same command continues {', '.join(saved)} from checkpoints/last.pt"] if saved else []
        parts += [f"{', '.join(lost)} had no checkpoint and will start again from scratch"] if lost else []
        parts += [f"{len(failed)} failed"] if failed else []
        parts += [f"{len(queue)} not started"] if queue else []
        print("interrupted: " + "; ".join(parts), file=sys.stderr, flush=True)
        return 130
    print(f"sweep: {counts['ran']} ran, {counts['skipped']} skipped, {len(failed)} failed"
          + (f", {counts['busy']} busy in another sweep (exit status {EXIT_BUSY})" if counts["busy"] else ""), flush=True)
    if failed:
        print("failed runs:\n  " + "\n  ".join(failed), file=sys.stderr, flush=True)
        return 1
    return EXIT_BUSY if counts["busy"] else 0


def dry_run(args, runs: list[Run], has_threads: bool) -> int:
    threads = max(1, args.cores // args.workers) if has_threads else None
    kind = "cpu" if args.devices == ["cpu"] else "cuda"
    for run in runs:
        state, where = state_of(args, run)
        if state == "finished":
            print(f"# {run.variant} seed {run.seed}: finished in {where}")
        else:
            print(shlex.join(command(args, run, kind, threads, where if state == "resume" else None)))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------------------------
def sbatch_options(args) -> list[str]:
    """The #SBATCH options that come from flags, each value shell-quoted (sbatch reads quotes and backslashes like a
    shell), refused when it holds a control character or a backslash: sbatch could not read it back, and a newline
    would end the comment line and run the rest as a command."""
    def value(flag, text):
        text = str(text)
        if re.search(r"[\x00-\x1f\x7f\\]", text):
            raise UserError(f"{flag} {text!r}: an #SBATCH value cannot hold a control character (newline, tab) or a "
                            "backslash")
        return shlex.quote(text)

    logs = Path(os.path.abspath(args.out_dir)) / "sweep" / "logs"
    options = [f"--time={value('--slurm-time', args.slurm_time)}", f"--cpus-per-task={args.slurm_cpus}",
               f"--mem={value('--slurm-mem', args.slurm_mem)}"]
    options += [f"--gres=gpu:{args.slurm_gpus}"] if args.slurm_gpus else []
    options += [f"--partition={value('--slurm-partition', args.slurm_partition)}"] if args.slurm_partition else []
    options += [f"--account={value('--slurm-account', args.slurm_account)}"] if args.slurm_account else []
    return options + ["--requeue", "--open-mode=append", f"--output={value('--out-dir', logs / 'slurm_%A_%a.out')}",
                      f"--error={value('--out-dir', logs / 'slurm_%A_%a.err')}"]


def comment(text: str) -> str:
    """`text` for a `#` comment line: control characters written as \\xNN (a newline would end the comment)."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def write_slurm(args, runs: list[Run], has_threads: bool) -> int:
    sweep = Path(args.out_abs) / "sweep"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", args.slurm_job_name or f"{args.script.stem}-sweep")
    kind = "cuda" if args.slurm_gpus > 0 else "cpu"
    threads = args.slurm_cpus if has_threads else None
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"# Written by sweeps/run.py: {comment(shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]))}",
             f"# {len(runs)} runs of {comment(args.script.name)}; array index -> run:"]
    lines += [f"#   {r.index}: {r.variant} seed {r.seed}" for r in runs]
    lines += ["# A finished run (summary.json) is skipped; an interrupted one (checkpoints/last.pt) continues with",
              "# --resume, also after a requeue. SWEEP_DRY_RUN=1 SLURM_ARRAY_TASK_ID=i bash <this file> prints the",
              "# command of index i (NUL-separated) instead of running it.",
              f"#SBATCH --job-name={name}",
              f"#SBATCH --array=0-{len(runs) - 1}" + (f"%{args.slurm_max_parallel}" if args.slurm_max_parallel else "")]
    lines += [f"#SBATCH {option}" for option in sbatch_options(args)]
    lines += ["set -euo pipefail", f"cd {q(os.getcwd())}"]
    lines += [f"eval {q(args.slurm_setup)}"] if args.slurm_setup else []
    lines += [f"export OMP_NUM_THREADS={args.slurm_cpus} MKL_NUM_THREADS={args.slurm_cpus}"]
    lines += [] if args.slurm_gpus else ['export CUDA_VISIBLE_DEVICES=""']
    lines += [f"OUT_DIR={q(args.out_abs)}", f"STEM={q(args.script.stem)}",
              "# which run folder is this run's and its state: sweeps/run.py's own run_state",
              f"STATE_PY={q(STATE_PY)}",
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
              "# the newest run folder of this run: finished -> nothing to do; interrupted -> continue it",
              'STATE=$("${CMD[0]}" -c "$STATE_PY" "$OUT_DIR" "$NAME" "$SEED" "$STEM")',
              'case "$STATE" in',
              '  finished:*) echo "finished: ${STATE#finished:}"; exit 0 ;;',
              '  resume:*) CMD+=(--resume "${STATE#resume:}") ;;',
              '  unreadable:*) echo "error: ${STATE#unreadable:}: args.json missing or unreadable" >&2; exit 2 ;;',
              "esac",
              'if [ -n "${SWEEP_DRY_RUN:-}" ]; then printf \'%s\\0\' "${CMD[@]}"; exit 0; fi',
              'echo "run: ${CMD[*]}"',
              'exec "${CMD[@]}"', ""]
    path = sweep / f"{name}.sbatch"
    with os_errors(f"--out-dir {args.out_dir}: cannot write {path}"):
        (sweep / "logs").mkdir(parents=True, exist_ok=True)
        (sweep / "locks").mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))
    print(f"wrote {path} ({len(runs)} array tasks)\nsbatch {q(str(path))}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Report: tables and plots from the run folders alone
# ---------------------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, one a line; other lines (torn by a crash, not UTF-8, not an object) are
    left out, and so is a file that cannot be read."""
    try:
        text = Path(path).read_bytes().decode(errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


NUMBER_MAX = 1e150  # larger magnitudes are no metric's values; their squares would overflow the statistics


def number(obj, dotted: str) -> float | None:
    """obj['a']['b'] for 'a.b' when it is a finite number below NUMBER_MAX in magnitude, else None."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    if isinstance(obj, bool) or not isinstance(obj, (int, float)) or not abs(obj) < NUMBER_MAX:
        return None
    return float(obj)


def stats(values: list[float]) -> dict:
    return {"values": values, "n": len(values), "mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def fmt(value: float | None, decimals: int | None) -> str:
    if value is None:
        return "–"
    return f"{value:.{decimals}f}" if decimals is not None and abs(value) < 1e6 else f"{value:.4g}"


def fmt_stats(s: dict, decimals: int | None) -> str:
    if s["n"] == 0:
        return "–"
    if s["n"] == 1:
        return fmt(s["mean"], decimals)
    return f"{fmt(s['mean'], decimals)} ± {fmt(s['std'], decimals)}"


@dataclass
class RunFolder:
    path: Path
    args: dict
    summary: dict | None  # None: unfinished (no summary.json, or one that cannot be read)


def run_folder(path: Path) -> RunFolder | str:
    """The run folder at `path` with its args.json and summary.json, or why it cannot be used."""
    a = read_json(path / "args.json")
    if a is None:
        return "args.json unreadable"
    if not isinstance(a.get("exp_name"), str) or type(a.get("seed")) is not int or not isinstance(a.get("command"), str):
        return "args.json lacks exp_name, an integer seed or the command"
    return RunFolder(path, a, read_json(path / "summary.json"))


def collect(out_dir: Path, script: Path | None) -> tuple[str, dict, list[str]]:
    """(script stem, {variant: {seed: RunFolder}}, notes) of the finished runs; newest folder per (variant, seed).
    Folders whose args.json cannot be used are skipped and listed in the notes."""
    finished, unfinished, unreadable, stems = {}, [], [], set()
    with os_errors(f"--report: cannot read {out_dir}"):
        folders = sorted(p for p in out_dir.iterdir() if (p / "args.json").exists())
    for path in folders:
        run = run_folder(path)
        if isinstance(run, str):
            unreadable.append(f"{path.name} ({run})")
            continue
        stem = Path(run.args["command"].split(" ")[0]).stem
        if script is not None and stem != script.stem:
            continue
        if run.summary is not None:
            stems.add(stem)
            finished.setdefault(run.args["exp_name"], {}).setdefault(run.args["seed"], []).append(run)
        else:
            steps = [r["step"] for r in read_jsonl(path / "metrics.jsonl") if number(r, "step") is not None]
            why = ", summary.json unreadable" if (path / "summary.json").exists() else ""
            unfinished.append(f"{path.name} (last logged step {steps[-1] if steps else '–'}{why})")
    notes = [f"run folders skipped, args.json unusable: {', '.join(unreadable)}"] if unreadable else []
    if not stems:
        raise UserError(f"--report: no finished run folders (args.json + summary.json) in {out_dir}"
                        + (f"; {notes[0]}" if notes else ""))
    if len(stems) > 1:
        raise UserError(f"--report: {out_dir} holds runs of several scripts ({', '.join(sorted(stems))}): add --script")
    notes += [f"{v} seed {s}: {len(f)} finished run folders, the newest ({f[-1].path.name}) is used"
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
    tick_text = lambda t, dec: fmt(0.0 if abs(t) < 1e-12 else t, dec)  # noqa: E731  (no "-0.0")
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
        raise UserError(f"--report: no folder {out_dir}")
    stem, runs, notes = collect(out_dir, args.script)
    pick_seeds = lambda by_seed: sorted(s for s in by_seed if args.seeds is None or s in args.seeds)  # noqa: E731
    variants = [v for v in (args.variants or sorted(runs)) if v in runs and pick_seeds(runs[v])]
    notes += [f"variant {v}: no finished runs of the seeds asked for" for v in (args.variants or []) if v not in variants]
    if not variants:
        raise UserError(f"--report: no finished runs of the variants and seeds asked for in {out_dir}")
    if args.metrics:
        metrics_spec = [(k, k, 1, None) for k in args.metrics]
    elif stem in HEADLINES:
        metrics_spec = HEADLINES[stem]
    else:  # another script: every numeric top-level entry of its summaries
        keys = sorted({k for v in variants for run in runs[v].values()
                       for k, val in run.summary.items() if number({k: val}, k) is not None})
        metrics_spec = [(k, k, 1, None) for k in keys]
    if args.curves:
        curves_spec = [(re.sub(r"[^A-Za-z0-9_.-]", "_", k), k, k, args.curve_x, args.curve_x, 1) for k in args.curves]
    else:
        curves_spec = CURVES.get(stem, [])

    result = {"script": stem, "out_dir": str(out_dir.resolve()), "variants": {}, "curves": {}, "notes": notes}
    for v in variants:
        seeds = pick_seeds(runs[v])
        summaries = {s: runs[v][s].summary for s in seeds}
        entry = {"seeds": seeds, "runs": {str(s): str(runs[v][s].path) for s in seeds}, "metrics": {}}
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
        first = runs[v][e["seeds"][0]].args
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
            c = curve([runs[v][s].path for s in pick_seeds(runs[v])], y_key, x_key, scale)
            if c["x"]:
                data[v] = c
                series.append((f"{v} (n={max(c['n'])})", COLORS[i % len(COLORS)], c))
        if not series:
            notes.append(f"no {y_key} in any metrics.jsonl: no {file_stem}.png")
            continue
        png = out_dir / f"{file_stem}.png"
        with os_errors(f"--report: cannot write {png}"):
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
    with os_errors(f"--report: cannot write into {out_dir}"):
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
    """Run jobs = [(out_dir, exp_name, seed, flags[, expect])] of `script` in the given order with the local mode of
    this runner: the same validation (the script's parser on every run's flags; `expect`, a dict such as
    {"num_labels": 100}, holds values the script must resolve from them, so flags passed through cannot override
    what names the run; a run folder made with other flags is an error), locks, skip/resume from the run folders,
    `workers` at a time on `devices` with cores // workers threads, logs and runs.jsonl, and the same exit statuses
    (0, 1 when a run failed, 3 when one was busy, 130 when interrupted; a user mistake raises UserError: run the
    caller under common.run_cli). Run i is `python <script> <flags> --seed S --out-dir <its out_dir> --exp-name
    <exp_name> --device cpu|cuda [--threads T] [--resume last.pt]`; its sweep files are in <its out_dir>/sweep/, the
    flag check's cache in <out_dir>/sweep/. print_only: print the commands (--dry-run) instead. on_end(run, exit
    status) is called after each run that ran."""
    if workers < 1:
        raise UserError(f"--jobs / --workers must be at least 1, got {workers}")
    args = argparse.Namespace(script=find_script(str(script)), python=python or sys.executable, out_dir=str(out_dir),
                              out_abs=os.path.abspath(out_dir), workers=workers,
                              cores=cap_cores("--cores", cores or available_cores()), devices=parse_devices(list(devices)),
                              slurm=False, dry_run=print_only)
    runs, seen = [], set()
    for job_dir, name, seed, flags, *expect in jobs:
        run = Run(len(runs), name, int(seed), [str(tok) for tok in flags], os.path.abspath(job_dir),
                  dict(*expect[:1]))
        if not re.fullmatch(NAME_RE, name):
            raise UserError(f"run name {name!r}: use letters, digits, '.', '+', '-' and single '_' (it is the run "
                            "folder's prefix)")
        if (run.out_dir, run.key) in seen:
            raise UserError(f"run {name} seed {seed} in {run.out_dir} is planned twice")
        seen.add((run.out_dir, run.key))
        check_flags(f"run {name} seed {seed}", run.flags, RUNNER_FLAGS, "is set by the runner for every run")
        check_out_dir(run.out_dir)
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
    common.run_cli(lambda: sys.exit(main()))
