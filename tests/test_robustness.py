"""Issue 13: no traceback on any user input or fault, no bad "good" checkpoint, one writer per run folder.

One test (or a parametrized family) per numbered item of the issue; each fails on the code before its fix. The
contract checked everywhere: exit status 2, exactly one stderr line starting with `error:`, no traceback, nothing
new under --out-dir (or in the resumed run folder) when the refusal comes before training. Most cases run the
script's main() in this process through common.run_cli (the command line's path) to stay fast; the lock and the
disk-full cases use real subprocesses.
"""

import errno
import gzip
import io
import json
import os
import pickle
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import REPO, assert_one_line_error, only_run_dir, run_script, write_cifar10, write_mnist

import common
import dcgan_cifar_topk
import improved_gan_cifar
import improved_gan_mnist
import mog_topk
from common import UserError

MODULES = {"mog_topk.py": mog_topk, "dcgan_cifar_topk.py": dcgan_cifar_topk,
           "improved_gan_mnist.py": improved_gan_mnist, "improved_gan_cifar.py": improved_gan_cifar}
SCRIPTS = list(MODULES)
# tiny runs: mog 20 iterations (a checkpoint every 5); dcgan 2 epochs of 2 steps; mnist 2 epochs of 4 steps;
# cifar 6 steps, 4 per epoch (checkpoints at step 4 and at the end)
TINY = {
    "mog_topk.py": ["--hidden-dim", "16", "--batch-size", "32", "--iterations", "20", "--eval-samples", "200",
                    "--device", "cpu", "--log-every", "5", "--eval-every", "10", "--save-every", "5"],
    "dcgan_cifar_topk.py": ["--dataset", "fake", "--fake-size", "16", "--ngf", "8", "--ndf", "8", "--batch-size", "8",
                            "--epochs", "2", "--no-fid", "--device", "cpu", "--save-every", "1", "--log-every", "1",
                            "--grid-size", "4"],
    "improved_gan_mnist.py": ["--dataset", "fake", "--fake-size", "100", "--batch-size", "25", "--num-labels", "20",
                              "--epochs", "2", "--device", "cpu", "--save-every", "1"],
    "improved_gan_cifar.py": ["--dataset", "fake", "--fake-size", "21", "--batch-size", "5", "--num-labels", "10",
                              "--init-size", "10", "--grid-size", "4", "--device", "cpu", "--epochs", "2",
                              "--max-steps", "6", "--save-every", "1"],
}
FIRST_SAVE = {"mog_topk.py": 5, "dcgan_cifar_topk.py": 2, "improved_gan_mnist.py": 4, "improved_gan_cifar.py": 4}
# a function each script calls once per training step (to inject a Ctrl-C in the middle of a run)
STEP_HOOK = {"mog_topk.py": "sample_real", "dcgan_cifar_topk.py": "generator_loss",
             "improved_gan_mnist.py": "labeled_loss", "improved_gan_cifar.py": "unsupervised_loss"}


@pytest.fixture(autouse=True)
def _one_thread_and_sigint_restored():
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, handler)


