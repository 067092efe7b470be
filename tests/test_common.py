"""Unit tests for common.py: every layer and helper is checked against its defining property, computed
independently in the test where possible (CPU, no network)."""

import argparse
import json
import os
import pickle
import random
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError


# ----------------------------------------------------------------------------------------------------------------
# Minibatch discrimination
# ----------------------------------------------------------------------------------------------------------------
def test_minibatch_discrimination_shape_and_bias():
    torch.manual_seed(0)
    layer = common.MinibatchDiscrimination(in_features=12, kernels=7, kernel_dim=3)
    x = torch.randn(9, 12)
    y = layer(x)
    assert y.shape == (9, 12 + 7)
    assert torch.equal(y[:, :12], x)  # the input features pass through unchanged
    assert torch.equal(layer.bias.detach(), torch.full((7,), -1.0))  # official init of the per-kernel bias


def test_minibatch_discrimination_separates_collapsed_from_diverse():
    torch.manual_seed(0)
    B, fin, K = 16, 10, 6
    layer = common.MinibatchDiscrimination(fin, kernels=K, kernel_dim=4)
    with torch.no_grad():
        collapsed = torch.randn(1, fin).repeat(B, 1)
        o_collapsed = layer(collapsed)[:, fin:] - layer.bias
        diverse = 1000.0 * torch.randn(B, fin)  # rows far apart: every exp(-L1) is ~0
        o_diverse = layer(diverse)[:, fin:] - layer.bias
    assert torch.allclose(o_collapsed, torch.full((B, K), B - 1.0), atol=1e-5)
    assert torch.allclose(o_diverse, torch.zeros(B, K), atol=1e-6)


def test_minibatch_discrimination_matches_definition_and_excludes_self():
    torch.manual_seed(1)
    fin, K, D = 5, 4, 3
    layer = common.MinibatchDiscrimination(fin, kernels=K, kernel_dim=D)
    with torch.no_grad():
        layer.T.mul_(0.9)  # unit-norm columns (entries ~ 1/sqrt(5)) x 0.9: distances O(1), c neither 0 nor 1
        x = torch.randn(6, fin)
        o = layer(x)[:, fin:] - layer.bias
        M = (x @ layer.T).view(6, K, D)
        expected = torch.zeros(6, K)
        for i in range(6):
            for j in range(6):
                if j != i:
                    expected[i] += torch.exp(-(M[i] - M[j]).abs().sum(-1))
        assert torch.allclose(o, expected, atol=1e-5)
        assert 0.1 < expected.mean() < 4.0  # a non-trivial case, neither collapsed nor fully diverse
        # one example alone: no other example to compare with → o = 0 (the self term is excluded)
        single = layer(x[:1])[:, fin:] - layer.bias
        assert torch.allclose(single, torch.zeros(1, K), atol=1e-7)


def test_minibatch_discrimination_gradient_reaches_T():
    torch.manual_seed(2)
    layer = common.MinibatchDiscrimination(8, kernels=5, kernel_dim=3)
    with torch.no_grad():
        layer.T.mul_(1.4)  # entries ~ 0.5: distances O(1), so exp(-L1) has a gradient
    x = torch.randn(7, 8)
    layer(x)[:, 8:].sum().backward()
    assert layer.T.grad is not None and layer.T.grad.abs().sum() > 0
    assert torch.equal(layer.bias.grad, torch.full((5,), 7.0))


# ----------------------------------------------------------------------------------------------------------------
# Virtual batch normalisation
# ----------------------------------------------------------------------------------------------------------------
def _bn_with_reference(ref, x, weight, bias, eps):
    """Independent VBN: normalise each example with the (biased) statistics of cat(reference batch, example)."""
    out = []
    for i in range(x.shape[0]):
        joint = torch.cat([ref, x[i:i + 1]])
        out.append(F.batch_norm(joint, None, None, weight, bias, training=True, eps=eps)[-1:])
    return torch.cat(out)


