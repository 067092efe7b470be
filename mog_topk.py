"""Top-k GAN training on a 2-D mixture of Gaussians (the toy study of Sinha et al. 2020, Table 1 and Figure 2).

Paper: Samarth Sinha, Zhengli Zhao, Anirudh Goyal, Colin Raffel, Augustus Odena,
       "Top-k Training of GANs: Improving GAN Performance by Throwing Away Bad Samples", NeurIPS 2020
       (arXiv:2002.06224). Table 1: 25 / 64 / 100 modes, 50k iterations, % high-quality samples and % modes.

Example (the paper's 25-mode top-k cell in the default setup, about 20 minutes on one CPU core):
    python mog_topk.py --n-modes 25 --topk --seed 1
    python mog_topk.py --n-modes 25 --topk --setup base      # the setup used before the study

Setup. The paper fixes only: G and D are "4-layer MLPs with 256 hidden units", 50k iterations, "high quality" =
within 4 sigma of the nearest mode, a mode is recovered when it has at least one high-quality sample. The rest is a
choice, and it matters (README, "MoG setup study"). `--setup` picks one of the study's setups (SETUPS); a flag given
explicitly overrides its entry:
  * `all` (the default): grid spacing 1, 4 hidden layers, Adam betas (0.9, 0.99), k schedule epoch = 2,000
    iterations with floor mu = 0.75 B. These are the settings of the public JAX reproduction romina-a/JAX-GAN
    (commit ec98564). Chosen by the study's pre-registered rule: its GAN baseline is the closest to the paper's GAN
    row (top-k's numbers did not take part in the choice).
  * `base`: grid spacing 2 (PacGAN's 25-mode grid), 3 hidden layers, betas (0.5, 0.999) (DCGAN), epoch = 500
    iterations, mu = B/2: this script's setup before the study.
  * `spacing1`, `depth4`, `slowk`, `betas`: base with one of the four changes.
The k schedule entries apply with --topk only (without it k is not used and every setup records base's values).

Data. `--n-modes` (a perfect square: 25, 64, 100 in the paper) isotropic Gaussians with std `--std` 0.05 on a square
grid with spacing `--grid-spacing` centred on the origin (`metrics.grid_centers`: spacing 1 puts the 25 centres at
{-2,...,2}^2 as in JAX-GAN; spacing 2 at {-4,-2,0,2,4}^2 as in PacGAN). Every batch is drawn on the device: a
uniform mode index plus std * N(0, I). There is no fixed data set, so "an epoch" is defined by `--iters-per-epoch`.

Models (details the paper leaves open; ReLU in both nets as in JAX-GAN):
  * G: z ~ N(0, I) of dimension `--latent-dim` 2 -> `--hidden-layers` x (Linear 256 -> ReLU) -> Linear 2 (linear
    output: the data are unbounded). With `--vbn` every hidden Linear is followed by VirtualBatchNorm (reference
    batch: one fixed batch of latent vectors drawn at the start). "4-layer MLP" is read two ways: 4 hidden layers
    (JAX-GAN; setup all) or 4 linear layers counting the output (3 hidden; setup base).
  * D: x (2) -> `--hidden-layers` x (Linear 256 -> ReLU) -> [minibatch discrimination] -> Linear 1 (a raw logit).
    The last hidden layer (256 units, after ReLU) is the feature layer of `--feature-matching`; minibatch
    discrimination (`--minibatch-disc`) sits between it and the output layer.
  * PyTorch's default Linear initialisation.
  * Loss: non-saturating GAN loss (D: BCE on real=1 / fake=0; G: -log D(G(z))) on logits (softplus form).
  * Adam, lr 1e-4 for both nets, betas from the setup; batch 256; one D step then one G step per iteration; the G
    step draws fresh latent vectors (Goodfellow et al. 2014, Algorithm 1), it does not reuse the D step's fakes.

Top-k (CONVENTIONS.md). The D update is never changed. In the G update every fake is scored by D's raw logit and
the generator loss is computed on the k highest-scored fakes only (`--bottomk`: the k lowest, for analysis);
k = max(mu, floor(B * gamma^epoch)), gamma 0.99, epoch = iteration // `--iters-per-epoch`. With B = 256: in setup
`all` (epoch 2,000 iterations, mu 192) k falls from 256 to 201 by iteration 50k and would reach its floor 192 only
at iteration 58,000 (JAX-GAN trains 100k iterations); in setup `base` (epoch 500, mu 128) k reaches its floor at
iteration 34,500, so the last third of a 50k run trains at k = mu.

Improved-GAN techniques (Salimans et al. 2016), all combinable with `--topk`: `--feature-matching` (G loss =
mean over features of (E f(real) - E f(fake_topk))^2 on D's last hidden layer, with a fresh real batch, as in
openai/improved-gan), `--minibatch-disc` (`--mbd-kernels`, `--mbd-dim`; D's score of a fake then depends on its
whole fake batch, which is why the D step runs real and fake through D separately in that case), `--hist-avg`,
one-sided `--label-smoothing`, `--vbn`.

Evaluation. Every `--eval-every` iterations and at the end: `--eval-samples` 10,000 samples from a fixed set of
latent vectors (drawn once from a generator seeded by `--seed`, so evaluation never touches the training random
stream), `metrics.mode_metrics` with threshold 4 sigma: the fraction of high-quality samples (within 4 sigma of the nearest
mode), the fraction of modes recovered (both in [0, 1] in metrics.jsonl and summary.json; the sweep's table shows
percentages) and the reverse KL of the high-quality samples' mode histogram to the uniform one. Each evaluation also writes `samples/step_NNNNNNN.png`, a scatter plot of the samples
over the mode centres (high-quality samples in blue, others in red). The final one is saved as `samples.npz`
(`samples`, `centers`, `std`) and summarised in `summary.json`.

Speed (same maths as a textbook loop, measured by benchmarks/bench_mog.py). Two implementations of one iteration:
  * `train_step` (autograd; used whenever feature matching, minibatch discrimination, VBN or historical averaging is
    on): without minibatch discrimination the D step sends cat(real, fake) through D in one forward (D has no
    batch-dependent layer then, so each row's output is unchanged); G's forward in the D step runs under no_grad; D's
    parameters are frozen during the G step so no weight gradient of D is computed; fused Adam.
  * `FastStep` (default otherwise, `--no-fast-step` to use train_step): the same iteration with hand-written
    back-propagation of the two MLPs into buffers allocated once (class MLPBackprop); equal to train_step to float
    rounding (tests/test_mog.py). On a CPU the step is then almost only its matrix products with a 256x256 weight
    (18 with 3 hidden layers, 27 with 4; a third of them on 2B rows).
Both keep the losses in a tensor buffer and read (and check for NaN/inf) them once every `--log-every` steps instead
of calling .item() every step. The README's pre-study Table 1 (setup base) was made with train_step (it predates
FastStep); the study's runs with FastStep.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import metrics

# The setups of the MoG setup study (README, "MoG setup study"): name -> the settings it fixes. `--setup` picks one;
# a flag given explicitly overrides its entry. The default is the setup the study's pre-registered rule chose. The k
# schedule entries (iters_per_epoch, mu_fraction: the floor of k as a fraction of the batch) apply with --topk only;
# without it they are not used, and the run keeps the inert values of `base` (500, B/2), so the GAN runs of setups
# that differ only in the k schedule are the same run with the same arguments.
SETUPS = {
    "base": dict(grid_spacing=2.0, hidden_layers=3, beta1=0.5, beta2=0.999, iters_per_epoch=500, mu_fraction=0.5),
    "spacing1": dict(grid_spacing=1.0, hidden_layers=3, beta1=0.5, beta2=0.999, iters_per_epoch=500, mu_fraction=0.5),
    "depth4": dict(grid_spacing=2.0, hidden_layers=4, beta1=0.5, beta2=0.999, iters_per_epoch=500, mu_fraction=0.5),
    "slowk": dict(grid_spacing=2.0, hidden_layers=3, beta1=0.5, beta2=0.999, iters_per_epoch=2000, mu_fraction=0.75),
    "betas": dict(grid_spacing=2.0, hidden_layers=3, beta1=0.9, beta2=0.99, iters_per_epoch=500, mu_fraction=0.5),
    "all": dict(grid_spacing=1.0, hidden_layers=4, beta1=0.9, beta2=0.99, iters_per_epoch=2000, mu_fraction=0.75),
}
DEFAULT_SETUP = "all"  # chosen by the study's pre-registered rule (README, "MoG setup study")
TOPK_ONLY = ("iters_per_epoch", "mu_fraction")


def parse_args(argv=None):
    # common.ArgumentParser: argparse's own errors are one `error:` line too (the usage is for --help)
    p = common.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # run
    p.add_argument("--seed", type=int, default=1, help="seed of python, numpy and torch")
    p.add_argument("--torch-deterministic", action=argparse.BooleanOptionalAction, default=False,
               help="CUDA only. Off (default, fastest): cuDNN autotuning and TF32 tensor cores for float32 "
               "products. On: deterministic cuDNN, no autotuning, full float32 (a GPU run repeats bit for bit). "
               "CPU runs are bit-reproducible either way")
    p.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--check-host-sync", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA only, for tests: raise on any host synchronisation inside a training step (the first "
                        "two steps of a process and the logging/evaluation/checkpoint code are exempt)")
    p.add_argument("--fast-step", action=argparse.BooleanOptionalAction, default=True,
                   help="hand-written back-propagation (FastStep; same maths as autograd to float rounding) when no "
                        "option needs autograd: ignored with --feature-matching/--minibatch-disc/--vbn/--hist-avg")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default, which follows OMP_NUM_THREADS)")
    p.add_argument("--out-dir", type=str, default="runs", help="parent folder of the run folder")
    p.add_argument("--exp-name", type=str, default=os.path.basename(__file__)[: -len(".py")],
                   help="run folder is <out-dir>/<exp-name>__<seed>__<unix time>")
    p.add_argument("--track", action=argparse.BooleanOptionalAction, default=False,
                   help="also log to TensorBoard (needs the tensorboard package)")
    p.add_argument("--setup", type=str, default=DEFAULT_SETUP, choices=sorted(SETUPS),
                   help="setup of the MoG setup study that gives --grid-spacing, --hidden-layers, --beta1, --beta2 "
                        "and, with --topk, --iters-per-epoch and --mu when they are not given: " +
                        "; ".join(f"{name}: spacing {v['grid_spacing']:g}, {v['hidden_layers']} hidden layers, "
                                  f"betas ({v['beta1']:g}, {v['beta2']:g}), k epoch {v['iters_per_epoch']} "
                                  f"iterations, floor {v['mu_fraction']:g} B" for name, v in SETUPS.items()))
    # data
    p.add_argument("--n-modes", type=int, default=25, help="number of Gaussians, a perfect square (25, 64, 100)")
    p.add_argument("--grid-spacing", type=common.finite_float, default=None,
                   help="distance between neighbouring mode centres (None: the --setup's)")
    p.add_argument("--std", type=common.finite_float, default=0.05, help="standard deviation of every Gaussian")
    # models and optimisation
    p.add_argument("--latent-dim", type=int, default=2, help="dimension of G's input noise z ~ N(0, I)")
    p.add_argument("--hidden-dim", type=int, default=256, help="hidden units of every layer of G and D")
    p.add_argument("--hidden-layers", type=int, default=None,
                   help="hidden Linear+ReLU layers of G and of D (3: four linear layers each, counting the output; "
                        "None: the --setup's)")
    p.add_argument("--batch-size", type=int, default=256, help="real and fake samples per step")
    p.add_argument("--iterations", type=int, default=50000, help="training iterations (one D and one G step each)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many iterations (smoke runs, benchmarks); still a complete run folder")
    p.add_argument("--lr-g", type=common.finite_float, default=1e-4, help="Adam learning rate of G")
    p.add_argument("--lr-d", type=common.finite_float, default=1e-4, help="Adam learning rate of D")
    p.add_argument("--beta1", type=common.finite_float, default=None, help="Adam beta1 of both nets (None: the --setup's)")
    p.add_argument("--beta2", type=common.finite_float, default=None, help="Adam beta2 of both nets (None: the --setup's)")
    # top-k
    p.add_argument("--topk", action=argparse.BooleanOptionalAction, default=False,
                   help="top-k generator update (Sinha et al. 2020)")
    p.add_argument("--mu", type=int, default=None,
                   help="floor of k in samples; needs --topk (None: the --setup's fraction of the batch)")
    p.add_argument("--gamma", type=common.finite_float, default=0.99,
                   help="k decay per epoch: k = max(mu, floor(B * gamma^epoch))")
    p.add_argument("--iters-per-epoch", type=int, default=None,
                   help="iterations that make one epoch of the k schedule (None: the --setup's with --topk, else 500)")
    p.add_argument("--bottomk", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the k LOWEST-scored fakes instead (analysis only); needs --topk")
    # Improved-GAN techniques
    p.add_argument("--feature-matching", action=argparse.BooleanOptionalAction, default=False,
                   help="G loss = squared distance between mean D features (last hidden layer) of real and fake")
    p.add_argument("--minibatch-disc", action=argparse.BooleanOptionalAction, default=False,
                   help="minibatch discrimination layer before D's output")
    p.add_argument("--mbd-kernels", type=int, default=100, help="minibatch discrimination: number of kernels")
    p.add_argument("--mbd-dim", type=int, default=5, help="minibatch discrimination: dimension of each kernel")
    p.add_argument("--hist-avg", type=common.finite_float, default=0.0,
                   help="historical averaging penalty weight on G and D (0 = off)")
    p.add_argument("--label-smoothing", type=common.finite_float, default=0.0,
                   help="one-sided label smoothing: real target 1 - value (0 = off)")
    p.add_argument("--vbn", action=argparse.BooleanOptionalAction, default=False,
                   help="virtual batch normalisation after every hidden layer of G")
    # evaluation, logging, checkpoints
    p.add_argument("--eval-every", type=int, default=5000, help="evaluate and plot every N iterations (and at the end)")
    p.add_argument("--eval-samples", type=int, default=10000, help="samples per evaluation")
    p.add_argument("--log-every", type=int, default=500, help="write losses and it/s to metrics.jsonl every N steps")
    p.add_argument("--save-every", type=int, default=5000, help="write checkpoints/last.pt every N iterations")
    p.add_argument("--keep-checkpoints", action=argparse.BooleanOptionalAction, default=False,
                   help="also keep checkpoints/step_NNNNNNN.pt at every --save-every (for the update-direction analysis)")
    p.add_argument("--resume", type=str, default=None, help="continue from runs/<run>/checkpoints/last.pt")
    args = p.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args) -> None:
    """Every check that needs no file: raise common.UserError (one line) before anything is written. Fills the
    settings left at None from --setup first."""
    apply_setup(args)
    common.check_seed("--seed", args.seed)
    side = math.isqrt(args.n_modes) if args.n_modes > 0 else 0
    if args.n_modes < 1 or side * side != args.n_modes:
        raise common.UserError(f"--n-modes must be a perfect square (25, 64, 100, ...), got {args.n_modes}")
    positive_ints = ["latent_dim", "hidden_dim", "hidden_layers", "batch_size", "iterations", "iters_per_epoch", "eval_every",
                     "eval_samples", "log_every", "save_every", "mbd_kernels", "mbd_dim"]
    for name in positive_ints:
        if getattr(args, name) < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise common.UserError(f"--max-steps must be a positive integer, got {args.max_steps}")
    for name in ["grid_spacing", "std", "lr_g", "lr_d"]:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise common.UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    # the data are float32: --std and --grid-spacing must be float32 numbers, and the squared distances between
    # samples and centres (training data, metrics, plots) must not overflow float32
    f32 = np.finfo(np.float32)
    for name in ["std", "grid_spacing"]:
        if not float(f32.tiny) <= getattr(args, name) <= float(f32.max):
            raise common.UserError(f"--{name.replace('_', '-')} {getattr(args, name):g} is not representable in "
                                   f"float32, the data's type (use {float(f32.tiny):.2g} to {float(f32.max):.2g})")
    reach = args.grid_spacing * (side - 1) / 2 + 10 * args.std  # farthest sample from the origin, roughly
    if not 2 * (2 * reach) * (2 * reach) <= float(f32.max):  # (products: a float ** 2 raises OverflowError)
        raise common.UserError(f"--grid-spacing {args.grid_spacing:g} and --std {args.std:g} put samples up to "
                               f"{reach:.3g} from the origin: their squared distances overflow float32; use smaller "
                               f"values")
    for name in ["beta1", "beta2"]:
        if not 0.0 <= getattr(args, name) < 1.0:
            raise common.UserError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not (math.isfinite(args.hist_avg) and args.hist_avg >= 0):
        raise common.UserError(f"--hist-avg must be >= 0, got {args.hist_avg}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise common.UserError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.threads < 0:
        raise common.UserError(f"--threads must be >= 0, got {args.threads}")
    if args.minibatch_disc and args.batch_size < 2:
        raise common.UserError("--minibatch-disc needs --batch-size >= 2")
    if not args.topk and args.mu is not None:
        raise common.UserError("--mu only applies with --topk")
    if not args.topk and args.bottomk:
        raise common.UserError("--bottomk selects among the fakes of the top-k update: add --topk")
    if args.mu is None:
        fraction = SETUPS[args.setup]["mu_fraction"] if args.topk else SETUPS["base"]["mu_fraction"]
        args.mu = max(1, int(args.batch_size * fraction))
    common.validate_topk(args.batch_size, args.mu, args.gamma)


def apply_setup(args) -> None:
    """Give every setup setting that is None the value of --setup (the k schedule's only with --topk: see SETUPS)."""
    if getattr(args, "setup", None) is None:  # a namespace made by hand (tests, older code): the base setup
        args.setup = "base"
    if args.setup not in SETUPS:
        raise common.UserError(f"--setup must be one of {', '.join(SETUPS)}, got {args.setup!r}")
    for name, value in SETUPS[args.setup].items():
        if name == "mu_fraction":
            continue  # resolved with the batch size in validate_args
        if getattr(args, name, None) is None:
            setattr(args, name, value if (args.topk or name not in TOPK_ONLY) else SETUPS["base"][name])


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """z (B, latent_dim) -> x (B, 2). `hidden_layers` Linear+ReLU layers (optional VirtualBatchNorm after each hidden
    Linear), then a linear output layer."""

    def __init__(self, latent_dim: int, hidden: int, vbn: bool = False, hidden_layers: int = 3):
        super().__init__()
        layers, width = [], latent_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden)] + ([common.VirtualBatchNorm(hidden)] if vbn else []) + [nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)
        self.vbn = vbn
        self.register_buffer("z_ref", torch.zeros(0, latent_dim))  # VBN reference latents (set by main)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.vbn:  # reference statistics are recomputed from the fixed reference batch with the current weights
            common.vbn_reference_pass(self.net, self.z_ref)
        return self.net(z)


