"""Shared test fixtures: tiny datasets written in the genuine on-disk formats, and a script runner.

The datasets are small enough for CPU smoke runs but go through the same loading code as the real files:
CIFAR-10's python pickles (`cifar-10-batches-py/data_batch_{1..5}`, `test_batch`) and MNIST's idx files
(`MNIST/raw/*-ubyte`, read by torchvision.datasets.MNIST).
"""

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Module-scoped fixtures that train (seconds to a minute each). pytest-xdist gives every worker its own copy of a
# module fixture, so with `-n auto --dist loadgroup` (the README's test command) the tests that use one are sent to
# one worker and it is built once. Without xdist the marks do nothing.
SHARED_RUNS = {"test_same_results.py": "runs", "test_robustness.py": "runs", "test_sweeps.py": "mog",
               "test_mog.py": "short_run", "test_improved_gan_mnist.py": "full_run"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items):
    for item in items:
        name = SHARED_RUNS.get(item.path.name)
        if name is not None and name in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(f"{item.path.stem}.{name}"))


def write_cifar10(root: Path, per_class_train: int = 4, per_class_test: int = 2, seed: int = 0) -> Path:
    """Write a CIFAR-10-format folder `root/cifar-10-batches-py` with 10·per_class_train training images
    spread over the five data batches and 10·per_class_test test images. Returns `root`."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n_per_class, name):
        labels = np.repeat(np.arange(10), n_per_class)
        rng.shuffle(labels)
        # class-dependent mean colour, so a classifier has something to learn
        data = (rng.integers(0, 64, (len(labels), 3072)) + 19 * labels[:, None]).astype(np.uint8)
        return {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
                b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}

    train = batch(per_class_train, "training")
    n = len(train[b"labels"])
    splits = np.array_split(np.arange(n), 5)
    for i, idx in enumerate(splits, start=1):
        part = {b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": [train[b"labels"][j] for j in idx], b"data": train[b"data"][idx],
                b"filenames": [train[b"filenames"][j] for j in idx]}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(part, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(per_class_test, "testing batch 1 of 1"), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "airplane automobile bird cat deer dog frog horse ship truck".split()],
                     b"num_cases_per_batch": n // 5, b"num_vis": 3072}, f, protocol=2)
    return Path(root)


def write_mnist(root: Path, per_class_train: int = 20, per_class_test: int = 5, seed: int = 0) -> Path:
    """Write MNIST idx files under `root/MNIST/raw` (uncompressed, the names torchvision expects). Returns `root`."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)

    def write(prefix, n_per_class):
        labels = np.repeat(np.arange(10), n_per_class).astype(np.uint8)
        rng.shuffle(labels)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):  # a class-dependent bright bar plus noise
            images[i, 2 + 2 * c: 5 + 2 * c, 4:24] = 255
            images[i] |= (rng.random((28, 28)) < 0.05).astype(np.uint8) * 128
        with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(labels), 28, 28) + images.tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())

    write("train", per_class_train)
    write("t10k", per_class_test)
    return Path(root)


@pytest.fixture
def tiny_cifar_dir(tmp_path):
    """A CIFAR-10 python-format folder with 40 training and 20 test images."""
    return write_cifar10(tmp_path / "cifar")


@pytest.fixture
def tiny_mnist_dir(tmp_path):
    """An MNIST idx-format folder with 200 training and 50 test digits."""
    return write_mnist(tmp_path / "mnist")


def run_script(script: str, *args, timeout: float = 240, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python <repo>/<script> args...` on the CPU with one thread; returns the completed process."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def only_run_dir(out_dir: Path) -> Path:
    """The single run folder inside `out_dir` (asserts there is exactly one)."""
    runs = [p for p in Path(out_dir).iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder in {out_dir}, found {runs}"
    return runs[0]


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    """A user mistake: non-zero exit, no traceback, one non-empty line on stderr. Returns that line."""
    assert proc.returncode != 0, f"expected failure, got 0; stdout: {proc.stdout[-500:]}"
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr[-1500:]}"
    return lines[0]


def cli(main, argv, capsys) -> subprocess.CompletedProcess:
    """`main(argv)` run in this process through common.run_cli, the command line's error path, instead of a new
    interpreter (whose start-up costs seconds): a CompletedProcess with the exit status, stdout and stderr."""
    import common

    capsys.readouterr()
    try:
        common.run_cli(lambda: main([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["main", *map(str, argv)], code, out, err)
