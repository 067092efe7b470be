"""Top-k GAN training on a 2-D mixture of Gaussians (Table 1 and Figure 2 of the top-k paper).

Papers: S. Sinha, Z. Zhao, A. Goyal, C. Raffel, A. Odena, "Top-k Training of GANs: Improving GAN Performance by
Throwing Away Bad Samples", NeurIPS 2020 (arXiv:2002.06224); the optional techniques: T. Salimans et al., "Improved
Techniques for Training GANs", NeurIPS 2016 (arXiv:1606.03498).

    python mog_topk.py --n-modes 25 --topk               # Table 1's 25-mode top-k cell (about 20 min on one CPU core)
    python mog_topk.py --n-modes 25 --topk --setup base  # the same cell in the setup used before the study
    python mog_topk.py --n-modes 64 --topk --feature-matching --minibatch-disc   # every technique combines with top-k

Model. --n-modes Gaussians (std 0.05) on a square grid, a fresh batch drawn on the device every step. G: z (2-D
normal) -> --hidden-layers x (Linear 256, ReLU) -> Linear 2; D: the same trunk -> [minibatch discrimination] -> Linear
1 (a logit). Non-saturating loss, Adam lr 1e-4, batch B = 256, one D then one G step per iteration, 50k iterations.
Top-k leaves the D step unchanged; G learns only from the k fakes D scores highest, k = max(mu, floor(B gamma^epoch)),
epoch = iteration // --iters-per-epoch. --setup (default `all`, chosen by a pre-registered study) fixes what the paper
leaves open: grid spacing, depth, Adam betas, k schedule. Evaluation: 10,000 samples of fixed latents, % within 4
sigma of a mode (high quality), % modes recovered, reverse KL.

Departures from the paper and the reference code, and why:
  * "4-layer MLP" reads as 4 hidden layers (setup all) as in the JAX reproduction romina-a/JAX-GAN, which trains
    100k iterations (50k here, the paper's); setup base reads 4 linear layers (3 hidden).
  * Feature matching is openai/improved-gan's MNIST form (FEATURE_MATCHING): the mean over D's 256 features of the
    squared difference of mean features, not their sum (the paper's squared L2 norm); the reference code's choice,
    which all results of this script use.
  * The G step draws fresh latents (Goodfellow et al. 2014, Algorithm 1) rather than reusing the D step's fakes.
  * For speed, same maths: without minibatch discrimination D sees cat(real, fake) in one forward; without an
    autograd-only technique FastStep back-propagates the MLPs by hand (autograd's values to float rounding).
  * On CUDA float32 products use TF32 unless --torch-deterministic: CUDA numbers are not the CPU Table 1's.
Setups, evaluation, speed, outputs: docs/mog_topk.md; the study: docs/mog_study.md.
"""

import argparse
import math

import numpy as np
from PIL import Image, ImageDraw
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import metrics

