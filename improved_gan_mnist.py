"""Semi-supervised MNIST with a K+1-class GAN (Salimans et al. 2016, "Improved Techniques for Training GANs"), with
every trick of the paper and optional top-k generator updates (Sinha et al. 2020, "Top-k Training of GANs").

    python improved_gan_mnist.py --num-labels 100 --seed 1 --seed-data 1                    # the paper's setting
    python improved_gan_mnist.py --num-labels 100 --seed 1 --seed-data 1 --supervised-only  # same D, labels only
    python improved_gan_mnist.py --num-labels 100 --topk --mu 50 --gamma 0.99               # + top-k
    python improved_gan_mnist.py --minibatch-disc --no-feature-matching                     # sample-quality variant

Permutation-invariant MNIST: digits are 784-vectors in [0, 1]. D is a 10-class classifier whose logits l also tell
real from fake: D(x) = Z/(Z+1) with Z = sum_k exp(l_k) (the fake class has logit 0). D learns from the cross-entropy
of a labeled batch plus w * (0.5 E_real[-log D(x)] + 0.5 E_fake[-log(1 - D(G(z)))]); G learns by feature matching on
D's last hidden layer. G: z ~ U[0,1)^100 -> 500 -> 500 (batch norm with shift only, softplus) -> weight-normalised
784, sigmoid. D: Gaussian noise 0.3 on the input; five weight-normalised dense layers 1000-500-250-250-250, ReLU and
noise 0.5 after each; a weight-normalised layer to 10 logits; data-dependent init. Adam lr 0.003, beta1 0.5, batch
100, 300 epochs. The test error is measured with an EMA of D's weights, beside the raw D's. Paper, errors out of
10,000 test digits: 20 labels 1677 ± 452, 50 labels 221 ± 136, 100 labels 93 ± 6.5, 200 labels 90 ± 4.2.

Follows openai/improved-gan `mnist_svhn_cifar10/train_mnist_feature_matching.py`. Departures, each with its reason:
- Adam's epsilon is 1e-4 added to sqrt(v) (torch's form), not 1e-8 inside the square root: within a factor √2 of the
  official update at every gradient scale, where torch's 1e-8 would take full-size steps on tiny gradients (most of
  G's second-layer weights).
- The EMA of D starts from the initialised weights instead of zeros and warms up (`--ema-warmup`: decay
  min(0.9999, (1+t)/(10+t)) at update t), so a run shorter than its 10,000-step time constant reports a trained D;
  from update 89,990 on it is the official average.
- `--minibatch-disc` keeps this permutation-invariant D (the official sample-quality script has a convolutional one),
  so the two variants differ by the trick only.
Feature matching is FEATURE_MATCHING = "mean_squared", the official T.mean(T.square(m1 - m2)): the paper's squared L2
distance divided by the 250 features, the scale the official learning rate goes with. Top-k (`--topk`) scores a fake
by D's realness logit lse(l) = logit of D(x); G's loss averages over the k best-scored fakes (with feature matching:
the fake mean; the real mean keeps the whole batch). Data order, init, tricks, checkpoints: docs/improved_gan_mnist.md.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

NUM_CLASSES, Z_DIM = 10, 100
FEATURE_MATCHING = "mean_squared"  # common.feature_matching_loss form: the official MNIST code's (see the docstring)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_run_flags(p, __file__, save_every=10, unit="epochs")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["mnist", "fake"], default="mnist",
                   help="mnist, or fake = random digits with random labels (smoke tests and benchmarks)")
    g.add_argument("--data-dir", type=str, default="data", help="folder holding MNIST/raw/*-ubyte (torchvision layout)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download MNIST into --data-dir when it is missing")
    g.add_argument("--fake-size", type=int, default=None,
                   help="number of fake training digits (--dataset fake only; default 1000; test set = N/6)")
    g.add_argument("--num-labels", type=int, default=100, help="labeled training digits, a multiple of 10 (balanced)")
    g.add_argument("--seed-data", type=int, default=1, help="seed choosing the labeled digits and the init batch")
    g.add_argument("--supervised-only", action=argparse.BooleanOptionalAction, default=False,
                   help="baseline: the same D trained with cross-entropy on the labeled digits alone, no G")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=300, help="epochs of floor(N_train / batch) steps")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs, benchmarks)")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (also at the end)")
    g.add_argument("--batch-size", type=int, default=100, help="size of the labeled, unlabeled and fake batches")
    g.add_argument("--lr", type=common.finite_float, default=0.003, help="Adam learning rate of G and D (constant)")
    g.add_argument("--beta1", type=common.finite_float, default=0.5, help="Adam beta1")
    g.add_argument("--beta2", type=common.finite_float, default=0.999, help="Adam beta2")
    g.add_argument("--adam-eps", type=common.finite_float, default=1e-4,
                   help="Adam epsilon, added to sqrt(v) (1e-4 ≈ the official 1e-8 inside the square root)")
    g.add_argument("--unlabeled-weight", type=common.finite_float, default=1.0, help="weight w of D's K+1 loss")
    g.add_argument("--ema-decay", type=common.finite_float, default=0.9999, help="decay of the EMA of D (test error)")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA decay min(decay, (1+t)/(10+t)) at update t (TensorFlow's num_updates), so a short run's "
                        "EMA is not the initial weights; the same as without it from update 89,990 on (decay 0.9999)")
    g.add_argument("--init-size", type=int, default=500, help="training digits in the data-dependent init batch")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (fp16: CUDA only)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile G and D (static shapes)")
    common.add_topk_flags(p)
    g = p.add_argument_group("tricks (Salimans et al. 2016)")
    g.add_argument("--feature-matching", action=argparse.BooleanOptionalAction, default=True,
                   help="G loss = squared distance of mean last-hidden features (off: non-saturating -log D(G(z)))")
    common.add_mbd_flags(g, kernels=100, dim=5)
    g.add_argument("--hist-avg", type=common.finite_float, default=0.0,
                   help="historical-averaging penalty weight on G and D (0 = off)")
    g.add_argument("--label-smoothing", type=common.finite_float, default=0.0,
                   help="one-sided: target of real unlabeled digits is 1 - value in the K+1 loss (0 = off)")
    g.add_argument("--vbn", action=argparse.BooleanOptionalAction, default=False,
                   help="virtual batch norm in G instead of batch norm (fixed reference batch)")
    return p.parse_args(argv)


def validate_args(args) -> None:
    """Raise common.UserError for impossible values and flags that make no sense together; resolve defaults."""
    common.check_run_flags(args)
    common.check_seed("--seed-data", args.seed_data)
    if args.fake_size is not None and args.dataset != "fake":
        raise common.UserError("--fake-size only applies to --dataset fake")
    for name in ("epochs", "batch_size", "eval_every", "init_size", "max_steps", "fake_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.fake_size = 1000 if args.dataset == "fake" and args.fake_size is None else args.fake_size
    for flag, ok, need in (
            ("--num-labels", args.num_labels > 0 and args.num_labels % NUM_CLASSES == 0,
             f"a positive multiple of {NUM_CLASSES} (balanced classes)"),
            ("--lr", args.lr > 0, "positive"), ("--adam-eps", args.adam_eps > 0, "positive"),
            ("--beta1", 0 <= args.beta1 < 1, "in [0, 1)"), ("--beta2", 0 <= args.beta2 < 1, "in [0, 1)"),
            ("--ema-decay", 0 <= args.ema_decay < 1, "in [0, 1)"), ("--hist-avg", args.hist_avg >= 0, ">= 0"),
            ("--unlabeled-weight", args.unlabeled_weight >= 0, ">= 0"),
            ("--label-smoothing", 0 <= args.label_smoothing < 1, "in [0, 1)")):
        if not ok:
            raise common.UserError(f"{flag} must be {need}, got {getattr(args, flag[2:].replace('-', '_'))}")
    g_flags = {"--topk": args.topk, "--vbn": args.vbn, "--minibatch-disc": args.minibatch_disc,
               "--hist-avg": args.hist_avg > 0, "--label-smoothing": args.label_smoothing > 0}
    if args.supervised_only and any(g_flags.values()):
        given = ", ".join(flag for flag, on in g_flags.items() if on)
        raise common.UserError(f"--supervised-only trains no generator: {given} makes no sense with it")
    common.check_topk_flags(args, args.batch_size)  # --mu, --gamma, --bottomk only with --topk
    common.check_mbd_flags(args, kernels=100, dim=5)  # --mbd-kernels, --mbd-dim only with --minibatch-disc


# ---- Models ----------------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """z (B, 100) ~ U[0,1) → images (B, 784) in [0, 1]. Batch norm (shift only) or virtual batch norm, softplus."""

    def __init__(self, vbn: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(Z_DIM, 500, bias=False), nn.Linear(500, 500, bias=False)
        self.norm1, self.norm2 = (self._norm(vbn) for _ in range(2))
        self.out = common.WNLinear(500, 28 * 28)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)  # Lasagne's default GlorotUniform
        nn.init.xavier_uniform_(self.out.v)
        self.out.initialized.fill_(True)  # no data-dependent init in the official G: g = 1, bias = 0

    @staticmethod
    def _norm(vbn: bool) -> nn.Module:
        norm = (common.VirtualBatchNorm(500, eps=1e-6) if vbn
                else nn.BatchNorm1d(500, eps=1e-6, track_running_stats=False))  # batch statistics, also when sampling
        norm.weight.requires_grad_(False)  # nn.batch_norm(g=None): learned shift, no scale
        return norm

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.softplus(self.norm1(self.fc1(z)))
        h = F.softplus(self.norm2(self.fc2(h)))
        return torch.sigmoid(self.out(h))


class Discriminator(nn.Module):
    """x (B, 784) in [0, 1] → (logits (B, 10) in float32, features (B, 250) of the last hidden layer)."""

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
        # the output layer in float32 under autocast: top-k ranks these logits, and bf16 would make neighbours tie
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):  # (also on meta)
            return self.out(h.float()), features


# ---- Losses (module-level so tests can check them against direct computations) ---------------------------------------
def realness_logit(logits: torch.Tensor) -> torch.Tensor:
    """lse(l) = log Z: the logit of D(x) = Z/(Z+1). (B, 10) → (B,). The top-k score of a fake."""
    return torch.logsumexp(logits.float(), dim=1)


def labeled_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax over the 10 real classes: -l_y + lse(l)."""
    return F.cross_entropy(logits.float(), labels)


