"""Tests of mog_topk.py (top-k GAN on a mixture of Gaussians) and its update-direction analysis."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, assert_one_line_error, cli, only_run_dir, run_script

import common
import metrics
import mog_topk

sys.path.insert(0, str(REPO / "analysis"))
import mog_update_direction  # noqa: E402

TINY = ["--hidden-dim", "32", "--batch-size", "64", "--eval-samples", "2000", "--device", "cpu"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 50-iteration top-k run with a fast k schedule (epoch = 10 iterations, gamma 0.5, mu 10)."""
    out = tmp_path_factory.mktemp("mog_short")
    run_script("mog_topk.py", *TINY, "--n-modes", "25", "--iterations", "50", "--topk", "--mu", "10",
               "--gamma", "0.5", "--iters-per-epoch", "10", "--log-every", "10", "--eval-every", "25",
               "--save-every", "25", "--keep-checkpoints", "--out-dir", out, check=True, timeout=600)
    return only_run_dir(out)


def test_run_folder_and_summary_match_recomputed_metrics(short_run):
    for name in ["args.json", "metrics.jsonl", "summary.json", "samples.npz", "checkpoints/last.pt",
                 "checkpoints/step_0000025.pt", "samples/step_0000000.png", "samples/step_0000025.png",
                 "samples/step_0000050.png"]:
        assert (short_run / name).is_file(), name
    summary = json.loads((short_run / "summary.json").read_text())
    data = np.load(short_run / "samples.npz")
    assert data["samples"].shape == (2000, 2) and data["centers"].shape == (25, 2)
    spacing = json.loads((short_run / "args.json").read_text())["grid_spacing"]
    np.testing.assert_allclose(data["centers"], metrics.grid_centers(25, spacing))
    recomputed = metrics.mode_metrics(data["samples"], data["centers"], float(data["std"]), threshold=4.0)
    for key in ("high_quality", "modes_recovered", "reverse_kl"):
        assert summary[key] == pytest.approx(recomputed[key], abs=1e-12), key
    assert summary["step"] == 50 and summary["variant"] == "topk" and summary["fast_step"] is True
    final_eval = [r for r in read_jsonl(short_run / "metrics.jsonl") if "eval/high_quality" in r][-1]
    assert final_eval["step"] == 50 and final_eval["eval/high_quality"] == pytest.approx(summary["high_quality"])


def test_k_schedule_over_epochs(short_run):
    # k = max(mu, floor(64 * 0.5**epoch)), epoch = iteration // 10 (0-based): the record at step s is the k of the
    # last iteration of its window, iteration s - 1. Records every 10 steps, plus at the checkpoint at step 25.
    logged = {r["step"]: r["k"] for r in read_jsonl(short_run / "metrics.jsonl") if "loss_d" in r}
    assert logged == {10: 64, 20: 32, 25: 16, 30: 16, 40: 10, 50: 10}
    for epoch, k in enumerate([64, 32, 16, 10, 10]):
        assert common.topk_k(64, epoch, 10, 0.5) == k


def test_select_topk_and_bottomk_on_hand_made_scores():
    scores = torch.tensor([0.1, 3.0, -2.0, 5.0, 1.0, -0.5])
    assert sorted(common.select_topk(scores, 2).tolist()) == [1, 3]
    assert sorted(common.select_topk(scores, 3, largest=False).tolist()) == [0, 2, 5]
    assert sorted(common.select_topk(scores, 6).tolist()) == list(range(6))


