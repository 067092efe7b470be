"""Semi-supervised MNIST with a K+1-class GAN (Salimans et al. 2016, "Improved Techniques for Training GANs"),
with every trick of the paper and optional top-k generator updates (Sinha et al. 2020, "Top-k Training of GANs").

Experiment: permutation-invariant MNIST (images as 784-vectors, no convolutions). The discriminator D is a
10-class classifier whose logits l_1..l_10 also define "real vs fake": with Z(x) = sum_k exp(l_k(x)) the
probability of being real is D(x) = Z/(Z+1) (the fake class has its logit fixed at 0). D learns from
    L_D = L_labeled + w * L_unlabeled
    L_labeled   = cross-entropy of softmax(l) on a labeled batch
    L_unlabeled = 0.5 * E_real[-log D(x)] + 0.5 * E_fake[-log(1 - D(G(z)))]
                = 0.5 * E_real[softplus(lse(l)) - lse(l)] + 0.5 * E_fake[softplus(lse(l))]   (lse = logsumexp)
and the generator G by feature matching: the squared distance between the mean last-hidden-layer features of a
real batch and of a fake batch. Test error is measured with an exponential moving average (EMA) of D's weights.
Paper, errors out of 10,000 test digits (mean ± std over runs): 20 labels 1677 ± 452, 50 labels 221 ± 136,
100 labels 93 ± 6.5, 200 labels 90 ± 4.2.

Example (the paper's 100-label setting, 300 epochs; data are downloaded to ./data on first use):
    python improved_gan_mnist.py --num-labels 100 --seed 1 --seed-data 1
Baseline (the same D trained on the 100 labels alone):
    python improved_gan_mnist.py --num-labels 100 --seed 1 --seed-data 1 --supervised-only
Top-k (k decays from 100 to --mu over epochs; the fake mean of feature matching uses the k best-scored fakes):
    python improved_gan_mnist.py --num-labels 100 --topk --mu 50 --gamma 0.99
Sample-quality variant (minibatch discrimination in D, non-saturating G loss instead of feature matching):
    python improved_gan_mnist.py --minibatch-disc --no-feature-matching

Details, following openai/improved-gan `mnist_svhn_cifar10/train_mnist_feature_matching.py` and its `nn.py`:
- Data: pixels in [0, 1] (no centring); the unlabeled set is the whole training set (labeled digits included).
  The labeled set (`--num-labels`, balanced over the 10 classes, chosen by `--seed-data`) is tiled to the
  length of the training set every epoch, each copy in a fresh random order; the unlabeled set is permuted twice
  per epoch (one order for D's unlabeled batches, another for the real batches of feature matching).
  An epoch is floor(N_train / batch) steps; each step is one D update then one G update.
- G: z ~ U[0,1)^100 → Linear 500 (no bias) → batch norm → softplus → Linear 500 → batch norm → softplus →
  weight-normalised Linear 784 → sigmoid. As in the official `nn.batch_norm(..., g=None)` the batch norms have a
  learned shift but no scale, and always use the statistics of the current batch (train and sampling alike).
  The output layer's scale g is trained and starts at 1 (the official G has no data-dependent init: its init
  pass reaches no weight-norm layer of the kind that has one). Hidden weights: Glorot-uniform (Lasagne default).
- D: Gaussian noise σ 0.3 on the input; 5 weight-normalised dense layers 1000-500-250-250-250 with ReLU, each
  followed by Gaussian noise σ 0.5; a weight-normalised dense layer to 10 logits. Directions v ~ N(0, 0.1²).
  As in the official `nn.DenseLayer`, the hidden layers' scales g are set by the data-dependent init and then
  kept fixed (train_scale=False); only the output layer's scale is trained (train_scale=True).
- Data-dependent init: one training-mode forward (noise on) of D on 500 training digits chosen by `--seed-data`
  sets every layer's scale and bias so that its pre-activations have zero mean and unit variance on that batch.
  With `--supervised-only` the init batch is the labeled digits (at most 500), so the baseline sees no
  unlabeled image at all.
- Feature matching: features = output of the last hidden ReLU (before its noise layer), with D's noise on,
  computed on a fresh real batch and a fresh fake batch; loss = mean over the 250 features of the squared
  difference of the batch means.
- Optimiser: Adam, lr 0.003, β1 0.5, β2 0.999, batch 100, 300 epochs, constant learning rate. The MNIST script
  does not decay the learning rate (its CIFAR-10 and minibatch scripts do); so neither do we.
  Adam's ε: the official update is m̂ / sqrt(v̂ + 1e-8); torch.optim.Adam computes m̂ / (sqrt(v̂) + ε). We use
  ε = 1e-4 (`--adam-eps`): sqrt(v̂) + 1e-4 is within a factor √2 of sqrt(v̂ + 1e-8) at every gradient scale and
  equal in both limits, whereas torch's default 1e-8 would take full-size steps where gradients are tiny (measured
  on the 5k subset: sqrt(v̂) < 1e-4 for ~90% of G's second-layer weights, while D's are almost all above 1e-4).
- Test-time parameter averaging: the official MNIST script evaluates with an average of D's trainable parameters
  updated after every D step, avg ← avg + 0.0001 (θ - avg), i.e. an EMA with decay 0.9999 (`--ema-decay`).
  Departures: ours starts from the initialised weights instead of from zeros (the official zero start shrinks the
  average for the first ~10^4 steps and is equivalent afterwards), and it warms up (`--ema-warmup`, on by default):
  update t uses the decay min(0.9999, (1 + t)/(10 + t)) (TensorFlow's ExponentialMovingAverage num_updates form),
  so a run shorter than the time constant of 10,000 steps (about 17 epochs of full MNIST; 250 epochs of the
  4,000-digit subset) reports a trained D instead of the initial weights (measured without it: 82 % error after
  20 epochs on 4,000 digits, raw D ~20 %); from update 89,990 on the decay is 0.9999 itself, so long runs average
  as the official code. The raw D's test error is logged and summarised next to the EMA's.
- Top-k (`--topk`): the D update is unchanged; in the G update every fake of the batch is scored with D's
  realness logit lse(l) = log Z = logit of D(x) = Z/(Z+1) (higher = more real), and only the k highest-scored
  fakes enter G's loss: with feature matching the fake mean is the mean over those k; with
  `--no-feature-matching` the non-saturating loss softplus(-lse(l)) = -log D(G(z)) is averaged over those k.
  The real mean of feature matching keeps the whole real batch. k = max(mu, floor(batch · gamma^epoch)).
- Other tricks of the paper, all off by default as in the official MNIST script: `--minibatch-disc` inserts a
  minibatch-discrimination layer (`common.MinibatchDiscrimination`, 100 kernels of dimension 5, no
  data-dependent init) between the last hidden layer and the output layer (the official sample-quality MNIST
  script, `train_mnist_minibatch.py`, uses a convolutional D; we keep the permutation-invariant D so that the
  two variants differ by the trick only); with it, D's three batches (labeled, unlabeled, fake) go through D
  separately, as in the official code. `--hist-avg` adds λ·||θ - mean of past θ||² to G's and D's losses;
  `--label-smoothing s` changes the real-unlabeled target of the K+1 loss to 1 - s (one-sided); `--vbn`
  replaces G's batch norms by virtual batch norm with a fixed reference batch of noise.
- `--no-feature-matching` gives G the non-saturating loss -log D(G(z)).
- Checkpoints hold everything needed for an exact continuation (models, optimisers, EMA, historical averages,
  RNG states, position inside the epoch, the epoch's per-step losses); each epoch's data order is drawn from a
  generator seeded by (seed, epoch), so `--resume` reproduces the uninterrupted run on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

NUM_CLASSES = 10
Z_DIM = 100


def parse_args(argv=None):
    # common.ArgumentParser: argparse's own errors are one `error:` line too (the usage is for --help)
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # run
    p.add_argument("--exp-name", type=str, default=Path(__file__).stem, help="run folder prefix")
    p.add_argument("--seed", type=int, default=1, help="seed of python, numpy, torch (weights, noise, data order)")
    p.add_argument("--torch-deterministic", action=argparse.BooleanOptionalAction, default=False,
               help="CUDA only. Off (default, fastest): cuDNN autotuning and TF32 tensor cores for float32 "
               "products. On: deterministic cuDNN, no autotuning, full float32 (a GPU run repeats bit for bit). "
               "CPU runs are bit-reproducible either way")
    p.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N (auto = cuda if available)")
    p.add_argument("--out-dir", type=str, default="runs", help="parent folder of the run folder")
    p.add_argument("--track", action=argparse.BooleanOptionalAction, default=False,
                   help="also log to TensorBoard (needs the tensorboard package)")
    p.add_argument("--resume", type=str, default=None, help="runs/<run>/checkpoints/last.pt to continue")
    p.add_argument("--save-every", type=int, default=10, help="write checkpoints/last.pt every N epochs (and at the end)")
    p.add_argument("--eval-every", type=int, default=1, help="test error and sample grid every N epochs (and at the end)")
    # data
    p.add_argument("--dataset", choices=["mnist", "fake"], default="mnist",
                   help="mnist, or fake = random digits with random labels (smoke tests and benchmarks)")
    p.add_argument("--data-dir", type=str, default="data", help="folder holding MNIST/raw/*-ubyte (torchvision layout)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download MNIST into --data-dir when it is missing")
    p.add_argument("--fake-size", type=int, default=None,
                   help="number of fake training digits (--dataset fake only; default 1000; test set = N/6)")
    p.add_argument("--num-labels", type=int, default=100, help="labeled training digits, a multiple of 10 (balanced)")
    p.add_argument("--seed-data", type=int, default=1, help="seed choosing the labeled digits and the init batch")
    p.add_argument("--supervised-only", action=argparse.BooleanOptionalAction, default=False,
                   help="baseline: the same D trained with cross-entropy on the labeled digits alone, no G")
    # optimisation
    p.add_argument("--epochs", type=int, default=300, help="epochs of floor(N_train / batch) steps")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs, benchmarks)")
    p.add_argument("--batch-size", type=int, default=100, help="size of each of the labeled, unlabeled and fake batches")
    p.add_argument("--lr", type=common.finite_float, default=0.003, help="Adam learning rate of G and D (constant)")
    p.add_argument("--beta1", type=common.finite_float, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=common.finite_float, default=0.999, help="Adam beta2")
    p.add_argument("--adam-eps", type=common.finite_float, default=1e-4,
                   help="Adam epsilon, added to sqrt(v) (1e-4 ≈ the official 1e-8 inside the square root)")
    p.add_argument("--unlabeled-weight", type=common.finite_float, default=1.0,
                   help="weight w of the unlabeled K+1 loss in D's loss")
    p.add_argument("--ema-decay", type=common.finite_float, default=0.9999,
                   help="decay of the EMA of D's weights used for the test error")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA decay min(decay, (1+t)/(10+t)) at update t (TensorFlow's num_updates), so a short run's "
                        "EMA is not the initial weights; the same as without it from update 89,990 on (decay 0.9999)")
    p.add_argument("--init-size", type=int, default=500, help="training digits in the data-dependent init batch")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (fp16: CUDA only)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile G and D")
    p.add_argument("--check-host-sync", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA only, for tests: raise on any host synchronisation inside a training step (the first "
                        "two steps of a process and the logging/evaluation/checkpoint code are exempt)")
    # top-k
    p.add_argument("--topk", action=argparse.BooleanOptionalAction, default=False,
                   help="G learns from the k fakes with the highest realness logit logsumexp(l) only")
    p.add_argument("--mu", type=int, default=None, help="floor of k, in samples (default: half the batch); --topk only")
    p.add_argument("--gamma", type=common.finite_float, default=None,
                   help="k decay per epoch: k = max(mu, floor(B gamma^epoch)) "
                   "(default 0.99); --topk only")
    p.add_argument("--bottomk", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the k LOWEST-scored fakes instead (analysis only); needs --topk")
    # tricks
    p.add_argument("--feature-matching", action=argparse.BooleanOptionalAction, default=True,
                   help="G loss = squared distance of mean last-hidden features (off: non-saturating -log D(G(z)))")
    p.add_argument("--minibatch-disc", action=argparse.BooleanOptionalAction, default=False,
                   help="minibatch-discrimination layer before D's output layer")
    p.add_argument("--mbd-kernels", type=int, default=None, help="minibatch-discrimination kernels (default 100)")
    p.add_argument("--mbd-dim", type=int, default=None, help="minibatch-discrimination kernel dimension (default 5)")
    p.add_argument("--hist-avg", type=common.finite_float, default=0.0,
                   help="historical-averaging penalty weight on G and D (0 = off)")
    p.add_argument("--label-smoothing", type=common.finite_float, default=0.0,
                   help="one-sided: target of real unlabeled digits is 1 - value in the K+1 loss (0 = off)")
    p.add_argument("--vbn", action=argparse.BooleanOptionalAction, default=False,
                   help="virtual batch norm in G instead of batch norm (fixed reference batch)")
    args = p.parse_args(argv)
    args.exp_name = args.exp_name or Path(__file__).stem
    return args


def validate_args(args) -> None:
    """Raise common.UserError for impossible values and flags that make no sense together; resolve defaults."""
    E = common.UserError
    common.check_seed("--seed", args.seed)
    common.check_seed("--seed-data", args.seed_data)
    positive = {"epochs": args.epochs, "batch-size": args.batch_size, "eval-every": args.eval_every,
                "save-every": args.save_every, "init-size": args.init_size}
    for name, value in positive.items():
        if value < 1:
            raise E(f"--{name} must be at least 1, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        raise E(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.num_labels <= 0 or args.num_labels % NUM_CLASSES:
        raise E(f"--num-labels must be a positive multiple of {NUM_CLASSES} (balanced classes), got {args.num_labels}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise E(f"--lr must be positive, got {args.lr}")
    for name, b in (("beta1", args.beta1), ("beta2", args.beta2)):
        if not 0.0 <= b < 1.0:
            raise E(f"--{name} must be in [0, 1), got {b}")
    if not (args.adam_eps > 0 and math.isfinite(args.adam_eps)):
        raise E(f"--adam-eps must be positive, got {args.adam_eps}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise E(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not (args.unlabeled_weight >= 0 and math.isfinite(args.unlabeled_weight)):
        raise E(f"--unlabeled-weight must be >= 0, got {args.unlabeled_weight}")
    if not (args.hist_avg >= 0 and math.isfinite(args.hist_avg)):
        raise E(f"--hist-avg must be >= 0, got {args.hist_avg}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise E(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.dataset == "fake":
        args.fake_size = 1000 if args.fake_size is None else args.fake_size
        if args.fake_size < 1:
            raise E(f"--fake-size must be at least 1, got {args.fake_size}")
    elif args.fake_size is not None:
        raise E("--fake-size only applies to --dataset fake")
    if args.supervised_only:
        g_flags = [name for name, on in (("--topk", args.topk), ("--vbn", args.vbn), ("--minibatch-disc", args.minibatch_disc),
                                         ("--hist-avg", args.hist_avg > 0), ("--label-smoothing", args.label_smoothing > 0),
                                         ("--bottomk", args.bottomk), ("--mu", args.mu is not None),
                                         ("--gamma", args.gamma is not None)) if on]
        if g_flags:
            raise E(f"--supervised-only trains no generator: {', '.join(g_flags)} makes no sense with it")
    if not args.topk:
        for name, given in (("--mu", args.mu is not None), ("--gamma", args.gamma is not None), ("--bottomk", args.bottomk)):
            if given:
                raise E(f"{name} only applies with --topk")
    args.mu = args.batch_size // 2 if args.mu is None else args.mu
    args.gamma = 0.99 if args.gamma is None else args.gamma
    if args.topk:
        common.validate_topk(args.batch_size, args.mu, args.gamma)
    if not args.minibatch_disc and (args.mbd_kernels is not None or args.mbd_dim is not None):
        raise E("--mbd-kernels / --mbd-dim only apply with --minibatch-disc")
    args.mbd_kernels = 100 if args.mbd_kernels is None else args.mbd_kernels
    args.mbd_dim = 5 if args.mbd_dim is None else args.mbd_dim
    if args.mbd_kernels < 1 or args.mbd_dim < 1:
        raise E("--mbd-kernels and --mbd-dim must be at least 1")


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """z (B, 100) ~ U[0,1) → images (B, 784) in [0, 1]. Batch norm (shift only) or virtual batch norm, softplus."""

    def __init__(self, vbn: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(Z_DIM, 500, bias=False)
        self.fc2 = nn.Linear(500, 500, bias=False)
        self.norm1, self.norm2 = (self._norm(vbn) for _ in range(2))
        self.out = common.WNLinear(500, 28 * 28)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)  # Lasagne's default GlorotUniform
        nn.init.xavier_uniform_(self.out.v)
        self.out.initialized.fill_(True)  # no data-dependent init in the official G: g = 1, bias = 0

    @staticmethod
    def _norm(vbn: bool) -> nn.Module:
        norm = common.VirtualBatchNorm(500, eps=1e-6) if vbn else nn.BatchNorm1d(500, eps=1e-6, track_running_stats=False)
        norm.weight.requires_grad_(False)  # nn.batch_norm(g=None): learned shift, no scale
        return norm

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.softplus(self.norm1(self.fc1(z)))
        h = F.softplus(self.norm2(self.fc2(h)))
        return torch.sigmoid(self.out(h))


class Discriminator(nn.Module):
    """x (B, 784) in [0, 1] → (logits (B, 10), features (B, 250) of the last hidden layer)."""

    def __init__(self, minibatch_disc: bool = False, mbd_kernels: int = 100, mbd_dim: int = 5):
        super().__init__()
        widths = [28 * 28, 1000, 500, 250, 250, 250]
        self.input_noise = common.GaussianNoise(0.3)
        self.hidden = nn.ModuleList(common.WNLinear(i, o, init_std=0.1) for i, o in zip(widths[:-1], widths[1:]))
        for layer in self.hidden:
            layer.g.requires_grad_(False)  # official DenseLayer(train_scale=False): g fixed after the init
        self.noise = common.GaussianNoise(0.5)
        self.mbd = common.MinibatchDiscrimination(250, mbd_kernels, mbd_dim) if minibatch_disc else None
        self.out = common.WNLinear(250 + (mbd_kernels if minibatch_disc else 0), NUM_CLASSES, init_std=0.1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.input_noise(x)
        for layer in self.hidden:
            features = F.relu(layer(h))
            h = self.noise(features)
        if self.mbd is not None:
            h = self.mbd(h)
        return self.out(h), features


# ----------------------------------------------------------------------------------------------------------------
# Losses (module-level so tests can check them against direct computations)
# ----------------------------------------------------------------------------------------------------------------
def realness_logit(logits: torch.Tensor) -> torch.Tensor:
    """lse(l) = log Z: the logit of D(x) = Z/(Z+1). (B, 10) → (B,). The top-k score of a fake."""
    return torch.logsumexp(logits.float(), dim=1)


def labeled_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax over the 10 real classes: -l_y + lse(l)."""
    return F.cross_entropy(logits.float(), labels)