def kplus1_unlabeled_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, label_smoothing: float = 0.0):
    """0.5 E_real[-log D(x)] + 0.5 E_fake[-log(1 - D(x))] with D(x) = Z/(Z+1), written stably with logsumexp:
    -log D = softplus(lse) - lse, -log(1 - D) = softplus(lse). With one-sided label smoothing s the real target
    is 1 - s: -(1-s) log D - s log(1 - D) = softplus(lse) - (1 - s) lse."""
    lse_real, lse_fake = realness_logit(logits_real), realness_logit(logits_fake)
    return 0.5 * (F.softplus(lse_real) - (1.0 - label_smoothing) * lse_real).mean() + 0.5 * F.softplus(lse_fake).mean()


def nonsaturating_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)) = softplus(-lse(l)), averaged over the batch."""
    return F.softplus(-realness_logit(logits_fake)).mean()


# ---- Data, evaluation, the fit check and the training step -----------------------------------------------------------
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


def evaluate(m: SimpleNamespace, x_test, y_test, fixed_z, path) -> dict:
    """Test errors of the EMA of D and of D itself; G's samples of fixed_z as a 10 x 10 grid at `path`."""
    n = len(x_test)
    err_ema, err_raw = count_errors(m.ema.module, x_test, y_test), count_errors(m.D, x_test, y_test)
    if m.G is not None:
        from torchvision.utils import save_image
        with torch.no_grad():  # the eager G: a compiled one would compile again for this batch size
            save_image(generate(m.G, fixed_z, m.vbn_z).float().view(-1, 1, 28, 28), path, nrow=10)
    return {"test_err_ema": err_ema, "test_err_ema_pct": 100.0 * err_ema / n,
            "test_err_raw": err_raw, "test_err_raw_pct": 100.0 * err_raw / n}


