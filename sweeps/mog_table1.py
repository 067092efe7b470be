"""Reproduce Table 1 of Sinha et al. 2020 (top-k GAN on mixtures of 25 / 64 / 100 Gaussians, 50k iterations).

Runs `mog_topk.py` once per (seed, modes, variant) cell as a subprocess, `--jobs` at a time (each with
OMP_NUM_THREADS = cores / jobs), then prints and writes `<out-dir>/table1.md`: % high-quality samples,
% modes recovered and reverse KL, mean ± std over the seeds that finished, beside the paper's numbers.

  * Work is ordered seed-major (every cell of seed 1, then seed 2, ...), so a sweep cut short still gives a complete
    table with fewer seeds.
  * A cell whose run folder already holds a summary.json is skipped: re-running the same command continues a sweep.
    A cell whose run was interrupted (run folder with checkpoints/last.pt but no summary.json) is resumed from its
    checkpoint.
  * `--report-only` only builds the table from the run folders already in `--out-dir`.

Variants: gan (plain), topk (--topk), bottomk (--topk --bottomk: the analysis control of Figure 2).

Example:
    python sweeps/mog_table1.py --modes 25 64 100 --seeds 1 2 3 --variants gan topk --jobs 2 --out-dir runs/table1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Table 1 of the paper (50k iterations): % high-quality samples and % modes recovered.
PAPER = {
    25: {"gan": (85.6, 100.0), "topk": (95.5, 100.0)},
    64: {"gan": (73.8, 96.2), "topk": (81.8, 100.0)},
    100: {"gan": (40.3, 94.6), "topk": (54.7, 100.0)},
}
VARIANT_FLAGS = {"gan": [], "topk": ["--topk"], "bottomk": ["--topk", "--bottomk"]}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", type=int, nargs="+", default=[25, 64, 100], help="numbers of Gaussians")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (outer loop of the work order)")
    p.add_argument("--variants", nargs="+", default=["gan", "topk"], choices=sorted(VARIANT_FLAGS),
                   help="gan, topk, bottomk")
    p.add_argument("--iterations", type=int, default=50000, help="iterations per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU cores shared by the jobs")
    p.add_argument("--out-dir", type=str, default="runs/table1", help="parent folder of the run folders and table1.md")
    p.add_argument("--report-only", action=argparse.BooleanOptionalAction, default=False,
                   help="only build the table from existing run folders")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further flags passed to every mog_topk.py run (put last)")
    args = p.parse_args()
    if args.jobs < 1 or args.iterations < 1 or args.cores < 1:
        p.error("--jobs, --iterations and --cores must be positive")
    return args


def exp_name(modes: int, variant: str) -> str:
    return f"mog{modes}_{variant}"


def find_runs(out_dir: Path, modes: int, variant: str, seed: int) -> list[Path]:
    """Run folders of one cell (normally one), newest last."""
    return sorted(out_dir.glob(f"{exp_name(modes, variant)}__{seed}__*"))


def cell_state(out_dir: Path, modes: int, variant: str, seed: int, iterations: int):
    """('done', folder) | ('resume', last.pt) | ('new', None)."""
    for run in reversed(find_runs(out_dir, modes, variant, seed)):
        summary = run / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("step") == iterations:
            return "done", run
        last = run / "checkpoints" / "last.pt"
        if last.is_file():
            return "resume", last
    return "new", None


def run_cell(out_dir: Path, modes: int, variant: str, seed: int, args) -> str:
    state, where = cell_state(out_dir, modes, variant, seed, args.iterations)
    if state == "done":
        return f"skip  {exp_name(modes, variant)} seed {seed}: {where / 'summary.json'} exists"
    cmd = [sys.executable, str(REPO / "mog_topk.py"), "--n-modes", str(modes), "--seed", str(seed),
           "--iterations", str(args.iterations), "--out-dir", str(out_dir), "--exp-name", exp_name(modes, variant),
           "--device", "cpu", "--keep-checkpoints", *VARIANT_FLAGS[variant], *args.extra]
    if state == "resume":
        cmd += ["--resume", str(where)]
    threads = max(1, args.cores // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    log = out_dir / "logs" / f"{exp_name(modes, variant)}__{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"start {exp_name(modes, variant)} seed {seed} ({state}, {threads} thread(s)), log {log}", flush=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    took = time.time() - t0
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log})"
    return f"end   {exp_name(modes, variant)} seed {seed}: {status}, {took / 60:.1f} min"


def collect(out_dir: Path, modes_list, variants, seeds, iterations):
    """{(modes, variant): [summary, ...]} over the finished runs of the requested cells."""
    table = {}
    for modes in modes_list:
        for variant in variants:
            rows = []
            for seed in seeds:
                state, run = cell_state(out_dir, modes, variant, seed, iterations)
                if state == "done":
                    rows.append(json.loads((run / "summary.json").read_text()))
            table[(modes, variant)] = rows
    return table


def in_progress(out_dir: Path, modes_list, variants, seeds, iterations):
    """[(modes, variant, seed, latest eval record)] of cells that have a run folder but no finished run."""
    rows = []
    for seed in seeds:
        for modes in modes_list:
            for variant in variants:
                if cell_state(out_dir, modes, variant, seed, iterations)[0] == "done":
                    continue
                for run in reversed(find_runs(out_dir, modes, variant, seed)):
                    path = run / "metrics.jsonl"
                    records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
                    evals = [r for r in records if "eval/high_quality" in r and r["step"] > 0]
                    if evals:
                        rows.append((modes, variant, seed, evals[-1]))
                        break
    return rows


def fmt(values, digits=1):
    """Mean ± sample std of `values` with `digits` decimals; the value alone for one seed, – for none."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(out_dir: Path, modes_list, variants, seeds, iterations) -> str:
    table = collect(out_dir, modes_list, variants, seeds, iterations)
    lines = [f"Table 1 reproduction: mixture of Gaussians, {iterations} iterations, 10,000 samples, threshold 4σ "
             f"(mean ± sample std over seeds; n = seeds finished of {list(seeds)}).", "",
             "| modes | variant | n | HQ % (ours) | HQ % (paper) | modes % (ours) | modes % (paper) | reverse KL (ours) "
             "| s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for modes in modes_list:
        for variant in variants:
            rows = table[(modes, variant)]
            paper = PAPER.get(modes, {}).get(variant)
            wall = statistics.mean(r["wall_time_s"] for r in rows) if rows else None
            seeds_done = ",".join(str(r["seed"]) for r in rows)
            lines.append(
                f"| {modes} | {variant} | {len(rows)}{f' (seeds {seeds_done})' if rows else ''} "
                f"| {fmt([100 * r['high_quality'] for r in rows])} | {paper[0] if paper else '–'} "
                f"| {fmt([100 * r['modes_recovered'] for r in rows])} | {paper[1] if paper else '–'} "
                f"| {fmt([r['reverse_kl'] for r in rows], 3)} | {f'{wall:.0f}' if wall else '–'} |")
    lines += ["", "Paper: Sinha et al. 2020, Table 1 (no error bars given; no bottom-k row). s/run: mean wall time of "
              "one run's training loop on this machine."]
    partial = in_progress(out_dir, modes_list, variants, seeds, iterations)
    if partial:
        lines += ["", "Unfinished runs (latest evaluation in metrics.jsonl; not in the table above):", "",
                  "| modes | variant | seed | iteration | HQ % | modes % | reverse KL |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {m} | {v} | {s} | {r['step']} | {100 * r['eval/high_quality']:.1f} "
                  f"| {100 * r['eval/modes_recovered']:.1f} | {r['eval/reverse_kl']:.3f} |" for m, v, s, r in partial]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table1.md").write_text(text)
    return text


def main():
    args = parse_args()
    out_dir = Path(args.out_dir).resolve()
    if not args.report_only:
        work = [(modes, variant, seed) for seed in args.seeds for modes in args.modes for variant in args.variants]
        print(f"{len(work)} cells, {args.jobs} at a time, seed-major order", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            # submit in order; a pool of `jobs` threads starts them in that order
            futures = [pool.submit(run_cell, out_dir, m, v, s, args) for m, v, s in work]
            for future in futures:
                print(future.result(), flush=True)
                report(out_dir, args.modes, args.variants, args.seeds, args.iterations)
    print(report(out_dir, args.modes, args.variants, args.seeds, args.iterations), end="")


if __name__ == "__main__":
    main()