@pytest.mark.parametrize("bottomk", [False, True])
def test_train_step_generator_gradient_uses_only_selected_fakes(bottomk):
    """With D frozen (lr 0), G's gradient after train_step equals the gradient of the non-saturating loss on
    the k highest (lowest) D scores, picked here by sorting."""
    torch.manual_seed(0)
    G, D = mog_topk.Generator(2, 16), mog_topk.Discriminator(16)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=0.0)
    ns = argparse.Namespace(bottomk=bottomk, label_smoothing=0.0, feature_matching=False, minibatch_disc=False,
                            hist_avg=0.0)
    cfg = mog_topk.StepConfig(ns, G, D)
    real, z_d, z_g, k = torch.randn(8, 2), torch.randn(8, 2), torch.randn(8, 2), 3
    G_ref = mog_topk.Generator(2, 16)
    G_ref.load_state_dict(G.state_dict())
    mog_topk.train_step(G, D, opt_g, opt_d, cfg, real, z_d, z_g, None, k)
    scores = D(G_ref(z_g))
    order = torch.argsort(scores.detach(), descending=not bottomk)[:k]
    loss = F.softplus(-scores[order]).mean()
    expected = torch.autograd.grad(loss, list(G_ref.parameters()))
    for p, g in zip(G.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bottomk, smoothing, k", [(False, 0.0, 64), (False, 0.0, 20), (True, 0.2, 20)])
def test_fast_step_equals_autograd_train_step(bottomk, smoothing, k):
    """FastStep (hand-written backprop, the script's default) and train_step (autograd), from identical weights on
    identical batches: the same losses and the same G and D weights after 10 Adam steps, to float rounding."""
    ns = argparse.Namespace(bottomk=bottomk, label_smoothing=smoothing, feature_matching=False,
                            minibatch_disc=False, hist_avg=0.0)
    torch.manual_seed(0)
    G0, D0 = mog_topk.Generator(2, 32), mog_topk.Discriminator(32)
    results = {}
    for kind in ("autograd", "fast"):
        G, D = mog_topk.Generator(2, 32), mog_topk.Discriminator(32)
        G.load_state_dict(G0.state_dict())
        D.load_state_dict(D0.state_dict())
        opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
        cfg = mog_topk.StepConfig(ns, G, D)
        fast = mog_topk.FastStep(G, D, cfg)
        gen = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(10):
            real, z_d, z_g = (torch.randn(64, 2, generator=gen) for _ in range(3))
            out = fast(opt_g, opt_d, real, z_d, z_g, k) if kind == "fast" else \
                mog_topk.train_step(G, D, opt_g, opt_d, cfg, real, z_d, z_g, None, k)
            losses.append(torch.stack(out))
        results[kind] = (torch.stack(losses), [p.detach() for p in [*G.parameters(), *D.parameters()]])
    torch.testing.assert_close(results["fast"][0], results["autograd"][0], rtol=1e-5, atol=1e-6)
    for p_fast, p_auto in zip(results["fast"][1], results["autograd"][1]):
        torch.testing.assert_close(p_fast, p_auto, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results["fast"][1][0], G0.net[0].weight)  # the weights did move


def test_every_trick_with_topk_runs_on_the_autograd_step(tmp_path):
    """All Improved-GAN options at once with top-k: a complete run folder, on train_step (FastStep cannot do them)."""
    run_script("mog_topk.py", *TINY, "--n-modes", "4", "--iterations", "20", "--topk", "--iters-per-epoch", "5",
               "--feature-matching", "--minibatch-disc", "--mbd-kernels", "8", "--mbd-dim", "3", "--hist-avg", "0.1",
               "--label-smoothing", "0.1", "--vbn", "--log-every", "10", "--eval-every", "10", "--out-dir", tmp_path,
               check=True, timeout=600)
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["step"] == 20 and summary["fast_step"] is False
    assert all(np.isfinite(summary[key]) for key in ("high_quality", "modes_recovered", "reverse_kl"))


def weights(run):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return {f"{net}.{key}": value for net in ("G", "D") for key, value in state[net].items()}


def eval_records(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if "eval/high_quality" in r]


def assert_same_run(a, b):
    """The weights, evaluation records and final samples of run folders a and b are identical."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[key], wb[key]) for key in wa)
    assert eval_records(a) == eval_records(b)
    np.testing.assert_array_equal(np.load(a / "samples.npz")["samples"], np.load(b / "samples.npz")["samples"])


@pytest.mark.parametrize("fast_step", [True, False], ids=["fast-step", "autograd"])
def test_resume_gives_the_weights_and_evaluations_of_an_uninterrupted_run(tmp_path, fast_step):
    common_flags = [*TINY, "--n-modes", "4", "--iterations", "40", "--topk", "--iters-per-epoch", "10",
                    "--log-every", "10", "--eval-every", "20", "--save-every", "20",
                    "--fast-step" if fast_step else "--no-fast-step"]
    run_script("mog_topk.py", *common_flags, "--out-dir", tmp_path / "a", check=True, timeout=600)
    run_script("mog_topk.py", *common_flags, "--max-steps", "20", "--out-dir", tmp_path / "b", check=True, timeout=600)
    b = only_run_dir(tmp_path / "b")
    run_script("mog_topk.py", *common_flags, "--out-dir", tmp_path / "b", "--resume",
               b / "checkpoints" / "last.pt", check=True, timeout=600)
    assert only_run_dir(tmp_path / "b") == b
    assert_same_run(only_run_dir(tmp_path / "a"), b)
    summary = json.loads((b / "summary.json").read_text())
    assert summary["step"] == 40 and summary["resumed_from_step"] == 20 and summary["fast_step"] is fast_step


def _signal_at_step(monkeypatch, sig, step):
    """Send `sig` to this process in the middle of training step `step` (sample_real runs once per step)."""
    real, calls = mog_topk.sample_real, []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(mog_topk, "sample_real", hooked)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_inside_a_log_window_resumes_to_the_uninterrupted_weights_and_evaluations(sig, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (what SLURM sends) at step 13 of 30, in the middle of a log window and between checkpoints:
    a checkpoint at 13 and exit status 130; the resumed run ends with the uninterrupted run's weights, evaluation
    records and samples (its loss line of steps 11-20 is split at the stop)."""
    flags = [*TINY, "--n-modes", "4", "--iterations", "30", "--topk", "--iters-per-epoch", "10", "--gamma", "0.5",
             "--log-every", "10", "--eval-every", "10", "--save-every", "20"]
    old = signal.getsignal(signal.SIGTERM)
    try:
        mog_topk.main([*flags, "--out-dir", str(tmp_path / "whole")])
        with monkeypatch.context() as m:
            _signal_at_step(m, sig, 13)
            with pytest.raises(common.Interrupted, match="stopped at step 13"):
                mog_topk.main([*flags, "--out-dir", str(tmp_path / "cut")])
    finally:
        signal.signal(signal.SIGTERM, old)
    cut = only_run_dir(tmp_path / "cut")
    assert torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["step"] == 13
    assert not (cut / "summary.json").exists()
    mog_topk.main([*flags, "--out-dir", str(tmp_path / "cut"), "--resume", str(cut / "checkpoints" / "last.pt")])
    assert_same_run(only_run_dir(tmp_path / "whole"), cut)
    assert [r["step"] for r in read_jsonl(cut / "metrics.jsonl") if "loss_d" in r] == [10, 13, 20, 30]


def test_a_generator_state_saved_on_cuda_resumes_on_the_cpu_reseeded_with_a_note(tmp_path, capsys):
    """The training batches come from a device generator; a CUDA generator's state (16 bytes) does not fit a CPU
    one (5,056 bytes), so a checkpoint made on a GPU continues on the CPU from a reseeded generator, saying so."""
    flags = [*TINY, "--n-modes", "4", "--iterations", "20", "--log-every", "10", "--eval-every", "10",
             "--save-every", "10", "--out-dir", str(tmp_path)]
    mog_topk.main([*flags, "--max-steps", "10"])
    path = only_run_dir(tmp_path) / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert state["gen"]["device"] == "cpu" and state["gen"]["state"].numel() == 5056
    state["gen"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    common.save_checkpoint(path, state)
    capsys.readouterr()
    mog_topk.main([*flags, "--resume", str(path)])
    err = capsys.readouterr().err
    assert "note: gen was saved on cuda, this run draws on cpu: reseeded" in err and "not bit-identical" in err
    assert json.loads((path.parent.parent / "summary.json").read_text())["step"] == 20


def test_resume_of_a_checkpoint_outside_its_run_folder_touches_nothing(short_run, tmp_path, capsys):
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(short_run / "checkpoints" / "last.pt", backup / "last.pt")
    (backup / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    (backup / "summary.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in backup.iterdir()}
    flags = [*TINY, "--n-modes", "25", "--iterations", "60", "--topk", "--mu", "10", "--gamma", "0.5",
             "--iters-per-epoch", "10", "--log-every", "10", "--eval-every", "25", "--save-every", "25"]
    with pytest.raises(SystemExit) as info:
        common.run_cli(lambda: mog_topk.main([*flags, "--resume", str(backup / "last.pt")]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 2 and len(err) == 1 and "not inside a run folder" in err[0], err
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == before


BAD_FLAGS = {"mu 0": ["--topk", "--mu", "0"], "mu > batch": ["--topk", "--mu", "65"],
             "gamma 1.5": ["--topk", "--gamma", "1.5"], "negative iterations": ["--iterations", "-5"],
             "30 modes": ["--n-modes", "30"], "bottomk without topk": ["--bottomk"],
             "mbd kernels without minibatch-disc": ["--mbd-kernels", "8"]}


@pytest.mark.parametrize("name", [*BAD_FLAGS, "diverges"])
def test_bad_flags_one_line_error(tmp_path, capsys, name):
    # "diverges": absurd learning rates, stopped at the first non-finite loss, named in one line
    flags = BAD_FLAGS.get(name) or ["--lr-g", "1e30", "--lr-d", "1e30", "--iterations", "30", "--log-every", "10",
                                    "--eval-every", "10"]
    out = tmp_path / name.replace(" ", "_")
    line = assert_one_line_error(cli(mog_topk.main, [*TINY, *flags, "--out-dir", out], capsys))
    assert line.startswith("error: "), name
    if name == "diverges":
        assert "non-finite loss_" in line and " at step " in line and "last good checkpoint" in line, line
        assert not (only_run_dir(out) / "summary.json").exists()
    else:
        assert not out.exists(), name  # nothing written before validation


def test_update_direction_analysis(short_run, tmp_path):
    result = mog_update_direction.main(["--checkpoint", str(short_run / "checkpoints" / "step_0000025.pt"),
                                        "--batch-size", "500", "--k", "100", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "update_direction.json").read_text())
    assert (tmp_path / "update_direction.png").is_file()
    assert saved["step"] == 25 and saved["k"] == 100
    for variant in ("topk", "bottomk"):
        assert sum(row["count"] for row in saved[variant]["all"]) == 500
        assert sum(row["count"] for row in saved[variant]["selected"]) == 100
        for row in saved[variant]["all"]:
            assert row["mean_cos"] is None or -1.0 <= row["mean_cos"] <= 1.0
    assert result["topk"]["mean_cos_all"] == pytest.approx(saved["topk"]["mean_cos_all"])


def test_update_direction_several_checkpoints_write_a_summary(short_run, tmp_path):
    ckpts = [str(short_run / "checkpoints" / f"step_{s:07d}.pt") for s in (25, 50)]
    results = mog_update_direction.main(["--checkpoint", *ckpts, "--batch-size", "400", "--k", "100",
                                         "--out", str(tmp_path)])
    assert [r["step"] for r in results] == [25, 50]
    for r in results:
        stem = f"{short_run.name}_it{r['step']:07d}"
        assert json.loads((tmp_path / f"{stem}.json").read_text())["paired_p_all"] == r["paired_p_all"]
        assert (tmp_path / f"{stem}.png").is_file()
        assert r["paired_p_all"] is None or 0.0 <= r["paired_p_all"] <= 1.0
    summary = (tmp_path / "summary.md").read_text()
    table_rows = [l for l in summary.splitlines() if l.startswith(f"| {short_run.name} |")]
    assert len(table_rows) == 2
    ahead = sum(r["topk"]["mean_cos_all"] > r["bottomk"]["mean_cos_all"] for r in results)
    behind = sum(r["topk"]["mean_cos_all"] < r["bottomk"]["mean_cos_all"] for r in results)
    assert f"all samples: {ahead} of 2" in summary and f"Bottom-k step ahead over all samples: {behind} of 2" in summary


def test_paired_p_matches_a_hand_computed_t_test():
    a = np.array([0.3, 0.1, 0.4, 0.2])
    b = np.array([0.1, 0.0, 0.1, 0.1])
    d = a - b
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    from scipy import stats
    assert mog_update_direction.paired_p(a, b) == pytest.approx(2 * stats.t.sf(abs(t), df=len(d) - 1))
    assert mog_update_direction.paired_p(a, a) is None  # identical steps: nothing to test


def test_update_direction_refuses_several_checkpoints_without_out(short_run):
    ckpt = str(short_run / "checkpoints" / "step_0000025.pt")
    with pytest.raises(common.UserError, match="--out"):
        mog_update_direction.parse_args(["--checkpoint", ckpt, ckpt])
    with pytest.raises(common.UserError, match="no such file"):
        mog_update_direction.parse_args(["--checkpoint", ckpt + ".missing"])


def test_direction_stats_on_hand_made_points():
    centers = np.array([[0.0, 0.0], [2.0, 0.0]])
    before = np.array([[0.5, 0.0], [2.0, 0.3]])
    after = np.array([[0.4, 0.0], [2.0, 0.4]])  # first moves towards its mode, second away
    cos, dist = mog_update_direction.direction_stats(before, after, centers, std=0.05)
    np.testing.assert_allclose(cos, [1.0, -1.0])
    np.testing.assert_allclose(dist, [10.0, 6.0])


# ---------------------------------------------------------------------------------------------------------------
# --setup (the setups of the MoG setup study)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(mog_topk.SETUPS))
def test_setup_fills_only_the_settings_not_given(name):
    want = mog_topk.SETUPS[name]
    a = mog_topk.parse_args(["--setup", name, "--topk"])
    assert (a.grid_spacing, a.hidden_layers, a.beta1, a.beta2, a.iters_per_epoch) == \
        (want["grid_spacing"], want["hidden_layers"], want["beta1"], want["beta2"], want["iters_per_epoch"])
    assert a.mu == int(256 * want["mu_fraction"])
    b = mog_topk.parse_args(["--setup", name, "--topk", "--grid-spacing", "3", "--hidden-layers", "2", "--beta1", "0",
                             "--beta2", "0.9", "--iters-per-epoch", "7", "--mu", "5"])
    assert (b.grid_spacing, b.hidden_layers, b.beta1, b.beta2, b.iters_per_epoch, b.mu) == (3.0, 2, 0.0, 0.9, 7, 5)
    # without --topk the k schedule is unused: every setup keeps base's inert values, so GAN runs of setups that
    # differ only in the k schedule have equal arguments
    g = mog_topk.parse_args(["--setup", name])
    assert (g.iters_per_epoch, g.mu) == (500, 128) and g.grid_spacing == want["grid_spacing"]


@pytest.mark.parametrize("flags, refused", [
    (["--mu", "5"], "--mu only applies with --topk"), (["--gamma", "0.5"], "--gamma only applies with --topk"),
    (["--bottomk"], "--bottomk only applies with --topk"),
    (["--iters-per-epoch", "7"], "--iters-per-epoch only applies with --topk"),
    (["--setup", "slowk", "--iters-per-epoch", "7"], "--iters-per-epoch only applies with --topk"),
    (["--mbd-kernels", "8"], "only apply with --minibatch-disc"), (["--mbd-dim", "3"], "only apply with --minibatch-disc"),
    (["--minibatch-disc", "--mbd-kernels", "0"], "--mbd-kernels and --mbd-dim must be at least 1"),
    (["--topk", "--iters-per-epoch", "0"], "--iters-per-epoch must be a positive integer")])
def test_switch_dependent_flags_are_refused_without_their_switch(flags, refused):
    with pytest.raises(common.UserError, match=refused):
        mog_topk.parse_args(flags)


def test_a_switch_that_is_off_resolves_to_the_values_the_study_runs_recorded():
    """Without --topk (--minibatch-disc) the k schedule (the kernels) is unused, and every setup gives the values in
    the args.json of the committed study runs, so the sweep still finds those run folders its own."""
    recorded = json.loads(next((REPO / "results" / "mog" / "study" / "all").glob("mog25_gan__1__*/args.json"))
                          .read_text())
    resolved = vars(mog_topk.parse_args(["--setup", "all"]))
    for key in ("mu", "gamma", "iters_per_epoch", "mbd_kernels", "mbd_dim", "grid_spacing", "hidden_layers",
                "beta1", "beta2"):
        assert resolved[key] == recorded[key], key
    topk = mog_topk.parse_args(["--setup", "all", "--topk"])
    assert (topk.mu, topk.gamma, topk.iters_per_epoch) == (192, 0.99, 2000)
    mbd = mog_topk.parse_args(["--minibatch-disc", "--mbd-dim", "3"])
    assert (mbd.mbd_kernels, mbd.mbd_dim) == (100, 3)


def test_default_setup_is_the_studys_choice_and_unknown_setups_are_refused(capsys):
    assert mog_topk.parse_args([]).setup == mog_topk.DEFAULT_SETUP
    with pytest.raises(SystemExit):
        mog_topk.parse_args(["--setup", "nope"])
    assert "--setup" in capsys.readouterr().err


def test_resume_of_a_checkpoint_made_before_setup_existed(short_run, tmp_path):
    # Runs of the study started before --setup existed: their args carry no "setup" but the same resolved values.
    import shutil
    run = tmp_path / short_run.name
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("run.lock"))
    state = common.load_checkpoint(run / "checkpoints" / "step_0000025.pt")
    del state["args"]["setup"]
    torch.save(state, run / "checkpoints" / "last.pt")
    flags = [*TINY, "--n-modes", "25", "--iterations", "50", "--topk", "--mu", "10", "--gamma", "0.5",
             "--iters-per-epoch", "10", "--log-every", "10", "--eval-every", "25", "--save-every", "25",
             "--resume", str(run / "checkpoints" / "last.pt")]
    mog_topk.main(flags)
    assert json.loads((run / "summary.json").read_text())["step"] == 50
    # a setup that resolves to other values is still refused
    other = "base" if mog_topk.DEFAULT_SETUP != "base" else "all"
    with pytest.raises(common.UserError, match="different configuration"):
        mog_topk.main(flags + ["--setup", other])


# ---------------------------------------------------------------------------------------------------------------
# --hidden-layers (the setup study's depth factor)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 3, 4])
def test_hidden_layers_sets_the_depth_of_g_and_d(layers):
    G, D = mog_topk.Generator(2, 16, hidden_layers=layers), mog_topk.Discriminator(16, hidden_layers=layers)
    linear = lambda m: [x for x in m.modules() if isinstance(x, torch.nn.Linear)]  # noqa: E731
    assert [(l.in_features, l.out_features) for l in linear(G)] == [(2, 16)] + [(16, 16)] * (layers - 1) + [(16, 2)]
    assert [(l.in_features, l.out_features) for l in linear(D)] == [(2, 16)] + [(16, 16)] * (layers - 1) + [(16, 1)]
    assert D(torch.randn(5, 2), features=True)[1].shape == (5, 16)


def test_default_depth_keeps_the_checkpoint_layout():
    """Default 3 hidden layers: the same parameter names as before the flag existed (old checkpoints load)."""
    assert list(mog_topk.Discriminator(8).state_dict()) == [
        "trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias", "trunk.4.weight", "trunk.4.bias",
        "out.weight", "out.bias"]
    assert list(mog_topk.Generator(2, 8).state_dict()) == [
        "z_ref", "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias",
        "net.6.weight", "net.6.bias"]


def test_fast_step_equals_autograd_with_four_hidden_layers():
    ns = argparse.Namespace(bottomk=False, label_smoothing=0.0, feature_matching=False, minibatch_disc=False,
                            hist_avg=0.0)
    torch.manual_seed(0)
    G0, D0 = mog_topk.Generator(2, 16, hidden_layers=4), mog_topk.Discriminator(16, hidden_layers=4)
    weights = {}
    for kind in ("autograd", "fast"):
        G, D = mog_topk.Generator(2, 16, hidden_layers=4), mog_topk.Discriminator(16, hidden_layers=4)
        G.load_state_dict(G0.state_dict())
        D.load_state_dict(D0.state_dict())
        opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
        cfg = mog_topk.StepConfig(ns, G, D)
        fast = mog_topk.FastStep(G, D, cfg)
        gen = torch.Generator().manual_seed(3)
        for _ in range(5):
            real, z_d, z_g = (torch.randn(32, 2, generator=gen) for _ in range(3))
            fast(opt_g, opt_d, real, z_d, z_g, 12) if kind == "fast" else \
                mog_topk.train_step(G, D, opt_g, opt_d, cfg, real, z_d, z_g, None, 12)
        weights[kind] = [p.detach() for p in [*G.parameters(), *D.parameters()]]
    for p_fast, p_auto in zip(weights["fast"], weights["autograd"]):
        torch.testing.assert_close(p_fast, p_auto, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setup", ["base", "all"])
def test_bench_gemm_floor_and_replay_time_exactly_the_big_products_of_a_fast_step(setup):
    """benchmarks/bench_mog.py's bounds are honest only if gemm_floor does the 256x256-weight matrix products of one
    FastStep iteration, no more and no fewer, and gemm_replay's recorded calls are those products on the step's own
    buffers: count them, by row count, in a real FastStep call, and replay them into the buffers they wrote."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_mog", REPO / "benchmarks" / "bench_mog.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    G, D, opt_g, opt_d = bench.fresh("fast_step", setup)
    step = mog_topk.FastStep(G, D, mog_topk.StepConfig(bench.NO_TRICKS, G, D))
    real, z_d, z_g = bench.batches(1, 0, setup)[0]
    calls = bench.big_products_of(lambda: step(opt_g, opt_d, real, z_d, z_g, 256))
    rows = [max(a.shape[0], a.shape[1], b.shape[1]) for _, args, _ in calls for a, b in [args[-2:]]]  # B or 2B
    floor = bench.floor_products(mog_topk.SETUPS[setup]["hidden_layers"])
    assert sorted(rows) == sorted(a.shape[0] for a, _, _ in floor)
    assert len(floor) == 9 * (mog_topk.SETUPS[setup]["hidden_layers"] - 1)  # 18 (base) or 27 (all) products
    # every recorded product writes into a buffer of the step (out=): replaying the one that made G's first hidden-
    # to-hidden weight gradient (its inputs are not overwritten later in the iteration) must give that gradient again
    [(func, args, kwargs)] = [call for call in calls if call[2]["out"] is G.net[2].weight.grad]
    out = kwargs["out"]
    expected = out.clone()
    out.zero_()
    with torch.no_grad():
        func(*args, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