@pytest.mark.parametrize("shape", [(6,), (3, 5, 4)], ids=["1d", "2d"])
def test_vbn_example_independent_of_batch_mates(shape):
    torch.manual_seed(0)
    C = shape[0]
    vbn = common.VirtualBatchNorm(C)
    with torch.no_grad():
        vbn.weight.copy_(torch.rand(C) + 0.5)
        vbn.bias.copy_(torch.randn(C))
    ref = torch.randn(10, *shape) * 2 + 1
    common.vbn_reference_pass(vbn, ref)
    example = torch.randn(1, *shape)
    batch_a = torch.cat([torch.randn(3, *shape), example, torch.randn(4, *shape)])
    batch_b = torch.cat([example, 50.0 * torch.randn(11, *shape)])  # very different batch-mates
    out_a = vbn(batch_a)[3]
    out_b = vbn(batch_b)[0]
    out_alone = vbn(example)[0]
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert torch.allclose(out_a, out_alone, atol=1e-6)
    # and it is exactly "batch norm over the reference batch plus this example"
    expected = _bn_with_reference(ref, batch_b, vbn.weight, vbn.bias, vbn.eps)
    assert torch.allclose(vbn(batch_b), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(6,), (3, 5, 4)], ids=["1d", "2d"])
def test_vbn_capture_normalises_reference_batch(shape):
    torch.manual_seed(1)
    vbn = common.VirtualBatchNorm(shape[0])
    ref = torch.randn(32, *shape) * torch.arange(1, shape[0] + 1).view(1, -1, *[1] * (len(shape) - 1)) + 3.0
    out = common.vbn_reference_pass(vbn, ref)
    dims = [0] + list(range(2, out.dim()))
    assert torch.allclose(out.mean(dims), torch.zeros(shape[0]), atol=1e-5)
    assert torch.allclose(out.var(dims, unbiased=False), torch.ones(shape[0]), atol=1e-3)
    assert vbn.capturing is False  # capture mode is switched off again after the pass
    assert vbn.ref_size == 32


def test_vbn_reference_stats_recomputed_by_each_reference_pass():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), common.VirtualBatchNorm(6))
    z_ref, x = torch.randn(16, 4), torch.randn(5, 4)
    with torch.no_grad():
        common.vbn_reference_pass(model, z_ref)
        out1 = model(x)
        model[0].weight.copy_(torch.randn(6, 4))  # the reference batch is fixed, the weights are not
        model[0].bias.copy_(torch.randn(6))
        stale = model(x)  # still the old reference statistics
        common.vbn_reference_pass(model, z_ref)
        out2 = model(x)
        feats_ref, feats_x = model[0](z_ref), model[0](x)
        expected = _bn_with_reference(feats_ref, feats_x, model[1].weight, model[1].bias, model[1].eps)
    assert torch.allclose(out2, expected, atol=1e-5)
    assert not torch.allclose(out2, stale, atol=1e-3)
    assert not torch.allclose(out1, out2, atol=1e-3)


def test_vbn_gradient_flows_through_reference_statistics():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), common.VirtualBatchNorm(6))
    z_ref, x = torch.randn(8, 4), torch.randn(5, 4)
    w_out = torch.randn(5, 6)
    common.vbn_reference_pass(model, z_ref)
    assert model[1].ref_mean.requires_grad
    (model(x) * w_out).sum().backward()
    grad = model[0].weight.grad.clone()

    # the same gradient, computed independently with the reference features inside the graph ...
    model.zero_grad()
    expected = _bn_with_reference(model[0](z_ref), model[0](x), model[1].weight, model[1].bias, model[1].eps)
    (expected * w_out).sum().backward()
    assert torch.allclose(grad, model[0].weight.grad, atol=1e-5)
    # ... and different from the gradient with the reference statistics detached
    model.zero_grad()
    detached = _bn_with_reference(model[0](z_ref).detach(), model[0](x), model[1].weight, model[1].bias, model[1].eps)
    (detached * w_out).sum().backward()
    assert not torch.allclose(grad, model[0].weight.grad, atol=1e-4)


def test_vbn_without_reference_pass_raises():
    vbn = common.VirtualBatchNorm(3)
    with pytest.raises(RuntimeError, match="vbn_reference_pass"):
        vbn(torch.randn(2, 3))


