"""Tests of dcgan_cifar_topk.py: model shapes and init, the top-k generator loss, the training step under bf16
autocast (float32 logits, one input dtype for D), smoke runs on tiny CIFAR-10 pickles and on --dataset fake, resume
== uninterrupted (weights and evaluation records), the FID evaluation wiring (random Inception weights) and bad
input. Runs use a narrow DCGAN (--ngf/--ndf 8) so the file stays well under a minute on 2 CPU cores."""

import json
import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_one_line_error, cli, only_run_dir, run_script, write_cifar10

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
# The training step under bf16 autocast on the CPU
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mbd", [False, True])
def test_d_output_layer_is_float32_under_bf16_autocast(mbd):
    """Top-k ranks D's logits: in bf16 the k-th and (k+1)-th tie; the output layer runs in float32."""
    torch.manual_seed(0)
    D = dc.Discriminator(minibatch_disc=mbd, mbd_kernels=5, mbd_dim=3, ndf=8)
    dc.dcgan_init(D)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, feats = D(x)
    assert feats.dtype == torch.bfloat16 and logits.dtype == torch.float32
    head = D.mbd(feats.float()) if mbd else feats.float()
    assert torch.equal(logits, F.linear(head, D.out.weight, D.out.bias).squeeze(1))  # the fp32 layer, same features
    assert len(set(logits.tolist())) == 16  # no ties among 16 fakes


def test_real_and_fake_reach_d_in_one_dtype_under_bf16_autocast():
    torch.manual_seed(0)
    args = dc.parse_args(["--amp", "bf16", "--ngf", "4", "--ndf", "4", "--batch-size", "4", "--topk",
                          "--feature-matching", "--dataset", "fake"])
    dc.validate_args(args)
    G, D = dc.build_models(args, torch.device("cpu"))
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    seen = []
    D.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    x_real = torch.rand(4, 3, 32, 32) * 2 - 1
    out = dc.train_step(G, D, opt_d, opt_g, x_real, torch.randn(4, 100), 2, args)
    # D(real), D(fake) in the D step; D(fake), D(real) (feature matching) in the G step: all in the autocast dtype
    assert seen == [torch.bfloat16] * 4
    assert list(out) == ["loss_d", "loss_g", "d_real", "d_fake"]
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in out.values())
    # the same numbers: D's first convolution casts a float32 input to bf16 itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(D.features[0](x_real), D.features[0](x_real.bfloat16()))


def test_cuda_tier_runs_fp32_contiguous_and_changes_the_layout_on_resume(tmp_path, monkeypatch):
    """tests/test_cuda.py's command lines as this script parses them: the fp32 run is contiguous (the default is
    --channels-last) and the layout-change resume starts contiguous, then continues channels-last."""
    import test_cuda

    parsed = []
    monkeypatch.setattr(test_cuda, "run_cuda", lambda argv, out, *extra, **kw: parsed.append(
        dc.parse_args([str(a) for a in (*argv[1:], *extra)])))
    monkeypatch.setattr(test_cuda, "the_run", lambda out: out)
    monkeypatch.setattr(test_cuda, "assert_finished_with_changing_k", lambda run: None)
    test_cuda.test_dcgan(tmp_path, "fp32")
    test_cuda.test_resume_with_other_channels_last(tmp_path, test_cuda.DCGAN, ["--save-every", "1"], [])
    assert [a.channels_last for a in parsed] == [False, False, True] and parsed[2].resume is not None


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
    assert ckpt["step"] == 15 and set(ckpt) >= {"G", "D", "opt_g", "opt_d", "rng", "best"}
    assert not (run / "checkpoints" / "best.pt").exists()  # no FID, nothing to choose by


def test_smoke_fake_dataset_all_tricks(tmp_path):
    out = tmp_path / "runs"
    run_script(SCRIPT, *TINY, "--dataset", "fake", "--fake-size", "24", "--out-dir", out, "--epochs", "2",
               "--no-fid", "--topk", "--feature-matching", "--minibatch-disc", "--mbd-kernels", "4", "--vbn",
               "--hist-avg", "0.01", "--label-smoothing", "0.1", "--hflip", "--max-steps", "5",
               check=True, timeout=TIMEOUT)
    run = only_run_dir(out)
    recs = records(run)
    # 3 steps per epoch, a line every 2 steps and at epoch ends: 2, 3, 4; and 5, the window cut by --max-steps
    assert [r["step"] for r in recs] == [2, 3, 4, 5] and all(math.isfinite(r["loss_g"]) for r in recs)
    ckpt = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 5 and ckpt["hist_g"]["count"] == 6 and ckpt["hist_d"]["count"] == 6
    assert "mbd.T" in ckpt["D"] and "scaler_g" not in ckpt  # no GradScaler without --amp fp16
    assert not any("running_mean" in key for key in ckpt["G"])  # VBN, no BatchNorm in G
    assert json.loads((run / "summary.json").read_text())["steps"] == 5