def cli(script, argv, capsys):
    """main(argv) of `script` through common.run_cli, as on the command line: (exit status, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        common.run_cli(lambda: MODULES[script].main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return info.value.code, [line for line in err.splitlines() if line.strip()]


def refused(script, argv, capsys, *fragments) -> str:
    """Assert the contract of a user mistake: status 2, one `error:` line holding every fragment. Returns it."""
    code, err = cli(script, argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def tree(path: Path):
    """Every file and folder under `path` with its size (None when `path` does not exist)."""
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.stat().st_size if p.is_file() else -1) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished tiny run of every script (in this process): script -> run folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done = {}
        for script in SCRIPTS:
            out = tmp_path_factory.mktemp(script[:-3])
            MODULES[script].main([*TINY[script], "--out-dir", str(out)])
            done[script] = only_run_dir(out)
        return done
    finally:
        torch.set_num_threads(threads)


def copy_run(runs, script, tmp_path) -> Path:
    """A copy of the script's finished run folder (tests damage checkpoints in copies only)."""
    target = tmp_path / "copy" / runs[script].name
    shutil.copytree(runs[script], target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# 1. an empty last.pt
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_1_empty_checkpoint_is_one_line(script, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    before = tree(tmp_path)
    refused(script, [*TINY[script], "--resume", ckpt, "--out-dir", tmp_path / "runs"], capsys,
            str(ckpt), "not a complete checkpoint")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# 2. a damaged checkpoint (64 bytes flipped in the middle) is refused, not resumed
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_2_flipped_bytes_fail_the_integrity_check(script, runs, tmp_path, capsys):
    run = copy_run(runs, script, tmp_path)
    ckpt = run / "checkpoints" / "last.pt"
    data = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as z:  # the middle of the largest tensor's bytes: torch.load would read it happily
        record = max((info for info in z.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26: record.header_offset + 30])
    middle = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    data[middle: middle + 64] = bytes(255 - b for b in data[middle: middle + 64])
    ckpt.write_bytes(bytes(data))
    before = tree(run)
    refused(script, [*TINY[script], "--resume", ckpt], capsys, str(ckpt), "fails the CRC-32 check")
    assert tree(run) == before


# ---------------------------------------------------------------------------------------------------------------
# 3. crafted but loadable checkpoints: structure, shapes, step, RNG and finiteness are validated
# ---------------------------------------------------------------------------------------------------------------
def _first_float(state_dict):
    return next(key for key, value in state_dict.items() if value.is_floating_point() and value.numel())


def _main_net(script):
    return "G" if script in ("mog_topk.py", "dcgan_cifar_topk.py") else "D"


CRAFTED = {
    "missing net": (lambda s, script: s.pop(_main_net(script)), "has no"),
    "negative step": (lambda s, script: s.update(step=-50), "step -50"),
    "non-finite weights": (lambda s, script: s[_main_net(script)][_first_float(s[_main_net(script)])].fill_(
        float("nan")), "non-finite values"),
    "malformed rng": (lambda s, script: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
                      "random-generator state"),
    "args not a dict": (lambda s, script: s.update(args=[1, 2]), "not a checkpoint written by these scripts"),
    "wrong shape": (lambda s, script: s[_main_net(script)].update(
        {_first_float(s[_main_net(script)]): torch.zeros(3, 99)}), "has shape (3, 99)"),
    "optimizer moment shape": (lambda s, script: s["opt_d"]["state"][0].update(exp_avg=torch.zeros(7)),
                               "does not fit this run"),
}


@pytest.mark.parametrize("script, case", [(s, c) for s in SCRIPTS for c in CRAFTED
                                          if s == "mog_topk.py" or c in ("missing net", "non-finite weights",
                                                                         "wrong shape", "malformed rng")])
def test_3_crafted_checkpoints_are_refused_in_one_line(script, case, runs, tmp_path, capsys):
    run = copy_run(runs, script, tmp_path)
    ckpt = run / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    mutate, message = CRAFTED[case]
    mutate(state, script)
    torch.save(state, ckpt)  # a well-formed zip: only the content is wrong
    before = tree(run)
    refused(script, [*TINY[script], "--resume", ckpt], capsys, message)
    assert tree(run) == before


# ---------------------------------------------------------------------------------------------------------------
# 4. weights that diverged in the update before a save are never saved (nor called a good checkpoint)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_4_non_finite_weights_are_never_saved(script, tmp_path, capsys, monkeypatch):
    real_save, saves = common.save_checkpoint, []

    def diverged_before_second_save(path, state):
        saves.append(state["step"])
        if len(saves) == 2:  # the update before this save diverged: the live weights are NaN now
            net = state[_main_net(script)]
            net[_first_float(net)].fill_(float("nan"))
        return real_save(path, state)

    monkeypatch.setattr(common, "save_checkpoint", diverged_before_second_save)
    out = tmp_path / "runs"
    line = refused(script, [*TINY[script], "--out-dir", out], capsys, "non-finite", "last good checkpoint")
    ckpt = only_run_dir(out) / "checkpoints" / "last.pt"
    assert str(ckpt) in line
    state = common.load_checkpoint(ckpt)
    assert state["step"] == FIRST_SAVE[script] == saves[0] and common.nonfinite_entries(state) == []


def test_4_mnist_names_no_checkpoint_before_the_first_one(tmp_path, capsys, monkeypatch):
    real = improved_gan_mnist.labeled_loss
    monkeypatch.setattr(improved_gan_mnist, "labeled_loss", lambda *a: real(*a) * float("nan"))
    out = tmp_path / "runs"
    refused("improved_gan_mnist.py", [*TINY["improved_gan_mnist.py"], "--out-dir", out], capsys,
            "non-finite loss_lab (nan) at step 1", "last good checkpoint: none yet")
    assert not (only_run_dir(out) / "checkpoints" / "last.pt").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. one writer per run folder
# ---------------------------------------------------------------------------------------------------------------
def test_5_two_writers_of_one_checkpoint_never_share_a_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    real_replace, raced = os.replace, []

    def racing_replace(src, dst):  # a second process saves the same checkpoint just before this rename
        if not raced:
            raced.append(1)
            common.save_checkpoint(path, {"args": {}, "step": 2, "w": torch.ones(3)})
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    common.save_checkpoint(path, {"args": {}, "step": 1, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert common.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_5_run_folders_are_created_exclusively(tmp_path, monkeypatch):
    """Another process creates the folder this run chose, between any check and the creation: the run must get a
    folder of its own, never share that one (simulated deterministically: the competitor wins the first mkdir)."""
    import argparse
    monkeypatch.setattr(common.time, "time", lambda: 1_700_000_000.0)
    args = argparse.Namespace(out_dir=str(tmp_path / "runs"), exp_name="exp", seed=1)
    contested, real_mkdir = tmp_path / "runs" / "exp__1__1700000000", os.mkdir

    def competitor_first(path, *a, **k):
        if Path(path) == contested and not contested.exists():
            real_mkdir(path)  # the other process's folder, created a moment earlier
            (contested / "theirs").write_text("")
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", competitor_first)
    mine = common.make_run_dir(args)
    assert mine != contested and mine.parent == contested.parent
    assert (mine / "args.json").is_file() and not (mine / "theirs").exists()
    assert [p.name for p in contested.iterdir()] == ["theirs"]  # nothing of this run went into theirs


def test_5_a_second_writer_is_refused_while_the_first_finishes(runs, tmp_path):
    run = copy_run(runs, "mog_topk.py", tmp_path)
    ckpt = run / "checkpoints" / "last.pt"
    flags = [*TINY["mog_topk.py"], "--iterations", "200", "--eval-every", "200", "--save-every", "100",
             "--log-every", "100", "--resume", str(ckpt)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, str(REPO / "mog_topk.py"), *flags], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in first.stdout:  # "run folder: ..." is printed once the folder is locked
            if line.startswith("run folder"):
                break
        os.kill(first.pid, signal.SIGSTOP)  # the first writer holds the lock and is in the middle of its run
        try:
            second = run_script("mog_topk.py", *flags, timeout=300)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    line = assert_one_line_error(second)
    assert second.returncode == 2 and line.startswith("error: ") and "in use by another process" in line, line
    assert f"pid {first.pid} " in line, line  # names the holder
    assert first.returncode == 0, err
    state = common.load_checkpoint(ckpt)
    assert state["step"] == 200 and common.nonfinite_entries(state) == []
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss_d" in line]
    assert steps == sorted(set(steps)) and steps[-1] == 200  # one writer: no duplicated or interleaved lines


# ---------------------------------------------------------------------------------------------------------------
# 6. disk full during a checkpoint write; Ctrl-C
# ---------------------------------------------------------------------------------------------------------------
def _full_disk(obj, f, *args, **kwargs):
    data = b"PK\x03\x04 half a checkpoint"
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as g:
            g.write(data)
    else:
        f.write(data)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_6_disk_full_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.save_checkpoint(path, {"args": {}, "step": 1, "w": torch.ones(4)})
    monkeypatch.setattr(torch, "save", _full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is kept"):
        common.save_checkpoint(path, {"args": {}, "step": 2, "w": torch.zeros(4)})
    monkeypatch.undo()
    state = common.load_checkpoint(path)
    assert state["step"] == 1 and common.nonfinite_entries(state) == []
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_6_a_real_write_failure_is_one_line_with_its_reason(tmp_path):
    """torch.save's C++ writer reports a failed write as 'unexpected pos 704 vs 598'; the reason is kept."""
    code = ("import resource, signal, torch, common\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            f"common.run_cli(lambda: common.save_checkpoint({str(tmp_path / 'last.pt')!r}, "
            "{'args': {}, 'step': 1, 'w': torch.zeros(10000)}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = assert_one_line_error(proc)
    assert proc.returncode == 2 and "cannot write checkpoint" in line and "File too large" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_6_disk_full_in_a_run_is_one_line_and_keeps_the_last_checkpoint(script, tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def second_write_fails(obj, f, *args, **kwargs):
        calls.append(1)
        return _full_disk(obj, f) if len(calls) == 2 else real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_write_fails)
    out = tmp_path / "runs"
    refused(script, [*TINY[script], "--out-dir", out], capsys, "cannot write checkpoint", "No space left on device")
    monkeypatch.undo()
    run = only_run_dir(out)
    state = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == FIRST_SAVE[script] and common.nonfinite_entries(state) == []
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def _ctrl_c_at_third_step(script, monkeypatch):
    module, name = MODULES[script], STEP_HOOK[script]
    real, calls = getattr(module, name), []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of step 3
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, hooked)


@pytest.mark.parametrize("script", SCRIPTS)
def test_6_ctrl_c_saves_a_checkpoint_and_prints_how_to_resume(script, tmp_path, capsys, monkeypatch):
    _ctrl_c_at_third_step(script, monkeypatch)
    out = tmp_path / "runs"
    code, err = cli(script, [*TINY[script], "--out-dir", out], capsys)
    ckpt = only_run_dir(out) / "checkpoints" / "last.pt"
    assert code == 130 and len(err) == 1, err
    assert err[0].startswith(f"interrupted: stopped at step 3, checkpoint saved to {ckpt}; continue with: python "
                             f"{script} "), err[0]
    assert err[0].endswith(f"--resume {ckpt}")
    state = common.load_checkpoint(ckpt)
    assert state["step"] == 3 and common.nonfinite_entries(state) == []
    assert not (ckpt.parent.parent / "summary.json").exists()


def test_6_the_resume_line_of_ctrl_c_continues_exactly(tmp_path, capsys, monkeypatch):
    script = "mog_topk.py"
    mog_topk.main([*TINY[script], "--out-dir", str(tmp_path / "whole")])
    with monkeypatch.context() as m:
        _ctrl_c_at_third_step(script, m)
        code, err = cli(script, [*TINY[script], "--out-dir", tmp_path / "cut"], capsys)
    assert code == 130
    command = shlex.split(err[0].split("continue with: ", 1)[1])
    assert command[:2] == ["python", script]
    mog_topk.main(command[2:])
    whole, cut = only_run_dir(tmp_path / "whole"), only_run_dir(tmp_path / "cut")
    np.testing.assert_array_equal(np.load(whole / "samples.npz")["samples"], np.load(cut / "samples.npz")["samples"])


# ---------------------------------------------------------------------------------------------------------------
# 7. a crafted metrics.jsonl
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["a line 42", "a folder"])
def test_7_crafted_metrics_file_is_one_line_on_resume(damage, runs, tmp_path, capsys):
    run = copy_run(runs, "mog_topk.py", tmp_path)
    metrics_file = run / "metrics.jsonl"
    if damage == "a folder":
        metrics_file.unlink()
        metrics_file.mkdir()
    else:
        lines = metrics_file.read_text().splitlines()
        metrics_file.write_text("\n".join([lines[0], "42", *lines[1:]]) + "\n")
    before = tree(run)
    refused("mog_topk.py", [*TINY["mog_topk.py"], "--resume", run / "checkpoints" / "last.pt"], capsys,
            str(metrics_file))
    assert tree(run) == before


# ---------------------------------------------------------------------------------------------------------------
# 8. seeds outside what numpy accepts
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, flag, value", [(s, "--seed", v) for s in SCRIPTS for v in ("-1", "99999999999")]
                         + [(s, "--seed-data", "-1") for s in ("improved_gan_mnist.py", "improved_gan_cifar.py")])
def test_8_seed_out_of_range_is_one_line(script, flag, value, tmp_path, capsys):
    out = tmp_path / "runs"
    refused(script, [*TINY[script], flag, value, "--out-dir", out], capsys, f"{flag} must be between 0 and")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 9. sizes that cannot be allocated: refused up front, naming what does not fit
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, flags, named", [
    ("mog_topk.py", ["--batch-size", str(10**13)], "--batch-size"),
    ("mog_topk.py", ["--eval-samples", str(10**13)], "--eval-samples"),
    ("mog_topk.py", ["--hidden-dim", str(10**8)], "--hidden-dim"),
    ("dcgan_cifar_topk.py", ["--ngf", str(10**9)], "--ngf"),
    ("improved_gan_mnist.py", ["--minibatch-disc", "--mbd-kernels", str(10**9)], "--mbd-kernels"),
    ("improved_gan_cifar.py", ["--minibatch-disc", "--mbd-kernels", str(10**9)], "--mbd-kernels"),
])
def test_9_sizes_that_cannot_be_allocated_are_refused_up_front(script, flags, named, tmp_path, capsys):
    out = tmp_path / "runs"
    refused(script, [*TINY[script], *flags, "--out-dir", out], capsys, named, "of memory")
    assert not out.exists()


def test_9_run_cli_reports_allocation_failures_and_full_disks_in_one_line(capsys):
    for fault, expected in ((lambda: torch.empty(2**62, dtype=torch.uint8), "error: out of memory"),
                            (lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", "x.json")),
                             "error: No space left on device: x.json")):
        with pytest.raises(SystemExit) as info:
            common.run_cli(fault)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith(expected), err


# ---------------------------------------------------------------------------------------------------------------
# 10. values the float32 data cannot represent
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, named", [(["--std", "1e300"], "--std"), (["--std", "1e-300"], "--std"),
                                          (["--grid-spacing", "1e308"], "--grid-spacing"),
                                          (["--grid-spacing", "1e19"], "overflow float32")])
def test_10_values_beyond_float32_are_refused_up_front(flags, named, tmp_path, capsys):
    out = tmp_path / "runs"
    refused("mog_topk.py", [*TINY["mog_topk.py"], *flags, "--out-dir", out], capsys, named)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 11. inf / nan in any float flag
# ---------------------------------------------------------------------------------------------------------------
def _parser(script, monkeypatch):
    """The argparse parser the script's parse_args builds (recorded when it parses)."""
    import argparse
    seen, real = [], argparse.ArgumentParser.parse_args

    def record(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", record)
        MODULES[script].parse_args([])
    return seen[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_11_every_float_flag_refuses_inf_and_nan(script, monkeypatch, capsys):
    parser = _parser(script, monkeypatch)
    flags = [a.option_strings[0] for a in parser._actions if a.type in (float, getattr(common, "finite_float", float))]
    assert len(flags) >= 7, flags
    for flag in flags:
        for value in ("inf", "-inf", "nan"):
            with pytest.raises(SystemExit) as info:
                parser.parse_args([flag, value])
            err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: argument {flag}"), err


@pytest.mark.parametrize("script, flag", [("dcgan_cifar_topk.py", "--lr-g"), ("dcgan_cifar_topk.py", "--hist-avg"),
                                          ("improved_gan_cifar.py", "--lr"), ("improved_gan_cifar.py", "--input-noise")])
def test_11_infinite_values_from_the_issue(script, flag, tmp_path, capsys):
    out = tmp_path / "runs"
    refused(script, [*TINY[script], flag, "inf", "--out-dir", out], capsys, flag, "finite")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 12. argparse's own errors: one line (the usage block is for --help)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, flags, fragment", [
    *[(s, ["--seed", "abc"], "--seed") for s in SCRIPTS],
    *[(s, ["--no-such-flag"], "unrecognized arguments: --no-such-flag") for s in SCRIPTS],
    ("dcgan_cifar_topk.py", ["--sample-bn", "median"], "invalid choice"),
    ("improved_gan_mnist.py", ["--amp", "fp8"], "invalid choice"),
    ("improved_gan_cifar.py", ["--model", "big"], "invalid choice"),
    ("mog_topk.py", ["--iterations"], "expected one argument"),
])
def test_12_argparse_errors_are_one_error_line(script, flags, fragment, tmp_path, capsys):
    out = tmp_path / "runs"
    line = refused(script, [*flags, "--out-dir", out], capsys, fragment, "--help")
    assert "usage:" not in line
    assert not out.exists()


def test_12_help_still_prints_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as info:
        mog_topk.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and len(text.splitlines()) > 30 and "--grid-spacing" in text


def test_12_command_line_end_to_end(tmp_path):
    proc = run_script("mog_topk.py", "--seed", "abc", "--out-dir", tmp_path / "runs")
    line = assert_one_line_error(proc)
    assert proc.returncode == 2 and line.startswith("error: argument --seed: invalid int value: 'abc'"), line


# ---------------------------------------------------------------------------------------------------------------
# 13. data files that lie, --data-dir that is a file, failed downloads and extractions
# ---------------------------------------------------------------------------------------------------------------
def _rewrite_idx(path, array, magic):
    header = struct.pack(">II", magic, len(array)) + b"".join(struct.pack(">I", d) for d in array.shape[1:])
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("damage, message", [
    ("fewer labels", "images but"), ("label 12", "outside 0-9"), ("32x32 images", "not 28x28")])
def test_13_mnist_files_that_do_not_describe_one_data_set(damage, message, tmp_path):
    root = write_mnist(tmp_path / "mnist", per_class_train=2, per_class_test=1)
    raw = root / "MNIST" / "raw"
    if damage == "32x32 images":
        _rewrite_idx(raw / "train-images-idx3-ubyte", np.zeros((20, 32, 32)), 2051)
    else:
        labels = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8).copy()
        if damage == "fewer labels":
            labels = labels[:-3]
        else:
            labels[5] = 12
        _rewrite_idx(raw / "train-labels-idx1-ubyte", labels, 2049)
    with pytest.raises(UserError, match=message) as info:
        common.load_mnist(root, train=True, download=False)
    assert "\n" not in str(info.value)