# ----------------------------------------------------------------------------------------------------------------
# Weight normalisation with data-dependent init
# ----------------------------------------------------------------------------------------------------------------
WN_CASES = {
    "linear": (lambda s: common.WNLinear(10, 7, init_scale=s), (64, 10), 0),
    "conv": (lambda s: common.WNConv2d(3, 5, 3, stride=1, padding=1, init_scale=s), (8, 3, 6, 6), 0),
    "convT": (lambda s: common.WNConvTranspose2d(4, 5, 4, stride=2, padding=1, init_scale=s), (8, 4, 3, 3), 1),
}


@pytest.mark.parametrize("kind", list(WN_CASES))
@pytest.mark.parametrize("init_scale", [1.0, 0.1])
def test_weight_norm_data_dependent_init(kind, init_scale):
    torch.manual_seed(0)
    make, in_shape, out_dim = WN_CASES[kind]
    layer = make(init_scale)
    x = torch.randn(*in_shape) * 3 + 2
    assert not bool(layer.initialized)
    with torch.no_grad():
        y = layer(x)
    assert bool(layer.initialized)
    dims = [0] + list(range(2, y.dim()))
    assert torch.allclose(y.mean(dims), torch.zeros(y.shape[1]), atol=1e-4)
    assert torch.allclose(y.std(dims, unbiased=False), torch.full((y.shape[1],), init_scale), rtol=1e-3)
    # effective weight W = g · v / ||v||: each output unit's weight has norm g
    w = layer._weight()
    norm_dims = [d for d in range(w.dim()) if d != out_dim]
    assert torch.allclose(w.pow(2).sum(norm_dims).sqrt(), layer.g.detach(), rtol=1e-5)
    # the init changed g away from 1, so the check above is not trivially about unit norms
    assert not torch.allclose(layer.g.detach(), torch.ones_like(layer.g))


def test_weight_norm_linear_effective_weight_is_used():
    torch.manual_seed(1)
    layer = common.WNLinear(4, 3)
    with torch.no_grad():
        layer(torch.randn(32, 4))
        layer.eval()
        W = (layer(torch.eye(4)) - layer(torch.zeros(1, 4))).T  # (out, in) read back through the forward
    assert torch.allclose(W.norm(dim=1), layer.g.detach(), rtol=1e-5)
    assert torch.allclose(W / W.norm(dim=1, keepdim=True), layer.v / layer.v.norm(dim=1, keepdim=True), atol=1e-5)


@pytest.mark.parametrize("kind", list(WN_CASES))
def test_weight_norm_initialized_flag_saved_and_not_reinitialised(kind):
    torch.manual_seed(2)
    make, in_shape, _ = WN_CASES[kind]
    layer = make(1.0)
    with torch.no_grad():
        layer(torch.randn(*in_shape))
    state = layer.state_dict()
    assert "initialized" in state and bool(state["initialized"])

    fresh = make(1.0)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    x_other = torch.randn(*in_shape) * 10 - 5  # different data would give different g and bias
    with torch.no_grad():
        out = fresh(x_other)  # training mode, but already initialised
    for name in ("v", "g", "bias"):
        assert torch.equal(getattr(fresh, name), state[name]), name
    with torch.no_grad():
        assert torch.allclose(out, layer(x_other), atol=1e-5)


@pytest.mark.parametrize("kind", list(WN_CASES))
def test_weight_norm_eval_forward_never_initialises(kind):
    torch.manual_seed(3)
    make, in_shape, _ = WN_CASES[kind]
    layer = make(1.0).eval()
    g0, b0 = layer.g.detach().clone(), layer.bias.detach().clone()
    with torch.no_grad():
        layer(torch.randn(*in_shape) * 5)
    assert not bool(layer.initialized)
    assert torch.equal(layer.g, g0) and torch.equal(layer.bias, b0)
    layer.train()
    with torch.no_grad():
        layer(torch.randn(*in_shape) * 5)
    assert bool(layer.initialized)