# The setups of the MoG setup study (docs/mog_study.md); the k schedule (mu_fraction: k's floor / B) needs --topk.
SETUPS = {
    "base": dict(grid_spacing=2.0, hidden_layers=3, beta1=0.5, beta2=0.999, iters_per_epoch=500, mu_fraction=0.5),
    "spacing1": dict(grid_spacing=1.0, hidden_layers=3, beta1=0.5, beta2=0.999, iters_per_epoch=500, mu_fraction=0.5),
    "depth4": dict(grid_spacing=2.0, hidden_layers=4, beta1=0.5, beta2=0.999, iters_per_epoch=500, mu_fraction=0.5),
    "slowk": dict(grid_spacing=2.0, hidden_layers=3, beta1=0.5, beta2=0.999, iters_per_epoch=2000, mu_fraction=0.75),
    "betas": dict(grid_spacing=2.0, hidden_layers=3, beta1=0.9, beta2=0.99, iters_per_epoch=500, mu_fraction=0.5),
    "all": dict(grid_spacing=1.0, hidden_layers=4, beta1=0.9, beta2=0.99, iters_per_epoch=2000, mu_fraction=0.75),
}
DEFAULT_SETUP = "all"  # chosen by the study's pre-registered rule (docs/mog_study.md, "MoG setup study")
FEATURE_MATCHING = "mean_squared"  # common.feature_matching_loss form: openai/improved-gan's MNIST code
MBD_KERNELS, MBD_DIM = 100, 5


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_run_flags(p, __file__, save_every=5000, unit="iterations")
    g = p.add_argument_group("experiment")
    g.add_argument("--setup", type=str, default=DEFAULT_SETUP, choices=sorted(SETUPS), help="study setup: gives "
                   "--grid-spacing, --hidden-layers, --beta1, --beta2 and, with --topk, --iters-per-epoch, --mu")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, OMP_NUM_THREADS)")
    g.add_argument("--fast-step", action=argparse.BooleanOptionalAction, default=True,
                   help="hand-written back-propagation (FastStep) where no technique needs autograd")
    g.add_argument("--n-modes", type=int, default=25, help="number of Gaussians, a perfect square (25, 64, 100)")
    g.add_argument("--grid-spacing", type=common.finite_float, default=None, help="centre spacing (default: --setup)")
    g.add_argument("--std", type=common.finite_float, default=0.05, help="standard deviation of every Gaussian")
    g.add_argument("--latent-dim", type=int, default=2, help="dimension of G's input noise z ~ N(0, I)")
    g.add_argument("--hidden-dim", type=int, default=256, help="units of every hidden layer of G and D")
    g.add_argument("--hidden-layers", type=int, default=None, help="hidden layers of G and D (default: the --setup's)")
    g.add_argument("--batch-size", type=int, default=256, help="real and fake samples per step")
    g.add_argument("--iterations", type=int, default=50000, help="training iterations (one D and one G step each)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations (a complete run)")
    g.add_argument("--lr-g", type=common.finite_float, default=1e-4, help="Adam learning rate of G")
    g.add_argument("--lr-d", type=common.finite_float, default=1e-4, help="Adam learning rate of D")
    g.add_argument("--beta1", type=common.finite_float, default=None, help="Adam beta1 (default: the --setup's)")
    g.add_argument("--beta2", type=common.finite_float, default=None, help="Adam beta2 (default: the --setup's)")
    t = common.add_topk_flags(p, mu_default="the --setup's fraction of the batch")
    t.add_argument("--iters-per-epoch", type=int, default=None,
                   help="iterations per epoch of the k schedule (default: the --setup's; needs --topk)")
    i = p.add_argument_group("Improved-GAN techniques (Salimans et al. 2016)")
    i.add_argument("--feature-matching", action=argparse.BooleanOptionalAction, default=False,
                   help="G loss: mean squared difference of the mean D features (last hidden layer) of real and fake")
    common.add_mbd_flags(i, MBD_KERNELS, MBD_DIM)
    i.add_argument("--hist-avg", type=common.finite_float, default=0.0, help="historical averaging weight (0 = off)")
    i.add_argument("--label-smoothing", type=common.finite_float, default=0.0, help="one-sided: real target 1 - value")
    i.add_argument("--vbn", action=argparse.BooleanOptionalAction, default=False, help="virtual batch norm in G")
    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--eval-every", type=int, default=5000, help="iterations between evaluations (and at the end)")
    e.add_argument("--eval-samples", type=int, default=10000, help="samples per evaluation")
    e.add_argument("--log-every", type=int, default=500, help="iterations between loss lines in metrics.jsonl")
    e.add_argument("--keep-checkpoints", action=argparse.BooleanOptionalAction, default=False,
                   help="also keep checkpoints/step_NNNNNNN.pt at every --save-every (for the Figure 2 analysis)")
    args = p.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args) -> None:
    """Every check that needs no file (one-line UserError, nothing written yet); fills None flags from --setup."""
    common.check_run_flags(args)
    setup = SETUPS[args.setup]
    for name in ("grid_spacing", "hidden_layers", "beta1", "beta2") + (("iters_per_epoch",) if args.topk else ()):
        setattr(args, name, setup[name] if getattr(args, name) is None else getattr(args, name))
    side, tiny, big = math.isqrt(max(args.n_modes, 0)), float(np.finfo("f4").tiny), float(np.finfo("f4").max)
    for name, ok, what in [  # (the data are float32)
            *[(name, getattr(args, name) is None or getattr(args, name) >= 1, "a positive integer") for name in (
                "latent_dim", "hidden_dim", "hidden_layers", "batch_size", "iterations", "max_steps", "eval_every",
                "eval_samples", "log_every", "iters_per_epoch")],
            ("n_modes", args.n_modes >= 1 and side * side == args.n_modes, "a perfect square (25, 64, 100, ...)"),
            ("std", tiny <= args.std <= big, f"a positive float32 number, {tiny:.2g} to {big:.2g}"),
            ("grid_spacing", tiny <= args.grid_spacing <= big, f"a positive float32 number, {tiny:.2g} to {big:.2g}"),
            ("lr_g", args.lr_g > 0, "positive"), ("lr_d", args.lr_d > 0, "positive"),
            ("hist_avg", args.hist_avg >= 0, ">= 0"), ("threads", args.threads >= 0, ">= 0"),
            ("beta1", 0 <= args.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= args.beta2 < 1, "in [0, 1)"),
            ("label_smoothing", 0 <= args.label_smoothing < 1, "in [0, 1)"),
            ("batch_size", args.batch_size >= 2 or not args.minibatch_disc, ">= 2 with --minibatch-disc")]:
        if not ok:
            raise common.UserError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    reach = args.grid_spacing * (side - 1) / 2 + 10 * args.std  # farthest sample from the origin, roughly
    if not 2 * (2 * reach) * (2 * reach) <= big:
        raise common.UserError(f"--grid-spacing {args.grid_spacing:g} and --std {args.std:g} put samples up to "
                               f"{reach:.3g} from the origin: their squared distances overflow float32")
    common.check_topk_flags(args, args.batch_size, mu=max(1, int(args.batch_size * setup["mu_fraction"])),
                            extra=("iters_per_epoch",))
    common.check_mbd_flags(args, MBD_KERNELS, MBD_DIM)
    if not args.topk:  # unused settings take base's values, as the study runs' args.json (those folders match)
        args.mu, args.gamma, args.iters_per_epoch = max(1, args.batch_size // 2), 0.99, 500
    if not args.minibatch_disc:
        args.mbd_kernels, args.mbd_dim = MBD_KERNELS, MBD_DIM


class Generator(nn.Module):
    """z (B, latent_dim) -> x (B, 2): `hidden_layers` x (Linear, [VirtualBatchNorm], ReLU), then a linear layer."""

    def __init__(self, latent_dim: int, hidden: int, vbn: bool = False, hidden_layers: int = 3):
        super().__init__()
        layers, width = [], latent_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden)] + ([common.VirtualBatchNorm(hidden)] if vbn else []) + [nn.ReLU()]
            width = hidden
        self.net, self.vbn = nn.Sequential(*layers, nn.Linear(hidden, 2)), vbn
        self.register_buffer("z_ref", torch.zeros(0, latent_dim))  # VBN reference latents (set by main)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.vbn:  # reference statistics from the fixed reference batch, with the current weights
            common.vbn_reference_pass(self.net, self.z_ref)
        return self.net(z)