def fit_step(args) -> list[nn.Module]:
    """For common.check_fits (meta device): the models and the forwards of one training step. The models run in eval
    mode (the weight-norm init reads a value, which meta tensors do not have)."""
    D = Discriminator(args.minibatch_disc, args.mbd_kernels, args.mbd_dim).eval()
    x = torch.rand(args.batch_size, 28 * 28)
    if args.supervised_only:
        D(x)
        return [D]
    G, z = Generator(args.vbn).eval(), torch.rand(args.batch_size, Z_DIM)
    fake = generate(G, z, z if args.vbn else None)
    d_logits(D, D, x, x, fake)
    D(fake), D(x)
    return [D, G]


def generate(G: nn.Module, z: torch.Tensor, vbn_z: torch.Tensor | None, fwd=None) -> torch.Tensor:
    """G(z) through `fwd` (the compiled G; default G itself); with --vbn the statistics of the fixed reference
    batch vbn_z are recomputed first, with the current weights."""
    if vbn_z is not None:
        common.vbn_reference_pass(G, vbn_z)
    return (fwd or G)(z)


def d_logits(D: nn.Module, fwd, *xs: torch.Tensor) -> list[torch.Tensor]:
    """D's logits of several batches: one forward of them concatenated (D's noise is per example), or with minibatch
    discrimination, which compares the examples of a batch, one forward per batch (as the official code)."""
    if D.mbd is not None:
        return [fwd(x)[0] for x in xs]
    return fwd(torch.cat(xs))[0].split([len(x) for x in xs])


