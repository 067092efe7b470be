"""Same results: the training scripts reproduce, bit for bit, the weights and metrics recorded from the reference code.

What it guards
    Changes that are not meant to alter numbers (refactoring, moving run plumbing into common.py, renaming, tidying)
    must leave every training run exactly as it was. Each configuration in CONFIGS below is a short CPU run of one of
    the four scripts (mog_topk.py, dcgan_cifar_topk.py, improved_gan_mnist.py, improved_gan_cifar.py) on tiny data
    written by conftest.py's writers with fixed seeds. Between them they cover plain training, top-k and bottom-k
    generator updates, feature matching, minibatch discrimination, historical averaging, one-sided label smoothing
    and virtual batch normalisation, epoch boundaries at which k shrinks (--topk with --gamma < 1), periodic and final
    evaluations, the MoG FastStep and autograd training steps, and improved_gan_cifar.py's learning-rate decay.

    A run is reduced to a digest, stored in tests/same_results*.json (one file per CPU kernel set, below):
      models        sha256 of each model state dict in checkpoints/last.pt (G, D, and the EMA copy of D where there
                    is one): over the parameter names in sorted order, each name with its tensor's dtype, shape and
                    raw bytes. Optimizer states, RNG states and other bookkeeping are not digested, so their entry
                    names may change freely.
      eval_records  the evaluation fields of metrics.jsonl (eval/*, test_*, fid, is_*), each with the record's step,
                    epoch and k.
      loss_records  every other non-timing field of metrics.jsonl (losses, D scores, train error, lr), each with the
                    record's step, epoch and k. None of these runs is interrupted, so the loss lines match exactly.
      summary       summary.json without timings, paths, device names, thread counts and memory figures.
    Timing fields (anything with per_s, it_s, it/s, time, wall, elapsed or eta in its name) are left out everywhere.
    Splitting metrics.jsonl by field rather than by line means a script that writes evaluation and losses in one
    line and one that writes them in two give the same digest. The four parts are checked by separate assertions; a
    failure names the configuration, the part, and the first differing records or entries, and lists every part
    that differs.

    If a change renames a checkpoint's model entry, map the recorded name to the new one in RENAMED_ENTRIES; if it
    renames a command-line flag, update the flag in CONFIGS (the flags recorded in the JSON are for reference only).

Recording
    RECORD_SAME_RESULTS=1 python -m pytest -q tests/test_same_results.py
    runs every configuration and writes tests/same_results_<capability>.json (with -k, only the selected
    configurations are replaced). Without the variable the test compares against the record of its environment.

    Re-recording is legitimate only when a change is meant to alter numbers (a new default, a fixed bug in the
    maths, a different random stream), and the commit must say so. It is also needed when a configuration is added
    or its flags change meaning. Record from the code the comparison should hold against, never from a change under
    test to make it pass.

    Bitwise results depend on the torch build and the CPU's kernels (two x86-64 machines whose torch dispatches
    different vector kernels round some float32 reductions differently): each file stores the torch version, CPU
    architecture and, where recorded, the kernel set torch dispatches to (torch.backends.cpu.get_cpu_capability()).
    A run passes when it equals the record of its environment: tests/same_results_<capability>.json
    (same_results_AVX2.json: recorded 2026-12-03 on a 2-core AMD EPYC from the reference code, commit ebf6c2b), else
    tests/same_results.json (recorded 2026-12-02 from the same code on an x86-64 CPU that is not AVX2, before the
    capability was stored). With no record of this environment the comparison is skipped, saying why;
    RECORD_SAME_RESULTS=1 writes the file of this capability. Every run is its own process on the CPU with one
    thread (conftest.run_script); the runs go one after the other, or SAME_RESULTS_JOBS at a time, which changes
    no number.
"""

import hashlib
import json
import os
import platform
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import only_run_dir, run_script, write_cifar10, write_mnist

RECORD = os.environ.get("RECORD_SAME_RESULTS") == "1"
HERE = Path(__file__).parent
TIMEOUT = 600
# runs at a time: one after the other unless SAME_RESULTS_JOBS says otherwise (worth it only on idle cores)
JOBS = max(1, int(os.environ.get("SAME_RESULTS_JOBS", "1")))