def kplus1_unlabeled_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """0.5 E_real[-log D(x)] + 0.5 E_fake[-log(1 - D(x))] with D(x) = Z/(Z+1), written stably with logsumexp:
    -log D = softplus(lse) - lse, -log(1 - D) = softplus(lse). With one-sided label smoothing s the real target
    is 1 - s: -(1-s) log D - s log(1 - D) = softplus(lse) - (1 - s) lse."""
    lse_real, lse_fake = realness_logit(logits_real), realness_logit(logits_fake)
    return 0.5 * (F.softplus(lse_real) - (1.0 - label_smoothing) * lse_real).mean() + 0.5 * F.softplus(lse_fake).mean()


def feature_matching_loss(features_real: torch.Tensor, features_fake: torch.Tensor) -> torch.Tensor:
    """Mean over features of (mean_batch f(x_fake) - mean_batch f(x_real))²."""
    return (features_fake.float().mean(0) - features_real.float().mean(0)).pow(2).mean()


def nonsaturating_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)) = softplus(-lse(l)), averaged over the batch."""
    return F.softplus(-realness_logit(logits_fake)).mean()


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def epoch_orders(seed: int, epoch: int, n_train: int, n_labeled: int, steps: int, batch: int):
    """The epoch's data order, from a generator seeded by (seed, epoch) so a resumed run draws the same:
    (labeled indices (steps·batch,) = the labeled set tiled in fresh orders, unlabeled order, second unlabeled
    order for feature matching)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    copies = -(-steps * batch // n_labeled)
    labeled = torch.cat([torch.randperm(n_labeled, generator=g) for _ in range(copies)])[: steps * batch]
    return labeled, torch.randperm(n_train, generator=g), torch.randperm(n_train, generator=g)


@torch.no_grad()
def count_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> int:
    """Number of misclassified digits (argmax over the 10 logits), model in eval mode (no noise). The count is
    accumulated on the device and read once (no host synchronisation per batch)."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, len(x), batch):
        logits, _ = model(x[i:i + batch])
        wrong += (logits.argmax(1) != y[i:i + batch]).sum()
    model.train(was_training)
    return int(wrong)


def load_data(args, device):
    """(train images (N, 784) float in [0,1], train labels, test images, test labels), all on `device`."""
    if args.dataset == "fake":
        (xtr, ytr), (xte, yte) = (common.fake_images(args.fake_size, (1, 28, 28), NUM_CLASSES, seed=0),
                                  common.fake_images(max(1, args.fake_size // 6), (1, 28, 28), NUM_CLASSES, seed=1))
    else:
        xtr, ytr = common.load_mnist(args.data_dir, train=True, download=args.download)
        xte, yte = common.load_mnist(args.data_dir, train=False, download=args.download)
    prep = lambda x: (x.reshape(len(x), -1).float() / 255.0).to(device)
    return prep(xtr), ytr.to(device), prep(xte), yte.to(device)


def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    device = common.pick_device(args.device)
    common.autocast(device, args.amp)  # rejects --amp fp16 on the CPU before anything is written
    if args.check_host_sync and device.type != "cuda":
        raise common.UserError("--check-host-sync needs a CUDA device")
    common.check_out_dir(args.out_dir, args.exp_name)
    # sizes whose memory cannot exist are refused here, naming their flags (lower bounds: the largest tensors)
    mbd = args.mbd_kernels * args.mbd_dim if args.minibatch_disc else 0

    def nets():  # built on the meta device by common.parameter_count: no memory
        return [Discriminator(args.minibatch_disc, args.mbd_kernels, args.mbd_dim), Generator(args.vbn)]

    common.check_fits(device, {
        "D and G (--mbd-kernels x --mbd-dim)": 4 * 5 * common.parameter_count(nets),  # + gradients, Adam, EMA
        "one training step (--batch-size; minibatch discrimination: --batch-size^2 x --mbd-kernels x --mbd-dim)":
            4 * 4 * args.batch_size * (784 + 1000 + 500 + 3 * 250) + 4 * 3 * args.batch_size ** 2 * mbd,
        "the fake data set (--fake-size)": 4 * 784 * 2 * (args.fake_size or 0),
    })
    resume_state = None
    if args.resume:
        resume_state = common.load_checkpoint(args.resume)
        common.check_resume_config(resume_state["args"], args)

    # seeding
    common.seed_everything(args.seed, args.torch_deterministic)

    # data: on the device once; batches are index tensors into it
    x_train, y_train, x_test, y_test = load_data(args, device)
    n_train, batch = len(x_train), args.batch_size
    if batch > n_train:
        raise common.UserError(f"--batch-size {batch} is larger than the training set ({n_train} digits)")
    lab_idx = common.balanced_label_indices(y_train.cpu(), args.num_labels, args.seed_data, NUM_CLASSES).to(device)
    x_lab, y_lab = x_train[lab_idx], y_train[lab_idx]
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)

    # models and optimisers
    D = Discriminator(args.minibatch_disc, args.mbd_kernels, args.mbd_dim).to(device)
    G = None if args.supervised_only else Generator(args.vbn).to(device)
    if resume_state is None:
        # data-dependent init of D's weight norm: one training-mode forward (noise on) on a data batch
        g_init = torch.Generator().manual_seed(args.seed_data)
        if args.supervised_only:
            x_init = x_lab[torch.randperm(len(x_lab), generator=g_init)[: args.init_size].to(device)]
        else:
            x_init = x_train[torch.randperm(n_train, generator=g_init)[: args.init_size].to(device)]
        with torch.no_grad():
            D.train()(x_init)
    d_params = [p for p in D.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # one multi-tensor kernel, and GradScaler.step without a host sync under fp16
    opt_d = torch.optim.Adam(d_params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused)
    # after the init, so the average starts from the initialised weights; the warm-up lets it follow D early on
    ema = common.EMA(D, args.ema_decay, warmup=args.ema_warmup)
    scaler_d = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    hist_d = common.HistoricalAverage(D) if args.hist_avg > 0 else None
    if G is not None:
        g_params = [p for p in G.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(g_params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused)
        scaler_g = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        hist_g = common.HistoricalAverage(G) if args.hist_avg > 0 else None
        fixed_z = torch.rand(100, Z_DIM, generator=torch.Generator().manual_seed(args.seed)).to(device)
        vbn_ref_z = torch.rand(batch, Z_DIM, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    d_fwd = torch.compile(D) if args.compile else D
    g_fwd = torch.compile(G) if args.compile and G is not None else G

    def generate(z):
        if args.vbn:
            common.vbn_reference_pass(G, vbn_ref_z)  # reference statistics, recomputed with the current weights
        return g_fwd(z)

    def d_logits(*xs):
        """D's logits of several batches: one concatenated forward (per-example noise, no batch coupling) unless
        minibatch discrimination couples the examples of a batch, then one forward per batch."""
        if D.mbd is not None:
            return [d_fwd(x)[0] for x in xs]
        return d_fwd(torch.cat(xs))[0].split([len(x) for x in xs])

    # resume: structure, shapes, step and finiteness checked before any of the checkpoint is applied
    step, epoch, start_batch, train_time = 0, 0, 0, 0.0
    step_losses = torch.zeros(steps_per_epoch, 4, device=device)  # loss_lab, loss_unl, loss_gen, train_err
    if resume_state is not None:
        s = resume_state
        common.check_checkpoint(args.resume, s, {"D": D, "ema": ema.module, **({"G": G} if G is not None else {})},
                                keys=("opt_d", "scaler_d", "epoch", "batch_in_epoch", "train_time", "ema_updates")
                                + (("opt_g", "scaler_g") if G is not None else ())
                                + (("hist_d", "hist_g") if hist_d is not None else ()),
                                tensors={"step_losses": (steps_per_epoch, 4)}, max_step=total_steps)
        with common.checkpoint_errors(args.resume):
            D.load_state_dict(s["D"]), common.load_optimizer_state(opt_d, s["opt_d"]), ema.load_state_dict(s["ema"])
            scaler_d.load_state_dict(s["scaler_d"])
            if G is not None:
                G.load_state_dict(s["G"]), common.load_optimizer_state(opt_g, s["opt_g"])
                scaler_g.load_state_dict(s["scaler_g"])
            if hist_d is not None:
                hist_d.load_state_dict(s["hist_d"]), hist_g.load_state_dict(s["hist_g"])
            step, epoch, start_batch = s["step"], int(s["epoch"]), int(s["batch_in_epoch"])
            train_time = float(s["train_time"])
            if step != epoch * steps_per_epoch + start_batch or not 0 <= start_batch < steps_per_epoch:
                raise ValueError(f"step {step} is not epoch {epoch} x {steps_per_epoch} steps + batch {start_batch}")
            ema.num_updates = int(s["ema_updates"])
            step_losses.copy_(s["step_losses"])
            common.set_rng_state(s["rng"])

    # the run folder, locked for this process (a second writer is refused, naming this one)
    run_dir = common.make_run_dir(args, resume_dir=Path(args.resume).parent.parent if args.resume else None)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    logger = common.MetricsLogger(run_dir, track=args.track)
    if resume_state is None:  # which training digits carry labels, so the split can be reused elsewhere
        common.write_json(run_dir / "labeled_indices.json", {"seed_data": args.seed_data, "indices": lab_idx.tolist()})
    else:
        logger.truncate_after(step)
        print(f"resumed from {args.resume} at step {step} (epoch {epoch}, batch {start_batch})", flush=True)
    print(f"run folder {run_dir} | device {device} | {n_train} train / {len(x_test)} test digits | "
          f"{args.num_labels} labels | {steps_per_epoch} steps per epoch", flush=True)

    def checkpoint():
        state = {"args": vars(args), "D": D.state_dict(), "opt_d": opt_d.state_dict(), "ema": ema.state_dict(),
                 "ema_updates": ema.num_updates, "scaler_d": scaler_d.state_dict(), "step": step, "epoch": epoch,
                 "batch_in_epoch": batch_in_epoch, "k": k, "train_time": train_time, "step_losses": step_losses.cpu(),
                 "rng": common.rng_state()}
        if G is not None:
            state.update(G=G.state_dict(), opt_g=opt_g.state_dict(), scaler_g=scaler_g.state_dict())
        if hist_d is not None:
            state.update(hist_d=hist_d.state_dict(), hist_g=hist_g.state_dict())
        common.save_checkpoint(ckpt_path, state)  # refuses non-finite weights: a saved checkpoint is a good one

    def evaluate(tag):
        err_ema, err_raw = count_errors(ema.module, x_test, y_test), count_errors(D, x_test, y_test)
        if G is not None:
            from torchvision.utils import save_image
            with torch.no_grad():
                save_image(generate(fixed_z).float().view(-1, 1, 28, 28), run_dir / "samples" / f"{tag}.png", nrow=10)
        n = len(x_test)
        return {"test_err_ema": err_ema, "test_err_ema_pct": 100.0 * err_ema / n,
                "test_err_raw": err_raw, "test_err_raw_pct": 100.0 * err_raw / n}

    def check_finite(rows: torch.Tensor, first_step: int) -> None:
        bad = ~torch.isfinite(rows).all(dim=1)
        if bool(bad.any()):
            at = first_step + int(bad.nonzero()[0]) + 1
            kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
            raise common.UserError(f"non-finite loss at step {at} (epoch {epoch + 1}); stopping, {kept}")

    # training loop
    progress = common.Progress(total_steps, start=step)
    last_record, batch_in_epoch, k = {}, start_batch, batch
    t_run = time.perf_counter()
    sync_check_from = step + 2 if args.check_host_sync else None  # first steps: compilation, lazy CUDA init
    stop = common.StopRequest()  # Ctrl-C: finish the step, save a checkpoint, print how to resume
    while epoch < args.epochs and step < total_steps:
        # ALGO LOGIC: top-k: k = max(mu, floor(B * gamma^epoch)) from the epoch counter (k = B without --topk)
        k = common.topk_k(batch, epoch, args.mu, args.gamma) if args.topk else batch
        order_lab, order_unl, order_unl2 = (o.to(device) for o in
                                           epoch_orders(args.seed, epoch, n_train, len(x_lab), steps_per_epoch, batch))
        if batch_in_epoch == 0:
            step_losses.zero_()
        first_batch = batch_in_epoch
        t_epoch = time.perf_counter()
        while batch_in_epoch < steps_per_epoch and step < total_steps:
            if sync_check_from is not None:
                common.check_host_sync(step >= sync_check_from)
            sl = slice(batch_in_epoch * batch, (batch_in_epoch + 1) * batch)
            xl, yl, xu = x_lab[order_lab[sl]], y_lab[order_lab[sl]], x_train[order_unl[sl]]

            # D step
            with common.autocast(device, args.amp):
                if G is None:
                    logits_lab = d_fwd(xl)[0]
                    loss_unl = torch.zeros((), device=device)
                else:
                    with torch.no_grad():
                        x_fake = generate(torch.rand(batch, Z_DIM, device=device))
                    logits_lab, logits_unl, logits_fake = d_logits(xl, xu, x_fake)
                    # ALGO LOGIC: K+1 classes: D(x) = Z/(Z+1), unlabeled real vs fake loss on lse(l)
                    loss_unl = kplus1_unlabeled_loss(logits_unl, logits_fake, args.label_smoothing)
                loss_lab = labeled_loss(logits_lab, yl)
                loss_d = loss_lab + args.unlabeled_weight * loss_unl
                if hist_d is not None:
                    loss_d = loss_d + args.hist_avg * hist_d.penalty(D)  # ALGO LOGIC: historical averaging
            opt_d.zero_grad(set_to_none=True)
            scaler_d.scale(loss_d).backward()
            scaler_d.step(opt_d)
            scaler_d.update()
            ema.update(D)  # ALGO LOGIC: EMA of D's weights, used for the test error
            if hist_d is not None:
                hist_d.update(D)
            train_err = (logits_lab.detach().argmax(1) != yl).float().mean()

            # G step
            loss_g = torch.zeros((), device=device)
            if G is not None:
                for p in d_params:
                    p.requires_grad_(False)
                with common.autocast(device, args.amp):
                    x_fake = generate(torch.rand(batch, Z_DIM, device=device))
                    logits_fake, feat_fake = d_fwd(x_fake)
                    # ALGO LOGIC: top-k: keep the k fakes with the highest (lowest: --bottomk) realness logit lse(l)
                    keep = common.select_topk(realness_logit(logits_fake), k, largest=not args.bottomk)
                    if args.feature_matching:
                        with torch.no_grad():
                            feat_real = d_fwd(x_train[order_unl2[sl]])[1]
                        # ALGO LOGIC: feature matching, fake mean over the kept fakes
                        loss_g = feature_matching_loss(feat_real, feat_fake[keep])
                    else:
                        loss_g = nonsaturating_generator_loss(logits_fake[keep])
                    loss_g_total = loss_g + args.hist_avg * hist_g.penalty(G) if hist_g is not None else loss_g
                opt_g.zero_grad(set_to_none=True)
                scaler_g.scale(loss_g_total).backward()
                scaler_g.step(opt_g)
                scaler_g.update()
                if hist_g is not None:
                    hist_g.update(G)
                for p in d_params:
                    p.requires_grad_(True)

            step_losses[batch_in_epoch] = torch.stack([loss_lab.detach(), loss_unl.detach(), loss_g.detach(), train_err]).float()
            batch_in_epoch += 1
            step += 1
            if sync_check_from is not None:
                common.check_host_sync(False)  # logging, evaluation and checkpoints read from the device
            if progress.due(step):
                progress.report(step, epoch=epoch + 1, k=k, **{k_: v for k_, v in last_record.items() if "pct" in k_})
            if stop:  # Ctrl-C: stop at this step boundary (below: checkpoint, one line saying how to continue)
                break

        # end of epoch (or of --max-steps)
        check_finite(step_losses[first_batch:batch_in_epoch], step - (batch_in_epoch - first_batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t_epoch
        train_time += epoch_time
        if batch_in_epoch < steps_per_epoch:  # stopped inside the epoch; the checkpoint keeps the position
            if stop:  # Ctrl-C (the epoch's per-step losses so far are in the checkpoint)
                checkpoint()
                raise common.interrupted(__file__, argv, step, ckpt_path)
            break  # --max-steps
        means = step_losses.mean(0).tolist()
        epoch += 1
        batch_in_epoch = 0
        record = {"step": step, "epoch": epoch, "k": k, "loss_lab": means[0], "loss_unl": means[1],
                  "loss_gen": means[2], "train_err": means[3], "epoch_time_s": epoch_time,
                  "it_s": (steps_per_epoch - first_batch) / max(epoch_time, 1e-9)}
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            record.update(evaluate(f"epoch_{epoch:04d}"))
        logger.log(record)
        last_record = record
        if epoch % args.save_every == 0 or epoch == args.epochs or stop:
            checkpoint()
        if stop:  # Ctrl-C at the last step of an epoch, after the epoch's log line and evaluation
            raise common.interrupted(__file__, argv, step, ckpt_path)
    stop.restore()

    # final evaluation and summary
    final = last_record if "test_err_ema" in last_record and batch_in_epoch == 0 else evaluate(f"step_{step:06d}")
    checkpoint()
    epoch_times = [r["epoch_time_s"] for r in _read_jsonl(run_dir / "metrics.jsonl")]
    summary = {"test_err_ema": final["test_err_ema"], "test_err_ema_pct": final["test_err_ema_pct"],
               "test_err_raw": final["test_err_raw"], "test_err_raw_pct": final["test_err_raw_pct"],
               "n_test": len(x_test), "n_train": n_train, "num_labels": args.num_labels, "seed": args.seed,
               "seed_data": args.seed_data, "supervised_only": args.supervised_only, "topk": args.topk,
               "epochs_done": epoch, "steps": step, "k": k, "train_time_s": train_time,
               "wall_time_s": time.perf_counter() - t_run,
               "mean_epoch_time_s": sum(epoch_times) / len(epoch_times) if epoch_times else None,
               "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "torch_threads": torch.get_num_threads()}
    common.write_json(run_dir / "summary.json", summary)
    logger.close()
    common.unlock_run_dir(run_dir)
    print(f"test error (EMA of D): {summary['test_err_ema']} / {len(x_test)} = {summary['test_err_ema_pct']:.2f}% | "
          f"raw D: {summary['test_err_raw']} = {summary['test_err_raw_pct']:.2f}% | {run_dir}", flush=True)
    return run_dir


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    common.run_cli(main)
