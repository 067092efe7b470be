"""Iterations/s of mog_topk.py's training step beside a straightforward PyTorch loop of the same GAN.

Both loops train the same models (mog_topk.Generator / Discriminator, 4 linear layers of 256 units, batch 256,
latent 2, Adam 1e-4 (0.5, 0.999), non-saturating loss, 25 modes) from the same initial weights on the same batches,
in the same process, alternating in several repeats so that a load change on a shared machine hits both.

  * "straightforward": the textbook loop: fake = G(z) with autograd on, D(real) and D(fake.detach()) as two
    forwards, BCE-with-logits against ones/zeros targets, default torch.optim.Adam, optimizer.zero_grad(),
    a G step that back-propagates into D's weights too (zeroed before the next D step), loss.item() every step.
  * "mog_topk": mog_topk.train_step (joint D forward on cat(real, fake), no_grad G forward in the D step,
    D frozen in the G step, fused Adam, no per-step .item()).

The two compute the same function: `--check` also runs both from identical weights for a few steps and prints the
largest difference of G's parameters (float rounding only).

Usage:
    python benchmarks/bench_mog.py --threads 2 --steps 300 --repeats 5 [--topk]
"""

from __future__ import annotations

import argparse
import copy
import statistics
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


def build(seed=0):
    torch.manual_seed(seed)
    G = mog_topk.Generator(2, 256)
    D = mog_topk.Discriminator(256)
    return G, D


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    B = 256
    k = B // 2 if args.topk else B
    centers = torch.from_numpy(metrics.grid_centers(25, 2.0)).float()
    ns = argparse.Namespace(bottomk=False, label_smoothing=0.0, feature_matching=False, minibatch_disc=False,
                            hist_avg=0.0)
    G0, D0 = build()

    def fresh(kind):
        G, D = copy.deepcopy(G0), copy.deepcopy(D0)
        fused = kind == "mog_topk"
        opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.999), fused=fused or None)
        opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.999), fused=fused or None)
        return G, D, opt_g, opt_d

    def batches(n, seed):
        gen = torch.Generator().manual_seed(seed)
        return [(mog_topk.sample_real(centers, 0.05, B, gen), torch.randn(B, 2, generator=gen),
                 torch.randn(B, 2, generator=gen)) for _ in range(n)]

    def run(kind, nets, data):
        G, D, opt_g, opt_d = nets
        if kind == "mog_topk":
            cfg = mog_topk.StepConfig(ns, G, D)
            for real, z_d, z_g in data:
                out = mog_topk.train_step(G, D, opt_g, opt_d, cfg, real, z_d, z_g, None, k)
            out[0].item()  # what the script does once per --log-every steps
        else:
            for real, z_d, z_g in data:
                straightforward_step(G, D, opt_g, opt_d, real, z_d, z_g, k)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {B}, k {k}, "
          f"steps {args.steps} x repeats {args.repeats}")
    if args.check:
        data = batches(20, 123)
        nets_a, nets_b = fresh("straightforward"), fresh("mog_topk")
        run("straightforward", nets_a, data)
        run("mog_topk", nets_b, data)
        diff = max((pa - pb).abs().max().item() for pa, pb in zip(nets_a[0].parameters(), nets_b[0].parameters()))
        scale = max(pa.abs().max().item() for pa in nets_a[0].parameters())
        print(f"check: after 20 identical steps, max |G_straightforward - G_mog_topk| = {diff:.3g} "
              f"(largest |weight| {scale:.3g})")

    rates = {"straightforward": [], "mog_topk": []}
    data = batches(args.steps + args.warmup, 7)
    for rep in range(args.repeats):
        for kind in ("straightforward", "mog_topk"):
            nets = fresh(kind)
            run(kind, nets, data[: args.warmup])
            t0 = time.perf_counter()
            run(kind, nets, data[args.warmup:])
            rates[kind].append(args.steps / (time.perf_counter() - t0))
        print(f"repeat {rep + 1}: straightforward {rates['straightforward'][-1]:.1f} it/s, "
              f"mog_topk {rates['mog_topk'][-1]:.1f} it/s", flush=True)
    a, b = statistics.median(rates["straightforward"]), statistics.median(rates["mog_topk"])
    print(f"median: straightforward {a:.1f} it/s, mog_topk.train_step {b:.1f} it/s, ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
