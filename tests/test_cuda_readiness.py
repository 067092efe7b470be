"""CPU stand-ins for the CUDA paths (issue: CUDA readiness). Each test fails on the code before the fix it guards:

1. checkpoints are loaded to the CPU before anything reads them (a CUDA-mapped RNG state crashed set_rng_state);
2. a resumed optimizer's moments take their parameters' memory layout (fused CUDA Adam refuses mixed layouts);
3. VirtualBatchNorm's statistics are float32 under bf16/fp16 autocast (E[x²] − E[x]² cancels in bf16);
4. a checkpoint with more CUDA RNG states than this machine has GPUs restores the ones that exist;
5. loading a CPU-made optimizer state keeps fused Adam on;
plus the multi-tensor EMA / historical average, the CUDA defaults of --torch-deterministic, and --check-host-sync's
refusal on the CPU. The same paths on a real GPU are in tests/test_cuda.py.
"""

import re
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO, assert_one_line_error, cli

import common

SCRIPTS = ["mog_topk.py", "dcgan_cifar_topk.py", "improved_gan_mnist.py", "improved_gan_cifar.py"]


class _Loaded(Exception):
    """Raised by the spy right after a script loaded its checkpoint: the test needs nothing after that."""


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


# ---------------------------------------------------------------------------------------------------------------
# 1. checkpoints are read on the CPU, whatever the device of the run
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_loads_its_checkpoint_to_the_cpu(script, tmp_path, monkeypatch):
    # the run's device is `meta` (a stand-in for CUDA: tensors mapped there cannot be read by numpy or by
    # torch.set_rng_state), so a checkpoint mapped to the run's device shows up as meta tensors
    ckpt = tmp_path / "last.pt"
    common.save_checkpoint(ckpt, {"args": {}, "rng": common.rng_state(), "G": {"w": torch.ones(3)}})
    module = __import__(script[:-3])
    seen = {}
    real_load = common.load_checkpoint

    def spy(path, *args, **kwargs):
        seen["state"] = real_load(path, *args, **kwargs)
        raise _Loaded

    monkeypatch.setattr(common, "pick_device", lambda spec, *flags: torch.device("meta"))
    monkeypatch.setattr(common, "load_checkpoint", spy)
    argv = ["--resume", str(ckpt), "--out-dir", str(tmp_path / "runs")]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(_Loaded):
        module.main(argv) if script != "improved_gan_cifar.py" else module.main()
    devices = {t.device.type for t in _tensors(seen["state"])}
    assert devices == {"cpu"}, devices
    common.set_rng_state(seen["state"]["rng"])  # readable as loaded


def test_set_rng_state_restores_what_rng_state_saved():
    state = common.rng_state()
    first = torch.rand(3)
    common.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


# ---------------------------------------------------------------------------------------------------------------
# 2 and 5. optimizer state: memory layout and fused flag survive a load
# ---------------------------------------------------------------------------------------------------------------
def _conv_adam_state(channels_last: bool, fused: bool):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 8, 3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    model(torch.randn(2, 3, 6, 6).contiguous(memory_format=fmt)).square().mean().backward()
    opt.step()
    return model, opt


def test_resumed_moments_take_the_parameters_layout():
    _, saved = _conv_adam_state(channels_last=False, fused=False)
    model, opt = _conv_adam_state(channels_last=True, fused=False)
    assert model.weight.stride() != saved.state[saved.param_groups[0]["params"][0]]["exp_avg"].stride()
    common.load_optimizer_state(opt, saved.state_dict())
    for name in ("exp_avg", "exp_avg_sq"):
        moment = opt.state[model.weight][name]
        assert moment.stride() == model.weight.stride(), name
        assert torch.equal(moment, saved.state[saved.param_groups[0]["params"][0]][name])  # values unchanged


def test_loading_a_non_fused_state_keeps_fused_adam():
    _, cpu_made = _conv_adam_state(channels_last=False, fused=False)
    model, opt = _conv_adam_state(channels_last=False, fused=True)
    common.load_optimizer_state(opt, cpu_made.state_dict())
    assert opt.param_groups[0]["fused"] is True
    step = opt.state[model.weight]["step"]
    assert step.dtype == torch.float32 and step.device == model.weight.device and float(step) == 1.0
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    opt.step()  # the fused kernel accepts the converted state
    assert float(opt.state[model.weight]["step"]) == 2.0