class Discriminator(nn.Module):
    """x (B, 2) -> logit (B,). `hidden_layers` Linear+ReLU layers (the feature layer is the last), optional minibatch
    discrimination, Linear output. `forward(x, features=True)` also returns the features (B, hidden)."""

    def __init__(self, hidden: int, mbd_kernels: int = 0, mbd_dim: int = 5, hidden_layers: int = 3):
        super().__init__()
        layers, width = [], 2
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.mbd = common.MinibatchDiscrimination(hidden, mbd_kernels, mbd_dim) if mbd_kernels > 0 else None
        self.out = nn.Linear(hidden + (mbd_kernels if mbd_kernels > 0 else 0), 1)

    def forward(self, x: torch.Tensor, features: bool = False):
        f = self.trunk(x)
        h = self.mbd(f) if self.mbd is not None else f
        logit = self.out(h).squeeze(1)
        return (logit, f) if features else logit


# ----------------------------------------------------------------------------------------------------------------
# Data, one training step, evaluation
# ----------------------------------------------------------------------------------------------------------------
def sample_real(centers: torch.Tensor, std: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n samples of the uniform mixture of N(centers[i], std^2 I), drawn on centers' device with `gen`."""
    idx = torch.randint(0, centers.shape[0], (n,), generator=gen, device=centers.device)
    return centers[idx] + std * torch.randn(n, 2, generator=gen, device=centers.device)


class StepConfig:
    """What `train_step` needs besides the nets: loss options, and the hist-avg trackers (None when off)."""

    def __init__(self, args, G: nn.Module, D: nn.Module):
        self.largest = not args.bottomk
        self.label_smoothing = args.label_smoothing
        self.feature_matching = args.feature_matching
        self.joint_d_forward = not args.minibatch_disc  # only valid when D has no batch-dependent layer
        self.hist_avg = args.hist_avg
        self.ha_g = common.HistoricalAverage(G) if args.hist_avg > 0 else None
        self.ha_d = common.HistoricalAverage(D) if args.hist_avg > 0 else None


def train_step(G, D, opt_g, opt_d, cfg: StepConfig, real_d, z_d, z_g, real_g, k: int):
    """One iteration: a D step on (real_d, G(z_d)), then a G step on the top-k of G(z_g).

    real_g is the real batch of the feature-matching G loss (None otherwise). Returns the (detached) D and G losses
    as 0-d tensors; reading them is left to the caller so the step itself never synchronises.
    """
    B = z_g.shape[0]
    # --- discriminator step (never changed by top-k) ---
    with torch.no_grad():
        fake_d = G(z_d)
    if cfg.joint_d_forward:  # one forward of cat(real, fake): identical per-row maths without batch-dependent layers
        logits = D(torch.cat([real_d, fake_d]))
        d_real, d_fake = logits[: real_d.shape[0]], logits[real_d.shape[0]:]
    else:  # minibatch discrimination compares a sample with its batch-mates: real and fake batches stay apart
        d_real, d_fake = D(real_d), D(fake_d)
    # ALGO LOGIC: one-sided label smoothing; BCE(logit, t) = t * softplus(-logit) + (1 - t) * softplus(logit)
    s = cfg.label_smoothing
    loss_d = (1.0 - s) * F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if s > 0:
        loss_d = loss_d + s * F.softplus(d_real).mean()
    if cfg.ha_d is not None:  # ALGO LOGIC: historical averaging
        loss_d = loss_d + cfg.hist_avg * cfg.ha_d.penalty(D)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    if cfg.ha_d is not None:
        cfg.ha_d.update(D)

    # --- generator step ---
    D.requires_grad_(False)  # gradients flow through D to the fakes, but D's own weight gradients are not needed
    fake_g = G(z_g)
    scores, f_fake = D(fake_g, features=True)
    # ALGO LOGIC (top-k): score every fake by D's raw logit; the G loss uses only the k highest (lowest: --bottomk)
    if k < B:
        keep = common.select_topk(scores, k, largest=cfg.largest)
        scores, f_fake = scores[keep], f_fake[keep]
    if cfg.feature_matching:  # ALGO LOGIC: feature matching on D's last hidden layer
        with torch.no_grad():
            _, f_real = D(real_g, features=True)
        loss_g = (f_real.mean(0) - f_fake.mean(0)).pow(2).mean()
    else:  # non-saturating loss -log sigmoid(D(G(z)))
        loss_g = F.softplus(-scores).mean()
    if cfg.ha_g is not None:
        loss_g = loss_g + cfg.hist_avg * cfg.ha_g.penalty(G)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    D.requires_grad_(True)
    if cfg.ha_g is not None:
        cfg.ha_g.update(G)
    return loss_d.detach(), loss_g.detach()


# ----------------------------------------------------------------------------------------------------------------
# The same iteration with hand-written back-propagation (used when no option needs autograd; see --fast-step)
# ----------------------------------------------------------------------------------------------------------------
class MLPBackprop:
    """Forward and backward of a Linear-ReLU-...-Linear stack (G's `net`, or D's trunk + output layer) by hand.

    Activations and input gradients go into buffers allocated once per (batch size, tag); weight and bias gradients
    are written straight into `.grad`. The products are the ones autograd computes (forward x W^T + b; backward
    dY^T X, sum(dY), dY W and the ReLU mask), so gradients agree with autograd to float rounding. What it saves is
    the per-step allocation of ~40 tensors of 256-512 rows and autograd's bookkeeping, which on a CPU are most of
    what a step of these small nets costs beyond its 256x256 matrix products (benchmarks/bench_mog.py). Two layers
    take another form of the same product, for speed only: the weight gradient of a 2-input layer is computed as
    (X^T dY)^T (MKL is several times slower at dY^T X with 2 output columns, timed alone on this machine), and dY W
    of the 1-unit output layer as the outer product it is. On this machine the step's weights stay bit-identical to
    the plain forms' (100 steps compared), so the study's runs, made before this change, repeat exactly.
    """

    def __init__(self, module: nn.Module):
        self.layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
        self.buffers = {}

    def _buffers(self, n: int, tag: str, like: torch.Tensor):
        if (n, tag) not in self.buffers:
            self.buffers[n, tag] = ([like.new_empty(n, layer.out_features) for layer in self.layers],  # outputs
                                    [like.new_empty(n, layer.in_features) for layer in self.layers])  # input grads
        return self.buffers[n, tag]

    def forward(self, x: torch.Tensor, tag: str) -> torch.Tensor:
        """x (n, in) -> (n, out). Keeps every layer's output for the next `backward` with the same tag."""
        outputs, _ = self._buffers(x.shape[0], tag, x)
        h = x
        for i, layer in enumerate(self.layers):
            torch.addmm(layer.bias, h, layer.weight.t(), out=outputs[i])
            if i < len(self.layers) - 1:
                outputs[i].relu_()
            h = outputs[i]
        return h

    def backward(self, x: torch.Tensor, tag: str, grad_out: torch.Tensor, weight_grads: bool = True,
                 input_grad: bool = False):
        """Back-propagate grad_out (n, out) through the last forward(x, tag): weight/bias gradients into .grad
        (overwritten, not accumulated) when weight_grads; returns d/dx (n, in) when input_grad, else None."""
        outputs, input_grads = self._buffers(x.shape[0], tag, x)
        g = grad_out
        for i in reversed(range(len(self.layers))):
            layer, h_in = self.layers[i], outputs[i - 1] if i > 0 else x
            if weight_grads:
                if layer.weight.grad is None:
                    layer.weight.grad, layer.bias.grad = torch.empty_like(layer.weight), torch.empty_like(layer.bias)
                if layer.in_features < 8:  # the 2-D input layer: (in, out), then transposed, is several times faster
                    layer.weight.grad.copy_(torch.mm(h_in.t(), g).t())
                else:
                    torch.mm(g.t(), h_in, out=layer.weight.grad)
                torch.sum(g, 0, out=layer.bias.grad)
            if i == 0 and not input_grad:
                return None
            if layer.out_features == 1:  # D's output layer: dY W is an outer product, one multiplication per entry
                torch.mul(g, layer.weight, out=input_grads[i])
            else:
                torch.mm(g, layer.weight, out=input_grads[i])
            if i > 0:  # through the ReLU that produced h_in: the gradient passes where h_in > 0 (autograd's rule)
                torch.ops.aten.threshold_backward.grad_input(input_grads[i], h_in, 0, grad_input=input_grads[i])
            g = input_grads[i]
        return g


class FastStep:
    """`train_step` for the configurations without feature matching, minibatch discrimination, VBN or historical
    averaging (Table 1's), with MLPBackprop instead of autograd. Same losses, same top-k / bottom-k selection, same
    gradients to float rounding (tests/test_mog.py compares the two); returns (loss_d, loss_g) like train_step."""

    def __init__(self, G: Generator, D: Discriminator, cfg: StepConfig):
        assert not (G.vbn or D.mbd is not None or cfg.feature_matching or cfg.ha_g is not None)
        self.G, self.D, self.cfg = MLPBackprop(G.net), MLPBackprop(D), cfg

    @torch.no_grad()
    def __call__(self, opt_g, opt_d, real_d, z_d, z_g, k: int):
        s, n_real, B = self.cfg.label_smoothing, real_d.shape[0], z_g.shape[0]
        # --- discriminator step (never changed by top-k) ---
        x = torch.cat([real_d, self.G.forward(z_d, "d")])
        logits = self.D.forward(x, "d").squeeze(1)
        d_real, d_fake = logits[:n_real], logits[n_real:]
        loss_d = (1.0 - s) * F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        # d loss_d / d logit, written the way autograd evaluates it: real -(1-s) sigmoid(-l) [+ s sigmoid(l)],
        # fake sigmoid(l), each over its batch size (from the means)
        grad_real = torch.sigmoid(-d_real).mul_(-(1.0 - s))
        if s > 0:
            loss_d = loss_d + s * F.softplus(d_real).mean()
            grad_real.add_(torch.sigmoid(d_real), alpha=s)
        grad = torch.cat([grad_real.div_(n_real), torch.sigmoid(d_fake).div_(d_fake.shape[0])])
        self.D.backward(x, "d", grad.unsqueeze(1))
        opt_d.step()

        # --- generator step: D's weights get no gradient, the fakes do ---
        fake = self.G.forward(z_g, "g")
        scores = self.D.forward(fake, "g").squeeze(1)
        # ALGO LOGIC (top-k): the loss -log sigmoid(score) is averaged over the k kept fakes; the others get zero grad
        keep = common.select_topk(scores, k, largest=self.cfg.largest) if k < B else slice(None)
        kept = scores[keep]
        loss_g = F.softplus(-kept).mean()
        grad = torch.zeros_like(scores)
        grad[keep] = torch.sigmoid(-kept).div_(-kept.shape[0])
        grad_fake = self.D.backward(fake, "g", grad.unsqueeze(1), weight_grads=False, input_grad=True)
        self.G.backward(z_g, "g", grad_fake)
        opt_g.step()
        return loss_d, loss_g


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, chunk: int = 10000) -> np.ndarray:
    """G(z) as a float32 numpy array (n, 2), in chunks."""
    return torch.cat([G(z[i: i + chunk]) for i in range(0, z.shape[0], chunk)]).float().cpu().numpy()


