"""One command that validates and measures the project on a CUDA GPU, and prints one table.

    python benchmarks/gpu_report.py                      # everything (about 15-25 minutes on one H100)
    python benchmarks/gpu_report.py --skip-tests         # measurements only
    python benchmarks/gpu_report.py --json gpu_report.json

No network and no dataset downloads: every run uses `--dataset fake` and random Inception weights. In order:
  1. the CUDA test tier (`pytest -m cuda tests/test_cuda.py`): every script in fp32 / bf16 / fp16 / compile /
     channels-last with top-k and k changing, resume paths, FID end to end, no host sync inside a training step;
  2. DCGAN throughput (benchmarks/bench_dcgan.py): the user's default command (`--topk --mu 64 --gamma 0.99`, no
     speed flags) against a DataLoader / fp32 / eager reference loop, then the fast path (`--amp bf16 --compile
     --channels-last`); images/s, projected 500-epoch training time against the seed experiment's 1 h 30 on a
     3080 Ti, peak GPU memory;
  3. improved-GAN CIFAR (feature-matching and minibatch-disc models) and MNIST seconds per epoch at the papers'
     data sizes (50,000 and 60,000 training images), from the difference of two runs of N and 2N steps, so
     start-up, compilation and warm-up cancel;
  4. MoG iterations per second (mog_topk.py, the same difference method);
  5. FID-50k wall time: 50,000 generated images through the Inception network (random weights: the same
     computation as the real ones) plus the Fréchet distance, as `metrics.evaluate_generator` runs it.
Targets (issue "CUDA readiness"): DCGAN default command >= 4,600 images/s on an H100 (the seed's 3080 Ti average),
fast path >= 10x that (500 epochs <= 9 minutes). The report prints each target with met / NOT met.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import metrics  # noqa: E402

SEED_IMAGES_PER_S = 500 * 49_920 / (90 * 60)  # the seed experiment: 500 epochs of 390 x 128 images in 1 h 30
DEFAULT_COMMAND = "--topk --mu 64 --gamma 0.99"
FAST_PATH = "--topk --mu 64 --gamma 0.99 --amp bf16 --compile --channels-last"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cuda:N")
    p.add_argument("--skip-tests", action=argparse.BooleanOptionalAction, default=False,
                   help="skip the CUDA test tier (measurements only)")
    p.add_argument("--steps", type=int, default=200,
                   help="N of the improved-GAN and MoG timings (runs of N and 2N steps; DCGAN: bench_dcgan's 400)")
    p.add_argument("--fid-samples", type=int, default=50_000, help="generated images of the FID timing")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args()
    try:
        device = common.pick_device(args.device)
    except common.UserError as e:
        p.exit(2, f"error: {e}\n")
    if device.type != "cuda":
        p.exit(2, "error: gpu_report measures a CUDA GPU: --device must be cuda or cuda:N\n")
    args.device = str(device)
    return args


def sh(cmd: list[str], env_extra: dict | None = None, timeout: float = 1800) -> tuple[int, str, float]:
    """Run a command in the repository; (exit status, stdout + stderr, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **(env_extra or {})), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def test_tier() -> dict:
    code, out, wall = sh([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"])
    summary = [line for line in out.splitlines() if " passed" in line or " failed" in line or " error" in line]
    print(out[-6000:] if code else (summary[-1] if summary else out[-2000:]), flush=True)
    return {"exit_status": code, "summary": summary[-1] if summary else "", "wall_s": wall}


def dcgan(args, tmp: Path) -> dict:
    """bench_dcgan.py twice: default command vs the reference loop, then the fast path alone."""
    results = {}
    for name, flags, ref in (("default", DEFAULT_COMMAND, True), ("fast", FAST_PATH, False)):
        path = tmp / f"dcgan_{name}.json"
        cmd = [sys.executable, "benchmarks/bench_dcgan.py", "--device", args.device, f"--fast-args={flags}",
               "--json", str(path), *([] if ref else ["--skip-reference"])]
        code, out, _ = sh(cmd)
        print(out[-1500:], flush=True)
        results[name] = json.loads(path.read_text()) if code == 0 and path.is_file() else {"error": out[-500:]}
    return results


def per_step_seconds(argv: list[str], steps: int, tmp: Path, name: str) -> float | None:
    """Seconds per training step of a script: wall(2N steps) - wall(N steps), divided by N (start-up cancels)."""
    walls = []
    for n in (steps, 2 * steps):
        code, out, wall = sh([sys.executable, *argv, "--max-steps", str(n), "--out-dir", str(tmp / f"{name}_{n}")])
        if code != 0:
            print(f"{name}: exit {code}: {out.strip().splitlines()[-1] if out.strip() else ''}", flush=True)
            return None
        walls.append(wall)
    return (walls[1] - walls[0]) / steps


def improved_gan(args, tmp: Path) -> dict:
    common_flags = ["--device", args.device, "--dataset", "fake", "--epochs", "10", "--topk"]
    configs = {
        # (argv, steps per epoch at the papers' sizes: 50,000 / 100 and 60,000 / 100)
        "cifar_feature_matching": (["improved_gan_cifar.py", *common_flags, "--fake-size", "50000", "--no-fid",
                                    "--save-every", "0"], 500),
        "cifar_minibatch_disc": (["improved_gan_cifar.py", *common_flags, "--fake-size", "50000", "--no-fid",
                                  "--model", "minibatch-disc", "--save-every", "0"], 500),
        "mnist": (["improved_gan_mnist.py", *common_flags, "--fake-size", "60000", "--eval-every", "100"], 600),
    }
    results = {}
    for name, (argv, steps_per_epoch) in configs.items():
        for label, extra in (("fp32", []), ("bf16+compile", ["--amp", "bf16", "--compile"])):
            s = per_step_seconds(argv + extra, args.steps, tmp, f"{name}_{label}")
            results[f"{name} {label}"] = None if s is None else {"s_per_step": s, "s_per_epoch": s * steps_per_epoch}
            shown = "failed" if s is None else f"{s * steps_per_epoch:.1f} s/epoch"
            print(f"{name} {label}: {shown}", flush=True)
    return results


def mog(args, tmp: Path) -> dict:
    argv = ["mog_topk.py", "--device", args.device, "--topk", "--iterations", "100000", "--eval-every", "100000",
            "--save-every", "100000", "--log-every", "100"]
    s = per_step_seconds(argv, 10 * args.steps, tmp, "mog")
    print(f"mog: {'failed' if s is None else f'{1 / s:.0f} it/s'}", flush=True)
    return {"it_per_s": None if s is None else 1 / s}


def fid_timing(args) -> dict:
    """FID-50k as the scripts run it: generated batches -> uint8 -> Inception -> moments, then Fréchet distance."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = metrics.FIDInceptionV3().to(device).eval().requires_grad_(False)  # random weights, same computation
    gen = torch.Generator(device=device).manual_seed(0)

    def sample_fn(n):
        return torch.rand(n, 3, 32, 32, generator=gen, device=device) * 2 - 1

    dims = 2048
    ref_mu, ref_sigma = torch.zeros(dims, dtype=torch.float64), torch.eye(dims, dtype=torch.float64)
    metrics.evaluate_generator(sample_fn, 1000, ref_mu, ref_sigma, net, batch_size=250, device=device)  # warm-up
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    metrics.evaluate_generator(sample_fn, args.fid_samples, ref_mu, ref_sigma, net, batch_size=250, device=device)
    total = time.perf_counter() - t0
    mu, sigma = torch.randn(dims, dtype=torch.float64), torch.eye(dims, dtype=torch.float64) * 2
    t0 = time.perf_counter()
    metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)
    frechet = time.perf_counter() - t0
    print(f"FID-{args.fid_samples}: {total:.1f} s (Fréchet distance alone {frechet:.2f} s)", flush=True)
    return {"samples": args.fid_samples, "wall_s": total, "frechet_s": frechet}


def fmt_time(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main():
    args = parse_args()
    name = torch.cuda.get_device_name(torch.device(args.device))
    print(f"gpu_report: {name} | torch {torch.__version__} | CUDA {torch.version.cuda}", flush=True)
    report = {"device": name, "torch": torch.__version__}
    t_start = time.perf_counter()
    if not args.skip_tests:
        report["tests"] = test_tier()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report["dcgan"] = dcgan(args, tmp)
        report["improved_gan"] = improved_gan(args, tmp)
        report["mog"] = mog(args, tmp)
    report["fid"] = fid_timing(args)
    report["wall_s"] = time.perf_counter() - t_start

    # ---- the table ----
    rows = []
    if "tests" in report:
        rows.append(("CUDA test tier", report["tests"]["summary"] or f"exit {report['tests']['exit_status']}"))
    for key, label in (("default", f"DCGAN default command ({DEFAULT_COMMAND})"), ("fast", "DCGAN fast path (+ --amp "
                                                                                          "bf16 --compile --channels-last)")):
        res = report["dcgan"][key].get("fast")
        if res:
            ips = res["images_per_s"]
            mem = res.get("peak_memory_gb")
            rows.append((label, f"{ips:,.0f} images/s | 500 epochs {fmt_time(res['projected_500_epochs_s'])} | "
                                f"{ips / SEED_IMAGES_PER_S:.1f}x the seed's 3080 Ti | peak "
                                f"{'-' if mem is None else f'{mem:.2f} GiB'}"))
    ref = report["dcgan"]["default"].get("reference")
    if ref:
        rows.append(("DCGAN reference loop (DataLoader, fp32, eager)", f"{ref['images_per_s']:,.0f} images/s | "
                                                                        f"500 epochs {fmt_time(ref['projected_500_epochs_s'])}"))
    for key, value in report["improved_gan"].items():
        rows.append((f"improved-GAN {key}", "failed" if value is None else f"{value['s_per_epoch']:.1f} s/epoch"))
    mog_rate = report["mog"]["it_per_s"]
    rows.append(("MoG (mog_topk.py --topk)", "failed" if mog_rate is None else f"{mog_rate:,.0f} it/s"))
    rows.append((f"FID-{report['fid']['samples'] // 1000}k (Inception + Fréchet, random weights)",
                 f"{report['fid']['wall_s']:.1f} s (Fréchet {report['fid']['frechet_s']:.2f} s)"))
    default_ips = (report["dcgan"]["default"].get("fast") or {}).get("images_per_s")
    fast_ips = (report["dcgan"]["fast"].get("fast") or {}).get("images_per_s")
    if default_ips:
        rows.append(("target: default >= 4,600 images/s", "met" if default_ips >= 4600 else "NOT met"))
    if fast_ips:
        rows.append(("target: fast path >= 46,000 images/s (500 epochs <= 9 min)",
                     "met" if fast_ips >= 46_000 else "NOT met"))
    width = max(len(r[0]) for r in rows)
    print(f"\n## GPU report: {name}, torch {torch.__version__} ({report['wall_s'] / 60:.1f} min)\n")
    print(f"| {'what':{width}s} | figure |\n|{'-' * (width + 2)}|---|")
    for label, value in rows:
        print(f"| {label:{width}s} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
