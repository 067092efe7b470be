"""common.Run, the run plumbing of the four scripts, tested on tests/toy_run.py (a run of milliseconds).

Resume equals uninterrupted; resume only into the checkpoint's own run folder (a foreign folder stays byte for byte
unchanged); Ctrl-C and SIGTERM save and print the command that continues; a non-finite value stops naming its step;
a generator state from another device type is reseeded with a note; --track / --tensorboard are lazy and one line
when missing; the generic memory-fit check counts a meta-device step and names the flags.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import common
from conftest import REPO, assert_one_line_error, only_run_dir

sys.path.insert(0, str(REPO / "tests"))
toy = importlib.import_module("toy_run")


def run_toy(*flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(REPO / "tests" / "toy_run.py"), *map(str, flags)], env=env,
                          capture_output=True, text=True, timeout=120)


def weights(run_dir: Path):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def evals(run_dir: Path):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/w" in r]


def test_resume_gives_the_weights_and_evaluations_of_an_uninterrupted_run(tmp_path):
    toy.main(["--out-dir", tmp_path / "a", "--iterations", "20"])
    full = only_run_dir(tmp_path / "a")
    toy.main(["--out-dir", tmp_path / "b", "--iterations", "10"])
    cut = only_run_dir(tmp_path / "b")
    toy.main(["--out-dir", tmp_path / "b", "--iterations", "20", "--resume", cut / "checkpoints" / "last.pt"])
    for key, value in weights(full).items():
        assert torch.equal(value, weights(cut)[key]), key
    assert evals(full) == evals(cut) and len(evals(full)) == 4
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["resumed_note"] == "toy"


def test_resume_outside_a_run_folder_is_refused_and_touches_nothing(tmp_path, capsys):
    toy.main(["--out-dir", tmp_path / "runs", "--iterations", "5"])
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "last.pt").write_bytes((only_run_dir(tmp_path / "runs") / "checkpoints" / "last.pt").read_bytes())
    (backup / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    (backup / "summary.json").write_text("{}\n")
    before = {p: p.read_bytes() for p in backup.iterdir()}
    proc = run_toy("--iterations", "9", "--resume", backup / "last.pt")
    assert "not inside a run folder" in assert_one_line_error(proc)
    assert {p: p.read_bytes() for p in backup.iterdir()} == before
    # a checkpoints/ folder whose args.json is of another configuration is refused too
    (backup / "checkpoints").mkdir()
    (backup / "checkpoints" / "last.pt").write_bytes(before[backup / "last.pt"])
    (backup / "args.json").write_text(json.dumps(dict(vars(toy.parse_args([])), lr=0.5)))
    proc = run_toy("--iterations", "9", "--resume", backup / "checkpoints" / "last.pt")
    assert "its run folder was made with a different configuration (--lr 0.5 vs 0.01)" in assert_one_line_error(proc)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_and_print_the_command_that_continues(sig, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "toy_run.py"), "--out-dir", str(tmp_path),
                             "--iterations", "100000", "--sleep", "0.002", "--save-every", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("*/metrics.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped at step ") and "--resume" in line
    run_dir = only_run_dir(tmp_path)
    step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 0 < step < 100000
    command = line.split("continue with: ")[1].split()
    assert command[:2] == ["python", "toy_run.py"] and command[-1] == str(run_dir / "checkpoints" / "last.pt")


def test_a_non_finite_loss_stops_the_run_naming_its_step_and_the_last_good_checkpoint(tmp_path):
    proc = run_toy("--out-dir", tmp_path, "--nan-at", "8")
    line = assert_one_line_error(proc)
    assert "non-finite loss (nan) at step 8" in line and "checkpoints/last.pt" in line
    assert torch.load(only_run_dir(tmp_path) / "checkpoints" / "last.pt", weights_only=True)["step"] == 5


def test_a_generator_state_of_another_device_type_is_reseeded_with_a_note(tmp_path, capsys):
    toy.main(["--out-dir", tmp_path, "--iterations", "5"])
    path = only_run_dir(tmp_path) / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["gen"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}  # a CUDA generator's size
    common.save_checkpoint(path, state)
    toy.main(["--out-dir", tmp_path, "--iterations", "8", "--resume", path])
    assert "gen was saved on cuda, this run draws on cpu: reseeded" in capsys.readouterr().err


def test_a_checkpoint_that_predates_a_flag_says_so(tmp_path):
    toy.main(["--out-dir", tmp_path, "--iterations", "5"])
    path = only_run_dir(tmp_path) / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["args"]["lr"]
    common.save_checkpoint(path, state)
    assert "predates --lr" in assert_one_line_error(run_toy("--iterations", "8", "--resume", path))


def test_track_logs_to_wandb_lazily_and_missing_packages_are_one_line(tmp_path, monkeypatch):
    logged = []
    stand_in = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda d, step: logged.append((step, d)), finish=lambda: logged.append("finish"), kw=kw))
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    toy.main(["--out-dir", tmp_path / "w", "--iterations", "6", "--track"])
    assert (3, {"step": 3, "k": 1, "loss": pytest.approx(logged[0][1]["loss"]), "it_per_s": logged[0][1]["it_per_s"]}) \
        == logged[0] and logged[-1] == "finish"
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(common.UserError, match="--track needs the wandb package"):
        toy.main(["--out-dir", tmp_path / "x", "--track"])
    assert not (tmp_path / "x").exists()


def test_check_fits_counts_a_meta_step_and_names_the_flags(monkeypatch):
    def step(width):
        def build():
            m = torch.nn.Sequential(torch.nn.Linear(1000, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
            m(torch.randn(64, 1000))
            return [m]
        return build

    monkeypatch.setattr(common, "device_memory", lambda device: 200e6)
    common.check_fits(torch.device("cpu"), "--width", step(1000))  # ~4 MB of weights x 4, activations
    with pytest.raises(common.UserError, match=r"^--width, --batch need at least 0\.3\d+ GB"):
        common.check_fits(torch.device("cpu"), "--width, --batch", step(20000))  # 80 MB of weights x 4
    with pytest.raises(common.UserError, match="--width need at least more than 2\\*\\*63 bytes"):
        common.check_fits(torch.device("cpu"), "--width", step(10**19))
    with pytest.raises(common.UserError, match="together, --width; the data"):
        common.check_fits(torch.device("cpu"), "--width", step(1000), {"the data": 190e6})