class Discriminator(nn.Module):
    """x (B, 2) -> logit (B,): `hidden_layers` x (Linear, ReLU), [minibatch discrimination], Linear. `forward(x,
    features=True)` also returns the last hidden layer (B, hidden), the features of feature matching."""

    def __init__(self, hidden: int, mbd_kernels: int = 0, mbd_dim: int = 5, hidden_layers: int = 3):
        super().__init__()
        layers, width = [], 2
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.mbd = common.MinibatchDiscrimination(hidden, mbd_kernels, mbd_dim) if mbd_kernels > 0 else None
        self.out = nn.Linear(hidden + max(mbd_kernels, 0), 1)

    def forward(self, x: torch.Tensor, features: bool = False):
        f = self.trunk(x)
        logit = self.out(self.mbd(f) if self.mbd is not None else f).squeeze(1)
        return (logit, f) if features else logit


def make_models(args):
    return (Generator(args.latent_dim, args.hidden_dim, vbn=args.vbn, hidden_layers=args.hidden_layers),
            Discriminator(args.hidden_dim, args.mbd_kernels if args.minibatch_disc else 0, args.mbd_dim,
                          hidden_layers=args.hidden_layers))


def sample_real(centers: torch.Tensor, std: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n samples of the uniform mixture of N(centers[i], std^2 I), drawn on centers' device with `gen`."""
    idx = torch.randint(0, centers.shape[0], (n,), generator=gen, device=centers.device)
    return centers[idx] + std * torch.randn(n, 2, generator=gen, device=centers.device)


def discriminator_loss(d_real, d_fake, s: float):
    """Non-saturating D loss on logits with one-sided label smoothing s: BCE(l, t) = t sp(-l) + (1 - t) sp(l)."""
    loss = (1.0 - s) * F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    return loss + s * F.softplus(d_real).mean() if s > 0 else loss


class StepConfig:
    """What `train_step` needs besides the nets: the loss options and the hist-avg trackers (None when off)."""

    def __init__(self, args, G: nn.Module, D: nn.Module):
        self.largest, self.label_smoothing, self.hist_avg = not args.bottomk, args.label_smoothing, args.hist_avg
        self.feature_matching = args.feature_matching
        self.ha_g = common.HistoricalAverage(G) if args.hist_avg > 0 else None
        self.ha_d = common.HistoricalAverage(D) if args.hist_avg > 0 else None


def train_step(G, D, opt_g, opt_d, cfg: StepConfig, real_d, z_d, z_g, real_g, k: int):
    """One iteration: a D step on (real_d, G(z_d)), then a G step on the top-k of G(z_g). real_g: the real batch of
    the feature-matching loss (None otherwise). Returns the detached D and G losses; the step never syncs."""
    # (1) Update D. ALGO LOGIC: top-k leaves the D step unchanged
    with torch.no_grad():
        fake_d = G(z_d)
    if D.mbd is None:  # one forward of cat(real, fake): the same per-row maths without a batch-dependent layer
        logits = D(torch.cat([real_d, fake_d]))
        d_real, d_fake = logits[: real_d.shape[0]], logits[real_d.shape[0]:]
    else:  # minibatch discrimination compares a sample with its batch-mates: real and fake batches stay apart
        d_real, d_fake = D(real_d), D(fake_d)
    loss_d = discriminator_loss(d_real, d_fake, cfg.label_smoothing)  # ALGO LOGIC: one-sided label smoothing
    if cfg.ha_d is not None:  # ALGO LOGIC: historical averaging
        loss_d = loss_d + cfg.hist_avg * cfg.ha_d.penalty(D)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    if cfg.ha_d is not None:
        cfg.ha_d.update(D)
    # (2) Update G: gradients flow through D to the fakes, D's own weight gradients are not needed
    D.requires_grad_(False)
    scores, f_fake = D(G(z_g), features=True)
    if k < scores.shape[0]:  # ALGO LOGIC: top-k: only the k highest-scored fakes (lowest: --bottomk) train G
        keep = common.select_topk(scores, k, largest=cfg.largest)
        scores, f_fake = scores[keep], f_fake[keep]
    if cfg.feature_matching:  # ALGO LOGIC: feature matching on D's last hidden layer
        with torch.no_grad():
            _, f_real = D(real_g, features=True)
        loss_g = common.feature_matching_loss(f_real, f_fake, FEATURE_MATCHING)
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


class MLPBackprop:
    """Forward and backward of a Linear-ReLU-...-Linear stack by hand, into buffers allocated once per (batch size,
    tag), weight and bias gradients into `.grad`: autograd's products (x W^T + b; dY^T X, sum(dY), dY W, the ReLU
    mask), two in another form for speed: (X^T dY)^T for the 2-input layer, dY W of the 1-unit layer as an outer one."""

    def __init__(self, module: nn.Module):
        self.layers, self.buffers = [m for m in module.modules() if isinstance(m, nn.Linear)], {}

    def forward(self, x: torch.Tensor, tag: str) -> torch.Tensor:  # keeps every output for the tag's backward
        n = x.shape[0]
        if (n, tag) not in self.buffers:  # every layer's output and input gradient
            self.buffers[n, tag] = ([x.new_empty(n, layer.out_features) for layer in self.layers],
                                    [x.new_empty(n, layer.in_features) for layer in self.layers])
        outputs, _ = self.buffers[n, tag]
        for i, layer in enumerate(self.layers):
            torch.addmm(layer.bias, outputs[i - 1] if i > 0 else x, layer.weight.t(), out=outputs[i])
            if i < len(self.layers) - 1:
                outputs[i].relu_()
        return outputs[-1]

    def backward(self, x: torch.Tensor, tag: str, g: torch.Tensor, weight_grads: bool = True, input_grad: bool = False):
        """Back-propagate g = d loss / d output through the last forward(x, tag): into .grad (weight_grads), and
        d loss / dx returned (input_grad)."""
        outputs, input_grads = self.buffers[x.shape[0], tag]
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
    """`train_step` on MLPBackprop, for runs without feature matching, minibatch discrimination, VBN and historical
    averaging (Table 1's): the same losses, selection and gradients to float rounding (tests/test_mog.py)."""

    def __init__(self, G: Generator, D: Discriminator, cfg: StepConfig):
        assert not (G.vbn or D.mbd is not None or cfg.feature_matching or cfg.ha_g is not None)
        self.G, self.D, self.cfg = MLPBackprop(G.net), MLPBackprop(D), cfg

    @torch.no_grad()
    def __call__(self, opt_g, opt_d, real_d, z_d, z_g, k: int):
        s, n_real, B = self.cfg.label_smoothing, real_d.shape[0], z_g.shape[0]
        # (1) Update D (unchanged by top-k)
        x = torch.cat([real_d, self.G.forward(z_d, "d")])
        logits = self.D.forward(x, "d").squeeze(1)
        d_real, d_fake = logits[:n_real], logits[n_real:]
        loss_d = discriminator_loss(d_real, d_fake, s)
        # d loss_d / d logit as autograd evaluates it: real -(1 - s) sigmoid(-l) [+ s sigmoid(l)], fake sigmoid(l)
        grad_real = torch.sigmoid(-d_real).mul_(-(1.0 - s))
        if s > 0:
            grad_real.add_(torch.sigmoid(d_real), alpha=s)
        grad = torch.cat([grad_real.div_(n_real), torch.sigmoid(d_fake).div_(d_fake.shape[0])])
        self.D.backward(x, "d", grad.unsqueeze(1))
        opt_d.step()
        # (2) Update G: D's weights get no gradient, the fakes do
        fake = self.G.forward(z_g, "g")
        scores = self.D.forward(fake, "g").squeeze(1)
        # ALGO LOGIC: top-k: -log sigmoid(score) averaged over the k kept fakes; the others get zero gradient
        keep = common.select_topk(scores, k, largest=self.cfg.largest) if k < B else slice(None)
        kept = scores[keep]
        loss_g = F.softplus(-kept).mean()
        grad = torch.zeros_like(scores)
        grad[keep] = torch.sigmoid(-kept).div_(-kept.shape[0])
        self.G.backward(z_g, "g", self.D.backward(fake, "g", grad.unsqueeze(1), weight_grads=False, input_grad=True))
        opt_g.step()
        return loss_d, loss_g


@torch.no_grad()
def evaluate(run, step: int, k: int, args, G, z_eval, centers, size: int = 560):
    """Samples of the fixed evaluation latents and their `metrics.mode_metrics` (threshold 4 sigma), logged and
    drawn over the mode centres (4-sigma circles) in samples/step_NNNNNNN.png: high quality in blue, others in red."""
    samples = torch.cat([G(z_eval[i: i + 10000]) for i in range(0, z_eval.shape[0], 10000)]).float().cpu().numpy()
    result = metrics.mode_metrics(samples, centers, args.std, threshold=4.0)
    result = {key: result[key] for key in ("high_quality", "modes_recovered", "reverse_kl")}
    pad = float(np.ptp(centers)) / (math.isqrt(len(centers)) - 1) if len(centers) > 1 else 1.0  # one grid step
    lo, hi, top = float(centers.min()) - pad, float(centers.max()) + pad, 24
    draw = ImageDraw.Draw(img := Image.new("RGB", (size, size + top), "white"))
    to_px = lambda xy: ((xy[..., 0] - lo) / (hi - lo) * (size - 1),  # noqa: E731
                        (hi - xy[..., 1]) / (hi - lo) * (size - 1) + top)
    good = ((samples[:, None, :] - centers[None, :, :]) ** 2).sum(-1).min(1) <= (4.0 * args.std) ** 2
    u, v = to_px(samples)
    inside = (u >= 0) & (u < size) & (v >= top) & (v < size + top)
    r = 4.0 * args.std / (hi - lo) * (size - 1)
    for x, y in zip(*to_px(centers)):
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(150, 150, 150))
    for mask, colour in ((~good & inside, (220, 40, 40)), (good & inside, (30, 80, 220))):
        for x, y in zip(u[mask], v[mask]):
            draw.point([(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)], fill=colour)
    draw.text((6, 6), f"step {step}  HQ {result['high_quality']:.1%}  modes {result['modes_recovered']:.1%}  rKL "
              f"{result['reverse_kl']:.3f}", fill=(0, 0, 0))
    img.save(run.dir / "samples" / f"step_{step:07d}.png")
    run.log({"step": step, "epoch": step // args.iters_per_epoch, "k": k,
             **{f"eval/{key}": value for key, value in result.items()}})
    print(f"eval @ {step}: " + "  ".join(f"{key}={value:.4g}" for key, value in result.items()), flush=True)
    return samples, result


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device, args.check_host_sync)
    B = args.batch_size

    def one_step_forward():  # G, D and one iteration's forward passes at full size, run on the meta device
        G, D = make_models(args)
        z, real = torch.zeros(B, args.latent_dim), torch.zeros(B, 2)
        G.z_ref = z  # the VBN reference batch
        fake = G(z)
        _ = (D(real), D(fake)) if args.minibatch_disc else D(torch.cat([real, fake]))  # the D step
        D(G(z), features=True)  # the G step
        return G, D

    def k_at(step_):  # k of the iteration that follows `step_` completed iterations
        return common.topk_k(B, step_ // args.iters_per_epoch, args.mu, args.gamma) if args.topk else B

    common.check_fits(device, "G, D and one training step (--batch-size, --hidden-dim, --hidden-layers, "
                      "--latent-dim, --mbd-kernels, --mbd-dim)", one_step_forward,
                      extra={"the evaluation (--eval-samples, --latent-dim, --n-modes)":
                             args.eval_samples * (4 * (args.latent_dim + 2) + 8 * (2 + args.n_modes))})
    run = common.Run(args, allowed=("threads", "keep_checkpoints", "fast_step", "setup"), argv=argv, script=__file__)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    # seeding, data (the mode centres; batches are drawn in the loop) and the fixed evaluation latents
    common.seed_everything(args.seed, args.torch_deterministic)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # every training batch and latent vector
    eval_gen = torch.Generator(device=device).manual_seed(args.seed + 1_000_003)  # fixed evaluation latents
    centers_np = np.asarray(metrics.grid_centers(args.n_modes, args.grid_spacing), dtype=np.float32)
    centers = torch.from_numpy(centers_np).to(device)
    z_eval = torch.randn(args.eval_samples, args.latent_dim, generator=eval_gen, device=device)

    # models and optimisers
    G, D = (m.to(device) for m in make_models(args))
    if args.vbn:
        G.z_ref = torch.randn(args.batch_size, args.latent_dim, generator=eval_gen, device=device)
    betas, fused = (args.beta1, args.beta2), device.type in ("cpu", "cuda")
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=betas, fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=betas, fused=fused)
    cfg = StepConfig(args, G, D)
    needs_autograd = args.feature_matching or args.minibatch_disc or args.vbn or args.hist_avg > 0
    fast_step = FastStep(G, D, cfg) if args.fast_step and not needs_autograd else None
    run.register(G=G, D=D, opt_g=opt_g, opt_d=opt_d, gen=gen, ha_g=cfg.ha_g, ha_d=cfg.ha_d)

    end = min(args.iterations, args.max_steps or args.iterations)
    run.start(end, device, unit="iteration")
    step = run.step
    if step == 0:
        evaluate(run, 0, k_at(0), args, G, z_eval, centers_np)
    sync_from = step + 2 if args.check_host_sync else None  # the first steps allocate and initialise CUDA lazily
    while step < end:
        k = k_at(step)  # ALGO LOGIC: top-k: k = max(mu, floor(B * gamma^epoch)) of this iteration's epoch
        if sync_from is not None:
            common.check_host_sync(step >= sync_from)
        real_d = sample_real(centers, args.std, B, gen)
        z_d = torch.randn(B, args.latent_dim, generator=gen, device=device)
        z_g = torch.randn(B, args.latent_dim, generator=gen, device=device)  # ALGO LOGIC: fresh latents for G
        real_g = sample_real(centers, args.std, B, gen) if args.feature_matching else None  # ALGO LOGIC: FM batch
        loss_d, loss_g = fast_step(opt_g, opt_d, real_d, z_d, z_g, k) if fast_step is not None else \
            train_step(G, D, opt_g, opt_d, cfg, real_d, z_d, z_g, real_g, k)
        run.add(loss_d=loss_d, loss_g=loss_g)
        step += 1
        if sync_from is not None:
            common.check_host_sync(False)  # logging, evaluation and checkpoints read from the device
        save = (args.save_every > 0 and step % args.save_every == 0) or step == end
        if step % args.log_every == 0 or step % args.eval_every == 0 or save:
            run.log_window(step, epoch=step // args.iters_per_epoch, k=k)
        if step % args.eval_every == 0 and step < end:
            evaluate(run, step, k, args, G, z_eval, centers_np)
        if save:
            run.save(step)
            if args.keep_checkpoints:
                run.save(step, f"step_{step:07d}.pt")
        if run.stop_requested:  # Ctrl-C / SIGTERM: a checkpoint at this step boundary, then how to continue
            run.log_window(step, epoch=step // args.iters_per_epoch, k=k)
            run.interrupt(step)

    # final evaluation and summary
    samples, result = evaluate(run, step, k_at(step - 1), args, G, z_eval, centers_np)
    np.savez(run.dir / "samples.npz", samples=samples, centers=centers_np, std=np.float32(args.std))
    variant = ("bottomk" if args.bottomk else "topk") if args.topk else "gan"
    run.finish({**result, "step": step, "n_modes": args.n_modes, "variant": variant, "k_final": k_at(step - 1),
                "seed": args.seed, "threads": torch.get_num_threads(), "fast_step": fast_step is not None,
                "eval_samples": args.eval_samples, "threshold_sigma": 4.0}, line=f" | HQ {result['high_quality']:.2%}")
    return run.dir


if __name__ == "__main__":
    common.run_cli(main)
