"""DCGAN vs DCGAN + top-k training on CIFAR-10, with FID/IS over training.

Papers
    Sinha, Zhao, Goyal, Raffel, Odena, "Top-k Training of GANs: Improving GAN Performance by Throwing Away Bad
    Samples", NeurIPS 2020 (arXiv:2002.06224). Radford, Metz, Chintala, "Unsupervised Representation Learning with
    Deep Convolutional GANs" (DCGAN), ICLR 2016. Salimans et al., "Improved Techniques for Training GANs", NeurIPS
    2016 (the optional tricks below).

The seed experiment (batch 128, Adam lr G 1e-4 / D 4e-4, top-k from k = 128 decaying by 0.99 per epoch to the floor
mu = 64, 500 epochs, FID every 10 epochs on 10k samples, 50k samples at the end):

    python dcgan_cifar_topk.py                                 # DCGAN baseline
    python dcgan_cifar_topk.py --topk --mu 64 --gamma 0.99     # DCGAN + top-k
    # fast on a recent GPU (bf16, compiled; cuDNN autotuning and TF32 are on by default):
    python dcgan_cifar_topk.py --topk --amp bf16 --compile

Model: the standard 32x32 DCGAN (pytorch/examples `dcgan`, Radford et al.)
    G: z (100) -> ConvT 4x4 -> 512x4x4 -> ConvT k4 s2 p1 -> 256x8x8 -> 128x16x16 -> 3x32x32 tanh,
       BatchNorm + ReLU after every layer but the last.
    D: Conv k4 s2 p1 3->128 (16x16, no BN) LReLU(0.2) -> 256 (8x8) BN LReLU -> 512 (4x4) BN LReLU
       -> flatten (8192 "last hidden features") -> [minibatch discrimination] -> Linear -> one logit.
    Init N(0, 0.02) for conv/linear weights, N(1, 0.02) for (virtual) batch-norm scales, zero biases.
    Biases only where no normalisation follows (G's output layer, D's first conv, D's output layer).
    Adam betas (0.5, 0.999). D loss: BCE-with-logits, real target 1 (1 - s with --label-smoothing s), fake 0, the
    real and fake halves in two separate D forwards (so D's BN sees pure batches, as in pytorch/examples).
    G loss: non-saturating, BCE-with-logits(D(G(z)), 1) = softplus(-logit).

One training step (one D update, then one G update; a "step" in the logs is one G update):
    1. z ~ N(0, I); fake = G(z); D update on (real batch, fake.detach()). Top-k never changes this update.
    2. G update on the *same* fake batch (as pytorch/examples; saves a G forward), scored by the updated D.
       Top-k: D sees the whole fake batch (BatchNorm in training mode, so its batch statistics come from all B
       fakes: the paper's Algorithm 1 scores the whole batch before selecting, and the authors published no code
       to say otherwise), every fake is scored by D's raw logit, the k
       highest-scored are kept (the k lowest with --bottomk) and the generator loss (non-saturating, or feature
       matching) is averaged over those k only. k = max(mu, floor(B * gamma**epoch)) for the 0-based epoch, so
       k = B in epoch 0 (common.topk_k); the top-k paper's DCGAN/CIFAR runs used gamma 0.99, mu = B/2.
       D's parameters are frozen (requires_grad False) during the G step, so no weight gradients are computed
       for D there.

Improved-GAN tricks (each a flag, each combines with --topk):
    --feature-matching   G loss = || mean_real f(x) - mean_topk f(G(z)) ||^2 (squared L2, the paper's eq.; the
                         official openai/improved-gan code uses the mean absolute difference) on f = D's last
                         hidden features (the 8192 flattened conv features). The real features come from a
                         no-grad forward of the *updated* D on the step's real batch; the fake mean is over the
                         k kept fakes.
    --minibatch-disc     common.MinibatchDiscrimination (T ~ N(0, 0.05^2), --mbd-kernels x --mbd-dim) on D's
                         flattened features, before the output Linear. Like BN, it sees the whole fake batch in
                         the top-k G step.
    --vbn                G's BatchNorms become common.VirtualBatchNorm with a fixed reference noise batch (B
                         vectors drawn from seed + 1, stored in checkpoints); vbn_reference_pass before every G
                         forward (training and sampling).
    --hist-avg W         W * ||theta - running mean of past theta||^2 added to both G's and D's loss.
    --label-smoothing S  one-sided: D's real target 1 - S, fake target 0.

Data: the CIFAR-10 training set (50,000 images, the official python pickles, downloaded into --data-dir when
absent; offline -> an error saying where to put them) lives on the device as uint8. Every epoch a permutation (and,
with --hflip, a flip mask) is drawn from a torch.Generator seeded with (seed, epoch), so a resumed run sees the same
batches; a batch is gathered, flipped and normalised to [-1, 1] (x/127.5 - 1, = ToTensor + Normalize(0.5, 0.5)) on
the device. The last incomplete batch of each epoch is dropped (390 steps of 128 per CIFAR-10 epoch).
--dataset fake: --fake-size random uint8 images (smoke runs, benchmarks).

Evaluation (every --eval-every epochs, and once at the end):
    - a PNG grid of G on fixed noise (samples/epoch_NNNN.png, samples/final.png);
    - FID and IS (metrics.py, pytorch-fid's Inception) on --fid-samples fresh samples (--fid-samples-final at the
      end) against the Inception statistics of the full CIFAR-10 training set, cached as
      <data-dir>/fid_stats_cifar10_train.npz (a file per --fid-weights file: the name carries its hash).
      With --dataset fake the reference is the fake training set itself (not cached): the path runs end to end,
      the numbers mean nothing.
    - Samples come from G in eval mode (BatchNorm running statistics, the default --sample-bn running, which every
      FID/IS number in README.md uses), so a sample does not depend on its batch-mates and sampling never changes
      the training state; the sampling noise has its own generator. --sample-bn batch samples with the statistics
      of each sampling batch instead (--grid-size images per grid, --fid-batch-size per FID/IS batch; StudioGAN
      offers both), still without touching the running averages.
    - best.pt = the periodic evaluation with the lowest FID (all periodic FIDs use --fid-samples, so they are
      comparable; the final FID uses more samples and is of the last G). fid_curve.png at the end (Pillow).
Checkpoints: checkpoints/last.pt every --save-every epochs, whenever best.pt is written, and at the end. It holds G,
D, both Adam states, the fp16 GradScalers, the historical averages, all RNG states, the step (and the k of its
epoch), the fixed grid noise, VBN's reference batch, the best FID and the FID history. --resume continues in the
same run folder (metrics.jsonl is cut back to the checkpoint's step, and the "final" evaluation of a --max-steps
stop is dropped: one run, one final record) and, on the CPU, reproduces an uninterrupted run exactly, its logged
lines included, also from a --max-steps or Ctrl-C stop inside an epoch (the cut log window is carried in the
checkpoint, not logged; tested). --ngf/--ndf shrink the model (tests use 8).
Performance: no host synchronisation inside a step: losses stay on the device and are read every --log-every
steps (and at epoch ends), where non-finite losses are also detected and named by step. images/s (real images
trained on per second, evaluation excluded) is in the progress line and in metrics.jsonl. --amp bf16, --compile
(G and D compiled separately; the top-k selection stays eager so k changing per epoch never recompiles) and
--channels-last are the fast path on GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (those flags say in their help what they default to)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    # common.ArgumentParser: argparse's own errors are one `error:` line too (the usage is for --help)
    p = common.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--exp-name", type=str, default=os.path.basename(__file__)[: -len(".py")],
                   help="run name prefix: the run folder is <out-dir>/<exp-name>__<seed>__<unix time>")
    g.add_argument("--seed", type=int, default=1, help="seed of python, numpy and torch")
    g.add_argument("--torch-deterministic", action=argparse.BooleanOptionalAction, default=False,
               help="CUDA only. Off (default, fastest): cuDNN autotuning and TF32 tensor cores for float32 "
               "products. On: deterministic cuDNN, no autotuning, full float32 (a GPU run repeats bit for bit). "
               "CPU runs are bit-reproducible either way")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out-dir", type=str, default="runs", help="folder that receives the run folder")
    g.add_argument("--track", action=argparse.BooleanOptionalAction, default=False,
                   help="also log scalars to TensorBoard (needs the tensorboard package)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="cifar10", help="cifar10, or fake (random images, smoke runs)")
    g.add_argument("--data-dir", type=str, default="data",
                   help="folder holding cifar-10-batches-py/ (or cifar-10-python.tar.gz) and the FID statistics")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR-10 into --data-dir when it is absent")
    g.add_argument("--fake-size", type=int, default=None,
                   help="number of random images of --dataset fake (default 2048)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=False,
                   help="random horizontal flips of the real images (not in the seed configuration)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=500, help="passes over the training set")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many generator steps in total (smoke runs, benchmarks; default: "
                   "--epochs decides)")
    g.add_argument("--batch-size", type=int, default=128, help="real and fake images per step")
    g.add_argument("--nz", type=int, default=100, help="dimension of the generator's noise z")
    g.add_argument("--ngf", type=int, default=128, help="G width: channels 4*ngf, 2*ngf, ngf (DCGAN: 128)")
    g.add_argument("--ndf", type=int, default=128, help="D width: channels ndf, 2*ndf, 4*ndf (DCGAN: 128)")
    g.add_argument("--lr-g", type=common.finite_float, default=1e-4, help="Adam learning rate of G")
    g.add_argument("--lr-d", type=common.finite_float, default=4e-4, help="Adam learning rate of D")
    g.add_argument("--beta1", type=common.finite_float, default=0.5, help="Adam beta1 (DCGAN)")
    g.add_argument("--beta2", type=common.finite_float, default=0.999, help="Adam beta2")
    g = p.add_argument_group("top-k (Sinha et al. 2020)")
    g.add_argument("--topk", action=argparse.BooleanOptionalAction, default=False,
                   help="generator learns only from the k fakes D scores highest")
    g.add_argument("--mu", type=int, default=None, help="floor of k, in samples (default: half the batch)")
    g.add_argument("--gamma", type=common.finite_float, default=None,
                   help="k decay per epoch: k = max(mu, floor(B*gamma^epoch)) "
                   "(default 0.99)")
    g.add_argument("--bottomk", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the k lowest-scored fakes instead (analysis only; needs --topk)")
    g = p.add_argument_group("Improved-GAN tricks (Salimans et al. 2016)")
    g.add_argument("--feature-matching", action=argparse.BooleanOptionalAction, default=False,
                   help="G loss = squared L2 distance between mean D features of real and (top-k) fake images")
    g.add_argument("--minibatch-disc", action=argparse.BooleanOptionalAction, default=False,
                   help="minibatch discrimination layer before D's output")
    g.add_argument("--mbd-kernels", type=int, default=None, help="minibatch-discrimination kernels (default 100)")
    g.add_argument("--mbd-dim", type=int, default=None, help="minibatch-discrimination kernel dimension (default 5)")
    g.add_argument("--hist-avg", type=common.finite_float, default=0.0,
                   help="historical-averaging weight on G and D (0 = off)")
    g.add_argument("--label-smoothing", type=common.finite_float, default=0.0,
                   help="one-sided label smoothing: D's real target is 1 - this (0 = off)")
    g.add_argument("--vbn", action=argparse.BooleanOptionalAction, default=False,
                   help="virtual batch normalisation in G instead of BatchNorm")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=10,
                   help="epochs between evaluations (sample grid, FID, IS); 0 = only at the end")
    g.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                   help="compute FID and IS (--no-fid: sample grids only)")
    g.add_argument("--fid-samples", type=int, default=10000, help="generated samples per periodic FID/IS")
    g.add_argument("--fid-samples-final", type=int, default=50000, help="generated samples of the final FID/IS")
    g.add_argument("--fid-weights", type=str, default=None,
                   help="pytorch-fid Inception state-dict file (offline use; default: the torch hub copy, downloaded "
                   "when missing)")
    g.add_argument("--fid-batch-size", type=int, default=250, help="batch size of sampling and Inception passes")
    g.add_argument("--grid-size", type=int, default=64, help="images in each fixed-noise sample grid")
    g.add_argument("--sample-bn", choices=["running", "batch"], default="running",
                   help="BatchNorm statistics of G when sampling (grids, FID/IS): running = the running averages "
                   "(eval mode; every FID/IS number in README.md uses it), batch = the statistics of each sampling "
                   "batch (--grid-size images, --fid-batch-size for FID/IS), running averages left unchanged")
    g = p.add_argument_group("performance")
    g.add_argument("--amp", type=str, default="off", help="autocast: off, bf16 or fp16 (fp16: CUDA only)")
    g.add_argument("--check-host-sync", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA only, for tests: raise on any host synchronisation inside a training step (the first "
                        "two steps of a process and the logging/evaluation/checkpoint code are exempt)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile G and D")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format for models and images")
    g.add_argument("--log-every", type=int, default=50,
                   help="generator steps between reads of the losses (each read synchronises the device)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=10,
                   help="epochs between checkpoints/last.pt writes (always written at the end; 0 = only then)")
    g.add_argument("--resume", type=str, default=None,
                   help="checkpoints/last.pt of a run to continue in its run folder (pass the same flags; "
                   "--epochs/--max-steps may grow)")
    args = p.parse_args(argv)
    return args


def validate_args(args) -> None:
    """Raise common.UserError (one line) for any impossible value or combination; resolve defaults."""
    E = common.UserError
    common.check_seed("--seed", args.seed)
    if args.dataset not in ("cifar10", "fake"):
        raise E(f"--dataset must be cifar10 or fake, got {args.dataset!r}")
    if args.vbn and args.sample_bn == "batch":
        raise E("--sample-bn batch applies to G's BatchNorm; with --vbn G samples with its reference batch")
    if args.epochs < 1:
        raise E(f"--epochs must be at least 1, got {args.epochs}")
    if args.max_steps is not None and args.max_steps < 1:
        raise E(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.batch_size < 2:
        raise E(f"--batch-size must be at least 2 (BatchNorm), got {args.batch_size}")
    for name in ("nz", "ngf", "ndf"):
        if getattr(args, name) < 1:
            raise E(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr_g", "lr_d"):
        if not getattr(args, name) > 0:
            raise E(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise E(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.topk:
        args.mu = args.batch_size // 2 if args.mu is None else args.mu
        args.gamma = 0.99 if args.gamma is None else args.gamma
        common.validate_topk(args.batch_size, args.mu, args.gamma)
    else:
        for flag, value in (("--mu", args.mu), ("--gamma", args.gamma), ("--bottomk", args.bottomk or None)):
            if value is not None:
                raise E(f"{flag} only applies with --topk")
    if args.minibatch_disc:
        args.mbd_kernels = 100 if args.mbd_kernels is None else args.mbd_kernels
        args.mbd_dim = 5 if args.mbd_dim is None else args.mbd_dim
        if args.mbd_kernels < 1 or args.mbd_dim < 1:
            raise E("--mbd-kernels and --mbd-dim must be at least 1")
    elif args.mbd_kernels is not None or args.mbd_dim is not None:
        raise E("--mbd-kernels/--mbd-dim only apply with --minibatch-disc")
    if not args.hist_avg >= 0:
        raise E(f"--hist-avg must be >= 0, got {args.hist_avg}")
    if not 0 <= args.label_smoothing < 1:
        raise E(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.eval_every < 0:
        raise E(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.fid:
        if args.fid_samples < 10 or args.fid_samples_final < 10:
            raise E("--fid-samples and --fid-samples-final must be at least 10 (IS uses 10 splits)")
        if args.fid_batch_size < 1:
            raise E(f"--fid-batch-size must be at least 1, got {args.fid_batch_size}")
        if args.fid_weights is not None and not Path(args.fid_weights).is_file():
            raise E(f"--fid-weights: file not found: {args.fid_weights}")
    elif args.fid_weights is not None:
        raise E("--fid-weights only applies when FID is on (drop --no-fid)")
    if args.grid_size < 1:
        raise E(f"--grid-size must be at least 1, got {args.grid_size}")
    if args.amp not in ("off", "bf16", "fp16"):
        raise E(f"--amp must be off, bf16 or fp16, got {args.amp!r}")
    if args.log_every < 1:
        raise E(f"--log-every must be at least 1, got {args.log_every}")
    if args.save_every < 0:
        raise E(f"--save-every must be >= 0, got {args.save_every}")
    if args.dataset == "fake":
        args.fake_size = 2048 if args.fake_size is None else args.fake_size
        if args.fake_size < args.batch_size:
            raise E(f"--fake-size {args.fake_size} is smaller than --batch-size {args.batch_size}")
    elif args.fake_size is not None:
        raise E("--fake-size only applies with --dataset fake")


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """z (B, nz) -> images (B, 3, 32, 32) in [-1, 1]. BatchNorm (or VirtualBatchNorm with vbn=True) + ReLU.

    ngf=128 is the standard 32x32 DCGAN (512, 256, 128 channels); smaller widths are for tests.
    """

    def __init__(self, nz: int = 100, vbn: bool = False, ngf: int = 128):
        super().__init__()
        norm = common.VirtualBatchNorm if vbn else nn.BatchNorm2d
        c1, c2, c3 = 4 * ngf, 2 * ngf, ngf
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, c1, 4, 1, 0, bias=False), norm(c1), nn.ReLU(True),  # 4x4
            nn.ConvTranspose2d(c1, c2, 4, 2, 1, bias=False), norm(c2), nn.ReLU(True),  # 8x8
            nn.ConvTranspose2d(c2, c3, 4, 2, 1, bias=False), norm(c3), nn.ReLU(True),  # 16x16
            nn.ConvTranspose2d(c3, 3, 4, 2, 1), nn.Tanh(),  # 32x32
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """images (B, 3, 32, 32) -> (logits (B,), last hidden features (B, 4*ndf*4*4) = (B, 8192) for ndf=128).

    The features are the flattened 4*ndf x 4 x 4 conv output: what feature matching compares and what minibatch
    discrimination (when on) reads before the output Linear. ndf=128 is the standard 32x32 DCGAN.
    """

    def __init__(self, minibatch_disc: bool = False, mbd_kernels: int = 100, mbd_dim: int = 5, ndf: int = 128):
        super().__init__()
        c1, c2, c3 = ndf, 2 * ndf, 4 * ndf
        self.feature_dim = c3 * 4 * 4
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 4, 2, 1), nn.LeakyReLU(0.2, True),  # 16x16
            nn.Conv2d(c1, c2, 4, 2, 1, bias=False), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2, True),  # 8x8
            nn.Conv2d(c2, c3, 4, 2, 1, bias=False), nn.BatchNorm2d(c3), nn.LeakyReLU(0.2, True),  # 4x4
            nn.Flatten(),
        )
        self.mbd = common.MinibatchDiscrimination(self.feature_dim, mbd_kernels, mbd_dim) if minibatch_disc else None
        self.out = nn.Linear(self.feature_dim + (mbd_kernels if minibatch_disc else 0), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        logits = self.out(self.mbd(h) if self.mbd is not None else h)
        return logits.squeeze(1), h


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv/linear weights N(0, 0.02), (virtual) batch-norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, common.VirtualBatchNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Within the block, `model`'s BatchNorm layers normalise with the statistics of the batch they see (training
    mode) and leave their running averages and counters unchanged (--sample-bn batch): sampling never changes the
    training state."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in layers]
    for m in layers:  # training mode without tracking: batch statistics, running buffers neither used nor updated
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, (training, track) in zip(layers, saved):
            m.train(training)
            m.track_running_stats = track


def generator_loss(d_fake: torch.Tensor, k: int, bottomk: bool = False, feat_fake: torch.Tensor | None = None,
                   feat_real: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k generator loss over the whole fake batch's D outputs.

    d_fake: (B,) raw D logits of all fakes. Keeps the k highest (lowest with bottomk) and returns the
    non-saturating loss mean(softplus(-logit)) over them, or, when feat_real is given, the squared L2 distance
    between the batch mean of feat_real (B_real, F) and the mean of the kept rows of feat_fake (B, F).
    k >= B uses every fake (plain DCGAN).
    """
    keep = None if k >= d_fake.shape[0] else common.select_topk(d_fake, k, largest=not bottomk)
    if feat_real is not None:
        f = feat_fake if keep is None else feat_fake[keep]
        return (feat_real.float().mean(0) - f.float().mean(0)).pow(2).sum()
    d = d_fake if keep is None else d_fake[keep]
    return F.softplus(-d.float()).mean()