def train_step(m: SimpleNamespace, args, xl, yl, xu, xr, k: int) -> dict[str, torch.Tensor]:
    """One D update, then one G update (none with --supervised-only). xl, yl: a labeled batch; xu: an unlabeled batch
    for D; xr: another for feature matching; k: how many fakes G learns from; m: the models, their optimizers, scalers
    and averages (built in main). Returns the step's losses and training error as device tensors (no host sync)."""
    B, device = len(xl), xl.device
    # (1) Update D: cross-entropy on the labeled batch + w * the K+1 real-vs-fake loss on the unlabeled and fake ones
    with common.autocast(device, args.amp):
        if m.G is None:
            logits_lab, loss_unl = m.d_fwd(xl)[0], torch.zeros((), device=device)
        else:
            with torch.no_grad():
                x_fake = generate(m.G, torch.rand(B, Z_DIM, device=device), m.vbn_z, m.g_fwd)
            logits_lab, logits_unl, logits_fake = d_logits(m.D, m.d_fwd, xl, xu, x_fake)
            # ALGO LOGIC: K+1 classes: D(x) = Z/(Z+1), the real-vs-fake loss on the realness logit lse(l)
            loss_unl = kplus1_unlabeled_loss(logits_unl, logits_fake, args.label_smoothing)
        loss_lab = labeled_loss(logits_lab, yl)
        loss_d = loss_lab + args.unlabeled_weight * loss_unl
        if m.hist_d is not None:
            loss_d = loss_d + args.hist_avg * m.hist_d.penalty(m.D)  # ALGO LOGIC: historical averaging
    m.opt_d.zero_grad(set_to_none=True)
    m.scaler_d.scale(loss_d).backward()
    m.scaler_d.step(m.opt_d)
    m.scaler_d.update()
    m.ema.update(m.D)  # ALGO LOGIC: EMA of D's weights, used for the test error
    if m.hist_d is not None:
        m.hist_d.update(m.D)
    out = {"loss_lab": loss_lab, "loss_unl": loss_unl, "loss_gen": torch.zeros((), device=device),
           "train_err": (logits_lab.detach().argmax(1) != yl).float().mean()}
    if m.G is None:
        return out

    # (2) Update G on the k fakes D finds most real, by feature matching (or the non-saturating loss)
    for p in m.d_params:
        p.requires_grad_(False)
    with common.autocast(device, args.amp):
        logits_fake, feat_fake = m.d_fwd(generate(m.G, torch.rand(B, Z_DIM, device=device), m.vbn_z, m.g_fwd))
        # ALGO LOGIC: top-k: keep the k fakes with the highest (--bottomk: lowest) realness logit lse(l)
        keep = common.select_topk(realness_logit(logits_fake), k, largest=not args.bottomk)
        if args.feature_matching:
            with torch.no_grad():
                feat_real = m.d_fwd(xr)[1]
            # ALGO LOGIC: feature matching: the fake mean over the kept fakes, the real mean over the whole batch
            loss_g = common.feature_matching_loss(feat_real, feat_fake[keep], FEATURE_MATCHING)
        else:
            loss_g = nonsaturating_generator_loss(logits_fake[keep])  # ALGO LOGIC: -log D(G(z)) over the kept fakes
        loss_g_total = loss_g + args.hist_avg * m.hist_g.penalty(m.G) if m.hist_g is not None else loss_g
    m.opt_g.zero_grad(set_to_none=True)
    m.scaler_g.scale(loss_g_total).backward()
    m.scaler_g.step(m.opt_g)
    m.scaler_g.update()
    if m.hist_g is not None:
        m.hist_g.update(m.G)
    for p in m.d_params:
        p.requires_grad_(True)
    out["loss_gen"] = loss_g
    return out


