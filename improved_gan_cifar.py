"""Semi-supervised CIFAR-10 and the minibatch-discrimination sample-quality model of Improved GANs, with top-k.

Paper: Salimans, Goodfellow, Zaremba, Cheung, Radford, Chen, "Improved Techniques for Training GANs", NeurIPS 2016
(arXiv:1606.03498), sec. 5 / table 3 (CIFAR-10 test error with 1000 / 2000 / 4000 / 8000 labels) and sec. 4 / table 2
(Inception Score of the minibatch-discrimination model). Top-k generator updates: Sinha, Zhao, Goyal, Raffel, Odena,
"Top-k Training of GANs: Improving GAN Performance by Throwing Away Bad Samples", NeurIPS 2020 (arXiv:2002.06224).

The discriminator is a (K+1)-class classifier: 10 logits l(x) for the real classes and an implicit fake logit fixed
at 0, so D(x) = Z/(Z+1) with Z = sum_j exp(l_j(x)) and the logit of "x is real" is logsumexp(l(x)).

    python improved_gan_cifar.py --model feature-matching --num-labels 4000            # table 3 (semi-supervised)
    python improved_gan_cifar.py --model minibatch-disc                                  # table 2 (sample quality)
    python improved_gan_cifar.py --model feature-matching --num-labels 4000 --topk       # with top-k
    python improved_gan_cifar.py --supervised-only --num-labels 4000                     # classifier baseline

Models (`--model` sets the defaults; every trick is still its own flag):
    feature-matching   dropout 0.2 on D's input; G minimises the L1 distance between the batch means of D's
                       global-pool features on real and fake data; 1 G step per D step; no FID/IS by default.
    minibatch-disc     Gaussian noise (std 0.2) on D's input instead of dropout; minibatch discrimination
                       (100 kernels of dimension 5) after D's global pool; minimax G loss; 3 G steps per D step;
                       IS and FID of G's samples computed by default.

Details follow openai/improved-gan (mnist_svhn_cifar10/train_cifar_feature_matching.py,
train_cifar_minibatch_discrimination.py and nn.py), where the paper leaves them open:
  * D: dropout 0.2 (or noise 0.2) on the input; 3 x conv 96 3x3 pad 1 (the third stride 2); dropout 0.5;
    3 x conv 192 3x3 pad 1 (the third stride 2); dropout 0.5; conv 192 3x3 valid; NIN 192; NIN 192; global mean
    pool; [minibatch discrimination]; dense 10. Weight norm and LeakyReLU(0.2) on every hidden layer.
    As in the official code (`train_g=False`) the weight-norm scales g of the hidden layers are set by the
    data-dependent initialisation and then frozen; only the output layer's g is trained (`train_g=True`,
    initial output std 0.1).
  * G: z ~ U[0,1)^100 -> dense 4*4*512 -> BN -> ReLU -> deconv 5x5 stride 2 to 256 (8x8) -> BN -> ReLU -> deconv to
    128 (16x16) -> BN -> ReLU -> weight-normalised deconv to 3 (32x32, trained g, initial std 0.1) -> tanh.
    The official `nn.batch_norm(..., g=None)` has a learned shift and no scale, and always normalises with the
    statistics of the current batch (its running averages are never used): so does BatchNormShift below, also when
    sampling. The dense layer's BN is per unit (8192 units), as in the official code. Dense and deconv weights
    ~ N(0, 0.05^2); the layers followed by BN have no bias.
  * Data-dependent initialisation: one forward in training mode, without gradients, of the first `--init-size`
    (500) images of epoch 0's labeled stream through D, and of one batch of noise through G, before training
    (official `init_param(trainx[:500])`). The minibatch-discrimination layer is initialised as in the official
    MinibatchLayer: its kernels are rescaled so that the mean nearest-neighbour L1 distance per kernel is 2 on that
    batch, and its bias is set to minus the mean output.
  * Inputs (x - 127.5) / 128. Labeled examples: `--num-labels` balanced over classes, chosen by `--seed-data`
    (common.balanced_label_indices; the official code takes the first count per class of a permutation).
    Every training image (labeled ones included) is also in the unlabeled set, as in the official code.
  * One epoch = one pass over the unlabeled set: floor(N/B) iterations (500 for CIFAR-10 at B=100). The labeled
    set is tiled ceil(N/num_labels) times, each copy freshly permuted, so every iteration sees B labeled, B
    unlabeled and B generated images. The feature-matching G step uses a second, independent permutation of the
    unlabeled set for its real features (official `trainx_unl2`). The orders are drawn from a generator seeded by
    (seed, epoch), so a resumed run sees the same batches.
  * D loss = loss_lab + unlabeled_weight * loss_unl with loss_lab = cross entropy on the 10 logits and
    loss_unl = 0.5 * BCE(lse(l(x_unl)), 1) + 0.5 * BCE(lse(l(G(z))), 0), which is the official
    -0.5 mean(lse_unl) + 0.5 mean(softplus(lse_unl)) + 0.5 mean(softplus(lse_gen)).
  * G losses: feature matching = mean |mean_batch f(x_unl) - mean_batch f(G(z))| over the 192 global-pool features
    (official `T.mean(abs(m1-m2))`, D in training mode, i.e. with dropout); minimax = -mean(softplus(lse(l(G(z)))))
    = mean(log(1 - D(G(z)))) (official `loss_gen` of the minibatch-discrimination script); `--gen-loss
    non-saturating` gives -mean(log D(G(z))) instead. With `--feature-matching --minibatch-disc` the matched features
    are still those of the global pool (before the minibatch layer).
  * Top-k: the score of a fake is D's realness logit lse(l(G(z))) from the forward that the G loss uses; the G loss
    is computed on the k highest-scored fakes only (feature matching: the fake feature mean is over those k).
    k = max(mu, floor(B * gamma^epoch)) with the epoch defined above. The D update is unchanged.
  * Adam, lr 3e-4, beta1 0.5, beta2 0.999 for D and G; the lr is constant up to epoch `--lr-decay-start` (800) then
    falls linearly to 0 at `--epochs` (1200), changed once per epoch (official `lr * min(3 - epoch/400, 1)`).
    Adam's epsilon: the official update is m / sqrt(v + 1e-8), i.e. an epsilon of about 1e-4 outside the square
    root, so `--adam-eps` defaults to 1e-4 (PyTorch's 1e-8 makes tiny-gradient parameters move much faster).
  * Test error: D's parameters averaged with decay 0.9999 per D step (official `disc_param_avg`), evaluated in
    evaluation mode (no dropout, no noise) in batches of `--batch-size` in test-set order (the minibatch layer
    still compares each example with its batch-mates at test time, as in the official code): `test_error`.
    The raw D's error is measured the same way and reported beside it (`test_error_raw`, metrics.jsonl,
    summary.json and the final line).
  * Sample grids (fixed noise, `--grid-size` 100 samples, one batch) per evaluation; IS and FID
    (metrics.evaluate_generator: pytorch-fid's Inception, `--fid-samples` samples, against the CIFAR-10
    training-set statistics cached as <data-dir>/fid_stats_cifar10_train.npz, the same file as dcgan_cifar_topk.py)
    every `--fid-every` epochs and at the end. G samples in batches of `--batch-size` (its BN uses batch
    statistics, as the official code: `--sample-bn batch`, the default, which every IS/FID number here uses;
    `--sample-bn running` keeps running averages of the statistics during training and samples with them) from a
    generator seeded by (seed, step), so evaluation never changes the training randomness.
  * Counting: a "step" (metrics.jsonl `step`, `--max-steps`, `--save-every`) is one training iteration = one D
    update and its `--g-steps` G updates.

Departures from the official code (deliberate, none changes the model or the losses):
  * The parameter average starts from the initialised weights (common.EMA), not from zeros, and warms up
    (`--ema-warmup`, on by default): update t uses the decay min(0.9999, (1 + t)/(10 + t)) (TensorFlow's
    num_updates form), so a run shorter than ~10k steps reports a trained average, not the initial weights. From
    update 89,990 on the decay is 0.9999 itself; our average and the official one then differ by a factor
    0.9999^t of their early difference (< 1 % after 50k more steps = 100 epochs), i.e. only early in training.
  * The minibatch-discrimination tensor T is trained directly (common.MinibatchDiscrimination) instead of the
    official weight-normalised theta * exp(log_scale) / ||theta||: the same function and the same initial values
    (each of T's K·D columns starts as a unit-norm Gaussian direction, then the data-dependent init rescales each
    kernel), a different optimisation geometry for those 96k parameters.
  * Adam's epsilon sits outside the square root (PyTorch); 1e-4 there approximates the official 1e-8 inside it.
  * Which examples carry labels: common.balanced_label_indices(seed = --seed-data), a different draw of the same
    kind (num_labels / 10 per class, uniformly at random) than the official first-count-per-class of a permutation.

Fast path: the uint8 training set lives on the device, `--amp bf16`, `--compile` (the data-dependent init runs
eagerly first), `--channels-last`.
"""

