"""The presets sweeps/mog_table1.py and sweeps/mnist_ssl.py run through sweeps/run.py's engine (run_jobs): run folders
made by the pre-engine mog_table1.py are skipped when finished and resumed when interrupted (to the uninterrupted
result), a folder made with other flags is refused before anything starts, and mnist_ssl.py's runs, grouping and
device handling. Tiny runs only: every script process imports torch."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np

from conftest import REPO, assert_one_line_error, write_mnist

import common

TIMEOUT = 600
TINY_MOG = ["--hidden-dim", "8", "--batch-size", "16", "--eval-samples", "100", "--eval-every", "10", "--log-every", "10",
            "--save-every", "10"]


_PRESETS: dict = {}


def run(*argv, timeout=TIMEOUT):
    """`python argv...`. A preset (sweeps/*.py) runs its main in this process through common.run_cli, as its command
    line does (a new interpreter would spend seconds importing torch); the runs it starts are processes as always."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    path = Path(argv[0])
    if path.parent != REPO / "sweeps":
        return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if path not in _PRESETS:
        spec = importlib.util.spec_from_file_location(f"preset_{path.stem}", path)
        _PRESETS[path] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_PRESETS[path])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), mock.patch.dict(os.environ, env):
        try:
            common.run_cli(lambda: sys.exit(_PRESETS[path].main([str(a) for a in argv[1:]])))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(map(str, argv)), code, out.getvalue(), err.getvalue())


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def journal(folder):
    path = folder / "sweep" / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def old_preset_run(out, modes, variant, seed, iterations, extra):
    """A run exactly as the pre-engine mog_table1.py started it (its run_cell argv, --keep-checkpoints on)."""
    variant_flags = {"gan": [], "topk": ["--topk"]}[variant]
    ok(run(REPO / "mog_topk.py", "--n-modes", modes, "--seed", seed, "--iterations", iterations, "--out-dir", out,
           "--exp-name", f"mog{modes}_{variant}", "--device", "cpu", "--threads", 1, *variant_flags,
           "--keep-checkpoints", *extra))
    (folder,) = out.glob(f"mog{modes}_{variant}__{seed}__*")
    return folder


def test_mog_preset_skips_and_resumes_run_folders_of_the_old_preset(tmp_path):
    out = tmp_path / "table"
    gan = old_preset_run(out, 4, "gan", 1, 20, TINY_MOG)
    topk = old_preset_run(out, 4, "topk", 1, 20, TINY_MOG)
    gan_summary = (gan / "summary.json").read_bytes()
    uninterrupted = np.load(topk / "samples.npz")["samples"]
    # interrupt the top-k run at iteration 10: its last checkpoint is the one of step 10, no summary
    (topk / "summary.json").unlink()
    (topk / "samples.npz").unlink()
    (topk / "checkpoints" / "step_0000020.pt").unlink()
    shutil.copy(topk / "checkpoints" / "step_0000010.pt", topk / "checkpoints" / "last.pt")

    preset = [REPO / "sweeps" / "mog_table1.py", "--modes", "4", "--variants", "gan", "topk", "--seeds", "1",
              "--iterations", "20", "--jobs", "2", "--cores", "2", "--out-dir", out]
    proc = ok(run(*preset, "--extra", *TINY_MOG))
    assert "1 ran, 1 skipped, 0 failed" in proc.stdout
    assert sorted(p.name for p in out.glob("mog4_*")) == sorted([gan.name, topk.name])  # no new run folder
    assert (gan / "summary.json").read_bytes() == gan_summary
    (start,) = [r for r in journal(out) if r["event"] == "start"]
    assert (start["variant"], start["state"], start["argv"][-2:]) == (
        "mog4_topk", "resume", ["--resume", str(topk / "checkpoints" / "last.pt")])
    assert start["argv"][start["argv"].index("--threads") + 1] == "1" and start["omp_num_threads"] == "1"
    assert json.loads((topk / "summary.json").read_text())["step"] == 20
    np.testing.assert_array_equal(np.load(topk / "samples.npz")["samples"], uninterrupted)
    table = (out / "table1.md").read_text()
    assert "| 4 | gan | 1 (seeds 1) |" in table and "| 4 | topk | 1 (seeds 1) |" in table

    # the same command again runs nothing; other flags for the same cells: one error line, exit 2, nothing started
    assert "0 ran, 2 skipped, 0 failed" in ok(run(*preset, "--extra", *TINY_MOG)).stdout
    n_records = len(journal(out))
    bad = run(*preset, "--extra", *TINY_MOG, "--hidden-dim", "16")
    assert bad.returncode == 2 and "was made with --hidden-dim 8" in assert_one_line_error(bad)
    refused = run(*preset, "--extra", *TINY_MOG, "--device", "cuda")
    assert refused.returncode == 2 and "--device is set by the runner" in assert_one_line_error(refused)
    assert len(journal(out)) == n_records


def test_mog_study_dry_run_prints_each_cell_in_its_config_folder(tmp_path):
    proc = ok(run(REPO / "sweeps" / "mog_table1.py", "--study", "--seeds", "1", "--iterations", "20", "--jobs", "2",
                  "--cores", "2", "--out-dir", tmp_path, "--dry-run"))
    commands = [line.split() for line in proc.stdout.splitlines() if "mog_topk.py" in line]
    where = [(c[c.index("--out-dir") + 1], c[c.index("--exp-name") + 1]) for c in commands]
    configs = ["base", "spacing1", "depth4", "betas", "all"]
    assert where == [(str(tmp_path / c), "mog25_gan") for c in configs] + \
        [(str(tmp_path / c), "mog25_topk") for c in configs[:3] + ["slowk"] + configs[3:]]
    assert all(c[c.index("--threads") + 1] == "1" and "--keep-checkpoints" in c for c in commands)
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_mnist_preset_runs_groups_and_skips(tmp_path):
    data = write_mnist(tmp_path / "mnist")
    out = tmp_path / "runs"
    tiny = ["--data-dir", data, "--no-download", "--batch-size", "50", "--epochs", "1", "--eval-every", "1"]
    preset = [REPO / "sweeps" / "mnist_ssl.py", "--num-labels", "20", "--seeds", "1", "--baseline", "--jobs", "2",
              "--cores", "2", "--out-dir", out]
    proc = ok(run(*preset, "--", *tiny, "--device", "cpu"))
    assert "2 ran, 0 skipped, 0 failed" in proc.stdout
    for name, supervised in (("mnist_ssl_20", False), ("mnist_sup_20", True)):
        (folder,) = out.glob(f"{name}__1__*")
        a = json.loads((folder / "args.json").read_text())
        assert (a["num_labels"], a["seed"], a["seed_data"], a["supervised_only"], a["device"]) == (20, 1, 1, supervised, "cpu")
    starts = [r for r in journal(out) if r["event"] == "start"]
    assert [(r["variant"], r["device"], r["omp_num_threads"]) for r in starts] == [
        ("mnist_ssl_20", "cpu", "1"), ("mnist_sup_20", "cpu", "1")]
    # a run started by hand joins the table, grouped by its args.json
    ok(run(REPO / "improved_gan_mnist.py", "--num-labels", "20", "--seed", "2", "--seed-data", "2", "--out-dir", out,
           "--device", "cpu", *tiny))
    table = ok(run(REPO / "sweeps" / "mnist_ssl.py", "--table-only", "--out-dir", out)).stdout
    rows = [line for line in table.splitlines() if line.startswith("| 20 |")]
    assert [r.split(" | ")[1:3] for r in rows] == [["SSL (K+1 GAN)", "improved_gan_mnist"],
                                                   ["SSL (K+1 GAN)", "mnist_ssl_20"], ["supervised-only", "mnist_sup_20"]]
    assert len(ok(run(REPO / "sweeps" / "mnist_ssl.py", "--table-only", "--at-epoch", "1", "--out-dir", out))
               .stdout.splitlines()) == len(table.splitlines())
    again = ok(run(*preset, "--", *tiny, "--device", "cpu"))
    assert "0 ran, 2 skipped, 0 failed" in again.stdout
    # no --device: the script's auto (no GPU visible here: cpu), as a dry run of a seed not run yet
    dry = ok(run(*preset[:4], "3", *preset[5:], "--dry-run", "--", *tiny)).stdout.splitlines()
    assert len(dry) == 2 and all("--seed 3 " in line and line.endswith("--device cpu") for line in dry)
    both = run(*preset, "--devices", "cpu", "--", *tiny, "--device", "cpu")
    assert both.returncode == 2 and "either --devices or --device" in assert_one_line_error(both)
