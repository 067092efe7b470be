"""Tests of dcgan_cifar_topk.py: model shapes and init, the top-k generator loss, smoke runs on tiny CIFAR-10
pickles and on --dataset fake, resume == uninterrupted, the FID evaluation wiring (random Inception weights) and
bad input. Runs use a narrow DCGAN (--ngf/--ndf 8) so the file stays well under a minute on 2 CPU cores."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_one_line_error, only_run_dir, run_script, write_cifar10

import common
import dcgan_cifar_topk as dc
import metrics

SCRIPT = "dcgan_cifar_topk.py"
# generous: the suite's CPU time is small, but a shared CI machine can stretch wall time many times over
TIMEOUT = 900
TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "8", "--log-every", "2", "--no-download", "--save-every", "1"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Models and the top-k loss
# ---------------------------------------------------------------------------------------------------------------
def test_standard_dcgan_shapes_and_init():
    torch.manual_seed(0)
    G, D = dc.Generator(), dc.Discriminator()
    dc.dcgan_init(G)
    dc.dcgan_init(D)
    assert [m.out_channels for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)] == [512, 256, 128, 3]
    assert [m.out_channels for m in D.modules() if isinstance(m, torch.nn.Conv2d)] == [128, 256, 512]
    x = G(torch.randn(4, 100))
    assert x.shape == (4, 3, 32, 32) and x.abs().max() <= 1
    logits, feats = D(x)
    assert logits.shape == (4,) and feats.shape == (4, 8192)
    w = torch.cat([m.weight.flatten() for m in D.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    bn = torch.cat([m.weight for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(bn.mean().item() - 1) < 0.01 and 0.015 < bn.std().item() < 0.025
    # options: minibatch discrimination widens D's output layer input; VBN replaces every BN in G
    assert dc.Discriminator(minibatch_disc=True, mbd_kernels=7, mbd_dim=3).out.in_features == 8192 + 7
    Gv = dc.Generator(vbn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in Gv.modules())
    assert sum(isinstance(m, common.VirtualBatchNorm) for m in Gv.modules()) == 3


def test_generator_loss_uses_only_the_k_best_scored_fakes():
    torch.manual_seed(0)
    d = torch.randn(10, requires_grad=True)
    loss = dc.generator_loss(d, 3)
    loss.backward()
    top = torch.topk(d.detach(), 3).indices
    assert torch.allclose(loss, F.softplus(-d.detach()[top]).mean())
    assert set(d.grad.nonzero().flatten().tolist()) == set(top.tolist())

    d.grad = None
    dc.generator_loss(d, 3, bottomk=True).backward()
    assert set(d.grad.nonzero().flatten().tolist()) == set(torch.topk(d.detach(), 3, largest=False).indices.tolist())

    # k >= B: the plain DCGAN non-saturating loss over the whole batch
    assert torch.allclose(dc.generator_loss(d, 10), F.binary_cross_entropy_with_logits(d, torch.ones(10)))

    # feature matching: squared L2 between the real mean and the mean of the kept fakes' features
    feat_fake = torch.randn(10, 6, requires_grad=True)
    feat_real = torch.randn(5, 6)
    loss = dc.generator_loss(d.detach(), 4, feat_fake=feat_fake, feat_real=feat_real)
    keep = torch.topk(d.detach(), 4).indices
    expected = ((feat_real.mean(0) - feat_fake.detach()[keep].mean(0)) ** 2).sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert set(feat_fake.grad.abs().sum(1).nonzero().flatten().tolist()) == set(keep.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Smoke runs through the real loader and on fake data
# ---------------------------------------------------------------------------------------------------------------
def test_smoke_tiny_cifar_run_folder(tiny_cifar_dir, tmp_path):
    out = tmp_path / "runs"
    run_script(SCRIPT, *TINY, "--data-dir", tiny_cifar_dir, "--out-dir", out, "--epochs", "3", "--no-fid",
               "--topk", "--mu", "3", "--gamma", "0.7", "--eval-every", "1", check=True, timeout=TIMEOUT)
    run = only_run_dir(out)
    args = json.loads((run / "args.json").read_text())
    assert args["topk"] and args["mu"] == 3 and args["gamma"] == 0.7 and args["dataset"] == "cifar10"
    recs = records(run)
    assert recs and all({"step", "epoch", "k", "loss_d", "loss_g", "images_per_s"} <= set(r) for r in recs)
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) and r["images_per_s"] > 0 for r in recs)
    # 40 images / batch 8 = 5 steps per epoch; k = max(3, floor(8 * 0.7**epoch)) = 8, 5, 3
    assert {r["epoch"]: r["k"] for r in recs} == {0: 8, 1: 5, 2: 3}
    assert recs[-1]["step"] == 15 and [r["step"] for r in recs] == sorted(r["step"] for r in recs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 15 and summary["k_final"] == 3 and summary["final"] is None
    names = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert names == ["epoch_0001.png", "epoch_0002.png", "epoch_0003.png", "final.png"]
    assert Image.open(run / "samples" / "final.png").size == (8 * 34 + 2, 8 * 34 + 2)  # 64 images, 2-px padding
    ckpt = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 15 and ckpt["k"] == 3 and set(ckpt) >= {"G", "D", "opt_g", "opt_d", "rng", "z_ref"}
    assert not (run / "checkpoints" / "best.pt").exists()  # no FID, nothing to choose by


def test_smoke_fake_dataset_all_tricks(tmp_path):
    out = tmp_path / "runs"
    run_script(SCRIPT, *TINY, "--dataset", "fake", "--fake-size", "24", "--out-dir", out, "--epochs", "2",
               "--no-fid", "--topk", "--feature-matching", "--minibatch-disc", "--mbd-kernels", "4", "--vbn",
               "--hist-avg", "0.01", "--label-smoothing", "0.1", "--hflip", "--max-steps", "5",
               check=True, timeout=TIMEOUT)
    run = only_run_dir(out)
    recs = records(run)
    # 3 steps per epoch, a line every 2 steps and at epoch ends: 2, 3, 4; step 5 (cut by --max-steps) waits in the
    # checkpoint for the rest of its window
    assert [r["step"] for r in recs] == [2, 3, 4] and all(math.isfinite(r["loss_g"]) for r in recs)
    ckpt = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 5 and ckpt["hist_g"]["count"] == 6 and ckpt["hist_d"]["count"] == 6
    assert ckpt["pending"].shape == (1, 4) and ckpt["pending_time_s"] > 0
    assert ckpt["z_ref"].shape == (8, 100) and "mbd.T" in ckpt["D"]
    assert not any("running_mean" in key for key in ckpt["G"])  # VBN, no BatchNorm in G
    assert json.loads((run / "summary.json").read_text())["steps"] == 5


def test_resume_equals_uninterrupted(tiny_cifar_dir, tmp_path):
    flags = [*TINY, "--data-dir", tiny_cifar_dir, "--no-fid", "--topk", "--mu", "2", "--gamma", "0.5", "--vbn",
             "--hist-avg", "0.01", "--hflip", "--eval-every", "1"]
    run_script(SCRIPT, *flags, "--epochs", "2", "--out-dir", tmp_path / "a", check=True, timeout=TIMEOUT)
    # interrupted inside epoch 2 (step 7 of 10), then resumed to the end
    run_script(SCRIPT, *flags, "--epochs", "2", "--max-steps", "7", "--out-dir", tmp_path / "b",
               check=True, timeout=TIMEOUT)
    b = only_run_dir(tmp_path / "b")
    run_script(SCRIPT, *flags, "--epochs", "2", "--resume", b / "checkpoints" / "last.pt",
               check=True, timeout=TIMEOUT)
    a = only_run_dir(tmp_path / "a")
    ca, cb = (common.load_checkpoint(r / "checkpoints" / "last.pt") for r in (a, b))
    assert ca["step"] == cb["step"] == 10
    for net in ("G", "D"):
        for key in ca[net]:
            assert torch.equal(ca[net][key], cb[net][key]), (net, key)
    assert (a / "samples" / "final.png").read_bytes() == (b / "samples" / "final.png").read_bytes()
    strip = lambda recs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]  # noqa: E731
    ra, rb = strip(records(a)), strip(records(b))
    # the stop at step 7 cut the log window 6-8: its losses went into the checkpoint, not into a short line, so the
    # resumed run logs exactly the uninterrupted run's lines (issue 13)
    assert [r["step"] for r in ra] == [2, 4, 5, 6, 8, 10]
    assert rb == ra


# ---------------------------------------------------------------------------------------------------------------
# FID / IS wiring with a random-weights Inception
# ---------------------------------------------------------------------------------------------------------------
def test_fid_evaluation_wiring(tmp_path):
    tiny_cifar_dir = write_cifar10(tmp_path / "cifar", per_class_train=2)  # 20 images: few Inception passes on CPU
    torch.manual_seed(0)
    weights = tmp_path / "random_inception.pt"
    torch.save(metrics.FIDInceptionV3().state_dict(), weights)
    out = tmp_path / "runs"
    run_script(SCRIPT, *TINY, "--data-dir", tiny_cifar_dir, "--out-dir", out, "--epochs", "1", "--eval-every", "1",
               "--fid-weights", weights, "--fid-samples", "10", "--fid-samples-final", "11", "--fid-batch-size", "11",
               "--topk", check=True, timeout=TIMEOUT)
    run = only_run_dir(out)
    evals = [r for r in records(run) if "fid" in r]
    assert [r["final"] for r in evals] == [False, True] and [r["fid_samples"] for r in evals] == [10, 11]
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 and r["is_mean"] >= 1 for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["fid"] == evals[1]["fid"] and summary["final"]["is_mean"] == evals[1]["is_mean"]
    assert summary["best"]["fid"] == evals[0]["fid"] and summary["best"]["epoch"] == 1
    best = common.load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best"]["fid"] == evals[0]["fid"] and best["step"] == 2  # 20 images, batch 8
    assert (run / "fid_curve.png").is_file() and (run / "samples" / "epoch_0001.png").is_file()
    assert len(list(tiny_cifar_dir.glob("fid_stats_cifar10_train_*.npz"))) == 1  # cached, named by the weights


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------------------------
def test_missing_data_offline_is_one_line_error(tmp_path):
    out = tmp_path / "runs"
    proc = run_script(SCRIPT, "--data-dir", tmp_path / "nowhere", "--no-download", "--out-dir", out, "--no-fid",
                      timeout=TIMEOUT)
    line = assert_one_line_error(proc)
    assert "CIFAR-10 not found" in line and str(tmp_path / "nowhere") in line
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--topk", "--mu", "9"], "--mu must be between 1 and the batch size 8"),
    (["--topk", "--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--dataset", "imagenet"], "--dataset must be cifar10 or fake"),
    (["--mu", "4"], "--mu only applies with --topk"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    (["--resume", "missing/last.pt"], "checkpoint not found"),
    (["--fid-weights", "missing.pt"], "--fid-weights: file not found"),
])
def test_bad_input_rejected_before_run_folder(tmp_path, argv, message):
    out = tmp_path / "runs"
    with pytest.raises(common.UserError) as err:
        dc.main(["--dataset", "fake", "--batch-size", "8", "--out-dir", str(out), *argv])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_resume_refuses_other_configuration(tiny_cifar_dir, tmp_path):
    state = {"args": {**vars(dc.parse_args([])), "batch_size": 64}, "step": 0}
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(common.UserError, match="different configuration"):
        dc.main(["--data-dir", str(tiny_cifar_dir), "--no-fid", "--resume", str(tmp_path / "last.pt")])


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(common.UserError, match=r"non-finite loss at step \d+") as err:
        dc.main(["--dataset", "fake", "--fake-size", "16", "--batch-size", "8", "--ngf", "4", "--ndf", "4",
                 "--lr-d", "1e38", "--lr-g", "1e38", "--epochs", "20", "--no-fid", "--out-dir", str(out)])
    assert "last good checkpoint" in str(err.value)
