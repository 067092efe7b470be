"""Precision settings that matter on a GPU, checked with CPU stand-ins: minibatch discrimination in float32 under
autocast, the FID/IS Inception pass with pytorch-fid's float32 flags whatever training set, and
--torch-deterministic switching on PyTorch's deterministic algorithms."""
import copy
import os

import pytest
import torch

import common
import metrics


def test_minibatch_discrimination_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = common.MinibatchDiscrimination(16, kernels=8, kernel_dim=3)
    x = torch.randn(32, 16)
    x_collapsed = x[:1].expand(32, 16) + 1e-3 * torch.randn(32, 16)  # the batch the layer exists to flag
    exact = copy.deepcopy(layer).double()
    for batch in (x, x_collapsed):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(batch.bfloat16())
        assert out.dtype == torch.float32
        # the input was rounded to bf16 by the layer before; the layer's own arithmetic is float32
        assert torch.equal(out, layer(batch.bfloat16().float()))
        assert (out.double() - exact(batch.bfloat16().double())).abs().max() < 1e-4


class _FlagProbe(torch.nn.Module):
    """A stand-in Inception network that records the TF32 flags it runs under."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        n = x.shape[0]
        return torch.randn(n, 2048, generator=torch.Generator().manual_seed(n)).double(), torch.randn(n, 1008)


@pytest.mark.parametrize("training_flags", [(True, True), (True, False), (False, False)])
def test_the_inception_pass_runs_with_pytorch_fids_float32_flags_and_restores_them(training_flags):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = training_flags
        probe = _FlagProbe()
        images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
        metrics.reference_statistics(images, probe, None, batch_size=4, device="cpu")
        assert probe.seen == [(False, True), (False, True)]  # PyTorch's defaults, as pytorch-fid runs
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == training_flags
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_torch_deterministic_turns_on_deterministic_algorithms_and_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        common.seed_everything(1, torch_deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32
        common.seed_everything(1, torch_deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