def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    device = common.pick_device(args.device, args.check_host_sync, args.amp)
    # sizes whose memory cannot exist are refused here, naming their flags (one step counted on the meta device)
    common.check_fits(device, "the models and one training step (--batch-size; --mbd-kernels x --mbd-dim)",
                      lambda: fit_step(args), {"the fake data set (--fake-size)": 4 * 784 * 2 * (args.fake_size or 0)})
    run = common.Run(args, allowed=("download",), argv=argv, script=__file__)  # loads and checks --resume
    common.seed_everything(args.seed, args.torch_deterministic)

    # data: on the device once; batches are index tensors into it
    x_train, y_train, x_test, y_test = load_data(args, device)
    n_train, B = len(x_train), args.batch_size
    if B > n_train:
        raise common.UserError(f"--batch-size {B} is larger than the training set ({n_train} digits)")
    lab_idx = common.balanced_label_indices(y_train.cpu(), args.num_labels, args.seed_data, NUM_CLASSES).to(device)
    x_lab, y_lab = x_train[lab_idx], y_train[lab_idx]
    steps_per_epoch = n_train // B
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or steps_per_epoch * args.epochs)
    if run.ckpt is not None and run.ckpt.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise common.UserError(f"--resume {args.resume}: made with {run.ckpt['steps_per_epoch']} steps per epoch, "
                               f"this data gives {steps_per_epoch} (another data set?)")

    # models, optimisers, averages
    D = Discriminator(args.minibatch_disc, args.mbd_kernels, args.mbd_dim).to(device)
    G = None if args.supervised_only else Generator(args.vbn).to(device)
    # data-dependent init of D's weight norm: one training-mode forward (noise on) of --init-size digits
    x_init = x_lab if args.supervised_only else x_train
    with torch.no_grad():
        D.train()(x_init[torch.randperm(len(x_init), generator=torch.Generator().manual_seed(args.seed_data))
                         [: args.init_size].to(device)])
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=device.type == "cuda")
    d_params, gan, hist = [p for p in D.parameters() if p.requires_grad], G is not None, args.hist_avg > 0
    m = SimpleNamespace(  # what train_step uses; the EMA and the averages start from the initialised weights
        D=D, G=G, d_params=d_params, ema=common.EMA(D, args.ema_decay, warmup=args.ema_warmup),
        opt_d=torch.optim.Adam(d_params, **adam),
        opt_g=torch.optim.Adam([p for p in G.parameters() if p.requires_grad], **adam) if gan else None,
        scaler_d=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
        scaler_g=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16") if gan else None,
        hist_d=common.HistoricalAverage(D) if hist else None,
        hist_g=common.HistoricalAverage(G) if hist and gan else None,
        vbn_z=(torch.rand(B, Z_DIM, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
               if args.vbn else None),  # the fixed reference batch of virtual batch norm
        # static shapes: D sees 3B and B digits a step (B only with minibatch discrimination), G B; samples: eager G
        d_fwd=torch.compile(D, dynamic=False) if args.compile else D,
        g_fwd=torch.compile(G, dynamic=False) if args.compile and gan else G)
    fixed_z = torch.rand(100, Z_DIM, generator=torch.Generator().manual_seed(args.seed)).to(device)  # sample grid

    # the run: what every checkpoint holds; a resume applies it here, then the folder is created (or reopened)
    run.register(D=D, G=G, ema=m.ema.module, opt_d=m.opt_d, opt_g=m.opt_g, scaler_d=m.scaler_d,
                 scaler_g=m.scaler_g, hist_d=m.hist_d, hist_g=m.hist_g)
    extra = run.start(total_steps, device, keys=("ema_updates", "steps_per_epoch"), rate=("images_per_s", B),
                      unit="step")  # images: the unlabeled digits D trains on, B a step
    m.ema.num_updates = int(extra.get("ema_updates", 0))
    if args.resume is None:  # which training digits carry labels, so the split can be reused elsewhere
        common.write_json(run.dir / "labeled_indices.json", {"seed_data": args.seed_data, "indices": lab_idx.tolist()})
    print(f"device {device} | {n_train} train / {len(x_test)} test digits | {args.num_labels} labels | "
          f"{steps_per_epoch} steps per epoch", flush=True)

    # training loop
    step, last_eval = run.step, {}
    sync_from = step + 2  # --check-host-sync: the first two steps of a process compile and initialise lazily
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        # ALGO LOGIC: top-k: k = max(mu, floor(B * gamma^epoch)) from the epoch counter (k = B without --topk)
        k = common.topk_k(B, epoch, args.mu, args.gamma) if args.topk else B
        if i == 0 or step == run.step:  # the epoch's data order (also that of the epoch a resume continues)
            lab, unl, unl2 = (o.to(device) for o in
                              epoch_orders(args.seed, epoch, n_train, len(x_lab), steps_per_epoch, B))
        if args.check_host_sync:
            common.check_host_sync(step >= sync_from)
        sl = slice(i * B, (i + 1) * B)
        run.add(**train_step(m, args, x_lab[lab[sl]], y_lab[lab[sl]], x_train[unl[sl]], x_train[unl2[sl]], k))
        step += 1
        if args.check_host_sync:
            common.check_host_sync(False)  # logging, evaluation and checkpoints read from the device

        epoch_end = step % steps_per_epoch == 0
        if epoch_end or step == total_steps or run.stop_requested:
            run.log_window(step, epoch=epoch + 1, k=k)  # one host sync: means, the non-finite check, progress
        if epoch_end and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            last_eval = {"step": step, **evaluate(m, x_test, y_test, fixed_z,
                                                  run.dir / "samples" / f"epoch_{epoch + 1:04d}.png")}
            run.log({"step": step, "epoch": epoch + 1, "k": k, **last_eval})
        if epoch_end and args.save_every and (epoch + 1) % args.save_every == 0 and step < total_steps:
            run.save(step, ema_updates=m.ema.num_updates, steps_per_epoch=steps_per_epoch)
        if run.stop_requested:  # Ctrl-C or SIGTERM: save here, print the command that continues the run
            run.interrupt(step, ema_updates=m.ema.num_updates, steps_per_epoch=steps_per_epoch)

    # final evaluation (unless the last epoch's is at this step), checkpoint and summary
    if last_eval.get("step") != step:
        last_eval = evaluate(m, x_test, y_test, fixed_z, run.dir / "samples" / f"step_{step:06d}.png")
    run.save(step, ema_updates=m.ema.num_updates, steps_per_epoch=steps_per_epoch)
    final = {key: last_eval[key] for key in ("test_err_ema", "test_err_ema_pct", "test_err_raw", "test_err_raw_pct")}
    run.finish({**final, "n_test": len(x_test), "n_train": n_train, "num_labels": args.num_labels, "seed": args.seed,
                "seed_data": args.seed_data, "supervised_only": args.supervised_only, "topk": args.topk,
                "epochs_done": step // steps_per_epoch, "steps": step, "k": k},
               line=f" | test error (EMA of D) {final['test_err_ema']} / {len(x_test)} = "
                    f"{final['test_err_ema_pct']:.2f}%, raw D {final['test_err_raw_pct']:.2f}%")
    return run.dir


if __name__ == "__main__":
    common.run_cli(main)
