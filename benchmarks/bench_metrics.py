"""Speed of the FID machinery in metrics.py.

1. Fréchet distance at 2048-d: metrics.frechet_distance (symmetric eigendecompositions) against pytorch-fid's
   formula with scipy.linalg.sqrtm, on covariances of correlated Gaussian samples: full rank (5000 samples each),
   one side rank-deficient (1000 vs 5000 samples) and both rank-deficient (1000 each). Prints median times over
   --repeats runs, the speed-up and the relative difference of the two values.
2. Inception feature throughput (images/s) of metrics.reference_statistics (uint8 → float32 → 299x299 FID Inception
   → running mean/covariance) at 32x32 input, on cuda if available else cpu. The network has random weights: the
   weights do not change the amount of work (He-normal initialisation keeps activations O(1) like the real
   weights, so no slow denormal arithmetic on CPU).

Example: python benchmarks/bench_metrics.py --repeats 3 --batch-size 100
On a shared machine, compare single-threaded: OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_metrics.py
(threaded BLAS/OpenMP slows down by orders of magnitude when the cores are oversubscribed).
A device that is not there or a count below 1: one `error:` line, exit status 2.
"""

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
import metrics  # noqa: E402


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("--dims", type=int, default=2048, help="feature dimension of the Fréchet-distance benchmark (default: %(default)s)")
    p.add_argument("--n-full", type=int, default=5000, help="samples behind a full-rank covariance (default: %(default)s)")
    p.add_argument("--n-deficient", type=int, default=1000, help="samples behind a rank-deficient covariance (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method and case (the median is printed) (default: %(default)s)")
    p.add_argument("--skip-fid", action="store_true", help="skip the Fréchet-distance benchmark")
    p.add_argument("--skip-inception", action="store_true", help="skip the Inception throughput benchmark")
    p.add_argument("--device", default="auto", help="Inception device: auto (cuda if available), cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="Inception batch size (default: 200 on cuda, 8 on cpu)")
    p.add_argument("--n-images", type=int, default=None,
                   help="images timed, after one warm-up batch (default: 5000 on cuda, 32 on cpu)")
    p.add_argument("--image-size", type=int, default=32, help="input resolution (upsampled to 299 by the network) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random data and weights (default: %(default)s)")
    args = p.parse_args(argv)
    for flag in ("dims", "n_full", "n_deficient", "repeats", "batch_size", "n_images", "image_size"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise common.UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    args.device = common.pick_device(args.device)  # a CUDA device that is not there: refused here
    return args


def scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (the reference implementation), with scipy.linalg.sqrtm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def timed(fn, repeats):
    """(median wall seconds, median CPU seconds of this process, last result) of `repeats` calls of fn().

    CPU time is printed too because on a shared machine wall time also measures the other tenants; with one
    thread it is the compute time itself."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def bench_frechet(args):
    rng = np.random.default_rng(args.seed)
    mix = rng.standard_normal((args.dims, args.dims)) / math.sqrt(args.dims)

    def stats(n, scale, shift):
        x = (rng.standard_normal((n, args.dims)) * scale + shift) @ mix
        return metrics.feature_statistics(x)

    print(f"Fréchet distance, d={args.dims}, median of {args.repeats} runs, CPU threads={torch.get_num_threads()}")
    cases = [("full rank", args.n_full, args.n_full), ("one rank-deficient", args.n_deficient, args.n_full),
             ("both rank-deficient", args.n_deficient, args.n_deficient)]
    for name, n1, n2 in cases:
        mu1, s1 = stats(n1, 1.0, 0.0)
        mu2, s2 = stats(n2, 1.1, 0.05)
        w_ours, c_ours, ours = timed(lambda: metrics.frechet_distance(mu1, s1, mu2, s2), args.repeats)
        w_ref, c_ref, ref = timed(lambda: scipy_frechet(mu1, s1, mu2, s2), args.repeats)
        print(f"  {name:19s} ({n1} vs {n2} samples): metrics {w_ours:6.2f} s (cpu {c_ours:6.2f} s) | "
              f"scipy sqrtm {w_ref:6.2f} s (cpu {c_ref:6.2f} s) | speed-up {w_ref / w_ours:4.1f}x wall, "
              f"{c_ref / c_ours:4.1f}x cpu | FID {ours:.6f} vs {ref:.6f} (rel diff {abs(ours - ref) / abs(ref):.1e})")
    if torch.cuda.is_available():
        mu1, s1 = (torch.from_numpy(v).cuda() for v in stats(args.n_full, 1.0, 0.0))
        mu2, s2 = (torch.from_numpy(v).cuda() for v in stats(args.n_full, 1.1, 0.05))
        metrics.frechet_distance(mu1, s1, mu2, s2)  # warm-up (cuSOLVER handles)
        t_gpu, _, _ = timed(lambda: metrics.frechet_distance(mu1, s1, mu2, s2), args.repeats)
        print(f"  full rank on {torch.cuda.get_device_name()}: {t_gpu:.3f} s")


def bench_inception(args):
    device = args.device
    batch = args.batch_size or (200 if device.type == "cuda" else 8)
    n_images = args.n_images or (5000 if device.type == "cuda" else 32)
    gen = torch.Generator().manual_seed(args.seed)
    net = metrics.FIDInceptionV3()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("conv.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2 / p[0].numel()))
    net = net.to(device).eval().requires_grad_(False)
    images = torch.randint(0, 256, (n_images + batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=gen)
    metrics.reference_statistics(images[:batch], net, batch_size=batch, device=device)  # warm-up (cuDNN, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    # reference_statistics ends with a host copy of the statistics, so the GPU work is finished when it returns
    wall, cpu, _ = timed(lambda: metrics.reference_statistics(images[batch:], net, batch_size=batch, device=device), 1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"Inception features ({args.image_size}x{args.image_size} → 299x299, float32, batch {batch}, {where}): "
          f"{n_images / wall:.2f} images/s wall ({n_images} images in {wall:.1f} s; CPU time {cpu:.1f} s)")


def main(argv=None):
    args = parse_args(argv)
    print(f"torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}")
    if not args.skip_fid:
        bench_frechet(args)
    if not args.skip_inception:
        bench_inception(args)


if __name__ == "__main__":
    common.run_cli(main)
