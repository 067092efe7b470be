"""Iterations/s of mog_topk.py's training step beside a straightforward PyTorch loop of the same GAN.

Both loops train the same models (mog_topk.Generator / Discriminator with 256 hidden units, batch 256, latent 2,
Adam lr 1e-4, non-saturating loss, 25 modes) in one of mog_topk.py's setups (`--setup`, default the script's default
`all`: 4 hidden layers, betas (0.9, 0.99), grid spacing 1; `base`: 3 hidden layers, betas (0.5, 0.999), spacing 2)
from the same initial weights on the same batches,
each timed in its own fresh Python process (so neither inherits the other's allocator state), alternating in several
repeats so that a load change on a shared machine hits both; the medians are compared.

  * "straightforward": the textbook loop: fake = G(z) with autograd on, D(real) and D(fake.detach()) as two
    forwards, BCE-with-logits against ones/zeros targets, default torch.optim.Adam, optimizer.zero_grad(),
    a G step that back-propagates into D's weights too (zeroed before the next D step), loss.item() every step.
  * "train_step": mog_topk.train_step, the autograd step the script uses with tricks that need autograd (joint D
    forward on cat(real, fake), no_grad G forward in the D step, D frozen in the G step, fused Adam, no per-step
    .item()).
  * "fast_step": mog_topk.FastStep, the script's default step for Table 1's configuration: train_step's maths with
    hand-written back-propagation into preallocated buffers.
  * "gemm_floor": not a training loop: only the 256x256-weight matrix products of one fast_step iteration
    (`floor_products`). Every exact implementation of the iteration does them, so straightforward / gemm_floor is the
    largest speed-up any rewrite of the step can reach at this machine's matrix-product speed (printed as "bound").
    Its operands stay in cache (one weight, one input per shape), so it is the products at their fastest.
  * "gemm_replay": the same products, but the ones one real fast_step iteration makes: its own weights, activations
    and gradient buffers, in its order (captured with a TorchDispatchMode, then called again each iteration). They
    miss the cache as the step's do, so fast_step - gemm_replay is FastStep's time outside its big products, and
    straightforward / gemm_replay bounds any step that does these products on this memory layout.

The three loops compute the same function: `--check` also runs them from identical weights for 20 steps, in
float32 and in float64, and prints the largest difference of G's parameters from the straightforward loop's. In
float32 Adam's normalisation magnifies rounding where gradients are tiny (1e-5 with betas (0.9, 0.99)); in float64
the loops agree to ~1e-16, so the difference is rounding, not maths.

Usage:
    python benchmarks/bench_mog.py --threads 1 --steps 300 --repeats 5 [--topk] [--setup base]
    python benchmarks/bench_mog.py --kinds straightforward fast_step      # only the two loops of the target

The figure the target refers to is the line "ratio fast_step / straightforward". A count below 1 (--steps,
--repeats) or an unknown --kinds entry: one `error:` line, exit status 2.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import mog_topk  # noqa: E402
import metrics  # noqa: E402


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=300, help="timed iterations per repeat and loop")
    p.add_argument("--warmup", type=int, default=30, help="untimed iterations before each timed block")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats of both loops")
    p.add_argument("--setup", choices=sorted(mog_topk.SETUPS), default=mog_topk.DEFAULT_SETUP,
                   help="mog_topk.py setup whose hidden layers, Adam betas and grid spacing both loops use")
    p.add_argument("--topk", action=argparse.BooleanOptionalAction, default=False,
                   help="benchmark with k = the setup's floor of k (192 in all, 128 in base) instead of k = B")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="loops to time (straightforward is always included: the ratios are against it)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="first check that both loops give the same weights after a few steps")
    p.add_argument("--worker", choices=KINDS, default=None,
                   help=argparse.SUPPRESS)  # internal: time one loop in this process
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 0:
        raise common.UserError(f"--steps and --repeats must be at least 1, --warmup and --threads >= 0 (got --steps "
                               f"{args.steps}, --repeats {args.repeats}, --warmup {args.warmup}, --threads {args.threads})")
    return args


def straightforward_step(G, D, opt_g, opt_d, real, z_d, z_g, k, largest=True):
    """The textbook GAN iteration (what most PyTorch GAN code does), top-k included for k < B."""
    ones = torch.ones(real.shape[0])
    zeros = torch.zeros(z_d.shape[0])
    opt_d.zero_grad()
    fake = G(z_d)
    loss_d = F.binary_cross_entropy_with_logits(D(real), ones) + \
        F.binary_cross_entropy_with_logits(D(fake.detach()), zeros)
    loss_d.backward()
    opt_d.step()
    opt_g.zero_grad()
    scores = D(G(z_g))
    if k < scores.shape[0]:
        scores = torch.topk(scores, k, largest=largest).values
    loss_g = F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))
    loss_g.backward()
    opt_g.step()
    return loss_d.item(), loss_g.item()


B = 256
KINDS = ("straightforward", "train_step", "fast_step", "gemm_floor", "gemm_replay")
LOOPS = KINDS[:3]  # the kinds that train (gemm_floor and gemm_replay only time matrix products)
NO_TRICKS = argparse.Namespace(bottomk=False, label_smoothing=0.0, feature_matching=False, minibatch_disc=False,
                               hist_avg=0.0)


def fresh(kind, setup):
    """Identical initial G and D (seed 0) of the setup with the optimiser each loop uses."""
    cfg = mog_topk.SETUPS[setup]
    torch.manual_seed(0)
    G = mog_topk.Generator(2, 256, hidden_layers=cfg["hidden_layers"])
    D = mog_topk.Discriminator(256, hidden_layers=cfg["hidden_layers"])
    fused = kind != "straightforward"
    betas = (cfg["beta1"], cfg["beta2"])
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=betas, fused=fused or None)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=betas, fused=fused or None)
    return G, D, opt_g, opt_d


def batches(n, seed, setup):
    """n (real, z_d, z_g) triples of the setup's 25-mode grid, made before timing."""
    centers = torch.from_numpy(metrics.grid_centers(25, mog_topk.SETUPS[setup]["grid_spacing"])).float()
    gen = torch.Generator().manual_seed(seed)
    return [(mog_topk.sample_real(centers, 0.05, B, gen), torch.randn(B, 2, generator=gen),
             torch.randn(B, 2, generator=gen)) for _ in range(n)]