def test_scripts_load_optimizer_states_through_the_helper():
    # Optimizer.load_state_dict called directly would bring back both defects above
    for script in SCRIPTS:
        text = (REPO / script).read_text()
        assert not re.search(r"opt_?\w*\.load_state_dict\(", text), script
        assert "common.load_optimizer_state(" in text or "common.Run(" in text, script  # Run.start uses it


# ---------------------------------------------------------------------------------------------------------------
# 3. VirtualBatchNorm in float32 under autocast
# ---------------------------------------------------------------------------------------------------------------
def test_vbn_statistics_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    vbn = common.VirtualBatchNorm(16)
    ref = 3.0 + 0.1 * torch.randn(64, 16)  # mean 3, std 0.1: E[x^2] - E[x]^2 cancels in bf16
    x = 3.0 + 0.1 * torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16, x_bf16 = ref.bfloat16(), x.bfloat16()  # what a bf16 Linear would hand over
        vbn.capturing = True
        vbn(ref_bf16)
        vbn.capturing = False
        out = vbn(x_bf16)
    assert out.dtype == torch.bfloat16
    # float64 reference of the same maths on the bf16-rounded inputs (rounding the inputs is autocast's doing)
    r64, x64 = ref_bf16.double(), x_bf16.double()
    mean = (r64.mean(0) * 64 + x64) / 65
    meansq = ((r64 * r64).mean(0) * 64 + x64 * x64) / 65
    expected = (x64 - mean) / torch.sqrt(meansq - mean * mean + vbn.eps)
    assert (out.double() - expected).abs().max() < 0.05  # bf16 output rounding; was 143 in bf16 statistics


# ---------------------------------------------------------------------------------------------------------------
# 4. more saved CUDA RNG states than GPUs
# ---------------------------------------------------------------------------------------------------------------
def test_cuda_rng_states_restored_for_the_gpus_present(monkeypatch):
    state = common.rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # saved on a 4-GPU machine
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: (_ for _ in ()).throw(RuntimeError("invalid device ordinal")))
    common.set_rng_state(state)
    assert restored == [(0, 0)]


# ---------------------------------------------------------------------------------------------------------------
# 8. EMA and historical averaging as multi-tensor updates: same maths as the per-tensor loop
# ---------------------------------------------------------------------------------------------------------------
def test_ema_and_historical_average_match_their_definitions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    ema, hist = common.EMA(model, decay=0.9), common.HistoricalAverage(model)
    history = [[p.detach().clone() for p in model.parameters()]]
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # BN running statistics change
        ema.update(model)
        hist.update(model)
        history.append([p.detach().clone() for p in model.parameters()])
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    for got, want in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(got, want)
    for got, want in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(got, want)
    means = [torch.stack(ps).mean(0) for ps in zip(*history)]
    for got, want in zip(hist.mean, means):
        torch.testing.assert_close(got, want)
    penalty = hist.penalty(model)
    want = sum(((p - m) ** 2).sum() for p, m in zip(model.parameters(), means))
    torch.testing.assert_close(penalty, want)
    penalty.backward()
    for p, m in zip(model.parameters(), means):
        torch.testing.assert_close(p.grad, 2 * (p.detach() - m))


# ---------------------------------------------------------------------------------------------------------------
# 11. CUDA defaults: fast by default, deterministic one flag away; --check-host-sync is CUDA-only
# ---------------------------------------------------------------------------------------------------------------
def test_torch_deterministic_switches_autotuning_and_tf32():
    flags = lambda: (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,  # noqa: E731
                     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    saved = flags()
    try:
        common.seed_everything(1, torch_deterministic=False)
        assert flags() == (False, True, True, True)
        common.seed_everything(1, torch_deterministic=True)
        assert flags() == (True, False, False, False)
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_default_to_the_fast_cuda_settings(script, monkeypatch):
    module = __import__(script[:-3])
    monkeypatch.setattr(sys, "argv", [script])
    args = module.parse_args([]) if script != "improved_gan_cifar.py" else module.parse_args()
    assert args.torch_deterministic is False and args.check_host_sync is False


def test_check_host_sync_needs_cuda(tmp_path, capsys):
    import mog_topk

    proc = cli(mog_topk.main, ["--check-host-sync", "--device", "cpu", "--iterations", "2", "--out-dir",
                               tmp_path / "runs"], capsys)
    assert "needs a CUDA device" in assert_one_line_error(proc)
    assert not (tmp_path / "runs").exists()
