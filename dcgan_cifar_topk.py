"""DCGAN vs DCGAN + top-k training on CIFAR-10, with FID/IS over training.

Papers: Sinha, Zhao, Goyal, Raffel, Odena, "Top-k Training of GANs: Improving GAN Performance by Throwing Away Bad
Samples", NeurIPS 2020 (arXiv:2002.06224); Radford, Metz, Chintala, "Unsupervised Representation Learning with Deep
Convolutional GANs", ICLR 2016; Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016 (the tricks).

    python dcgan_cifar_topk.py                                  # DCGAN baseline (downloads CIFAR-10 into ./data)
    python dcgan_cifar_topk.py --topk --mu 64 --gamma 0.99      # DCGAN + top-k: the seed experiment
    python dcgan_cifar_topk.py --topk --amp bf16 --compile      # fast on a recent GPU
    python dcgan_cifar_topk.py --dataset fake --max-steps 20 --no-fid   # smoke run, no data needed

Model: the standard 32x32 DCGAN. G: z (100) -> 512x4x4 -> 256x8x8 -> 128x16x16 -> 3x32x32 tanh (transposed convs,
BatchNorm + ReLU). D: strided convs 3 -> 128 -> 256 -> 512 (LeakyReLU 0.2, BatchNorm but after the first) -> 8192
features -> [minibatch discrimination] -> one logit. N(0, 0.02) init; Adam (0.5, 0.999), lr G 1e-4 / D 4e-4, batch
128, 500 epochs; D: BCE on a real and a fake batch; G: non-saturating, on the same fakes scored by the updated D. With
--topk D scores all B fakes (BatchNorm sees the whole batch, as Algorithm 1 scores before it selects) and the G loss
averages the k highest logits, k = max(mu, floor(B * gamma**epoch)), 0-based epoch. FID/IS every --eval-every epochs
on 10k samples (50k at the end) against the CIFAR-10 training set; best.pt by FID.

Departures from pytorch/examples `dcgan` and openai/improved-gan, with their reason:
  - the data live on the device as uint8, shuffled by a permutation seeded with (seed, epoch): no loader workers
    to wait for, and a resumed run sees the same batches;
  - D is frozen during the G step (which reuses the D step's fakes, as pytorch/examples does): no D weight gradients;
  - feature matching is the paper's squared L2 distance of the mean features; openai's CIFAR-10 code uses the mean
    absolute one, on a D without BatchNorm (here BatchNorm removes the real/fake per-channel mean difference);
  - D's output layer runs in float32 under --amp (top-k ranks these logits; in bf16 neighbours tie);
  - samples come from G in eval mode (running BatchNorm statistics; --sample-bn batch for the batch's own), in
    float32; evaluating never changes training.
Data pipeline, tricks, evaluation, checkpoints, performance and every flag: docs/dcgan_cifar_topk.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

FEATURE_MATCHING = "squared_l2"  # common.feature_matching_loss form: ||mean f(x) - mean f(G(z))||^2, the paper's


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_run_flags(p, __file__, save_every=10, unit="epochs")
    flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["cifar10", "fake"], default="cifar10", help="fake: random images, smoke runs")
    g.add_argument("--data-dir", type=str, default="data",
                   help="folder of cifar-10-batches-py/ (or cifar-10-python.tar.gz) and of the FID statistics")
    g.add_argument("--download", action=flag, default=True, help="download CIFAR-10 into --data-dir when absent")
    g.add_argument("--fake-size", type=int, default=None, help="images of --dataset fake (default 2048)")
    g.add_argument("--hflip", action=flag, default=False, help="random horizontal flips of the real images")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=500, help="passes over the training set")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many generator steps in all (smoke runs, benchmarks; default: --epochs)")
    g.add_argument("--batch-size", type=int, default=128, help="real and fake images per step")
    g.add_argument("--nz", type=int, default=100, help="dimension of the generator's noise z")
    g.add_argument("--ngf", type=int, default=128, help="G width: channels 4*ngf, 2*ngf, ngf")
    g.add_argument("--ndf", type=int, default=128, help="D width: channels ndf, 2*ndf, 4*ndf")
    g.add_argument("--lr-g", type=common.finite_float, default=1e-4, help="Adam learning rate of G")
    g.add_argument("--lr-d", type=common.finite_float, default=4e-4, help="Adam learning rate of D")
    g.add_argument("--beta1", type=common.finite_float, default=0.5, help="Adam beta1 (DCGAN)")
    g.add_argument("--beta2", type=common.finite_float, default=0.999, help="Adam beta2")
    common.add_topk_flags(p)
    g = p.add_argument_group("Improved-GAN tricks (Salimans et al. 2016)")
    g.add_argument("--feature-matching", action=flag, default=False,
                   help="G loss = squared L2 distance between the mean D features of real and (top-k) fake images")
    common.add_mbd_flags(g, kernels=100, dim=5)
    g.add_argument("--hist-avg", type=common.finite_float, default=0.0, help="historical-averaging weight (0 = off)")
    g.add_argument("--label-smoothing", type=common.finite_float, default=0.0,
                   help="one-sided label smoothing: D's real target is 1 - this (0 = off)")
    g.add_argument("--vbn", action=flag, default=False, help="virtual batch normalisation in G instead of BatchNorm")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=10,
                   help="epochs between evaluations (sample grid, FID, IS); 0 = only at the end")
    g.add_argument("--fid", action=flag, default=True, help="compute FID and IS (--no-fid: sample grids only)")
    g.add_argument("--fid-samples", type=int, default=10000, help="generated samples per periodic FID/IS")
    g.add_argument("--fid-samples-final", type=int, default=50000, help="generated samples of the final FID/IS")
    g.add_argument("--fid-weights", type=str, default=None,
                   help="pytorch-fid Inception state-dict file (default: the torch hub copy, downloaded if missing)")
    g.add_argument("--fid-batch-size", type=int, default=250, help="batch size of sampling and Inception passes")
    g.add_argument("--grid-size", type=int, default=64, help="images in each fixed-noise sample grid")
    g.add_argument("--sample-bn", choices=["running", "batch"], default="running",
                   help="G's BatchNorm statistics when sampling: running = the running averages (eval mode), batch "
                        "= those of each sampling batch (--grid-size, --fid-batch-size), running averages unchanged")
    g = p.add_argument_group("performance")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast (fp16: CUDA only)")
    g.add_argument("--compile", action=flag, default=False, help="torch.compile G and D")
    g.add_argument("--cuda-graph", action=flag, default=False,
                   help="CUDA: capture the whole D+G step once as a CUDA graph and replay it (not with --compile, "
                        "--amp fp16, --hist-avg, --hflip; on a CPU: the eager step, said once)")
    g.add_argument("--channels-last", action=flag, default=True, help="channels_last memory format, models and images")
    g.add_argument("--log-every", type=int, default=50,
                   help="generator steps between reads of the losses (each read synchronises the device)")
    return p.parse_args(argv)


def validate_args(args) -> None:
    """Refuse impossible values and combinations (common.UserError, one line); resolve the defaults left as None."""
    E = common.UserError
    common.check_run_flags(args)
    if args.vbn and args.sample_bn == "batch":
        raise E("--sample-bn batch applies to G's BatchNorm; with --vbn G samples with its reference batch")
    fid_low = 10 if args.fid else -math.inf  # IS uses 10 splits
    for name, low in (("epochs", 1), ("max_steps", 1), ("batch_size", 2), ("nz", 1), ("ngf", 1), ("ndf", 1),
                      ("hist_avg", 0), ("eval_every", 0), ("fid_samples", fid_low), ("fid_samples_final", fid_low),
                      ("fid_batch_size", 1), ("grid_size", 1), ("log_every", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise E(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for flag, value in (("--lr-g", args.lr_g), ("--lr-d", args.lr_d)):
        if not value > 0:
            raise E(f"{flag} must be positive, got {value}")
    for flag, value in (("--beta1", args.beta1), ("--beta2", args.beta2), ("--label-smoothing", args.label_smoothing)):
        if not 0 <= value < 1:
            raise E(f"{flag} must be in [0, 1), got {value}")
    common.check_topk_flags(args, args.batch_size)
    common.check_mbd_flags(args, kernels=100, dim=5)
    if args.fid_weights is not None and not args.fid:
        raise E("--fid-weights only applies when FID is on (drop --no-fid)")
    if args.fid_weights is not None and not Path(args.fid_weights).is_file():
        raise E(f"--fid-weights: file not found: {args.fid_weights}")
    if args.cuda_graph and (args.compile or args.amp == "fp16" or args.hist_avg > 0 or args.hflip):
        raise E("--cuda-graph cannot be combined with --compile, --amp fp16, --hist-avg or --hflip")
    if args.dataset == "fake":
        args.fake_size = 2048 if args.fake_size is None else args.fake_size
        if args.fake_size < args.batch_size:
            raise E(f"--fake-size {args.fake_size} is smaller than --batch-size {args.batch_size}")
    elif args.fake_size is not None:
        raise E("--fake-size only applies with --dataset fake")


# ---- models --------------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """z (B, nz) -> images (B, 3, 32, 32) in [-1, 1]; BatchNorm (VirtualBatchNorm with vbn=True) + ReLU."""

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
    """images (B, 3, 32, 32) -> (logits (B,), last hidden features (B, 16 * 4 * ndf) = (B, 8192) for ndf=128):
    the features feature matching compares and minibatch discrimination (when on) reads."""

    def __init__(self, minibatch_disc: bool = False, mbd_kernels: int = 100, mbd_dim: int = 5, ndf: int = 128):
        super().__init__()
        c1, c2, c3 = ndf, 2 * ndf, 4 * ndf
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 4, 2, 1), nn.LeakyReLU(0.2, True),  # 16x16
            nn.Conv2d(c1, c2, 4, 2, 1, bias=False), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2, True),  # 8x8
            nn.Conv2d(c2, c3, 4, 2, 1, bias=False), nn.BatchNorm2d(c3), nn.LeakyReLU(0.2, True),  # 4x4
            nn.Flatten(),
        )
        self.mbd = common.MinibatchDiscrimination(c3 * 16, mbd_kernels, mbd_dim) if minibatch_disc else None
        self.out = nn.Linear(c3 * 16 + (mbd_kernels if minibatch_disc else 0), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        # float32 also under autocast: top-k ranks these logits, and in bf16 the k-th and (k+1)-th often tie
        with torch.autocast("cuda" if h.is_cuda else "cpu", enabled=False):
            logits = self.out((self.mbd(h) if self.mbd is not None else h).float())
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


def build_models(args, device: torch.device) -> tuple[Generator, Discriminator]:
    G = Generator(args.nz, vbn=args.vbn, ngf=args.ngf).to(device)
    D = Discriminator(args.minibatch_disc, args.mbd_kernels or 100, args.mbd_dim or 5, ndf=args.ndf).to(device)
    dcgan_init(G)
    dcgan_init(D)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return G.to(memory_format=memory_format), D.to(memory_format=memory_format)


def fit_step(args):
    """The models and the forwards of one training step, for common.check_fits (on the meta device: no memory)."""
    G, D = build_models(args, torch.device("meta"))
    z = torch.randn(args.batch_size, args.nz)
    if args.vbn:
        common.vbn_reference_pass(G, z)  # VBN's forward of the reference batch
    fake = G(z)
    for x in (torch.empty_like(fake), fake.detach(), fake):  # real batch, D step, G step
        D(x)
    return G, D


# ---- losses and the training step ----------------------------------------------------------------------------------
def generator_loss(d_fake: torch.Tensor, k, bottomk: bool = False, feat_fake: torch.Tensor | None = None,
                   feat_real: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k generator loss: of the whole fake batch's raw D logits d_fake (B,), keep the k highest (lowest with
    bottomk; k >= B keeps all) and return the non-saturating loss mean(softplus(-logit)) over them, or, given
    feat_real (B_real, F), feature matching between it and the kept rows of feat_fake (B, F). k a 0-d tensor
    (--cuda-graph): the same loss in rank-mask form (weights rank < k), so one captured graph serves every k; only
    logits tied at the k-th place can make the two forms keep different (equally scored) fakes."""
    if torch.is_tensor(k):
        keep = (d_fake.detach().float().argsort(descending=not bottomk).argsort() < k).float()
        if feat_real is None:
            return (F.softplus(-d_fake.float()) * keep).sum() / k
        return common.feature_matching_loss(feat_real, (feat_fake.float() * keep[:, None]).sum(0, True) / k,
                                            FEATURE_MATCHING)  # the mean of the kept rows, as one row
    keep = None if k >= d_fake.shape[0] else common.select_topk(d_fake, k, largest=not bottomk)
    if feat_real is not None:
        return common.feature_matching_loss(feat_real, feat_fake if keep is None else feat_fake[keep],
                                            FEATURE_MATCHING)
    return F.softplus(-(d_fake if keep is None else d_fake[keep]).float()).mean()


