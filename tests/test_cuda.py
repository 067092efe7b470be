"""CUDA tier: the four scripts on a real GPU (skipped without one, so CI on a CPU stays green).

Run it alone with `python -m pytest -m cuda tests/test_cuda.py` (benchmarks/gpu_report.py does, first). Every run:
tiny sizes on `--dataset fake`, `--topk` with k changing during the run (gamma 0.5, several epochs), and
`--check-host-sync`, which makes any host synchronisation inside a training step raise (the first two steps of a
process, where compilation and lazy initialisation happen, and the logging/evaluation code are exempt). Then the
resume paths: a CUDA run continued on CUDA, continued with another --channels-last, and a CPU checkpoint continued on
CUDA; and FID with random Inception weights end to end.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tier: no CUDA GPU on this machine")]

TIMEOUT = 900
MOG = ["mog_topk.py", "--hidden-dim", "64", "--batch-size", "64", "--iterations", "60", "--iters-per-epoch", "10",
       "--topk", "--mu", "8", "--gamma", "0.5", "--eval-every", "30", "--eval-samples", "1000", "--log-every", "10",
       "--save-every", "30"]
DCGAN = ["dcgan_cifar_topk.py", "--dataset", "fake", "--fake-size", "64", "--batch-size", "8", "--ngf", "16",
         "--ndf", "16", "--epochs", "3", "--topk", "--mu", "2", "--gamma", "0.5", "--no-fid", "--log-every", "4"]
MNIST = ["improved_gan_mnist.py", "--dataset", "fake", "--fake-size", "200", "--batch-size", "50", "--num-labels",
         "20", "--epochs", "3", "--topk", "--mu", "10", "--gamma", "0.5"]
CIFAR = ["improved_gan_cifar.py", "--dataset", "fake", "--fake-size", "100", "--batch-size", "10", "--num-labels",
         "20", "--init-size", "10", "--grid-size", "4", "--epochs", "3", "--topk", "--mu", "2", "--gamma", "0.5",
         "--no-fid"]


def run_cuda(argv, out_dir, *extra, device="cuda", check=True):
    """Run a script (argv[0]) with `--device cuda --check-host-sync` (CPU runs: without the check)."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    flags = ["--device", device, "--out-dir", str(out_dir), *(["--check-host-sync"] if device != "cpu" else [])]
    proc = subprocess.run([sys.executable, str(REPO / argv[0]), *map(str, argv[1:]), *flags, *map(str, extra)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def the_run(out_dir):
    runs = [p for p in out_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_finished_with_changing_k(run):
    assert (run / "summary.json").is_file()
    recs = records(run)
    ks = {r["k"] for r in recs if "k" in r}
    assert len(ks) >= 2, f"k never changed: {ks}"
    for r in recs:
        for key, value in r.items():
            if key.startswith("loss") and isinstance(value, float):
                assert math.isfinite(value), (key, r)


@pytest.mark.parametrize("extra", [[], ["--no-fast-step"]], ids=["fast-step", "autograd"])
def test_mog(tmp_path, extra):
    run_cuda(MOG, tmp_path, *extra)
    assert_finished_with_changing_k(the_run(tmp_path))


MODES = {"fp32": [], "bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"], "compile": ["--compile"]}
IMAGE_MODES = {**MODES, "channels-last": ["--channels-last"],
               "fast-path": ["--amp", "bf16", "--compile", "--channels-last"]}


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_dcgan(tmp_path, mode):
    tricks = ["--feature-matching", "--hist-avg", "0.01"] if mode == "fp32" else []
    layout = ["--no-channels-last"] if mode == "fp32" else []  # fp32 contiguous: dcgan defaults to --channels-last
    run_cuda(DCGAN, tmp_path, *layout, *IMAGE_MODES[mode], *tricks)
    assert_finished_with_changing_k(the_run(tmp_path))


@pytest.mark.parametrize("script, mode", [(MNIST, m) for m in MODES] + [(CIFAR, m) for m in IMAGE_MODES],
                         ids=[f"mnist-{m}" for m in MODES] + [f"cifar-{m}" for m in IMAGE_MODES])
def test_improved_gan(tmp_path, script, mode):
    run_cuda(script, tmp_path, *(MODES if script == MNIST else IMAGE_MODES)[mode])
    assert_finished_with_changing_k(the_run(tmp_path))


@pytest.mark.parametrize("script, flags", [(MNIST, ()), (CIFAR, ("--model", "minibatch-disc", "--mbd-kernels", "8"))],
                         ids=["mnist-last-device-index", "cifar-minibatch-disc"])
def test_improved_gan_compiled_bf16(tmp_path, script, flags):
    """Compiled G and D, bf16 logits in fp32. MNIST on --device cuda:N (the last GPU): its CUDA calls name the
    device; CIFAR with the minibatch-discrimination model."""
    device = f"cuda:{torch.cuda.device_count() - 1}" if script == MNIST else "cuda"
    run_cuda(script, tmp_path, *flags, "--compile", "--amp", "bf16", device=device)
    assert_finished_with_changing_k(the_run(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, stop, extra", [
    (MOG, ["--max-steps", "30"], []),
    (DCGAN, ["--max-steps", "10"], ["--save-every", "1"]),
    (MNIST, ["--max-steps", "6"], ["--save-every", "1"]),
    (CIFAR, ["--max-steps", "15"], ["--save-every", "1"]),  # cifar: 10 steps per epoch
], ids=["mog", "dcgan", "mnist", "cifar"])
@pytest.mark.parametrize("first_device", ["cuda", "cpu"])
def test_resume_on_cuda(tmp_path, argv, stop, extra, first_device):
    """A run stopped part-way (on CUDA, or on the CPU) and continued on CUDA finishes with finite losses."""
    run_cuda(argv, tmp_path, *stop, *extra, device=first_device)
    run = the_run(tmp_path)
    run_cuda(argv, tmp_path, *extra, "--resume", run / "checkpoints" / "last.pt")
    assert_finished_with_changing_k(run)


@pytest.mark.parametrize("argv, extra", [(DCGAN, ["--save-every", "1"]), (CIFAR, ["--save-every", "1"])],
                         ids=["dcgan", "cifar"])
@pytest.mark.parametrize("amp", [[], ["--amp", "fp16"]], ids=["fp32", "fp16"])
def test_resume_with_other_channels_last(tmp_path, argv, extra, amp):
    """Moments saved in one memory layout, parameters in the other: fused Adam must still step."""
    first = ["--no-channels-last"] if argv is DCGAN else []  # dcgan defaults to --channels-last
    run_cuda(argv, tmp_path, "--max-steps", "10", *first, *extra, *amp)
    run = the_run(tmp_path)
    run_cuda(argv, tmp_path, *extra, *amp, "--channels-last", "--resume", run / "checkpoints" / "last.pt")
    assert_finished_with_changing_k(run)


# ---------------------------------------------------------------------------------------------------------------
# FID with random Inception weights
# ---------------------------------------------------------------------------------------------------------------
def test_fid_end_to_end_with_random_inception(tmp_path):
    import metrics

    torch.manual_seed(0)
    weights = tmp_path / "random_inception.pt"
    torch.save(metrics.FIDInceptionV3().state_dict(), weights)
    out = tmp_path / "runs"
    argv = [a for a in DCGAN if a != "--no-fid"]
    run_cuda(argv, out, "--amp", "bf16", "--eval-every", "1", "--fid-weights", weights, "--fid-samples", "40",
             "--fid-samples-final", "50", "--fid-batch-size", "20")
    run = the_run(out)
    evals = [r for r in records(run) if "fid" in r]
    assert len(evals) == 4 and evals[-1]["final"] and evals[-1]["fid_samples"] == 50
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 and r["is_mean"] >= 1 for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["peak_memory_gb"] > 0 and summary["device"] != "cpu"


# ---------------------------------------------------------------------------------------------------------------
# dcgan --cuda-graph: the captured step against the eager one
# ---------------------------------------------------------------------------------------------------------------
def _weights(run):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    return {f"{m}.{n}": t for m in ("G", "D") for n, t in state[m].items()}


def test_dcgan_cuda_graph_equals_eager_across_k_changes_and_resumes(tmp_path):
    """24 graph steps (3 epochs, k 8 -> 4 -> 2: one graph, k a device scalar) give the eager run's weights to float
    rounding; a graph run stopped at step 10 and resumed gives them too."""
    common = ["--no-channels-last", "--torch-deterministic"]
    run_cuda(DCGAN, tmp_path / "eager", *common)
    run_cuda(DCGAN, tmp_path / "graph", *common, "--cuda-graph")
    run_cuda(DCGAN, tmp_path / "cut", *common, "--cuda-graph", "--max-steps", "10")
    cut = the_run(tmp_path / "cut")
    run_cuda(DCGAN, tmp_path / "cut", *common, "--cuda-graph", "--resume", cut / "checkpoints" / "last.pt")
    eager = _weights(the_run(tmp_path / "eager"))
    for other in (the_run(tmp_path / "graph"), cut):
        assert_finished_with_changing_k(other)
        for name, value in _weights(other).items():
            torch.testing.assert_close(value.float(), eager[name].float(), rtol=1e-3, atol=1e-4, msg=name)