# ----------------------------------------------------------------------------------------------------------------
# Images and plots (Pillow only)
# ----------------------------------------------------------------------------------------------------------------
def save_grid(images: torch.Tensor, path: Path, pad: int = 2) -> None:
    """Save float images (N, 3, H, W) in [-1, 1] as a near-square PNG grid."""
    from PIL import Image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()
    n, h, w, c = x.shape
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    Image.fromarray(canvas).save(path)


def save_curve(points: list[tuple[float, float]], path: Path, title: str, xlabel: str = "epoch") -> None:
    """Line plot of (x, y) points as a PNG, drawn with Pillow (no matplotlib dependency)."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 640, 420, 70, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):  # ticks and labels
        yv = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, yv)
        d.line([left - 4, py, left, py], fill="black")
        d.text((5, py - 6), f"{yv:.4g}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        px, _ = to_px(xv, y0)
        d.line([px, H - bottom, px, H - bottom + 4], fill="black")
        d.text((px - 12, H - bottom + 8), f"{xv:.4g}", fill="black")
    d.text((W // 2 - 20, H - 20), xlabel, fill="black")
    best = min(points, key=lambda p: p[1])
    d.text((left, 12), f"{title}   (best {best[1]:.4g} at {xlabel} {best[0]:.4g})", fill="black")
    px = [to_px(x, y) for x, y in points]
    if len(px) > 1:
        d.line(px, fill=(31, 119, 180), width=2)
    for x, y in px:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    img.save(path)


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    t_start = time.time()
    device = common.pick_device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise common.UserError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    if args.check_host_sync and device.type != "cuda":
        raise common.UserError("--check-host-sync needs a CUDA device")
    common.check_out_dir(args.out_dir, args.exp_name)
    # sizes whose memory cannot exist are refused here, naming their flags (lower bounds: the largest tensors)
    B, mbd = args.batch_size, (args.mbd_kernels * args.mbd_dim if args.minibatch_disc else 0)

    def nets():  # built on the meta device by common.parameter_count: no memory
        return [Generator(args.nz, vbn=args.vbn, ngf=args.ngf),
                Discriminator(args.minibatch_disc, args.mbd_kernels or 100, args.mbd_dim or 5, ndf=args.ndf)]

    per_image = (3 * (16 * 4 * args.ngf + 64 * 2 * args.ngf + 256 * args.ngf + 1024 * 3)  # G's activations
                 + 3 * 3 * (256 * args.ndf + 64 * 2 * args.ndf + 16 * 4 * args.ndf))  # D's, three forwards
    common.check_fits(device, {
        "G and D (--ngf, --ndf, --nz, --mbd-kernels x --mbd-dim)": 4 * 4 * common.parameter_count(nets),
        "one training step (--batch-size x the widths; minibatch discrimination: --batch-size^2 x --mbd-kernels x "
        "--mbd-dim)": 4 * B * per_image + 4 * 3 * B ** 2 * mbd,
        "the sample grid and the FID batches (--grid-size, --fid-batch-size)":
            4 * args.grid_size * (args.nz + 3 * 1024)
            + (4 * 3 * args.fid_batch_size * 3 * 299 * 299 if args.fid else 0),
        "the fake data set (--fake-size)": 3 * 1024 * (args.fake_size or 0),
    })
    ckpt = None
    if args.resume is not None:
        ckpt = common.load_checkpoint(args.resume)
        common.check_resume_config(ckpt["args"], args, allowed=(
            "resume", "fid", "fid_samples", "fid_samples_final", "fid_batch_size", "grid_size", "log_every",
            "download", "channels_last", "sample_bn"))
    common.seed_everything(args.seed, args.torch_deterministic)

    # ---- data: the whole training set on the device as uint8 ----
    if args.dataset == "cifar10":
        images, _ = common.load_cifar10(args.data_dir, train=True, download=args.download)
    else:
        images, _ = common.fake_images(args.fake_size, (3, 32, 32), seed=args.seed)
    n_train = images.shape[0]
    if n_train < args.batch_size:
        raise common.UserError(f"--batch-size {args.batch_size} exceeds the {n_train} training images")
    B = args.batch_size
    steps_per_epoch = n_train // B  # the last incomplete batch is dropped
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if ckpt is not None and ckpt.get("step", 0) > total_steps:
        raise common.UserError(f"--resume: the checkpoint is at step {ckpt['step']}, past the requested "
                               f"{total_steps} steps (raise --epochs or --max-steps)")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    data = images.to(device)

    # ---- models and optimisers ----
    G = Generator(args.nz, vbn=args.vbn, ngf=args.ngf).to(device)
    D = Discriminator(args.minibatch_disc, args.mbd_kernels or 100, args.mbd_dim or 5, ndf=args.ndf).to(device)
    dcgan_init(G)
    dcgan_init(D)
    G.to(memory_format=memory_format)
    D.to(memory_format=memory_format)
    fused = device.type == "cuda"
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), fused=fused)
    scaler_g = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    scaler_d = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    hist_g = common.HistoricalAverage(G) if args.hist_avg > 0 else None
    hist_d = common.HistoricalAverage(D) if args.hist_avg > 0 else None
    # fixed noise of the sample grids and VBN's reference batch: own generators, independent of the training RNG
    fixed_noise = torch.randn(args.grid_size, args.nz, generator=torch.Generator().manual_seed(args.seed))
    z_ref = torch.randn(B, args.nz, generator=torch.Generator().manual_seed(args.seed + 1))
    G_fwd = torch.compile(G) if args.compile else G
    D_fwd = torch.compile(D) if args.compile else D
    amp_ctx = lambda: common.autocast(device, args.amp)  # noqa: E731

    # ---- evaluation set-up (before the run folder, so offline/missing-weight errors leave nothing behind) ----
    inception = ref_mu = ref_sigma = None
    if args.fid:
        import metrics  # FID/IS only: keeps torchvision's Inception out of --no-fid start-up

        inception = metrics.load_inception(args.fid_weights, device=device)
        if args.dataset == "cifar10":
            tag = "" if args.fid_weights is None else "_" + _file_hash(args.fid_weights)
            cache = Path(args.data_dir) / f"fid_stats_cifar10_train{tag}.npz"
        else:
            cache = None  # fake data: statistics of the fake training set itself, never cached
        ref_mu, ref_sigma = metrics.reference_statistics(images, inception, cache, args.fid_batch_size, device)
    del images

    # ---- resume: structure, shapes, step and finiteness checked before any of the checkpoint is applied ----
    step, train_time, best = 0, 0.0, {"fid": None, "epoch": None, "step": None}
    fid_history: list[list[float]] = []  # [epoch, step, fid] of the periodic evaluations
    pending_saved, pending_time = torch.zeros(0, 4), 0.0  # losses of a log window cut by a stop inside an epoch
    if ckpt is not None:
        optional = [key for obj, key in ((scaler_g, "scaler_g"), (scaler_d, "scaler_d"), (hist_g, "hist_g"),
                                         (hist_d, "hist_d")) if obj is not None]
        common.check_checkpoint(args.resume, ckpt, {"G": G, "D": D}, max_step=total_steps,
                                tensors={"z_ref": (B, args.nz)}, keys=("opt_g", "opt_d", "fixed_noise", "train_time_s", "best", "fid_history",
                                      "pending", "pending_time_s", *optional))
        with common.checkpoint_errors(args.resume):
            G.load_state_dict(ckpt["G"])
            D.load_state_dict(ckpt["D"])
            # keeps fused Adam and gives the moments the parameters' layout (resume with another --channels-last)
            common.load_optimizer_state(opt_g, ckpt["opt_g"])
            common.load_optimizer_state(opt_d, ckpt["opt_d"])
            for obj, key in ((scaler_g, "scaler_g"), (scaler_d, "scaler_d"), (hist_g, "hist_g"), (hist_d, "hist_d")):
                if obj is not None:
                    obj.load_state_dict(ckpt[key])
            fixed_noise, z_ref = ckpt["fixed_noise"], ckpt["z_ref"]
            if fixed_noise.dim() != 2 or fixed_noise.shape[1] != args.nz or ckpt["pending"].shape[1:] != (4,):
                raise ValueError("fixed_noise or pending has the wrong shape")
            step, train_time = int(ckpt["step"]), float(ckpt["train_time_s"])
            best, fid_history = dict(ckpt["best"]), [list(r) for r in ckpt["fid_history"]]
            pending_saved, pending_time = ckpt["pending"], float(ckpt["pending_time_s"])
            common.set_rng_state(ckpt["rng"])
    fixed_noise, z_ref = fixed_noise.to(device), z_ref.to(device)

    # the run folder, locked for this process (a second writer is refused, naming this one)
    run_dir = common.make_run_dir(args, resume_dir=Path(args.resume).parent.parent if args.resume else None)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    logger = common.MetricsLogger(run_dir, track=args.track)
    if ckpt is not None:
        # a "final" evaluation logged by a --max-steps stop is not final any more: one run, one final record
        logger.truncate_after(step, drop=lambda record: record.get("final"))
        print(f"resumed {args.resume} at step {step} (epoch {step / steps_per_epoch:.2f})")
    print(f"run folder {run_dir} | device {device} | {n_train} training images, {steps_per_epoch} steps/epoch, "
          f"{total_steps} steps")

    def k_at(epoch: int) -> int:
        return common.topk_k(B, epoch, args.mu, args.gamma) if args.topk else B

    def k_last(step: int) -> int:
        """k of the epoch that the `step`-th (1-based) generator step belonged to."""
        return k_at(max(0, step - 1) // steps_per_epoch)

    def state(step: int) -> dict:
        """Everything --resume needs, including the losses of a log window cut by a stop inside an epoch
        (pending, with its elapsed time), so that the resumed run logs the lines of an uninterrupted one."""
        s = {"args": vars(args), "G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(),
             "opt_d": opt_d.state_dict(), "rng": common.rng_state(), "step": step, "epoch": step // steps_per_epoch,
             "k": k_last(step), "fixed_noise": fixed_noise.cpu(), "z_ref": z_ref.cpu(),
             "train_time_s": train_time, "best": best, "fid_history": fid_history,
             "pending": torch.stack(pending).float().cpu() if pending else torch.zeros(0, 4),
             "pending_time_s": time.perf_counter() - window["t"] if pending else 0.0}
        for obj, key in ((scaler_g, "scaler_g"), (scaler_d, "scaler_d"), (hist_g, "hist_g"), (hist_d, "hist_d")):
            if obj is not None:
                s[key] = obj.state_dict()
        return s

    @torch.no_grad()
    def generate(z: torch.Tensor) -> torch.Tensor:
        """G in eval mode -> float32 images in [-1, 1]. BatchNorm: running statistics, or with --sample-bn batch
        the statistics of this batch (running averages untouched); VBN: its reference batch.

        Always float32, also under --amp: a bf16 G output moves ~12 % of the uint8 pixels by one level, which
        would make an AMP run's FID incomparable with an fp32 run's."""
        G.eval()
        try:
            if args.vbn:
                common.vbn_reference_pass(G, z_ref)
            with batch_statistics(G) if args.sample_bn == "batch" else contextlib.nullcontext():
                return G(z).float()
        finally:
            G.train()

    def evaluate(n_samples: int, tag: str, epoch: float, k: int, final: bool) -> dict:
        """Sample grid always; FID/IS on n_samples fresh samples when FID is on. Logs and returns the metrics."""
        save_grid(generate(fixed_noise), run_dir / "samples" / f"{tag}.png")
        if not args.fid:
            return {}
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)

        def sample_fn(n):
            return generate(torch.randn(n, args.nz, generator=gen, device=device))

        t0 = time.time()
        res = metrics.evaluate_generator(sample_fn, n_samples, ref_mu, ref_sigma, inception,
                                         batch_size=args.fid_batch_size, device=device)
        record = {"step": step, "epoch": epoch, "k": k, "fid": float(res["fid"]),
                  "is_mean": float(res["is_mean"]), "is_std": float(res["is_std"]), "fid_samples": n_samples,
                  "final": final, "eval_time_s": time.time() - t0}
        logger.log(record)
        print(f"eval {tag}: FID {record['fid']:.3f} | IS {record['is_mean']:.3f} ± {record['is_std']:.3f} "
              f"({n_samples} samples, {record['eval_time_s']:.1f} s)", flush=True)
        return record

    # ---- training ----
    progress = common.Progress(total_steps, start=step, every_s=10.0, unit="steps")
    real_label = torch.full((B,), 1.0 - args.label_smoothing, device=device)
    fake_label = torch.zeros(B, device=device)
    pending: list[torch.Tensor] = list(pending_saved.to(device).unbind(0))  # per-step (loss_d, loss_g, D(real),
    # D(fake)) kept on the device until the next log line; after a resume, those of the window the stop cut
    window = {"t": time.perf_counter() - pending_time}
    session = {"images": 0, "time": 0.0}  # this process's training throughput (summary.json)

    def optimise(opt, loss, scaler):
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    def check_pending() -> torch.Tensor:
        """The pending per-step values (one device sync); a non-finite loss stops the run, naming its step and the
        last good checkpoint (save_checkpoint never writes non-finite weights, so last.pt is one)."""
        vals = torch.stack(pending).float().cpu()
        bad = (~torch.isfinite(vals[:, :2]).all(1)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise common.UserError(
                f"non-finite loss at step {step - len(vals) + i + 1} (loss_d={vals[i, 0]:.4g}, "
                f"loss_g={vals[i, 1]:.4g}); stopped; last good checkpoint: "
                f"{ckpt_path if ckpt_path.exists() else 'none yet'}")
        return vals

    def flush(epoch: int, k: int) -> None:
        """Read the pending losses (one device sync), stop on a non-finite one, log their means."""
        nonlocal train_time
        if not pending:
            return
        vals = check_pending()
        n = len(pending)
        pending.clear()
        elapsed = time.perf_counter() - window["t"]
        train_time += elapsed
        session["images"] += n * B
        session["time"] += elapsed
        ips = n * B / elapsed if elapsed > 0 else float("nan")
        m = vals.mean(0)
        record = {"step": step, "epoch": epoch, "k": k, "loss_d": float(m[0]), "loss_g": float(m[1]),
                  "d_real": float(m[2]), "d_fake": float(m[3]), "images_per_s": ips}
        logger.log(record)
        if progress.due(step):
            progress.report(step, epoch=epoch, k=k, loss_d=record["loss_d"], loss_g=record["loss_g"],
                            images_per_s=round(ips, 1))
        window["t"] = time.perf_counter()

    sync_check_from = step + 2 if args.check_host_sync else None  # first steps: compilation, lazy CUDA init
    stop = common.StopRequest()  # Ctrl-C: finish the step, save a checkpoint, print how to resume
    while step < total_steps:
        epoch = step // steps_per_epoch
        # ALGO LOGIC: top-k: k = max(mu, floor(B * gamma**epoch)) from the epoch counter (k = B without --topk)
        k = k_at(epoch)
        order_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)  # same batches after a resume
        perm = torch.randperm(n_train, generator=order_gen).to(device)
        flips = (torch.rand(n_train, generator=order_gen) < 0.5).to(device) if args.hflip else None
        G.train()
        D.train()
        for i in range(step % steps_per_epoch, steps_per_epoch):
            if step >= total_steps:
                break
            if sync_check_from is not None:
                common.check_host_sync(step >= sync_check_from)
            idx = perm[i * B:(i + 1) * B]
            x_real = data[idx]
            if flips is not None:
                x_real = torch.where(flips[idx].view(-1, 1, 1, 1), x_real.flip(3), x_real)
            x_real = x_real.float().mul_(2.0 / 255.0).sub_(1.0).contiguous(memory_format=memory_format)
            z = torch.randn(B, args.nz, device=device)

            # D step (never changed by top-k)
            with amp_ctx():
                if args.vbn:
                    # ALGO LOGIC: virtual batch norm: reference statistics from the fixed batch z_ref, with gradient
                    common.vbn_reference_pass(G_fwd, z_ref)
                fake = G_fwd(z)
                d_real, _ = D_fwd(x_real)
                d_fake, _ = D_fwd(fake.detach())
                # ALGO LOGIC: one-sided label smoothing (real target 1 - s, fake target 0)
                loss_d = (F.binary_cross_entropy_with_logits(d_real.float(), real_label)
                          + F.binary_cross_entropy_with_logits(d_fake.float(), fake_label))
                if hist_d is not None:
                    # ALGO LOGIC: historical averaging
                    loss_d = loss_d + args.hist_avg * hist_d.penalty(D)
            optimise(opt_d, loss_d, scaler_d)
            if hist_d is not None:
                hist_d.update(D)

            # G step on the same fakes, scored by the updated D (whose weights get no gradient here)
            D.requires_grad_(False)
            with amp_ctx():
                # ALGO LOGIC: top-k: D sees all B fakes (BN batch statistics of the full batch), the loss is taken
                # over the k best-scored only
                d_gen, feat_gen = D_fwd(fake)
                if args.feature_matching:
                    # ALGO LOGIC: feature matching against the updated D's features of the real batch
                    with torch.no_grad():
                        _, feat_real = D_fwd(x_real)
                    loss_g = generator_loss(d_gen, k, args.bottomk, feat_gen, feat_real)
                else:
                    loss_g = generator_loss(d_gen, k, args.bottomk)
                if hist_g is not None:
                    loss_g = loss_g + args.hist_avg * hist_g.penalty(G)
            optimise(opt_g, loss_g, scaler_g)
            D.requires_grad_(True)
            if hist_g is not None:
                hist_g.update(G)

            pending.append(torch.stack([loss_d.detach().float(), loss_g.detach().float(),
                                        d_real.detach().float().mean(), d_fake.detach().float().mean()]))
            step += 1
            if sync_check_from is not None:
                common.check_host_sync(False)  # logging, evaluation and checkpoints read from the device
            if step % args.log_every == 0:
                flush(epoch, k)
            if stop:
                break

        epochs_completed = step // steps_per_epoch
        if step % steps_per_epoch != 0:
            # a stop inside the epoch (--max-steps, Ctrl-C): the cut log window is checked, not logged; it goes
            # into the checkpoint, and a --resume logs the same lines as an uninterrupted run
            if pending:
                check_pending()
        else:  # a completed epoch
            flush(epoch, k)
            save = bool(args.save_every) and epochs_completed % args.save_every == 0
            if args.eval_every and epochs_completed % args.eval_every == 0:
                record = evaluate(args.fid_samples, f"epoch_{epochs_completed:04d}", epochs_completed, k, False)
                if record:
                    fid_history.append([epochs_completed, step, record["fid"]])
                    if best["fid"] is None or record["fid"] < best["fid"]:
                        best = {"fid": record["fid"], "is_mean": record["is_mean"], "epoch": epochs_completed,
                                "step": step}
                        common.save_checkpoint(run_dir / "checkpoints" / "best.pt", state(step))
                        save = True  # keep last.pt at least as recent as best.pt
            if save:  # (save_checkpoint refuses non-finite weights: a saved checkpoint is always a good one)
                common.save_checkpoint(ckpt_path, state(step))
            window["t"] = time.perf_counter()  # evaluation and checkpoint time are not training time
        if stop:  # Ctrl-C: a checkpoint at this step boundary, then one line saying how to continue
            common.save_checkpoint(ckpt_path, state(step))
            raise common.interrupted(__file__, argv, step, ckpt_path)
    stop.restore()

    # ---- end of training: checkpoint, final evaluation, summary ----
    # a --max-steps stop inside an epoch: the cut window's time is training time (the checkpoint carries it on)
    cut_time = time.perf_counter() - window["t"] if pending else 0.0
    common.save_checkpoint(ckpt_path, state(step))
    final = evaluate(args.fid_samples_final, "final", step / steps_per_epoch, k_last(step), True)
    if fid_history:
        save_curve([(r[0], r[2]) for r in fid_history], run_dir / "fid_curve.png", "FID (periodic evaluations)")
    summary = {
        "steps": step, "epochs": step / steps_per_epoch, "k_final": k_last(step),
        "final": {key: final[key] for key in ("fid", "is_mean", "is_std", "fid_samples")} if final else None,
        "best": best if best["fid"] is not None else None,
        "train_time_s": train_time + cut_time, "wall_time_s": time.time() - t_start,
        "images_per_s": session["images"] / session["time"] if session["time"] > 0 else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "run_dir": str(run_dir),
    }
    common.write_json(run_dir / "summary.json", summary)
    logger.close()
    common.unlock_run_dir(run_dir)
    print(f"done: {step} steps in {common._fmt_seconds(train_time + cut_time)} of training"
          + (f" | final FID {final['fid']:.3f}, IS {final['is_mean']:.3f}" if final else "")
          + f" | {run_dir}")


if __name__ == "__main__":
    common.run_cli(main)
