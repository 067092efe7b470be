"""The GPU check: two commands, each sized to a short slot on one CUDA GPU (about 5.5 minutes on an H100/H200),
that validate and measure the project and leave their results in a folder as they go.

    python benchmarks/gpu_report.py --out gpu_check              # command one: CUDA tier + measurements
    python benchmarks/gpu_report.py --part 2 --out gpu_check     # command two (optional): further timings and checks
    python benchmarks/gpu_report.py --table --out gpu_check      # the table of whatever gpu_check/results.jsonl holds

Nothing is downloaded and nothing is installed: every run uses `--dataset fake`, and the FID timings use a randomly
initialised Inception network (the same computation as pytorch-fid's weights, so the time is right; the FID values
mean nothing). On a machine without a CUDA GPU both commands print one line saying so and exit 0, running nothing.

Every phase is a child process in its own process group with its own time limit (SIGINT at the limit, then SIGTERM,
then SIGKILL of the whole group), and the commands as a whole stay inside --budget seconds (default 330): a phase
starts only with a limit cut to the time left, or is recorded as skipped. Children's output is relayed line by line
as it comes (PYTHONUNBUFFERED=1), prefixed with the phase's name. Into --out DIR, as each phase ends:

    results.jsonl  one JSON object per line: env (device, versions), plan (the phases with their limits), one line per
                   phase (status ok / failed / timeout / skipped / interrupted / error, wall_s, timeout_s, command,
                   `measured`: the figures), one line per CUDA-tier test as pytest reports it, and end
    tier.xml       the CUDA tier's junit XML (pytest --junitxml; also written when the tier is stopped at its limit)
    log.txt        everything printed, the children's lines included
    table.md       the table printed at the end (rebuilt from results.jsonl, also after a cut: --table)

A run cut at any moment (the slot ends, Ctrl-C, SIGTERM) keeps every line written before the cut; on SIGINT/SIGTERM
the running phases are stopped, recorded as interrupted, and the table is written. Scratch run folders (checkpoints,
the random Inception weights, profiler traces) go to a temporary folder that is removed at the end (--keep-work
keeps it, --work chooses it).

Command one, in order:
  tier           `python -m pytest -m cuda tests/test_cuda.py tests/test_cuda_readiness.py -v --junitxml ...`, with
                 `-n 4` (pytest-xdist) and `--timeout=120` (pytest-timeout) when they are importable, compiled tests
                 first; in the background, while
  flags          `dcgan_cifar_topk.py --help` says whether `--cuda-graph` exists (and which needed flags are missing),
  warmup         and a 20-step run of the DCGAN fast path fills Inductor's cache, so the measurement below is warm;
  then one process on the GPU at a time:
  dcgan_default  the seed's command `dcgan_cifar_topk.py --topk --mu 64 --gamma 0.99` (fake CIFAR, 50,000 images):
                 images/s of the metrics.jsonl log windows after the first 100 steps, all inside one run (no
                 difference of two runs, so compilation and the caches never leak into the figure); kernels and
                 kernel launches per step from torch.profiler over one 50-step window at the end of the run
  dcgan_fast     the same plus `--amp bf16 --compile` (and `--cuda-graph` when listed), with the replay time of the
                 captured step (CUDA events around torch.cuda.CUDAGraph.replay) when graphs are replayed
  dcgan_reference benchmarks/bench_dcgan.py's reference loop (pytorch/examples: DataLoader, fp32, eager)
  mog            mog_topk.py --topk iterations/s (windows after the first 500 iterations)
  cifar_fm       improved_gan_cifar.py (feature-matching model, fp32) seconds per epoch of 500 steps
  fid10k         the FID pass over 10,000 generated images as the scripts run it (x5: the FID-50k estimate)
  Peak GPU memory: each measurement's (summary.json, else torch.cuda.max_memory_allocated in the process).
Command two: MNIST (default and --minibatch-disc) and CIFAR minibatch-disc seconds per epoch, FID-50k, a
`--torch-deterministic` bit-identity check (two DCGAN runs, same seed: last.pt compared tensor by tensor) and a
resume-equals-uninterrupted check on CUDA for DCGAN and MoG (N steps against N/2 + --resume to N, deterministic).

The training measurements run the scripts unchanged through `--worker probe`, which executes the script as
__main__ in its own process and wraps common's metrics-log call (Run.log / MetricsLogger.log): it records the step
and time of every log record, and opens the profiler and CUDA-graph replay windows at given steps. A figure the
scripts do not log (a missing field) is a failed measurement with its reason, never a crash of the check.

Exit status: 0 when every phase ended ok (or no GPU is present), 1 when one did not, 2 for a usage error, 130 when
cut by SIGINT/SIGTERM. The module is also the tier's pytest plugin (`-p gpu_report`, which puts compiled tests
first) and holds the measurement workers (`--worker probe|reference|fid`, run by the phases). Stand-in phases for
tests: `--fake-phases FILE`, a JSON list of {"name", "cmd", "timeout", "background", "barrier", "grace"} run in the
repository without a GPU.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
PY = sys.executable

SEED_IMAGES_PER_S = 500 * 49_920 / (90 * 60)  # the seed experiment: 500 epochs of 390 x 128 images in 1 h 30
EPOCH_IMAGES, EPOCHS = 50_000, 500
TARGET_DEFAULT, TARGET_FAST, STRETCH_FAST = 4_600, 46_000, 120_000
DEFAULT_COMMAND = ["--topk", "--mu", "64", "--gamma", "0.99"]
FAST_FLAGS = ["--amp", "bf16", "--compile"]
DCGAN_FLAGS_USED = ["--dataset", "--fake-size", "--max-steps", "--no-fid", "--eval-every", "--save-every",
                    "--log-every", "--device", "--out-dir", "--amp", "--compile", "--seed", "--torch-deterministic",
                    "--resume"]
BUDGET_S = 330.0  # 5.5 minutes
RESERVE_S = 4.0   # kept for the table at the end
MIN_START_S = 8.0  # a phase with less time left is skipped
# the classes whose .log(record) appends to metrics.jsonl (whichever exist are hooked); GPU_REPORT_LOG_HOOKS, a
# comma-separated list of module.Class, replaces the list (tests use a stand-in logger)
LOG_CLASSES = ("common.Run", "common.MetricsLogger")
LOG_HOOKS_ENV = "GPU_REPORT_LOG_HOOKS"
RESULT_ENV = "GPU_REPORT_RESULT"  # children may write one JSON object there; it becomes the phase's raw result
STATUS_OK = "ok"


# ================================================================================================================
# Results file, table
# ================================================================================================================
def append_jsonl(path: Path, record: dict, lock: threading.Lock | None = None) -> None:
    """Append one JSON line with a single write to an O_APPEND descriptor, then fsync: a cut never leaves a torn
    line except in the middle of that one system call."""
    data = (json.dumps(record, default=str, allow_nan=True) + "\n").encode()
    if lock is not None:
        lock.acquire()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if lock is not None:
            lock.release()


def read_results(path: Path) -> list[dict]:
    """The JSON objects of results.jsonl; lines that do not parse (a line torn by a kill) are skipped."""
    records = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return records
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _g(m: dict, key: str, spec: str = ",.0f", unit: str = "") -> str | None:
    v = m.get(key)
    return f"{v:{spec}}{unit}" if _num(v) else None


def _join(*parts) -> str:
    return " · ".join(p for p in parts if p)


def _peak(m: dict) -> str | None:
    v = m.get("peak_memory_gb")
    return f"peak {v:.2f} GiB" if _num(v) else None


def _kernels(m: dict) -> str | None:
    parts = []
    if _num(m.get("kernels_per_step")):
        parts.append(f"{m['kernels_per_step']:.0f} kernels/step")
    if _num(m.get("launches_per_step")):
        parts.append(f"{m['launches_per_step']:.0f} launch calls/step")
    if _num(m.get("graph_launches_per_step")) and m["graph_launches_per_step"] > 0:
        parts.append(f"{m['graph_launches_per_step']:.1f} graph launches/step")
    return ", ".join(parts) or None


def _fmt_dcgan(m: dict) -> str:
    ips = m.get("images_per_s")
    if not _num(ips):
        return m.get("error", "no figure")
    replay = None
    if _num(m.get("replay_gpu_ms")):
        replay = (f"replay {m['replay_gpu_ms']:.3f} ms GPU / {m.get('replay_host_ms', float('nan')):.3f} ms host, "
                  f"{m.get('replays_per_step', float('nan')):.2f} replays/step")
    return _join(f"{ips:,.0f} images/s", f"500 epochs {fmt_hms(EPOCHS * EPOCH_IMAGES / ips)}",
                 f"{ips / SEED_IMAGES_PER_S:.1f}x the seed's 3080 Ti", _kernels(m), replay, _peak(m),
                 m.get("note"))


def _fmt_epoch(m: dict) -> str:
    if not _num(m.get("s_per_epoch")):
        return m.get("error", "no figure")
    return _join(f"{m['s_per_epoch']:.1f} s/epoch ({m['steps_per_epoch']} steps)",
                 _g(m, "s_per_step", ".2e", " s/step"), _peak(m))


def _fmt_mog(m: dict) -> str:
    if not _num(m.get("it_per_s")):
        return m.get("error", "no figure")
    return _join(f"{m['it_per_s']:,.0f} it/s", _kernels(m), _peak(m))


def _fmt_fid(m: dict) -> str:
    if not _num(m.get("wall_s")):
        return m.get("error", "no figure")
    est = f"x{50_000 / m['samples']:g} = FID-50k estimate {m['estimate_50k_s']:.1f} s" \
        if m.get("samples") != 50_000 and _num(m.get("estimate_50k_s")) else None
    return _join(f"{m['wall_s']:.1f} s for {m['samples']:,} images ({m.get('images_per_s', 0):,.0f} images/s)", est,
                 _g(m, "frechet_s", ".2f", " s Fréchet alone"), "random Inception weights: timing only", _peak(m))


def _fmt_tier(m: dict) -> str:
    if not m:
        return "no result"
    counts = [f"{m[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if isinstance(m.get(k), int)]
    text = ", ".join(counts) or m.get("summary", "no count")
    if m.get("failed_tests"):
        text += " | failed: " + ", ".join(m["failed_tests"][:8]) + (" ..." if len(m["failed_tests"]) > 8 else "")
    if m.get("source"):
        text += f" ({m['source']})"
    return text


def _fmt_compare(m: dict) -> str:
    if "weights_identical" not in m:
        return m.get("error", "no result")
    verdict = "bit-identical weights" if m["weights_identical"] else "weights DIFFER"
    extra = [f"{m.get('weights_compared', 0)} weight tensors"]
    if "optimizer_identical" in m:
        extra.append("optimizer state " + ("identical" if m["optimizer_identical"] else "differs"))
    if "all_identical" in m:
        extra.append("every tensor identical" if m["all_identical"] else
                     f"{m.get('tensors_differing', '?')} tensors differ")
    if m.get("differing"):
        extra.append("first: " + ", ".join(m["differing"][:3]))
    return _join(verdict, ", ".join(extra))


def _fmt_flags(m: dict) -> str:
    return _join("--cuda-graph listed" if m.get("cuda_graph") else "no --cuda-graph",
                 ("missing: " + " ".join(m["missing"])) if m.get("missing") else None)


def _fmt_generic(m: dict) -> str:
    if not m:
        return ""
    return ", ".join(f"{k}={v:.4g}" if _num(v) and isinstance(v, float) else f"{k}={v}"
                     for k, v in m.items() if not isinstance(v, (dict, list)))[:300]


FORMATTERS = {"tier": _fmt_tier, "flags": _fmt_flags, "dcgan_default": _fmt_dcgan, "dcgan_fast": _fmt_dcgan,
              "dcgan_reference": _fmt_dcgan, "mog": _fmt_mog, "cifar_fm": _fmt_epoch, "cifar_mbd": _fmt_epoch,
              "mnist": _fmt_epoch, "mnist_mbd": _fmt_epoch, "fid10k": _fmt_fid, "fid50k": _fmt_fid,
              "determinism": _fmt_compare, "resume": _fmt_compare, "mog_resume": _fmt_compare}
META = {"env", "plan", "end", "tier_test"}


def latest_runs(records: list[dict]) -> list[str]:
    """Run ids of the newest run of each part, in the order they first appear."""
    newest: dict = {}
    for r in records:
        if r.get("phase") == "plan" and "run" in r:
            newest[r.get("part")] = r["run"]
    if not newest:  # a file without plan lines: every run id there
        return list(dict.fromkeys(r["run"] for r in records if "run" in r)) or [None]
    return [run for run in dict.fromkeys(r.get("run") for r in records) if run in newest.values()]


def build_table(records: list[dict]) -> str:
    """The markdown table of the newest run of each part in `records` (a partial file gives a partial table:
    phases planned but without a result line read 'not reached')."""
    lines = []
    runs = latest_runs(records)
    env = next((r for r in reversed(records) if r.get("phase") == "env"), {})
    dev = env.get("device_name") or ("stand-in phases" if env.get("fake_phases") else "unknown device")
    lines.append(f"## GPU check: {dev}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}")
    lines.append("")
    lines.append("| phase | status | result | s (limit) |")
    lines.append("|---|---|---|---|")
    targets = []
    for run in runs:
        recs = [r for r in records if r.get("run") == run]
        plan = next((r for r in recs if r.get("phase") == "plan"), None)
        end = next((r for r in reversed(recs) if r.get("phase") == "end"), None)
        part = plan.get("part") if plan else "?"
        state = (f"{end.get('status')}, {end.get('wall_s', 0) / 60:.1f} min" if end else "cut (no end line)")
        lines.append(f"| **part {part}** | {state} | budget {plan.get('budget_s', '?') if plan else '?'} s, "
                     f"run {run} | |")
        by_phase: dict = {}
        for r in recs:
            if r.get("phase") not in META:
                by_phase[r["phase"]] = r
        names = [p["name"] for p in plan.get("phases", [])] if plan else []
        names += [n for n in by_phase if n not in names]
        tests = [r for r in recs if r.get("phase") == "tier_test"]
        for name in names:
            r = by_phase.get(name)
            label = (r or {}).get("label") or next((p.get("label") for p in (plan or {}).get("phases", [])
                                                    if p["name"] == name), None) or name
            if r is None:
                text = "not reached"
                if name == "tier" and tests:
                    c = collections.Counter(t.get("outcome") for t in tests)
                    text += " (so far: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())) + ")"
                lines.append(f"| {label} | not reached | {text} | |")
                continue
            m = r.get("measured") or {}
            fmt = FORMATTERS.get(name, _fmt_generic)
            try:
                text = fmt(m)
            except Exception as e:  # a malformed measured dict is a table cell, not a crash
                text = f"(unreadable figures: {type(e).__name__})"
            if r.get("status") != STATUS_OK and r.get("reason"):
                text = _join(text, r["reason"])
            limit = f" ({r['timeout_s']:g})" if _num(r.get("timeout_s")) else ""
            wall = f"{r['wall_s']:.0f}{limit}" if _num(r.get("wall_s")) else ""
            lines.append(f"| {label} | {r.get('status', '?')} | {text.replace('|', '/')} | {wall} |")
            ips = m.get("images_per_s")
            if name == "dcgan_default" and _num(ips):
                targets.append((f"target: default command >= {TARGET_DEFAULT:,} images/s", ips >= TARGET_DEFAULT,
                                f"{ips:,.0f}"))
            if name == "dcgan_fast" and _num(ips):
                targets.append((f"target: fast path >= {TARGET_FAST:,} images/s (500 epochs <= 9 min)",
                                ips >= TARGET_FAST, f"{ips:,.0f}"))
                targets.append((f"stretch: fast path >= {STRETCH_FAST:,} images/s (500 epochs ~ 3 min)",
                                ips >= STRETCH_FAST, f"{ips:,.0f}"))
    peaks = [(r.get("measured", {}).get("peak_memory_gb"), r.get("label", r["phase"])) for r in records
             if r.get("run") in runs and isinstance(r.get("measured"), dict)
             and _num(r["measured"].get("peak_memory_gb"))]
    if peaks:
        gb, where = max(peaks)
        lines.append(f"| peak GPU memory (largest) | | {gb:.2f} GiB ({where}) | |")
    for label, ok, value in targets:
        lines.append(f"| {label} | {'met' if ok else 'NOT met'} | {value} | |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, records: list[dict]) -> str:
    table = build_table(records)
    _replace_text(out / "table.md", table)
    return table


def _replace_text(path: str | Path, text: str) -> None:
    """Write `path` through a temporary file of a unique name beside it and a rename: a reader (or a cut) sees the
    old or the new content, never a part, and two writers never share a temporary file."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ================================================================================================================
