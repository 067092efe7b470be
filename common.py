"""Layers, GAN helpers and run plumbing shared by the experiment scripts (mog_topk.py, dcgan_cifar_topk.py,
improved_gan_mnist.py, improved_gan_cifar.py). Plain PyTorch.

The maths of each experiment stays in its script. This module holds the layers the models are built from, the GAN
pieces several scripts use (top-k selection, parameter averaging, feature matching, the flag groups of top-k and
minibatch discrimination), and the run plumbing behind a few calls: one-line errors and the command line, the
memory-fit check, device and seeding set-up, the run folder, checkpoints that are complete and finite or absent,
and `Run`, which ties the folder, the metrics log, checkpoints, resume, Ctrl-C / SIGTERM and the summary together.
The data loaders return real datasets as uint8 tensors.

Contents
    layers        GaussianNoise, MinibatchDiscrimination, VirtualBatchNorm (+ vbn_reference_pass),
                  WNLinear, WNConv2d, WNConvTranspose2d (weight norm with data-dependent init)
    GAN helpers   validate_topk, topk_k, select_topk, add_topk_flags, check_topk_flags, add_mbd_flags,
                  check_mbd_flags, FEATURE_MATCHING_FORMS, feature_matching_loss; HistoricalAverage, EMA
    errors, CLI   UserError, Interrupted, run_cli, one_line, describe, ArgumentParser, finite_float, check_seed,
                  device_memory, check_fits
    set-up        seed_everything, pick_device, check_host_sync, autocast
    run folder    write_atomically, write_json, check_out_dir, lock_run_dir, unlock_run_dir, make_run_dir,
                  truncate_log, fmt_seconds
    checkpoints   nonfinite_entries, save_checkpoint, load_checkpoint, checkpoint_errors, check_checkpoint,
                  rng_state, set_rng_state, load_optimizer_state, check_resume_config
    the run       add_run_flags, check_run_flags, Run
    data          load_cifar10, load_mnist, fake_images, balanced_label_indices
"""

from __future__ import annotations

import argparse
import copy
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

try:
    import fcntl  # POSIX: the run-folder lock (lock_run_dir)
