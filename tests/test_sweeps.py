"""Tests of sweeps/run.py, the sweep runner: a 2-variant x 2-seed mog_topk.py sweep on 2 workers, idempotence,
the SLURM array script against the commands the local mode ran, the report against a recomputation from the run
folders, a killed sweep resumed to the uninterrupted result, a failing variant on dcgan_cifar_topk.py --dataset fake,
and bad input. Every script process imports torch (seconds of CPU each), so the tests share one sweep and keep the
number of runs small. The tests that signal a sweep start it in its own session and look at the run folders only
while its whole process group is stopped (stop_group_when), so what they see cannot change before they act."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, assert_one_line_error

RUNNER = REPO / "sweeps" / "run.py"
TIMEOUT = 900  # generous: a shared CI machine can stretch wall time many times over
# tiny MoG runs: 4 modes, 200 iterations, a checkpoint every 20 (so a killed run has one long before it ends)
MOG = ["--n-modes", "4", "--std", "0.2", "--hidden-dim", "16", "--batch-size", "32", "--lr-g", "3e-3", "--lr-d", "3e-3",
       "--iterations", "200", "--eval-every", "100", "--eval-samples", "200", "--save-every", "20", "--log-every", "20"]
TOPK = "topk=--topk --mu 16 --gamma 0.5 --iters-per-epoch 50"
DCGAN = ["--dataset", "fake", "--fake-size", "16", "--batch-size", "8", "--ngf", "8", "--ndf", "8", "--epochs", "2",
         "--no-fid", "--no-download", "--eval-every", "1", "--save-every", "1", "--log-every", "1"]


_RUNNER_MODULE = []


def sweep(*args, env=None) -> subprocess.CompletedProcess:
    """`python sweeps/run.py args...`, run in this process through common.run_cli, as its command line does (a new
    interpreter would spend seconds importing torch), from the repository with one thread per run and no GPU; the
    runs it starts are processes as always. Signal tests start a real runner (start_sweep)."""
    import common

    if not _RUNNER_MODULE:
        spec = importlib.util.spec_from_file_location("sweep_runner_in_tests", RUNNER)
        _RUNNER_MODULE.append(importlib.util.module_from_spec(spec))
        sys.modules[spec.name] = _RUNNER_MODULE[0]  # dataclasses look their module up there
        spec.loader.exec_module(_RUNNER_MODULE[0])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}), \
            mock.patch.object(sys, "argv", [str(RUNNER), *map(str, args)]):
        try:
            common.run_cli(lambda: sys.exit(_RUNNER_MODULE[0].main([str(a) for a in args])))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    return subprocess.CompletedProcess([str(RUNNER), *map(str, args)], code, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def slurm_dry_run(sbatch: Path, index: int) -> tuple[int, bytes]:
    """(exit status, stdout) of array index `index` of the sbatch script in its print-only mode."""
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(index), SWEEP_DRY_RUN="1")
    proc = subprocess.run(["bash", str(sbatch)], env=env, capture_output=True, timeout=60)
    return proc.returncode, proc.stdout


def argv_of(stdout: bytes) -> list[str]:
    assert stdout.endswith(b"\0"), stdout
    return stdout.decode().split("\0")[:-1]


def run_folders(out: Path, key: str) -> list[Path]:
    return sorted(out.glob(f"{key}__*"))


def logged_steps(folder: Path) -> list[int]:
    """Steps of the records of a run folder's metrics.jsonl (a line being written is left out)."""
    steps = []
    for line in (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def group(pgid: int) -> dict[int, str]:
    """{pid: state letter} of the processes of process group `pgid` that are not zombies, from /proc."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members[int(stat.parent.name)] = fields[0]
    return members


def start_sweep(args, **popen) -> subprocess.Popen:
    """The runner on `args` in its own session (its process group: itself and its runs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, str(RUNNER), *map(str, args)], cwd=REPO, env=env, text=True,
                            start_new_session=True, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen})