def _cheap_fid(monkeypatch):
    """FID/IS replaced by a statistic of the sampled images: evaluation records that depend on G's weights and on
    the sampling noise, without Inception passes on the CPU."""
    monkeypatch.setattr(metrics, "load_inception", lambda *a, **k: None)
    monkeypatch.setattr(metrics, "reference_statistics", lambda *a, **k: (np.zeros(2), np.eye(2)))

    def fid(sample_fn, n, mu, sigma, inception, batch_size=250, device=None):
        images = sample_fn(n)
        return {"fid": float(images.abs().mean()), "is_mean": float(images.std()), "is_std": 0.0}

    monkeypatch.setattr(metrics, "evaluate_generator", fid)


@pytest.mark.parametrize("stop", ["--max-steps", "SIGTERM"])
def test_resume_equals_uninterrupted(stop, tiny_cifar_dir, tmp_path, monkeypatch):
    """A run stopped inside an epoch (--max-steps 7, or SIGTERM during step 7) and resumed ends with the
    uninterrupted run's weights, evaluation records, best checkpoint and sample grid; only the loss lines around the
    stop differ (the cut window)."""
    _cheap_fid(monkeypatch)
    flags = [*TINY, "--data-dir", str(tiny_cifar_dir), "--device", "cpu", "--topk", "--mu", "2", "--gamma", "0.5",
             "--vbn", "--hist-avg", "0.01", "--hflip", "--eval-every", "1", "--fid-samples", "10",
             "--fid-samples-final", "12", "--epochs", "2"]
    dc.main([*flags, "--out-dir", str(tmp_path / "a")])
    if stop == "--max-steps":  # stopped inside epoch 2 (step 7 of 10)
        dc.main([*flags, "--max-steps", "7", "--out-dir", str(tmp_path / "b")])
    else:
        real, calls = dc.generator_loss, []

        def sigterm_in_step_7(*args, **kwargs):
            calls.append(1)
            if len(calls) == 7:
                signal.raise_signal(signal.SIGTERM)
            return real(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(dc, "generator_loss", sigterm_in_step_7)
            with pytest.raises(common.Interrupted, match="stopped at step 7"):
                dc.main([*flags, "--out-dir", str(tmp_path / "b")])
    b = only_run_dir(tmp_path / "b")
    dc.main([*flags, "--resume", str(b / "checkpoints" / "last.pt")])
    a = only_run_dir(tmp_path / "a")
    for name in ("last.pt", "best.pt"):
        ca, cb = (common.load_checkpoint(r / "checkpoints" / name) for r in (a, b))
        assert ca["step"] == cb["step"] and ca["best"] == cb["best"]
        for net in ("G", "D"):
            assert ca[net].keys() == cb[net].keys()
            assert all(torch.equal(ca[net][key], cb[net][key]) for key in ca[net]), (name, net)
        for avg in ("hist_g", "hist_d"):
            assert all(torch.equal(x, y) for x, y in zip(ca[avg]["mean"], cb[avg]["mean"], strict=True)), (name, avg)
    assert (a / "samples" / "final.png").read_bytes() == (b / "samples" / "final.png").read_bytes()
    evals = lambda run: [{k: v for k, v in r.items() if k != "eval_time_s"}  # noqa: E731
                         for r in records(run) if "fid" in r]
    assert len(evals(a)) == 3 and evals(a) == evals(b)  # epochs 1, 2 and the final one (the stop's was dropped)
    losses = lambda run: {r["step"]: {k: v for k, v in r.items() if k != "images_per_s"}  # noqa: E731
                          for r in records(run) if "loss_d" in r}
    la, lb = losses(a), losses(b)
    assert list(la) == [2, 4, 5, 6, 8, 10] and list(lb) == [2, 4, 5, 6, 7, 8, 10]  # the stop logged its window 7
    assert all(la[s] == lb[s] for s in (2, 4, 5, 6, 10))  # window 7-8 is split in b
    assert json.loads((b / "summary.json").read_text())["resumed_from_step"] == 7


# ---------------------------------------------------------------------------------------------------------------
# FID / IS wiring with a random-weights Inception
# ---------------------------------------------------------------------------------------------------------------
def test_fid_evaluation_wiring(tmp_path):
    tiny_cifar_dir = write_cifar10(tmp_path / "cifar", per_class_train=1)  # 10 images: few Inception passes on CPU
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
    assert best["best"]["fid"] == evals[0]["fid"] and best["step"] == 1  # 10 images, batch 8
    assert (run / "samples" / "epoch_0001.png").is_file()
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
    (["--fake-size", "4"], "--fake-size 4 is smaller than --batch-size 8"),
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
    with pytest.raises(common.UserError, match=r"non-finite (loss_d|loss_g|d_real|d_fake) \(.+\) at step \d+:") as err:
        dc.main(["--dataset", "fake", "--fake-size", "16", "--batch-size", "8", "--ngf", "4", "--ndf", "4",
                 "--lr-d", "1e38", "--lr-g", "1e38", "--epochs", "20", "--no-fid", "--out-dir", str(out)])
    assert "last good checkpoint" in str(err.value)


# ---- --cuda-graph: the rank-mask top-k and the graph's step function, on the CPU ----
@pytest.mark.parametrize("bottomk", [False, True])
@pytest.mark.parametrize("fm", [False, True])
def test_the_rank_mask_loss_equals_the_index_loss_for_every_k(bottomk, fm):
    torch.manual_seed(0)
    B = 12
    for k in range(1, B + 1):
        d = torch.randn(B, requires_grad=True)
        feat = torch.randn(B, 7, requires_grad=True)
        real = torch.randn(B, 7)
        args = (feat, real) if fm else ()
        a = dc.generator_loss(d, k, bottomk, *args)
        ga = torch.autograd.grad(a, [feat] if fm else [d])
        b = dc.generator_loss(d, torch.tensor(float(k)), bottomk, *args)
        gb = torch.autograd.grad(b, [feat] if fm else [d])
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-7)