except ImportError:  # Windows: no lock is taken
    fcntl = None

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class GaussianNoise(nn.Module):
    """Adds N(0, std²) noise in training mode only; identity in eval mode. Any shape."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x) if self.training and self.std > 0 else x

    def extra_repr(self) -> str:
        return f"std={self.std}"


class MinibatchDiscrimination(nn.Module):
    """Minibatch discrimination (Salimans et al. 2016, eq. 4-5). (B, in_features) → (B, in_features + kernels).

    M_i = f(x_i) T reshaped to (kernels, kernel_dim); c_b(x_i, x_j) = exp(-||M_i,b - M_j,b||_L1);
    o(x_i)_b = Σ_{j≠i} c_b(x_i, x_j); the output is [x, o(x) + bias]. A collapsed batch gives o ≈ B-1 per kernel,
    a diverse one o ≈ 0: that is how D sees a lack of diversity.

    Initial values as openai/improved-gan's MinibatchLayer (mnist_svhn_cifar10/nn.py): each of the K·D columns of
    T is a random Gaussian direction of unit L2 norm over the inputs (openai's θ · exp(log_weight_scale) / ||θ||
    with θ ~ N(0, 0.05²), log_weight_scale = 0); the bias starts at -1; j = i is excluded (openai adds 1e6 to the
    diagonal distances, exp(-1e6) = 0). Departure: T is trained directly, not through openai's (θ,
    log_weight_scale) weight-norm parametrisation: the same function and initial values, another optimisation
    geometry. improved_gan_cifar.init_minibatch_disc adds openai's data-dependent init.
    """

    def __init__(self, in_features: int, kernels: int = 100, kernel_dim: int = 5):
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        theta = torch.randn(in_features, kernels * kernel_dim) * 0.05
        self.T = nn.Parameter(theta / theta.norm(dim=0, keepdim=True))  # unit-norm columns, as openai's W
        self.bias = nn.Parameter(torch.full((kernels,), -1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 also under autocast: in bf16 the L1 distances of a near-collapsed batch are off by 1-4, which
        # is exactly the signal this layer exists for
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):  # (also on meta)
            m = (x.float() @ self.T.float()).view(-1, self.kernels, self.kernel_dim)  # (B, K, D)
            l1 = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(dim=3)  # (B, B, K): ||M_i - M_j||_1 per kernel
            c = torch.exp(-l1)
            o = c.sum(dim=1) - 1.0  # drop the j = i term, which is exp(0) = 1
            return torch.cat([x.float(), o + self.bias.float()], dim=1)


class VirtualBatchNorm(nn.Module):
    """Virtual batch normalisation (Salimans et al. 2016, sec. 3.4) for (B, C) or (B, C, H, W) inputs.

    Each example is normalised with the statistics of a fixed reference batch plus itself (weights N/(N+1) and
    1/(N+1), as in the official code), so its output does not depend on its batch-mates; the reference batch uses
    its own statistics, recomputed with gradient by vbn_reference_pass before every forward (the batch is fixed,
    the weights are not). float32 also under autocast: E[x²] - E[x]² cancels in bf16 (mean 3, std 0.1: a variance
    of 0.01 against terms of ~9, below bf16's resolution). The output has the input's dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.capturing = False
        self.ref_mean = self.ref_meansq = None  # (C,) mean and mean of squares over the reference batch
        self.ref_size = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, out_dtype, x = (1, -1) + (1,) * (x.dim() - 2), x.dtype, x.float()
        if self.capturing:
            dims = [0, *range(2, x.dim())]  # batch and spatial dimensions
            self.ref_mean, self.ref_meansq, self.ref_size = x.mean(dims), (x * x).mean(dims), x.shape[0]
            mean, meansq = self.ref_mean.view(shape), self.ref_meansq.view(shape)
        else:
            if self.ref_mean is None:
                raise RuntimeError("VirtualBatchNorm: call vbn_reference_pass(model, z_ref) before the forward")
            sdims = list(range(2, x.dim()))  # an example's own statistics: the spatial mean of conv features
            x_mean = x.mean(sdims, keepdim=True) if sdims else x
            x_meansq = (x * x).mean(sdims, keepdim=True) if sdims else x * x
            new = 1.0 / (self.ref_size + 1.0)
            mean = new * x_mean + (1.0 - new) * self.ref_mean.view(shape)
            meansq = new * x_meansq + (1.0 - new) * self.ref_meansq.view(shape)
        var = (meansq - mean * mean).clamp_min(0.0)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(out_dtype)


def vbn_reference_pass(model: nn.Module, *ref_inputs) -> torch.Tensor:
    """`model(*ref_inputs)` with every VirtualBatchNorm capturing its reference statistics; returns the output.
    Call it before each (training or sampling) forward of a model with VBN layers."""
    layers = [m for m in model.modules() if isinstance(m, VirtualBatchNorm)]
    for m in layers:
        m.capturing = True
    try:
        return model(*ref_inputs)
    finally:
        for m in layers:
            m.capturing = False


class _WeightNormMixin:
    """Weight normalisation W = g · V / ||V|| (Salimans & Kingma 2016) with openai/improved-gan's data-dependent
    init (nn.py): the first forward in training mode (a large batch, run by the script under torch.no_grad) sets
    g = init_scale / std and bias = -mean · g of each output unit's pre-activations, so they start with zero mean
    and standard deviation `init_scale`. Parameters v, g, bias; the `initialized` buffer goes into checkpoints."""

    def _wn_setup(self, v_shape, out_features: int, out_dim: int, init_scale: float, init_std: float):
        self.out_dim = out_dim  # which dimension of v indexes output units
        self.init_scale = init_scale
        self.v = nn.Parameter(torch.randn(v_shape) * init_std)
        self.g = nn.Parameter(torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("initialized", torch.tensor(False))
        self._init_checked = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._init_checked = False  # the loaded `initialized` flag decides again
        super()._load_from_state_dict(*args, **kwargs)

    def _weight(self) -> torch.Tensor:
        dims = [d for d in range(self.v.dim()) if d != self.out_dim]
        shape = [-1 if d == self.out_dim else 1 for d in range(self.v.dim())]
        return self.v * (self.g.view(shape) / self.v.pow(2).sum(dims, keepdim=True).sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `initialized` is read once and the answer cached: bool() of a tensor is a host-device sync on a GPU and a
        # graph break under torch.compile (run the init forward eagerly, before compiling)
        if self.training and not self._init_checked and not torch.compiler.is_compiling():
            self._init_checked = True
            if not bool(self.initialized):
                with torch.no_grad():
                    self.g.fill_(1.0)
                    self.bias.zero_()
                    pre = self._apply_weight(x, self._weight(), self.bias)  # unit-norm directions, zero bias
                    dims = [0] + list(range(2, pre.dim()))
                    mean, var = pre.mean(dims), pre.var(dims, unbiased=False)
                    self.g.copy_(self.init_scale / torch.sqrt(var + 1e-8))
                    self.bias.copy_(-mean * self.g)
                    self.initialized.fill_(True)
        return self._apply_weight(x, self._weight(), self.bias)


class WNLinear(_WeightNormMixin, nn.Module):
    """Weight-normalised linear layer with data-dependent init. (B, in_features) → (B, out_features)."""

    def __init__(self, in_features: int, out_features: int, init_scale: float = 1.0, init_std: float = 0.05):
        super().__init__()
        self._wn_setup((out_features, in_features), out_features, 0, init_scale, init_std)

    def _apply_weight(self, x, w, b):
        return F.linear(x, w, b)


class WNConv2d(_WeightNormMixin, nn.Module):
    """Weight-normalised Conv2d with data-dependent init. (B, C_in, H, W) → (B, C_out, H', W')."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, init_scale=1.0, init_std=0.05):
        super().__init__()
        self.stride, self.padding = stride, padding
        self._wn_setup((out_channels, in_channels, kernel_size, kernel_size), out_channels, 0, init_scale, init_std)

    def _apply_weight(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding)


class WNConvTranspose2d(_WeightNormMixin, nn.Module):
    """Weight-normalised ConvTranspose2d with data-dependent init. (B, C_in, H, W) → (B, C_out, H', W'). Its
    weight is (C_in, C_out, k, k), as PyTorch stores it: the output unit is dimension 1."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 init_scale=1.0, init_std=0.05):
        super().__init__()
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self._wn_setup((in_channels, out_channels, kernel_size, kernel_size), out_channels, 1, init_scale, init_std)

    def _apply_weight(self, x, w, b):
        return F.conv_transpose2d(x, w, b, self.stride, self.padding, self.output_padding)


# ----------------------------------------------------------------------------------------------------------------
# GAN helpers: top-k (Sinha et al. 2020), the top-k and minibatch-discrimination flag groups, feature matching
# ----------------------------------------------------------------------------------------------------------------
def validate_topk(batch_size: int, mu: int, gamma: float) -> None:
    if not 1 <= mu <= batch_size:
        raise UserError(f"--mu must be between 1 and the batch size {batch_size}, got {mu}")
    if not (0.0 < gamma <= 1.0) or math.isnan(gamma):
        raise UserError(f"--gamma must be in (0, 1], got {gamma}")


def topk_k(batch_size: int, epoch: int, mu: int, gamma: float) -> int:
    """Fakes the generator learns from in `epoch` (0-based): k = max(mu, floor(B * gamma**epoch)); epoch 0 gives B.
    A function of the epoch alone, so a resumed run gets the same k."""
    # + 1e-9: floor() must not lose a sample when B * gamma**epoch is an integer in exact arithmetic
    # (100 * 0.7**2 = 48.99999999999999 in floating point)
    return max(mu, int(math.floor(batch_size * gamma**epoch + 1e-9)))


def select_topk(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices (k,) of the k highest (largest=True) or lowest critic scores. scores: (B,) or (B, 1), raw logits."""
    scores = scores.reshape(-1)
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.topk(scores.detach().float(), k, largest=largest, sorted=False).indices

def add_topk_flags(p: argparse.ArgumentParser, mu_default: str = "half the batch"):
    """--topk, --mu, --gamma, --bottomk (every script); returns the group, for a script's own top-k flags."""
    g = p.add_argument_group("top-k (Sinha et al. 2020)")
    g.add_argument("--topk", action=argparse.BooleanOptionalAction, default=False,
                   help="the generator learns only from the k fakes the discriminator scores highest")
    g.add_argument("--mu", type=int, default=None, help=f"floor of k, in samples (default: {mu_default}; needs --topk)")
    g.add_argument("--gamma", type=finite_float, default=None,
                   help="k decay per epoch: k = max(mu, floor(B * gamma^epoch)) (default 0.99; needs --topk)")
    g.add_argument("--bottomk", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the k lowest-scored fakes instead (the analysis control; needs --topk)")
    return g


def check_topk_flags(args, batch_size: int, mu: int | None = None, gamma: float = 0.99, extra=()) -> None:
    """With --topk: resolve --mu (default `mu`, else half the batch) and --gamma, and check them. Without it:
    refuse --mu, --gamma, --bottomk and the script's `extra` top-k flags (attribute names) when given."""
    if args.topk:
        args.mu = (batch_size // 2 if mu is None else mu) if args.mu is None else args.mu
        args.gamma = gamma if args.gamma is None else args.gamma
        validate_topk(batch_size, args.mu, args.gamma)
        return
    for name in ("mu", "gamma", "bottomk", *extra):
        if getattr(args, name) not in (None, False):
            raise UserError(f"--{name.replace('_', '-')} only applies with --topk")


def add_mbd_flags(g, kernels: int, dim: int) -> None:
    """--minibatch-disc, --mbd-kernels, --mbd-dim, in the group `g`."""
    g.add_argument("--minibatch-disc", action=argparse.BooleanOptionalAction, default=False,
                   help="minibatch discrimination layer before the discriminator's output")
    g.add_argument("--mbd-kernels", type=int, default=None,
                   help=f"minibatch-discrimination kernels (default {kernels}; needs --minibatch-disc)")
    g.add_argument("--mbd-dim", type=int, default=None,
                   help=f"minibatch-discrimination kernel dimension (default {dim}; needs --minibatch-disc)")


def check_mbd_flags(args, kernels: int, dim: int) -> None:
    """Resolve and check --mbd-kernels / --mbd-dim with --minibatch-disc; refuse them without it."""
    if args.minibatch_disc:
        args.mbd_kernels = kernels if args.mbd_kernels is None else args.mbd_kernels
        args.mbd_dim = dim if args.mbd_dim is None else args.mbd_dim
        if args.mbd_kernels < 1 or args.mbd_dim < 1:
            raise UserError("--mbd-kernels and --mbd-dim must be at least 1")
    elif args.mbd_kernels is not None or args.mbd_dim is not None:
        raise UserError("--mbd-kernels/--mbd-dim only apply with --minibatch-disc")


FEATURE_MATCHING_FORMS = ("squared_l2", "mean_squared", "mean_abs")


def feature_matching_loss(feat_real: torch.Tensor, feat_fake: torch.Tensor, form: str) -> torch.Tensor:
    """Feature matching (Salimans et al. 2016, sec. 3.1): the distance between the batch means of the
    discriminator's features of real and generated samples, (B, F) each, computed in float32.

    form "squared_l2": ||mean f(x) - mean f(G(z))||^2, the paper's equation; "mean_squared": that divided by F, the
    official openai/improved-gan MNIST code's T.mean(T.square(m1 - m2)); "mean_abs": the mean absolute difference,
    the official CIFAR-10 code's T.mean(abs(m1 - m2)). Each script says which it uses and why."""
    diff = feat_real.float().mean(0) - feat_fake.float().mean(0)
    if form == "squared_l2":
        return diff.pow(2).sum()
    if form == "mean_squared":
        return diff.pow(2).mean()
    if form == "mean_abs":
        return diff.abs().mean()
    raise ValueError(f"feature-matching form must be one of {FEATURE_MATCHING_FORMS}, got {form!r}")


# ----------------------------------------------------------------------------------------------------------------
# GAN helpers: parameter averaging
# ----------------------------------------------------------------------------------------------------------------
class HistoricalAverage:
    """Historical averaging (Salimans et al. 2016, sec. 3.3): the penalty ||θ - (1/t) Σ_{i<t} θ_i||², summed over
    the parameters and differentiable in the current θ. `update(model)` after each optimizer step adds θ to the
    uniform running mean (float32, on the parameters' device), which starts at the initial θ (first penalty 0).
    Both are multi-tensor kernels, not a Python loop over the tensors."""

    def __init__(self, model: nn.Module):
        self.count = 1
        self.mean = [p.detach().clone().float() for p in model.parameters()]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        params = [p.float() for p in model.parameters()]  # no copy for float32 parameters
        return torch.stack(torch._foreach_norm(torch._foreach_sub(params, self.mean))).pow(2).sum()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count += 1  # mean ← mean + (θ - mean) / t
        torch._foreach_lerp_(self.mean, [p.detach().float() for p in model.parameters()], 1.0 / self.count)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        for m, s in zip(self.mean, state["mean"]):
            m.copy_(s)


class EMA:
    """Exponential moving average of a model's parameters, for evaluation. `ema.module` is a frozen copy;
    `update(model)` does θ_ema ← d·θ_ema + (1-d)·θ (multi-tensor kernels) and copies the buffers (batch-norm
    statistics, weight-norm `initialized`). Create it after any data-dependent init, so it starts from those weights.

    d = `decay`, or with `warmup` min(decay, (1 + t) / (10 + t)) at update t = 0, 1, ... (TensorFlow's
    ExponentialMovingAverage with num_updates): the average follows the weights at first instead of staying near
    the initial ones for ~1/(1 - decay) updates, and d = decay from t = (10·decay - 1) / (1 - decay) on (89,990 for
    0.9999). `num_updates` belongs in checkpoints beside state_dict().
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay of the next update."""
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()],
                             1.0 - self.current_decay())
        self.num_updates += 1
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Run plumbing: one-line errors, the command line, the memory-fit check
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """An expected user mistake (flags, data, checkpoint): run_cli prints it as one line, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM after the run saved a checkpoint at a step boundary; its message is the command that
    continues the run. run_cli prints it as one line, exit status 130 (the shell's status for SIGINT)."""


def one_line(text, limit: int = 300) -> str:
    """`text` (a message, an exception) as one line of at most `limit` characters (torch's C++ errors span lines)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(e: BaseException) -> str:
    """`TypeName: first words of the message` on one line (the type name alone when the message is empty)."""
    message = one_line(e, 200)
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


_OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
_ALLOCATION_TEXTS = ("can't allocate memory", "not enough memory", "out of memory", "Overflow when unpacking long")


def run_cli(main) -> None:
    """Run `main()` as a command line program: an expected problem is one `error:` line on stderr, exit status 2:
    a UserError; memory that cannot be allocated (MemoryError, torch.OutOfMemoryError, the CPU allocator's
    RuntimeError, sizes beyond 64 bits: check_fits refuses what it can foresee); an OSError of a file system that
    refuses a write (full, over quota, read-only, forbidden, failing). Ctrl-C: status 130, with Interrupted's resume
    line or, elsewhere, the note that it saved nothing. Any other exception is a bug and keeps its traceback."""
    def fail(message: str, status: int = 2):
        print(message, file=sys.stderr, flush=True)
        sys.exit(status)

    try:
        main()
    except UserError as e:
        fail(f"error: {one_line(e, 2000)}")
    except Interrupted as e:
        fail(f"interrupted: {one_line(e, 2000)}", 130)
    except KeyboardInterrupt:
        fail("interrupted: outside a training step, so this interruption saved nothing (checkpoints/last.pt, if "
             "any, holds the last save)", 130)
    except (MemoryError, RuntimeError, TypeError, ValueError) as e:
        text = str(e)
        if not isinstance(e, _OUT_OF_MEMORY) and not any(marker in text for marker in _ALLOCATION_TEXTS):
            raise
        if "Overflow when unpacking long" in text:
            fail("error: a size or count is beyond what torch can represent (64 bits): use smaller values")
        wanted = re.search(r"allocate (\d+) bytes", text)
        size = f" (tried to allocate {_gb(int(wanted.group(1)))})" if wanted else f" ({describe(e)})"
        fail(f"error: out of memory{size}: use smaller sizes (batch, model width, samples)")
    except OSError as e:
        if e.errno not in {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}:
            raise
        fail(f"error: {e.strerror or describe(e)}: {e.filename or '(file unknown)'}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": those flags say in their help what they default to
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose own errors (wrong type, invalid choice, unknown flag) are one `error:` line
    with exit status 2, instead of argparse's 20-35 line usage block (still shown by --help); no abbreviations."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        kw.setdefault("allow_abbrev", False)  # --resum is not --resume
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f"error: {one_line(message, 2000)} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """argparse `type=` of every float flag: 'nan', 'inf' and '1e999' are refused, so no range check downstream
    (`lr > 0`, ...) can be passed by them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 0 .. 2**32 - 1


def check_seed(flag: str, value: int) -> None:
    if not 0 <= value <= SEED_MAX:
        raise UserError(f"{flag} must be between 0 and {SEED_MAX}, got {value}")


def _gb(n: float) -> str:
    return f"{n / 2**30:.3g} GB" if math.isfinite(n) else "more than 2**63 bytes"


def device_memory(device: torch.device) -> float:
    """Total memory in bytes of `device`: the GPU's for CUDA, the machine's physical memory otherwise."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): nothing to compare with
        return math.inf


class _CountBytes(TorchDispatchMode):
    """Sums the bytes of every tensor that the operations run under it return."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:  # in-place: no new memory
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.bytes += t.numel() * t.element_size()
        return out


def _too_large(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, (OverflowError, MemoryError)) or any(
        s in text for s in ("overflow", "too large", "numel", "invalid size", "negative dimension", "out of range"))


def check_fits(device: torch.device, flags: str, step, extra: dict[str, float] | None = None) -> None:
    """Refuse, before anything is allocated or written, sizes whose memory cannot exist on `device`.

    `step()` builds the models and runs one training forward of them (whole batch) and returns the models; it runs
    on the meta device, so nothing is allocated whatever the sizes. Counted: every tensor its operations return
    (the activations a backward keeps, and the parameters as they are made) plus three more copies of the
    parameters (gradients and Adam's two moments). `flags` names the flags that set these sizes. `extra` maps
    other needs (text naming their flags: data sets, sample batches) to bytes. A need, or all together, beyond the
    device's memory (device_memory) is a UserError naming the flags; sizes beyond 64 bits count as infinite.
    Sizes within the bound can still fail to allocate; run_cli reports those in one line.
    """
    try:
        with torch.device("meta"), _CountBytes() as count:
            models = step()
        params = sum(t.numel() * t.element_size() for m in models for t in m.parameters())
        size = float(count.bytes + 3 * params)
    except (RuntimeError, TypeError, ValueError, OverflowError, MemoryError) as e:
        if not _too_large(e):
            raise
        size = math.inf
    needs = {flags: size, **(extra or {})}
    total = device_memory(device)
    for what, need in needs.items():
        if not need <= total:  # also inf and nan
            raise UserError(f"{what} need at least {_gb(need)} of memory, more than the {_gb(total)} of the "
                            f"{device.type} device: use smaller sizes")
    if not sum(needs.values()) <= total:
        raise UserError(f"together, {'; '.join(needs)} need at least {_gb(sum(needs.values()))} of memory, more "
                        f"than the {_gb(total)} of the {device.type} device: use smaller sizes")


# ----------------------------------------------------------------------------------------------------------------
# Run plumbing: set-up
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, torch_deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices) and choose the CUDA kernels. torch_deterministic False (fastest
    on a GPU): cuDNN autotuning and TF32 tensor cores (Ampere and newer). True: deterministic algorithms (a warning
    where an op has none), no autotuning, full float32, so a CUDA run repeats bit for bit on the same GPU and
    software. CPU runs repeat bit for bit either way (none of these settings touches the CPU kernels)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch_deterministic:  # cuBLAS needs a fixed workspace for repeatable products (before its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(torch_deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = torch_deterministic
    torch.backends.cudnn.benchmark = not torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = not torch_deterministic
    torch.backends.cudnn.allow_tf32 = not torch_deterministic


def pick_device(spec: str, check_host_sync: bool = False, amp: str = "off") -> torch.device:
    """`auto` → cuda if available else cpu; `cpu`, `cuda`, `cuda:N` as given, checked to exist. The CUDA-only
    `--check-host-sync` and `--amp fp16` are refused on a CPU here, before anything is written."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type != "cuda" and check_host_sync:
        raise UserError("--check-host-sync needs a CUDA device")
    autocast(device, amp)  # refuses --amp fp16 on a CPU
    if spec == "auto":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} asked for CUDA but no CUDA GPU is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UserError(f"--device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def check_host_sync(enabled: bool) -> None:
    """CUDA only: make every host synchronisation raise (enabled) or be allowed again. `--check-host-sync` turns it
    on around the body of each training step, so a CUDA run proves its steps never wait on the host."""
    torch.cuda.set_sync_debug_mode("error" if enabled else "default")


def autocast(device: torch.device, amp: str):
    """Autocast context for `--amp {off,bf16,fp16}`. fp16 also needs a GradScaler (the scripts create one)."""
    if amp == "off":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# Run plumbing: the run folder
# ----------------------------------------------------------------------------------------------------------------
def write_atomically(path: str | Path, write) -> None:
    """Call `write(file)` on a new temporary file in `path`'s folder, flush it to the disk and rename it to `path`,
    so `path` always holds the old or the new complete content. The temporary name is unique (mkstemp: two writers
    of one path never share one); on any failure the temporary file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; outputs are readable like any other file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON, written atomically."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))


def check_out_dir(out_dir: str | Path, exp_name: str) -> None:
    """Refuse (UserError), before the data are loaded, an --exp-name that is not a plain folder name and an
    --out-dir that cannot receive run folders (a file, a path under a file, read-only, no permission).
    make_run_dir reports what only the creation reveals (/sys refuses a mkdir that access(2) allows)."""
    if not exp_name or exp_name in (".", "..") or "/" in exp_name or os.sep in exp_name or "\0" in exp_name:
        raise UserError(f"--exp-name must be a plain folder name (no '/'), got {exp_name!r}")
    probe = Path(out_dir)
    try:
        while not probe.exists() and probe.parent != probe:  # the nearest folder that exists
            probe = probe.parent
        if not probe.is_dir():
            raise UserError(f"--out-dir {out_dir}: {probe} is a file, not a folder")
    except OSError as e:
        raise UserError(f"--out-dir {out_dir}: {e.strerror or describe(e)}") from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {out_dir}: cannot create folders in {probe} (read-only or no permission)")


_RUN_LOCKS: dict[Path, int] = {}  # run folder -> file descriptor holding its lock, for the life of this process


def lock_run_dir(run_dir: str | Path) -> None:
    """Lock a run folder (flock(2) on run_dir/run.lock, which names the holder: pid, host, start time, command) for
    the life of this process, or refuse with a UserError naming the holder: two writers would interleave
    metrics.jsonl and overwrite each other's checkpoints. The kernel drops the lock however the process ends
    (kill -9 too), so a crashed run never blocks its resume. A no-op when this process holds it (tests run several
    scripts in one process); a warning and no lock without flock (some network file systems, Windows)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _RUN_LOCKS or fcntl is None:
        return
    fd = os.open(run_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = one_line(os.pread(fd, 2000, 0).decode(errors="replace")) or "a process that has not said who it is"
        os.close(fd)
        raise UserError(f"run folder {run_dir} is in use by another process ({holder}); "
                        f"wait for it to end or stop it first") from None
    except OSError as e:
        os.close(fd)
        print(f"warning: cannot lock {run_dir} ({describe(e)}); make sure no other process writes there",
              file=sys.stderr)
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                   f"{shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n").encode(), 0)
    _RUN_LOCKS[run_dir] = fd


def unlock_run_dir(run_dir: str | Path) -> None:
    """Give back the lock of lock_run_dir (process exit does it too)."""
    fd = _RUN_LOCKS.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def make_run_dir(args, resume_dir: str | Path | None = None) -> Path:
    """Create `out_dir/<exp_name>__<seed>__<unix time>/` with samples/ and checkpoints/, and write args.json.

    args.json holds every argument plus the git commit, torch version and the full command line. The folder is
    created exclusively (os.mkdir, never an existing one: runs started in the same second, by one process or by
    several at once, get `_1`, `_2`, ... suffixes) and locked (lock_run_dir) before anything is written in it.
    With `resume_dir` (the run folder of the checkpoint being resumed) that folder is locked, reused and its
    args.json kept. A file system that refuses (read-only, full, no permission) is a UserError.
    """
    try:
        if resume_dir is None:
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem, n = f"{args.exp_name}__{args.seed}__{int(time.time())}", 0
            while True:
                run_dir = out / (stem if n == 0 else f"{stem}_{n}")
                try:
                    os.mkdir(run_dir)  # atomic: exactly one process creates a given name
                    break
                except FileExistsError:
                    n += 1
        else:
            run_dir = Path(resume_dir)
        lock_run_dir(run_dir)
        (run_dir / "samples").mkdir(exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        if resume_dir is None:
            try:
                commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                        capture_output=True, text=True, timeout=5).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                commit = None
            write_json(run_dir / "args.json", dict(vars(args), git_commit=commit, torch_version=torch.__version__,
                                                   command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:])))
    except OSError as e:
        raise UserError(f"cannot create the run folder in --out-dir {args.out_dir}: "
                        f"{e.strerror or describe(e)}{f' ({e.filename})' if e.filename else ''}") from None
    return run_dir


# ----------------------------------------------------------------------------------------------------------------
# Run plumbing: checkpoints
# ----------------------------------------------------------------------------------------------------------------
def nonfinite_entries(state) -> list[str]:
    """Names (`G.net.0.weight`, `opt_d.state.3.exp_avg`, ...) of the floating-point tensors anywhere in `state`
    (nested dicts, lists, tuples) that hold a NaN or an infinity; one host sync per device."""
    found = []  # (name, tensor)

    def walk(obj, name):
        if torch.is_tensor(obj):
            if obj.is_floating_point() or obj.is_complex():
                found.append((name, obj))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{name}.{i}")

    walk(state, "")
    bad = set()
    for device in {t.device for _, t in found}:  # one stacked read per device
        on = [i for i, (_, t) in enumerate(found) if t.device == device]
        finite = torch.stack([torch.isfinite(found[i][1]).all() for i in on]).cpu().tolist()
        bad.update(i for i, ok in zip(on, finite) if not ok)
    return [found[i][0] for i in sorted(bad)]


class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write: torch.save reports it as a RuntimeError without the
    reason ("unexpected pos 704 vs 598")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Save `state` so that `path` is always a complete checkpoint of finite values, the new one or the old one.
    A state with a NaN or an infinity in any floating-point tensor is not written (UserError naming the entries
    and the step): a diverged update must never become what --resume restarts from. The write is atomic
    (write_atomically); a failed one (disk full, quota, read-only) is a UserError with the reason."""
    path = Path(path)
    bad = nonfinite_entries(state)
    if bad:
        kept = f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint was written yet"
        raise UserError(f"non-finite values at step {state.get('step')} in {', '.join(bad[:3])}"
                        f"{' and more' if len(bad) > 3 else ''}: stopped without saving them; {kept}")
    writer = _RecordingWriter(None)

    def write(f):
        writer.f = f
        torch.save(state, writer)

    try:
        write_atomically(path, write)
    except (OSError, RuntimeError) as e:
        reason = writer.error or e
        reason = reason.strerror if isinstance(reason, OSError) and reason.strerror else describe(reason)
        kept = "the previous checkpoint is kept" if path.is_file() else "no checkpoint was written"
        raise UserError(f"cannot write checkpoint {path}: {reason}; {kept}") from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True after checking every zip record's CRC-32 (torch.load does not, so
    a damaged file could load with wrong numbers). A missing, truncated, damaged or foreign file, an `args` that is
    not a dict or a `step` that is not an integer >= 0 is a UserError; check_checkpoint checks the rest."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except Exception as e:  # BadZipFile, EOFError, zlib/struct errors of a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: not a complete checkpoint file ({describe(e)})") from None
    if damaged is not None:
        raise UserError(f"checkpoint {path} is damaged: its record {damaged} fails the CRC-32 check")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files (pickle, zip, runtime)
        raise UserError(f"cannot read checkpoint {path}: {describe(e)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict):
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if "step" in state and not (type(state["step"]) is int and state["step"] >= 0):
        raise UserError(f"checkpoint {path}: step {one_line(repr(state['step']), 60)} is not an integer >= 0")
    return state


_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError)  # of a malformed checkpoint


@contextmanager
def checkpoint_errors(path: str | Path):
    """Around the code that applies a checkpoint (load_state_dict, optimizer, scaler, RNG states): what a malformed
    checkpoint makes it raise becomes one UserError line naming the file."""
    try:
        yield
    except UserError:
        raise
    except _MALFORMED as e:
        raise UserError(f"--resume {path}: the checkpoint does not fit this run ({describe(e)})") from None


def check_checkpoint(path: str | Path, state: dict, modules: dict[str, nn.Module], keys: tuple[str, ...] = (),
                     tensors: dict[str, tuple[int, ...]] | None = None, max_step: int | None = None) -> None:
    """Refuse (UserError, one line) a loaded checkpoint that does not fit this run, before any of it is applied:
    each of `modules` must find exactly its state_dict keys and shapes, `keys` must be present and `tensors` of
    their shapes, step an integer in [0, max_step], the RNG states restorable (tried on fresh generators), every
    floating-point tensor finite. checkpoint_errors reports what else the loading code trips over."""
    where = f"--resume {path}"
    missing = [k for k in (*modules, *keys, *(tensors or {}), "step", "rng") if k not in state]
    if missing:
        raise UserError(f"{where}: the checkpoint has no {', '.join(missing)} (not written by this script and "
                        f"configuration)")
    for name, module in modules.items():
        saved, expected = state[name], module.state_dict()
        if not isinstance(saved, dict) or not all(torch.is_tensor(v) for v in saved.values()):
            raise UserError(f"{where}: {name} is not a state dict of tensors")
        if set(saved) != set(expected):
            extra, lack = sorted(set(saved) - set(expected)), sorted(set(expected) - set(saved))
            raise UserError(f"{where}: {name} does not match this model (missing {lack[:3]}, unexpected {extra[:3]})")
        for key, value in expected.items():
            if saved[key].shape != value.shape:
                raise UserError(f"{where}: {name}.{key} has shape {tuple(saved[key].shape)}, this model "
                                f"{tuple(value.shape)} (other sizes than the flags ask for)")
    for name, shape in (tensors or {}).items():
        if not torch.is_tensor(state[name]) or tuple(state[name].shape) != tuple(shape):
            got = tuple(state[name].shape) if torch.is_tensor(state[name]) else type(state[name]).__name__
            raise UserError(f"{where}: {name} should be a tensor of shape {tuple(shape)}, got {got}")
    step = state["step"]
    if not (type(step) is int and 0 <= step and (max_step is None or step <= max_step)):
        raise UserError(f"{where}: step {one_line(repr(step), 60)} is outside 0..{max_step}")
    try:
        _restore_rng(state["rng"], random.Random(), np.random.RandomState(), torch.Generator().set_state)
        if not all(torch.is_tensor(s) and s.dim() == 1 for s in state["rng"].get("cuda", [])):
            raise TypeError("a CUDA generator state is not a 1-d tensor")
    except _MALFORMED as e:
        raise UserError(f"{where}: malformed random-generator state ({describe(e)})") from None
    bad = nonfinite_entries(state)
    if bad:
        raise UserError(f"{where}: non-finite values in {', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}")


def rng_state() -> dict:
    """All random-number-generator states as tensors and lists (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [py_version, list(py_state), py_gauss],
             "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                       float(np_gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict, py, np_random, set_torch) -> None:
    """The python, numpy and torch states of rng_state() into `py`, `np_random` and through `set_torch`."""
    py_version, py_state, py_gauss = state["python"]
    py.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np_random.set_state((np_name, np_keys.cpu().numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    set_torch(state["torch"].cpu().to(torch.uint8))


def set_rng_state(state: dict) -> None:
    """Restore the states of rng_state() (its tensors may be on any device). CUDA states are restored for the GPUs
    this machine has: a checkpoint from a 4-GPU box resumes on one GPU (the scripts draw on one device), one made
    without a GPU leaves the GPU generators as seeded."""
    _restore_rng(state, random, np.random, torch.set_rng_state)
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu().to(torch.uint8), device=index)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """`opt.load_state_dict(state)`, safe across devices and memory layouts. Keeps this optimizer's fused / foreach
    / capturable settings (load_state_dict restores the saved ones: a checkpoint made on a CPU would turn fused
    Adam off on a GPU); gives each moment its parameter's memory layout (a resume with another --channels-last:
    fused CUDA Adam refuses mixed layouts); puts Adam's `step` on the parameter's device (float32) for fused or
    capturable Adam, on the CPU otherwise; refuses (ValueError) moments of another shape than their parameter
    (load_state_dict accepts them and the first step fails)."""
    impl_keys = ("fused", "foreach", "capturable")
    kept = [{key: group[key] for key in impl_keys if key in group} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, settings in zip(opt.param_groups, kept):
        group.update(settings)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            param_state = opt.state.get(p, {})
            for name, value in list(param_state.items()):
                if not torch.is_tensor(value):
                    continue
                if name == "step":
                    param_state[name] = value.to(device=p.device if on_device else "cpu", dtype=torch.float32)
                elif value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)}, its parameter "
                                     f"{tuple(p.shape)}")
                elif value.shape == p.shape and value.stride() != p.stride():
                    param_state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


# what a resume may change: the run's length, device, speed switches and bookkeeping
RESUME_FREE = frozenset({"resume", "device", "out_dir", "exp_name", "track", "wandb_project_name", "wandb_entity",
                         "tensorboard", "save_every", "eval_every", "data_dir", "epochs", "iterations", "max_steps",
                         "compile", "fid_weights", "torch_deterministic", "check_host_sync", "log_every"})


def check_resume_config(saved_args: dict, args, allowed=(), where: str = "--resume: checkpoint") -> None:
    """Raise UserError when `args` differs from the saved arguments (a checkpoint's, a run folder's args.json) in
    anything but `allowed` keys and RESUME_FREE. A flag the saved arguments do not have is named as one they
    predate: that checkpoint was made by an older version."""
    free = RESUME_FREE | set(allowed)
    current = vars(args)
    new = sorted(k for k in current if k not in free and k not in saved_args)
    if new:
        raise UserError(f"{where} predates --{new[0].replace('_', '-')}{' and more flags' if len(new) > 1 else ''} "
                        f"(made by an older version of the script): continue it with that version")
    diff = [k for k in sorted(current) if k not in free and saved_args.get(k) != current[k]]
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved_args.get(k)!r} vs {current.get(k)!r}" for k in diff[:4])
        raise UserError(f"{where} was made with a different configuration ({shown})")


# ----------------------------------------------------------------------------------------------------------------
# The run: flags, folder, log, checkpoints, resume, Ctrl-C / SIGTERM, summary
# ----------------------------------------------------------------------------------------------------------------
def add_run_flags(p: argparse.ArgumentParser, script: str, save_every: int, unit: str) -> None:
    """The flags every script has for its run (the same names, meanings and help texts in all four)."""
    g = p.add_argument_group("run")
    g.add_argument("--exp-name", type=str, default=Path(script).stem,
                   help="run name prefix: the run folder is <out-dir>/<exp-name>__<seed>__<unix time>")
    g.add_argument("--seed", type=int, default=1, help="seed of python, numpy and torch")
    g.add_argument("--torch-deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA only. Off: cuDNN autotuning and TF32 tensor cores (fastest). On: deterministic "
                        "algorithms, full float32, so a GPU run repeats bit for bit. CPU runs repeat either way")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda if present)")
    g.add_argument("--out-dir", type=str, default="runs", help="folder that receives the run folder")
    g.add_argument("--track", action=argparse.BooleanOptionalAction, default=False,
                   help="also log to Weights & Biases (needs wandb; offline with WANDB_MODE=offline)")
    g.add_argument("--wandb-project-name", type=str, default="topk-gans", help="W&B project of --track")
    g.add_argument("--wandb-entity", type=str, default=None, help="W&B entity (team) of --track")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                   help="also log scalars to TensorBoard in <run folder>/tb (needs tensorboard)")
    g.add_argument("--save-every", type=int, default=save_every,
                   help=f"{unit} between checkpoints/last.pt writes (also written at the end and on Ctrl-C or "
                        "SIGTERM; 0 = only then)")
    g.add_argument("--resume", type=str, default=None,
                   help="<run folder>/checkpoints/last.pt: continue that run in its folder (same flags; its length "
                        "may grow)")
    g.add_argument("--check-host-sync", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA only, for tests: raise on any host synchronisation inside a training step (the first "
                        "two steps of a process and the logging, evaluation and checkpoint code are exempt)")


def check_run_flags(args) -> None:
    """Validation of add_run_flags' values (UserError, one line)."""
    check_seed("--seed", args.seed)
    if args.save_every < 0:
        raise UserError(f"--save-every must be >= 0, got {args.save_every}")
    if args.wandb_entity is not None and not args.track:
        raise UserError("--wandb-entity only applies with --track")


