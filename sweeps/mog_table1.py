"""Reproduce Table 1 of Sinha et al. 2020 (top-k GAN on mixtures of 25 / 64 / 100 Gaussians, 50k iterations).

A preset of the sweep runner `sweeps/run.py`: it runs `mog_topk.py` once per (seed, modes, variant) cell through
run.py's engine (run_jobs), `--jobs` at a time, then prints and writes `<out-dir>/table1.md`: % high-quality samples,
% modes recovered and reverse KL, mean ± std over the seeds that finished, beside the paper's numbers.
Cell (modes, variant, seed) is `mog_topk.py --n-modes M --iterations I <variant flags> <config flags>
[--keep-checkpoints] <--extra> --seed S --out-dir <out-dir>[/<config>] --exp-name mog{M}_{variant} --device cpu
--threads T`, so its run folder is `<out-dir>[/<config>]/mog{M}_{variant}__{S}__<unix time>/`.

  * Work is ordered seed-major (every cell of seed 1, then seed 2, ...), so a sweep cut short still gives a complete
    table with fewer seeds.
  * As in run.py: a cell whose run folder already holds a summary.json is skipped (re-running the same command
    continues a sweep); an interrupted one (checkpoints/last.pt, no summary.json) is resumed from its checkpoint; a
    cell's run is locked while it runs (<folder>/sweep/locks/), so two sweeps side by side never run it twice; a run
    folder made with other flags is an error; every flag list is checked by mog_topk.py's own parser before anything
    starts. Logs and the journal: <folder>/sweep/logs/, <folder>/sweep/runs.jsonl. A failed cell is reported, the
    others go on, and the exit status is 1. The table counts a run when its summary.json has step == --iterations.
  * `--report-only` only builds the table from the run folders already in `--out-dir`; `--dry-run` prints the
    command of every cell that would start (with --resume where it continues) and runs nothing. A run folder counts
    by its args.json (exp_name, seed, script), not its name; one whose summary.json cannot be read, or lacks a
    metric, is unfinished.
  * A user mistake (a bad flag value, an unwritable --out-dir, `--extra` flags that set what names a cell:
    --n-modes, --iterations, --topk, --bottomk, --setup) is one `error:` line and exit status 2; the engine's exit
    statuses otherwise (1 a cell failed, 3 a cell was busy in another sweep, 130 interrupted).

Variants: gan (plain), topk (--topk), bottomk (--topk --bottomk: the analysis control of Figure 2).

Setup study (README, "MoG setup study"). `--config NAME` runs the cells in one setup of CONFIGS below (run folders in
`<out-dir>/<config>/`; a config's runs are `mog_topk.py --setup <config>`); `--study` runs the pre-registered study: every config of CONFIGS at 25 modes, GAN and top-k,
the GAN cells of every config first (they alone decide the setup), then the top-k cells, and writes
`<out-dir>/study.md`. Decision rule (fixed before any study run): the config whose GAN row at 25 modes is closest to the
paper's GAN row, |HQ - 85.6| + |modes - 100| in percentage points, mean over seeds. `--config chosen` then means
the config that rule picks from the finished study runs (an error while any GAN cell of the study is missing).
A config's GAN cell that differs from another config's only in top-k flags is the same run (the k schedule does not
exist without --topk): `slowk`'s GAN row is `base`'s GAN run, not a second run of identical maths.

Every job runs with one thread per job (`--threads` and OMP_NUM_THREADS = cores // jobs): two 1-thread jobs on two
cores, never one 2-thread job beside another.

Examples:
    python sweeps/mog_table1.py --modes 25 64 100 --seeds 1 2 3 --variants gan topk --jobs 2 --out-dir runs/table1
    python sweeps/mog_table1.py --study --seeds 1 2 3 --jobs 2 --out-dir runs/mog_study
    python sweeps/mog_table1.py --config chosen --modes 25 64 100 --variants gan topk bottomk --jobs 2 \\
        --out-dir runs/mog_study
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sweep_runner", Path(__file__).resolve().parent / "run.py")
engine = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # sweeps/run.py, the engine of the runs
_spec.loader.exec_module(engine)
common, UserError = engine.common, engine.UserError

# Table 1 of the paper (50k iterations): % high-quality samples and % modes recovered.
PAPER = {
    25: {"gan": (85.6, 100.0), "topk": (95.5, 100.0)},
    64: {"gan": (73.8, 96.2), "topk": (81.8, 100.0)},
    100: {"gan": (40.3, 94.6), "topk": (54.7, 100.0)},
}
VARIANT_FLAGS = {"gan": [], "topk": ["--topk"], "bottomk": ["--topk", "--bottomk"]}
PAPER_GAN_25 = PAPER[25]["gan"]

# The setup study: config -> its change from `base`, in mog_topk.py flags. A config runs as `mog_topk.py --setup
# <config>` (mog_topk.SETUPS holds the values; tests/test_mog_study.py checks that both say the same). Batch size is
# the script's default 256, so 0.75 * B = 192.
CONFIGS = {
    "base": "none: --grid-spacing 2 --hidden-layers 3 --beta1 0.5 --beta2 0.999, top-k: --iters-per-epoch 500 --mu 128",
    "spacing1": "--grid-spacing 1",                       # centres at {-2, ..., 2}^2 (JAX-GAN)
    "depth4": "--hidden-layers 4",                        # 4 hidden layers of 256 in G and D (JAX-GAN)
    "slowk": "top-k: --iters-per-epoch 2000 --mu 192",    # k x 0.99 every 2,000 iterations, floor 0.75 B (JAX-GAN)
    "betas": "--beta1 0.9 --beta2 0.99",                  # Adam betas of JAX-GAN
    "all": "--grid-spacing 1 --hidden-layers 4 --beta1 0.9 --beta2 0.99, top-k: --iters-per-epoch 2000 --mu 192",
}
# GAN runs that are another config's: slowk changes only the k schedule, which does not exist without --topk.
SAME_GAN_RUN = {"slowk": "base"}


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--modes", type=int, nargs="+", default=[25, 64, 100], help="numbers of Gaussians")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (outer loop of the work order)")
    p.add_argument("--variants", nargs="+", default=["gan", "topk"], choices=sorted(VARIANT_FLAGS),
                   help="gan, topk, bottomk")
    p.add_argument("--config", type=str, default=None,
                   help=f"run the cells in one setup of the study ({', '.join(CONFIGS)}, or 'chosen': the study's "
                        "decision); run folders in <out-dir>/<config>/. Default: the script's own defaults, run "
                        "folders in <out-dir>/")
    p.add_argument("--study", action=argparse.BooleanOptionalAction, default=False,
                   help="run the pre-registered setup study (all configs, 25 modes, gan and topk) and write study.md")
    p.add_argument("--keep-checkpoints", action=argparse.BooleanOptionalAction, default=True,
                   help="keep every --save-every checkpoint of each run (the Figure 2 analysis reads them)")
    p.add_argument("--iterations", type=int, default=50000, help="iterations per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--cores", type=int, default=engine.available_cores(),
                   help="CPU cores shared by the jobs (at most the cores this process may use)")
    p.add_argument("--out-dir", type=str, default="runs/table1", help="parent folder of the run folders and table1.md")
    p.add_argument("--report-only", action=argparse.BooleanOptionalAction, default=False,
                   help="only build the table from existing run folders")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command of every cell that would start (and which are finished), run nothing")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further flags passed to every mog_topk.py run (put last)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.iterations < 1 or args.cores < 1:
        raise UserError("--jobs, --iterations and --cores must be positive")
    if args.config is not None and args.config not in CONFIGS and args.config != "chosen":
        raise UserError(f"--config must be one of {', '.join(CONFIGS)}, chosen; got {args.config!r}")
    if args.study and args.config is not None:
        raise UserError("--study runs every config: drop --config")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds: a seed given twice in {' '.join(map(str, args.seeds))}")
    engine.check_flags("--extra", args.extra, CELL_FLAGS, "names the cell, so the preset sets it (use --modes, "
                       "--iterations, --variants, --config)")
    engine.check_out_dir(args.out_dir)
    return args


# mog_topk.py flags that make a cell what its name says (mog{M}_{variant}, the config's folder): not in --extra
CELL_FLAGS = ("--n-modes", "--iterations", "--topk", "--no-topk", "--bottomk", "--no-bottomk", "--setup")


def exp_name(modes: int, variant: str) -> str:
    return f"mog{modes}_{variant}"


def config_flags(config: str | None, variant: str) -> list[str]:
    """mog_topk.py flags of one config (the script applies a setup's k schedule to --topk runs only)."""
    if config is None:
        return []
    return ["--setup", SAME_GAN_RUN.get(config, config) if variant == "gan" else config]


def cell_folder(out_root: Path, config: str | None, variant: str) -> Path:
    """Folder of a cell's run folders: <out-root>/<config>/, where a GAN cell of a config in SAME_GAN_RUN uses the
    other config's folder (slowk's GAN run is base's: same settings, same seed, same run)."""
    if config is None:
        return out_root
    if variant == "gan":
        return out_root / SAME_GAN_RUN.get(config, config)
    return out_root / config


def find_runs(folder: Path, modes: int, variant: str, seed: int) -> list[Path]:
    """Run folders of one cell (normally one), newest first: those whose args.json records its exp_name, seed and
    mog_topk.py (sweeps/run.py's run_folders)."""
    return [path for path, a in engine.run_folders(folder, exp_name(modes, variant), seed, "mog_topk") if a]


SUMMARY_KEYS = ("high_quality", "modes_recovered", "reverse_kl", "it_per_s", "seed", "step")


def summary_of(run: Path, iterations: int) -> dict | None:
    """The run's summary.json when it is readable, has every number the tables use and step == iterations."""
    s = engine.read_json(run / "summary.json")
    if s is None or any(engine.number(s, k) is None for k in SUMMARY_KEYS) or s["step"] != iterations \
            or not s["it_per_s"] > 0:
        return None
    return s


def cell_state(folder: Path, modes: int, variant: str, seed: int, iterations: int):
    """('done', folder) | ('resume', last.pt) | ('new', None)."""
    for run in find_runs(folder, modes, variant, seed):
        if summary_of(run, iterations) is not None:
            return "done", run
        last = run / "checkpoints" / "last.pt"
        if last.is_file():
            return "resume", last
    return "new", None


def cell_jobs(out_root: Path, work, args) -> list[tuple]:
    """run.py jobs (out_dir, exp_name, seed, flags, expected values) of [(config, modes, variant, seed)], in order;
    the expected values are what names the cell, so an abbreviation in --extra cannot change them."""
    return [(cell_folder(out_root, config, variant), exp_name(modes, variant), seed,
             ["--n-modes", str(modes), "--iterations", str(args.iterations), *VARIANT_FLAGS[variant],
              *config_flags(config, variant), *(["--keep-checkpoints"] if args.keep_checkpoints else []), *args.extra],
             {"n_modes": modes, "iterations": args.iterations, "topk": variant != "gan", "bottomk": variant == "bottomk",
              **({"setup": config_flags(config, variant)[1]} if config else {})})
            for config, modes, variant, seed in work]


def finished(out_root: Path, config: str | None, modes: int, variant: str, seeds, iterations) -> list[dict]:
    """Summaries of the finished runs of one cell, in seed order."""
    rows = []
    for seed in seeds:
        state, run = cell_state(cell_folder(out_root, config, variant), modes, variant, seed, iterations)
        if state == "done":
            rows.append(summary_of(run, iterations))
    return rows


def in_progress(out_root: Path, config, modes_list, variants, seeds, iterations):
    """[(modes, variant, seed, latest eval record)] of cells that have a run folder but no finished run."""
    rows = []
    for seed in seeds:
        for modes in modes_list:
            for variant in variants:
                folder = cell_folder(out_root, config, variant)
                if cell_state(folder, modes, variant, seed, iterations)[0] == "done":
                    continue
                for run in find_runs(folder, modes, variant, seed):
                    evals = [r for r in engine.read_jsonl(run / "metrics.jsonl") if (engine.number(r, "step") or 0) > 0
                             and all(engine.number(r, f"eval/{k}") is not None for k, *_ in METRICS)]
                    if evals:
                        rows.append((modes, variant, seed, evals[-1]))
                        break
    return rows


def fmt_seeds(values, digits=1):
    """fmt(values) followed by the per-seed values in brackets when there are several."""
    if len(values) < 2:
        return fmt(values, digits)
    return f"{fmt(values, digits)} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def fmt(values, digits=1):
    """Mean ± sample std of `values` with `digits` decimals; the value alone for one seed, – for none."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(out_root: Path, config, modes_list, variants, seeds, iterations) -> str:
    """Table 1 of one config (or of the script's defaults) as markdown; also written to <folder>/table1.md."""
    folder = out_root / config if config else out_root
    where = f" Setup: config `{config}` (`mog_topk.py --setup {config}`; change from base: {CONFIGS[config]})." \
        if config else ""
    lines = [f"Table 1 reproduction: mixture of Gaussians, {iterations} iterations, 10,000 samples, threshold 4σ "
             f"(mean ± sample std over seeds; n = seeds finished of {list(seeds)}).{where}", "",
             "| modes | variant | n | HQ % (ours) | HQ % (paper) | modes % (ours) | modes % (paper) | reverse KL (ours) "
             "| s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for modes in modes_list:
        for variant in variants:
            rows = finished(out_root, config, modes, variant, seeds, iterations)
            paper = PAPER.get(modes, {}).get(variant)
            # the whole run at its measured rate: a resumed run's wall_time_s covers its last process only
            wall = statistics.mean(r["step"] / r["it_per_s"] for r in rows) if rows else None
            seeds_done = ",".join(str(r["seed"]) for r in rows)
            lines.append(
                f"| {modes} | {variant} | {len(rows)}{f' (seeds {seeds_done})' if rows else ''} "
                f"| {fmt_seeds([100 * r['high_quality'] for r in rows])} | {paper[0] if paper else '–'} "
                f"| {fmt_seeds([100 * r['modes_recovered'] for r in rows])} | {paper[1] if paper else '–'} "
                f"| {fmt([r['reverse_kl'] for r in rows], 3)} | {f'{wall:.0f}' if wall else '–'} |")
    lines += ["", "Paper: Sinha et al. 2020, Table 1 (no error bars given; no bottom-k row). Per-seed values in brackets, "
              "in seed order. s/run: mean time of one run's training loop on this machine (its iterations at its measured "
              "it/s; for a run resumed after a stop, the it/s of its last process)."]
    if "gan" in variants and len(variants) > 1:
        lines += ["", f"Against the GAN row of the same grid, two-sided Welch t-test over seeds ({VERSUS_HEADER[0]}):", "",
                  "| modes | variant | " + VERSUS_HEADER[1], "|---|---|---|---|---|---|---|---|"]
        for modes in modes_list:
            gan = finished(out_root, config, modes, "gan", seeds, iterations)
            for variant in (v for v in variants if v != "gan"):
                other = finished(out_root, config, modes, variant, seeds, iterations)
                lines.append(f"| {modes} | {variant} | " + " | ".join(versus(other, gan)) + " |")
    partial = in_progress(out_root, config, modes_list, variants, seeds, iterations)
    if partial:
        lines += ["", "Unfinished runs (latest evaluation in metrics.jsonl; not in the table above):", "",
                  "| modes | variant | seed | iteration | HQ % | modes % | reverse KL |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {m} | {v} | {s} | {r['step']} | {100 * r['eval/high_quality']:.1f} "
                  f"| {100 * r['eval/modes_recovered']:.1f} | {r['eval/reverse_kl']:.3f} |" for m, v, s, r in partial]
    unreadable = sorted({path.name for modes in modes_list for variant in variants for seed in seeds
                         for path, a in engine.run_folders(cell_folder(out_root, config, variant),
                                                           exp_name(modes, variant), seed, "mog_topk") if a is None})
    if unreadable:
        lines += ["", f"Left out, args.json unreadable (so it cannot be told whose run it is): {', '.join(unreadable)}."]
    text = "\n".join(lines) + "\n"
    with engine.os_errors(f"cannot write {folder / 'table1.md'}"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table1.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------------
# The setup study
# ---------------------------------------------------------------------------------------------------------------
def gan_distance(rows: list[dict]) -> float:
    """The decision rule's distance of a config's 25-mode GAN runs to the paper's GAN row: mean over seeds of
    |HQ - 85.6| + |modes - 100|, in percentage points."""
    hq_paper, modes_paper = PAPER_GAN_25
    return statistics.mean(abs(100 * r["high_quality"] - hq_paper) + abs(100 * r["modes_recovered"] - modes_paper)
                           for r in rows)


def decide(out_root: Path, seeds, iterations) -> tuple[str | None, dict]:
    """(chosen config or None while a GAN cell is missing, {config: distance or None})."""
    distances = {}
    for config in CONFIGS:
        rows = finished(out_root, config, 25, "gan", seeds, iterations)
        distances[config] = gan_distance(rows) if len(rows) == len(seeds) else None
    if any(d is None for d in distances.values()):
        return None, distances
    return min(distances, key=distances.get), distances


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value of mean(a) != mean(b); None with fewer than 2 values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    import warnings

    from scipy import stats  # only the report needs scipy
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return 0.0 if statistics.mean(a) != statistics.mean(b) else 1.0
    with warnings.catch_warnings():  # one constant side (e.g. modes 100 % on every seed) is fine for Welch
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def fmt_p(p: float | None) -> str:
    """A p-value as text: 3 decimals, or 2 significant digits below 0.001 (so a small p keeps its magnitude); '–'
    for None."""
    if p is None:
        return "–"
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


def welch(a: list[float], b: list[float]) -> str:
    """welch_p as text (fmt_p)."""
    return fmt_p(welch_p(a, b))


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values of a family of tests {label: p}: the i-th smallest of m becomes
    max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where adjusted p < alpha keeps the family-wise error
    rate at alpha."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for j, label in enumerate(order):
        running = max(running, min(1.0, (len(order) - j) * pvalues[label]))
        adjusted[label] = running
    return adjusted


VERSUS_HEADER = ("p-values; variant minus GAN: HQ and modes in percentage points, reverse KL in nats",
                 "ΔHQ | p (HQ) | Δmodes | p (modes) | Δreverse KL | p (reverse KL) |")
METRICS = (("high_quality", 100, 1, "HQ"), ("modes_recovered", 100, 1, "modes"), ("reverse_kl", 1, 3, "reverse KL"))


def versus_numbers(rows: list[dict], gan_rows: list[dict]) -> list[tuple[float, float | None]] | None:
    """(difference of the means rows minus gan_rows, Welch p) of HQ %, modes % and reverse KL, over the seeds both
    sides have finished; None when they share no seed."""
    common_seeds = {r["seed"] for r in rows} & {r["seed"] for r in gan_rows}
    rows = [r for r in rows if r["seed"] in common_seeds]
    gan_rows = [r for r in gan_rows if r["seed"] in common_seeds]
    if not rows:
        return None
    out = []
    for key, scale, _, _ in METRICS:
        a, b = [scale * r[key] for r in rows], [scale * r[key] for r in gan_rows]
        out.append((statistics.mean(a) - statistics.mean(b), welch_p(a, b)))
    return out


def versus(rows: list[dict], gan_rows: list[dict]) -> list[str]:
    """versus_numbers as the six cells of a VERSUS_HEADER row ('–' where there is nothing to compare)."""
    numbers = versus_numbers(rows, gan_rows)
    if numbers is None:
        return ["–"] * 6
    return [cell for (diff, p), (_, _, digits, _) in zip(numbers, METRICS) for cell in (f"{diff:+.{digits}f}", fmt_p(p))]


def across_configs(numbers: dict) -> list[str]:
    """Lines summarising the per-config tests {config: versus_numbers(...)}: in how many configs top-k's mean is
    on each side of the GAN's, with a two-sided sign test, and which tests survive Holm-Bonferroni over the family."""
    from scipy import stats

    done = {config: n for config, n in numbers.items() if n is not None and all(p is not None for _, p in n)}
    if not done:
        return []
    lines = [f"Across the {len(done)} configs with seeds on both sides (direction of top-k minus GAN; two-sided sign "
             "test, as if the configs were independent):", ""]
    for i, (_, _, _, name) in enumerate(METRICS):
        up = sum(n[i][0] > 0 for n in done.values())
        down = sum(n[i][0] < 0 for n in done.values())
        p = stats.binomtest(up, up + down).pvalue if up + down else 1.0
        lines.append(f"- {name}: top-k higher in {up}, lower in {down} of {len(done)} (sign test p = {fmt_p(p)})")
    family = {(config, name): n[i][1] for config, n in done.items() for i, (_, _, _, name) in enumerate(METRICS)}
    adjusted = holm(family)
    kept = [f"{config} {name} (adjusted p = {fmt_p(adjusted[config, name])})"
            for config, name in sorted(adjusted, key=adjusted.get) if adjusted[config, name] < 0.05]
    lines += ["", f"Holm-Bonferroni over the {len(family)} Welch tests above (family-wise error 0.05): "
              + (", ".join(kept) if kept else "none") + " remain significant."]
    return lines


def study_report(out_root: Path, seeds, iterations) -> str:
    """The study table (config x variant, mean ± std and per seed), the decision, Welch tests; writes study.md."""
    lines = [f"MoG setup study: 25 modes, {iterations} iterations, seeds {list(seeds)} "
             "(mean ± sample std; per-seed values in seed order).", "",
             "| config | flags | variant | n | HQ % | modes % | reverse KL | HQ % per seed | modes % per seed "
             "| reverse KL per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    metric_rows = {}
    for config in CONFIGS:
        for variant in ("gan", "topk"):
            rows = finished(out_root, config, 25, variant, seeds, iterations)
            metric_rows[config, variant] = rows
            hq = [100 * r["high_quality"] for r in rows]
            modes = [100 * r["modes_recovered"] for r in rows]
            rkl = [r["reverse_kl"] for r in rows]
            flags = " ".join(config_flags(config, variant))
            same = f" (= {cell_folder(out_root, config, variant).name})" \
                if cell_folder(out_root, config, variant).name != config else ""
            lines.append(f"| {config} | `{flags}` | {variant}{same} | {len(rows)} | {fmt(hq)} | {fmt(modes)} "
                         f"| {fmt(rkl, 3)} | {', '.join(f'{v:.1f}' for v in hq) or '–'} "
                         f"| {', '.join(f'{v:.1f}' for v in modes) or '–'} "
                         f"| {', '.join(f'{v:.3f}' for v in rkl) or '–'} |")
    lines += ["", "Configs (`mog_topk.py --setup <config>`), change from base: " +
              "; ".join(f"{c}: {d}" for c, d in CONFIGS.items()) + "."]
    chosen, distances = decide(out_root, seeds, iterations)
    lines += ["", f"Decision rule (pre-registered): the config whose 25-mode GAN row is closest to the paper's GAN row "
                  f"(HQ {PAPER_GAN_25[0]}, modes {PAPER_GAN_25[1]}): mean over seeds of |HQ - {PAPER_GAN_25[0]}| + "
                  f"|modes - {PAPER_GAN_25[1]:.0f}| (percentage points).", "",
              "| config | distance |", "|---|---|"]
    lines += [f"| {c} | {'–' if d is None else f'{d:.1f}'} |" for c, d in distances.items()]
    lines += ["", f"Chosen: **{chosen}**" if chosen else "Chosen: – (GAN cells of the study still missing)", "",
              f"Top-k vs GAN, two-sided Welch t-test over seeds ({VERSUS_HEADER[0]}):", "",
              "| config | " + VERSUS_HEADER[1], "|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        cells = versus(metric_rows[config, "topk"], metric_rows[config, "gan"])
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    summary = across_configs({c: versus_numbers(metric_rows[c, "topk"], metric_rows[c, "gan"]) for c in CONFIGS})
    lines += [""] + summary if summary else []
    text = "\n".join(lines) + "\n"
    with engine.os_errors(f"cannot write {out_root / 'study.md'}"):
        out_root.mkdir(parents=True, exist_ok=True)
        (out_root / "study.md").write_text(text)
        study_plot(out_root, seeds, iterations, out_root / "study.png")
    return text


COLOURS = {"base": (90, 90, 90), "spacing1": (31, 119, 180), "depth4": (44, 160, 44), "slowk": (255, 127, 14),
           "betas": (148, 103, 189), "all": (214, 39, 40)}


def study_plot(out_root: Path, seeds, iterations, path: Path, size: tuple[int, int] = (900, 680)) -> None:
    """results/mog/study.png: HQ % (y) against modes % (x) at 25 modes, one colour per config; every seed's run as a
    light marker (circle = GAN, triangle = top-k), the seed means as solid markers joined by an arrow GAN -> top-k;
    the paper's two rows in black. Drawn with Pillow."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 70, 190, 60, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    rows = {(c, v): finished(out_root, c, 25, v, seeds, iterations) for c in COLOURS for v in ("gan", "topk")}
    values = [(100 * r["modes_recovered"], 100 * r["high_quality"]) for rs in rows.values() for r in rs]
    values += [(m, h) for h, m in (PAPER[25]["gan"], PAPER[25]["topk"])]
    # axes from a multiple of 10 below the lowest value to 100 (a tight view; the ticks say where it starts)
    x_lo = min(10.0 * math.floor(min(m for m, _ in values) / 10.0 - 0.5), 90.0)
    y_lo = min(10.0 * math.floor(min(h for _, h in values) / 10.0 - 0.5), 90.0)
    x_hi, y_hi = 101.0, 101.0  # room for markers at 100 %

    def px(modes, hq):
        return (left + (modes - x_lo) / (x_hi - x_lo) * (W - left - right),
                H - bottom - (hq - y_lo) / (y_hi - y_lo) * (H - top - bottom))

    # axes, grid, ticks and labels
    for v in range(int(x_lo), 101, 5):
        x, _ = px(v, y_lo)
        d.line([x, top, x, H - bottom], fill=(235, 235, 235))
        d.line([x, H - bottom, x, H - bottom + 5], fill="black")
        d.text((x - 6, H - bottom + 8), str(v), fill="black")
    for v in range(int(y_lo), 101, 5):
        _, y = px(x_lo, v)
        d.line([left, y, W - right, y], fill=(235, 235, 235))
        d.line([left - 5, y, left, y], fill="black")
        d.text((left - 30, y - 6), str(v), fill="black")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text(((left + W - right) / 2 - 70, H - 25), "modes recovered (%)", fill="black")
    d.text((8, top - 22), "high-quality samples (%)", fill="black")
    d.text((left, 8), f"MoG setup study: 25 modes, {iterations} iterations, seeds {list(seeds)}: GAN -> top-k",
           fill="black")

    def marker(x, y, shape, colour, r=5, fill=True):
        if shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour if fill else None, outline=colour)
        else:
            d.polygon([(x, y - r - 1), (x - r, y + r), (x + r, y + r)], fill=colour if fill else None, outline=colour)

    def light(c):
        return tuple(int(v + (255 - v) * 0.6) for v in c)

    for config, colour in COLOURS.items():
        means, drawn = {}, {}
        for variant, shape in (("gan", "circle"), ("topk", "triangle")):
            runs = rows[config, variant]
            # a GAN cell shared with another config (slowk's is base's run) is drawn once, in that config's colour
            drawn[variant] = cell_folder(out_root, config, variant).name == config
            for r in runs if drawn[variant] else []:
                marker(*px(100 * r["modes_recovered"], 100 * r["high_quality"]), shape, light(colour), r=4)
            if runs:
                means[variant] = px(statistics.mean(100 * r["modes_recovered"] for r in runs),
                                    statistics.mean(100 * r["high_quality"] for r in runs))
        if "gan" in means and "topk" in means:
            (x0, y0), (x1, y1) = means["gan"], means["topk"]
            d.line([x0, y0, x1, y1], fill=colour, width=2)
            length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1e-9)
            ux, uy = (x1 - x0) / length, (y1 - y0) / length
            d.polygon([(x1, y1), (x1 - 12 * ux + 5 * uy, y1 - 12 * uy - 5 * ux),
                       (x1 - 12 * ux - 5 * uy, y1 - 12 * uy + 5 * ux)], fill=colour)
        for variant, shape in (("gan", "circle"), ("topk", "triangle")):
            if variant in means and drawn[variant]:
                marker(*means[variant], shape, colour, r=6)
    for (hq, modes), shape in ((PAPER[25]["gan"], "circle"), (PAPER[25]["topk"], "triangle")):
        marker(*px(modes, hq), shape, (0, 0, 0), r=6, fill=False)

    # legend
    x, y = W - right + 15, top
    for config, colour in COLOURS.items():
        d.rectangle([x, y + 2, x + 12, y + 12], fill=colour)
        d.text((x + 18, y), config, fill="black")
        y += 20
    y += 10
    for text, shape, colour, fill in (("GAN (mean)", "circle", (60, 60, 60), True),
                                      ("top-k (mean)", "triangle", (60, 60, 60), True),
                                      ("one seed", "circle", light((60, 60, 60)), True),
                                      ("paper", "circle", (0, 0, 0), False)):
        marker(x + 6, y + 7, shape, colour, fill=fill)
        d.text((x + 18, y), text, fill="black")
        y += 20
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def run_all(work, out_root: Path, args, after_each) -> int:
    """Run [(config, modes, variant, seed)] through run.py's engine, `--jobs` at a time in order, one thread per job
    (cores // jobs) on the CPU; call after_each() as each one ends. The engine's exit status."""
    print(f"{len(work)} cells, {args.jobs} at a time", flush=True)
    return engine.run_jobs(cell_jobs(out_root, work, args), REPO / "mog_topk.py", out_root, workers=args.jobs,
                           cores=args.cores, devices=["cpu"], print_only=args.dry_run,
                           on_end=lambda run, status: after_each())


def main(argv=None):
    args = parse_args(argv)
    out_root = Path(args.out_dir).resolve()
    if args.study:
        # GAN cells of every config first (seed-major): they alone decide the setup; then the top-k cells
        work = [(c, 25, v, s) for v in ("gan", "topk") for s in args.seeds for c in CONFIGS
                if not (v == "gan" and cell_folder(out_root, c, v).name != c)]
        status = 0
        if not args.report_only:
            status = run_all(work, out_root, args, lambda: study_report(out_root, args.seeds, args.iterations))
            if status == 130 or args.dry_run:
                return status
        print(study_report(out_root, args.seeds, args.iterations), end="")
        return status
    config = args.config
    if config == "chosen":
        config, distances = decide(out_root, args.seeds, args.iterations)
        if config is None:
            missing = ", ".join(c for c, d in distances.items() if d is None)
            raise UserError(f"--config chosen: the study's GAN cells are not all finished in {out_root} (missing: "
                            f"{missing}); run --study first")
        print(f"config chosen by the study's decision rule: {config}", flush=True)
    status = 0
    if not args.report_only:
        # seed-major, so a sweep cut short still gives a complete table with fewer seeds
        work = [(config, m, v, s) for s in args.seeds for m in args.modes for v in args.variants]
        status = run_all(work, out_root, args, lambda: report(out_root, config, args.modes, args.variants, args.seeds,
                                                              args.iterations))
        if status == 130 or args.dry_run:
            return status
    print(report(out_root, config, args.modes, args.variants, args.seeds, args.iterations), end="")
    return status


if __name__ == "__main__":
    common.run_cli(lambda: sys.exit(main()))
