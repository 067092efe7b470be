"""Semi-supervised CIFAR-10 and the minibatch-discrimination model of Improved GANs, with top-k generator updates.

Papers: Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016 (arXiv:1606.03498), table 3 (test
error with 1000-8000 labels) and table 2 (Inception Score); Sinha et al., "Top-k Training of GANs", NeurIPS 2020
(arXiv:2002.06224). Every detail, default and output file: docs/improved_gan_cifar.md.

    python improved_gan_cifar.py --model feature-matching --num-labels 4000            # table 3 (semi-supervised)
    python improved_gan_cifar.py --model minibatch-disc                                  # table 2 (sample quality)
    python improved_gan_cifar.py --model feature-matching --num-labels 4000 --topk       # with top-k
    python improved_gan_cifar.py --supervised-only --num-labels 4000                     # classifier baseline

The model (openai/improved-gan's train_cifar_*.py and nn.py): D is a (K+1)-class classifier, 10 logits l(x) and a
fake logit fixed at 0, so lse(l(x)) = logsumexp(l(x)) is the logit of "real": 9 weight-normalised convs, a mean pool,
[minibatch discrimination], dense 10. G: U[0,1)^100 noise, dense 4x4x512, three 5x5 deconvs, batch norm, tanh. D loss:
cross entropy on a labeled batch + 0.5 BCE(lse, real) on an unlabeled + 0.5 BCE(lse, fake) on a generated batch.
feature-matching: dropout 0.2 on D's input; G matches the batch means of D's pool features in openai's CIFAR form
(FM_FORM, the mean absolute difference the published numbers used; the paper writes a squared L2 distance).
minibatch-disc: noise 0.2 on D's input, 100 minibatch kernels, minimax G loss, 3 G steps, IS/FID. Top-k: the G loss
sees only the k fakes of highest lse(l(G(z))), k = max(mu, floor(B gamma^epoch)). Adam 3e-4, beta1 0.5, the lr
linear to 0 from epoch 800 to 1200; the test error is that of an average of D's parameters (decay 0.9999).

Departures from the official code (none changes the model or the losses):
  * the parameter average starts from the initialised weights and warms up (decay min(0.9999, (1+t)/(10+t))), so a
    short run reports a trained average; from update 89,990 on it is the official average up to 0.9999^t;
  * minibatch discrimination trains its tensor T directly, not openai's weight-normalised theta: the same function
    and initial values, another optimisation geometry;
  * Adam's epsilon sits outside the square root (PyTorch), so 1e-4 there approximates the official 1e-8 inside it;
  * the labeled examples are a balanced uniform draw (--seed-data), not the first count per class of a permutation.
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

MODELS = {"feature-matching": dict(feature_matching=True, minibatch_disc=False, input_dropout=0.2, input_noise=0.0,
                                   g_steps=1, fid=False),  # the defaults of each published configuration
          "minibatch-disc": dict(feature_matching=False, minibatch_disc=True, input_dropout=0.0, input_noise=0.2,
                                 g_steps=3, fid=True)}
AMP_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FM_FORM = "mean_abs"  # official CIFAR-10 code: T.mean(abs(m1 - m2)); the paper writes the squared L2 distance


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_run_flags(p, __file__, save_every=10, unit="epochs")
    BOA, num = argparse.BooleanOptionalAction, common.finite_float
    a = p.add_argument_group("data").add_argument
    a("--dataset", choices=["cifar10", "fake"], default="cifar10", help="fake: random images (tests)")
    a("--data-dir", default="data", help="folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz")
    a("--download", action=BOA, default=True, help="download CIFAR-10 when absent")
    a("--fake-size", type=int, default=None, help="images of --dataset fake (default 50000; test set: a fifth)")
    a("--num-labels", type=int, default=4000, help="labeled training examples, balanced over the 10 classes")
    a("--seed-data", type=int, default=1, help="seed choosing which training examples carry labels")
    a("--supervised-only", action=BOA, default=False, help="baseline: the classifier on the labeled examples only")
    a = (g := p.add_argument_group("model (--model sets the defaults of the flags marked *)")).add_argument
    a("--model", choices=sorted(MODELS), default="feature-matching", help="the model of table 3 or of table 2")
    a("--feature-matching", action=BOA, default=None, help="* G matches the batch means of D's pool features")
    a("--gen-loss", choices=["minimax", "non-saturating"], help="G loss without feature matching (default: minimax)")
    common.add_mbd_flags(g, kernels=100, dim=5)
    p.set_defaults(minibatch_disc=None)  # * as well: the --model preset decides when the flag is not given
    a("--input-dropout", type=num, default=None, help="* dropout rate on D's input")
    a("--input-noise", type=num, default=None, help="* std of Gaussian noise on D's input")
    a("--g-steps", type=int, default=None, help="* G updates per D update")
    a("--vbn", action=BOA, default=False, help="virtual batch norm in G instead of batch norm")
    a("--hist-avg", type=num, default=0.0, help="historical-averaging weight on G and D (0 = off)")
    a("--label-smoothing", type=num, default=0.0, help="one-sided: D's real target is 1 - value")
    a("--unlabeled-weight", type=num, default=1.0, help="weight of D's unsupervised loss")
    common.add_topk_flags(p)
    a = p.add_argument_group("optimisation and evaluation").add_argument
    a("--epochs", type=int, default=1200, help="training epochs (passes over the unlabeled set)")
    a("--max-steps", type=int, default=None, help="stop after N steps (one D update and its G updates)")
    a("--batch-size", type=int, default=100, help="labeled, unlabeled and generated images per step, each")
    a("--lr", type=num, default=3e-4, help="Adam learning rate of D and G")
    a("--beta1", type=num, default=0.5, help="Adam beta1")
    a("--adam-eps", type=num, default=1e-4, help="Adam epsilon (outside the square root)")
    a("--lr-decay-start", type=int, default=800, help="epoch from which the lr falls linearly to 0 at --epochs")
    a("--ema-decay", type=num, default=0.9999, help="decay of the average of D that the test error uses")
    a("--ema-warmup", action=BOA, default=True, help="decay min(decay, (1+t)/(10+t)) at the average's update t")
    a("--init-size", type=int, default=500, help="labeled images of D's data-dependent initialisation")
    a("--eval-every", type=int, default=1, help="epochs between test errors and sample grids (and at the end)")
    a("--log-every", type=int, default=100, help="steps between loss lines (and at each epoch's end)")
    a("--grid-size", type=int, default=100, help="samples in each grid PNG (fixed noise, one G batch)")
    a("--fid", action=BOA, default=None, help="* IS and FID of G's samples")
    a("--fid-every", type=int, default=100, help="epochs between IS/FID evaluations (and at the end)")
    a("--fid-samples", type=int, default=50000, help="generated images per IS/FID")
    a("--fid-weights", default=None, help="pytorch-fid Inception state-dict file (default: download it)")
    a("--fid-batch-size", type=int, default=250, help="images per Inception forward")
    a("--sample-bn", choices=["batch", "running"], default="batch", help="batch-norm statistics of G's samples")
    a("--amp", choices=sorted(AMP_DTYPES), default="off", help="mixed-precision autocast (fp16: CUDA only)")
    a("--compile", action=BOA, default=False, help="torch.compile D and G")
    a("--channels-last", action=BOA, default=False, help="channels_last memory format for the conv nets")
    return p.parse_args(argv)


def validate_args(args) -> None:
    """Refuse impossible values and combinations (common.UserError, one line); resolve the defaults left as None
    (the --model presets)."""
    E = common.UserError
    common.check_run_flags(args)
    common.check_seed("--seed-data", args.seed_data)
    no_g = {"--topk": args.topk, "--feature-matching": args.feature_matching, "--gen-loss": args.gen_loss,
            "--g-steps": args.g_steps is not None, "--vbn": args.vbn, "--fid": args.fid,
            "--label-smoothing": args.label_smoothing, "--unlabeled-weight": args.unlabeled_weight != 1}
    no_g = [flag for flag, given in no_g.items() if given and args.supervised_only]
    if no_g:
        raise E(f"{', '.join(no_g)} make(s) no sense with --supervised-only (no G)")
    for key, value in MODELS[args.model].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.feature_matching, args.fid = (False, False) if args.supervised_only else (args.feature_matching, args.fid)
    if args.gen_loss is not None and args.feature_matching:
        raise E("--gen-loss applies without feature matching; add --no-feature-matching")
    args.gen_loss = args.gen_loss or (None if args.feature_matching or args.supervised_only else "minimax")
    common.check_mbd_flags(args, kernels=100, dim=5)
    if args.num_labels <= 0 or args.num_labels % 10:
        raise E(f"--num-labels must be a positive multiple of 10 (balanced classes), got {args.num_labels}")
    if args.dataset != "fake" and args.fake_size is not None:
        raise E("--fake-size only applies with --dataset fake")
    args.fake_size = 50000 if args.dataset == "fake" and args.fake_size is None else args.fake_size
    if args.vbn and args.sample_bn == "running":
        raise E("--sample-bn running applies to G's batch norm; with --vbn G samples with its reference batch")
    at_least = dict(batch_size=2, grid_size=2, epochs=1, max_steps=1, eval_every=1, fid_every=1, log_every=1, g_steps=1,
                    init_size=2, fake_size=10, fid_batch_size=1, lr_decay_start=0, input_noise=0, hist_avg=0,
                    unlabeled_weight=0, fid_samples=10 if args.fid else -math.inf)  # batch norm: 2; IS: 10 splits
    for name, low in at_least.items():
        if getattr(args, name) is not None and not getattr(args, name) >= low:
            raise E(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    common.check_topk_flags(args, args.batch_size)
    for name in ("input_dropout", "label_smoothing", "ema_decay", "beta1"):
        if not 0 <= getattr(args, name) < 1:
            raise E(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if not (args.lr > 0 and args.adam_eps > 0):
        raise E("--lr and --adam-eps must be > 0")
    if args.fid_weights is not None and not (args.fid and Path(args.fid_weights).is_file()):
        raise E(f"--fid-weights {args.fid_weights}: " + ("no such file" if args.fid else "IS/FID are off (add --fid)"))


@torch.no_grad()
# ---- models ----------------------------------------------------------------------------------------------------------
def init_minibatch_disc(layer: common.MinibatchDiscrimination, h: torch.Tensor) -> None:
    """Official MinibatchLayer init on features h: mean nearest-neighbour L1 distance 2 per kernel, outputs mean 0."""
    kernels, dim, m = layer.kernels, layer.kernel_dim, (h @ layer.T).view(len(h), layer.kernels, layer.kernel_dim)
    l1 = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(3) + 1e6 * torch.eye(len(h), device=h.device).unsqueeze(2)  # j!=i
    scale = 0.5 * l1.min(dim=1).values.mean(0)  # (kernels,)
    layer.T.view(-1, kernels, dim).div_(scale.view(1, kernels, 1))
    layer.bias.copy_(-torch.exp(-l1 / scale).sum(1).mean(0))


class Discriminator(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> (10 class logits (B, 10), global-pool features (B, 192)), both float32 also
    under autocast (the minibatch layer's exp(-L1 distance) and the logits that top-k ranks need it)."""

    def __init__(self, input_dropout: float, input_noise: float, mbd_kernels: int = 0, mbd_dim: int = 5):
        super().__init__()
        conv, act = common.WNConv2d, lambda: nn.LeakyReLU(0.2)
        self.input_noise, self.input_dropout = common.GaussianNoise(input_noise), nn.Dropout(input_dropout)
        self.body = nn.Sequential(
            conv(3, 96, 3, 1, 1), act(), conv(96, 96, 3, 1, 1), act(), conv(96, 96, 3, 2, 1), act(), nn.Dropout(0.5),
            conv(96, 192, 3, 1, 1), act(), conv(192, 192, 3, 1, 1), act(), conv(192, 192, 3, 2, 1), act(),
            nn.Dropout(0.5), conv(192, 192, 3), act(), conv(192, 192, 1), act(), conv(192, 192, 1), act())  # 6x6, NIN
        for layer in (m for m in self.body if isinstance(m, conv)):  # official train_g=False: g only set by the init
            layer.g.requires_grad_(False)
        self.mbd = common.MinibatchDiscrimination(192, mbd_kernels, mbd_dim) if mbd_kernels else None
        self.out = common.WNLinear(192 + mbd_kernels, 10, init_scale=0.1)  # trained g, initial std 0.1

    def forward(self, x: torch.Tensor, groups: int = 1, init: bool = False):
        """`groups`: x holds that many equal-size batches, which the minibatch layer sees separately."""
        features = self.body(self.input_dropout(self.input_noise(x))).float().mean((2, 3))
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):  # (also on meta)
            if self.mbd is not None and init:
                init_minibatch_disc(self.mbd, features)
            h = features if self.mbd is None else torch.cat([self.mbd(part) for part in features.chunk(groups)])
            return self.out(h), features