class _StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM (what SLURM and `kill` send) as a request to stop at the next step boundary.
    A second Ctrl-C interrupts at once (KeyboardInterrupt), for a step that never ends; a repeated SIGTERM does
    not. Only the main thread can install handlers; elsewhere the signals keep their default behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self._previous = False, {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a repeated SIGTERM (a group and a forwarded one) waits
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _generator_state(gen: torch.Generator) -> dict:
    return {"device": gen.device.type, "state": gen.get_state()}


class Run:
    """One training run: its folder, metrics log, checkpoints, resume, Ctrl-C / SIGTERM and summary.

    The calls, in a script's order:
        run = common.Run(args, allowed=(...))  # checks --out-dir, --exp-name, tracking; loads and checks --resume
        run.register(G=G, D=D, opt_g=opt_g, ...)  # what every checkpoint holds (None: a trick that is off)
        extra = run.start(total, device)        # applies the checkpoint, creates/locks the folder; run.step
        run.add(loss_d=..., loss_g=...)         # each step: scalars buffered on the device, no host sync
        run.log_window(step, epoch=e, k=k)      # every --log-every steps: one sync, non-finite stop, log, progress
        run.log(record)                         # evaluation records
        run.save(step, best=..., ...)           # checkpoints/last.pt (name="best.pt" too): registered + extra
        if run.stop_requested: run.interrupt(step, ...)   # Ctrl-C / SIGTERM: save, print how to continue
        run.finish(summary)                     # summary.json (timing and device added), unlock

    Nothing is written before `start`, so every refusal before it leaves no trace. A resumed run gives the weights
    and evaluation records of an uninterrupted one; a log window cut by a stop is logged at the stop, so the loss
    lines around a stop may be split in two (their timing fields differ too).
    """

    def __init__(self, args, allowed: tuple[str, ...] = (), argv: list[str] | None = None, script: str = ""):
        self.args, self.argv, self.script = args, argv, Path(script or sys.argv[0]).name
        self.ckpt, self.dir, self.objects, self.step = None, None, {}, 0
        self.train_time, self._buf, self._names = 0.0, [], None
        self._wandb = self._tb = None
        if args.track:
            try:
                import wandb  # noqa: F401  (lazy: optional dependency)
            except ImportError:
                raise UserError("--track needs the wandb package (pip install wandb), or drop --track") from None
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        if args.resume is None:
            check_out_dir(args.out_dir, args.exp_name)
            return
        self.ckpt = load_checkpoint(args.resume)
        check_resume_config(self.ckpt["args"], args, allowed, f"--resume {args.resume}: the checkpoint")
        # only into the run folder the checkpoint belongs to: <run>/checkpoints/x.pt beside <run>/args.json
        path = Path(args.resume).resolve()
        meta = path.parent.parent / "args.json"
        if path.parent.name != "checkpoints" or not meta.is_file():
            raise UserError(f"--resume {args.resume}: not inside a run folder (<run folder>/checkpoints/"
                            f"{path.name} beside <run folder>/args.json); copy the whole run folder to continue it")
        try:
            saved = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"--resume {args.resume}: cannot read {meta} ({describe(e)})") from None
        if not isinstance(saved, dict):
            raise UserError(f"--resume {args.resume}: {meta} is not a run folder's args.json")
        check_resume_config(saved, args, allowed, f"--resume {args.resume}: its run folder")
        self.dir = path.parent.parent

    def register(self, **objects) -> None:
        """Objects that every checkpoint holds and a resume restores: modules, optimizers, GradScalers, averages
        (anything with state_dict / load_state_dict) and torch.Generators. None values (tricks that are off) are
        skipped. Adding a checkpointed object is one more keyword here."""
        self.objects.update({k: v for k, v in objects.items() if v is not None})

    def start(self, total: int, device: torch.device, keys: tuple[str, ...] = (),
              tensors: dict[str, tuple[int, ...]] | None = None, rate: tuple[str, float] = ("it_per_s", 1.0),
              unit: str = "it") -> dict:
        """Apply the checkpoint after checking that it fits (every registered object, `keys` present, `tensors`
        of their shapes, step <= total); create the run folder (or reopen the resumed one), lock it, cut its log
        back to the checkpoint's step; start the clock and the Ctrl-C / SIGTERM handler.

        Returns the checkpoint's other entries ({} for a new run); `self.step` is where training continues.
        `rate` names the throughput field of the log and its scale (e.g. ("images_per_s", batch size))."""
        args, extra = self.args, {}
        self.total, self.device, self.unit = total, device, unit
        self._rate_key, self._rate_scale = rate
        if self.ckpt is not None:
            ck = self.ckpt
            modules = {k: v for k, v in self.objects.items() if isinstance(v, nn.Module)}
            others = tuple(k for k in self.objects if k not in modules)
            check_checkpoint(args.resume, ck, modules, keys=(*others, *keys), tensors=tensors, max_step=total)
            with checkpoint_errors(args.resume):
                for name, obj in self.objects.items():
                    if isinstance(obj, torch.optim.Optimizer):
                        load_optimizer_state(obj, ck[name])
                    elif isinstance(obj, torch.Generator):
                        self._load_generator(name, obj, ck[name])
                    else:
                        obj.load_state_dict(ck[name])
                set_rng_state(ck["rng"])
            self.step, self.train_time = ck["step"], float(ck.get("train_time_s", 0.0))
            extra = {k: v for k, v in ck.items() if k not in self.objects and k not in ("args", "rng", "step")}
        self.dir = make_run_dir(args, self.dir)
        self.log_path = self.dir / "metrics.jsonl"
        if self.ckpt is not None:  # a "final" record of a --max-steps stop is not final any more
            truncate_log(self.log_path, self.step, drop=lambda record: record.get("final"))
        if args.track:
            import wandb

            self._wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=self.dir.name,
                                     id=hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:16],
                                     config=vars(args), dir=str(self.dir), resume="allow")
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))
        self._stop = _StopRequest()
        self.start_step, self._wall0 = self.step, time.time()
        self._t = self._t_print = time.perf_counter()
        # the shown rate; recent (steps, seconds), decayed; this process's (steps, seconds)
        self._smooth, self._recent, self._proc = None, (0.0, 0.0), [0, 0.0]
        print(f"run folder {self.dir}" + (f" | resumed at {unit} {self.step}" if self.ckpt is not None else ""),
              flush=True)
        return extra

    def _load_generator(self, name: str, gen: torch.Generator, saved) -> None:
        if not (isinstance(saved, dict) and torch.is_tensor(saved.get("state"))):
            raise ValueError(f"{name} is not a generator state")
        if saved.get("device") == gen.device.type:
            gen.set_state(saved["state"].cpu().to(torch.uint8))
        else:  # a CPU generator's state does not fit a CUDA one (and back): reseed from the seed and the step
            gen.manual_seed(self.args.seed * 1_000_003 + self.ckpt["step"])
            print(f"note: {name} was saved on {saved.get('device')}, this run draws on {gen.device.type}: reseeded, "
                  f"so the continuation is not bit-identical to an uninterrupted run", file=sys.stderr)

    # ---- the log ----
    def add(self, **values: torch.Tensor) -> None:
        """Buffer this step's scalar tensors on their device (no host sync) until the next log_window."""
        if self._names is None:
            self._names = tuple(values)
        elif tuple(values) != self._names:
            raise ValueError(f"Run.add: got {tuple(values)}, earlier steps {self._names}")
        self._buf.append(torch.stack([v.detach().float().reshape(()) for v in values.values()]))

    def log_window(self, step: int, **fields) -> dict | None:
        """Read the buffered values (one host sync); a non-finite one stops the run naming its step and the last
        good checkpoint (save refuses non-finite weights, so last.pt is one). Logs their means with `fields` and
        the throughput, prints the progress line every 10 s. Returns the record (None if nothing was buffered)."""
        if not self._buf:
            return None
        values, n = torch.stack(self._buf).cpu(), len(self._buf)
        self._buf.clear()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i, j = (int(x) for x in bad[0])
            last = self.dir / "checkpoints" / "last.pt"
            raise UserError(f"non-finite {self._names[j]} ({values[i, j]:.4g}) at step {step - n + i + 1}: stopped; "
                            f"last good checkpoint: {last if last.is_file() else 'none yet'}")
        now = time.perf_counter()
        elapsed, self._t = now - self._t, now
        self.train_time += elapsed
        self._proc[0] += n
        self._proc[1] += elapsed
        rate = n / elapsed if elapsed > 0 else float("nan")
        record = {"step": step, **fields, **dict(zip(self._names, values.mean(0).tolist())),
                  self._rate_key: rate * self._rate_scale}
        self.log(record, reset_clock=False)
        # the shown rate: steps over seconds of the last ~60 s of training (both decayed alike), so a busy moment
        # does not swing the rate and the ETA from one line to the next
        decay = math.exp(-elapsed / 60.0)
        self._recent = (self._recent[0] * decay + n, self._recent[1] * decay + elapsed)
        self._smooth = self._recent[0] / self._recent[1] if self._recent[1] > 0 else None
        if now - self._t_print >= 10.0 or step >= self.total:
            self._t_print = now
            eta = (self.total - step) / self._smooth if self._smooth else float("nan")
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                             if k not in ("step", self._rate_key))
            print(f"[{step}/{self.total}] {100.0 * step / max(self.total, 1):5.1f}% | "
                  f"{(self._smooth or 0) * self._rate_scale:7.4g} {self._rate_key.replace('_per_s', '')}/s | "
                  f"ETA {fmt_seconds(eta)} | {shown}", flush=True)
        return record

    def log(self, record: dict, reset_clock: bool = True) -> None:
        """Append one record to metrics.jsonl (and W&B / TensorBoard). The clock of the next log window restarts
        here: evaluation and checkpoint time are not training time."""
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(record.get("step", 0)))
        if self._tb is not None:
            for key, value in scalars.items():
                if key != "step":
                    self._tb.add_scalar(key, value, record.get("step", 0))
        if reset_clock:
            self._t = time.perf_counter()

    # ---- checkpoints ----
    def state(self, step: int, **extra) -> dict:
        """The checkpoint: args, step, all RNG states, training time, every registered object and `extra`."""
        state = {"args": vars(self.args), "step": step, "rng": rng_state(), "train_time_s": self.train_time}
        for name, obj in self.objects.items():
            state[name] = _generator_state(obj) if isinstance(obj, torch.Generator) else obj.state_dict()
        state.update(extra)
        return state

    def save(self, step: int, name: str = "last.pt", **extra) -> Path:
        """Write checkpoints/<name> (atomic; refused when anything is non-finite, the old file kept)."""
        path = self.dir / "checkpoints" / name
        save_checkpoint(path, self.state(step, **extra))
        self._t = time.perf_counter()
        return path

    @property
    def stop_requested(self) -> bool:
        return self._stop.requested

    def interrupt(self, step: int, **extra) -> None:
        """After Ctrl-C or SIGTERM: save last.pt at this step and raise Interrupted, whose message (printed by
        run_cli, exit status 130) is the command that continues the run."""
        path = self.save(step, **extra)
        self.close()
        flags, skip = [], False
        for token in (sys.argv[1:] if self.argv is None else list(self.argv)):
            if skip or token == "--resume":
                skip = not skip
                continue
            if not token.startswith("--resume="):
                flags.append(str(token))
        command = shlex.join(["python", self.script, *flags, "--resume", str(path)])
        raise Interrupted(f"stopped at step {step}, checkpoint saved to {path}; continue with: {command}")

    def close(self) -> None:
        self._stop.restore()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
        unlock_run_dir(self.dir)

    def finish(self, summary: dict, line: str = "") -> dict:
        """Write summary.json (`summary` plus training time, wall time of this process, this process's throughput,
        device, peak GPU memory, the step a resume started from), print the last line, unlock the folder."""
        cuda = self.device.type == "cuda"
        summary = {**summary, "train_time_s": self.train_time, "wall_time_s": time.time() - self._wall0,
                   self._rate_key: self._proc[0] * self._rate_scale / self._proc[1] if self._proc[1] > 0 else None,
                   "resumed_from_step": self.start_step if self.ckpt is not None else None,
                   "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
                   "peak_memory_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
                   "run_dir": str(self.dir)}
        write_json(self.dir / "summary.json", summary)
        self.close()
        print(f"done: {fmt_seconds(self.train_time)} of training{line} | {self.dir}", flush=True)
        return summary