def test_13_a_32x32_mnist_is_refused_before_the_run_folder(tmp_path, capsys):
    root = write_mnist(tmp_path / "mnist", per_class_train=3, per_class_test=1)
    _rewrite_idx(root / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((30, 32, 32)), 2051)
    out = tmp_path / "runs"
    refused("improved_gan_mnist.py", ["--data-dir", root, "--no-download", "--device", "cpu", "--num-labels", "10",
                                      "--batch-size", "10", "--out-dir", out], capsys, "not 28x28")
    assert not out.exists()


@pytest.mark.parametrize("label", [15, -1])
def test_13_cifar_labels_outside_0_to_9(label, tmp_path):
    root = write_cifar10(tmp_path / "cifar", per_class_train=1, per_class_test=1)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d[b"labels"][0] = label
    with open(batch, "wb") as f:
        pickle.dump(d, f, protocol=2)
    with pytest.raises(UserError, match="outside 0-9"):
        common.load_cifar10(root, train=True, download=False)


@pytest.mark.parametrize("script", ["dcgan_cifar_topk.py", "improved_gan_cifar.py", "improved_gan_mnist.py"])
def test_13_data_dir_that_is_a_file_with_download_on(script, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("not a folder")
    out = tmp_path / "runs"
    flags = ["--data-dir", data, "--device", "cpu", "--out-dir", out]
    if script == "dcgan_cifar_topk.py":
        flags.append("--no-fid")
    refused(script, flags, capsys, f"--data-dir {data} is a file")
    assert not out.exists() and data.read_text() == "not a folder"


def test_13_failed_downloads_leave_no_folder_behind(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils
    from torchvision.datasets import MNIST

    def half_download(url, root, filename=None, md5=None, **kwargs):
        (Path(root) / (filename or "part")).write_bytes(b"half")
        raise OSError("network is unreachable")

    def half_mnist_download(self):
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        (Path(self.raw_folder) / "train-images-idx3-ubyte.gz").write_bytes(b"half")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tv_utils, "download_url", half_download)
    monkeypatch.setattr(MNIST, "download", half_mnist_download)
    with pytest.raises(UserError, match="download failed"):
        common.load_cifar10(tmp_path / "new" / "data", download=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "existing").mkdir()
    with pytest.raises(UserError, match="download failed"):
        common.load_mnist(tmp_path / "existing", download=True)
    assert list((tmp_path / "existing").iterdir()) == []


def test_13_truncated_archive_leaves_no_partial_extraction(tmp_path):
    source = write_cifar10(tmp_path / "src", per_class_train=1, per_class_test=1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    with pytest.raises(UserError, match="cannot extract"):
        common.load_cifar10(root, train=True, download=False)
    assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]
    # the complete archive extracts and loads
    (root / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    x, y = common.load_cifar10(root, train=True, download=False)
    assert x.shape == (10, 3, 32, 32) and sorted(p.name for p in root.iterdir()) == [
        "cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert gzip.decompress(buffer.getvalue())  # (the archive itself was a real gzip)


# ---------------------------------------------------------------------------------------------------------------
# 14. an --out-dir that cannot receive run folders
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where", ["a file", "under a file", "/proc"])
def test_14_out_dir_that_cannot_be_written(script, where, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = {"a file": blocker, "under a file": blocker / "runs", "/proc": Path("/proc/no_such_dir_for_tests/runs")}[where]
    if where == "/proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc")
    before = tree(tmp_path)
    refused(script, [*TINY[script], "--out-dir", out], capsys, "--out-dir")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# 15. --fake-size without --dataset fake
# ---------------------------------------------------------------------------------------------------------------
def test_15_cifar_fake_size_needs_the_fake_dataset(tmp_path, capsys):
    data = write_cifar10(tmp_path / "cifar")
    out = tmp_path / "runs"
    refused("improved_gan_cifar.py", ["--data-dir", data, "--no-download", "--fake-size", "100", "--device", "cpu",
                                      "--out-dir", out], capsys, "--fake-size only applies with --dataset fake")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Also: one final record per run (dcgan), EMA warm-up with raw and EMA errors side by side, sampling with batch
# statistics, minibatch discrimination's initial values
# ---------------------------------------------------------------------------------------------------------------
def test_dcgan_resumed_max_steps_run_has_one_final_record(tmp_path, monkeypatch):
    import metrics

    sampled = []

    def cheap_fid(sample_fn, n, mu, sigma, inception, batch_size=250, device=None):
        images = sample_fn(n)  # the sampling path runs (here with --sample-bn batch)
        sampled.append(images.shape[0])
        return {"fid": float(images.abs().mean()), "is_mean": 1.0, "is_std": 0.0}

    monkeypatch.setattr(metrics, "load_inception", lambda *a, **k: None)
    monkeypatch.setattr(metrics, "reference_statistics", lambda *a, **k: (np.zeros(2), np.eye(2)))
    monkeypatch.setattr(metrics, "evaluate_generator", cheap_fid)
    flags = [*TINY["dcgan_cifar_topk.py"], "--fid", "--fid-samples", "10", "--fid-samples-final", "12",
             "--eval-every", "1", "--sample-bn", "batch", "--out-dir", str(tmp_path / "runs")]
    flags.remove("--no-fid")
    dcgan_cifar_topk.main([*flags, "--max-steps", "3"])  # stopped inside epoch 2, with a "final" evaluation
    run = only_run_dir(tmp_path / "runs")
    dcgan_cifar_topk.main([*flags, "--resume", str(run / "checkpoints" / "last.pt")])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finals = [r for r in records if r.get("final")]
    assert len(finals) == 1 and finals[0]["step"] == 4 and finals[0]["fid_samples"] == 12
    assert [r["step"] for r in records if "loss_d" in r] == [1, 2, 3, 4]  # every loss line averages one step
    assert sampled == [10, 12, 10, 12]


def test_ema_warmup_is_tensorflows_num_updates_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = common.EMA(model, 0.9999, warmup=True)
    for t in range(4):
        d = min(0.9999, (1 + t) / (10 + t))
        assert ema.current_decay() == pytest.approx(d)
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        previous = ema.module.weight.clone()
        ema.update(model)
        torch.testing.assert_close(ema.module.weight, d * previous + (1 - d) * model.weight)
    assert ema.num_updates == 4
    ema.num_updates = 89_989
    assert ema.current_decay() < 0.9999
    ema.num_updates = 89_990
    assert ema.current_decay() == 0.9999  # from here on, the plain average
    assert common.EMA(model, 0.9999).current_decay() == 0.9999  # without warm-up: constant


@pytest.mark.parametrize("script", ["improved_gan_mnist.py", "improved_gan_cifar.py"])
def test_ema_warmup_on_and_raw_and_ema_errors_side_by_side(script, runs):
    run = runs[script]
    summary = json.loads((run / "summary.json").read_text())
    keys = ("test_err_ema", "test_err_raw") if script == "improved_gan_mnist.py" else ("test_error", "test_error_raw")
    assert all(key in summary for key in keys), summary
    state = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["args"]["ema_warmup"] is True and state["ema_updates"] == state["step"]
    # with warm-up, a few updates already move the average most of the way to D (decay 0.1, 0.18, 0.25, ...)
    D, ema = state["D"], state["ema"]
    moved = [(ema[k] - D[k]).abs().max() / (D[k].abs().max() + 1e-12) for k in D if D[k].is_floating_point()]
    assert max(moved) < 0.5


def test_cifar_final_line_shows_both_test_errors(tmp_path, capsys):
    improved_gan_cifar.main([*TINY["improved_gan_cifar.py"], "--max-steps", "1", "--out-dir", str(tmp_path)])
    final = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert len(final) == 1 and "test_error=" in final[0] and "test_error_raw=" in final[0]


def test_dcgan_sample_bn_batch_uses_batch_statistics_and_keeps_running_averages():
    torch.manual_seed(0)
    G = dcgan_cifar_topk.Generator(nz=8, ngf=4)
    dcgan_cifar_topk.dcgan_init(G)
    G.train()(torch.randn(16, 8))  # running statistics away from their initial values
    before = {k: v.clone() for k, v in G.state_dict().items()}
    z = torch.randn(6, 8)
    args = dcgan_cifar_topk.parse_args(["--sample-bn", "batch"])
    batch_mode = dcgan_cifar_topk.sample(G, z, args, None)
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())  # nothing changed
    assert all(m.training for m in G.modules())  # back in training mode
    reference = dcgan_cifar_topk.Generator(nz=8, ngf=4)
    reference.load_state_dict(before)
    with torch.no_grad():
        running = dcgan_cifar_topk.sample(G, z, dcgan_cifar_topk.parse_args([]), None)
        assert torch.equal(running, reference.eval()(z))  # the default: the running statistics
        torch.testing.assert_close(batch_mode, reference.train()(z))  # = a training-mode forward
        assert not torch.allclose(running, batch_mode, atol=1e-3)


def test_cifar_sample_bn_running_keeps_the_official_running_averages():
    torch.manual_seed(0)
    bn = improved_gan_cifar.BatchNormShift(3, track_running_stats=True)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(8, 3) * 2 + 1
    bn.train()(x)
    mean, var = 0.1 * x.mean(0), 0.9 + 0.1 * x.var(0, unbiased=True)  # official 0.9 old + 0.1 batch, from 0 / 1
    torch.testing.assert_close(bn.avg_batch_mean, mean)
    torch.testing.assert_close(bn.avg_batch_var, var)
    torch.testing.assert_close(bn.eval()(x), (x - mean) / torch.sqrt(1e-6 + var) + bn.bias)
    plain = improved_gan_cifar.BatchNormShift(3)
    assert list(plain.buffers()) == [] and torch.equal(plain.eval()(x), plain.train()(x))
    keys = improved_gan_cifar.Generator(running_stats=True).state_dict()
    assert "norm0.avg_batch_mean" in keys and "norm0.avg_batch_mean" not in improved_gan_cifar.Generator().state_dict()


@pytest.mark.parametrize("script, flags", [("dcgan_cifar_topk.py", ["--vbn", "--sample-bn", "batch"]),
                                           ("improved_gan_cifar.py", ["--vbn", "--sample-bn", "running"])])
def test_sample_bn_needs_batch_norm(script, flags, tmp_path, capsys):
    refused(script, [*TINY[script], *flags, "--out-dir", tmp_path / "runs"], capsys, "--sample-bn")


def test_minibatch_discrimination_starts_as_openais_weight_normalised_tensor():
    torch.manual_seed(0)
    layer = common.MinibatchDiscrimination(50, kernels=7, kernel_dim=3)
    torch.testing.assert_close(layer.T.norm(dim=0), torch.ones(21))  # W = θ / ||θ|| per column at init
    assert torch.equal(layer.bias.detach(), torch.full((7,), -1.0))
    cosines = (layer.T.t() @ layer.T).fill_diagonal_(0)
    assert cosines.abs().max() < 0.8  # 21 random directions, not one
