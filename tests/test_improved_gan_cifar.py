"""Tests of improved_gan_cifar.py: model definitions, losses, smoke runs of both models on tiny CIFAR-10 pickles,
resume == uninterrupted, the IS/FID path with a random-weights Inception file, and one-line input errors.

The training runs are in-process (main() with a patched sys.argv, one thread) to avoid paying the torch import per
run; one bad-input case goes through a real subprocess to check the command-line path end to end.
"""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, only_run_dir, run_script

import common
import improved_gan_cifar as igc

SCRIPT = "improved_gan_cifar.py"


def run_main(monkeypatch, *argv):
    """Run the script's main() in this process with `argv`; returns nothing, raises what main raises."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, argv)])
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        igc.main()
    finally:
        torch.set_num_threads(old)


def tiny_args(data_dir, out_dir, *extra):
    return ["--data-dir", data_dir, "--no-download", "--out-dir", out_dir, "--device", "cpu", "--num-labels", 20,
            "--batch-size", 2, "--init-size", 10, "--grid-size", 4, *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    f_real, f_fake = torch.randn(8, 192), torch.randn(5, 192)
    torch.testing.assert_close(igc.feature_matching_loss(f_real, f_fake),
                               (f_real.mean(0) - f_fake.mean(0)).abs().mean())


def test_model_presets_and_rejections(monkeypatch):
    def checked(*argv):
        monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
        args = igc.parse_args()
        igc.check_args(args)
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
    for bad in (["--gen-loss", "minimax"], ["--mu", "5"], ["--bottomk"], ["--supervised-only", "--topk"],
                ["--mbd-kernels", "50"], ["--topk", "--mu", "0"], ["--topk", "--gamma", "1.5"],
                ["--num-labels", "7"], ["--no-fid", "--fid-weights", "x.pth"]):
        with pytest.raises(common.UserError):
            checked(*bad)


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
    run_main(monkeypatch, *tiny_args(tiny_cifar_dir, full, "--max-steps", 3, *flags))
    run = only_run_dir(full)
    args = json.loads((run / "args.json").read_text())
    assert args["feature_matching"] and not args["minibatch_disc"] and args["torch_version"] == torch.__version__
    assert calls == [((2,), 2, True)] * 3  # one G step per D step, scored by D's realness logit; k = B in epoch 0
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [3] and records[0]["k"] == 2 and records[0]["epoch"] == 3 / 20
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3 and summary["steps_per_epoch"] == 20
    assert summary["test_error"] == records[0]["test_error"]
    assert "fid" not in summary  # the feature-matching model does not compute IS/FID by default
    assert (run / "samples" / "step_00000003.png").is_file()
    # the reported test error is that of the averaged D in the checkpoint, recomputed here independently
    a = common.load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["step"] == 3 and a["k"] == 2
    D = igc.Discriminator(0.2, 0.0)
    D.load_state_dict(a["ema"])
    x, y = common.load_cifar10(tiny_cifar_dir, train=False, download=False)
    with torch.no_grad():
        logits = torch.cat([D.eval()((xb.float() - 127.5) / 128)[0] for xb in x.split(2)])
    assert summary["test_error"] == pytest.approx((logits.argmax(1) != y).float().mean().item())
    # the average moved away from D, but only slightly (decay 0.9999)
    diff = [(p - q).abs().max().item() for p, q in zip(a["ema"].values(), a["D"].values()) if p.is_floating_point()]
    assert 0 < max(diff) < 1e-2

    # interrupted after 2 steps, resumed to 3: the same weights, averages and logged numbers as the full run
    run_main(monkeypatch, *tiny_args(tiny_cifar_dir, part, "--max-steps", 2, *flags))
    ckpt_path = only_run_dir(part) / "checkpoints" / "last.pt"
    run_main(monkeypatch, *tiny_args(tiny_cifar_dir, part, "--max-steps", 3, "--resume", ckpt_path, *flags))
    b = common.load_checkpoint(ckpt_path)
    assert b["step"] == 3 and len(list(part.iterdir())) == 1
    for key in ("D", "G", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["sums"], b["sums"]) and torch.equal(a["hist_g"]["mean"][0], b["hist_g"]["mean"][0])
    rb = read_jsonl(only_run_dir(part) / "metrics.jsonl")
    assert [r["step"] for r in rb] == [2, 3]  # the interrupted run's final evaluation, then the resumed run's
    for key in ("loss_lab", "loss_unl", "loss_gen", "train_error", "test_error", "k"):
        assert records[-1][key] == rb[-1][key], key
    # a checkpoint from another configuration is refused
    with pytest.raises(common.UserError, match="different configuration"):
        run_main(monkeypatch, *tiny_args(tiny_cifar_dir, part, "--max-steps", 4, "--resume", ckpt_path))


def test_minibatch_disc_with_fid_and_supervised_baseline(tiny_cifar_dir, tmp_path, monkeypatch):
    import metrics
    import numpy as np

    weights = tmp_path / "inception.pth"
    torch.save(metrics.FIDInceptionV3().state_dict(), weights)
    # reference statistics cached beforehand under the name the script uses for these weights: it must load them
    # (not recompute them), which also keeps this test to one Inception pass over 10 samples
    cache = tiny_cifar_dir / f"fid_stats_cifar10_train_{igc.file_hash(weights)}.npz"
    np.savez(cache, mu=np.zeros(2048), sigma=np.eye(2048))
    out = tmp_path / "runs"
    run_main(monkeypatch, *tiny_args(tiny_cifar_dir, out, "--model", "minibatch-disc", "--max-steps", 1,
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
    run_main(monkeypatch, *tiny_args(tiny_cifar_dir, sup, "--supervised-only", "--max-steps", 1))
    ckpt = common.load_checkpoint(only_run_dir(sup) / "checkpoints" / "last.pt")
    assert "G" not in ckpt and "test_error" in json.loads((only_run_dir(sup) / "summary.json").read_text())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cifar_dir, tmp_path, monkeypatch):
    calls = []
    real_loss = igc.feature_matching_loss

    def nan_on_second_step(*a):
        calls.append(1)
        return real_loss(*a) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(igc, "feature_matching_loss", nan_on_second_step)
    out = tmp_path / "runs"
    with pytest.raises(common.UserError, match="non-finite loss at step 2 "):
        run_main(monkeypatch, *tiny_args(tiny_cifar_dir, out, "--max-steps", 3, "--save-every", 1))
    ckpt = common.load_checkpoint(only_run_dir(out) / "checkpoints" / "last.pt")
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["G"].values() if v.is_floating_point())


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