def truncate_log(path: Path, step: int, drop=None) -> None:
    """Keep the metrics.jsonl records with step <= `step` for which drop(record) is not true (a resume cuts the log
    back to its checkpoint). A line torn by a crash mid-write (the last one) is dropped; anything else these scripts
    do not write (a folder of that name, a line that is not a JSON object with a numeric step) is a UserError."""
    if not os.path.lexists(path):
        return
    if not path.is_file():
        raise UserError(f"{path} is not a file: cannot continue the run's log")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {describe(e)}") from None
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            record = None
        at = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(at, (int, float)) or isinstance(at, bool):
            raise UserError(f"{path}, line {i + 1}, is not a record of these scripts ({one_line(line, 60)}): "
                            f"fix or remove it")
        if at <= step and not (drop is not None and drop(record)):
            kept.append(line)
    write_atomically(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def fmt_seconds(s: float) -> str:
    """h:mm:ss (or mm:ss under an hour); --:-- when unknown."""
    if not math.isfinite(s):
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------------------------
# Data: real datasets as uint8 tensors on the CPU (the scripts move them to the device once)
# ----------------------------------------------------------------------------------------------------------------
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch file holds (dicts, lists, bytes, numpy uint8 arrays): the official files
    are pickles, and refusing every other global means a tampered file cannot run code when it is read."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("copyreg", "_reconstructor"), ("builtins", "object"),
                ("_codecs", "encode")}  # _codecs.encode: how Python 3 pickles numpy's raw bytes

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a CIFAR-10 file")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="latin1").load()
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError("labels and images differ in number")
    if len(labels) and not (labels.min() >= 0 and labels.max() <= 9):
        raise ValueError(f"labels outside 0-9 (from {labels.min()} to {labels.max()})")
    return data, labels


