"""Tests of improved_gan_mnist.py: the K+1 loss, the models, and CPU runs on tiny MNIST idx files."""

import json
import re
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, assert_one_line_error, cli, only_run_dir, run_script, write_mnist

import common
import improved_gan_mnist as igm

SCRIPT = "improved_gan_mnist.py"
# 200 training digits (20 per class), 50 test digits; batch 50 → 4 steps per epoch; k = 50 then 25.
BASE = ["--device", "cpu", "--num-labels", "20", "--batch-size", "50", "--epochs", "2", "--eval-every", "1",
        "--topk", "--mu", "10", "--gamma", "0.5", "--no-download"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evals(run_dir):
    """The evaluation records of a run's metrics.jsonl."""
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "test_err_ema" in r]


def assert_same_weights(a, b):
    sa, sb = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (a, b))
    for key in ("D", "G", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key}.{name} differs"


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """The tiny MNIST of conftest's tiny_mnist_dir fixture (same writer), shared by the runs of this module."""
    return write_mnist(tmp_path_factory.mktemp("data") / "mnist")


@pytest.fixture(scope="module")
def full_run(mnist_root, tmp_path_factory):
    """One uninterrupted 2-epoch run on the tiny MNIST (read through torchvision's loader)."""
    out = tmp_path_factory.mktemp("full")
    run_script(SCRIPT, *BASE, "--data-dir", mnist_root, "--out-dir", out, check=True)
    return only_run_dir(out)


# ----------------------------------------------------------------------------------------------------------------
# Losses and models
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_kplus1_loss_is_bce_of_z_over_z_plus_1(smoothing):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(64, 10, generator=g, dtype=torch.float64) * 3, torch.randn(32, 10, generator=g, dtype=torch.float64) * 3
    d_real = real.exp().sum(1) / (real.exp().sum(1) + 1)  # D(x) = Z / (Z + 1)
    d_fake = fake.exp().sum(1) / (fake.exp().sum(1) + 1)
    expected = 0.5 * F.binary_cross_entropy(d_real, torch.full_like(d_real, 1 - smoothing)) + \
        0.5 * F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake))
    got = igm.kplus1_unlabeled_loss(real.float(), fake.float(), smoothing)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    if smoothing == 0.0:  # the official formula, term by term
        lse_r, lse_f = torch.logsumexp(real, 1), torch.logsumexp(fake, 1)
        official = -0.5 * lse_r.mean() + 0.5 * F.softplus(lse_r).mean() + 0.5 * F.softplus(lse_f).mean()
        assert got.item() == pytest.approx(official.item(), rel=1e-5)


def test_losses_stay_finite_for_large_logits_and_match_definitions():
    big = torch.full((4, 10), 200.0)
    assert torch.isfinite(igm.kplus1_unlabeled_loss(big, -big)) and torch.isfinite(igm.kplus1_unlabeled_loss(-big, big))
    logits = torch.randn(8, 10)
    d = logits.exp().sum(1) / (logits.exp().sum(1) + 1)
    assert torch.allclose(torch.sigmoid(igm.realness_logit(logits)), d, atol=1e-6)  # the top-k score is D's logit
    assert igm.nonsaturating_generator_loss(logits).item() == pytest.approx(-d.log().mean().item(), rel=1e-5)
    y = torch.randint(0, 10, (8,))
    assert igm.labeled_loss(logits, y).item() == pytest.approx(
        (-logits[torch.arange(8), y] + torch.logsumexp(logits, 1)).mean().item(), rel=1e-5)
    fr, ff = torch.randn(20, 250), torch.randn(7, 250)  # the official MNIST form: mean over the features
    assert common.feature_matching_loss(fr, ff, igm.FEATURE_MATCHING).item() == pytest.approx(
        ((ff.mean(0) - fr.mean(0)) ** 2).mean().item(), rel=1e-5)