# ----------------------------------------------------------------------------------------------------------------
# Gaussian noise
# ----------------------------------------------------------------------------------------------------------------
def test_gaussian_noise_only_in_training():
    torch.manual_seed(0)
    layer = common.GaussianNoise(0.3)
    x = torch.randn(200, 500)
    assert torch.equal(layer.eval()(x), x)
    noise = layer.train()(x) - x
    assert abs(noise.mean().item()) < 0.01
    assert abs(noise.std().item() - 0.3) < 0.01
    assert torch.equal(common.GaussianNoise(0.0).train()(x), x)


# ----------------------------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------------------------
def test_topk_k_schedule_basic():
    assert common.topk_k(64, 0, 32, 0.99) == 64  # epoch 0: the whole batch
    assert common.topk_k(64, 10_000, 32, 0.99) == 32  # the floor mu
    assert all(common.topk_k(64, e, 1, 1.0) == 64 for e in range(0, 500, 37))  # gamma = 1: never decays
    ks = [common.topk_k(128, e, 10, 0.9) for e in range(100)]
    assert all(a >= b for a, b in zip(ks, ks[1:])) and ks[-1] == 10


def test_topk_k_exact_values():
    B, mu = 128, 64
    for e in [0, 1, 2, 3, 5, 10, 17, 30, 50, 68, 69, 70, 100, 200]:
        exact = max(mu, (B * 99**e) // 100**e)  # floor(128 · 0.99^e) in exact integer arithmetic
        assert common.topk_k(B, e, mu, 0.99) == exact, e
    assert common.topk_k(128, 1, 64, 0.99) == 126  # 126.72
    assert common.topk_k(128, 68, 1, 0.99) == 64  # 128 · 0.99^68 = 64.46
    assert common.topk_k(128, 69, 1, 0.99) == 63  # 63.81
    # products that are exact integers must not lose one sample to float rounding
    for e in range(8):
        assert common.topk_k(128, e, 1, 0.5) == 128 >> e
    for e in range(4):
        assert common.topk_k(1000, e, 1, 0.1) == int(Fraction(1000) * Fraction(1, 10) ** e)  # 1000, 100, 10, 1
    assert common.topk_k(100, 2, 1, 0.7) == 49  # 100 · 0.7² = 49 (float gives 48.99999999999999)


@pytest.mark.parametrize("B,mu,gamma", [(64, 0, 0.99), (64, 65, 0.99), (64, 32, 0.0), (64, 32, 1.5),
                                        (64, 32, float("nan")), (64, 32, -0.5), (64, -3, 0.99)])
def test_validate_topk_rejects(B, mu, gamma):
    with pytest.raises(UserError):
        common.validate_topk(B, mu, gamma)


def test_validate_topk_accepts_edges():
    common.validate_topk(64, 1, 1.0)
    common.validate_topk(64, 64, 1e-6)


def test_select_topk_highest_and_lowest():
    scores = torch.tensor([0.3, -2.0, 5.0, 1.0, -0.5, 4.0, 0.0, 2.5])
    assert set(common.select_topk(scores, 3).tolist()) == {2, 5, 7}
    assert set(common.select_topk(scores, 3, largest=False).tolist()) == {1, 4, 6}
    assert set(common.select_topk(scores.view(-1, 1), 2).tolist()) == {2, 5}  # (B, 1) critic output
    assert sorted(common.select_topk(scores, 8).tolist()) == list(range(8))
    assert sorted(common.select_topk(scores, 20).tolist()) == list(range(8))
    # selection carries no gradient of its own, and gradients flow only to the kept fakes
    fakes = torch.randn(8, 3, requires_grad=True)
    idx = common.select_topk(scores, 3)
    fakes[idx].sum().backward()
    kept = torch.zeros(8, dtype=torch.bool)
    kept[idx] = True
    assert (fakes.grad[kept] == 1).all() and (fakes.grad[~kept] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Historical averaging and EMA
# ----------------------------------------------------------------------------------------------------------------
def test_historical_average_penalty_matches_independent_mean():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ha = common.HistoricalAverage(model)
    assert ha.penalty(model).item() == 0.0
    history = [[p.detach().clone() for p in model.parameters()]]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ha.update(model)
        history.append([p.detach().clone() for p in model.parameters()])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # current parameters, not yet in the history
    means = [torch.stack([h[i] for h in history]).mean(0) for i in range(2)]
    expected = sum(((p.detach() - m) ** 2).sum() for p, m in zip(model.parameters(), means))
    pen = ha.penalty(model)
    assert torch.allclose(pen, expected, rtol=1e-5)
    # differentiable in the current parameters: d/dθ = 2 (θ - mean)
    pen.backward()
    assert torch.allclose(model.weight.grad, 2 * (model.weight.detach() - means[0]), atol=1e-5)


def test_historical_average_state_dict_round_trip(tmp_path):
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    ha = common.HistoricalAverage(model)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ha.update(model)
    common.save_checkpoint(tmp_path / "c.pt", {"args": {}, "ha": ha.state_dict()})
    ha2 = common.HistoricalAverage(nn.Linear(3, 2))
    ha2.load_state_dict(common.load_checkpoint(tmp_path / "c.pt")["ha"])
    assert ha2.count == 4
    assert torch.equal(ha2.penalty(model), ha.penalty(model))
    with torch.no_grad():
        model.weight.add_(1.0)
    ha.update(model)
    ha2.update(model)
    assert all(torch.equal(a, b) for a, b in zip(ha.mean, ha2.mean))


def test_ema_closed_form_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    d = 0.9
    ema = common.EMA(model, d)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    thetas = [model[0].weight.detach().clone()]
    for _ in range(6):
        with torch.no_grad():
            model[0].weight.add_(torch.randn(4, 3))
        model(torch.randn(16, 3))  # training-mode forward moves the BN running statistics
        ema.update(model)
        thetas.append(model[0].weight.detach().clone())
    t = len(thetas) - 1
    expected = d**t * thetas[0] + sum((1 - d) * d ** (t - i) * thetas[i] for i in range(1, t + 1))
    assert torch.allclose(ema.module[0].weight, expected, atol=1e-5)
    for name, buf in model.named_buffers():
        assert torch.equal(dict(ema.module.named_buffers())[name], buf), name
    ema2 = common.EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), d)
    ema2.load_state_dict(ema.state_dict())
    assert torch.equal(ema2.module[0].weight, ema.module[0].weight)