class BatchNormShift(nn.Module):
    """Official nn.batch_norm(g=None): shift, no scale, batch statistics (running averages: eval mode of --sample-bn
    running, which keeps the official avg_batch_mean/var)."""

    def __init__(self, num_features: int, track_running_stats: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        for name, start in (("avg_batch_mean", 0.0), ("avg_batch_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), start) if track_running_stats else None)

    def forward(self, x):
        return F.batch_norm(x, self.avg_batch_mean, self.avg_batch_var, None, self.bias, momentum=0.1, eps=1e-6,
                            training=self.training or self.avg_batch_mean is None)


class Generator(nn.Module):
    """z (B, 100) ~ U[0, 1) -> images (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self, vbn: bool = False, z_dim: int = 100, running_stats: bool = False):
        super().__init__()
        norm = common.VirtualBatchNorm if vbn else lambda n: BatchNormShift(n, track_running_stats=running_stats)
        self.fc, self.norm0 = nn.Linear(z_dim, 4 * 4 * 512, bias=False), norm(4 * 4 * 512)  # BN per unit, officially
        self.up1, self.norm1 = nn.ConvTranspose2d(512, 256, 5, 2, padding=2, output_padding=1, bias=False), norm(256)
        self.up2, self.norm2 = nn.ConvTranspose2d(256, 128, 5, 2, padding=2, output_padding=1, bias=False), norm(128)
        self.out = common.WNConvTranspose2d(128, 3, 5, 2, padding=2, output_padding=1, init_scale=0.1)  # 16 -> 32
        for layer in (self.fc, self.up1, self.up2):
            nn.init.normal_(layer.weight, 0.0, 0.05)

    def forward(self, z):
        h = F.relu(self.norm1(self.up1(F.relu(self.norm0(self.fc(z))).view(-1, 512, 4, 4))))
        return torch.tanh(self.out(F.relu(self.norm2(self.up2(h)))))


def build_models(args):
    """D and G (None with --supervised-only) as the flags ask, D first (the order of their initial draws)."""
    return (Discriminator(args.input_dropout, args.input_noise, args.mbd_kernels if args.minibatch_disc else 0,
                          args.mbd_dim or 5),
            None if args.supervised_only else Generator(args.vbn, running_stats=args.sample_bn == "running"))


def generate(G, z, z_ref=None):
    """G(z); with virtual batch norm (z_ref given) the reference batch's statistics are recomputed first."""
    if z_ref is not None:
        common.vbn_reference_pass(G, z_ref)
    return G(z)


def fit_step(args):
    """D, G and one training step's forwards for common.check_fits (meta device; eval mode: no weight-norm init)."""
    D, G = build_models(args)
    z, real = torch.zeros(args.batch_size, 100), torch.zeros((1 if G is None else 2) * args.batch_size, 3, 32, 32)
    fake = [] if G is None else [generate(G.eval(), z, z if args.vbn else None)]
    D.eval()(torch.cat([real, *fake]), groups=1 if G is None else 3)
    return [D] if G is None else [D, G]


# ---- losses and the training step ------------------------------------------------------------------------------------
def unsupervised_loss(logits_real, logits_fake, label_smoothing: float = 0.0) -> torch.Tensor:
    """0.5 BCE(lse(l(x)), 1 - smoothing) + 0.5 BCE(lse(l(G(z))), 0) on the class logits (the fake class's is 0);
    without smoothing the official -0.5 mean(lse_unl) + 0.5 mean(softplus(lse_unl)) + 0.5 mean(softplus(lse_gen))."""
    real, fake = torch.logsumexp(logits_real, 1), torch.logsumexp(logits_fake, 1)
    return 0.5 * F.binary_cross_entropy_with_logits(real, torch.full_like(real, 1.0 - label_smoothing)) \
        + 0.5 * F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def adversarial_g_loss(score_fake, kind: str) -> torch.Tensor:
    """score = lse(l(G(z))): minimax mean log(1 - D(G(z))) (official loss_gen), non-saturating -mean log D(G(z))."""
    return -F.softplus(score_fake).mean() if kind == "minimax" else F.softplus(-score_fake).mean()


def train_step(args, n, x_lab, y_lab, x_unl, x_unl2, k: int, amp) -> dict:
    """One D update and --g-steps G updates of the nets in `n`; returns the losses as device scalars (no host sync)."""
    noise = functools.partial(torch.rand, len(x_lab), 100, device=x_lab.device)
    # (1) Update D: cross entropy on the labeled batch + real/fake on the unlabeled and a generated batch
    with amp():
        if n.G is None:  # --supervised-only: the labeled batch alone
            logits_lab = n.D_fwd(x_lab)[0]
        else:
            with torch.no_grad():
                x_fake = generate(n.G_fwd, noise(), n.z_ref)
            logits_lab, logits_unl, logits_fake = n.D_fwd(torch.cat([x_lab, x_unl, x_fake]), groups=3)[0].chunk(3)
    # ALGO LOGIC: (K+1)-class D -- lse(l(x)) is the realness logit of the unlabeled and the generated images
    loss_unl = unsupervised_loss(logits_unl, logits_fake, args.label_smoothing) if n.G is not None else \
        torch.zeros((), device=x_lab.device)
    loss_lab = F.cross_entropy(logits_lab, y_lab)
    loss_d = loss_lab + args.unlabeled_weight * loss_unl
    if n.hist_d is not None:  # ALGO LOGIC: historical averaging, ||theta - mean of the past thetas||^2
        loss_d = loss_d + args.hist_avg * n.hist_d.penalty(n.D)
    n.opt_d.zero_grad(set_to_none=True)
    n.scaler_d.scale(loss_d).backward()
    n.scaler_d.step(n.opt_d)
    n.scaler_d.update()
    n.ema.update(n.D)  # ALGO LOGIC: the average of D's parameters that the test error uses
    if n.hist_d is not None:
        n.hist_d.update(n.D)
    losses = {"loss_lab": loss_lab, "train_error": (logits_lab.detach().argmax(1) != y_lab).float().mean()}
    if n.G is None:
        return losses
    # (2) Update G, --g-steps times; no weight gradients of D there (a compiled D would compute them all)
    n.D.requires_grad_(False)
    for _ in range(args.g_steps):
        with amp():
            logits_fake, feat_fake = n.D_fwd(generate(n.G_fwd, noise(), n.z_ref))
        score = torch.logsumexp(logits_fake, 1)  # D's realness logit
        # ALGO LOGIC: top-k -- only the k fakes D scores highest (--bottomk: lowest) enter the G loss
        keep = common.select_topk(score, k, largest=not args.bottomk)
        if args.feature_matching:
            with torch.no_grad(), amp():
                feat_real = n.D_fwd(x_unl2)[1]
            # ALGO LOGIC: feature matching -- batch means of D's pool features, the fake mean over the k kept
            loss_g = common.feature_matching_loss(feat_real, feat_fake[keep], FM_FORM)
        else:
            loss_g = adversarial_g_loss(score[keep], args.gen_loss)
        if n.hist_g is not None:
            loss_g = loss_g + args.hist_avg * n.hist_g.penalty(n.G)
        n.opt_g.zero_grad(set_to_none=True)
        n.scaler_g.scale(loss_g).backward(inputs=n.g_params)
        n.scaler_g.step(n.opt_g)
        n.scaler_g.update()
        if n.hist_g is not None:
            n.hist_g.update(n.G)
    for p in n.d_params:
        p.requires_grad_(True)
    return {**losses, "loss_unl": loss_unl, "loss_gen": loss_g}


@torch.no_grad()
# ---- evaluation: sample grids, test error, FID / IS ------------------------------------------------------------------
def evaluate(args, n, test_x, test_y, prep, amp, step: int, run_dir, fid=None) -> dict:
    """Test errors of D's average (the paper's number) and of the raw D, in eval mode, in test-set order; the sample
    grid of the fixed noise; with `fid` = (inception, mu, sigma) IS and FID of G's samples (float32, drawn from a
    generator seeded by (seed, step), so evaluation leaves the training randomness alone)."""
    result, B = {}, args.batch_size
    for key, model in (("test_error", n.ema.module), ("test_error_raw", n.D)):
        was_training, wrong = model.training, torch.zeros((), dtype=torch.long, device=test_y.device)
        for i in range(0, len(test_x), B):
            with amp():
                wrong += (model.eval()(prep(test_x[i: i + B]))[0].argmax(1) != test_y[i: i + B]).sum()
        result[key] = int(wrong) / len(test_x)  # summed on the device, read once
        model.train(was_training)
    if n.G is None:
        return result
    from torchvision.utils import save_image
    n.G.train(args.sample_bn == "batch")  # eval mode: the running averages of --sample-bn running
    grid = generate(n.G, n.z_fixed, n.z_ref).float()
    save_image(grid * 0.5 + 0.5, run_dir / "samples" / f"step_{step:08d}.png", nrow=math.ceil(math.sqrt(len(grid))))
    if fid is not None:
        import metrics
        g = torch.Generator(device=n.z_fixed.device).manual_seed(args.seed + step)
        sample = lambda m: torch.cat([generate(n.G, torch.rand(min(B, m - i), 100, device=g.device,  # noqa: E731
                                                             generator=g), n.z_ref).float() for i in range(0, m, B)])
        result.update(metrics.evaluate_generator(sample, args.fid_samples, fid[1], fid[2], fid[0],  # fid, is_*
                                                 batch_size=args.fid_batch_size, device=g.device))
    n.G.train()
    return result


# ---- main ------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    device = common.pick_device(args.device, args.check_host_sync, args.amp)
    amp = functools.partial(common.autocast, device, args.amp)
    # sizes whose memory cannot exist are refused here, naming their flags, before anything is written
    needs = {"--dataset fake (--fake-size)": 6144 * (args.fake_size or 0), "IS/FID (--fid-batch-size, --fid-samples)":
             4 * (9 * 299 * 299 * args.fid_batch_size + 1008 * args.fid_samples) if args.fid else 0}
    common.check_fits(device, "D, G and one training step (--batch-size, --mbd-kernels, --mbd-dim)",
                      functools.partial(fit_step, args), needs)
    run = common.Run(args, allowed=("fid", "fid_every", "fid_samples", "fid_batch_size", "grid_size", "channels_last",
                                    "download"), argv=argv, script=__file__)
    common.seed_everything(args.seed, args.torch_deterministic)
    # data: uint8 tensors on the device; the labeled examples balanced over classes, chosen by --seed-data
    (train_x, train_y), (test_x, test_y) = [
        common.load_cifar10(args.data_dir, train=train, download=args.download) if args.dataset == "cifar10" else
        common.fake_images(args.fake_size if train else max(args.fake_size // 5, 10), (3, 32, 32), seed=int(not train))
        for train in (True, False)]
    lab_idx = common.balanced_label_indices(train_y, args.num_labels, args.seed_data)
    n_unl, n_lab, B = len(train_x), len(lab_idx), args.batch_size
    steps_per_epoch = n_unl // B  # one epoch = one pass over the unlabeled set
    if steps_per_epoch < 1:
        raise common.UserError(f"--batch-size {B} is larger than the training set ({n_unl} images)")
    total, fid = min(args.epochs * steps_per_epoch, args.max_steps or math.inf), None
    if args.fid:  # Inception and its reference statistics before the run folder: offline errors leave nothing
        import metrics
        inception = metrics.load_inception(args.fid_weights, device=device)
        fid = (inception, *metrics.training_set_statistics(train_x, inception, args.data_dir, args.dataset,
                                                           args.fid_weights, args.fid_batch_size, device))
    train_x, train_y, test_x, test_y, lab_idx = (t.to(device) for t in (train_x, train_y, test_x, test_y, lab_idx))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def prep(x_uint8, dtype=AMP_DTYPES[args.amp]):  # the autocast dtype: real and fake batches reach D in one dtype
        return ((x_uint8.float() - 127.5) / 128.0).to(dtype).contiguous(memory_format=fmt)  # exact in bf16/fp16

    def epoch_order(epoch: int):
        """Seeded by (seed, epoch): the labeled set tiled and permuted per copy, two unlabeled orders (trainx_unl2)."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, epoch]).generate_state(1)[0]))
        lab = torch.cat([torch.randperm(n_lab, generator=g) for _ in range(math.ceil(n_unl / n_lab))])
        return lab_idx[lab.to(device)], *(torch.randperm(n_unl, generator=g).to(device) for _ in range(2))
    # models, the data-dependent initialisation (official init_param(trainx[:500]), and a noise batch through G)
    D, G = (m if m is None else m.to(device, memory_format=fmt) for m in build_models(args))
    z_gen = torch.Generator().manual_seed(args.seed + 7)  # fixed noise: the VBN reference batch, the sample grids
    z_ref, z_fixed = (torch.rand(size, 100, generator=z_gen).to(device) for size in (B, args.grid_size))
    z_ref = z_ref if args.vbn else None
    if args.resume is None:
        with torch.no_grad():
            D.train()(prep(train_x[epoch_order(0)[0][: args.init_size]], torch.float32), init=True)
            if G is not None:
                generate(G.train(), torch.rand(B, 100, device=device), z_ref)
    # optimisers and averages (fused Adam on CUDA: one kernel, and no host sync in GradScaler.step under fp16)
    adam = functools.partial(torch.optim.Adam, lr=args.lr, betas=(args.beta1, 0.999), eps=args.adam_eps,
                             fused=device.type == "cuda")
    scaler = functools.partial(torch.amp.GradScaler, device.type, enabled=args.amp == "fp16")
    hist = lambda model: common.HistoricalAverage(model) if args.hist_avg else None  # noqa: E731
    n = SimpleNamespace(D=D, G=G, D_fwd=torch.compile(D) if args.compile else D, z_ref=z_ref, z_fixed=z_fixed,
                        G_fwd=torch.compile(G) if args.compile and G is not None else G,
                        ema=common.EMA(D, args.ema_decay, warmup=args.ema_warmup), hist_d=hist(D),
                        d_params=[p for p in D.parameters() if p.requires_grad], scaler_d=scaler())
    n.opt_d, n.g_params = adam(n.d_params), [] if G is None else list(G.parameters())
    n.opt_g, n.scaler_g, n.hist_g = (None,) * 3 if G is None else (adam(n.g_params), scaler(), hist(G))
    # what every checkpoint holds; a resume restores it here, with the step, the RNG states and `extra`
    run.register(D=D, G=G, ema=n.ema.module, opt_d=n.opt_d, opt_g=n.opt_g, scaler_d=n.scaler_d, scaler_g=n.scaler_g,
                 hist_d=n.hist_d, hist_g=n.hist_g)
    extra = run.start(total, device, keys=("ema_updates", "k"), unit="step")
    n.ema.num_updates, k, step, order, result = extra.get("ema_updates", 0), extra.get("k", B), run.step, None, None
    while step < total:
        epoch, t = divmod(step, steps_per_epoch)
        # ALGO LOGIC: top-k -- k = max(mu, floor(B gamma^epoch)) fakes per G update, from the epoch counter
        k = common.topk_k(B, epoch, args.mu, args.gamma) if args.topk else B
        # ALGO LOGIC: official lr * min(3 - epoch / 400, 1): constant to --lr-decay-start, then linear to 0
        lr = args.lr * min(1.0, (args.epochs - epoch) / max(args.epochs - args.lr_decay_start, 1))
        for group in [*n.opt_d.param_groups, *(n.opt_g.param_groups if G is not None else [])]:
            group["lr"] = lr
        order = epoch_order(epoch) if order is None or t == 0 else order
        lab, unl, unl2 = (stream[t * B: (t + 1) * B] for stream in order)
        if args.check_host_sync:
            common.check_host_sync(step >= run.step + 2)  # the first two steps compile and initialise lazily
        losses = train_step(args, n, prep(train_x[lab]), train_y[lab], prep(train_x[unl]), prep(train_x[unl2]), k, amp)
        if args.check_host_sync:
            common.check_host_sync(False)  # logging, evaluation and checkpoints read from the device
        run.add(**losses)
        step += 1
        epoch_end, epochs_done = step % steps_per_epoch == 0, step // steps_per_epoch
        fields = {"epoch": step / steps_per_epoch, "k": k}
        if step % args.log_every == 0 or epoch_end or step == total:
            run.log_window(step, **fields, lr=lr)
        if step == total or (epoch_end and epochs_done % args.eval_every == 0):
            with_fid = step == total or (epoch_end and epochs_done % args.fid_every == 0)
            result = evaluate(args, n, test_x, test_y, prep, amp, step, run.dir, fid if with_fid else None)
            run.log({"step": step, **fields, **result})
        if step == total or (epoch_end and args.save_every and epochs_done % args.save_every == 0):
            run.save(step, ema_updates=n.ema.num_updates, k=k)
        if run.stop_requested:  # Ctrl-C or SIGTERM: a checkpoint at this step boundary, and how to continue
            run.log_window(step, **fields, lr=lr)
            run.interrupt(step, ema_updates=n.ema.num_updates, k=k)

    result = result or evaluate(args, n, test_x, test_y, prep, amp, step, run.dir, fid)  # resumed at a finished end
    run.finish({"step": step, "epochs": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                "model": args.model, "supervised_only": args.supervised_only, "num_labels": n_lab, "k": k, **result},
               line=" | " + " ".join(f"{key}={v:.4g}" for key, v in result.items()))


if __name__ == "__main__":
    common.run_cli(main)