def stop_group_when(proc: subprocess.Popen, condition, timeout: float = TIMEOUT) -> bool:
    """Stop the process group of `proc` and look: when condition() holds, return True with the group still
    stopped, so nothing moves between the look and what the caller does next; else let it go on (SIGCONT) and look
    again. False when the sweep ended first. The group is only stopped once the condition holds while it runs (so
    it runs at full speed until then); SIGSTOP is delivered asynchronously, so the look waits until every member
    is stopped, and one that cannot stop for now (a parent in vfork waits for its child, stopped before exec)
    makes that round a miss."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        assert time.time() < deadline, "the condition never held"
        time.sleep(0.005)
        if not condition():
            continue
        os.killpg(proc.pid, signal.SIGSTOP)
        settle = time.time() + 0.2
        while any(state not in "Tt" for state in group(proc.pid).values()) and time.time() < settle:
            time.sleep(0.001)
        if all(state in "Tt" for state in group(proc.pid).values()) and condition():
            return True
        os.killpg(proc.pid, signal.SIGCONT)
    return False


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` and wait until none of its processes is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
    deadline = time.time() + 60
    while group(proc.pid):
        assert time.time() < deadline, f"processes of the killed sweep still alive: {group(proc.pid)}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------
# One 2-variant x 2-seed MoG sweep on 2 workers, shared by the tests below (the killed-sweep test, last, restores it)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mog(tmp_path_factory):
    out = tmp_path_factory.mktemp("mog_sweep")
    base = ["--script", "mog_topk.py", "--variants", "gan=", TOPK, "--seeds", "1", "2", "--out-dir", out,
            "--workers", "2", "--cores", "2"]
    args = [*base, "--", *MOG]
    # the SLURM script first, on the fresh folder: what each array index would run (1 CPU per task = 1 thread,
    # as the local runs below get with 2 cores / 2 workers)
    slurm = ok(sweep(*base, "--slurm", "--slurm-gpus", "0", "--slurm-cpus", "1", "--slurm-job-name", "mogtest",
                     "--", *MOG))
    sbatch = out / "sweep" / "mogtest.sbatch"
    planned = {i: slurm_dry_run(sbatch, i) for i in range(4)}
    first = sweep(*args)
    return SimpleNamespace(out=out, args=args, slurm=slurm, sbatch=sbatch, planned=planned, first=first)


def test_sweep_runs_every_variant_and_seed_on_two_workers(mog):
    ok(mog.first)
    assert "4 ran, 0 skipped, 0 failed" in mog.first.stdout
    for variant in ("gan", "topk"):
        for seed in (1, 2):
            (folder,) = run_folders(mog.out, f"{variant}__{seed}")
            a = json.loads((folder / "args.json").read_text())
            assert (a["exp_name"], a["seed"], a["topk"], a["threads"], a["device"]) == (variant, seed, variant == "topk", 1, "cpu")
            assert json.loads((folder / "summary.json").read_text())["step"] == 200
    journal = read_jsonl(mog.out / "sweep" / "runs.jsonl")
    starts = [r for r in journal if r["event"] == "start"]
    ends = [r for r in journal if r["event"] == "end"]
    # seed-major order, every run new, one thread each, all exit 0
    assert [(r["variant"], r["seed"], r["state"]) for r in starts] == [
        ("gan", 1, "new"), ("topk", 1, "new"), ("gan", 2, "new"), ("topk", 2, "new")]
    assert all(r["omp_num_threads"] == "1" and r["argv"][-2:] == ["--threads", "1"] for r in starts)
    assert sorted(r["exit"] for r in ends) == [0, 0, 0, 0]
    # two workers: the second run started before the first one ended; the third only after one had ended
    assert starts[1]["time"] < min(r["time"] for r in ends) <= starts[2]["time"]


def test_second_invocation_does_nothing(mog):
    ok(mog.first)
    before = sorted(p.name for p in mog.out.iterdir()), (mog.out / "sweep" / "runs.jsonl").read_text()
    again = ok(sweep(*mog.args))
    assert "0 ran, 4 skipped, 0 failed" in again.stdout and again.stdout.count(" skip ") == 4
    assert (sorted(p.name for p in mog.out.iterdir()), (mog.out / "sweep" / "runs.jsonl").read_text()) == before


def test_slurm_array_runs_exactly_the_local_commands(mog):
    ok(mog.first)
    assert subprocess.run(["bash", "-n", str(mog.sbatch)], capture_output=True).returncode == 0
    assert f"sbatch {mog.sbatch}" in mog.slurm.stdout
    text = mog.sbatch.read_text()
    assert "#SBATCH --array=0-3\n" in text and "#SBATCH --requeue\n" in text and "#SBATCH --cpus-per-task=1\n" in text
    assert "--gres" not in text
    started = {r["index"]: r["argv"] for r in read_jsonl(mog.out / "sweep" / "runs.jsonl") if r["event"] == "start"}
    for index, (status, stdout) in mog.planned.items():
        assert status == 0 and argv_of(stdout) == started[index], index
    # now every run is finished: the array task does nothing; an index past the end is an error
    status, stdout = slurm_dry_run(mog.sbatch, 0)
    assert status == 0 and b"\0" not in stdout and stdout.startswith(b"finished: ")
    assert slurm_dry_run(mog.sbatch, 4)[0] == 2


def test_report_numbers_equal_a_recomputation_from_the_run_folders(mog):
    ok(mog.first)
    ok(sweep("--report", "--out-dir", mog.out, "--plot-size", "640x400"))
    report = json.loads((mog.out / "report.json").read_text())
    md = (mog.out / "report.md").read_text()
    assert report["script"] == "mog_topk" and list(report["variants"]) == ["gan", "topk"]
    for variant in ("gan", "topk"):
        summaries = [json.loads((run_folders(mog.out, f"{variant}__{s}")[0] / "summary.json").read_text()) for s in (1, 2)]
        cells = []
        for label, key, scale, decimals in [("HQ %", "high_quality", 100, 1), ("modes %", "modes_recovered", 100, 1),
                                            ("reverse KL", "reverse_kl", 1, 3)]:
            values = [scale * s[key] for s in summaries]
            mean, std = statistics.mean(values), statistics.stdev(values)
            got = report["variants"][variant]["metrics"][label]
            assert got["values"] == pytest.approx(values, rel=1e-12) and got["n"] == 2
            assert got["mean"] == pytest.approx(mean, rel=1e-12) and got["std"] == pytest.approx(std, rel=1e-12, abs=1e-15)
            cell = f"{mean:.{decimals}f} ± {std:.{decimals}f}"
            assert f"| {label} | 2 | {cell} | {values[0]:.{decimals}f} | {values[1]:.{decimals}f} |" in md
            cells.append(cell)
        assert f"| {variant} | 1, 2 | {' | '.join(cells)} |" in md
        # the HQ curve: mean and std over the seeds at every evaluated iteration
        per_step = {}
        for s in (1, 2):
            for r in read_jsonl(run_folders(mog.out, f"{variant}__{s}")[0] / "metrics.jsonl"):
                if "eval/high_quality" in r:
                    per_step.setdefault(r["step"], []).append(100 * r["eval/high_quality"])
        series = report["curves"]["hq"]["series"][variant]
        assert series["x"] == [0, 100, 200] == sorted(per_step)
        assert series["mean"] == pytest.approx([statistics.mean(per_step[x]) for x in (0, 100, 200)], rel=1e-12)
        assert series["std"] == pytest.approx([statistics.stdev(per_step[x]) for x in (0, 100, 200)], rel=1e-12, abs=1e-15)
    for name in ("hq", "modes"):
        img = Image.open(mog.out / f"{name}.png")
        assert img.format == "PNG" and img.size == (640, 400)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
        for variant, color in report["curves"][name]["colors"].items():  # each variant's line (and legend) drawn
            assert (pixels == color).all(1).sum() > 100, (name, variant)
        assert f"]({name}.png)" in md


def test_killed_sweep_resumes_its_interrupted_run_to_the_uninterrupted_result(mog, tmp_path):
    ok(mog.first)
    # take the finished gan seed-1 run out of the sweep (it is the uninterrupted reference): the sweep must run it again
    (finished,) = run_folders(mog.out, "gan__1")
    reference = tmp_path / finished.name
    shutil.move(finished, reference)
    # while another process holds its lock, the sweep leaves the run alone
    import fcntl
    with open(mog.out / "sweep" / "locks" / "gan__1.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = sweep(*mog.args)
    assert busy.returncode == 3, busy.stdout + busy.stderr  # busy elsewhere: not done, say so by the exit status
    assert "busy  gan seed 1" in busy.stdout and "1 busy in another sweep" in busy.stdout
    assert not run_folders(mog.out, "gan__1")

    # start the sweep and kill it (SIGKILL, runner and run) at a checkpoint strictly before the run's end (step
    # 200): last.pt written, no summary, nothing logged at 200. The look happens while the whole process group is
    # stopped, and the kill before it moves on. A run that got to its end between two looks (a machine so loaded
    # that the test did not run for the whole run) is removed and started again.
    def mid_run():
        folders = run_folders(mog.out, "gan__1")
        return bool(folders) and (folders[-1] / "checkpoints" / "last.pt").is_file() and \
            not (folders[-1] / "summary.json").exists() and max(logged_steps(folders[-1]), default=200) < 200

    for _ in range(3):
        proc = start_sweep(mog.args)
        try:
            caught = stop_group_when(proc, mid_run)
        finally:
            kill_group(proc)
        if caught:
            break
        for folder in run_folders(mog.out, "gan__1"):
            shutil.rmtree(folder)
    else:
        pytest.fail("the run always got to its end before a checkpoint was seen")
    (interrupted,) = run_folders(mog.out, "gan__1")
    assert (interrupted / "checkpoints" / "last.pt").is_file() and not (interrupted / "summary.json").exists()
    # the SLURM array task of this run would now continue it ...
    status, stdout = slurm_dry_run(mog.sbatch, 0)
    assert status == 0 and argv_of(stdout)[-2:] == ["--resume", str(interrupted / "checkpoints" / "last.pt")]
    # ... and so does the local sweep, with exactly that command, in the same run folder
    resumed = ok(sweep(*mog.args))
    assert "1 ran, 3 skipped, 0 failed" in resumed.stdout and "start gan seed 1 (resume" in resumed.stdout
    last_start = [r for r in read_jsonl(mog.out / "sweep" / "runs.jsonl") if r["event"] == "start"][-1]
    assert last_start["state"] == "resume" and last_start["argv"] == argv_of(stdout)
    assert run_folders(mog.out, "gan__1") == [interrupted]
    # same result as the uninterrupted run
    a, b = reference, interrupted
    np.testing.assert_array_equal(np.load(a / "samples.npz")["samples"], np.load(b / "samples.npz")["samples"])
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert [sa[k] for k in ("high_quality", "modes_recovered", "reverse_kl", "step")] == \
           [sb[k] for k in ("high_quality", "modes_recovered", "reverse_kl", "step")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "it_per_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(a / "metrics.jsonl")) == strip(read_jsonl(b / "metrics.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# DCGAN on --dataset fake: a failing variant does not stop the others; a script without --threads
# ---------------------------------------------------------------------------------------------------------------
def test_failing_variant_does_not_stop_the_others_dcgan_fake(tmp_path):
    out = tmp_path / "dcgan"
    proc = sweep("--script", "dcgan_cifar_topk.py", "--variants", "diverges=--lr-d 1e38 --lr-g 1e38", "gan=",
                 "--seeds", "1", "--workers", "1", "--cores", "1", "--out-dir", out, "--", *DCGAN)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "diverges seed 1: exit 2: error: non-finite loss" in failed[0], proc.stderr
    assert "1 ran, 0 skipped, 1 failed" in proc.stdout
    journal = read_jsonl(out / "sweep" / "runs.jsonl")
    assert [(r["event"], r["variant"], r.get("exit")) for r in journal] == [
        ("start", "diverges", None), ("end", "diverges", 2), ("start", "gan", None), ("end", "gan", 0)]
    assert "--threads" not in journal[2]["argv"] and journal[2]["omp_num_threads"] == "1"  # dcgan has no --threads
    assert journal[1]["last_stderr"].startswith("error: non-finite loss")
    (gan,) = run_folders(out, "gan__1")
    assert json.loads((gan / "summary.json").read_text())["steps"] == 4  # 16 images / batch 8 x 2 epochs
    (diverged,) = run_folders(out, "diverges__1")
    assert not (diverged / "summary.json").exists()
    # the report tabulates the finished run; without FID there is no number and no FID curve
    ok(sweep("--report", "--out-dir", out))
    md = (out / "report.md").read_text()
    assert "| gan | 1 | – | – | – | – | – |" in md and "unfinished runs, not in the tables: diverges__1__" in md
    assert not (out / "fid.png").exists()


def test_report_dcgan_fid_final_best_and_curve(tmp_path):
    """Run folders in dcgan_cifar_topk.py's format (summary final/best, periodic and final FID records): the table
    and the FID-vs-epoch curve, whose final 50k-sample evaluation is left out."""
    out = tmp_path / "dcgan"
    rng = np.random.default_rng(0)
    expected = {}
    for variant in ("gan", "topk"):
        for seed in (1, 2, 3):
            folder = out / f"{variant}__{seed}__{1_700_000_000 + seed}"
            folder.mkdir(parents=True)
            fids = (60 - 10 * np.arange(3) + rng.normal(0, 2, 3)).tolist()
            final = {"fid": fids[-1] - 1.5, "is_mean": 5 + rng.random(), "is_std": 0.1, "fid_samples": 50000}
            best_i = int(np.argmin(fids))
            best = {"fid": fids[best_i], "is_mean": 4 + rng.random(), "epoch": 10 * (best_i + 1), "step": 0}
            records = [{"step": 390 * e, "epoch": e, "k": 128, "fid": f, "is_mean": 4.0, "is_std": 0.1,
                        "fid_samples": 10000, "final": False, "eval_time_s": 1.0} for e, f in zip((10, 20, 30), fids)]
            records.append({"step": 390 * 30, "epoch": 30.0, "k": 128, **final, "final": True, "eval_time_s": 1.0})
            (folder / "args.json").write_text(json.dumps({"exp_name": variant, "seed": seed, "topk": variant == "topk",
                                                          "command": f"dcgan_cifar_topk.py --seed {seed}"}))
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (folder / "summary.json").write_text(json.dumps({"steps": 11700, "final": final, "best": best}))
            expected.setdefault(variant, []).append((fids, final, best))
    ok(sweep("--report", "--out-dir", out))
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert report["script"] == "dcgan_cifar_topk"
    for variant, runs in expected.items():
        got = report["variants"][variant]["metrics"]
        for label, values in [("FID final", [f["fid"] for _, f, _ in runs]), ("FID best", [b["fid"] for _, _, b in runs]),
                              ("IS final", [f["is_mean"] for _, f, _ in runs]),
                              ("IS at best FID", [b["is_mean"] for _, _, b in runs])]:
            assert got[label]["values"] == pytest.approx(values, rel=1e-12)
            cell = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
            assert f"| {label} | 3 | {cell} | " + " | ".join(f"{v:.2f}" for v in values) + " |" in md
        series = report["curves"]["fid"]["series"][variant]
        assert series["x"] == [10, 20, 30] and series["n"] == [3, 3, 3]  # the final evaluation is not a point
        assert series["mean"] == pytest.approx([statistics.mean(f[i] for f, _, _ in runs) for i in range(3)], rel=1e-12)
    img = Image.open(out / "fid.png")
    assert img.format == "PNG" and img.size == (800, 500)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one error line, exit status 2, nothing started or written
# ---------------------------------------------------------------------------------------------------------------
CHEAP_BAD = {
    "unknown script": (["--script", "no_such_script.py"], "--script no_such_script.py: no such Python script"),
    "seeds twice": (["--script", "mog_topk.py", "--seeds", "1", "2", "1"], "--seeds: seed(s) 1 given twice"),
    "variant twice": (["--script", "mog_topk.py", "--variants", "a=", "a=--topk"], "variant 'a' given twice"),
    "bad variant name": (["--script", "mog_topk.py", "--variants", "a__b=--topk"], "a variant is NAME=FLAGS"),
    "runner flag in variant": (["--script", "mog_topk.py", "--variants", "a=--seed 3"], "--seed is set by the runner"),
    "bad device": (["--script", "mog_topk.py", "--devices", "gpu0"], "--devices 'gpu0'"),
    "report and slurm": (["--script", "mog_topk.py", "--report", "--slurm"], "exclude each other"),
}


@pytest.mark.parametrize("name", CHEAP_BAD)
def test_bad_input_one_line_error_nothing_started(tmp_path, name):
    argv, message = CHEAP_BAD[name]
    out = tmp_path / "sweep_out"
    proc = sweep(*argv, "--out-dir", out)
    line = assert_one_line_error(proc)
    assert proc.returncode == 2 and line.startswith("error: ") and message in line, line
    assert not out.exists()


def test_bad_input_found_by_the_script_and_torch_nothing_started(tmp_path):
    """A variant flag the script's own validation refuses, and a GPU that does not exist: both found by importing the
    script in a subprocess, before anything starts (the two sweeps run side by side)."""
    cases = {"refused": (["--variants", "gan=", "topk=--topk --mu 999"], "variant 'topk' (seed 1): dcgan_cifar_topk.py "
                                                                       "refuses its flags: --mu must be"),
             "unknown flag": (["--variants", "gan=--no-such-flag"], "unrecognized arguments: --no-such-flag"),
             "no such gpu": (["--devices", "cuda:0", "cuda:99"], "no such device")}
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs = {name: subprocess.Popen([sys.executable, str(RUNNER), "--script", "dcgan_cifar_topk.py", *argv, "--out-dir",
                                     str(tmp_path / name.replace(" ", "_")), "--", *DCGAN], cwd=REPO, env=env,
                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        line = assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        assert proc.returncode == 2 and line.startswith("error: ") and cases[name][1] in line, (name, line)
        assert not (tmp_path / name.replace(" ", "_")).exists(), name


# ---------------------------------------------------------------------------------------------------------------
# Small pieces, in process (the runner imports only the standard library, numpy and Pillow)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner():
    import importlib.util
    spec = importlib.util.spec_from_file_location("sweep_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_of_a_run_is_the_nth_gpu_the_runner_sees(runner):
    assert runner.cuda_visible("cuda:1", None) == "1"
    assert runner.cuda_visible("cuda:1", "4,6") == "6"
    assert runner.cuda_visible("cuda:0", "GPU-abc, GPU-def") == "GPU-abc"


@pytest.mark.parametrize("lo, hi, ticks, decimals", [
    (0, 200, [0, 50, 100, 150, 200], 0),
    (0.12, 0.7, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 1),
    (12, 61, [10, 20, 30, 40, 50, 60, 70], 0),
    (0, 1.1, [0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2], 1),
    (0, 1.4, [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5], 2),
    (5, 5, [4.7, 4.8, 4.9, 5.0, 5.1, 5.2, 5.3], 1),  # one value: padded by 5 %
])
def test_plot_ticks_are_round_and_cover_the_data(runner, lo, hi, ticks, decimals):
    got, dec = runner.nice_ticks(lo, hi)
    assert got == pytest.approx(ticks) and dec == decimals
    assert got[0] <= lo and got[-1] >= hi