# ----------------------------------------------------------------------------------------------------------------
# Run folder
# ----------------------------------------------------------------------------------------------------------------
def _args(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "runs"), exp_name="exp", seed=3, lr=2e-4, topk=True, gamma=0.99,
                mu=32, epochs=10, device="cpu", resume=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_make_run_dir_writes_args_and_folders(tmp_path):
    args = _args(tmp_path)
    run_dir = common.make_run_dir(args)
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("exp__3__")
    assert (run_dir / "samples").is_dir() and (run_dir / "checkpoints").is_dir()
    meta = json.loads((run_dir / "args.json").read_text())
    for k, v in vars(args).items():
        assert meta[k] == v, k
    assert meta["torch_version"] == torch.__version__
    assert "git_commit" in meta
    assert meta["git_commit"] is None or len(meta["git_commit"]) == 40
    assert not list(run_dir.glob("*.tmp"))
    # a second run started in the same second gets its own folder
    assert common.make_run_dir(args) != run_dir


def test_make_run_dir_resume_reuses_folder_and_keeps_args(tmp_path):
    run_dir = common.make_run_dir(_args(tmp_path))
    before = (run_dir / "args.json").read_text()
    (run_dir / "samples" / "grid_1.png").write_bytes(b"x")
    again = common.make_run_dir(_args(tmp_path, epochs=20, resume="x.pt"), resume_dir=run_dir)
    assert again == run_dir
    assert (run_dir / "args.json").read_text() == before
    assert (run_dir / "samples" / "grid_1.png").exists()
    assert len(list((tmp_path / "runs").iterdir())) == 1