from __future__ import annotations

import argparse
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

MODELS = {  # the defaults each published configuration sets (explicit flags override them)
    "feature-matching": dict(feature_matching=True, minibatch_disc=False, input_dropout=0.2, input_noise=0.0,
                             g_steps=1, gen_loss=None, fid=False),
    "minibatch-disc": dict(feature_matching=False, minibatch_disc=True, input_dropout=0.0, input_noise=0.2,
                           g_steps=3, gen_loss="minimax", fid=True),
}


def parse_args(argv=None):
    # common.ArgumentParser: argparse's own errors are one `error:` line too (the usage is for --help)
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # run
    a("--exp-name", default=os.path.basename(__file__)[: -len(".py")], help="run name prefix")
    a("--seed", type=int, default=1, help="seed of python, numpy, torch and of the data order")
    a("--torch-deterministic", action=argparse.BooleanOptionalAction, default=False,
  help="CUDA only. Off (default, fastest): cuDNN autotuning and TF32 tensor cores for float32 "
  "products. On: deterministic cuDNN, no autotuning, full float32 (a GPU run repeats bit for bit). "
  "CPU runs are bit-reproducible either way")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--out-dir", default="runs", help="parent folder of the run folder")
    a("--track", action=argparse.BooleanOptionalAction, default=False, help="also log to TensorBoard")
    a("--resume", default=None, help="continue from runs/<run>/checkpoints/last.pt, in that run folder")
    a("--save-every", type=int, default=5000, help="checkpoint every N steps (and at the end); 0 = only at the end")
    # data
    a("--dataset", choices=["cifar10", "fake"], default="cifar10", help="fake = random images (benchmarks)")
    a("--data-dir", default="data", help="folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz")
    a("--download", action=argparse.BooleanOptionalAction, default=True, help="download CIFAR-10 when absent")
    a("--fake-size", type=int, default=None,
      help="training images of --dataset fake (test: a fifth of it); default 50000, --dataset fake only")
    a("--num-labels", type=int, default=4000, help="labeled training examples, balanced over the 10 classes")
    a("--seed-data", type=int, default=1, help="seed choosing which training examples carry labels")
    a("--supervised-only", action=argparse.BooleanOptionalAction, default=False,
      help="baseline: train the same classifier on the labeled examples only (no G, no unlabeled data)")
    # model
    a("--model", choices=sorted(MODELS), default="feature-matching",
      help="published configuration that sets the defaults of the next eight flags")
    a("--feature-matching", action=argparse.BooleanOptionalAction, default=None,
      help="G loss = L1 distance of batch-mean D features (default: on for feature-matching)")
    a("--gen-loss", choices=["minimax", "non-saturating"], default=None,
      help="G loss without feature matching (default: minimax, as the official minibatch-disc script)")
    a("--minibatch-disc", action=argparse.BooleanOptionalAction, default=None,
      help="minibatch discrimination layer after D's global pool (default: on for minibatch-disc)")
    a("--mbd-kernels", type=int, default=None, help="minibatch discrimination kernels (default 100)")
    a("--mbd-dim", type=int, default=None, help="dimension per minibatch discrimination kernel (default 5)")
    a("--input-dropout", type=common.finite_float, default=None, help="dropout rate on D's input (default: 0.2 / 0)")
    a("--input-noise", type=common.finite_float, default=None,
      help="std of Gaussian noise on D's input (default: 0 / 0.2)")
    a("--g-steps", type=int, default=None, help="G updates per D update (default: 1 / 3)")
    a("--vbn", action=argparse.BooleanOptionalAction, default=False,
      help="virtual batch norm in G (fixed reference batch) instead of batch norm")
    a("--hist-avg", type=common.finite_float, default=0.0,
      help="historical averaging penalty weight on G and D (0 = off)")
    a("--label-smoothing", type=common.finite_float, default=0.0,
      help="one-sided: real target 1 - value in D's unsupervised loss")
    a("--unlabeled-weight", type=common.finite_float, default=1.0, help="weight of D's unsupervised loss")
    # top-k
    a("--topk", action=argparse.BooleanOptionalAction, default=False, help="top-k generator update")
    a("--mu", type=int, default=None, help="floor of k (default: half the batch)")
    a("--gamma", type=common.finite_float, default=None,
      help="k decay per epoch, k = max(mu, floor(B gamma^epoch)) (default 0.99)")
    a("--bottomk", action=argparse.BooleanOptionalAction, default=False,
      help="keep the k lowest-scored fakes instead (analysis only)")
    # optimisation
    a("--epochs", type=int, default=1200, help="training epochs (passes over the unlabeled set)")
    a("--max-steps", type=int, default=None, help="stop after N steps (one D update + its G updates)")
    a("--batch-size", type=int, default=100, help="labeled, unlabeled and generated images per step (each)")
    a("--lr", type=common.finite_float, default=3e-4, help="Adam learning rate of D and G")
    a("--beta1", type=common.finite_float, default=0.5, help="Adam beta1")
    a("--adam-eps", type=common.finite_float, default=1e-4, help="Adam epsilon (official sqrt(v + 1e-8) ~ 1e-4)")
    a("--lr-decay-start", type=int, default=800, help="epoch from which the lr falls linearly to 0 at --epochs")
    a("--ema-decay", type=common.finite_float, default=0.9999,
      help="decay of the average of D's parameters used for testing")
    a("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
      help="average with decay min(decay, (1+t)/(10+t)) at update t (TensorFlow's num_updates), so a short run's "
           "average is not the initial weights; the same as without it from update 89,990 on (decay 0.9999)")
    a("--init-size", type=int, default=500, help="labeled images of D's data-dependent initialisation")
    # evaluation
    a("--eval-every", type=int, default=1, help="test error and sample grid every N epochs (and at the end)")
    a("--grid-size", type=int, default=100, help="samples in each grid PNG (fixed noise, one G batch)")
    a("--fid", action=argparse.BooleanOptionalAction, default=None,
      help="IS and FID of G's samples (default: on for minibatch-disc); --no-fid turns them off")
    a("--fid-every", type=int, default=100, help="IS/FID every N epochs (and at the end)")
    a("--fid-samples", type=int, default=50000, help="generated images for IS/FID")
    a("--fid-weights", default=None, help="pytorch-fid Inception state-dict file (offline use); default: download it")
    a("--fid-batch-size", type=int, default=250, help="images per Inception forward (G samples in --batch-size chunks)")
    a("--sample-bn", choices=["batch", "running"], default="batch",
      help="G's batch-norm statistics when sampling (grids, IS/FID): batch = those of each sampling batch of "
           "--batch-size (the official code's, and what every IS/FID here uses), running = running averages kept "
           "during training (the official layer's avg_batch_mean/var, momentum 0.1, which its scripts never apply)")
    # speed
    a("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision autocast")
    a("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile D and G")
    a("--check-host-sync", action=argparse.BooleanOptionalAction, default=False,
      help="CUDA only, for tests: raise on any host synchronisation inside a training step (the first "
           "two steps of a process and the logging/evaluation/checkpoint code are exempt)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=False,
      help="channels_last memory format for the conv nets (faster on recent GPUs)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Fill the --model defaults and reject impossible or meaningless combinations (UserError, one line)."""
    common.check_seed("--seed", args.seed)
    common.check_seed("--seed-data", args.seed_data)
    if args.dataset == "fake":
        args.fake_size = 50000 if args.fake_size is None else args.fake_size
    elif args.fake_size is not None:
        raise common.UserError("--fake-size only applies with --dataset fake")
    if args.vbn and args.sample_bn == "running":
        raise common.UserError("--sample-bn running applies to G's batch norm; with --vbn G samples with its "
                               "reference batch")
    preset = MODELS[args.model]
    if args.supervised_only:
        meaningless = {"--topk": args.topk, "--bottomk": args.bottomk, "--mu": args.mu is not None,
                       "--gamma": args.gamma is not None, "--feature-matching": args.feature_matching,
                       "--gen-loss": args.gen_loss is not None, "--g-steps": args.g_steps is not None,
                       "--vbn": args.vbn, "--fid": args.fid, "--label-smoothing": args.label_smoothing != 0,
                       "--unlabeled-weight": args.unlabeled_weight != 1.0}
        bad = [name for name, given in meaningless.items() if given]
        if bad:
            raise common.UserError(f"{', '.join(bad)} make(s) no sense with --supervised-only (no generator)")
    for key in ("feature_matching", "minibatch_disc", "input_dropout", "input_noise", "g_steps", "fid"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.supervised_only:
        args.feature_matching, args.fid = False, False
    if args.gen_loss is not None and args.feature_matching:
        raise common.UserError("--gen-loss applies without feature matching; add --no-feature-matching")
    if args.gen_loss is None and not args.feature_matching and not args.supervised_only:
        args.gen_loss = "minimax"
    if args.minibatch_disc:
        args.mbd_kernels = 100 if args.mbd_kernels is None else args.mbd_kernels
        args.mbd_dim = 5 if args.mbd_dim is None else args.mbd_dim
        if args.mbd_kernels < 1 or args.mbd_dim < 1:
            raise common.UserError("--mbd-kernels and --mbd-dim must be >= 1")
    elif args.mbd_kernels is not None or args.mbd_dim is not None:
        raise common.UserError("--mbd-kernels/--mbd-dim need --minibatch-disc")
    if args.batch_size < 2:
        raise common.UserError(f"--batch-size must be >= 2 (G uses batch norm), got {args.batch_size}")
    if args.num_labels <= 0 or args.num_labels % 10:
        raise common.UserError(f"--num-labels must be a positive multiple of 10 (balanced classes), "
                               f"got {args.num_labels}")
    if args.topk:
        args.mu = args.batch_size // 2 if args.mu is None else args.mu
        args.gamma = 0.99 if args.gamma is None else args.gamma
        common.validate_topk(args.batch_size, args.mu, args.gamma)
    elif args.mu is not None or args.gamma is not None or args.bottomk:
        raise common.UserError("--mu, --gamma and --bottomk need --topk")
    checks = [
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.max_steps is None or args.max_steps >= 1, f"--max-steps must be >= 1, got {args.max_steps}"),
        (args.save_every >= 0, f"--save-every must be >= 0, got {args.save_every}"),
        (args.eval_every >= 1, f"--eval-every must be >= 1, got {args.eval_every}"),
        (args.grid_size >= 2, f"--grid-size must be >= 2 (G's batch norm), got {args.grid_size}"),
        (args.fid_every >= 1, f"--fid-every must be >= 1, got {args.fid_every}"),
        (args.g_steps >= 1, f"--g-steps must be >= 1, got {args.g_steps}"),
        (0.0 <= args.input_dropout < 1.0, f"--input-dropout must be in [0, 1), got {args.input_dropout}"),
        (args.input_noise >= 0.0, f"--input-noise must be >= 0, got {args.input_noise}"),
        (0.0 <= args.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {args.label_smoothing}"),
        (args.hist_avg >= 0.0, f"--hist-avg must be >= 0, got {args.hist_avg}"),
        (args.unlabeled_weight >= 0.0, f"--unlabeled-weight must be >= 0, got {args.unlabeled_weight}"),
        (args.lr > 0.0 and 0.0 <= args.beta1 < 1.0 and args.adam_eps > 0.0,
         "--lr and --adam-eps must be > 0 and --beta1 in [0, 1)"),
        (args.lr_decay_start >= 0, f"--lr-decay-start must be >= 0, got {args.lr_decay_start}"),
        (0.0 <= args.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
        (args.init_size >= 2, f"--init-size must be >= 2, got {args.init_size}"),
        (args.fake_size is None or args.fake_size >= 10, f"--fake-size must be >= 10, got {args.fake_size}"),
        (args.fid_batch_size >= 1, f"--fid-batch-size must be >= 1, got {args.fid_batch_size}"),
        (not args.fid or args.fid_samples >= 10,
         f"--fid-samples must be >= 10 (IS uses 10 splits), got {args.fid_samples}"),
    ]
    for ok, message in checks:
        if not ok:
            raise common.UserError(message)
    if args.fid_weights is not None and not args.fid:
        raise common.UserError("--fid-weights given but IS/FID are off (add --fid)")
    if args.fid_weights is not None and not Path(args.fid_weights).is_file():
        raise common.UserError(f"--fid-weights {args.fid_weights}: no such file")


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def wn_conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> common.WNConv2d:
    """Hidden weight-normalised conv of D: g is set by the data-dependent init, then frozen (official train_g=False)."""
    layer = common.WNConv2d(c_in, c_out, kernel, stride, padding)
    layer.g.requires_grad_(False)
    return layer


@torch.no_grad()
def init_minibatch_disc(layer: common.MinibatchDiscrimination, h: torch.Tensor) -> None:
    """Data-dependent init of the official MinibatchLayer on features h (n, in_features): the kernels are rescaled so
    that the mean nearest-neighbour L1 distance per kernel is 2, and the bias so that the extra outputs have mean 0."""
    n, kernels, dim = h.shape[0], layer.kernels, layer.kernel_dim
    m = (h @ layer.T).view(n, kernels, dim)
    l1 = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(3)  # (n, n, kernels)
    l1 = l1 + 1e6 * torch.eye(n, device=h.device).unsqueeze(2)  # exclude j = i
    scale = 0.5 * l1.min(dim=1).values.mean(0)  # (kernels,)
    layer.T.view(-1, kernels, dim).div_(scale.view(1, kernels, 1))
    layer.bias.copy_(-torch.exp(-l1 / scale).sum(1).mean(0))


class Discriminator(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> (10 class logits (B, 10), global-pool features (B, 192)), both float32."""

    def __init__(self, input_dropout: float, input_noise: float, mbd_kernels: int = 0, mbd_dim: int = 5):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.input_noise = common.GaussianNoise(input_noise)
        self.input_dropout = nn.Dropout(input_dropout)
        self.body = nn.Sequential(
            wn_conv(3, 96), act(), wn_conv(96, 96), act(), wn_conv(96, 96, stride=2), act(), nn.Dropout(0.5),
            wn_conv(96, 192), act(), wn_conv(192, 192), act(), wn_conv(192, 192, stride=2), act(), nn.Dropout(0.5),
            wn_conv(192, 192, padding=0), act(),  # 8x8 -> 6x6
            wn_conv(192, 192, 1, padding=0), act(), wn_conv(192, 192, 1, padding=0), act(),  # NIN x2
        )
        self.mbd = common.MinibatchDiscrimination(192, mbd_kernels, mbd_dim) if mbd_kernels else None
        self.out = common.WNLinear(192 + mbd_kernels, 10, init_scale=0.1)  # trained g, initial std 0.1

    def forward(self, x: torch.Tensor, groups: int = 1, init: bool = False):
        """`groups`: x holds that many equal-size batches (e.g. labeled, unlabeled, fake) that the minibatch layer
        must see separately. `init=True` also runs the minibatch layer's data-dependent initialisation."""
        features = self.body(self.input_dropout(self.input_noise(x))).float().mean((2, 3))
        if self.mbd is None:
            return self.out(features).float(), features
        with torch.autocast(device_type=x.device.type, enabled=False):  # exp(-L1 distance) wants float32
            if init:
                init_minibatch_disc(self.mbd, features)
            h = torch.cat([self.mbd(part) for part in features.chunk(groups)])
            return self.out(h), features


class BatchNormShift(nn.Module):
    """Batch norm with a learned shift and no scale, with the current batch's statistics (official
    nn.batch_norm(g=None), whose running averages are never used). (B, C) or (B, C, H, W).

    With track_running_stats (--sample-bn running) it also keeps the official layer's running averages
    (avg_batch_mean from 0, avg_batch_var from 1; new = 0.9 old + 0.1 batch value, the variance unbiased) in every
    training-mode forward, and normalises with them in eval mode: (x - mean) / sqrt(1e-6 + var) + shift, the official
    deterministic=True output. Without it, eval mode is training mode (batch statistics)."""

    def __init__(self, num_features: int, track_running_stats: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        if track_running_stats:
            self.register_buffer("avg_batch_mean", torch.zeros(num_features))
            self.register_buffer("avg_batch_var", torch.ones(num_features))
        else:
            self.avg_batch_mean = self.avg_batch_var = None

    def forward(self, x):
        use_batch = self.training or self.avg_batch_mean is None
        return F.batch_norm(x, self.avg_batch_mean, self.avg_batch_var, None, self.bias, training=use_batch,
                            momentum=0.1, eps=1e-6)


class Generator(nn.Module):
    """z (B, 100) ~ U[0, 1) -> images (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self, vbn: bool = False, z_dim: int = 100, running_stats: bool = False):
        super().__init__()
        norm = common.VirtualBatchNorm if vbn else lambda n: BatchNormShift(n, track_running_stats=running_stats)
        self.fc = nn.Linear(z_dim, 4 * 4 * 512, bias=False)
        self.norm0 = norm(4 * 4 * 512)  # per unit, before the reshape, as the official code
        self.up1 = nn.ConvTranspose2d(512, 256, 5, 2, padding=2, output_padding=1, bias=False)  # 4 -> 8
        self.norm1 = norm(256)
        self.up2 = nn.ConvTranspose2d(256, 128, 5, 2, padding=2, output_padding=1, bias=False)  # 8 -> 16
        self.norm2 = norm(128)
        self.out = common.WNConvTranspose2d(128, 3, 5, 2, padding=2, output_padding=1, init_scale=0.1)  # 16 -> 32
        for layer in (self.fc, self.up1, self.up2):
            nn.init.normal_(layer.weight, 0.0, 0.05)

    def forward(self, z):
        h = F.relu(self.norm0(self.fc(z))).view(-1, 512, 4, 4)
        h = F.relu(self.norm1(self.up1(h)))
        h = F.relu(self.norm2(self.up2(h)))
        return torch.tanh(self.out(h))


def file_hash(path: str) -> str:
    """First 10 hex digits of a file's SHA-256 (names the FID statistics cache of non-default Inception weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------------
# Losses (logits: the 10 class logits; the fake class has logit 0, so lse(logits) is the logit of "real")
# ----------------------------------------------------------------------------------------------------------------
def unsupervised_loss(logits_real, logits_fake, label_smoothing: float = 0.0) -> torch.Tensor:
    """D's loss on unlabeled and generated data: 0.5 BCE(lse(l(x)), 1 - smoothing) + 0.5 BCE(lse(l(G(z))), 0).

    With no smoothing this is the official
    -0.5 mean(lse_unl) + 0.5 mean(softplus(lse_unl)) + 0.5 mean(softplus(lse_gen)).
    """
    real, fake = torch.logsumexp(logits_real, 1), torch.logsumexp(logits_fake, 1)
    return 0.5 * F.binary_cross_entropy_with_logits(real, torch.full_like(real, 1.0 - label_smoothing)) \
        + 0.5 * F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def feature_matching_loss(features_real, features_fake) -> torch.Tensor:
    """Mean absolute difference of the batch-mean features (official T.mean(abs(m1 - m2)))."""
    return (features_real.mean(0) - features_fake.mean(0)).abs().mean()


def adversarial_g_loss(score_fake, kind: str) -> torch.Tensor:
    """score_fake = lse(l(G(z))), the logit of D(G(z)). minimax: mean log(1 - D(G(z))) = -mean softplus(score)
    (official loss_gen); non-saturating: -mean log D(G(z)) = mean softplus(-score)."""
    return -F.softplus(score_fake).mean() if kind == "minimax" else F.softplus(-score_fake).mean()


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    common.seed_everything(args.seed, args.torch_deterministic)
    device = common.pick_device(args.device)
    amp = lambda: common.autocast(device, args.amp)  # noqa: E731
    amp()  # raises UserError now for --amp fp16 on the CPU
    if args.check_host_sync and device.type != "cuda":
        raise common.UserError("--check-host-sync needs a CUDA device")
    common.check_out_dir(args.out_dir, args.exp_name)
    # sizes whose memory cannot exist are refused here, naming their flags (lower bounds: the largest tensors)
    mbd = args.mbd_kernels * args.mbd_dim if args.minibatch_disc else 0

    def nets():  # built on the meta device by common.parameter_count: no memory
        return [Discriminator(args.input_dropout, args.input_noise, args.mbd_kernels if args.minibatch_disc else 0,
                              args.mbd_dim or 5), Generator(args.vbn, running_stats=args.sample_bn == "running")]

    d_image = 2 * (96 * 1024 * 2 + 96 * 256 + 192 * 256 * 2 + 192 * 64 + 192 * 36 * 3)  # D's activations per image
    g_image = 2 * (4 * 4 * 512 + 256 * 64 + 128 * 256 + 3 * 1024)  # G's
    common.check_fits(device, {
        "D and G (--mbd-kernels x --mbd-dim)": 4 * 6 * common.parameter_count(nets),  # + gradients, Adam, EMA
        "one training step (--batch-size, --g-steps; minibatch discrimination: --batch-size^2 x --mbd-kernels x "
        "--mbd-dim)": 4 * args.batch_size * (3 * d_image + (1 + args.g_steps) * g_image)
                      + 4 * 3 * args.batch_size ** 2 * mbd,
        "the FID batches (--fid-batch-size)": 4 * 3 * args.fid_batch_size * 3 * 299 * 299 if args.fid else 0,
        "the fake data set (--fake-size)": 3 * 1024 * 2 * (args.fake_size or 0),
    })
    resume = common.load_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        common.check_resume_config(resume["args"], args, allowed=("fid", "fid_every", "fid_samples", "fid_batch_size",
                                                                  "grid_size", "channels_last", "download"))

    # data: uint8 tensors on the device; labeled indices balanced over classes, chosen by --seed-data
    if args.dataset == "cifar10":
        train_x, train_y = common.load_cifar10(args.data_dir, train=True, download=args.download)
        test_x, test_y = common.load_cifar10(args.data_dir, train=False, download=args.download)
    else:
        train_x, train_y = common.fake_images(args.fake_size, (3, 32, 32), seed=0)
        test_x, test_y = common.fake_images(max(args.fake_size // 5, 10), (3, 32, 32), seed=1)
    lab_idx = common.balanced_label_indices(train_y, args.num_labels, args.seed_data)
    n_unl, n_lab, batch = len(train_x), len(lab_idx), args.batch_size
    steps_per_epoch = n_unl // batch
    if steps_per_epoch < 1:
        raise common.UserError(f"--batch-size {batch} is larger than the training set ({n_unl} images)")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    inception = ref_stats = None
    if args.fid:  # Inception and the reference statistics before the run folder: offline errors leave nothing behind
        import metrics

        inception = metrics.load_inception(args.fid_weights, device=device)
        if args.dataset == "cifar10":  # shared with dcgan_cifar_topk.py; a file per --fid-weights file
            tag = "" if args.fid_weights is None else "_" + file_hash(args.fid_weights)
            cache = Path(args.data_dir) / f"fid_stats_cifar10_train{tag}.npz"
        else:
            cache = None  # fake data: statistics of the fake training set itself, never cached
        ref_stats = metrics.reference_statistics(train_x, inception, cache, args.fid_batch_size, device)
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    lab_idx = lab_idx.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def to_input(x_uint8):
        return ((x_uint8.float() - 127.5) / 128.0).contiguous(memory_format=memory_format)

    def epoch_order(epoch: int):
        """Index streams of one epoch: tiled labeled set, unlabeled set, a second unlabeled order (for G)."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, epoch]).generate_state(1)[0]))
        reps = math.ceil(n_unl / n_lab)
        lab = torch.cat([torch.randperm(n_lab, generator=g) for _ in range(reps)])
        unl, unl2 = torch.randperm(n_unl, generator=g), torch.randperm(n_unl, generator=g)
        return lab_idx[lab.to(device)], unl.to(device), unl2.to(device)

    # models and optimisers
    D = Discriminator(args.input_dropout, args.input_noise, args.mbd_kernels if args.minibatch_disc else 0,
                      args.mbd_dim or 5).to(device, memory_format=memory_format)
    G = None if args.supervised_only else Generator(args.vbn, running_stats=args.sample_bn == "running").to(
        device, memory_format=memory_format)
    z_gen = torch.Generator().manual_seed(args.seed + 7)  # fixed noise: grid samples and the VBN reference batch
    z_ref = torch.rand(batch, 100, generator=z_gen).to(device)
    z_fixed = torch.rand(args.grid_size, 100, generator=z_gen).to(device)

    def noise(n):
        return torch.rand(n, 100, device=device)

    def generate(model, z):
        if args.vbn:
            common.vbn_reference_pass(model, z_ref)
        return model(z)

    if resume is None:  # data-dependent initialisation (official init_param(trainx[:500]) and G's noise batch)
        with torch.no_grad():
            D.train()(to_input(train_x[epoch_order(0)[0][: args.init_size]]), init=True)
            if G is not None:
                generate(G.train(), noise(batch))
    ema = common.EMA(D, args.ema_decay, warmup=args.ema_warmup)  # warm-up: a short run's average follows D
    d_params = [p for p in D.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # one multi-tensor kernel, and GradScaler.step without a host sync under fp16
    opt_d = torch.optim.Adam(d_params, lr=args.lr, betas=(args.beta1, 0.999), eps=args.adam_eps, fused=fused)
    hist_d = common.HistoricalAverage(D) if args.hist_avg > 0 else None
    scaler_d = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    if G is not None:
        g_params = list(G.parameters())
        opt_g = torch.optim.Adam(g_params, lr=args.lr, betas=(args.beta1, 0.999), eps=args.adam_eps, fused=fused)
        hist_g = common.HistoricalAverage(G) if args.hist_avg > 0 else None
        scaler_g = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    D_fwd = torch.compile(D) if args.compile else D
    G_fwd = torch.compile(G) if args.compile and G is not None else G

    # resume: structure, shapes, step and finiteness checked before any of the checkpoint is applied
    step, sums = 0, torch.zeros(5, device=device)  # per-epoch sums: loss_lab, loss_unl, loss_gen, train_err, steps
    if resume is not None:
        common.check_checkpoint(args.resume, resume, {"D": D, "ema": ema.module, **({"G": G} if G is not None else {})},
                                keys=("opt_d", "scaler_d", "ema_updates") + (("hist_d",) if hist_d is not None else ())
                                + (("opt_g", "scaler_g") if G is not None else ())
                                + (("hist_g",) if G is not None and hist_g is not None else ()),
                                tensors={"sums": (5,)}, max_step=total_steps)
        with common.checkpoint_errors(args.resume):
            D.load_state_dict(resume["D"])
            common.load_optimizer_state(opt_d, resume["opt_d"])
            ema.load_state_dict(resume["ema"])
            ema.num_updates = int(resume["ema_updates"])
            scaler_d.load_state_dict(resume["scaler_d"])
            if hist_d is not None:
                hist_d.load_state_dict(resume["hist_d"])
            if G is not None:
                G.load_state_dict(resume["G"])
                common.load_optimizer_state(opt_g, resume["opt_g"])
                scaler_g.load_state_dict(resume["scaler_g"])
                if hist_g is not None:
                    hist_g.load_state_dict(resume["hist_g"])
            step, sums = int(resume["step"]), resume["sums"].to(device)
            common.set_rng_state(resume["rng"])
    # the run folder, locked for this process (a second writer is refused, naming this one)
    run_dir = common.make_run_dir(args, resume_dir=Path(args.resume).parent.parent if resume is not None else None)
    logger = common.MetricsLogger(run_dir, track=args.track)
    logger.truncate_after(step)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    print(f"run folder {run_dir} | device {device} | {n_lab} labels | {steps_per_epoch} steps/epoch | "
          f"steps {step} -> {total_steps}", flush=True)

    def save():
        state = {"args": vars(args), "step": step, "epoch": step // steps_per_epoch, "k": k, "sums": sums,
                 "D": D.state_dict(), "opt_d": opt_d.state_dict(), "ema": ema.state_dict(),
                 "ema_updates": ema.num_updates,
                 "scaler_d": scaler_d.state_dict(), "rng": common.rng_state()}
        if hist_d is not None:
            state["hist_d"] = hist_d.state_dict()
        if G is not None:
            state.update(G=G.state_dict(), opt_g=opt_g.state_dict(), scaler_g=scaler_g.state_dict())
            if hist_g is not None:
                state["hist_g"] = hist_g.state_dict()
        common.save_checkpoint(ckpt_path, state)  # refuses non-finite weights: a saved checkpoint is a good one

    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step (1-based) with a non-finite loss

    def check_finite():
        bad = int(first_bad)
        if bad >= 0:
            kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
            raise common.UserError(f"non-finite loss at step {bad} (epoch {(bad - 1) // steps_per_epoch}); "
                                   f"stopped, {kept}")

    @torch.no_grad()
    def sample(n, generator=None):
        """n images from G in batches of --batch-size (G's batch norm: batch statistics, or the running averages
        with --sample-bn running), in float32 also under --amp, so that an AMP run's FID is comparable with an
        fp32 run's."""
        out = []
        for i in range(0, n, batch):
            z = torch.rand(min(batch, n - i), 100, device=device, generator=generator)
            out.append(generate(G, z).float())
        return torch.cat(out)

    @torch.no_grad()
    def test_error(model) -> float:
        """Error of `model` in eval mode (no dropout, no noise) on the test set, in batches of --batch-size."""
        was_training = model.training
        model.eval()
        wrong = torch.zeros((), dtype=torch.long, device=device)  # summed on the device, read once
        for i in range(0, len(test_x), batch):
            with amp():
                logits, _ = model(to_input(test_x[i: i + batch]))
            wrong += (logits.argmax(1) != test_y[i: i + batch]).sum()
        model.train(was_training)
        return int(wrong) / len(test_x)

    @torch.no_grad()
    def evaluate(with_fid: bool) -> dict:
        # the average of D (official disc_param_avg) and, side by side, the raw D
        result = {"test_error": test_error(ema.module), "test_error_raw": test_error(D)}
        if G is not None:
            G.train(args.sample_bn == "batch")  # eval mode: the running averages of --sample-bn running
            grid = generate(G, z_fixed).float()
            from torchvision.utils import save_image
            save_image(grid * 0.5 + 0.5, run_dir / "samples" / f"step_{step:08d}.png",
                       nrow=math.ceil(math.sqrt(args.grid_size)))
        if with_fid:
            eval_gen = torch.Generator(device=device).manual_seed(args.seed + step)  # leaves training RNG alone
            scores = metrics.evaluate_generator(lambda n: sample(n, eval_gen), args.fid_samples, ref_stats[0],
                                                ref_stats[1], inception, batch_size=args.fid_batch_size, device=device)
            result.update(fid=scores["fid"], is_mean=scores["is_mean"], is_std=scores["is_std"])
        if G is not None:
            G.train()
        return result

    progress = common.Progress(total_steps, start=step)
    t_start, last_eval, last_result = time.time(), -1, {}
    k = batch
    lab_stream = unl_stream = unl2_stream = None
    sync_check_from = step + 2 if args.check_host_sync else None  # first steps: compilation, lazy CUDA init
    stop = common.StopRequest()  # Ctrl-C: finish the step, save a checkpoint, print how to resume
    while step < total_steps:
        epoch, t = divmod(step, steps_per_epoch)
        if lab_stream is None or t == 0:
            lab_stream, unl_stream, unl2_stream = epoch_order(epoch)
        # official lr * min(3 - epoch / 400, 1): constant to --lr-decay-start, then linear to 0 at --epochs
        factor = min(1.0, (args.epochs - epoch) / max(args.epochs - args.lr_decay_start, 1))
        for opt in ([opt_d] if G is None else [opt_d, opt_g]):
            for group in opt.param_groups:
                group["lr"] = args.lr * factor
        # ALGO LOGIC: top-k -- k = max(mu, floor(B gamma^epoch)) fakes per G update, from the epoch counter
        k = common.topk_k(batch, epoch, args.mu, args.gamma) if args.topk else batch
        if sync_check_from is not None:
            common.check_host_sync(step >= sync_check_from)
        rows = slice(t * batch, (t + 1) * batch)
        x_lab, y_lab = to_input(train_x[lab_stream[rows]]), train_y[lab_stream[rows]]

        # ALGO LOGIC: D step -- (K+1)-class loss: cross entropy on labeled data + real/fake on unlabeled and fakes
        D.train()
        if G is None:
            with amp():
                logits_lab, _ = D_fwd(x_lab)
            loss_lab = F.cross_entropy(logits_lab, y_lab)
            loss_unl = torch.zeros((), device=device)
        else:
            with torch.no_grad(), amp():
                x_fake = generate(G_fwd, noise(batch))
            x_unl = to_input(train_x[unl_stream[rows]])
            with amp():
                logits, _ = D_fwd(torch.cat([x_lab, x_unl, x_fake.to(x_lab.dtype)]), groups=3)
            logits_lab, logits_unl, logits_fake = logits.chunk(3)
            loss_lab = F.cross_entropy(logits_lab, y_lab)
            loss_unl = unsupervised_loss(logits_unl, logits_fake, args.label_smoothing)
        loss_d = loss_lab + args.unlabeled_weight * loss_unl
        if hist_d is not None:
            loss_d = loss_d + args.hist_avg * hist_d.penalty(D)
        opt_d.zero_grad(set_to_none=True)
        scaler_d.scale(loss_d).backward()
        scaler_d.step(opt_d)
        scaler_d.update()
        ema.update(D)
        if hist_d is not None:
            hist_d.update(D)
        train_err = (logits_lab.detach().argmax(1) != y_lab).float().mean()

        # ALGO LOGIC: G step(s) -- feature matching or minimax/non-saturating, on the top-k scored fakes only
        loss_g = torch.zeros((), device=device)
        for p in d_params if G is not None else []:
            p.requires_grad_(False)  # no weight gradients of D in the G step (a compiled D would compute them all)
        for _ in range(args.g_steps if G is not None else 0):
            with amp():
                logits_fake, feat_fake = D_fwd(generate(G_fwd, noise(batch)))
            score = torch.logsumexp(logits_fake, 1)  # D's realness logit
            keep = common.select_topk(score, k, largest=not args.bottomk)
            if args.feature_matching:
                with torch.no_grad(), amp():
                    _, feat_real = D_fwd(to_input(train_x[unl2_stream[rows]]))
                loss_g = feature_matching_loss(feat_real, feat_fake[keep])
            else:
                loss_g = adversarial_g_loss(score[keep], args.gen_loss)
            if hist_g is not None:
                loss_g = loss_g + args.hist_avg * hist_g.penalty(G)
            opt_g.zero_grad(set_to_none=True)
            scaler_g.scale(loss_g).backward(inputs=g_params)
            scaler_g.step(opt_g)
            scaler_g.update()
            if hist_g is not None:
                hist_g.update(G)
        for p in d_params if G is not None else []:
            p.requires_grad_(True)

        losses = torch.stack([loss_lab.detach(), loss_unl.detach(), loss_g.detach()]).float()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses).all(), step + 1, first_bad)
        sums += torch.cat([losses, train_err.reshape(1), torch.ones(1, device=device)])
        step += 1
        if sync_check_from is not None:
            common.check_host_sync(False)  # logging, evaluation and checkpoints read from the device

        epoch_end = step % steps_per_epoch == 0
        if progress.due(step):
            check_finite()
            shown = {key: v for key, v in last_result.items() if key == "test_error"}
            progress.report(step, epoch=epoch, k=k, loss_lab=losses[0].item(), loss_unl=losses[1].item(),
                            loss_g=losses[2].item(), **shown)
        if epoch_end or step == total_steps:
            check_finite()
            mean = (sums[:4] / sums[4].clamp_min(1)).tolist()
            record = {"step": step, "epoch": step / steps_per_epoch, "k": k, "lr": args.lr * factor,
                      "loss_lab": mean[0], "train_error": mean[3], "it/s": progress.rate(step)}
            if G is not None:
                record.update(loss_unl=mean[1], loss_gen=mean[2])
            epochs_done = step // steps_per_epoch
            if step == total_steps or (epoch_end and epochs_done % args.eval_every == 0):
                with_fid = args.fid and (step == total_steps or (epoch_end and epochs_done % args.fid_every == 0))
                last_result = evaluate(with_fid)
                last_eval = step
                record.update(last_result)
            logger.log(record)
            if epoch_end:
                sums.zero_()
        if step == total_steps or (args.save_every and step % args.save_every == 0) or stop:
            check_finite()
            save()
        if stop:  # Ctrl-C: checkpoint saved at this step boundary (with the epoch's sums); say how to continue
            raise common.interrupted(__file__, argv, step, ckpt_path)
    stop.restore()

    if last_eval != step:  # resumed at the end of a finished run: evaluate what is there
        last_result = evaluate(args.fid)
    summary = {"step": step, "epochs": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
               "model": args.model, "supervised_only": args.supervised_only, "num_labels": n_lab, "k": k,
               **last_result, "wall_time_s": time.time() - t_start, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    common.write_json(run_dir / "summary.json", summary)
    logger.close()
    common.unlock_run_dir(run_dir)
    # test_error is the averaged D's (the paper's number), test_error_raw the raw D's, side by side
    print("final: " + " ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}"
                               for key, v in last_result.items()), flush=True)


if __name__ == "__main__":
    common.run_cli(main)