def scatter_png(path: Path, samples: np.ndarray, centers: np.ndarray, std: float, title: str, size: int = 560) -> None:
    """Scatter plot of `samples` over the mode centres with Pillow: samples within 4 sigma of their nearest centre
    (high quality) in blue, the others in red; each centre drawn as its 4-sigma circle."""
    from PIL import Image, ImageDraw

    pad = float(np.ptp(centers)) / (math.isqrt(len(centers)) - 1) if len(centers) > 1 else 1.0  # one grid step
    lo, hi = float(centers.min()) - pad, float(centers.max()) + pad
    margin_top = 24
    img = Image.new("RGB", (size, size + margin_top), "white")
    draw = ImageDraw.Draw(img)

    def to_px(xy):
        u = (xy[..., 0] - lo) / (hi - lo) * (size - 1)
        v = (hi - xy[..., 1]) / (hi - lo) * (size - 1) + margin_top
        return u, v

    d2 = ((samples[:, None, :] - centers[None, :, :]) ** 2).sum(-1).min(1)
    good = d2 <= (4.0 * std) ** 2
    u, v = to_px(samples)
    inside = (u >= 0) & (u < size) & (v >= margin_top) & (v < size + margin_top)
    r4 = 4.0 * std / (hi - lo) * (size - 1)
    cu, cv = to_px(centers)
    for x, y in zip(cu, cv):
        draw.ellipse([x - r4, y - r4, x + r4, y + r4], outline=(150, 150, 150))
    for mask, colour in ((~good & inside, (220, 40, 40)), (good & inside, (30, 80, 220))):
        for x, y in zip(u[mask], v[mask]):
            draw.point([(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)], fill=colour)
    draw.text((6, 6), title, fill=(0, 0, 0))
    img.save(path)