def _write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_truncate_log_keeps_records_up_to_the_step_and_drops_what_is_asked(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, [{"step": s, "loss": 0.5 * s} for s in range(1, 6)] + [{"step": 3, "final": True}])
    common.truncate_log(path, 3, drop=lambda r: r.get("final"))
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 1.5}]
    assert not list(tmp_path.glob("*.tmp"))
    common.truncate_log(tmp_path / "nothing_yet.jsonl", 3)  # no file yet: nothing to do


def test_truncate_log_drops_a_torn_last_line_and_refuses_foreign_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_log(path, [{"step": 1, "loss": 1.0}])
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a crash in the middle of a write
    common.truncate_log(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]
    with open(path, "a") as f:
        f.write('5\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2, is not a record of these scripts"):
        common.truncate_log(path, 5)


def test_write_json_atomic(tmp_path):
    path = tmp_path / "summary.json"
    common.write_json(path, {"fid": 12.5, "path": tmp_path})
    common.write_json(path, {"fid": 10.0, "n": [1, 2]})
    assert json.loads(path.read_text()) == {"fid": 10.0, "n": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and RNG states
# ----------------------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": 7, "epoch": 1, "k": 63,
             "args": {"lr": 1e-3, "topk": True, "resume": None}}
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    common.save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    loaded = common.load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["k"] == 63 and loaded["args"] == state["args"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    opt2 = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


class _Arbitrary:
    pass


def test_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope" / "last.pt"
    with pytest.raises(UserError, match=str(missing).replace("\\", "\\\\")):
        common.load_checkpoint(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="corrupt.pt"):
        common.load_checkpoint(corrupt)
    not_ckpt = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, not_ckpt)
    with pytest.raises(UserError, match="not a checkpoint"):
        common.load_checkpoint(not_ckpt)
    torch.save(torch.zeros(2), not_ckpt)
    with pytest.raises(UserError):
        common.load_checkpoint(not_ckpt)
    # weights_only=True: a pickle carrying an arbitrary class is refused, not executed
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"args": {}, "obj": _Arbitrary()}, unsafe)
    with pytest.raises(UserError):
        common.load_checkpoint(unsafe)


def test_checkpoint_error_messages_are_one_line(tmp_path):
    corrupt = tmp_path / "c.pt"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(100))
    with pytest.raises(UserError) as info:
        common.load_checkpoint(corrupt)
    assert "\n" not in str(info.value)


def test_check_resume_config(tmp_path):
    saved = vars(_args(tmp_path))
    common.check_resume_config(saved, _args(tmp_path))
    common.check_resume_config(saved, _args(tmp_path, epochs=50, device="cuda", resume="runs/x/last.pt"))
    with pytest.raises(UserError, match="--lr"):
        common.check_resume_config(saved, _args(tmp_path, lr=1e-3))
    with pytest.raises(UserError, match="--topk"):
        common.check_resume_config(saved, _args(tmp_path, topk=False))
    common.check_resume_config(saved, _args(tmp_path, lr=1e-3), allowed=("lr",))


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    common.seed_everything(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's generator
    np.random.randn(3)  # odd count: leaves a cached gaussian in numpy's legacy generator
    torch.rand(5)
    common.save_checkpoint(tmp_path / "c.pt", {"args": {}, "rng": common.rng_state()})

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(), np.random.randn(3).tolist(),
                torch.rand(4).tolist(), torch.randn(2).tolist())

    first = draw()
    common.seed_everything(99)
    draw()
    common.set_rng_state(common.load_checkpoint(tmp_path / "c.pt")["rng"])
    assert draw() == first