def _data_dir(data_dir: str | Path) -> Path:
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file, not a folder")
    return root


@contextmanager
def _undo_on_failure(root: Path):
    """When the block fails, remove the folders it created for `root` (from the topmost new one down, with what was
    downloaded into them): a failed download leaves nothing behind."""
    top = None
    for folder in [root, *root.parents]:
        if folder.exists():
            break
        top = folder
    try:
        yield
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


def load_cifar10(data_dir: str | Path, train: bool = True, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as (uint8 (N, 3, 32, 32), int64 (N,)) tensors from data_dir/cifar-10-batches-py/ (the official
    python version), else extracted from data_dir/cifar-10-python.tar.gz, which `download` fetches first
    (torchvision's downloader, MD5-checked). Offline or corrupt: a UserError saying where the files go."""
    root = _data_dir(data_dir)
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        archive = root / "cifar-10-python.tar.gz"
        if not archive.is_file() and download:
            try:
                from torchvision.datasets.utils import download_url
                with _undo_on_failure(root):
                    root.mkdir(parents=True, exist_ok=True)
                    download_url(_CIFAR_URL, str(root), archive.name, _CIFAR_MD5)
            except Exception as e:
                archive.unlink(missing_ok=True)
                raise UserError(
                    f"CIFAR-10 not found in {root} and the download failed ({type(e).__name__}); put "
                    f"cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ folder in {root}") from None
        if not archive.is_file():
            raise UserError(f"CIFAR-10 not found in {root}: put cifar-10-python.tar.gz or its extracted "
                            f"cifar-10-batches-py/ folder there (or drop --no-download)")
        # extracted into a temporary folder first: a truncated or wrong archive leaves no partial folder behind
        try:
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".cifar-extract-"))
        except OSError as e:
            raise UserError(f"cannot extract {archive} in {root}: {e.strerror or describe(e)}") from None
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(staging, filter="data")
            if not all((staging / folder.name / n).is_file() for n in names):
                raise UserError(f"{archive} does not contain the CIFAR-10 batches {names}")
            if folder.exists():  # an incomplete folder from elsewhere: the archive's complete one replaces it
                shutil.rmtree(folder)
            os.replace(staging / folder.name, folder)
        except UserError:
            raise
        except Exception as e:  # TarError, EOFError (truncated), zlib.error, OSError (disk full), ...
            raise UserError(f"cannot extract {archive}: {describe(e)}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    try:
        images, labels = zip(*[_read_cifar_batch(folder / n) for n in names])
    except Exception as e:  # a damaged pickle can raise almost anything (LookupError, OverflowError, MemoryError, ...)
        raise UserError(f"corrupt CIFAR-10 file in {folder}: {describe(e)}") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_mnist(data_dir: str | Path, train: bool = True, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as (uint8 (N, 1, 28, 28), int64 (N,)) tensors, through torchvision.datasets.MNIST, from the idx files
    in data_dir/MNIST/raw/, downloaded there when absent and `download`. Offline or corrupt: a UserError saying
    where the files go."""
    from torchvision.datasets import MNIST

    root = _data_dir(data_dir)
    raw = root / "MNIST" / "raw"
    try:
        ds = MNIST(str(data_dir), train=train, download=False)
    except RuntimeError as e:
        names = [f"{s}-{kind}-ubyte" for s in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
        if all((raw / name).is_file() for name in names):
            # the files torchvision looks for are all there, so this is a read error, not a missing dataset
            raise UserError(f"cannot read MNIST in {raw}: {describe(e)}") from None
        if not download:
            raise UserError(f"MNIST not found in {data_dir}: put the idx files (train-images-idx3-ubyte, ...) "
                            f"in {raw}") from None
        try:
            with _undo_on_failure(raw):
                ds = MNIST(str(data_dir), train=train, download=True)
        except Exception as e:
            raise UserError(f"MNIST not found in {data_dir} and the download failed ({type(e).__name__}); put the "
                            f"idx files (train-images-idx3-ubyte, ...) in {raw}") from None
    except Exception as e:  # malformed idx files
        raise UserError(f"cannot read MNIST in {data_dir}: {describe(e)}") from None
    images, labels = ds.data, ds.targets.long()
    # torchvision reads the two idx files independently: check that they describe one data set of 28x28 digits
    split = "training" if train else "test"
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise UserError(f"MNIST {split} images in {data_dir} are {tuple(images.shape[1:])}, not 28x28")
    if len(labels) != len(images):
        raise UserError(f"MNIST {split} files in {data_dir} hold {len(images)} images but {len(labels)} labels")
    if len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) <= 9):
        raise UserError(f"MNIST {split} labels in {data_dir} go outside 0-9 "
                        f"({int(labels.min())} to {int(labels.max())})")
    return images.unsqueeze(1).contiguous(), labels


def fake_images(n: int, shape: tuple[int, ...], num_classes: int = 10, seed: int = 0):
    """Random uint8 images (n, *shape) and labels (n,): the `--dataset fake` of smoke tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
            torch.randint(0, num_classes, (n,), generator=g))


def balanced_label_indices(labels: torch.Tensor, num_labels: int, seed: int, num_classes: int = 10) -> torch.Tensor:
    """Sorted int64 indices of `num_labels` examples, num_labels / num_classes per class, drawn with `seed`;
    UserError when num_labels is not a positive multiple of num_classes or a class has too few examples."""
    if num_labels <= 0 or num_labels % num_classes:
        raise UserError(f"--num-labels must be a positive multiple of {num_classes} (balanced classes), "
                        f"got {num_labels}")
    per_class = num_labels // num_classes
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise UserError(f"--num-labels {num_labels} needs {per_class} examples of class {c}; "
                            f"the data has {len(idx)}")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.sort(torch.cat(chosen)).values