class CudaGraphStep:
    """--cuda-graph: train_step with k a device scalar (the rank-mask top-k), captured once as a CUDA graph and
    replayed at every step. Static inputs: the batch's indices (copied in from the epoch's permutation) and k; the
    noise is drawn inside the graph. The first 3 calls run eagerly on a side stream (capture needs warmed-up
    state); each call is one training step, so a run trains and resumes the same steps as without the flag."""

    def __init__(self, G, D, opt_d, opt_g, data, args, z_ref, memory_format):
        self.G, self.D, self.opts, self.data, self.args, self.z_ref = G, D, (opt_d, opt_g), data, args, z_ref
        self.idx = torch.zeros(args.batch_size, dtype=torch.long, device=data.device)
        self.k = torch.zeros((), device=data.device)
        self.memory_format, self.calls, self.graph, self.out = memory_format, 0, None, None

    def step(self) -> dict:
        x = self.data[self.idx].float().mul_(2.0 / 255.0).sub_(1.0).contiguous(memory_format=self.memory_format)
        z = torch.randn(self.args.batch_size, self.args.nz, device=self.data.device)
        return train_step(self.G, self.D, *self.opts, x, z, self.k, self.args, self.z_ref)

    def __call__(self, idx: torch.Tensor, k: int) -> dict:
        self.idx.copy_(idx)
        self.k.fill_(k)
        if self.graph is None and self.calls < 3:  # warm-up, eager, on a side stream
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)  # the captured backward passes allocate the gradients
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.step()
        self.graph.replay()
        return self.out


def optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, scaler=None) -> None:
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:  # --amp fp16
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def train_step(G, D, opt_d, opt_g, x_real, z, k, args, z_ref=None, hist=(None, None), scalers=(None, None)):
    """One D update, then one G update on the same fakes scored by the updated D; hist and scalers: the (D, G)
    historical averages and fp16 GradScalers (None: off). Returns the step's scalars, on the device (no sync)."""
    (hist_d, hist_g), (scaler_d, scaler_g) = hist, scalers
    # (1) Update D: maximise log D(x) + log(1 - D(G(z))); top-k never changes this update
    with common.autocast(x_real.device, args.amp):
        if args.vbn:
            # ALGO LOGIC: virtual batch norm: statistics of the fixed reference batch z_ref, with gradient
            common.vbn_reference_pass(G, z_ref)
        fake = G(z)
        x_real = x_real.to(fake.dtype)  # real and fake reach D in one dtype (the autocast one): the same numbers
        d_real, _ = D(x_real)
        d_fake, _ = D(fake.detach())
        # ALGO LOGIC: one-sided label smoothing: real target 1 - s, fake target 0
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 1.0 - args.label_smoothing))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        if hist_d is not None:  # ALGO LOGIC: historical averaging: + w * ||theta - mean of the past theta||^2
            loss_d = loss_d + args.hist_avg * hist_d.penalty(D)
    optimise(opt_d, loss_d, scaler_d)
    if hist_d is not None:
        hist_d.update(D)

    # (2) Update G: maximise log D(G(z)) on the same fakes, scored by the updated D (frozen: no weight gradients)
    D.requires_grad_(False)
    with common.autocast(x_real.device, args.amp):
        # ALGO LOGIC: top-k: D sees all B fakes (BatchNorm statistics of the whole batch); the loss keeps k of them
        d_gen, feat_gen = D(fake)
        # ALGO LOGIC: feature matching against the updated D's features of the real batch (D frozen: no graph)
        feat_real = D(x_real)[1] if args.feature_matching else None
        loss_g = generator_loss(d_gen, k, args.bottomk, feat_gen, feat_real)
        if hist_g is not None:  # ALGO LOGIC: historical averaging
            loss_g = loss_g + args.hist_avg * hist_g.penalty(G)
    optimise(opt_g, loss_g, scaler_g)
    D.requires_grad_(True)
    if hist_g is not None:
        hist_g.update(G)
    return {"loss_d": loss_d, "loss_g": loss_g, "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}


# ---- evaluation: sample grids, FID / IS ----------------------------------------------------------------------------
@torch.no_grad()
def sample(G, z, args, z_ref) -> torch.Tensor:
    """G in eval mode -> float32 images in [-1, 1]. BatchNorm: running statistics, or with --sample-bn batch those
    of this batch (in a copy of G: the running averages stay as they are); VBN: its reference batch. float32 also
    under --amp: a bf16 output moves ~12 % of the uint8 pixels by one level (an --amp FID would not compare)."""
    net = copy.deepcopy(G).train() if args.sample_bn == "batch" else G.eval()
    if args.vbn:
        common.vbn_reference_pass(net, z_ref)
    images = net(z).float()
    G.train()
    return images


def evaluate(G, args, fixed_noise, z_ref, fid_ref, n_samples: int, png: Path, seed: int) -> dict:
    """The fixed-noise grid as `png`; with FID on (fid_ref = Inception, mu, sigma), FID and IS of n_samples fresh
    samples from their own generator seeded `seed` (the training RNG never moves)."""
    from torchvision.utils import save_image  # at the first grid: a run's start-up does not import torchvision
    grid = sample(G, fixed_noise, args, z_ref)
    save_image(grid * 0.5 + 0.5, png, nrow=math.ceil(math.sqrt(len(grid))))
    if fid_ref is None:
        return {}
    import metrics
    gen, t0 = torch.Generator(device=fixed_noise.device).manual_seed(seed), time.time()
    res = metrics.evaluate_generator(
        lambda n: sample(G, torch.randn(n, args.nz, generator=gen, device=gen.device), args, z_ref), n_samples,
        fid_ref[1], fid_ref[2], fid_ref[0], batch_size=args.fid_batch_size, device=fixed_noise.device)
    out = {key: float(res[key]) for key in ("fid", "is_mean", "is_std")}
    out.update(fid_samples=n_samples, eval_time_s=time.time() - t0)
    print(f"eval {png.stem}: FID {out['fid']:.3f} | IS {out['is_mean']:.3f} ({n_samples} samples)", flush=True)
    return out


# ---- main ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    device = common.pick_device(args.device, args.check_host_sync, args.amp)
    # sizes whose memory cannot exist are refused before anything is loaded or written, naming their flags
    samples = 4 * args.grid_size * (args.nz + 3072) + (4 * 9 * 299 * 299 * args.fid_batch_size if args.fid else 0)
    common.check_fits(device, "G, D and a training step (--ngf, --ndf, --nz, --batch-size, --mbd-kernels x --mbd-dim)",
                      lambda: fit_step(args), extra={"the fake data set (--fake-size)": 3072 * (args.fake_size or 0),
                      "the sample grid and the FID batches (--grid-size, --fid-batch-size)": samples})
    run = common.Run(args, allowed=("fid", "fid_samples", "fid_samples_final", "fid_batch_size", "grid_size",
                                    "download", "channels_last", "sample_bn"), argv=argv, script=__file__)
    common.seed_everything(args.seed, args.torch_deterministic)

    # ---- data: the whole training set on the device as uint8 ----
    if args.dataset == "cifar10":
        images, _ = common.load_cifar10(args.data_dir, train=True, download=args.download)
    else:
        images, _ = common.fake_images(args.fake_size, (3, 32, 32), seed=args.seed)
    n_train, B = images.shape[0], args.batch_size
    if n_train < B:
        raise common.UserError(f"--batch-size {B} exceeds the {n_train} training images")
    steps_per_epoch = n_train // B  # the last incomplete batch is dropped
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    data = images.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    # ---- models, optimisers and the tricks' state; everything registered is in every checkpoint ----
    G, D = build_models(args, device)
    if args.cuda_graph and device.type != "cuda":
        print("note: --cuda-graph needs a CUDA device; running the eager step", file=sys.stderr)
    graph = args.cuda_graph and device.type == "cuda"
    adam = {"betas": (args.beta1, args.beta2), "fused": device.type == "cuda", "capturable": graph}
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, **adam)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, **adam)
    scalers = [torch.amp.GradScaler("cuda") for _ in "DG"] if args.amp == "fp16" else [None, None]  # D's, G's
    hist = (common.HistoricalAverage(D), common.HistoricalAverage(G)) if args.hist_avg > 0 else (None, None)
    run.register(G=G, D=D, opt_g=opt_g, opt_d=opt_d, scaler_d=scalers[0], scaler_g=scalers[1], hist_d=hist[0],
                 hist_g=hist[1])
    # the grids' fixed noise and VBN's reference batch: own generators, so a resume draws them again alike
    fixed_noise = torch.randn(args.grid_size, args.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)
    z_ref = torch.randn(B, args.nz, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    G_fwd, D_fwd = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    graph_step = CudaGraphStep(G, D, opt_d, opt_g, data, args, z_ref, memory_format) if graph else None

    # ---- FID reference: Inception statistics of the training set, before the run folder exists ----
    fid_ref = None
    if args.fid:
        import metrics  # only with FID: a --no-fid start-up does not load torchvision's Inception
        inception = metrics.load_inception(args.fid_weights, device=device)
        fid_ref = (inception, *metrics.training_set_statistics(
            images, inception, args.data_dir, args.dataset, args.fid_weights, args.fid_batch_size, device))
    del images

    extra = run.start(total_steps, device, keys=("best",), rate=("images_per_s", B), unit="steps")
    with common.checkpoint_errors(args.resume):  # the periodic evaluation of the lowest FID, of best.pt
        best = dict(extra.get("best", {"fid": None, "epoch": None, "step": None}))
    print(f"device {device} | {n_train} training images, {steps_per_epoch} steps/epoch, {total_steps} steps")

    # ---- training ----
    step = run.step
    sync_from = step + 2  # --check-host-sync: the first steps (compilation, lazy CUDA set-up) may synchronise
    while step < total_steps:
        epoch = step // steps_per_epoch
        # ALGO LOGIC: top-k: k = max(mu, floor(B * gamma**epoch)) from the epoch counter (k = B without --topk)
        k = common.topk_k(B, epoch, args.mu, args.gamma) if args.topk else B
        order = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)  # the same batches after a resume
        perm = torch.randperm(n_train, generator=order).to(device)
        flips = (torch.rand(n_train, generator=order) < 0.5).to(device) if args.hflip else None
        for i in range(step % steps_per_epoch, steps_per_epoch):
            if step >= total_steps:
                break
            if args.check_host_sync:
                common.check_host_sync(step >= sync_from)
            idx = perm[i * B:(i + 1) * B]
            if graph_step is not None:  # the same step, replayed as one CUDA graph
                out = graph_step(idx, k)
            else:
                x_real = data[idx]
                if flips is not None:
                    x_real = torch.where(flips[idx].view(-1, 1, 1, 1), x_real.flip(3), x_real)
                x_real = x_real.float().mul_(2.0 / 255.0).sub_(1.0).contiguous(memory_format=memory_format)  # [-1, 1]
                z = torch.randn(B, args.nz, device=device)
                out = train_step(G_fwd, D_fwd, opt_d, opt_g, x_real, z, k, args, z_ref, hist, scalers)
            run.add(**out)
            step += 1
            if args.check_host_sync:
                common.check_host_sync(False)  # logging, evaluation and checkpoints read from the device
            if step % args.log_every == 0:
                run.log_window(step, epoch=epoch, k=k)
            if run.stop_requested:
                break

        if step % steps_per_epoch == 0:  # a completed epoch: log, evaluate, checkpoint
            done = step // steps_per_epoch
            run.log_window(step, epoch=epoch, k=k)
            save = bool(args.save_every) and done % args.save_every == 0
            if args.eval_every and done % args.eval_every == 0:
                record = evaluate(G, args, fixed_noise, z_ref, fid_ref, args.fid_samples,
                                  run.dir / "samples" / f"epoch_{done:04d}.png", args.seed * 1_000_003 + step)
                if record:
                    run.log({"step": step, "epoch": done, "k": k, **record, "final": False})
                if record and (best["fid"] is None or record["fid"] < best["fid"]):
                    best = {"fid": record["fid"], "is_mean": record["is_mean"], "epoch": done, "step": step}
                    run.save(step, "best.pt", best=best)
                    save = True  # keep last.pt at least as recent as best.pt
            if save:
                run.save(step, best=best)
        if run.stop_requested:  # Ctrl-C or SIGTERM: a checkpoint at this step, then how to continue
            run.log_window(step, epoch=epoch, k=k)
            run.interrupt(step, best=best)

    # ---- the end: the window a --max-steps stop cut, checkpoint, final evaluation, summary ----
    epoch = max(0, step - 1) // steps_per_epoch
    k = common.topk_k(B, epoch, args.mu, args.gamma) if args.topk else B
    run.log_window(step, epoch=epoch, k=k)
    run.save(step, best=best)
    final = evaluate(G, args, fixed_noise, z_ref, fid_ref, args.fid_samples_final, run.dir / "samples" / "final.png",
                     args.seed * 1_000_003 + step)
    if final:
        run.log({"step": step, "epoch": step / steps_per_epoch, "k": k, **final, "final": True})
    run.finish({"steps": step, "epochs": step / steps_per_epoch, "k_final": k,
                "final": {key: final[key] for key in ("fid", "is_mean", "is_std", "fid_samples")} if final else None,
                "best": best if best["fid"] is not None else None},
               line=f" | final FID {final['fid']:.3f}, IS {final['is_mean']:.3f}" if final else "")


if __name__ == "__main__":
    common.run_cli(main)
