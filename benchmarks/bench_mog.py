"""Iterations/s of mog_topk.py's training step beside a straightforward PyTorch loop of the same GAN.

Both loops train the same models (mog_topk.Generator / Discriminator, 4 linear layers of 256 units, batch 256,
latent 2, Adam 1e-4 (0.5, 0.999), non-saturating loss, 25 modes) from the same initial weights on the same batches,
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

The three compute the same function: `--check` also runs them from identical weights for a few steps and prints
the largest difference of G's parameters from the straightforward loop's (float rounding only).

Usage:
    python benchmarks/bench_mog.py --threads 2 --steps 300 --repeats 5 [--topk]

The figure the issue's target refers to is the last line: fast_step / straightforward.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mog_topk  # noqa: E402
import metrics  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=300, help="timed iterations per repeat and loop")
    p.add_argument("--warmup", type=int, default=30, help="untimed iterations before each timed block")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats of both loops")
    p.add_argument("--topk", action=argparse.BooleanOptionalAction, default=False,
                   help="benchmark with k = B/2 (the top-k floor) instead of k = B")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="first check that both loops give the same weights after a few steps")
    p.add_argument("--worker", choices=KINDS, default=None,
                   help=argparse.SUPPRESS)  # internal: time one loop in this process
    return p.parse_args()


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
KINDS = ("straightforward", "train_step", "fast_step")
NO_TRICKS = argparse.Namespace(bottomk=False, label_smoothing=0.0, feature_matching=False, minibatch_disc=False,
                               hist_avg=0.0)


def fresh(kind):
    """Identical initial G and D (seed 0) with the optimiser each loop uses."""
    torch.manual_seed(0)
    G, D = mog_topk.Generator(2, 256), mog_topk.Discriminator(256)
    fused = kind != "straightforward"
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.999), fused=fused or None)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.999), fused=fused or None)
    return G, D, opt_g, opt_d


def batches(n, seed):
    """n (real, z_d, z_g) triples of the 25-mode grid, made before timing."""
    centers = torch.from_numpy(metrics.grid_centers(25, 2.0)).float()
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
    else:
        for real, z_d, z_g in data:
            straightforward_step(G, D, opt_g, opt_d, real, z_d, z_g, k)


def timed_in_subprocess(kind, args):
    """it/s of one loop, measured in a fresh Python process so that neither loop inherits the other's allocator
    state (freed blocks, heap size), which otherwise shifts the result by 10-20 % on CPU."""
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--topk"] if args.topk else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def worker(args, k):
    """Time one loop and print its it/s (last line of stdout)."""
    nets, data = fresh(args.worker), batches(args.steps + args.warmup, 7)
    run(args.worker, nets, data[: args.warmup], k)
    t0 = time.perf_counter()
    run(args.worker, nets, data[args.warmup:], k)
    print(args.steps / (time.perf_counter() - t0))


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    k = B // 2 if args.topk else B
    if args.worker:
        return worker(args, k)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {B}, k {k}, "
          f"steps {args.steps} x repeats {args.repeats}, each measurement in a fresh process")
    if args.check:
        data = batches(20, 123)
        nets = {kind: fresh(kind) for kind in KINDS}
        for kind in KINDS:
            run(kind, nets[kind], data, k)
        G_ref = nets["straightforward"][0]
        scale = max(p.abs().max().item() for p in G_ref.parameters())
        for kind in KINDS[1:]:
            diff = max((p - q).abs().max().item() for p, q in zip(G_ref.parameters(), nets[kind][0].parameters()))
            print(f"check: after 20 identical steps, max |G_straightforward - G_{kind}| = {diff:.3g} "
                  f"(largest |weight| {scale:.3g})")

    rates = {kind: [] for kind in KINDS}
    for rep in range(args.repeats):
        for kind in KINDS:
            rates[kind].append(timed_in_subprocess(kind, args))
        print(f"repeat {rep + 1}: " + ", ".join(f"{kind} {rates[kind][-1]:.1f} it/s" for kind in KINDS), flush=True)
    median = {kind: statistics.median(rates[kind]) for kind in KINDS}
    print("median: " + ", ".join(f"{kind} {median[kind]:.1f} it/s" for kind in KINDS))
    for kind in KINDS[1:]:
        print(f"ratio {kind} / straightforward: {median[kind] / median['straightforward']:.2f}x")


if __name__ == "__main__":
    main()