def test_seed_everything_reproducible():
    common.seed_everything(11)
    a = (random.random(), np.random.rand(), torch.rand(3))
    common.seed_everything(11)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def _read_cifar_independently(folder, names):
    data, labels = [], []
    for n in names:
        with open(folder / n, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data.append(np.asarray(d[b"data"]).reshape(-1, 3, 32, 32))
        labels.extend(d[b"labels"])
    return np.concatenate(data), np.asarray(labels)


def test_load_cifar10_tiny(tiny_cifar_dir):
    folder = tiny_cifar_dir / "cifar-10-batches-py"
    x, y = common.load_cifar10(tiny_cifar_dir, train=True, download=False)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (40,) and y.dtype == torch.int64
    ex, ey = _read_cifar_independently(folder, [f"data_batch_{i}" for i in range(1, 6)])
    assert np.array_equal(x.numpy(), ex) and np.array_equal(y.numpy(), ey)
    assert sorted(np.bincount(ey).tolist()) == [4] * 10

    xt, yt = common.load_cifar10(tiny_cifar_dir, train=False, download=False)
    assert xt.shape == (20, 3, 32, 32) and yt.shape == (20,)
    ex, ey = _read_cifar_independently(folder, ["test_batch"])
    assert np.array_equal(xt.numpy(), ex) and np.array_equal(yt.numpy(), ey)


def test_load_cifar10_missing(tmp_path):
    with pytest.raises(UserError, match="CIFAR-10 not found"):
        common.load_cifar10(tmp_path / "empty", download=False)


class _Payload:
    """Unpickling this runs `os.system(command)`: what a tampered data file would try."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_load_cifar10_refuses_forbidden_global(tiny_cifar_dir, tmp_path):
    marker = tmp_path / "payload_ran"
    batch = tiny_cifar_dir / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "wb") as f:
        pickle.dump({b"labels": [0], b"data": np.zeros((1, 3072), np.uint8),
                     b"x": _Payload(f"touch {marker}")}, f, protocol=2)
    assert b"system" in batch.read_bytes()
    with pytest.raises(UserError, match="forbidden global"):
        common.load_cifar10(tiny_cifar_dir, download=False)
    assert not marker.exists()
    # a truncated file is a clean error too
    batch.write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(UserError):
        common.load_cifar10(tiny_cifar_dir, download=False)


def test_load_cifar10_damaged_files_give_one_line_user_error(tiny_cifar_dir):
    """Flipped bytes and truncations make pickle raise many exception types (UnicodeDecodeError, LookupError,
    AttributeError, MemoryError, ...); every one must become a one-line UserError, never a traceback."""
    batch = tiny_cifar_dir / "cifar-10-batches-py" / "data_batch_1"
    good = batch.read_bytes()
    rng = np.random.default_rng(0)
    n_errors = 0
    for i in range(300):
        damaged = bytearray(good)
        for _ in range(3):
            damaged[rng.integers(0, 300)] = rng.integers(0, 256)
        batch.write_bytes(bytes(damaged[:rng.integers(1, len(good) + 1)]) if i % 2 else bytes(damaged))
        try:
            x, y = common.load_cifar10(tiny_cifar_dir, download=False)
        except UserError as e:
            assert "\n" not in str(e) and "corrupt CIFAR-10 file" in str(e)
            n_errors += 1
        else:  # a flip in a harmless place (a filename byte) still loads consistently
            assert x.shape == (40, 3, 32, 32) and len(y) == 40
    assert n_errors > 250


def _read_idx(path):
    raw = Path(path).read_bytes()
    magic = struct.unpack(">I", raw[:4])[0]
    if magic == 2051:
        n, r, c = struct.unpack(">III", raw[4:16])
        return np.frombuffer(raw[16:], np.uint8).reshape(n, r, c)
    n = struct.unpack(">I", raw[4:8])[0]
    return np.frombuffer(raw[8:], np.uint8).reshape(n)


def test_load_mnist_tiny(tiny_mnist_dir):
    raw = tiny_mnist_dir / "MNIST" / "raw"
    x, y = common.load_mnist(tiny_mnist_dir, train=True, download=False)
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert np.array_equal(x[:, 0].numpy(), _read_idx(raw / "train-images-idx3-ubyte"))
    assert np.array_equal(y.numpy(), _read_idx(raw / "train-labels-idx1-ubyte"))
    xt, yt = common.load_mnist(tiny_mnist_dir, train=False, download=False)
    assert xt.shape == (50, 1, 28, 28)
    assert np.array_equal(yt.numpy(), _read_idx(raw / "t10k-labels-idx1-ubyte"))


def test_load_mnist_missing(tmp_path):
    with pytest.raises(UserError, match="MNIST not found"):
        common.load_mnist(tmp_path / "empty", download=False)


@pytest.mark.parametrize("download", [False, True])
def test_load_mnist_corrupt_is_a_read_error_not_missing(tiny_mnist_dir, download):
    images = tiny_mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # truncated
    with pytest.raises(UserError, match="cannot read MNIST") as info:
        common.load_mnist(tiny_mnist_dir, download=download)  # must not try a download over existing files
    assert "\n" not in str(info.value)


def test_fake_images():
    x, y = common.fake_images(12, (3, 8, 8), num_classes=4, seed=1)
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.uint8 and y.shape == (12,)
    assert 0 <= y.min() and y.max() < 4
    x2, y2 = common.fake_images(12, (3, 8, 8), num_classes=4, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = common.fake_images(12, (3, 8, 8), num_classes=4, seed=2)
    assert not torch.equal(x, x3)


def test_balanced_label_indices():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    idx = common.balanced_label_indices(labels, 50, seed=1)
    assert idx.dtype == torch.int64 and len(idx) == 50 and len(set(idx.tolist())) == 50
    assert torch.equal(idx, torch.sort(idx).values)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    assert torch.equal(idx, common.balanced_label_indices(labels, 50, seed=1))
    assert not torch.equal(idx, common.balanced_label_indices(labels, 50, seed=2))
    for bad in (7, 0, -10, 310):
        with pytest.raises(UserError):
            common.balanced_label_indices(labels, bad, seed=1)


# ----------------------------------------------------------------------------------------------------------------
# Device, autocast, progress, CLI
# ----------------------------------------------------------------------------------------------------------------
def test_pick_device_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.pick_device("auto") == torch.device("cpu")
    assert common.pick_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match="CUDA"):
            common.pick_device(spec)
    for spec in ("garbage", "cuda:x", "meta"):
        with pytest.raises(UserError):
            common.pick_device(spec)
    for spec in ("auto", "cpu"):  # the CUDA-only flags are refused on the CPU, before anything is written
        with pytest.raises(UserError, match="--check-host-sync needs a CUDA device"):
            common.pick_device(spec, check_host_sync=True)
        with pytest.raises(UserError, match="--amp fp16 needs a CUDA device"):
            common.pick_device(spec, amp="fp16")
        assert common.pick_device(spec, amp="bf16") == torch.device("cpu")


def test_autocast():
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="fp16"):
        common.autocast(cpu, "fp16")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with common.autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with common.autocast(cpu, "off"):
        assert (a @ b).dtype == torch.float32


def test_the_progress_line_smooths_the_rate_of_a_busy_machine(tmp_path, capsys, monkeypatch):
    args = argparse.Namespace(exp_name="p", seed=1, out_dir=str(tmp_path), resume=None, track=False,
                              tensorboard=False)
    run = common.Run(args)
    run.start(2000, torch.device("cpu"), unit="it")
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    run._t = 0.0
    capsys.readouterr()
    rates = []
    for window in range(20):  # 100 steps a window at 9 and 138 it/s in turn
        for _ in range(100):
            run.add(loss=torch.tensor(1.0))
        clock[0] += 100 / (9.0 if window % 2 else 138.0)  # the window's duration
        run._t_print = -1e9  # a line is due
        record = run.log_window(100 * (window + 1), k=1)
        line = capsys.readouterr().out.strip()
        rates.append(float(line.split(" | ")[1].split()[0]))
        assert line.startswith(f"[{100 * (window + 1)}/2000]") and "ETA" in line and "k=1 loss=1" in line
        assert record["it_per_s"] > 0
    assert max(rates[5:]) / min(rates[5:]) < 2.0  # the raw rates swing by 15x
    run.finish({})


def test_run_cli_user_error(capsys):
    def main():
        raise UserError("--mu must be between 1 and the batch size 64, got 0")

    with pytest.raises(SystemExit) as info:
        common.run_cli(main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: --mu must be between 1 and the batch size 64, got 0"]

    def buggy():
        raise ValueError("a real bug keeps its traceback")

    with pytest.raises(ValueError):
        common.run_cli(buggy)