# tiny datasets, written the same way every time (fixed seeds); "{name}" in a flag is replaced by the folder
DATASETS = {
    "cifar_40img": (write_cifar10, {"per_class_train": 4, "per_class_test": 2, "seed": 0}),  # 40 train, 20 test
    "cifar_10img": (write_cifar10, {"per_class_train": 1, "per_class_test": 1, "seed": 0}),  # 10 train, 10 test
    "mnist_200img": (write_mnist, {"per_class_train": 20, "per_class_test": 5, "seed": 0}),  # 200 train, 50 test
}

MOG = ["--device", "cpu", "--hidden-dim", "32", "--batch-size", "64", "--eval-samples", "2000"]
DCGAN = ["--device", "cpu", "--ngf", "8", "--ndf", "8", "--batch-size", "8", "--log-every", "2", "--no-download",
         "--save-every", "1", "--grid-size", "4", "--no-fid", "--eval-every", "1"]
MNIST = ["--device", "cpu", "--no-download", "--data-dir", "{mnist_200img}", "--num-labels", "20", "--batch-size", "50",
         "--epochs", "2", "--eval-every", "1"]
CIFAR = ["--device", "cpu", "--no-download", "--data-dir", "{cifar_10img}", "--num-labels", "10", "--batch-size", "2",
         "--init-size", "10", "--grid-size", "4"]

CONFIGS = {
    # top-k on the FastStep path: k = max(10, floor(64 * 0.5^epoch)), epochs of 10 iterations: 64, 32, 16, 10;
    # evaluations at 0, 25, 50 and a log line cut at the step-25 checkpoint
    "mog_topk_faststep": ("mog_topk.py", [
        *MOG, "--n-modes", "25", "--iterations", "50", "--topk", "--mu", "10", "--gamma", "0.5",
        "--iters-per-epoch", "10", "--log-every", "10", "--eval-every", "25", "--save-every", "25"]),
    # bottom-k with every Improved-GAN trick (the autograd train_step); k 32 -> 24
    "mog_bottomk_tricks": ("mog_topk.py", [
        "--device", "cpu", "--hidden-dim", "16", "--batch-size", "32", "--eval-samples", "500", "--n-modes", "4",
        "--iterations", "20", "--topk", "--bottomk", "--gamma", "0.5", "--iters-per-epoch", "5",
        "--feature-matching", "--minibatch-disc", "--mbd-kernels", "8", "--mbd-dim", "3", "--hist-avg", "0.1",
        "--label-smoothing", "0.1", "--vbn", "--log-every", "10", "--eval-every", "10", "--save-every", "10"]),
    # top-k through the CIFAR-10 pickle loader: 5 steps per epoch, k 8 -> 5 at the epoch boundary; BatchNorm G
    "dcgan_topk_cifar": ("dcgan_cifar_topk.py", [
        *DCGAN, "--data-dir", "{cifar_40img}", "--epochs", "2", "--topk", "--mu", "3", "--gamma", "0.7"]),
    # plain DCGAN loss with every trick, on --dataset fake: 3 steps per epoch
    "dcgan_plain_tricks_fake": ("dcgan_cifar_topk.py", [
        *DCGAN, "--dataset", "fake", "--fake-size", "24", "--epochs", "2", "--feature-matching", "--minibatch-disc",
        "--mbd-kernels", "4", "--mbd-dim", "3", "--vbn", "--hist-avg", "0.01", "--label-smoothing", "0.1",
        "--hflip"]),
    # feature matching (the default) with top-k: 4 steps per epoch, k 50 -> 25; test error every epoch
    "mnist_fm_topk": ("improved_gan_mnist.py", [*MNIST, "--topk", "--mu", "10", "--gamma", "0.5"]),
    # non-saturating G loss with minibatch discrimination, historical averaging, label smoothing and VBN
    "mnist_mbd_tricks": ("improved_gan_mnist.py", [
        *MNIST, "--init-size", "50", "--no-feature-matching", "--minibatch-disc", "--mbd-kernels", "10",
        "--mbd-dim", "3", "--hist-avg", "0.01", "--label-smoothing", "0.1", "--vbn"]),
    # the feature-matching model with top-k and historical averaging: 5 steps per epoch, k 2 -> 1 and the lr halved
    # (linear decay from epoch 0 of 2) at step 5; test error at step 5 and at the end
    "cifar_fm_topk_lrdecay": ("improved_gan_cifar.py", [
        *CIFAR, "--epochs", "2", "--lr-decay-start", "0", "--max-steps", "6", "--topk", "--mu", "1", "--gamma", "0.5",
        "--hist-avg", "0.01"]),
    # the minibatch-discrimination model (3 G steps per D step, minimax G loss, input noise) with VBN and label
    # smoothing, IS/FID off
    "cifar_mbd_vbn": ("improved_gan_cifar.py", [
        *CIFAR, "--model", "minibatch-disc", "--no-fid", "--mbd-kernels", "10", "--vbn", "--label-smoothing", "0.1",
        "--max-steps", "2"]),
}