# Phase runner
# ================================================================================================================
@dataclass
class Phase:
    """One step of the check. Either `cmd` (argv, or a callable returning it when the phase starts) run as a child
    process under `timeout` seconds, or `func` (quick in-process work returning the measured dict)."""
    name: str
    label: str = ""
    cmd: list | Callable | None = None
    func: Callable | None = None
    timeout: float = 60.0
    expect_s: float = 0.0            # the planned duration (an estimate), shown in the plan
    background: bool = False         # run alongside the following phases
    barrier: bool = False            # wait for every background phase before starting
    quiet: bool = False              # children's lines into log.txt only
    grace: float = 5.0               # seconds between SIGINT and SIGTERM at the limit
    parse: Callable | None = None    # parse(raw_result, lines, record) -> measured dict
    on_line: Callable | None = None  # called with each output line, in the reader thread
    env: dict = field(default_factory=dict)

    def __post_init__(self):
        self.label = self.label or self.name


class Cut(Exception):
    """SIGTERM / SIGHUP on the check itself."""


def _raise_cut(signum, frame):
    raise Cut(signal.Signals(signum).name)


class Runner:
    """Runs phases, relays their output line by line, and appends each one's result as it ends."""

    def __init__(self, out: Path, work: Path, part, run_id: str, budget: float, echo=print):
        self.out, self.work, self.part, self.run_id = out, work, part, run_id
        self.results = out / "results.jsonl"
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self.lock = threading.Lock()
        self.echo = echo
        self.log = open(out / "log.txt", "a", encoding="utf-8", errors="replace")
        self.active: dict[str, subprocess.Popen] = {}
        self.background: list[threading.Thread] = []
        self.threads: list[threading.Thread] = []
        # set when a phase's thread has written its record: a KeyboardInterrupt that lands in Thread.join can leave
        # the joined thread looking finished (is_alive False) on Python <= 3.12, so a cut waits on these instead
        self.done: list[threading.Event] = []
        self.stopping = False
        self.statuses: dict[str, str] = {}

    # -- output --------------------------------------------------------------------------------------------------
    def say(self, text: str, quiet: bool = False) -> None:
        with self.lock:
            if not quiet:
                try:
                    self.echo(text)
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass
            try:
                self.log.write(text + "\n")
                self.log.flush()
            except (OSError, ValueError):
                pass

    def append(self, record: dict) -> None:
        record = {"part": self.part, "run": self.run_id, **record}
        append_jsonl(self.results, record, self.lock)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- running -------------------------------------------------------------------------------------------------
    def run_all(self, phases: list[Phase]) -> None:
        for phase in phases:
            if phase.barrier:
                self.join_background()
            if self.stopping:
                return
            done = threading.Event()
            t = threading.Thread(target=self._run_guarded, args=(phase, done), name=f"phase-{phase.name}",
                                 daemon=True)
            self.threads.append(t)
            self.done.append(done)
            t.start()
            if phase.background:
                self.background.append(t)
            else:
                while t.is_alive():
                    t.join(0.2)
        self.join_background()

    def join_background(self) -> None:
        for t in self.background:
            while t.is_alive():
                t.join(0.2)
        self.background = []

    def _run_guarded(self, phase: Phase, done: threading.Event) -> None:
        try:
            self._run(phase)
        except Exception as e:  # a bug in a phase's plumbing is that phase's error, never the whole check's
            self.append({"phase": phase.name, "label": phase.label, "status": "error",
                         "reason": f"{type(e).__name__}: {e}"[:500]})
            self.statuses[phase.name] = "error"
            self.say(f"== {phase.name}: error: {type(e).__name__}: {e}")
        finally:
            done.set()

    def _run(self, phase: Phase) -> None:
        rec: dict = {"phase": phase.name, "label": phase.label,
                     "started_s": round(self.elapsed(), 2)}
        left = self.deadline - time.monotonic() - RESERVE_S
        if self.stopping:
            return
        if left < MIN_START_S:
            rec.update(status="skipped", reason=f"budget: {max(left, 0):.0f} s left")
            self.statuses[phase.name] = "skipped"
            self.append(rec)
            self.say(f"== {phase.name}: skipped ({rec['reason']})")
            return
        timeout = min(phase.timeout, left)
        rec["timeout_s"] = round(timeout, 1)
        work = self.work / phase.name
        work.mkdir(parents=True, exist_ok=True)
        result_path = work / "result.json"
        t_start = time.monotonic()
        lines: collections.deque = collections.deque(maxlen=3000)
        raw = None
        if phase.func is not None:
            self.say(f"== {phase.name}: {phase.label}")
            try:
                measured = phase.func() or {}
                status = STATUS_OK
            except Exception as e:
                measured, status = {}, "error"
                rec["reason"] = f"{type(e).__name__}: {e}"[:500]
            rec["wall_s"] = round(time.monotonic() - t_start, 2)
        else:
            try:
                cmd = [str(c) for c in (phase.cmd() if callable(phase.cmd) else phase.cmd)]
            except Exception as e:
                rec.update(status="error", reason=f"cannot build the command: {type(e).__name__}: {e}"[:500])
                self.statuses[phase.name] = "error"
                self.append(rec)
                self.say(f"== {phase.name}: error ({rec['reason']})")
                return
            rec["command"] = shlex.join(cmd)
            self.say(f"== {phase.name} (limit {timeout:g} s, at +{self.elapsed():.0f} s): {rec['command']}")
            rc, timed_out = self._child(phase, cmd, timeout, result_path, lines)
            rec["wall_s"] = round(time.monotonic() - t_start, 2)
            rec["rc"] = rc
            if self.stopping:
                status = "interrupted"
            elif timed_out:
                status = "timeout"
                rec["reason"] = f"stopped at its {timeout:.0f} s limit"
            else:
                status = STATUS_OK if rc == 0 else "failed"
                if rc != 0:
                    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
                    rec["reason"] = f"exit {rc}" + (f": {last[:200]}" if last else "")
            if status != STATUS_OK:
                rec["tail"] = list(lines)[-15:]
            try:
                raw = json.loads(result_path.read_text()) if result_path.is_file() else None
            except (OSError, json.JSONDecodeError) as e:
                rec["result_error"] = f"{type(e).__name__}: {e}"[:200]
            measured = raw if isinstance(raw, dict) and phase.parse is None else {}
            if phase.parse is not None:
                try:
                    measured = phase.parse(raw, list(lines), rec) or {}
                except Exception as e:  # a missing or malformed figure is a failed measurement, not a crash
                    measured = {"error": f"cannot read the results: {type(e).__name__}: {e}"[:300]}
        if status == STATUS_OK and isinstance(measured, dict) and measured.get("error"):
            status = "failed"
            rec["reason"] = measured["error"]
        rec["status"] = status
        rec["measured"] = measured
        self.statuses[phase.name] = status
        self.append(rec)
        fmt = FORMATTERS.get(phase.name, _fmt_generic)
        try:
            shown = fmt(measured) if isinstance(measured, dict) else ""
        except Exception:
            shown = ""
        self.say(f"== {phase.name}: {status} in {rec.get('wall_s', 0):.1f} s" + (f": {shown}" if shown else ""))

    def _child(self, phase: Phase, cmd: list[str], timeout: float, result_path: Path,
               lines: collections.deque) -> tuple[int | None, bool]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{RESULT_ENV: str(result_path)})
        for key, value in phase.env.items():
            env[key] = value
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.active[phase.name] = proc

        def relay():
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                lines.append(line)
                self.say(f"[{phase.name}] {line}", quiet=phase.quiet)
                if phase.on_line is not None:
                    try:
                        phase.on_line(line)
                    except Exception:
                        pass

        reader = threading.Thread(target=relay, name=f"{phase.name}-reader", daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(f"== {phase.name}: limit of {timeout:.0f} s reached: stopping its process group")
            stop_group(proc, phase.grace)
        reader.join(5)
        if reader.is_alive() or timed_out:  # descendants still hold the pipe: the group goes
            kill_group(proc.pid, signal.SIGKILL)
            reader.join(3)
        self.active.pop(phase.name, None)
        return proc.returncode, timed_out

    def interrupt(self, reason: str) -> None:
        """The check itself is being cut: stop every running phase (SIGINT, then SIGKILL after 2 s), let the
        phases' threads record them as interrupted."""
        self.stopping = True
        self.say(f"== cut ({reason}): stopping {', '.join(self.active) or 'nothing'}")
        procs = list(self.active.values())
        for p in procs:
            kill_group(p.pid, signal.SIGINT)
        t_end = time.monotonic() + 2.0
        for p in procs:
            try:
                p.wait(max(0.0, t_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            kill_group(p.pid, signal.SIGKILL)
        t_end = time.monotonic() + 6.0
        for done in self.done:
            done.wait(max(0.1, t_end - time.monotonic()))


def kill_group(pgid: int, sig) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT to the group (the scripts stop at a step boundary with a checkpoint; pytest writes its junit XML),
    SIGTERM after `grace` s, SIGKILL after 3 s more."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if not kill_group(proc.pid, sig):
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ================================================================================================================
# Parsing the measurements
# ================================================================================================================
def windows_from_log(log: list[dict]) -> list[dict]:
    """Log windows from the probe's record of MetricsLogger.log calls: each window runs from the end of one call
    (after any evaluation logged at the same step) to the start of the next call with a larger step."""
    wins, prev = [], None
    for e in log:
        step = e.get("step")
        if not _num(step):
            if prev is not None and _num(e.get("t_exit")):
                prev = (prev[0], e["t_exit"])
            continue
        if prev is not None and step > prev[0]:
            dt = e["t_enter"] - prev[1] if _num(e.get("t_enter")) and _num(prev[1]) else None
            wins.append({"s0": prev[0], "s1": step, "steps": step - prev[0], "dt": dt,
                         "fields": dict(e.get("fields") or {})})
        elif wins and prev is not None and step == prev[0] == wins[-1]["s1"]:  # more records at the same step
            wins[-1]["fields"] = {**(e.get("fields") or {}), **wins[-1]["fields"]}
        if prev is None or step >= prev[0]:
            prev = (step, e.get("t_exit"))
    return wins


def windows_from_records(records: list[dict]) -> list[dict]:
    """The same from metrics.jsonl records (no timestamps: the records' own throughput fields only)."""
    log = [{"step": r.get("step"), "fields": {k: v for k, v in r.items() if _num(v)}} for r in records]
    return windows_from_log(log)


def steady_rate(wins: list[dict], warmup: int, stop: int | None, sources: list[tuple[str, str | None, float]],
                drop_last: bool = True) -> dict | None:
    """Steps per second over the warm windows: those starting at or after `warmup` and ending at or before `stop`,
    without the run's last window when `drop_last` (it may hold the final evaluation). `sources` in order of
    preference: ("field", name, per) reads name/per steps/s from each window's record (per = images per step for
    an images/s field, 1 for it/s); ("time", None, 1) uses the probe's timestamps."""
    sel = [w for w in wins if w["s0"] >= warmup and (stop is None or w["s1"] <= stop)]
    if drop_last and sel and wins and sel[-1] is wins[-1]:
        sel = sel[:-1]
    if not sel:
        return None
    steps = sum(w["steps"] for w in sel)
    for kind, name, per in sources:
        if kind == "field":
            vals = [w["fields"].get(name) for w in sel]
            if all(_num(v) and v > 0 for v in vals):
                seconds = sum(w["steps"] * per / v for w, v in zip(sel, vals))
                return {"steps_per_s": steps / seconds, "measured_steps": steps, "windows": len(sel),
                        "method": f"metrics.jsonl {name} of {len(sel)} windows after step {warmup}"}
        elif kind == "time":
            if all(_num(w["dt"]) and w["dt"] > 0 for w in sel):
                seconds = sum(w["dt"] for w in sel)
                return {"steps_per_s": steps / seconds, "measured_steps": steps, "windows": len(sel),
                        "method": f"log-call timestamps of {len(sel)} windows after step {warmup}"}
    return None


def _find_run_dir(folder: Path) -> Path | None:
    runs = [p for p in Path(folder).glob("*") if p.is_dir() and (p / "metrics.jsonl").exists()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_records(path: Path) -> list[dict]:
    return [r for r in read_results(path)]


@dataclass
class TrainingSpec:
    """How to read one training phase: warm-up steps, where the profile/replay windows start, the throughput
    sources in order of preference, and the images per step."""
    batch: int
    warmup: int
    stop: int | None
    sources: list
    out_dir: Path
    kind: str                        # "dcgan", "mog" or "epoch"
    steps_per_epoch: int | None = None


def parse_training(spec: TrainingSpec):
    def parse(raw, lines, rec):
        probe = raw if isinstance(raw, dict) else {}
        m: dict = {}
        run_dir = Path(probe["run_dir"]) if probe.get("run_dir") else _find_run_dir(spec.out_dir)
        wins = windows_from_log(probe.get("log") or [])
        if not wins and run_dir is not None:
            wins = windows_from_records(_read_records(run_dir / "metrics.jsonl"))
        rate = steady_rate(wins, spec.warmup, spec.stop, spec.sources)
        summary = _read_json(run_dir / "summary.json") if run_dir is not None else None
        peak = (summary or {}).get("peak_memory_gb") if isinstance(summary, dict) else None
        m["peak_memory_gb"] = peak if _num(peak) else probe.get("peak_memory_gb")
        if rate is None:
            m["error"] = (f"no warm log windows with a throughput after step {spec.warmup} "
                          f"({len(wins)} windows in all)")
        else:
            sps = rate["steps_per_s"]
            m.update(measured_steps=rate["measured_steps"], method=rate["method"], step_ms=1000 / sps)
            if spec.kind == "dcgan":
                ips = sps * spec.batch
                m.update(images_per_s=ips, s_per_epoch=EPOCH_IMAGES / ips,
                         projected_500_epochs_s=EPOCHS * EPOCH_IMAGES / ips, vs_seed=ips / SEED_IMAGES_PER_S)
            elif spec.kind == "mog":
                m["it_per_s"] = sps
            else:
                m.update(s_per_step=1 / sps, steps_per_epoch=spec.steps_per_epoch,
                         s_per_epoch=spec.steps_per_epoch / sps)
        prof = probe.get("profile") or {}
        if _num(prof.get("steps")) and prof["steps"] > 0:
            n = prof["steps"]
            for key in ("kernels", "launches", "graph_launches", "cpu_ops", "memcpy", "memset"):
                if _num(prof.get(key)):
                    m[f"{key}_per_step"] = prof[key] / n
            m["profiled_steps"] = f"{prof.get('start_step')}-{prof.get('stop_step')}"
        elif prof.get("error"):
            m["profile_error"] = prof["error"]
        rep = probe.get("replay") or {}
        if _num(rep.get("count")) and rep["count"] > 0:
            m.update(replay_gpu_ms=rep.get("gpu_ms_median"), replay_host_ms=rep.get("host_ms_median"),
                     replays_per_step=rep["count"] / max(rep.get("steps") or 1, 1))
        if probe.get("graph_replays_total") is not None:
            m["graph_replays_total"] = probe["graph_replays_total"]
        if probe.get("errors"):
            m["probe_errors"] = probe["errors"][:5]
        if probe.get("note"):
            m["note"] = probe["note"]
        return m
    return parse


def parse_json_result(required: str):
    def parse(raw, lines, rec):
        if not isinstance(raw, dict):
            return {"error": "the worker wrote no result"}
        m = dict(raw)
        if not _num(m.get(required)):
            m.setdefault("error", f"no {required} in the worker's result")
        return m
    return parse


TEST_LINE = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
NODE_ID = re.compile(r"(\S+\.py::\S+)")
SUMMARY_LINE = re.compile(r"=+ .*\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.* in [\d.]+s")


class TierWatcher:
    """Turns the tier's streamed `-v` lines into one results.jsonl line per test as pytest reports it."""

    def __init__(self, runner_ref: Callable):
        self.seen: set = set()
        self.runner_ref = runner_ref
        self.summary = None

    def __call__(self, line: str) -> None:
        if SUMMARY_LINE.search(line):
            self.summary = line.strip("= ").strip()
            return
        m, node = TEST_LINE.search(line), NODE_ID.search(line)
        if not m or not node or node.group(1) in self.seen:
            return
        self.seen.add(node.group(1))
        self.runner_ref().append({"phase": "tier_test", "test": node.group(1), "outcome": m.group(1).lower()})


def parse_tier(junit: Path, watcher: TierWatcher):
    def parse(raw, lines, rec):
        m: dict = {}
        if junit.is_file():
            import xml.etree.ElementTree as ET
            try:
                root = ET.parse(junit).getroot()
                suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
                total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
                failed = []
                for case in root.iter("testcase"):
                    if case.find("failure") is not None or case.find("error") is not None:
                        failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name', '')}")
                m.update(passed=total["tests"] - total["failures"] - total["errors"] - total["skipped"],
                         failed=total["failures"], errors=total["errors"], skipped=total["skipped"],
                         failed_tests=failed, source="junit XML")
            except (ET.ParseError, ValueError, OSError) as e:
                m["junit_error"] = f"{type(e).__name__}: {e}"[:200]
        if "passed" not in m:
            counts = collections.Counter()
            records = read_results(watcher.runner_ref().results)
            for r in records:
                if r.get("phase") == "tier_test" and r.get("run") == watcher.runner_ref().run_id:
                    counts[r.get("outcome")] += 1
            m.update(passed=counts["passed"], failed=counts["failed"], errors=counts["error"],
                     skipped=counts["skipped"], source="streamed lines (no junit XML)",
                     failed_tests=[r["test"] for r in records if r.get("phase") == "tier_test"
                                   and r.get("run") == watcher.runner_ref().run_id
                                   and r.get("outcome") in ("failed", "error")])
        if watcher.summary:
            m["summary"] = watcher.summary
        if rec.get("rc") not in (0, None) and not m.get("failed") and not m.get("errors"):
            m["error"] = f"pytest exited {rec.get('rc')} ({m.get('summary', 'see the log')})"
        return m
    return parse


def checkpoint_tensors(obj, prefix: str = ""):
    """(path, tensor) for every tensor in a nested checkpoint."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from checkpoint_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from checkpoint_tensors(v, f"{prefix}/{i}" if prefix else str(i))


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Tensor-by-tensor bit comparison of two checkpoints. Weights: floating-point tensors outside the optimizer,
    RNG and bookkeeping entries; the optimizer state and every tensor are reported too."""
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=False)
    sb = torch.load(b, map_location="cpu", weights_only=False)
    ta, tb = dict(checkpoint_tensors(sa)), dict(checkpoint_tensors(sb))

    def kind(path: str) -> str:
        top = path.split("/")[0].lower()
        if top.startswith("opt") or "optim" in top:
            return "opt"
        if "rng" in top or top in ("pending", "fixed_noise", "z_ref") or "scaler" in top:
            return "other"
        return "weight"

    def bits(t):
        t = t.detach().contiguous().reshape(-1)
        return t.view(torch.uint8) if t.dtype.is_floating_point or t.is_complex() else t

    differing, weights, opt_same, weights_same, all_same, n_diff = [], 0, True, True, True, 0
    for path in sorted(set(ta) | set(tb)):
        x, y = ta.get(path), tb.get(path)
        same = (x is not None and y is not None and x.dtype == y.dtype and x.shape == y.shape
                and torch.equal(bits(x), bits(y)))
        k = kind(path)
        if k == "weight" and (x is None or x.dtype.is_floating_point):
            weights += 1
            weights_same &= same
        if k == "opt":
            opt_same &= same
        if not same:
            all_same = False
            n_diff += 1
            if len(differing) < 5:
                if x is not None and y is not None and x.shape == y.shape and x.dtype.is_floating_point:
                    diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
                    differing.append(f"{path} (max |diff| {diff:.3g})")
                else:
                    differing.append(f"{path} (missing or other shape/dtype)")
    m = {"weights_identical": weights_same and weights > 0, "weights_compared": weights,
         "optimizer_identical": opt_same, "all_identical": all_same, "tensors_compared": len(set(ta) | set(tb)),
         "tensors_differing": n_diff, "differing": differing, "a": str(a), "b": str(b)}
    if not m["weights_identical"]:
        m["error"] = "weights differ" if weights else "no weight tensors found"
    return m


def last_checkpoint(folder: Path) -> Path:
    found = sorted(Path(folder).glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no */checkpoints/last.pt under {folder}")
    return found[-1]


# ================================================================================================================
# The two plans
# ================================================================================================================
class Ctx:
    def __init__(self, args, out: Path, work: Path):
        self.args, self.out, self.work = args, out, work
        self.device = args.device
        self.flags: dict = {"cuda_graph": False}
        self.runner: Runner | None = None

    @staticmethod
    def have(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False


def tier_cmd(ctx: Ctx, have=None) -> list[str]:
    have = have or ctx.have
    cmd = [PY, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "tests/test_cuda_readiness.py", "-v",
           "-p", "gpu_report", f"--junitxml={ctx.out / 'tier.xml'}"]
    if have("xdist"):
        cmd += ["-n", str(ctx.args.workers)]
    if have("pytest_timeout"):
        cmd += [f"--timeout={ctx.args.test_timeout}"]
    return cmd


def fast_flags(ctx: Ctx) -> list[str]:
    return FAST_FLAGS + (["--cuda-graph"] if ctx.flags.get("cuda_graph") else [])


def probe(script: str, args: list, warmup: int = 0, profile_at: int | None = None,
          replay_at: int | None = None) -> list[str]:
    cmd = [PY, str(THIS), "--worker", "probe", "--warmup-steps", str(warmup)]
    if profile_at is not None:
        cmd += ["--profile-at", str(profile_at)]
    if replay_at is not None:
        cmd += ["--replay-at", str(replay_at)]
    return cmd + ["--", script, *map(str, args)]


def dcgan_args(ctx: Ctx, out_dir: Path, steps: int, extra=()) -> list:
    return [*DEFAULT_COMMAND, "--dataset", "fake", "--fake-size", "50000", "--no-fid", "--eval-every", "0",
            "--save-every", "0", "--log-every", "50", "--max-steps", steps, "--device", ctx.device,
            "--out-dir", out_dir, *extra]


def parse_flags(ctx: Ctx):
    def parse(raw, lines, rec):
        text = "\n".join(lines)
        ctx.flags["cuda_graph"] = "--cuda-graph" in text
        missing = [f for f in DCGAN_FLAGS_USED if f not in text]
        m = {"cuda_graph": ctx.flags["cuda_graph"], "missing": missing}
        if "--max-steps" not in text:
            m["error"] = "dcgan_cifar_topk.py --help printed no usage"
        return m
    return parse


def plan_part1(ctx: Ctx) -> list[Phase]:
    w = ctx.work
    watcher = TierWatcher(lambda: ctx.runner)
    junit = ctx.out / "tier.xml"
    env_tier = {"PYTHONPATH": os.pathsep.join(p for p in (str(THIS.parent), os.environ.get("PYTHONPATH", "")) if p)}
    # dcgan: 50-step log windows; default: 100 warm-up steps, 600 measured, profile window 700-750
    default_steps, fast_steps = 800, 900

    def fast_cmd():
        graph = bool(ctx.flags.get("cuda_graph"))
        replay_at = 750 if graph else None
        return probe("dcgan_cifar_topk.py", dcgan_args(ctx, w / "dcgan_fast" / "runs", fast_steps, fast_flags(ctx)),
                     warmup=150, profile_at=800, replay_at=replay_at)

    return [
        Phase("tier", "CUDA test tier", cmd=tier_cmd(ctx), timeout=ctx.args.tier_timeout, expect_s=165,
              background=True, grace=15.0, on_line=watcher, parse=parse_tier(junit, watcher), env=env_tier),
        Phase("flags", "dcgan_cifar_topk.py --help", cmd=[PY, "dcgan_cifar_topk.py", "--help"], timeout=60,
              expect_s=5, quiet=True, parse=parse_flags(ctx)),
        # the fast path's command with 20 steps, run the way the measurement runs it (through the probe), so that
        # the measurement finds Inductor's caches warm
        Phase("warmup", "compile-cache warm-up (fast path, 20 steps)", background=True, timeout=180, expect_s=70,
              cmd=lambda: probe("dcgan_cifar_topk.py", dcgan_args(ctx, w / "warmup" / "runs", 20, fast_flags(ctx)))),
        Phase("dcgan_default", "DCGAN default command (--topk --mu 64 --gamma 0.99)", barrier=True, timeout=75,
              expect_s=20, cmd=probe("dcgan_cifar_topk.py", dcgan_args(ctx, w / "dcgan_default" / "runs",
                                                                         default_steps),
                                     warmup=100, profile_at=700),
              parse=parse_training(TrainingSpec(128, 100, 700, [("field", "images_per_s", 128), ("time", None, 1)],
                                                w / "dcgan_default" / "runs", "dcgan"))),
        Phase("dcgan_fast", "DCGAN fast path (+ --amp bf16 --compile [--cuda-graph])", timeout=100, expect_s=30,
              cmd=fast_cmd,
              parse=parse_training(TrainingSpec(128, 150, 750, [("field", "images_per_s", 128), ("time", None, 1)],
                                                w / "dcgan_fast" / "runs", "dcgan"))),
        Phase("dcgan_reference", "DCGAN reference loop (DataLoader, fp32, eager)", timeout=60, expect_s=20,
              cmd=[PY, str(THIS), "--worker", "reference", "--device", ctx.device, "--warmup", "100",
                   "--steps", "400"],
              parse=parse_json_result("images_per_s")),
        Phase("mog", "MoG (mog_topk.py --topk)", timeout=45, expect_s=12,
              cmd=probe("mog_topk.py", ["--topk", "--device", ctx.device, "--max-steps", 3000, "--log-every", 250,
                                        "--eval-every", 3000, "--save-every", 3000, "--out-dir", w / "mog" / "runs"],
                        warmup=500, profile_at=2500),
              parse=parse_training(TrainingSpec(1, 500, 2500, [("field", "it_per_s", 1), ("time", None, 1)],
                                                w / "mog" / "runs", "mog"))),
        Phase("cifar_fm", "improved-GAN CIFAR, feature matching (fp32)", timeout=75, expect_s=25,
              cmd=probe("improved_gan_cifar.py", cifar_args(ctx, w / "cifar_fm" / "runs"), warmup=100),
              parse=parse_training(TrainingSpec(100, 100, None, [("time", None, 1)], w / "cifar_fm" / "runs",
                                                "epoch", steps_per_epoch=500))),
        Phase("fid10k", "FID-10k (random Inception weights)", timeout=60, expect_s=20,
              cmd=[PY, str(THIS), "--worker", "fid", "--device", ctx.device, "--samples", "10000"],
              parse=parse_json_result("wall_s")),
    ]


def cifar_args(ctx: Ctx, out_dir: Path, extra=()) -> list:
    # 10,000 fake images: 100 steps per epoch, logged at each; windows 100-200 and 200-300 measured, the last
    # (which holds the final evaluation) dropped; seconds per epoch at the paper's 50,000 / 100 = 500 steps
    return ["--dataset", "fake", "--fake-size", 10000, "--no-fid", "--device", ctx.device, "--max-steps", 400,
            "--eval-every", 1000, "--save-every", 0, "--out-dir", out_dir, *extra]


def mnist_args(ctx: Ctx, out_dir: Path, extra=()) -> list:
    # 12,000 fake digits: 120 steps per epoch; seconds per epoch at MNIST's 60,000 / 100 = 600 steps
    return ["--dataset", "fake", "--fake-size", 12000, "--device", ctx.device, "--max-steps", 480,
            "--eval-every", 1000, "--save-every", 1000, "--out-dir", out_dir, *extra]


def plan_part2(ctx: Ctx) -> list[Phase]:
    w = ctx.work
    det = ["--torch-deterministic", "--seed", "1"]

    def dc(folder: str, steps: int, extra=()):
        return [PY, "dcgan_cifar_topk.py", *DEFAULT_COMMAND, "--dataset", "fake", "--fake-size", "2048", "--no-fid",
                "--eval-every", "0", "--save-every", "0", "--log-every", "10", "--max-steps", str(steps),
                "--device", ctx.device, "--out-dir", str(w / folder), *det, *extra]

    def mog(folder: str, steps: int, extra=()):
        return [PY, "mog_topk.py", "--topk", "--device", ctx.device, "--max-steps", str(steps), "--log-every", "100",
                "--eval-every", "400", "--save-every", "400", "--out-dir", str(w / folder), *det, *extra]

    def cmp(a: str, b: str):
        return lambda: compare_checkpoints(last_checkpoint(w / a), last_checkpoint(w / b))

    return [
        Phase("mnist", "improved-GAN MNIST (feature matching, fp32)", timeout=60, expect_s=20,
              cmd=probe("improved_gan_mnist.py", mnist_args(ctx, w / "mnist" / "runs"), warmup=120),
              parse=parse_training(TrainingSpec(100, 120, None, [("time", None, 1)], w / "mnist" / "runs", "epoch",
                                                steps_per_epoch=600))),
        Phase("mnist_mbd", "improved-GAN MNIST --minibatch-disc (fp32)", timeout=60, expect_s=20,
              cmd=probe("improved_gan_mnist.py", mnist_args(ctx, w / "mnist_mbd" / "runs", ["--minibatch-disc"]),
                        warmup=120),
              parse=parse_training(TrainingSpec(100, 120, None, [("time", None, 1)], w / "mnist_mbd" / "runs",
                                                "epoch", steps_per_epoch=600))),
        Phase("cifar_mbd", "improved-GAN CIFAR, minibatch-disc model (fp32)", timeout=90, expect_s=35,
              cmd=probe("improved_gan_cifar.py", cifar_args(ctx, w / "cifar_mbd" / "runs",
                                                            ["--model", "minibatch-disc"]), warmup=100),
              parse=parse_training(TrainingSpec(100, 100, None, [("time", None, 1)], w / "cifar_mbd" / "runs",
                                                "epoch", steps_per_epoch=500))),
        Phase("fid50k", "FID-50k (random Inception weights)", timeout=150, expect_s=60,
              cmd=[PY, str(THIS), "--worker", "fid", "--device", ctx.device, "--samples", "50000"],
              parse=parse_json_result("wall_s")),
        Phase("det_a", "--torch-deterministic run A (DCGAN, 40 steps)", timeout=60, expect_s=12, cmd=dc("det_a", 40)),
        Phase("det_b", "--torch-deterministic run B (same seed)", timeout=60, expect_s=12, cmd=dc("det_b", 40)),
        Phase("determinism", "bit identity: run A vs run B (last.pt)", func=cmp("det_a", "det_b"), expect_s=2),
        Phase("resume_half", "DCGAN 20 steps (deterministic)", timeout=60, expect_s=12, cmd=dc("resume", 20)),
        Phase("resume_rest", "DCGAN --resume to 40 steps", timeout=60, expect_s=12,
              cmd=lambda: dc("resume", 40, ["--resume", str(last_checkpoint(w / "resume"))])),
        Phase("resume", "resume = uninterrupted: DCGAN 20 + 20 vs 40 (run A)",
              func=cmp("det_a", "resume"), expect_s=2),
        Phase("mog_full", "MoG 400 iterations (deterministic)", timeout=45, expect_s=10, cmd=mog("mog_full", 400)),
        Phase("mog_half", "MoG 200 iterations", timeout=45, expect_s=10, cmd=mog("mog_resume", 200)),
        Phase("mog_rest", "MoG --resume to 400", timeout=45, expect_s=10,
              cmd=lambda: mog("mog_resume", 400, ["--resume", str(last_checkpoint(w / "mog_resume"))])),
        Phase("mog_resume", "resume = uninterrupted: MoG 200 + 200 vs 400", func=cmp("mog_full", "mog_resume"),
              expect_s=2),
    ]


def expected_total(phases: list[Phase]) -> float:
    """The planned duration (from the phases' estimates): background phases overlap the foreground phases that
    follow them up to the next barrier."""
    total, overlap_bg, overlap_fg = 0.0, 0.0, 0.0
    for ph in phases:
        if ph.barrier:
            total += max(overlap_bg, overlap_fg)
            overlap_bg = overlap_fg = 0.0
        if ph.background:
            overlap_bg = max(overlap_bg, overlap_fg + ph.expect_s)
        else:
            overlap_fg += ph.expect_s
    return total + max(overlap_bg, overlap_fg)


def load_fake_phases(path: str) -> list[Phase]:
    """Stand-in phases for tests: a JSON list of {"name", "cmd": [...], "timeout", "label"?, "background"?,
    "barrier"?, "grace"?}."""
    spec = json.loads(Path(path).read_text())
    return [Phase(p["name"], p.get("label", ""), cmd=p["cmd"], timeout=float(p.get("timeout", 60)),
                  background=bool(p.get("background")), barrier=bool(p.get("barrier")),
                  grace=float(p.get("grace", 2.0)), expect_s=float(p.get("expect_s", 0))) for p in spec]


# ================================================================================================================
# The tier's pytest plugin (-p gpu_report): compiled tests first, so that their long cold compilations start at
# once on every xdist worker instead of ending the run
# ================================================================================================================
COMPILED = re.compile(r"compil|fast-path|fast_path|cuda-graph|cuda_graph|graph")


def pytest_collection_modifyitems(items):
    def compiled(item) -> bool:
        return bool(COMPILED.search(item.nodeid)) or item.get_closest_marker("compiled") is not None

    items.sort(key=lambda item: 0 if compiled(item) else 1)  # stable: the collection order otherwise


# ================================================================================================================
# Workers (child processes of the phases)
# ================================================================================================================
def _write_result(data: dict) -> None:
    path = os.environ.get(RESULT_ENV)
    if path:
        _replace_text(path, json.dumps(data, default=str))
    else:
        print(json.dumps(data, default=str))


def _trace_counts(trace_path: Path) -> dict:
    data = json.loads(trace_path.read_text())
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    c = collections.Counter()
    for e in events:
        if not isinstance(e, dict) or e.get("ph") == "M":
            continue
        cat = str(e.get("cat", "")).lower()
        name = str(e.get("name", ""))
        if cat == "kernel":
            c["kernels"] += 1
        elif cat in ("gpu_memcpy", "memcpy"):
            c["memcpy"] += 1
        elif cat in ("gpu_memset", "memset"):
            c["memset"] += 1
        elif cat in ("cuda_runtime", "cuda_driver", "runtime", "driver"):
            if "GraphLaunch" in name:
                c["graph_launches"] += 1
                c["launches"] += 1
            elif "LaunchKernel" in name or "LaunchCooperativeKernel" in name:
                c["launches"] += 1
        elif cat == "cpu_op":
            c["cpu_ops"] += 1
    return dict(c)


def worker_probe(argv: list[str]) -> int:
    """Run a script in this process (runpy, as __main__) with hooks on common.MetricsLogger.log: the time and step
    of every log call; torch.profiler over the window from the first record at or after --profile-at to the next
    record; CUDA-event timing of torch.cuda.CUDAGraph.replay over the window from --replay-at to the next record.
    The hooks never change what the script computes, and never make it fail: their errors are recorded."""
    import runpy
    import traceback

    if "--" not in argv:
        print("usage: gpu_report.py --worker probe [--profile-at N] [--replay-at N] -- SCRIPT ARGS...",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="gpu_report.py --worker probe")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--profile-at", type=int, default=None)
    p.add_argument("--replay-at", type=int, default=None)
    opts = p.parse_args(argv[:cut])
    script, script_args = argv[cut + 1], argv[cut + 2:]
    data: dict = {"script": script, "log": [], "errors": [], "warmup_steps": opts.warmup_steps}
    result_dir = Path(os.environ.get(RESULT_ENV) or tempfile.mkdtemp()).parent
    sys.path.insert(0, str(REPO))
    code = 0
    try:
        import torch

        cuda = torch.cuda.is_available()
        prof = {"p": None, "start": None, "done": opts.profile_at is None}
        rep = {"on": False, "start": None, "events": [], "host": [], "done": opts.replay_at is None, "total": 0}

        def sync():
            if cuda and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def stop_replay(step):
            sync()
            gpu = sorted(s.elapsed_time(e) for s, e in rep["events"])
            host = sorted(rep["host"])
            rep["on"], rep["done"] = False, True
            data["replay"] = {"start_step": rep["start"], "stop_step": step, "steps": step - rep["start"],
                              "count": len(gpu), "gpu_ms_median": gpu[len(gpu) // 2] if gpu else None,
                              "gpu_ms_mean": sum(gpu) / len(gpu) if gpu else None,
                              "host_ms_median": 1000 * host[len(host) // 2] if host else None}

        def stop_profile(step):
            sync()
            pr, prof["p"], prof["done"] = prof["p"], None, True
            pr.stop()
            trace = result_dir / "profile_trace.json"
            pr.export_chrome_trace(str(trace))
            counts = _trace_counts(trace)
            try:
                trace.unlink()
            except OSError:
                pass
            data["profile"] = {"start_step": prof["start"], "stop_step": step, "steps": step - prof["start"],
                               **counts}

        def control(step):
            if rep["on"] and step > rep["start"]:
                stop_replay(step)
            if prof["p"] is not None and step > prof["start"]:
                stop_profile(step)
            if not rep["done"] and not rep["on"] and step >= opts.replay_at:
                rep["on"], rep["start"] = True, step
            elif not prof["done"] and prof["p"] is None and not rep["on"] and step >= opts.profile_at:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                sync()
                pr = torch.profiler.profile(activities=acts)
                pr.start()
                prof["p"], prof["start"] = pr, step

        def hooked(original_log):
            def log(self, record, *a, **kw):
                t_enter = time.perf_counter()
                out = original_log(self, record, *a, **kw)
                entry = {"t_enter": t_enter}
                try:
                    step = record.get("step") if isinstance(record, dict) else None
                    entry["step"] = step
                    entry["fields"] = {k: v for k, v in record.items() if _num(v)} if isinstance(record, dict) else {}
                    run_dir = getattr(self, "dir", None)
                    if run_dir is None:
                        logfile = getattr(self, "log_path", None) or getattr(self, "path", None)
                        run_dir = Path(logfile).parent if logfile is not None else None
                    if run_dir is not None:
                        data["run_dir"] = str(run_dir)
                    if _num(step):
                        control(step)
                except Exception as e:
                    data["errors"].append(f"hook: {type(e).__name__}: {e}"[:300])
                entry["t_exit"] = time.perf_counter()
                data["log"].append(entry)
                return out
            return log

        hooks = []
        targets = [t.strip() for t in os.environ.get(LOG_HOOKS_ENV, "").split(",") if t.strip()] or LOG_CLASSES
        for target in targets:  # whichever of them the scripts use: metrics.jsonl is written through .log
            module_name, _, cls_name = target.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), cls_name, None)
            except Exception as e:
                data["errors"].append(f"cannot import {module_name} ({type(e).__name__}: {e})"[:300])
                continue
            if cls is not None and callable(getattr(cls, "log", None)):
                cls.log = hooked(cls.log)
                hooks.append(f"{target}.log")
        if not hooks:
            data["errors"].append(f"none of {', '.join(targets)} has a .log to hook: figures from metrics.jsonl only")
        data["hooks"] = hooks

        graph_cls = getattr(torch.cuda, "CUDAGraph", None)
        if cuda and graph_cls is not None and hasattr(graph_cls, "replay"):
            original_replay = graph_cls.replay

            def replay(self, *a, **kw):
                rep["total"] += 1
                if not rep["on"] or len(rep["events"]) >= 20_000:
                    return original_replay(self, *a, **kw)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                t0 = time.perf_counter()
                out = original_replay(self, *a, **kw)
                rep["host"].append(time.perf_counter() - t0)
                e.record()
                rep["events"].append((s, e))
                return out

            graph_cls.replay = replay

        sys.argv = [script, *script_args]
        path = Path(script) if Path(script).is_absolute() else REPO / script
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # KeyboardInterrupt at a limit included: the record is still written
            code = 130 if isinstance(e, KeyboardInterrupt) else 1
            traceback.print_exc()
            data["errors"].append(f"{type(e).__name__}: {e}"[:300])
        try:
            if prof["p"] is not None:
                prof["p"].stop()
                data["errors"].append("profile window not closed (the run ended first)")
        except Exception:
            pass
        data["graph_replays_total"] = rep["total"] if cuda else None
        if cuda and torch.cuda.is_initialized():
            data["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        data["exit_code"] = code
        _write_result(data)
    return code


def _worker_options(name: str, argv: list[str], **ints) -> argparse.Namespace:
    """A worker's options: --device (default cuda) and one integer flag per keyword (its default)."""
    p = argparse.ArgumentParser(prog=f"gpu_report.py --worker {name}")
    p.add_argument("--device", default="cuda")
    for key, default in ints.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=default)
    return p.parse_args(argv)


def worker_reference(argv: list[str]) -> int:
    """benchmarks/bench_dcgan.py's reference loop (pytorch/examples dcgan: DataLoader, fp32, eager)."""
    opts = _worker_options("reference", argv, warmup=100, steps=400, workers=2)
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    import torch

    import bench_dcgan
    import common

    device = torch.device(opts.device)
    ns = argparse.Namespace(batch_size=128, warmup=opts.warmup, steps=opts.steps, ref_workers=opts.workers)
    images = common.fake_images(getattr(bench_dcgan, "EPOCH_IMAGES", 50_000), (3, 32, 32), seed=1)[0]
    images = images.permute(0, 2, 3, 1).numpy()
    print(f"reference loop: {opts.warmup} warm-up + {opts.steps} measured steps, batch 128, "
          f"{opts.workers} DataLoader workers", flush=True)
    res = dict(bench_dcgan.run_reference(ns, device, images))
    res["note"] = f"{opts.steps} steps after {opts.warmup}; kernels not profiled"
    print(f"reference loop: {res.get('images_per_s', float('nan')):,.0f} images/s", flush=True)
    _write_result(res)
    return 0


def worker_fid(argv: list[str]) -> int:
    """The scripts' FID pass (metrics.evaluate_generator: generated batches of 250 -> uint8 -> Inception -> moments,
    IS, Fréchet distance) over --samples images, with random Inception weights written to a file and read back
    through metrics.load_inception as --fid-weights is. Timing only."""
    opts = _worker_options("fid", argv, samples=10_000, batch_size=250, warmup_samples=500)
    sys.path.insert(0, str(REPO))
    import torch

    import metrics

    device = torch.device(opts.device)
    print("FID timing with randomly initialised Inception weights: timing only, the FID values mean nothing",
          flush=True)
    torch.manual_seed(0)
    res: dict = {"samples": opts.samples, "weights": "random initialisation (timing only)"}
    weights = Path(os.environ.get(RESULT_ENV) or tempfile.mkdtemp() + "/x").parent / "random_inception.pt"
    torch.save(metrics.FIDInceptionV3().state_dict(), weights)
    net = metrics.load_inception(str(weights), device=device)
    try:
        import dcgan_cifar_topk as dc

        G = dc.Generator().to(device).eval()
        nz = getattr(G, "nz", 100)

        def sample_fn(n):
            return G(torch.randn(n, nz, device=device)).float()

        sample_fn(2)
        res["sampler"] = "dcgan_cifar_topk.Generator (random weights)"
    except Exception as e:
        gen = torch.Generator(device=device).manual_seed(0)

        def sample_fn(n):
            return torch.rand(n, 3, 32, 32, generator=gen, device=device) * 2 - 1

        res["sampler"] = f"uniform random images (no DCGAN generator: {type(e).__name__})"
    dims = 2048
    ref_mu, ref_sigma = torch.zeros(dims, dtype=torch.float64), torch.eye(dims, dtype=torch.float64)
    metrics.evaluate_generator(sample_fn, opts.warmup_samples, ref_mu, ref_sigma, net, batch_size=opts.batch_size,
                               device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = metrics.evaluate_generator(sample_fn, opts.samples, ref_mu, ref_sigma, net, batch_size=opts.batch_size,
                                     device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    mu = torch.randn(dims, dtype=torch.float64, device=device)
    sigma = torch.eye(dims, dtype=torch.float64, device=device) * 2
    t0 = time.perf_counter()
    metrics.frechet_distance(mu, sigma, ref_mu.to(device), ref_sigma.to(device))  # where evaluate_generator runs it
    res.update(wall_s=wall, images_per_s=opts.samples / wall, estimate_50k_s=wall * 50_000 / opts.samples,
               frechet_s=time.perf_counter() - t0, fid_meaningless=out.get("fid"),
               peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    print(f"FID-{opts.samples}: {wall:.1f} s ({opts.samples / wall:,.0f} images/s)", flush=True)
    _write_result(res)
    return 0


WORKERS = {"probe": worker_probe, "reference": worker_reference, "fid": worker_fid}


# ================================================================================================================
# Command line
# ================================================================================================================
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--part", type=int, choices=(1, 2), default=1,
                   help="1: CUDA tier and the main measurements; 2: the further timings and checks")
    p.add_argument("--out", default="runs/gpu_check",
                   help="folder of results.jsonl, tier.xml, log.txt and table.md (appended to, so both parts can "
                        "share it)")
    p.add_argument("--table", action="store_true",
                   help="print (and write) the table of --out's results.jsonl, run nothing")
    p.add_argument("--budget", type=float, default=BUDGET_S,
                   help="seconds for the whole command: no phase runs past it")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N, for the measurements")
    p.add_argument("--workers", type=int, default=4, help="pytest-xdist workers of the tier (when installed)")
    p.add_argument("--test-timeout", type=int, default=120,
                   help="per-test limit of the tier in seconds (when pytest-timeout is installed)")
    p.add_argument("--tier-timeout", type=float, default=200.0, help="limit of the whole CUDA tier in seconds")
    p.add_argument("--skip", default="", help="comma-separated phase names not to run")
    p.add_argument("--work", default=None, help="scratch folder of the runs (default: a temporary one)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--fake-phases", default=None, help=argparse.SUPPRESS)  # tests: a JSON list of stand-in phases
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    return args


def env_record(torch, device: str) -> dict:
    idx = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(idx)
    rec = {"phase": "env", "device_name": props.name, "capability": f"{props.major}.{props.minor}",
           "memory_gb": round(props.total_memory / 2**30, 1), "gpus": torch.cuda.device_count(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "python": sys.version.split()[0], "host_cpus": os.cpu_count()}
    for mod in ("xdist", "pytest_timeout", "pytorch_fid", "triton", "torchvision"):
        rec[f"have_{mod}"] = Ctx.have(mod)
    return rec


def no_gpu_device_files() -> bool:
    """Linux without any GPU device file: no CUDA GPU, known without importing torch."""
    return sys.platform.startswith("linux") and not any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd"))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        if len(argv) < 2 or argv[1] not in WORKERS:
            print(f"error: --worker takes one of {', '.join(WORKERS)}", file=sys.stderr)
            return 2
        return WORKERS[argv[1]](argv[2:])
    args = parse_args(argv)
    out = Path(args.out).resolve()  # children run in the repository: every path they get is absolute
    if args.table:
        if not (out / "results.jsonl").is_file():
            print(f"error: no {out / 'results.jsonl'}", file=sys.stderr)
            return 2
        out_table = write_table(out, read_results(out / "results.jsonl"))
        print(out_table, end="")
        return 0

    if args.fake_phases:
        env = {"phase": "env", "fake_phases": True, "python": sys.version.split()[0]}
        phases, ctx = load_fake_phases(args.fake_phases), None
    elif no_gpu_device_files():
        print("gpu_report: no CUDA GPU present (no /dev/nvidia* device): nothing run")
        return 0
    else:
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_report: no CUDA GPU present (torch {torch.__version__}, torch.cuda.is_available() is "
                  f"False): nothing run")
            return 0
        try:
            dev = torch.device(args.device)
            if dev.type != "cuda" or (dev.index or 0) >= torch.cuda.device_count():
                raise ValueError
        except (RuntimeError, ValueError):
            print(f"error: --device {args.device}: not a CUDA device of this machine "
                  f"({torch.cuda.device_count()} present)", file=sys.stderr)
            return 2
        env = env_record(torch, args.device)
        phases, ctx = None, None

    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_report_"))
    work.mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    runner = Runner(out, work, args.part, run_id, args.budget)
    if phases is None:
        ctx = Ctx(args, out, work)
        ctx.runner = runner
        phases = plan_part1(ctx) if args.part == 1 else plan_part2(ctx)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    phases = [ph for ph in phases if ph.name not in skip]

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s in previous:
        signal.signal(s, _raise_cut)
    status = "complete"
    try:
        runner.append(env)
        runner.append({"phase": "plan", "budget_s": args.budget,
                       "phases": [{"name": ph.name, "label": ph.label, "timeout_s": ph.timeout,
                                   "expect_s": ph.expect_s, "background": ph.background} for ph in phases],
                       "expect_total_s": expected_total(phases)})
        head = env.get("device_name", "stand-in phases")
        runner.say(f"gpu_report part {args.part}: {head} | torch {env.get('torch', '?')} | CUDA "
                   f"{env.get('cuda', '?')} | {len(phases)} phases, budget {args.budget:.0f} s | results: "
                   f"{out / 'results.jsonl'}")
        runner.run_all(phases)
    except (KeyboardInterrupt, Cut) as e:
        status = "interrupted"
        runner.interrupt(type(e).__name__ if isinstance(e, KeyboardInterrupt) else str(e))
    finally:
        try:
            for s, h in previous.items():
                signal.signal(s, h)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the table is written whatever comes next
            runner.append({"phase": "end", "status": status, "wall_s": round(runner.elapsed(), 1),
                           "statuses": runner.statuses})
            table = write_table(out, read_results(out / "results.jsonl"))
            runner.say("\n" + table)
            runner.log.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if not args.keep_work and not args.work:
                shutil.rmtree(work, ignore_errors=True)
    if status == "interrupted":
        return 130
    return 0 if all(v == STATUS_OK for v in runner.statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
