"""Layers and small helpers shared by the experiment scripts.

Nothing here trains anything or parses flags: each script stays readable top to bottom (CleanRL style) and only
borrows the pieces below. Everything is plain PyTorch.

Contents
    errors      UserError, run_cli
    set-up      seed_everything, pick_device, autocast, check_host_sync
    top-k       validate_topk, topk_k, select_topk
    layers      GaussianNoise, MinibatchDiscrimination, VirtualBatchNorm (+ vbn_reference_pass),
                WNLinear, WNConv2d, WNConvTranspose2d (weight norm with data-dependent init)
    training    HistoricalAverage, EMA
    run folder  make_run_dir, write_json, MetricsLogger, Progress
    checkpoints save_checkpoint, load_checkpoint, check_resume_config, rng_state, set_rng_state,
                load_optimizer_state
    data        load_cifar10, load_mnist, fake_images, balanced_label_indices
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
import subprocess
import sys
import tarfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """An expected user mistake (bad flag combination, missing data, bad checkpoint).

    `run_cli` prints it as one line on stderr and exits with status 2, without a traceback.
    """


def run_cli(main) -> None:
    """Run `main()`; turn a `UserError` into `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, torch_deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices) and choose the CUDA kernels.

    torch_deterministic False (the scripts' default, for speed on a GPU): cuDNN autotuning (`benchmark`) and TF32
    tensor cores for float32 matrix products and convolutions (Ampere and newer). True: deterministic cuDNN
    algorithms, no autotuning, full float32 products, so a CUDA run repeats bit for bit on the same GPU and software.
    CPU runs are bit-reproducible either way (none of these settings touches the CPU kernels).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    torch.backends.cudnn.benchmark = not torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = not torch_deterministic
    torch.backends.cudnn.allow_tf32 = not torch_deterministic


def pick_device(spec: str) -> torch.device:
    """`auto` → cuda if available else cpu; `cpu`, `cuda`, `cuda:N` as given, checked to exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} asked for CUDA but no CUDA GPU is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UserError(f"--device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def check_host_sync(enabled: bool) -> None:
    """CUDA only: make every host synchronisation raise (enabled) or be allowed again (torch.cuda.set_sync_debug_mode).

    The scripts' `--check-host-sync` turns it on around the body of each training step (not around logging,
    evaluation or checkpoints), so that a CUDA run proves its steps never wait on the host (tests/test_cuda.py).
    """
    torch.cuda.set_sync_debug_mode("error" if enabled else "default")


def autocast(device: torch.device, amp: str):
    """Autocast context for `--amp {off,bf16,fp16}`. fp16 also needs a GradScaler (the scripts create one)."""
    if amp == "off":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Top-k (Sinha et al. 2020)
# ----------------------------------------------------------------------------------------------------------------
def validate_topk(batch_size: int, mu: int, gamma: float) -> None:
    """Raise UserError unless 1 <= mu <= batch_size and 0 < gamma <= 1."""
    if not 1 <= mu <= batch_size:
        raise UserError(f"--mu must be between 1 and the batch size {batch_size}, got {mu}")
    if not (0.0 < gamma <= 1.0) or math.isnan(gamma):
        raise UserError(f"--gamma must be in (0, 1], got {gamma}")


def topk_k(batch_size: int, epoch: int, mu: int, gamma: float) -> int:
    """Number of fakes the generator learns from in `epoch` (0-based): k = max(mu, floor(B * gamma**epoch)).

    Computed from the epoch counter alone, so a resumed run gets the same k. `epoch` 0 gives k = B.
    """
    # The tiny epsilon keeps floor() from losing one sample to rounding when B * gamma**epoch is an integer
    # (e.g. 128 * 0.5**1 computed as 63.99999...).
    return max(mu, int(math.floor(batch_size * gamma**epoch + 1e-9)))


def select_topk(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices (k,) of the k highest (largest=True) or lowest critic scores. scores: (B,) or (B, 1), raw logits."""
    scores = scores.reshape(-1)
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.topk(scores.detach().float(), k, largest=largest, sorted=False).indices


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class GaussianNoise(nn.Module):
    """Adds N(0, std²) noise in training mode only; identity in eval mode. Any shape."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + self.std * torch.randn_like(x)
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


class MinibatchDiscrimination(nn.Module):
    """Minibatch discrimination (Salimans et al. 2016, eq. 4-5). (B, in_features) → (B, in_features + kernels).

    M_i = f(x_i) T reshaped to (kernels, kernel_dim); c_b(x_i, x_j) = exp(-||M_i,b - M_j,b||_L1);
    o(x_i)_b = Σ_{j≠i} c_b(x_i, x_j). The output is [x, o(x) + bias]. A collapsed batch (all rows equal) gives
    o ≈ B-1 per kernel, a diverse one o ≈ 0, which is what lets D see a lack of diversity.

    As in openai/improved-gan's `MinibatchLayer`: T ~ N(0, 0.05²), the self-distance is excluded (j ≠ i),
    and a learned per-kernel bias initialised at -1 is added to o.
    """

    def __init__(self, in_features: int, kernels: int = 100, kernel_dim: int = 5):
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        self.T = nn.Parameter(torch.randn(in_features, kernels * kernel_dim) * 0.05)
        self.bias = nn.Parameter(torch.full((kernels,), -1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = (x @ self.T).view(-1, self.kernels, self.kernel_dim)  # (B, K, D)
        l1 = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(dim=3)  # (B, B, K): ||M_i - M_j||_1 per kernel
        c = torch.exp(-l1)
        o = c.sum(dim=1) - 1.0  # drop the j = i term, which is exp(0) = 1
        return torch.cat([x, o + self.bias], dim=1)


class VirtualBatchNorm(nn.Module):
    """Virtual batch normalisation (Salimans et al. 2016, sec. 3.4) for (B, C) or (B, C, H, W) inputs.

    Statistics and normalisation are computed in float32 (also under autocast); the output has the input's dtype.
    Each example is normalised with the statistics of a fixed reference batch *plus itself*
    (weights 1/(N+1) and N/(N+1), as in the official code), so an example's output does not depend on its
    batch-mates. The reference statistics are recomputed, with gradient, on every forward of the model by
    `vbn_reference_pass(model, z_ref)` (the reference batch is fixed, the weights are not); the reference batch
    itself is normalised by its own statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.capturing = False
        self.ref_mean: torch.Tensor | None = None  # (C,) mean over the reference batch
        self.ref_meansq: torch.Tensor | None = None  # (C,) mean of squares over the reference batch
        self.ref_size = 0

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))  # batch and spatial dimensions
        shape = self._shape(x)
        out_dtype = x.dtype
        # Statistics in float32 whatever the autocast dtype: E[x^2] - E[x]^2 cancels catastrophically in bf16/fp16
        # (mean 3, std 0.1: the variance is 0.01 against terms of ~9, below bf16's resolution of 9).
        x = x.float()
        if self.capturing:
            mean, meansq = x.mean(dims), (x * x).mean(dims)
            self.ref_mean, self.ref_meansq, self.ref_size = mean, meansq, x.shape[0]
            mean, meansq = mean.view(shape), meansq.view(shape)
        else:
            if self.ref_mean is None:
                raise RuntimeError("VirtualBatchNorm: call vbn_reference_pass(model, z_ref) before the forward")
            # Per-example statistics (spatial mean for conv features), combined with the reference batch.
            sdims = list(range(2, x.dim()))
            x_mean = x.mean(sdims, keepdim=True) if sdims else x
            x_meansq = (x * x).mean(sdims, keepdim=True) if sdims else x * x
            new = 1.0 / (self.ref_size + 1.0)
            mean = new * x_mean + (1.0 - new) * self.ref_mean.view(shape)
            meansq = new * x_meansq + (1.0 - new) * self.ref_meansq.view(shape)
        var = (meansq - mean * mean).clamp_min(0.0)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(out_dtype)


def vbn_reference_pass(model: nn.Module, *ref_inputs) -> torch.Tensor:
    """Run `model(*ref_inputs)` with every VirtualBatchNorm capturing its reference statistics; return the output.

    Call it once before each (training or sampling) forward of a model that contains VBN layers.
    """
    layers = [m for m in model.modules() if isinstance(m, VirtualBatchNorm)]
    for m in layers:
        m.capturing = True
    try:
        return model(*ref_inputs)
    finally:
        for m in layers:
            m.capturing = False


class _WeightNormMixin:
    """Weight normalisation W = g · V / ||V|| (Salimans & Kingma 2016) with data-dependent initialisation.

    Parameters: `v` (the direction), `g` (one scale per output unit), `bias`. The first forward in training mode
    (normally a large batch run by the script under torch.no_grad) sets g = init_scale / std and
    bias = -mean · g of the pre-activations per output unit, so they start with zero mean and standard deviation
    `init_scale` on that batch (openai/improved-gan `nn.py`). The `initialized` buffer is saved in checkpoints.
    """

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
        norm = self.v.pow(2).sum(dims, keepdim=True).sqrt()
        gshape = [1] * self.v.dim()
        gshape[self.out_dim] = -1
        return self.v * (self.g.view(gshape) / norm)

    def _wn_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The buffer is read once and the answer cached in Python: bool() of a tensor is a host-device sync on the
        # GPU and a graph break under torch.compile (run the init forward eagerly, before compiling).
        if self.training and not self._init_checked and not torch.compiler.is_compiling():
            self._init_checked = True
            if bool(self.initialized):
                return self._apply_weight(x, self._weight(), self.bias)
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

    def forward(self, x):
        return self._wn_forward(x)


class WNConv2d(_WeightNormMixin, nn.Module):
    """Weight-normalised Conv2d with data-dependent init. (B, C_in, H, W) → (B, C_out, H', W')."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, init_scale=1.0, init_std=0.05):
        super().__init__()
        self.stride, self.padding = stride, padding
        self._wn_setup((out_channels, in_channels, kernel_size, kernel_size), out_channels, 0, init_scale, init_std)

    def _apply_weight(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding)

    def forward(self, x):
        return self._wn_forward(x)


class WNConvTranspose2d(_WeightNormMixin, nn.Module):
    """Weight-normalised ConvTranspose2d with data-dependent init. (B, C_in, H, W) → (B, C_out, H', W').

    PyTorch stores the transposed-conv weight as (C_in, C_out, k, k): the output unit is dimension 1.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 init_scale=1.0, init_std=0.05):
        super().__init__()
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self._wn_setup((in_channels, out_channels, kernel_size, kernel_size), out_channels, 1, init_scale, init_std)

    def _apply_weight(self, x, w, b):
        return F.conv_transpose2d(x, w, b, self.stride, self.padding, self.output_padding)

    def forward(self, x):
        return self._wn_forward(x)


# ----------------------------------------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------------------------------------
class HistoricalAverage:
    """Historical averaging (Salimans et al. 2016, sec. 3.3): penalty ||θ - (1/t) Σ_{i<t} θ_i||² (summed).

    `penalty(model)` is differentiable in the current parameters; call `update(model)` after each optimizer step
    to add the new parameters to the uniform running mean. The mean is kept in float32 on the parameters' device.
    """

    def __init__(self, model: nn.Module):
        self.count = 1  # the history starts with the initial parameters, so the first penalty is 0
        self.mean = [p.detach().clone().float() for p in model.parameters()]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """Sum over all parameters of ||θ - mean||², one multi-tensor kernel per op (no Python loop per tensor)."""
        params = [p.float() for p in model.parameters()]  # no copy for float32 parameters
        return torch.stack(torch._foreach_norm(torch._foreach_sub(params, self.mean))).pow(2).sum()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """mean ← mean + (θ - mean) / t: the running uniform average, as one multi-tensor lerp."""
        self.count += 1
        torch._foreach_lerp_(self.mean, [p.detach().float() for p in model.parameters()], 1.0 / self.count)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        for m, s in zip(self.mean, state["mean"]):
            m.copy_(s)


class EMA:
    """Exponential moving average of a model's parameters, for evaluation (Polyak averaging).

    `ema.module` is a frozen copy; `update(model)` does θ_ema ← decay·θ_ema + (1-decay)·θ and copies buffers
    (batch-norm statistics, weight-norm `initialized` flags) as they are. Create it after any data-dependent
    initialisation, so the average starts from the initialised weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ_ema ← θ_ema + (1 - decay)(θ - θ_ema) for all parameters, buffers copied: multi-tensor kernels, not one
        kernel launch per tensor."""
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()],
                             1.0 - self.decay)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Run folder
# ----------------------------------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def make_run_dir(args, resume_dir: str | Path | None = None) -> Path:
    """Create `out_dir/<exp_name>__<seed>__<unix time>/` with samples/ and checkpoints/, and write args.json.

    args.json holds every argument plus the git commit, torch version and the full command line. With
    `resume_dir` (the run folder of the checkpoint being resumed) that folder is reused and args.json is kept.
    """
    if resume_dir is not None:
        run_dir = Path(resume_dir)
    else:
        run_dir = Path(args.out_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}"
        n = 1
        while run_dir.exists():  # two runs started in the same second
            run_dir = Path(args.out_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}_{n}"
            n += 1
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    if resume_dir is None:
        meta = dict(vars(args), git_commit=_git_commit(), torch_version=torch.__version__,
                    command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
        write_json(run_dir / "args.json", meta)
    return run_dir


class MetricsLogger:
    """Appends one JSON object per line to `run_dir/metrics.jsonl` (flushed at once, so a crash loses nothing).

    On resume, `truncate_after(step)` drops lines logged after the checkpoint's step, so the file reads as one
    uninterrupted run. With `track=True` scalars also go to TensorBoard when it is installed.
    """

    def __init__(self, run_dir: str | Path, track: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if track:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                print("warning: --track needs the tensorboard package; logging to metrics.jsonl only", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash mid-write: drop it
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """Prints `[step/total] pct | it/s | ETA | key=value ...` at most every `every_s` seconds (and at the end).

    `rate()` is the throughput since the previous report, in steps per second.
    """

    def __init__(self, total: int, start: int = 0, every_s: float = 10.0, unit: str = "it"):
        self.total, self.every_s, self.unit = total, every_s, unit
        self.t_start = self.t_last = time.perf_counter()
        self.step_start = self.step_last = start
        self.last_rate = 0.0

    def due(self, step: int) -> bool:
        """True when a report is due at `step` (time elapsed, or the last step)."""
        return step >= self.total or time.perf_counter() - self.t_last >= self.every_s

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        if step > self.step_last and now > self.t_last:
            self.last_rate = (step - self.step_last) / (now - self.t_last)
        return self.last_rate

    def report(self, step: int, **values) -> float:
        """Print one progress line for `step`; return the current rate (steps/s)."""
        rate = self.rate(step)
        elapsed = time.perf_counter() - self.t_start
        overall = (step - self.step_start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / overall if overall > 0 else float("nan")
        fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"[{step}/{self.total}] {100.0 * step / max(self.total, 1):5.1f}% | {rate:7.3g} {self.unit}/s | "
              f"ETA {_fmt_seconds(eta)} | {fields}", flush=True)
        self.t_last, self.step_last = time.perf_counter(), step
        return rate


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a torn checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with `weights_only=True`; missing or unreadable files raise UserError (one clear line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files (pickle, zip, runtime)
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or "args" not in state:
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    return state


def check_resume_config(saved_args: dict, args, allowed: tuple[str, ...] = ()) -> None:
    """Raise UserError when `args` differs from the checkpoint's arguments in anything but `allowed` keys.

    Always allowed to differ: resume, device, out_dir, exp_name, track, save_every, eval_every, data_dir,
    and the length of the run (epochs / iterations / max_steps), so a run can be extended.
    """
    free = {"resume", "device", "out_dir", "exp_name", "track", "save_every", "eval_every", "data_dir",
            "epochs", "iterations", "max_steps", "compile", "fid_weights", "torch_deterministic",
            "check_host_sync"} | set(allowed)
    current = vars(args)
    diff = [k for k in sorted(set(saved_args) | set(current)) if k not in free
            and k in current and saved_args.get(k) != current.get(k)]
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved_args.get(k)!r} vs {current.get(k)!r}" for k in diff[:4])
        raise UserError(f"--resume: checkpoint was made with a different configuration ({shown})")


def rng_state() -> dict:
    """All random-number-generator states as tensors/lists (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by `rng_state()`; the tensors may be on any device (they are read on the CPU).

    CUDA states are restored for the GPUs this machine has: a checkpoint from a 4-GPU box resumes on one GPU (the
    scripts draw on one device only), and one made on a CPU-only machine leaves the GPU generators as seeded.
    """
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.cpu().numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu().to(torch.uint8), device=index)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """`opt.load_state_dict(state)`, made safe across devices and memory layouts.

    * Keeps this optimizer's implementation settings (fused / foreach / capturable): `Optimizer.load_state_dict`
      would restore the saved ones, so a checkpoint made on a CPU silently turns fused Adam off on a GPU.
    * Gives every per-parameter moment its parameter's memory layout: a run resumed with another `--channels-last`
      loads contiguous moments for channels-last parameters, and fused CUDA Adam refuses mixed layouts.
    * Puts Adam's `step` where the implementation expects it: on the parameter's device (float32) for fused or
      capturable Adam, on the CPU otherwise.
    """
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
                elif value.shape == p.shape and value.stride() != p.stride():
                    param_state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


# ----------------------------------------------------------------------------------------------------------------
# Data: real datasets as uint8 tensors (the scripts move them to the device once)
# ----------------------------------------------------------------------------------------------------------------
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds what a CIFAR-10 batch file holds (dicts, lists, bytes, numpy uint8 arrays).

    The official CIFAR-10 python files are pickles; refusing every other global means a tampered file cannot run
    code when it is read.
    """

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
    return data, labels


def load_cifar10(data_dir: str | Path, train: bool = True, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as (uint8 (N, 3, 32, 32), int64 (N,)) tensors on the CPU.

    Reads `data_dir/cifar-10-batches-py/` (the official python version). When it is absent and `download`,
    fetches and checks the official archive with torchvision's downloader (MD5-verified). Offline or corrupt →
    UserError saying where the files go.
    """
    root = Path(data_dir)
    folder = root / "cifar-10-batches-py"
    names = _CIFAR_TRAIN if train else _CIFAR_TEST
    if not all((folder / n).is_file() for n in names):
        archive = root / "cifar-10-python.tar.gz"
        if not archive.is_file() and download:
            try:
                from torchvision.datasets.utils import download_url
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
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(root, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"cannot extract {archive}: {e}") from None
        if not all((folder / n).is_file() for n in names):
            raise UserError(f"{archive} does not contain the CIFAR-10 batches {names}")
    try:
        parts = [_read_cifar_batch(folder / n) for n in names]
    except Exception as e:  # a damaged pickle can raise almost anything (LookupError, OverflowError, MemoryError, ...)
        raise UserError(f"corrupt CIFAR-10 file in {folder}: {type(e).__name__}: {str(e)[:200]}".splitlines()[0]) from None
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return images, labels


def load_mnist(data_dir: str | Path, train: bool = True, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as (uint8 (N, 1, 28, 28), int64 (N,)) tensors, through torchvision.datasets.MNIST.

    Looks for `data_dir/MNIST/raw/*-ubyte` (the idx files); downloads them when absent and `download`.
    Offline or corrupt → UserError saying where the files go.
    """
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(str(data_dir), train=train, download=False)
    except RuntimeError as e:
        raw = Path(data_dir) / "MNIST" / "raw"
        if all((raw / f"{s}-{kind}-ubyte").is_file() for s in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")):
            # the files torchvision looks for are all there, so this is a read error, not a missing dataset
            raise UserError(f"cannot read MNIST in {raw}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        if not download:
            raise UserError(f"MNIST not found in {data_dir}: put the idx files (train-images-idx3-ubyte, ...) "
                            f"in {Path(data_dir) / 'MNIST' / 'raw'}") from None
        try:
            ds = MNIST(str(data_dir), train=train, download=True)
        except Exception as e:
            raise UserError(f"MNIST not found in {data_dir} and the download failed ({type(e).__name__}); put the "
                            f"idx files (train-images-idx3-ubyte, ...) in {Path(data_dir) / 'MNIST' / 'raw'}") from None
    except Exception as e:  # malformed idx files
        raise UserError(f"cannot read MNIST in {data_dir}: {type(e).__name__}: {e}") from None
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def fake_images(n: int, shape: tuple[int, ...], num_classes: int = 10, seed: int = 0):
    """Random uint8 images (n, *shape) and labels (n,): the `--dataset fake` of smoke tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
            torch.randint(0, num_classes, (n,), generator=g))


def balanced_label_indices(labels: torch.Tensor, num_labels: int, seed: int, num_classes: int = 10) -> torch.Tensor:
    """Indices of `num_labels` examples, num_labels / num_classes per class, chosen by `seed` (sorted, int64).

    Raises UserError when num_labels is not a positive multiple of num_classes or a class has too few examples.
    """
    if num_labels <= 0 or num_labels % num_classes:
        raise UserError(f"--num-labels must be a positive multiple of {num_classes} (balanced classes), got {num_labels}")
    per_class = num_labels // num_classes
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise UserError(f"--num-labels {num_labels} needs {per_class} examples of class {c}; the data has {len(idx)}")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.sort(torch.cat(chosen)).values