def evaluate(G, z_eval, centers_np, std):
    """Samples from the fixed evaluation latents and their `metrics.mode_metrics` (threshold 4 sigma)."""
    samples = generate(G, z_eval)
    result = metrics.mode_metrics(samples, centers_np, std, threshold=4.0)
    return samples, {key: result[key] for key in ("high_quality", "modes_recovered", "reverse_kl")}


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    if args.check_host_sync and device.type != "cuda":
        raise common.UserError("--check-host-sync needs a CUDA device")
    common.check_out_dir(args.out_dir, args.exp_name)
    # sizes whose memory cannot exist are refused here, naming their flags (lower bounds: the largest tensors)
    mbd = args.mbd_kernels * args.mbd_dim if args.minibatch_disc else 0

    def nets():  # built on the meta device by common.parameter_count: no memory
        return [Generator(args.latent_dim, args.hidden_dim, vbn=args.vbn, hidden_layers=args.hidden_layers),
                Discriminator(args.hidden_dim, args.mbd_kernels if args.minibatch_disc else 0, args.mbd_dim,
                              hidden_layers=args.hidden_layers)]

    common.check_fits(device, {
        "G and D (--hidden-dim, --hidden-layers, --latent-dim, --mbd-kernels x --mbd-dim)":
            4 * 4 * common.parameter_count(nets),  # float32 weights, gradients and two Adam moments
        "one training step (--batch-size x --hidden-dim x --hidden-layers, minibatch discrimination: --batch-size^2 "
        "x --mbd-kernels x --mbd-dim)": 4 * 8 * args.batch_size * args.hidden_dim * args.hidden_layers
                                         + 4 * 3 * args.batch_size ** 2 * mbd,
        "the evaluation (--eval-samples x (--latent-dim + --n-modes))":
            args.eval_samples * (4 * (args.latent_dim + 2) + 8 * (2 + args.n_modes)),
        "the loss buffer (--log-every)": 8 * args.log_every,
    })
    resume_state = common.load_checkpoint(args.resume) if args.resume else None  # CPU first; moved by load_state_dict
    if resume_state is not None:
        common.check_resume_config(resume_state["args"], args, allowed=("threads", "log_every", "keep_checkpoints",
                                                                                   "fast_step", "setup"))
        if resume_state.get("step", 0) > args.iterations:
            raise common.UserError(f"--resume: checkpoint is at iteration {resume_state['step']}, beyond --iterations "
                                   f"{args.iterations}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    # seeding
    common.seed_everything(args.seed, args.torch_deterministic)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # every training batch and latent vector
    eval_gen = torch.Generator(device=device).manual_seed(args.seed + 1_000_003)  # fixed evaluation latents

    # data
    centers_np = np.asarray(metrics.grid_centers(args.n_modes, args.grid_spacing), dtype=np.float32)
    centers = torch.from_numpy(centers_np).to(device)
    z_eval = torch.randn(args.eval_samples, args.latent_dim, generator=eval_gen, device=device)

    # models and optimisers
    G = Generator(args.latent_dim, args.hidden_dim, vbn=args.vbn, hidden_layers=args.hidden_layers).to(device)
    D = Discriminator(args.hidden_dim, args.mbd_kernels if args.minibatch_disc else 0, args.mbd_dim,
                      hidden_layers=args.hidden_layers).to(device)
    if args.vbn:
        G.z_ref = torch.randn(args.batch_size, args.latent_dim, generator=eval_gen, device=device)
    fused = device.type in ("cpu", "cuda")
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), fused=fused)
    cfg = StepConfig(args, G, D)
    needs_autograd = args.feature_matching or args.minibatch_disc or args.vbn or args.hist_avg > 0
    fast_step = FastStep(G, D, cfg) if args.fast_step and not needs_autograd else None

    # resume: the checkpoint's structure, shapes, step and finiteness are checked before any of it is applied
    step = 0
    if resume_state is not None:
        common.check_checkpoint(args.resume, resume_state, {"G": G, "D": D},
                                keys=("opt_g", "opt_d", "gen") + (("ha_g", "ha_d") if cfg.ha_g is not None else ()),
                                max_step=args.iterations)
        with common.checkpoint_errors(args.resume):
            G.load_state_dict(resume_state["G"])
            D.load_state_dict(resume_state["D"])
            common.load_optimizer_state(opt_g, resume_state["opt_g"])
            common.load_optimizer_state(opt_d, resume_state["opt_d"])
            if cfg.ha_g is not None:
                cfg.ha_g.load_state_dict(resume_state["ha_g"])
                cfg.ha_d.load_state_dict(resume_state["ha_d"])
            common.set_rng_state(resume_state["rng"])
            gen.set_state(resume_state["gen"].cpu())
        step = int(resume_state["step"])
        run_dir = common.make_run_dir(args, resume_dir=Path(args.resume).resolve().parent.parent)  # locked: one writer
    else:
        run_dir = common.make_run_dir(args)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    logger = common.MetricsLogger(run_dir, track=args.track)
    logger.truncate_after(step)
    print(f"run folder: {run_dir}", flush=True)
    print(f"setup {args.setup} (flags given override it): {args.n_modes} modes, grid spacing {args.grid_spacing:g}, "
          f"{args.hidden_layers} hidden layers of {args.hidden_dim}, Adam betas ({args.beta1:g}, {args.beta2:g})"
          + (f"; top-k epoch {args.iters_per_epoch} iterations, k floor {args.mu}" if args.topk else ""), flush=True)
    print(f"training step: {'FastStep (hand-written backprop)' if fast_step else 'train_step (autograd)'}", flush=True)

    def checkpoint_state(step_, k_):
        state = {"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                 "rng": common.rng_state(), "gen": gen.get_state(), "step": step_, "epoch": step_ // args.iters_per_epoch,
                 "k": k_, "args": vars(args)}
        if cfg.ha_g is not None:
            state["ha_g"], state["ha_d"] = cfg.ha_g.state_dict(), cfg.ha_d.state_dict()
        return state

    def k_at(step_):  # k of the iteration that follows `step_` completed iterations
        return common.topk_k(args.batch_size, step_ // args.iters_per_epoch, args.mu, args.gamma) if args.topk \
            else args.batch_size

    def run_eval(step_):
        samples, result = evaluate(G, z_eval, centers_np, args.std)
        scatter_png(run_dir / "samples" / f"step_{step_:07d}.png", samples, centers_np, args.std,
                    f"step {step_}  HQ {100 * result['high_quality']:.1f}%  modes {100 * result['modes_recovered']:.1f}%  "
                    f"rKL {result['reverse_kl']:.3f}")
        logger.log({"step": step_, "epoch": step_ // args.iters_per_epoch, "k": k_at(max(step_ - 1, 0)),
                    **{f"eval/{key}": value for key, value in result.items()}})
        print(f"eval @ {step_}: " + "  ".join(f"{key}={value:.4g}" for key, value in result.items()), flush=True)
        return samples, result

    # training loop
    end = min(args.iterations, args.max_steps) if args.max_steps is not None else args.iterations
    B = args.batch_size
    loss_buf = torch.zeros(args.log_every, 2, device=device)
    buf_start, filled = step, 0
    progress = common.Progress(end, start=step)
    t_start, t_flush = time.perf_counter(), time.perf_counter()
    last_saved = step if resume_state is not None else None
    if step == 0 and step < end:
        run_eval(0)

    def flush(step_):
        """Read the buffered losses: stop on NaN/inf (naming the step), log their mean and the speed."""
        nonlocal buf_start, filled, t_flush
        if filled == 0:
            return
        losses = loss_buf[:filled].cpu()
        bad = ~torch.isfinite(losses).all(1)
        if bool(bad.any()):
            at = buf_start + int(bad.nonzero()[0, 0]) + 1
            kept = f"last good checkpoint: {ckpt_path} (iteration {last_saved})" \
                if last_saved is not None else "no checkpoint was written yet"
            raise common.UserError(f"non-finite loss at iteration {at} (D {losses[at - buf_start - 1, 0].item():.4g}, "
                                   f"G {losses[at - buf_start - 1, 1].item():.4g}); stopped, {kept}")
        now = time.perf_counter()
        rate = filled / max(now - t_flush, 1e-9)
        mean = losses.mean(0)
        record = {"step": step_, "epoch": step_ // args.iters_per_epoch, "k": k_at(step_ - 1),
                  "loss_d": float(mean[0]), "loss_g": float(mean[1]), "it_per_s": rate}
        logger.log(record)
        if progress.due(step_):
            progress.report(step_, k=record["k"], loss_d=record["loss_d"], loss_g=record["loss_g"])
        buf_start, filled, t_flush = step_, 0, now

    G.train(), D.train()
    sync_check_from = step + 2 if args.check_host_sync else None  # first steps: allocation, lazy CUDA init
    stop = common.StopRequest()  # Ctrl-C: finish the step, save a checkpoint, print how to resume
    while step < end:
        k = k_at(step)
        if sync_check_from is not None:
            common.check_host_sync(step >= sync_check_from)
        real_d = sample_real(centers, args.std, B, gen)
        z_d = torch.randn(B, args.latent_dim, generator=gen, device=device)
        z_g = torch.randn(B, args.latent_dim, generator=gen, device=device)
        real_g = sample_real(centers, args.std, B, gen) if args.feature_matching else None
        if fast_step is not None:
            loss_d, loss_g = fast_step(opt_g, opt_d, real_d, z_d, z_g, k)
        else:
            loss_d, loss_g = train_step(G, D, opt_g, opt_d, cfg, real_d, z_d, z_g, real_g, k)
        loss_buf[filled, 0] = loss_d
        loss_buf[filled, 1] = loss_g
        filled += 1
        step += 1
        if sync_check_from is not None:
            common.check_host_sync(False)  # logging, evaluation and checkpoints read from the device
        save_now = step % args.save_every == 0 or step == end
        if step % args.log_every == 0 or save_now or step % args.eval_every == 0:
            flush(step)
        if step % args.eval_every == 0 and step < end:
            run_eval(step)
        if save_now:  # (save_checkpoint refuses non-finite weights: a saved checkpoint is always a good one)
            state = checkpoint_state(step, k_at(step))
            common.save_checkpoint(ckpt_path, state)
            if args.keep_checkpoints:
                common.save_checkpoint(run_dir / "checkpoints" / f"step_{step:07d}.pt", state)
            last_saved = step
        if stop:  # Ctrl-C: stop at this step boundary with a checkpoint, so --resume continues exactly
            flush(step)
            if last_saved != step:
                common.save_checkpoint(ckpt_path, checkpoint_state(step, k_at(step)))
            raise common.interrupted(__file__, argv, step, ckpt_path)
    stop.restore()
    wall = time.perf_counter() - t_start

    # final evaluation and summary
    samples, result = run_eval(step)
    np.savez(run_dir / "samples.npz", samples=samples, centers=centers_np, std=np.float32(args.std))
    variant = ("bottomk" if args.bottomk else "topk") if args.topk else "gan"
    first_step = int(resume_state["step"]) if resume_state else 0  # wall_time_s and it_per_s: this process's part
    summary = {**result, "step": step, "n_modes": args.n_modes, "variant": variant, "k_final": k_at(max(step - 1, 0)),
               "seed": args.seed, "resumed_from_step": first_step, "wall_time_s": wall,
               "it_per_s": (step - first_step) / max(wall, 1e-9),
               "device": str(device), "threads": torch.get_num_threads(), "fast_step": fast_step is not None, "eval_samples": args.eval_samples,
               "threshold_sigma": 4.0}
    common.write_json(run_dir / "summary.json", summary)
    logger.close()
    common.unlock_run_dir(run_dir)
    print(f"done: {run_dir}  HQ {100 * result['high_quality']:.2f}%  modes {100 * result['modes_recovered']:.2f}%  "
          f"reverse KL {result['reverse_kl']:.4f}  ({wall:.0f} s)", flush=True)
    return run_dir


if __name__ == "__main__":
    common.run_cli(main)