def run(kind, nets, data, k):
    G, D, opt_g, opt_d = nets
    if kind == "train_step":
        cfg = mog_topk.StepConfig(NO_TRICKS, G, D)
        for real, z_d, z_g in data:
            out = mog_topk.train_step(G, D, opt_g, opt_d, cfg, real, z_d, z_g, None, k)
        out[0].item()  # what the script does once per --log-every steps
    elif kind == "fast_step":
        step = mog_topk.FastStep(G, D, mog_topk.StepConfig(NO_TRICKS, G, D))
        for real, z_d, z_g in data:
            out = step(opt_g, opt_d, real, z_d, z_g, k)
        out[0].item()
    elif kind == "gemm_floor":
        products = floor_products(len(G.net) // 2)  # G.net: hidden_layers x (Linear, ReLU) + the output Linear
        for _ in data:
            for a, b, out in products:
                torch.mm(a, b, out=out)
    elif kind == "gemm_replay":
        if id(G) not in _REPLAY_CALLS:  # recorded in the first (warm-up) call, so the timed block only replays
            step = mog_topk.FastStep(G, D, mog_topk.StepConfig(NO_TRICKS, G, D))
            _REPLAY_CALLS[id(G)] = (step, big_products_of(lambda: step(opt_g, opt_d, *data[0], k)))
        calls = _REPLAY_CALLS[id(G)][1]
        with torch.no_grad():  # as in FastStep: out= products of weights that require grad
            for _ in data:
                for func, args, kwargs in calls:
                    func(*args, **kwargs)
    else:
        for real, z_d, z_g in data:
            straightforward_step(G, D, opt_g, opt_d, real, z_d, z_g, k)


_REPLAY_CALLS = {}  # id(G) -> (the FastStep whose buffers the calls use, its recorded products)


class _RecordBigProducts(TorchDispatchMode):
    """Records every matrix product (mm / addmm) with all three dimensions >= 256: the products of the hidden-to-
    hidden layers, whose weight (or weight gradient) is 256 x 256."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a, b = args[-2:]  # (m, p) @ (p, q); addmm's first argument is the bias
            if min(a.shape[0], a.shape[1], b.shape[1]) >= 256:
                self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def big_products_of(fn):
    """Run fn() once and return its 256x256-weight matrix products as (op, args, kwargs), to be called again: the
    same operands (views of the step's own buffers and weights) in the same order."""
    recorder = _RecordBigProducts()
    with recorder:
        fn()
    return recorder.calls


def floor_products(hidden_layers, width=256):
    """The 256x256-weight matrix products of one FastStep iteration, as (a, b, out) triples on random data.

    With L hidden layers each net has L - 1 hidden-to-hidden Linear layers. Per iteration: D step: G forward on
    z_d (B rows), D forward, weight gradients and input gradients on cat(real, fake) (2B rows); G step: G forward,
    D forward, D input gradients, G weight gradients and G input gradients (B rows). That is 6 (L - 1) products
    with B rows and 3 (L - 1) with 2B rows, 2 * rows * 256 * 256 flops each. Every exact implementation of the
    iteration does at least these (the straightforward loop does (L - 1) more: D's weight gradients in the G
    step); the layers with 1 or 2 units, the elementwise work and Adam come on top. Their time on this machine
    is therefore a floor under any such step, and straightforward / floor bounds the speed-up any rewrite of the
    step can reach.
    """
    weight = torch.randn(width, width)
    products = []
    for rows, count in ((B, 6), (2 * B, 3)):  # one set of operands per shape: they stay in cache, as fast as it gets
        a, out = torch.randn(rows, width), torch.empty(rows, width)
        products += [(a, weight, out)] * (count * (hidden_layers - 1))
    return products


def timed_in_subprocess(kind, args):
    """it/s of one loop, measured in a fresh Python process so that neither loop inherits the other's allocator
    state (freed blocks, heap size), which otherwise shifts the result by 10-20 % on CPU."""
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--setup", args.setup] + (["--topk"] if args.topk else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def worker(args, k):
    """Time one loop and print its it/s (last line of stdout)."""
    nets, data = fresh(args.worker, args.setup), batches(args.steps + args.warmup, 7, args.setup)
    run(args.worker, nets, data[: args.warmup], k)
    t0 = time.perf_counter()
    run(args.worker, nets, data[args.warmup:], k)
    print(args.steps / (time.perf_counter() - t0))


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    k = max(1, int(B * mog_topk.SETUPS[args.setup]["mu_fraction"])) if args.topk else B
    if args.worker:
        return worker(args, k)
    kinds = [kind for kind in KINDS if kind == "straightforward" or kind in args.kinds]
    loops = [kind for kind in kinds if kind in LOOPS]
    layers = mog_topk.SETUPS[args.setup]["hidden_layers"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, setup {args.setup} ({layers} hidden layers), "
          f"batch {B}, k {k}, steps {args.steps} x repeats {args.repeats}, each measurement in a fresh process")
    if args.check:  # in float32 (what is timed) and float64: a difference of rounding shrinks by ~1e-9 there
        for dtype in (torch.float32, torch.float64):
            torch.set_default_dtype(dtype)
            data = [tuple(t.to(dtype) for t in triple) for triple in batches(20, 123, args.setup)]
            nets = {kind: fresh(kind, args.setup) for kind in loops}
            for kind in loops:
                run(kind, nets[kind], data, k)
            G_ref = nets["straightforward"][0]
            scale = max(p.abs().max().item() for p in G_ref.parameters())
            for kind in loops[1:]:
                diff = max((p - q).abs().max().item() for p, q in zip(G_ref.parameters(), nets[kind][0].parameters()))
                print(f"check ({str(dtype)[6:]}): after 20 identical steps, max |G_straightforward - G_{kind}| = "
                      f"{diff:.3g} (largest |weight| {scale:.3g})")
        torch.set_default_dtype(torch.float32)

    rates = {kind: [] for kind in kinds}
    for rep in range(args.repeats):
        for kind in kinds:
            rates[kind].append(timed_in_subprocess(kind, args))
        print(f"repeat {rep + 1}: " + ", ".join(f"{kind} {rates[kind][-1]:.1f} it/s" for kind in kinds), flush=True)
    median = {kind: statistics.median(rates[kind]) for kind in kinds}
    print("median: " + ", ".join(f"{kind} {median[kind]:.1f} it/s" for kind in kinds))
    for kind in loops[1:]:
        print(f"ratio {kind} / straightforward: {median[kind] / median['straightforward']:.2f}x")
    if "gemm_floor" in kinds:
        print(f"bound: straightforward / gemm_floor = {median['gemm_floor'] / median['straightforward']:.2f}x, the "
              f"most any exact rewrite of the step can reach at this machine's matrix-product speed")
    if "gemm_replay" in kinds:
        print(f"bound on FastStep's memory layout: straightforward / gemm_replay = "
              f"{median['gemm_replay'] / median['straightforward']:.2f}x (its big products alone, as they run in it)")
        if "fast_step" in kinds:
            print(f"fast_step outside its big products: {1e3 / median['fast_step'] - 1e3 / median['gemm_replay']:.2f} "
                  f"ms per iteration of {1e3 / median['fast_step']:.2f}")


if __name__ == "__main__":
    common.run_cli(main)