def test_models_follow_the_official_architecture():
    torch.manual_seed(0)
    d, g = igm.Discriminator(), igm.Generator()
    x = torch.rand(300, 784)
    with torch.no_grad():
        d.train()(x)  # data-dependent init
    assert [l.v.shape[0] for l in d.hidden] == [1000, 500, 250, 250, 250]
    assert all(not l.g.requires_grad for l in d.hidden) and d.out.g.requires_grad  # train_scale only at the output
    d.eval()
    with torch.no_grad():
        logits, feats = d(x)
        h = x
        for l in d.hidden[:-1]:
            h = F.relu(l(h))
        pre = d.hidden[-1](h)
    assert logits.shape == (300, 10) and feats.shape == (300, 250)
    assert torch.equal(feats, F.relu(pre))  # features = last hidden ReLU (eval mode: no noise)
    z = torch.rand(16, igm.Z_DIM)
    out = g(z)
    assert out.shape == (16, 784) and out.min() >= 0 and out.max() <= 1
    assert not g.norm1.weight.requires_grad and g.norm1.bias.requires_grad  # batch norm with shift, no scale


# ----------------------------------------------------------------------------------------------------------------
# Runs on tiny MNIST
# ----------------------------------------------------------------------------------------------------------------
def test_smoke_run_outputs(full_run, mnist_root):
    records = evals(full_run)
    losses = [r for r in read_jsonl(full_run / "metrics.jsonl") if "loss_lab" in r]
    for rs in (records, losses):
        assert [(r["step"], r["epoch"], r["k"]) for r in rs] == [(4, 1, 50), (8, 2, 25)]  # top-k schedule
    assert all(torch.isfinite(torch.tensor(r[k])) for r in losses for k in ("loss_lab", "loss_unl", "loss_gen"))
    for r in records:
        assert 0 <= r["test_err_ema"] <= 50 and r["test_err_ema_pct"] == pytest.approx(2 * r["test_err_ema"])
        assert 0 <= r["test_err_raw"] <= 50
        assert (full_run / "samples" / f"epoch_{r['epoch']:04d}.png").is_file()
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["test_err_ema"] == records[-1]["test_err_ema"] and summary["n_test"] == 50
    assert summary["epochs_done"] == 2 and summary["steps"] == 8
    from PIL import Image
    assert Image.open(full_run / "samples" / "epoch_0002.png").size == (302, 302)  # 10 x 10 digits, 2 px padding

    # the logged test error equals an independent count with the checkpoint's EMA weights
    state = torch.load(full_run / "checkpoints" / "last.pt", weights_only=True)
    d = igm.Discriminator()
    d.load_state_dict(state["ema"])
    from torchvision.datasets import MNIST
    test = MNIST(str(mnist_root), train=False, download=False)
    x, y = test.data.reshape(50, -1).float() / 255, test.targets
    with torch.no_grad():
        wrong = int((d.eval()(x)[0].argmax(1) != y).sum())
    assert wrong == summary["test_err_ema"]


def test_labels_balanced_reproducible_and_shared_by_the_baseline(full_run, mnist_root, tmp_path):
    from torchvision.datasets import MNIST
    train_labels = MNIST(str(mnist_root), train=True, download=False).targets
    ssl = json.loads((full_run / "labeled_indices.json").read_text())["indices"]
    assert torch.bincount(train_labels[ssl], minlength=10).tolist() == [2] * 10

    # the baseline with another --seed but the same --seed-data sees the same labeled digits
    run_script(SCRIPT, "--device", "cpu", "--num-labels", "20", "--batch-size", "50", "--max-steps", "2", "--no-download",
               "--supervised-only", "--seed", "2", "--data-dir", mnist_root, "--out-dir", tmp_path / "sup", check=True)
    sup_dir = only_run_dir(tmp_path / "sup")
    assert json.loads((sup_dir / "labeled_indices.json").read_text())["indices"] == ssl
    sup = json.loads((sup_dir / "summary.json").read_text())
    assert sup["supervised_only"] and sup["steps"] == 2 and not list((sup_dir / "samples").iterdir())

    run_script(SCRIPT, "--device", "cpu", "--num-labels", "20", "--batch-size", "50", "--max-steps", "1", "--no-download",
               "--seed-data", "2", "--data-dir", mnist_root, "--out-dir", tmp_path / "other", check=True)
    other = json.loads((only_run_dir(tmp_path / "other") / "labeled_indices.json").read_text())["indices"]
    assert other != ssl and torch.bincount(train_labels[other], minlength=10).tolist() == [2] * 10


