"""The sweep runner, its presets, the update-direction analysis and the benchmarks under careless or unlucky use.

One test (or a parametrized family) per numbered item of the robustness list: the sbatch file quotes every value
(it is executed here, not only read), Ctrl-C and SIGTERM on a sweep, unusable output folders and a full disk, damaged
run folders in reports, run folders matched by their args.json, the presets' and tools' flags. The contract checked
everywhere: exit status 2, exactly one stderr line starting with `error:`, no traceback, nothing written when the
refusal comes before the work. Most cases run a program's main(argv) in this process through common.run_cli (the
command line's path) to stay fast; the sbatch file, signals and the sbatch header's argv need real processes.
"""

import errno
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_one_line_error
from test_sweeps import (MOG, RUNNER, TIMEOUT, argv_of, logged_steps, ok, read_jsonl, run_folders, slurm_dry_run,
                         start_sweep, stop_group_when, sweep)

import common

TABLE1, MNIST_SSL = REPO / "sweeps" / "mog_table1.py", REPO / "sweeps" / "mnist_ssl.py"


def refused(proc: subprocess.CompletedProcess, *fragments) -> str:
    """The contract of a user mistake: exit status 2, one `error:` line holding every fragment. Returns it."""
    line = assert_one_line_error(proc)
    assert proc.returncode == 2 and line.startswith("error: "), (proc.returncode, line)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def cli(main, argv, capsys) -> tuple[int, str, list[str]]:
    """main(argv) through common.run_cli, as on the command line: (exit status, stdout, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        common.run_cli(lambda: sys.exit(main([str(a) for a in argv])))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return info.value.code or 0, out, [line for line in err.splitlines() if line.strip()]


def refused_here(main, argv, capsys, *fragments) -> str:
    """refused() for main(argv) run in this process; nothing may be printed on stdout before the refusal."""
    code, out, err = cli(main, argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and out == "", (code, out, err)
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runner():
    return load(RUNNER, "sweep_runner")


@pytest.fixture(autouse=True)
def _signals_restored():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


def fake_run(out: Path, name: str, seed, *, summary=None, args=None, metrics=None, last_pt=False,
             folder=None) -> Path:
    """A run folder as mog_topk.py leaves it, with only what the runner reads; a str or bytes replaces a file's
    content as written."""
    path = out / (folder or f"{name}__{seed}__1700000000")
    (path / "checkpoints").mkdir(parents=True)
    a = {"exp_name": name, "seed": seed, "n_modes": 4, "command": f"mog_topk.py --seed {seed} --exp-name {name}"}
    files = {"args.json": a if args is None else args, "summary.json": summary, "metrics.jsonl": metrics}
    for file, content in files.items():
        if content is not None:
            data = content if isinstance(content, (str, bytes)) else json.dumps(content)
            (path / file).write_bytes(data if isinstance(data, bytes) else data.encode())
    if last_pt:
        (path / "checkpoints" / "last.pt").write_bytes(b"checkpoint")
    return path


def mog_summary(seed, hq=0.9, modes=1.0, rkl=0.1):
    return {"step": 200, "seed": seed, "high_quality": hq, "modes_recovered": modes, "reverse_kl": rkl,
            "it_per_s": 50.0}


# ---------------------------------------------------------------------------------------------------------------
# 1. --slurm: every value quoted, or refused when sbatch could not take it
# ---------------------------------------------------------------------------------------------------------------
def test_1_sbatch_file_quotes_every_value_and_runs_nothing_injected(tmp_path):
    out = tmp_path / "out dir's"  # a space and a quote: cd, OUT_DIR, --output and --error must quote them
    pwned = tmp_path / "pwned"
    data_dir = f"d\ntouch {pwned}\n"  # a newline once ended the header comment and ran the next line
    ok(sweep("--script", "improved_gan_mnist.py", "--seeds", "1", "--out-dir", out, "--slurm", "--slurm-gpus", "0",
             "--slurm-partition", "gpu big", "--slurm-setup", "export SETUP_RAN='a b'", "--", "--data-dir", data_dir))
    (sbatch,) = (out / "sweep").glob("*.sbatch")
    text = sbatch.read_text()
    assert subprocess.run(["bash", "-n", str(sbatch)], capture_output=True).returncode == 0
    header = [line for line in text.splitlines() if line.startswith("# Written by")]
    assert len(header) == 1 and "\\x0atouch" in header[0]
    options = [shlex.split(line[len("#SBATCH "):]) for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert ["--partition=gpu big"] in options  # what sbatch reads back (it takes quotes like a shell)
    assert [f"--output={out}/sweep/logs/slurm_%A_%a.out"] in options
    # executed: the run's command comes out exactly, nothing else ran, nothing appeared outside the out-dir
    status, stdout = slurm_dry_run(sbatch, 0)
    argv = argv_of(stdout)
    assert status == 0 and argv[argv.index("--data-dir") + 1] == data_dir and argv[argv.index("--out-dir") + 1] == str(out)
    assert not pwned.exists() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("flag, value", [("--slurm-time", "1:00:00\ntouch {pwned}"), ("--slurm-mem", "4G\\n"),
                                         ("--out-dir", "{tmp}/a\nb")])
def test_1_sbatch_value_sbatch_cannot_read_is_refused_before_anything_is_written(runner, tmp_path, capsys, flag,
                                                                                 value):
    value = value.format(pwned=tmp_path / "pwned", tmp=tmp_path)
    out = value if flag == "--out-dir" else tmp_path / "out"
    argv = ["--script", "mog_topk.py", "--seeds", "1", "--slurm", "--slurm-gpus", "0", "--out-dir", out]
    refused_here(runner.main, argv + ([flag, value] if flag != "--out-dir" else []), capsys, flag,
                 "#SBATCH value cannot hold")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# 2. Ctrl-C and SIGTERM on a sweep: the runs save, their ends are recorded, the same command continues
# ---------------------------------------------------------------------------------------------------------------
def test_2_ctrl_c_and_sigterm_let_the_run_save_and_the_same_command_continues(tmp_path):
    out = tmp_path / "sweep"
    flags = [f for f in MOG]
    flags[flags.index("--iterations") + 1] = "1000"
    flags[flags.index("--save-every") + 1] = "100000"  # no checkpoint but the end's, so last.pt is the Ctrl-C's own
    flags[flags.index("--log-every") + 1] = "10"
    args = ["--script", "mog_topk.py", "--variants", "gan=", "--seeds", "1", "--out-dir", out, "--", *flags]
    out_log = tmp_path / "runner.out"

    def training(after: int):
        def look():
            folders = run_folders(out, "gan__1")
            steps = logged_steps(folders[-1]) if folders else []
            return bool(steps) and after < max(steps) < 900 and not (folders[-1] / "summary.json").exists()
        return look

    # Ctrl-C in a terminal: SIGINT to the whole process group. The runner gets a second Ctrl-C while its run
    # still saves (the run itself is held stopped meanwhile, so it gets exactly one and saves).
    with open(out_log, "w") as stdout:
        proc = start_sweep(args, stdout=stdout)
        try:
            assert stop_group_when(proc, training(0)), "the run ended before it could be interrupted"
            os.killpg(proc.pid, signal.SIGINT)
            os.kill(proc.pid, signal.SIGCONT)  # the runner only
            deadline = time.time() + 60
            while "starting no more runs" not in out_log.read_text():
                assert time.time() < deadline, out_log.read_text()
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGINT)  # the second Ctrl-C reaches the runner while its run is still there
            os.killpg(proc.pid, signal.SIGCONT)
            _, stderr = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == ("interrupted: 1 run(s) stopped; the same command continues gan seed 1 "
                                               "from checkpoints/last.pt")
    (folder,) = run_folders(out, "gan__1")
    last_pt = folder / "checkpoints" / "last.pt"
    end = read_jsonl(out / "sweep" / "runs.jsonl")[-1]
    assert (end["event"], end["status"], end["last_pt"]) == ("end", "interrupted", str(last_pt)) and last_pt.is_file()
    assert not (folder / "summary.json").exists()
    stopped_at = max(logged_steps(folder))

    # SIGTERM to the runner alone (kill <pid>): passed on to the run, which saves again further on
    proc = start_sweep(args)
    try:
        assert stop_group_when(proc, training(stopped_at)), "the resumed run ended before it could be stopped"
        os.kill(proc.pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in stderr and "start gan seed 1 (resume" in stdout, stderr
    end = read_jsonl(out / "sweep" / "runs.jsonl")[-1]
    assert (end["status"], end["last_pt"]) == ("interrupted", str(last_pt)) and max(logged_steps(folder)) > stopped_at

    # the same command continues the run to its end, in the same folder
    done = ok(sweep(*args))
    assert "1 ran, 0 skipped, 0 failed" in done.stdout and "start gan seed 1 (resume" in done.stdout
    assert run_folders(out, "gan__1") == [folder] and json.loads((folder / "summary.json").read_text())["step"] == 1000


# ---------------------------------------------------------------------------------------------------------------
# 4. an --out-dir that cannot hold folders, an interpreter that is not there, a full disk
# ---------------------------------------------------------------------------------------------------------------
def test_4_unusable_out_dir_or_python_is_one_line_and_nothing_is_written(runner, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    base = ["--script", "mog_topk.py", "--seeds", "1", "--dry-run"]
    slurm = ["--script", "mog_topk.py", "--seeds", "1", "--slurm", "--slurm-gpus", "0"]
    cases = {"a file": (base, blocker, "is a file"), "a file, --slurm": (slurm, blocker, "is a file"),
             "below a file": (base[:-1], blocker / "runs", "is a file"),
             "below a file, --slurm": (slurm, blocker / "runs", "is a file"),
             "/proc": (base[:-1], Path("/proc/no_such_dir_for_tests/runs"), "No such file or directory"),
             "read-only /sys, --slurm": (slurm, Path("/sys/no_such_dir_for_tests"), "cannot write"),
             "--python /nonexistent": ([*base[:-1], "--python", "/nonexistent/python"], tmp_path / "out",
                                       "--python /nonexistent/python: cannot run it")}
    for name, (argv, out, fragment) in cases.items():
        if str(out).startswith(("/proc", "/sys")) and not Path(str(out)[:5]).is_dir():
            continue
        refused_here(runner.main, [*argv, "--out-dir", out, "--", "--iterations", "10"], capsys, fragment)
    assert not (tmp_path / "out").exists() and blocker.read_text() == "not a folder"
    assert not Path("/proc/no_such_dir_for_tests").exists() and not Path("/sys/no_such_dir_for_tests").exists()


@pytest.mark.parametrize("fail_at, workers", [(1, 1), (2, 2)])
def test_4_full_disk_at_runs_jsonl_stops_cleanly_in_one_line(runner, tmp_path, capsys, monkeypatch, fail_at, workers):
    """The start record is written before its run starts: a refused write starts nothing (fail_at 1); when it is the
    second run's start record, the first run, already running, is stopped with SIGINT and its end recorded."""
    out = tmp_path / "sweep"
    calls, append = [], runner.append

    def full_disk(path, text):
        calls.append(path)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        append(path, text)

    monkeypatch.setattr(runner, "append", full_disk)
    flags = [f for f in MOG]
    flags[flags.index("--iterations") + 1] = "100000"
    argv = ["--script", "mog_topk.py", "--variants", "gan=", "--seeds", "1", "2", "--workers", str(workers),
            "--cores", "1", "--out-dir", str(out), "--", *flags]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        common.run_cli(lambda: sys.exit(runner.main(argv)))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 2 and err == [f"error: cannot write {out / 'sweep' / 'runs.jsonl'}: No space left on "
                                            "device"], err
    records = read_jsonl(out / "sweep" / "runs.jsonl") if fail_at > 1 else []
    assert [(r["event"], r["seed"]) for r in records] == ([("start", 1), ("end", 1)] if fail_at > 1 else [])
    if fail_at > 1:  # the run that had started is stopped and waited for: no process is left behind
        assert records[1]["status"] == "interrupted" and not Path(f"/proc/{records[1]['pid']}").exists()
    else:
        assert not run_folders(out, "gan__1") and not (out / "sweep" / "runs.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. --report on damaged run folders; absurd plot sizes
# ---------------------------------------------------------------------------------------------------------------
def test_5_report_skips_and_lists_unreadable_run_folders(runner, tmp_path, capsys):
    out = tmp_path / "sweep"
    evals = [{"step": s, "eval/high_quality": 0.5 + s / 1000, "eval/modes_recovered": 1.0} for s in (0, 100, 200)]
    good = "\n".join(map(json.dumps, evals)).encode()
    fake_run(out, "gan", 1, summary=mog_summary(1), metrics=good[:40] + b"\n5\n\xff{\"step\": 1}\n" + good)
    fake_run(out, "gan", 2, summary=mog_summary(2, hq=0.8), metrics=good)
    fake_run(out, "topk", 1, summary=mog_summary(1, hq=1e306, rkl=-1e306),
             metrics=json.dumps({"step": 100, "eval/high_quality": 1e306}) + "\n")
    fake_run(out, "gan", 3, summary='{"step": 20', metrics=good)  # truncated: unfinished
    bad = {"gan__4__1": [1, 2], "gan__5__1": {"seed": 5, "command": "mog_topk.py"},
           "gan__6__1": {"exp_name": "gan", "seed": "6", "command": "mog_topk.py"},
           "gan__7__1": {"exp_name": "gan", "seed": [7], "command": "mog_topk.py"},
           "gan__8__1": b'\xff\xfe{"exp_name": "gan"}'}
    for name, content in bad.items():
        fake_run(out, "gan", 0, args=content, summary=mog_summary(0), folder=name)
    assert cli(runner.main, ["--report", "--out-dir", out], capsys)[0] == 0
    md = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["variants"]["gan"]["seeds"] == [1, 2] and report["variants"]["gan"]["metrics"]["HQ %"]["n"] == 2
    assert report["variants"]["topk"]["metrics"]["HQ %"]["n"] == 0  # 1e306 is no metric's value: shown as –
    assert "| topk | 1 | – | 100.0 | – |" in md
    skipped = next(line for line in md.splitlines() if "args.json unusable" in line)
    assert all(name in skipped for name in bad) and "unfinished runs, not in the tables: gan__3__" in md
    assert report["curves"]["hq"]["series"]["gan"]["x"] == [0, 100, 200]  # the "5" and \xff lines left out

    for png in out.glob("*.png"):
        png.unlink()
    (out / "report.md").unlink()
    for size in ("100000x100000", "4001x500", "800x199", "800"):
        refused_here(runner.main, ["--report", "--out-dir", out, "--plot-size", size], capsys, "--plot-size", size)
    assert not (out / "report.md").exists() and not list(out.glob("*.png"))


# ---------------------------------------------------------------------------------------------------------------
# 6. run folders matched by args.json; an unreadable summary.json is unfinished
# ---------------------------------------------------------------------------------------------------------------
def test_6_runs_are_matched_by_args_json_and_an_unreadable_summary_is_unfinished(runner, tmp_path, capsys):
    out = tmp_path / "sweep"
    # exp_name 'gan__2' (seed 5), named like seed 2's run of 'gan', finished: not gan seed 2's run
    fake_run(out, "gan__2", 5, summary=mog_summary(5))
    # another script's run folder of the same name, finished
    fake_run(out, "gan", 3, summary=mog_summary(3), args={"exp_name": "gan", "seed": 3, "command": "dcgan_cifar_topk.py"})
    # gan seed 1: finished once, then a newer folder with a truncated summary.json and a checkpoint
    fake_run(out, "gan", 1, summary=mog_summary(1), folder="gan__1__1700000000")
    newer = fake_run(out, "gan", 1, summary='{"high_quality": 0.9', last_pt=True, folder="gan__1__1700000001")
    # a folder of gan seed 4's name holding a checkpoint but no readable args.json
    fake_run(out, "gan", 4, args=b"\xff", last_pt=True)
    expected = {2: ("new", None), 3: ("new", None), 1: ("resume", newer / "checkpoints" / "last.pt"),
                4: ("unreadable", out / "gan__4__1700000000")}
    for seed, want in expected.items():
        assert runner.run_state(out, "gan", seed, "mog_topk") == want, seed
        # the sbatch script decides with the same code
        answer = subprocess.run([sys.executable, "-c", runner.STATE_PY, str(out), "gan", str(seed), "mog_topk"],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert answer == f"{want[0]}:{want[1] or ''}", seed
    # a sweep resumes seed 1 (dry run: the command it would start) and refuses the folder it cannot tell
    code, dry, _ = cli(runner.main, ["--script", "mog_topk.py", "--variants", "gan=", "--seeds", "1", "2", "--dry-run",
                                     "--out-dir", out, "--", "--n-modes", "4"], capsys)
    lines = dry.splitlines()
    assert code == 0 and lines[0].endswith(f"--resume {newer / 'checkpoints' / 'last.pt'}") and "--resume" not in lines[1]
    refused_here(runner.main, ["--script", "mog_topk.py", "--variants", "gan=", "--seeds", "4", "--dry-run", "--out-dir",
                               out, "--", "--n-modes", "4"], capsys, "gan__4__1700000000: args.json missing or unreadable")


# ---------------------------------------------------------------------------------------------------------------
# 7. the presets: one line for every mistake, corrupt run files in their tables
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def presets():
    return load(TABLE1, "mog_table1"), load(MNIST_SSL, "mnist_ssl")


def test_7_preset_mistakes_are_one_line_and_nothing_is_written(presets, tmp_path, capsys):
    table1, mnist = presets
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = tmp_path / "out"
    table1_cases = {"--variants foo": (["--variants", "foo"], "invalid choice: 'foo'"),
                    "--config nope": (["--config", "nope"], "--config must be one of"),
                    "--seeds 1 1": (["--seeds", "1", "1"], "seed given twice"),
                    "--jobs 0": (["--jobs", "0"], "must be positive"),
                    "--frob": (["--frob"], "unrecognized arguments: --frob"),
                    "--repor, abbreviated": (["--repor"], "unrecognized arguments: --repor"),
                    "out-dir below a file": (["--out-dir", blocker / "x"], "is a file, not a folder"),
                    "--extra names the cell": (["--extra", "--n-modes", "64"], "--n-modes names the cell")}
    mnist_cases = {"--seeds 1 1": (["--seeds", "1", "1"], "seed given twice"),
                   "--jobs 0": (["--jobs", "0"], "at least 1"),
                   "--frob": (["--frob"], "unknown arguments --frob"),
                   "--table-onl, abbreviated": (["--table-onl"], "--table-onl"),
                   "out-dir a file": (["--out-dir", blocker], "is a file, not a folder"),
                   "-- --num-labels 50": (["--num-labels", "100", "--", "--num-labels", "50"], "--num-labels names the run"),
                   "-- --seed-data=3": (["--", "--seed-data=3"], "--seed-data names the run")}
    for name, (argv, fragment) in table1_cases.items():
        refused_here(table1.main, ["--modes", "4", "--iterations", "20", "--out-dir", out, *argv], capsys, fragment)
    for name, (argv, fragment) in mnist_cases.items():
        tail = ["--dataset", "fake", "--device", "cpu"] if "--" in argv else ["--", "--dataset", "fake", "--device", "cpu"]
        refused_here(mnist.main, ["--out-dir", out, *argv, *tail], capsys, fragment)
    assert not out.exists() and blocker.read_text() == "x"


def test_7_presets_tables_leave_out_corrupt_run_files(presets, tmp_path, capsys):
    table1, mnist = presets
    table = tmp_path / "table"
    fake_run(table, "mog4_gan", 1, summary=dict(mog_summary(1), step=20))
    fake_run(table, "mog4_topk", 1, summary='{"step": 20, "high_q', metrics=b'5\n\xff\n{"step": 10, "eval/high_quality": '
             b'"x"}\n{"step": 10, "eval/high_quality": 0.5, "eval/modes_recovered": 0.75, "eval/reverse_kl": 0.2}\n')
    fake_run(table, "mog4_gan", 2, args=b"\xff\xfe", summary=dict(mog_summary(2), step=20))
    runs = tmp_path / "mnist"
    a = {"exp_name": "mnist_ssl_20", "num_labels": 20, "supervised_only": False, "command": "improved_gan_mnist.py"}
    result = {"test_err_ema": 30, "test_err_ema_pct": 3.0, "test_err_raw": 35, "n_test": 1000, "epochs_done": 1}
    fake_run(runs, "mnist_ssl_20", 1, args=dict(a, seed=1), summary=dict(result, seed=1),
             metrics=json.dumps(dict(result, epoch=1)) + "\n5\n")
    fake_run(runs, "mnist_ssl_20", 2, args=dict(a, seed=2), summary='{"test_err_ema": 3', metrics=b"\xff\n")
    fake_run(runs, "mnist_ssl_20", 3, args=b"[1]", summary=dict(result, seed=3), metrics=json.dumps(dict(result, epoch=1)))
    code, text, _ = cli(table1.main, ["--modes", "4", "--variants", "gan", "topk", "--seeds", "1", "2", "--iterations",
                                      "20", "--out-dir", table, "--report-only"], capsys)
    assert code == 0 and "| 4 | gan | 1 (seeds 1) |" in text and "| 4 | topk | 0 |" in text
    assert "| 4 | topk | 1 | 10 | 50.0 | 75.0 | 0.200 |" in text  # the readable record of the unfinished run
    assert "Left out, args.json unreadable (so it cannot be told whose run it is): mog4_gan__2__" in text
    for at_epoch in ([], ["--at-epoch", "1"]):
        code, text, _ = cli(mnist.main, ["--table-only", *at_epoch, "--out-dir", runs], capsys)
        rows = [line for line in text.splitlines() if line.startswith("| 20 |")]
        assert code == 0 and len(rows) == 1 and "| 1 | 30 |" in rows[0], text
        assert "Left out, run files unreadable or incomplete: mnist_ssl_20__" in text


# ---------------------------------------------------------------------------------------------------------------
# 8. analysis/mog_update_direction.py
# ---------------------------------------------------------------------------------------------------------------
def test_8_update_direction_refuses_a_dcgan_checkpoint_an_unwritable_out_and_a_bad_number(tmp_path, capsys):
    import dcgan_cifar_topk as dc
    sys.path.insert(0, str(REPO / "analysis"))
    import mog_update_direction as analysis

    G, D = dc.Generator(), dc.Discriminator()
    dcgan = tmp_path / "dcgan" / "checkpoints" / "last.pt"
    dcgan.parent.mkdir(parents=True)
    args = vars(dc.parse_args(["--dataset", "fake"]))
    torch.save({"args": args, "G": G.state_dict(), "D": D.state_dict(),
                "opt_g": torch.optim.Adam(G.parameters()).state_dict(), "step": 4}, dcgan)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    import mog_topk
    mog_topk.main(["--n-modes", "9", "--hidden-dim", "16", "--batch-size", "16", "--iterations", "10",
                   "--eval-samples", "100", "--save-every", "10", "--device", "cpu", "--out-dir", str(tmp_path / "mog")])
    (mog,) = (tmp_path / "mog").glob("*/checkpoints/last.pt")
    cases = {"dcgan checkpoint": (["--checkpoint", dcgan, "--batch-size", "16"], "is not a mog_topk.py checkpoint"),
             "a good one, then a dcgan one": (["--checkpoint", mog, dcgan, "--batch-size", "16", "--out",
                                               tmp_path / "both"], "is not a mog_topk.py checkpoint"),
             "--out below a file": (["--checkpoint", dcgan, "--out", blocker / "out"], "--out"),
             "--batch-size ten": (["--checkpoint", dcgan, "--batch-size", "ten"], "invalid int value: 'ten'")}
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for name, (argv, fragment) in cases.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            common.run_cli(lambda: analysis.main([str(a) for a in argv]))
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (name, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------------
# 9. the benchmarks
# ---------------------------------------------------------------------------------------------------------------
def test_9_benchmark_mistakes_are_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    bench = {name: load(REPO / "benchmarks" / f"{name}.py", name) for name in ("bench_dcgan", "bench_metrics", "bench_mog")}
    (tmp_path / "a_file").write_text("x")
    cuda = "no CUDA GPU" if not torch.cuda.is_available() else None
    cases = {"dcgan --device cuda": ("bench_dcgan", ["--device", "cuda"], cuda),
             "dcgan --batch-size 0": ("bench_dcgan", ["--batch-size", "0"], "--batch-size must be at least 1"),
             "dcgan --json below a file": ("bench_dcgan", ["--device", "cpu", "--json", tmp_path / "a_file" / "r.json"],
                                           "--json"),
             "dcgan --json /proc": ("bench_dcgan", ["--device", "cpu", "--json", "/proc/no_such_dir/r.json"], "--json"),
             "metrics --device cuda": ("bench_metrics", ["--skip-fid", "--device", "cuda"], cuda),
             "metrics --repeats zero": ("bench_metrics", ["--repeats", "zero"], "invalid int value: 'zero'"),
             "metrics --repeats 0": ("bench_metrics", ["--repeats", "0"], "--repeats must be at least 1"),
             "mog --kinds nope": ("bench_mog", ["--kinds", "nope"], "invalid choice: 'nope'"),
             "mog --steps 0": ("bench_mog", ["--steps", "0"], "--steps and --repeats must be at least 1")}
    for name, (module, argv, fragment) in cases.items():
        if fragment is not None:  # refused before the benchmark printed (or ran) anything
            refused_here(bench[module].main, argv, capsys, fragment)
    assert (tmp_path / "a_file").read_text() == "x"


# ---------------------------------------------------------------------------------------------------------------
# 10. abbreviations, --cores beyond the machine, a unique temporary name for validated.json
# ---------------------------------------------------------------------------------------------------------------
def test_10_abbreviations_cores_and_the_validation_cache(runner, tmp_path, capsys):
    out = tmp_path / "out"
    refused_here(runner.main, ["--script", "mog_topk.py", "--seeds", "1", "--dry-run", "--out-dir", out, "--", "--resum",
                               tmp_path / "x.pt"], capsys, "--resum")
    refused_here(runner.main, ["--scrip", "mog_topk.py", "--out-dir", out], capsys, "unrecognized arguments: --scrip")
    assert not out.exists()
    cores = len(os.sched_getaffinity(0))
    code, text, err = cli(runner.main, ["--script", "mog_topk.py", "--seeds", "1", "--cores", "100000", "--dry-run",
                                        "--out-dir", out], capsys)
    assert code == 0 and text.strip().endswith(f"--threads {cores}") and err == [
        f"warning: --cores 100000 is more than the {cores} core(s) this process may use: using {cores}"]
    blocked = tmp_path / "blocked"
    (blocked / "sweep" / "validated.json.tmp").mkdir(parents=True)  # a fixed temporary name would be a folder here
    code, _, err = cli(runner.main, ["--script", "mog_topk.py", "--seeds", "1", "--slurm", "--slurm-gpus", "0",
                                     "--out-dir", blocked], capsys)
    assert code == 0 and err == [] and runner.read_json(blocked / "sweep" / "validated.json")


def test_10_resolved_values_the_sweep_sets_cannot_be_overridden(runner, tmp_path, monkeypatch):
    """However the script's parser reads its flags (abbreviations included), the values the runner and a preset set
    must be what it resolves: checked on the validator's answer."""
    answer = {"import_error": None, "cuda_count": 0,
              "results": [{"ok": True, "resolved": {"resume": "x.pt", "num_labels": 100, "threads": 1}}]}
    monkeypatch.setattr(runner.subprocess, "run", lambda cmd, **kw: Path(cmd[-1]).write_text(json.dumps(answer)))
    args = runner.argparse.Namespace(script=REPO / "mog_topk.py", python=sys.executable, out_dir=str(tmp_path),
                                     out_abs=str(tmp_path), devices=["cpu"], slurm=False, dry_run=True)
    with pytest.raises(runner.UserError, match="its flags set --resume"):
        runner.validate(args, [runner.Run(0, "gan", 1, [])], "cpu")
    answer["results"][0]["resolved"]["resume"] = None
    with pytest.raises(runner.UserError, match=r"--num-labels \(to 100\), which the sweep sets itself \(50"):
        runner.validate(args, [runner.Run(0, "gan", 1, [], expect={"num_labels": 50})], "cpu")


def test_ctrl_c_during_the_runners_start_up_is_one_line():
    """A Ctrl-C while sweeps/run.py still imports torch (the first seconds): one line, exit status 130. The
    interruption is made deterministic by an import hook that raises KeyboardInterrupt at `import common`."""
    code = ("import runpy, sys\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'common':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Hook())\n"
            f"sys.argv = [{str(RUNNER)!r}, '--help']\n"
            f"runpy.run_path({str(RUNNER)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "interrupted: during the start-up, before anything was written"
