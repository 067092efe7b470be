"""Tests of improved_gan_cifar.py: model definitions, losses, smoke runs of both models on tiny CIFAR-10 pickles,
resume == uninterrupted (weights and evaluation records), the IS/FID path with a random-weights Inception file,
float32 logits and one input dtype for D under bf16 autocast, and one-line input errors.

The training runs are in-process (main(argv), one thread) to avoid paying the torch import per run; one bad-input
case goes through a real subprocess to check the command-line path end to end.
"""

import hashlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, only_run_dir, run_script, write_cifar10

import common
import improved_gan_cifar as igc

SCRIPT = "improved_gan_cifar.py"


def run_main(*argv):
    """Run the script's main(argv) in this process with one thread; raises what main raises."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        igc.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(old)


def tiny_args(data_dir, out_dir, *extra):
    return ["--data-dir", data_dir, "--no-download", "--out-dir", out_dir, "--device", "cpu", "--num-labels", 20,
            "--batch-size", 2, "--init-size", 10, "--grid-size", 4, *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evals(records):
    return [r for r in records if "test_error" in r]


# ---------------------------------------------------------------------------------------------------------------
# Models and losses
# ---------------------------------------------------------------------------------------------------------------
def test_discriminator_architecture_and_data_dependent_init():
    torch.manual_seed(0)
    D = igc.Discriminator(input_dropout=0.2, input_noise=0.0)
    convs = [m for m in D.body if isinstance(m, common.WNConv2d)]
    assert [(c.v.shape[0], c.v.shape[2], c.stride, c.padding) for c in convs] == [
        (96, 3, 1, 1), (96, 3, 1, 1), (96, 3, 2, 1), (192, 3, 1, 1), (192, 3, 1, 1), (192, 3, 2, 1),
        (192, 3, 1, 0), (192, 1, 1, 0), (192, 1, 1, 0)]
    assert [m.p for m in D.modules() if isinstance(m, torch.nn.Dropout)] == [0.2, 0.5, 0.5]
    # official train_g=False in the hidden layers, train_g=True in the output layer
    assert all(not c.g.requires_grad for c in convs) and D.out.g.requires_grad
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(1)
        D.train()(x, init=True)
        torch.manual_seed(1)  # the same dropout masks as the init forward
        logits, features = D(x)
    assert logits.shape == (16, 10) and features.shape == (16, 192)
    # data-dependent init: on the init batch the output units have mean 0 and std 0.1 (official init_stdv=0.1)
    torch.testing.assert_close(logits.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.std(0, unbiased=False), torch.full((10,), 0.1), atol=1e-4, rtol=0)


def test_minibatch_discrimination_data_dependent_init():
    torch.manual_seed(0)
    D = igc.Discriminator(input_dropout=0.0, input_noise=0.2, mbd_kernels=7, mbd_dim=5)
    h = torch.randn(50, 192)
    igc.init_minibatch_disc(D.mbd, h)
    m = (h @ D.mbd.T).view(50, 7, 5)
    l1 = (m[:, None] - m[None]).abs().sum(3) + 1e6 * torch.eye(50)[:, :, None]
    # mean nearest-neighbour L1 distance per kernel is 2, and the layer's extra outputs have mean 0 on that batch
    torch.testing.assert_close(l1.min(1).values.mean(0), torch.full((7,), 2.0))
    torch.testing.assert_close(D.mbd(h)[:, 192:].mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    # groups: each batch of the concatenation is compared with itself only
    x = torch.rand(12, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        D.train()(x, init=True)
        D.eval()
        joint, _ = D(x, groups=3)
        separate = torch.cat([D(part)[0] for part in x.chunk(3)])
    torch.testing.assert_close(joint, separate, atol=1e-5, rtol=1e-5)


def test_generator_shapes_range_and_batch_statistics():
    torch.manual_seed(0)
    G = igc.Generator()
    z = torch.rand(16, 100)
    with torch.no_grad():
        x = G.train()(z)
        assert x.shape == (16, 3, 32, 32) and x.abs().max() <= 1
        # the output layer's data-dependent init: pre-tanh std 0.1 on the init batch
        assert torch.atanh(x.clamp(-0.999, 0.999)).std().item() == pytest.approx(0.1, rel=0.2)
        # batch norm always uses batch statistics (official running averages are never used): eval == train
        torch.testing.assert_close(G.eval()(z), x)
    assert [type(m).__name__ for m in G.modules() if "Norm" in type(m).__name__] == ["BatchNormShift"] * 3
    assert all(p.requires_grad for p in G.parameters())


def test_losses_match_official_formulas():
    torch.manual_seed(0)
    l_unl, l_gen = torch.randn(8, 10) * 3, torch.randn(8, 10) * 3
    lse_u, lse_g = torch.logsumexp(l_unl, 1), torch.logsumexp(l_gen, 1)
    official = -0.5 * lse_u.mean() + 0.5 * F.softplus(lse_u).mean() + 0.5 * F.softplus(lse_g).mean()
    torch.testing.assert_close(igc.unsupervised_loss(l_unl, l_gen), official)
    # one-sided smoothing: real target 1 - a, i.e. -(1-a) log D(x) - a log(1 - D(x)) on the real half only
    d_real = torch.sigmoid(lse_u)
    smoothed = 0.5 * (-(0.9 * torch.log(d_real) + 0.1 * torch.log1p(-d_real))).mean() + 0.5 * F.softplus(lse_g).mean()
    torch.testing.assert_close(igc.unsupervised_loss(l_unl, l_gen, 0.1), smoothed)
    # minimax = mean log(1 - D(G(z))) with D = Z / (Z + 1); non-saturating = -mean log D(G(z))
    d_fake = torch.exp(lse_g) / (torch.exp(lse_g) + 1)
    torch.testing.assert_close(igc.adversarial_g_loss(lse_g, "minimax"), torch.log1p(-d_fake).mean())
    torch.testing.assert_close(igc.adversarial_g_loss(lse_g, "non-saturating"), -torch.log(d_fake).mean())
    # feature matching: openai's CIFAR-10 form, the mean absolute difference of the batch means
    assert igc.FM_FORM == "mean_abs"
    f_real, f_fake = torch.randn(8, 192), torch.randn(5, 192)
    torch.testing.assert_close(common.feature_matching_loss(f_real, f_fake, igc.FM_FORM),
                               (f_real.mean(0) - f_fake.mean(0)).abs().mean())


def test_model_presets_and_rejections():
    def checked(*argv):
        args = igc.parse_args(list(argv))
        igc.validate_args(args)
        return args

    fm = checked()
    assert (fm.feature_matching, fm.minibatch_disc, fm.input_dropout, fm.input_noise, fm.g_steps, fm.fid) == \
        (True, False, 0.2, 0.0, 1, False)
    mbd = checked("--model", "minibatch-disc")
    assert (mbd.feature_matching, mbd.minibatch_disc, mbd.input_dropout, mbd.input_noise, mbd.g_steps, mbd.fid,
            mbd.gen_loss, mbd.mbd_kernels, mbd.mbd_dim) == (False, True, 0.0, 0.2, 3, True, "minimax", 100, 5)
    topk = checked("--topk", "--batch-size", "64")
    assert (topk.mu, topk.gamma) == (32, 0.99)
    assert checked("--model", "minibatch-disc", "--g-steps", "1").g_steps == 1  # a trick overrides its preset
    assert checked("--model", "minibatch-disc", "--no-minibatch-disc").minibatch_disc is False
    assert checked("--minibatch-disc").mbd_kernels == 100  # the switch turns the layer on in the other preset
    for bad in (["--gen-loss", "minimax"], ["--mu", "5"], ["--bottomk"], ["--gamma", "0.9"],
                ["--supervised-only", "--topk"], ["--supervised-only", "--vbn"], ["--mbd-kernels", "50"],
                ["--topk", "--mu", "0"], ["--topk", "--gamma", "1.5"], ["--num-labels", "7"],
                ["--no-fid", "--fid-weights", "x.pth"], ["--batch-size", "1"], ["--log-every", "0"],
                ["--save-every", "-1"], ["--wandb-entity", "me"], ["--vbn", "--sample-bn", "running"]):
        with pytest.raises(common.UserError):
            checked(*bad)


def test_save_eval_and_fid_intervals_count_epochs(monkeypatch):
    import argparse
    seen, real = [], argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **k: seen.append(self) or real(self, *a, **k))
    igc.parse_args([])
    helps = {a.option_strings[0]: a.help for a in seen[0]._actions if a.option_strings}
    assert all(helps[flag].startswith("epochs") for flag in ("--save-every", "--eval-every", "--fid-every")), helps
    assert helps["--log-every"].startswith("steps") and all(a.help for a in seen[0]._actions)


# ---------------------------------------------------------------------------------------------------------------
# GPU defects shown on the CPU under bf16 autocast
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mbd", [0, 7])
def test_d_output_layer_runs_in_float32_under_bf16_autocast(mbd):
    """The logits that top-k ranks come from a float32 output layer, not a bf16 one rounded afterwards."""
    torch.manual_seed(0)
    D = igc.Discriminator(input_dropout=0.0, input_noise=0.0, mbd_kernels=mbd)
    x = torch.rand(12, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        D.train()(x, init=True)
        D.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, features = D(x)
        h = features if mbd == 0 else D.mbd(features)
        expected = D.out(h)  # the same layer outside autocast, on the same (bf16-body) features
    assert logits.dtype == torch.float32 and features.dtype == torch.float32
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, logits.bfloat16().float())  # not bf16 values in a float32 tensor


def test_real_and_generated_batches_reach_d_in_one_dtype_under_bf16_autocast(tiny_cifar_dir, tmp_path, monkeypatch):
    seen = []
    real_forward = igc.Discriminator.forward

    def spy(self, x, *a, **k):
        if torch.is_autocast_enabled("cpu"):
            seen.append(x.dtype)
        return real_forward(self, x, *a, **k)

    class Trained(Exception):
        pass

    def stop(*a, **k):  # the evaluation after the step is not what this test is about (and bf16 is slow on a CPU)
        raise Trained

    monkeypatch.setattr(igc.Discriminator, "forward", spy)
    monkeypatch.setattr(igc, "evaluate", stop)
    with pytest.raises(Trained):
        run_main(*tiny_args(tiny_cifar_dir, tmp_path / "runs", "--amp", "bf16", "--max-steps", 1))
    # the D step's one call on labeled + unlabeled + generated images, the G step's fakes and its real features
    assert len(seen) == 3 and set(seen) == {torch.bfloat16}, seen


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------
def test_feature_matching_topk_smoke_and_resume(tiny_cifar_dir, tmp_path, monkeypatch):
    calls = []
    real_select = common.select_topk
    monkeypatch.setattr(common, "select_topk", lambda s, k, largest=True: calls.append((s.shape, k, largest))
                        or real_select(s, k, largest))
    flags = ["--topk", "--mu", 1, "--save-every", 0, "--hist-avg", 0.01]
    full, part = tmp_path / "full", tmp_path / "part"
    run_main(*tiny_args(tiny_cifar_dir, full, "--max-steps", 3, *flags))
    run = only_run_dir(full)
    args = json.loads((run / "args.json").read_text())
    assert args["feature_matching"] and not args["minibatch_disc"] and args["torch_version"] == torch.__version__
    assert calls == [((2,), 2, True)] * 3  # one G step per D step, scored by D's realness logit; k = B in epoch 0
    records = read_jsonl(run / "metrics.jsonl")
    losses = [r for r in records if "loss_lab" in r]
    assert [r["step"] for r in losses] == [3] and losses[0]["k"] == 2 and losses[0]["epoch"] == 3 / 20
    assert [r["step"] for r in evals(records)] == [3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3 and summary["steps_per_epoch"] == 20
    assert summary["test_error"] == evals(records)[0]["test_error"]
    assert "fid" not in summary  # the feature-matching model does not compute IS/FID by default
    assert (run / "samples" / "step_00000003.png").is_file()
    # the reported test error is that of the averaged D in the checkpoint, recomputed here independently
    a = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["step"] == 3 and a["k"] == 2 and a["ema_updates"] == 3
    D = igc.Discriminator(0.2, 0.0)
    D.load_state_dict(a["ema"])
    x, y = common.load_cifar10(tiny_cifar_dir, train=False, download=False)
    with torch.no_grad():
        logits = torch.cat([D.eval()((xb.float() - 127.5) / 128)[0] for xb in x.split(2)])
    assert summary["test_error"] == pytest.approx((logits.argmax(1) != y).float().mean().item())
    # the average moved away from D, but only slightly (decay 0.9999)
    diff = [(p - q).abs().max().item() for p, q in zip(a["ema"].values(), a["D"].values()) if p.is_floating_point()]
    assert 0 < max(diff) < 1e-2

    # stopped after 2 steps, resumed to 3: the same weights, averages and evaluation records as the full run
    run_main(*tiny_args(tiny_cifar_dir, part, "--max-steps", 2, *flags))
    ckpt_path = only_run_dir(part) / "checkpoints" / "last.pt"
    run_main(*tiny_args(tiny_cifar_dir, part, "--max-steps", 3, "--resume", ckpt_path, *flags))
    b = common.load_checkpoint(ckpt_path)
    assert b["step"] == 3 and b["ema_updates"] == 3 and len(list(part.iterdir())) == 1
    for key in ("D", "G", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["hist_g"]["mean"][0], b["hist_g"]["mean"][0]) and a["hist_d"]["count"] == b["hist_d"]["count"]
    rb = read_jsonl(only_run_dir(part) / "metrics.jsonl")
    assert [r["step"] for r in evals(rb)] == [2, 3]  # the stopped run's final evaluation, then the resumed run's
    assert evals(rb)[-1] == evals(records)[-1]
    # a checkpoint from another configuration is refused
    with pytest.raises(common.UserError, match="different configuration"):
        run_main(*tiny_args(tiny_cifar_dir, part, "--max-steps", 4, "--resume", ckpt_path))


def test_resume_across_an_epoch_boundary_equals_the_uninterrupted_run(tmp_path):
    """A run cut mid-epoch (k and the lr change at the next boundary) continues to the uninterrupted run's weights
    and evaluation records; --save-every counts epochs."""
    data = write_cifar10(tmp_path / "cifar", per_class_train=1, per_class_test=1)  # 10 and 10 images
    flags = ["--num-labels", 10, "--batch-size", 3, "--epochs", 2, "--lr-decay-start", 0, "--topk", "--mu", 1,
             "--gamma", 0.5, "--save-every", 1, "--log-every", 1]
    whole, cut = tmp_path / "whole", tmp_path / "cut"  # 3 steps per epoch
    run_main(*tiny_args(data, whole, *flags))
    run_main(*tiny_args(data, cut, *flags, "--max-steps", 4))
    ckpt = only_run_dir(cut) / "checkpoints" / "last.pt"
    run_main(*tiny_args(data, cut, *flags, "--resume", ckpt))
    a = common.load_checkpoint(only_run_dir(whole) / "checkpoints" / "last.pt")
    b = common.load_checkpoint(ckpt)
    assert a["step"] == b["step"] == 6
    for key in ("D", "G", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    ra, rb = (read_jsonl(only_run_dir(d) / "metrics.jsonl") for d in (whole, cut))
    assert evals(ra) == [r for r in evals(rb) if r["step"] != 4]  # less the stopped run's own final evaluation
    assert [(r["step"], r["k"]) for r in evals(ra)] == [(3, 3), (6, 1)]
    # one loss line per step here (--log-every 1), so these match too, step for step
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("per_s")} for r in rs if "loss_lab" in r]  # noqa
    assert strip(ra) == strip(rb) and [r["lr"] for r in strip(ra)] == [3e-4] * 3 + [1.5e-4] * 3


def test_minibatch_disc_with_fid_and_supervised_baseline(tiny_cifar_dir, tmp_path):
    import metrics
    import numpy as np

    weights = tmp_path / "inception.pth"
    torch.save(metrics.FIDInceptionV3().state_dict(), weights)
    # reference statistics cached beforehand under the name the script uses for these weights (the first 10 hex
    # digits of their sha256): it must load them, not recompute them (one Inception pass over 10 samples only)
    cache = tiny_cifar_dir / f"fid_stats_cifar10_train_{hashlib.sha256(weights.read_bytes()).hexdigest()[:10]}.npz"
    np.savez(cache, mu=np.zeros(2048), sigma=np.eye(2048))
    out = tmp_path / "runs"
    run_main(*tiny_args(tiny_cifar_dir, out, "--model", "minibatch-disc", "--max-steps", 1,
                        "--fid-weights", weights, "--fid-samples", 10, "--fid-batch-size", 10))
    run = only_run_dir(out)
    summary = json.loads((run / "summary.json").read_text())
    record = read_jsonl(run / "metrics.jsonl")[-1]
    for key in ("fid", "is_mean", "is_std", "test_error"):
        assert summary[key] == record[key]
    assert summary["fid"] > 0 and 1 - 1e-6 <= summary["is_mean"] <= 10
    assert sorted(p.name for p in tiny_cifar_dir.glob("*.npz")) == [cache.name]
    ckpt = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["opt_g"]["state"][0]["step"].item() == 3  # three G steps per D step
    assert ckpt["opt_d"]["state"][0]["step"].item() == 1
    assert ckpt["D"]["mbd.T"].shape == (192, 500)

    # the baseline: same classifier, labeled data only, no generator in the checkpoint
    sup = tmp_path / "sup"
    run_main(*tiny_args(tiny_cifar_dir, sup, "--supervised-only", "--max-steps", 1))
    ckpt = common.load_checkpoint(only_run_dir(sup) / "checkpoints" / "last.pt")
    assert "G" not in ckpt and "test_error" in json.loads((only_run_dir(sup) / "summary.json").read_text())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []
    real_loss = common.feature_matching_loss

    def nan_on_third_step(*a):
        calls.append(1)
        return real_loss(*a) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(common, "feature_matching_loss", nan_on_third_step)
    out = tmp_path / "runs"
    with pytest.raises(common.UserError, match=r"non-finite loss_gen \(nan\) at step 3: .*last good checkpoint: "):
        run_main(*tiny_args(write_cifar10(tmp_path / "cifar", per_class_train=1, per_class_test=1), out,
                            "--num-labels", 10, "--batch-size", 5, "--epochs", 3, "--save-every", 1))
    ckpt = common.load_checkpoint(only_run_dir(out) / "checkpoints" / "last.pt")  # 10 images: 2 steps per epoch
    assert ckpt["step"] == 2 and common.nonfinite_entries(ckpt) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no run folder
# ---------------------------------------------------------------------------------------------------------------
def test_bad_num_labels_cli(tiny_cifar_dir, tmp_path):
    out = tmp_path / "runs"
    proc = run_script(SCRIPT, *tiny_args(tiny_cifar_dir, out), "--num-labels", 7, timeout=120)
    line = assert_one_line_error(proc)
    assert "--num-labels" in line and "multiple of 10" in line
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--topk", "--mu", "0"], "--mu"),
    (["--data-dir", "EMPTY"], "CIFAR-10 not found"),
    (["--amp", "fp16"], "--amp fp16"),
    (["--fid", "--fid-weights", "MISSING.pth"], "--fid-weights"),
    (["--check-host-sync"], "needs a CUDA device"),
])
def test_bad_input_one_line(tiny_cifar_dir, tmp_path, monkeypatch, capsys, extra, message):
    out = tmp_path / "runs"
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if e == "EMPTY" else str(tmp_path / e) if e.endswith(".pth") else e for e in extra]
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, tiny_args(tiny_cifar_dir, out)), *extra])
    with pytest.raises(SystemExit) as exc:
        common.run_cli(igc.main)
    assert exc.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_sigterm_saves_like_ctrl_c_and_a_foreign_folder_is_never_resumed_into(tmp_path, monkeypatch, capsys):
    import shutil
    import signal

    real, calls = igc.unsupervised_loss, []

    def term_at_second_step(*a):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # what SLURM and `kill` send
        return real(*a)

    monkeypatch.setattr(igc, "unsupervised_loss", term_at_second_step)
    flags = ["--dataset", "fake", "--fake-size", 21, "--num-labels", 10, "--batch-size", 7, "--epochs", 1]
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        common.run_cli(lambda: igc.main([str(a) for a in tiny_args("unused", out, *flags)]))
    assert info.value.code == 130 and "continue with: python improved_gan_cifar.py" in capsys.readouterr().err
    ckpt = only_run_dir(out) / "checkpoints" / "last.pt"
    assert common.load_checkpoint(ckpt)["step"] == 2
    # the checkpoint copied out of its run folder: refused, the folder it sits in left as it was
    foreign = tmp_path / "backup"
    foreign.mkdir()
    shutil.copy(ckpt, foreign / "last.pt")
    (foreign / "metrics.jsonl").write_text("keep\n")
    with pytest.raises(common.UserError, match="not inside a run folder"):
        run_main(*tiny_args("unused", out, *flags, "--resume", foreign / "last.pt"))
    assert sorted(p.name for p in foreign.iterdir()) == ["last.pt", "metrics.jsonl"]
    assert (foreign / "metrics.jsonl").read_text() == "keep\n"