def test_resume_equals_uninterrupted(full_run, mnist_root, tmp_path):
    out = tmp_path / "split"
    run_script(SCRIPT, *BASE, "--data-dir", mnist_root, "--out-dir", out, "--max-steps", "6", check=True)  # mid-epoch 2
    run_dir = only_run_dir(out)
    run_script(SCRIPT, *BASE, "--data-dir", mnist_root, "--out-dir", out, "--resume", run_dir / "checkpoints" / "last.pt",
               check=True)
    assert only_run_dir(out) == run_dir
    assert_same_weights(full_run, run_dir)  # the weights and evaluations of the uninterrupted run (loss lines may split)
    assert evals(run_dir) == evals(full_run) and len(evals(run_dir)) == 2
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full_run, run_dir))
    assert (sa["test_err_ema"], sa["test_err_raw"], sa["steps"]) == (sb["test_err_ema"], sb["test_err_raw"], sb["steps"])
    assert sb["resumed_from_step"] == 6

    # a different configuration is refused
    proc = run_script(SCRIPT, *BASE, "--data-dir", mnist_root, "--out-dir", out, "--lr", "0.001",
                      "--resume", run_dir / "checkpoints" / "last.pt")
    assert "different configuration" in assert_one_line_error(proc)


def refused(argv, capsys) -> str:
    """main(argv) through common.run_cli in this process, as on the command line: the one `error:` line (status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        common.run_cli(lambda: igm.main([str(a) for a in argv]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_resume_refuses_another_epoch_length_and_a_foreign_folder(full_run, tmp_path, capsys):
    run = tmp_path / "copy" / full_run.name
    shutil.copytree(full_run, run)
    ckpt = run / "checkpoints" / "last.pt"
    other = write_mnist(tmp_path / "other", per_class_train=25)  # 250 digits: 5 steps per epoch instead of 4
    before = sorted((p, p.read_bytes()) for p in run.rglob("*") if p.is_file())
    line = refused([*BASE, "--data-dir", other, "--epochs", "3", "--resume", ckpt], capsys)
    assert "made with 4 steps per epoch, this data gives 5" in line
    backup = tmp_path / "backup"  # a checkpoint copied out of its run folder
    backup.mkdir()
    shutil.copy(ckpt, backup / "last.pt")
    assert "not inside a run folder" in refused([*BASE, "--data-dir", other, "--resume", backup / "last.pt"], capsys)
    assert sorted((p, p.read_bytes()) for p in run.rglob("*") if p.is_file()) == before
    assert [p.name for p in backup.iterdir()] == ["last.pt"]


def test_sigterm_saves_and_the_printed_command_continues_exactly(mnist_root, tmp_path, capsys, monkeypatch):
    """SIGTERM (what SLURM sends before a requeue) in the middle of step 3: the step finishes, last.pt is saved, the
    printed command continues to the weights and evaluations of an uninterrupted run (all in this process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flags = [*BASE, "--data-dir", str(mnist_root)]
        igm.main([*flags, "--out-dir", str(tmp_path / "whole")])
        real, calls = igm.labeled_loss, []

        def hooked(*args):
            calls.append(1)
            if len(calls) == 3:
                signal.raise_signal(signal.SIGTERM)
            return real(*args)

        with monkeypatch.context() as m:
            m.setattr(igm, "labeled_loss", hooked)
            capsys.readouterr()
            with pytest.raises(SystemExit) as info:
                common.run_cli(lambda: igm.main([*flags, "--out-dir", str(tmp_path / "cut")]))
        line = capsys.readouterr().err.strip()
        assert info.value.code == 130 and line.startswith("interrupted: stopped at step 3"), line
        command = line.split("continue with: ", 1)[1].split()
        assert command[:2] == ["python", SCRIPT]
        igm.main(command[2:])
    finally:
        torch.set_num_threads(threads)
    whole, cut = only_run_dir(tmp_path / "whole"), only_run_dir(tmp_path / "cut")
    assert_same_weights(whole, cut)
    assert evals(whole) == evals(cut)


# ----------------------------------------------------------------------------------------------------------------
# The CUDA paths, on the CPU
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mbd", [False, True])
def test_d_logits_are_float32_under_bf16_autocast(mbd):
    """The output layer runs in float32 under autocast: in bf16 the realness logits that top-k ranks would tie."""
    torch.manual_seed(0)
    d, x = igm.Discriminator(minibatch_disc=mbd, mbd_kernels=8, mbd_dim=3), torch.rand(64, 784)
    with torch.no_grad():
        d.train()(x)  # data-dependent init
        d.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, features = d(x)
        assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32
        h = d.mbd(features) if mbd else features  # eval mode: no noise, so this is the output layer's input
        assert torch.equal(logits, d.out(h.float()))  # the same layer in float32 on the same (bf16) features


def test_cuda_synchronize_is_given_the_device():
    """torch.cuda.synchronize() without a device waits for GPU 0, not for the --device cuda:N of the run."""
    calls = re.findall(r"torch\.cuda\.synchronize\(([^)]*)\)", (REPO / SCRIPT).read_text())
    assert all(arg.strip() for arg in calls), calls


def test_compiled_models_see_only_the_training_batch_shapes(mnist_root, tmp_path, monkeypatch):
    """--compile with static shapes: the compiled G sees only the training batch (the sample grid of 100 comes from
    the eager G, so a batch other than 100 never recompiles it), the compiled D its two batch shapes. Also runs the
    bf16 autocast path on the CPU."""
    seen = {}

    def recording_compile(module, **kwargs):
        assert kwargs.get("dynamic") is False

        def forward(x):
            seen.setdefault(type(module).__name__, set()).add(tuple(x.shape))
            return module(x)
        return forward

    monkeypatch.setattr(torch, "compile", recording_compile)
    igm.main(["--device", "cpu", "--num-labels", "20", "--batch-size", "40", "--epochs", "1", "--no-download",
              "--data-dir", str(mnist_root), "--out-dir", str(tmp_path), "--compile", "--amp", "bf16", "--topk"])
    assert seen == {"Generator": {(40, 100)}, "Discriminator": {(120, 784), (40, 784)}}
    assert len(evals(only_run_dir(tmp_path))) == 1


@pytest.mark.parametrize("flags, message", [
    (["--num-labels", "7"], "multiple of 10"),
    (["--num-labels", "0"], "multiple of 10"),
    (["--num-labels", "300"], "needs 30 examples of class"),  # the tiny data has 20 digits per class
    (["--topk", "--mu", "0"], "--mu"),
    (["--supervised-only", "--topk"], "--supervised-only"),
    (["--missing-data"], "MNIST not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(flags, message, mnist_root, tmp_path, capsys):
    data = tmp_path / "empty" if flags == ["--missing-data"] else mnist_root
    flags = [] if flags == ["--missing-data"] else flags
    out = tmp_path / "runs"
    proc = cli(igm.main, ["--device", "cpu", "--no-download", "--data-dir", data, "--out-dir", out, *flags], capsys)
    assert message in assert_one_line_error(proc)
    assert not out.exists() or not any(out.iterdir())