def test_the_graph_step_run_eagerly_equals_the_default_step():
    argv = ["--dataset", "fake", "--fake-size", "32", "--batch-size", "8", "--ngf", "4", "--ndf", "4", "--topk",
            "--mu", "3", "--gamma", "0.5", "--feature-matching", "--minibatch-disc", "--mbd-kernels", "4",
            "--mbd-dim", "2", "--no-channels-last"]
    args = dc.parse_args(argv)
    dc.validate_args(args)
    data, _ = common.fake_images(32, (3, 32, 32), seed=1)
    results = []
    for graph in (False, True):
        torch.manual_seed(1)
        G, D = dc.build_models(args, torch.device("cpu"))
        opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2))
        opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2))
        cg = dc.CudaGraphStep(G, D, opt_d, opt_g, data, args, None, torch.contiguous_format)
        torch.manual_seed(2)
        for i, k in enumerate((8, 8, 5, 3)):  # k changes as at epoch boundaries
            idx = torch.arange(8) + 8 * (i % 4)
            if graph:
                cg.idx.copy_(idx)
                cg.k.fill_(k)
                cg.step()
            else:
                x = data[idx].float().mul_(2.0 / 255.0).sub_(1.0)
                dc.train_step(G, D, opt_d, opt_g, x, torch.randn(8, args.nz), k, args)
        results.append({**{f"G.{n}": t for n, t in G.state_dict().items()},
                        **{f"D.{n}": t for n, t in D.state_dict().items()}})
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_cuda_graph_refuses_what_it_cannot_capture_and_falls_back_on_the_cpu(tmp_path, capsys):
    for flags in (["--compile"], ["--hist-avg", "0.1"], ["--hflip"]):
        proc = cli(dc.main, ["--cuda-graph", *flags, "--out-dir", tmp_path], capsys)
        assert "--cuda-graph cannot be combined" in assert_one_line_error(proc)
    proc = cli(dc.main, ["--cuda-graph", "--dataset", "fake", "--fake-size", "32", "--batch-size", "8", "--ngf", "4",
                         "--ndf", "4", "--no-fid", "--max-steps", "2", "--device", "cpu", "--out-dir", tmp_path], capsys)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("--cuda-graph needs a CUDA device; running the eager step") == 1