# checkpoint entries holding model state dicts, per script (scalers, optimizers, RNG and averaging states are not)
MODEL_ENTRIES = {
    "mog_topk.py": ("G", "D"),
    "dcgan_cifar_topk.py": ("G", "D"),
    "improved_gan_mnist.py": ("G", "D", "ema"),
    "improved_gan_cifar.py": ("G", "D", "ema"),
}
# recorded model entry name -> its name in today's checkpoints, per script (for renamed checkpoint entries)
RENAMED_ENTRIES: dict[str, dict[str, str]] = {}

CONTEXT_KEYS = ("step", "epoch", "k")
EVAL_KEYS = {"fid", "fid_samples", "is_mean", "is_std", "final"}
ENVIRONMENT_KEYS = {"run_dir", "device", "device_name", "threads", "torch_threads", "resumed_from_step"}  # bookkeeping


def is_timing(key: str) -> bool:
    k = key.lower()
    return (k.endswith(("per_s", "it_s", "it/s")) or any(word in k for word in ("time", "wall", "elapsed"))
            or re.search(r"(^|[_/])eta($|[_/])", k) is not None)


def is_eval(key: str) -> bool:
    return key.startswith(("eval/", "test_")) or key in EVAL_KEYS


def state_dict_sha256(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        data = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(data)
    return h.hexdigest()


def split_records(lines: list[dict]) -> tuple[list[dict], list[dict]]:
    """(evaluation records, loss records) of metrics.jsonl, without timings; each keeps its line's step/epoch/k."""
    evals, losses = [], []
    for line in lines:
        line = {k: v for k, v in line.items() if not is_timing(k)}
        context = {k: line[k] for k in CONTEXT_KEYS if k in line}
        ev = {k: v for k, v in line.items() if is_eval(k)}
        rest = {k: v for k, v in line.items() if k not in context and k not in ev}
        if ev:
            evals.append({**context, **ev})
        if rest:
            losses.append({**context, **rest})
    return evals, losses


def clean_summary(value):
    if isinstance(value, dict):
        return {k: clean_summary(v) for k, v in value.items()
                if not is_timing(k) and k not in ENVIRONMENT_KEYS and "memory" not in k and "path" not in k
                and not k.endswith("_dir")}
    if isinstance(value, list):
        return [clean_summary(v) for v in value]
    return value


def digest(run_dir: Path, script: str, entries) -> dict:
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    renamed = RENAMED_ENTRIES.get(script, {})
    models = {}
    for name in entries:
        key = renamed.get(name, name)
        assert key in state, f"checkpoints/last.pt has no entry {key!r} (entries: {sorted(state)})"
        models[name] = {"sha256": state_dict_sha256(state[key]), "tensors": len(state[key])}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals, losses = split_records(lines)
    summary = clean_summary(json.loads((run_dir / "summary.json").read_text()))
    return {"models": models, "eval_records": evals, "loss_records": losses, "summary": summary}


def environment() -> dict:
    return {"torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def matches(recorded: dict) -> bool:
    """A record's environment is this one (a record without cpu_capability: any capability but the recorded ones)."""
    here = environment()
    if "cpu_capability" in recorded:
        return recorded == here
    return ({k: recorded[k] for k in ("torch", "machine")} == {k: here[k] for k in ("torch", "machine")}
            and not (HERE / f"same_results_{here['cpu_capability']}.json").is_file())


REFERENCE = HERE / f"same_results_{torch.backends.cpu.get_cpu_capability()}.json"  # what RECORD_SAME_RESULTS writes


# ---------------------------------------------------------------------------------------------------------------
# Readable differences
# ---------------------------------------------------------------------------------------------------------------
def _dict_diff(expected: dict, got: dict) -> list[str]:
    out = []
    for k in sorted(set(expected) | set(got), key=str):
        if k not in got:
            out.append(f"  {k}: missing (expected {expected[k]!r})")
        elif k not in expected:
            out.append(f"  {k}: not expected (got {got[k]!r})")
        elif expected[k] != got[k]:
            out.append(f"  {k}: expected {expected[k]!r}, got {got[k]!r}")
    return out


def _records_diff(expected: list[dict], got: list[dict], show: int = 3) -> list[str]:
    out = [] if len(expected) == len(got) else [f"  {len(expected)} records expected, {len(got)} written"]
    shown = 0
    for i in range(max(len(expected), len(got))):
        e, g = (expected[i] if i < len(expected) else None), (got[i] if i < len(got) else None)
        if e == g:
            continue
        if shown == show:
            out.append("  ... (further differing records not shown)")
            break
        shown += 1
        if g is None:
            out.append(f"  record {i}: missing (expected {e})")
        elif e is None:
            out.append(f"  record {i}: not expected (got {g})")
        else:
            out.append(f"  record {i} (step {e.get('step')}):")
            out.extend("  " + line for line in _dict_diff(e, g))
    return out


PARTS = {
    "models": ("model weights (sha256 of the checkpoint state dicts)",
               lambda e, g: [f"  {line.strip()}" for line in _dict_diff(e, g)]),
    "eval_records": ("evaluation records of metrics.jsonl", _records_diff),
    "loss_records": ("loss records of metrics.jsonl", _records_diff),
    "summary": ("summary.json (timings and paths removed)", _dict_diff),
}


# ---------------------------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The run folder of each selected configuration, as a future: all runs are queued when the first test of this
    file starts and go JOBS at a time (each is its own process with one thread, so this changes no number)."""
    root = tmp_path_factory.mktemp("same_results")
    data = {name: str(write(root / "data" / name, **kwargs)) for name, (write, kwargs) in DATASETS.items()}
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params]

    def run(name):
        script, argv = CONFIGS[name]
        out = root / name
        run_script(script, *[a.format(**data) for a in argv], "--out-dir", out, check=True, timeout=TIMEOUT)
        return only_run_dir(out)

    pool = ThreadPoolExecutor(max_workers=JOBS)
    futures = {name: pool.submit(run, name) for name in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def reference():
    if RECORD:
        return None
    files = sorted(HERE.glob("same_results*.json"))
    if not files:
        pytest.fail("tests/same_results*.json are missing: record with RECORD_SAME_RESULTS=1 (see this docstring)")
    refs = [(f, json.loads(f.read_text())) for f in files]
    mine = [(f, ref) for f, ref in refs if matches(ref["environment"])]
    if not mine:
        pytest.skip(f"no digests recorded for {environment()} (recorded: {[ref['environment'] for _, ref in refs]}): "
                    "bitwise results are only comparable on the same torch build and CPU kernels")
    return mine[0]


def save_record(name: str, script: str, argv: list[str], result: dict) -> None:
    ref = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    configs = ref.get("configs", {})
    configs[name] = {"script": script, "argv": argv, "model_entries": list(result["models"]), **result}
    ref = {"about": "Digests of short CPU runs of the training scripts, checked by tests/test_same_results.py "
                    "(see its docstring for how and when to re-record).",
           "environment": environment(),
           "datasets": {name: f"conftest.{write.__name__}(root, "
                                  f"{', '.join(f'{k}={v}' for k, v in kwargs.items())})"
                        for name, (write, kwargs) in DATASETS.items()},
           "configs": {n: configs[n] for n in CONFIGS if n in configs}}
    REFERENCE.write_text(json.dumps(ref, indent=1) + "\n")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_results(name, reference, runs):
    script, argv = CONFIGS[name]
    run_dir = runs[name].result()

    if RECORD:
        save_record(name, script, argv, digest(run_dir, script, MODEL_ENTRIES[script]))
        return

    path, reference = reference
    assert name in reference["configs"], \
        f"{name}: no record in {path.name}; record it with RECORD_SAME_RESULTS=1 -k {name}"
    expected = dict(reference["configs"][name])
    expected["summary"] = clean_summary(expected["summary"])  # bookkeeping keys added after the recording
    got = digest(run_dir, script, expected["model_entries"])
    differing = [part for part in PARTS if expected[part] != got[part]]
    note = ""
    if expected["argv"] != argv:
        note = f"\n(recorded with other flags: {' '.join(expected['argv'])})"
    for part, (title, explain) in PARTS.items():
        assert part not in differing, (
            f"{name} ({script} {' '.join(argv)}): the {title} differ from {path.name}\n"
            + "\n".join(explain(expected[part], got[part]))
            + f"\nparts that differ: {', '.join(differing)}{note}\n"
            "Re-record only if the change is meant to alter numbers (see the docstring of this file).")
