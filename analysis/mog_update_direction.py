"""Where does one generator update move the samples? Top-k versus bottom-k (Sinha et al. 2020, Figure 2).

From a mid-training checkpoint of mog_topk.py, with identical starting weights, take one generator step on the
k highest-scored fakes (top-k) of a large batch and, separately, one on the k lowest-scored fakes (bottom-k).
For every sample z of the batch, the displacement G_after(z) - G_before(z) is compared with the direction from
G_before(z) to its nearest mode centre (cosine similarity), and the cosines are histogrammed by the sample's distance
to that mode in units of sigma: [0, 1), [1, 2), [2, 3), [3, 4), >= 4. The paper's claim: the top-k update moves
samples towards their nearest mode, the bottom-k update much less so.

Details (the paper leaves them open):
  * The step is a plain gradient step (SGD, --lr) of the non-saturating loss -log sigmoid(D(G(z))) averaged over the
    k selected fakes, so the displacement is the gradient direction itself and not mixed with Adam's momentum from
    earlier steps (`--optimizer adam` uses the checkpoint's Adam state and learning rate instead).
  * Computed in float64, so tiny displacements are not rounding noise; D is fixed (its weights are not updated).
  * Statistics over all samples of the batch (`all`) and over the k samples that formed the loss (`selected`).

  * Significance per checkpoint: the two steps start from the same weights and the same batch, so the per-sample
    difference cos_topk - cos_bottomk is paired; `p` is the two-sided paired t-test of its mean over all samples
    (scipy.stats.ttest_rel). It says whether, at that checkpoint, the top-k step points more towards the modes than
    the bottom-k step; agreement across seeds and checkpoints is the count in summary.md, not a p-value.

Examples:
    python analysis/mog_update_direction.py --checkpoint runs/table1/mog25_topk__1__<t>/checkpoints/step_0020000.pt \\
        --batch-size 10000 --k 5000
    python analysis/mog_update_direction.py --checkpoint runs/*/checkpoints/step_00{15,20}000.pt --out figure2/
One checkpoint: writes update_direction.json and update_direction.png into --out (default: the checkpoint's run
folder). Several: --out is required; writes <run>_it<step>.json/.png per checkpoint and summary.md (one row per
checkpoint: mean cosine per distance bin, top-k / bottom-k, the paired p-value; then per bin in how many checkpoints
the top-k step's mean cosine is above the bottom-k step's).
A checkpoint of another script, flags of the wrong type, or an --out that cannot hold files: one `error:` line, exit
status 2, nothing written.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import metrics  # noqa: E402
import mog_topk  # noqa: E402

BIN_EDGES = [0.0, 1.0, 2.0, 3.0, 4.0, math.inf]
BIN_NAMES = ["0-1", "1-2", "2-3", "3-4", ">=4"]


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", type=str, nargs="+", required=True,
                   help="one or more checkpoints written by mog_topk.py")
    p.add_argument("--batch-size", type=int, default=10000, help="fakes in the large batch")
    p.add_argument("--k", type=int, default=None, help="fakes kept by each update (default: half the batch)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd: one plain gradient step; adam: the checkpoint's Adam (state and lr)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the sgd step")
    p.add_argument("--seed", type=int, default=0, help="seed of the large batch's latent vectors")
    p.add_argument("--out", type=str, default=None, help="output folder (default: the checkpoint's run folder)")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        raise common.UserError(f"--batch-size must be at least 2, got {args.batch_size}")
    if args.k is None:
        args.k = args.batch_size // 2
    if not 1 <= args.k <= args.batch_size:
        raise common.UserError(f"--k must be between 1 and --batch-size {args.batch_size}, got {args.k}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise common.UserError(f"--lr must be positive, got {args.lr}")
    if len(args.checkpoint) > 1 and args.out is None:
        raise common.UserError("several --checkpoint files need --out (the folder of their results and summary.md)")
    for path in args.checkpoint:
        if not Path(path).is_file():
            raise common.UserError(f"--checkpoint {path}: no such file")
    if args.out is not None:
        check_out(args.out)
    return args


def check_out(out: str) -> None:
    """Refuse an --out that is a file, lies below one, or whose nearest existing folder refuses writes."""
    probe = Path(out).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "a file, not a folder" if not probe.is_dir() else "read-only or no permission"
        raise common.UserError(f"--out {out}: cannot create folders in {probe} ({why})")


# the entries of a mog_topk.py checkpoint's args that the analysis reads
MOG_ARGS = ("latent_dim", "hidden_dim", "vbn", "minibatch_disc", "mbd_kernels", "mbd_dim", "n_modes", "grid_spacing",
            "std", "exp_name", "seed", "topk", "lr_g")


def load_models(state: dict, checkpoint: str):
    """G and D of a mog_topk.py checkpoint, in float64, and the run's arguments as a namespace; a checkpoint of
    another script (a dcgan one: other args, other weights) is a UserError."""
    missing = [k for k in MOG_ARGS if k not in state["args"]]
    if missing:
        raise common.UserError(f"{checkpoint} is not a mog_topk.py checkpoint (its args lack {', '.join(missing[:4])})")
    a = argparse.Namespace(**{"hidden_layers": 3, **state["args"]})  # runs older than --hidden-layers had 3
    try:
        G = mog_topk.Generator(a.latent_dim, a.hidden_dim, vbn=a.vbn, hidden_layers=a.hidden_layers)
        D = mog_topk.Discriminator(a.hidden_dim, a.mbd_kernels if a.minibatch_disc else 0, a.mbd_dim,
                                   hidden_layers=a.hidden_layers)
        if a.vbn:
            G.z_ref = torch.zeros_like(state["G"]["z_ref"])
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise common.UserError(f"{checkpoint}: its weights do not fit mog_topk.py's models ({common.describe(e)})") from None
    return G.double(), D.double().requires_grad_(False), a


def one_step(G, D, z, idx, optimizer: str, lr: float, opt_state=None):
    """A copy of G after one step of the non-saturating loss on the fakes G(z)[idx]."""
    G1 = copy.deepcopy(G)
    if optimizer == "sgd":
        opt = torch.optim.SGD(G1.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam(G1.parameters())
        opt.load_state_dict(opt_state)
        for group in opt.param_groups:  # keep float64 moments (the checkpoint's are float32)
            for p in group["params"]:
                for key, value in opt.state[p].items():
                    if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                        opt.state[p][key] = value.double()
    loss = F.softplus(-D(G1(z[idx]))).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return G1


def direction_stats(before: np.ndarray, after: np.ndarray, centers: np.ndarray, std: float):
    """Per-sample cosine between displacement and direction to the nearest centre, and distance to it in sigma."""
    d2 = ((before[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    to_mode = centers[nearest] - before
    dist_sigma = np.sqrt(d2[np.arange(len(before)), nearest]) / std
    move = after - before
    denom = np.linalg.norm(move, axis=1) * np.linalg.norm(to_mode, axis=1)
    cos = np.where(denom > 0, (move * to_mode).sum(1) / np.maximum(denom, 1e-300), 0.0)
    return cos, dist_sigma


def histogram(cos: np.ndarray, dist_sigma: np.ndarray) -> list[dict]:
    rows = []
    for name, lo, hi in zip(BIN_NAMES, BIN_EDGES[:-1], BIN_EDGES[1:]):
        m = (dist_sigma >= lo) & (dist_sigma < hi)
        c = cos[m]
        rows.append({"bin_sigma": name, "count": int(m.sum()),
                     "mean_cos": float(c.mean()) if len(c) else None,
                     "std_cos": float(c.std()) if len(c) else None,
                     "median_cos": float(np.median(c)) if len(c) else None,
                     "frac_towards_mode": float((c > 0).mean()) if len(c) else None})
    return rows


def bar_chart(path: Path, result: dict, title: str) -> None:
    """Grouped bars (Pillow): mean cosine per distance bin, top-k (blue) beside bottom-k (red), all samples."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 640, 400, 60, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    y_of = lambda v: top + (1.0 - v) / 2.0 * (H - top - bottom)  # noqa: E731  (cosine -1..1 on the axis)
    draw.line([(left, top), (left, H - bottom)], fill="black")
    for v in (-1.0, -0.5, 0.0, 0.5, 1.0):
        draw.line([(left - 4, y_of(v)), (W - right, y_of(v))], fill=(220, 220, 220) if v else (0, 0, 0))
        draw.text((8, y_of(v) - 6), f"{v:+.1f}", fill="black")
    slot = (W - left - right) / len(BIN_NAMES)
    colours = {"topk": (30, 80, 220), "bottomk": (220, 40, 40)}
    for i, name in enumerate(BIN_NAMES):
        x0 = left + i * slot
        for j, variant in enumerate(("topk", "bottomk")):
            v = result[variant]["all"][i]["mean_cos"]
            if v is None:
                continue
            xa = x0 + slot * (0.15 + 0.35 * j)
            draw.rectangle([xa, min(y_of(v), y_of(0)), xa + slot * 0.33, max(y_of(v), y_of(0))], fill=colours[variant])
        draw.text((x0 + slot * 0.3, H - bottom + 8), f"{name} sigma", fill="black")
    draw.text((left, H - 22), "distance to nearest mode; bars: mean cos(displacement, direction to mode)",
              fill="black")
    draw.text((left, 8), title, fill="black")
    draw.rectangle([W - 190, 8, W - 180, 18], fill=colours["topk"])
    draw.text((W - 175, 7), "top-k", fill="black")
    draw.rectangle([W - 110, 8, W - 100, 18], fill=colours["bottomk"])
    draw.text((W - 95, 7), "bottom-k", fill="black")
    img.save(path)


def load(checkpoint: str, args) -> tuple:
    """(state, G, D, the run's args) of a mog_topk.py checkpoint; UserError when it is none or does not fit args."""
    state = common.load_checkpoint(checkpoint)
    for key in ("G", "D", "opt_g", "step"):
        if key not in state:
            raise common.UserError(f"{checkpoint} is not a mog_topk.py checkpoint (no {key!r})")
    G, D, run_args = load_models(state, checkpoint)
    if run_args.minibatch_disc and args.batch_size > 2048:
        raise common.UserError("with minibatch discrimination D compares every pair of the batch: "
                               "use --batch-size <= 2048")
    return state, G, D, run_args


def analyse(checkpoint: str, loaded: tuple, args, out: Path, stem: str) -> dict:
    """Run both one-step updates from one loaded checkpoint; write <stem>.json and <stem>.png into `out`."""
    state, G, D, run_args = loaded
    centers = np.asarray(metrics.grid_centers(run_args.n_modes, run_args.grid_spacing), dtype=np.float64)
    std = float(run_args.std)
    z = torch.randn(args.batch_size, run_args.latent_dim, generator=torch.Generator().manual_seed(args.seed),
                    dtype=torch.float64)

    with torch.no_grad():
        before = G(z)
        scores = D(before)
    before_np = before.numpy()
    result = {"checkpoint": str(checkpoint), "run": Path(checkpoint).resolve().parent.parent.name,
              "exp_name": run_args.exp_name, "run_seed": run_args.seed, "step": int(state["step"]),
              "n_modes": run_args.n_modes, "run_topk": bool(run_args.topk), "batch_size": args.batch_size,
              "k": args.k, "optimizer": args.optimizer, "lr": args.lr if args.optimizer == "sgd" else run_args.lr_g,
              "seed": args.seed, "bins_sigma": BIN_NAMES}
    cos_of = {}
    for variant, largest in (("topk", True), ("bottomk", False)):
        idx = common.select_topk(scores, args.k, largest=largest)
        G1 = one_step(G, D, z, idx, args.optimizer, args.lr, state["opt_g"])
        with torch.no_grad():
            after = G1(z).numpy()
        cos, dist = direction_stats(before_np, after, centers, std)
        sel = np.zeros(args.batch_size, dtype=bool)
        sel[idx.numpy()] = True
        cos_of[variant] = cos
        result[variant] = {"all": histogram(cos, dist), "selected": histogram(cos[sel], dist[sel]),
                           "mean_cos_all": float(cos.mean()), "mean_cos_selected": float(cos[sel].mean()),
                           "selected_dist_sigma_median": float(np.median(dist[sel]))}
    _, dist = direction_stats(before_np, before_np, centers, std)
    result["dist_sigma_counts"] = [int(((dist >= lo) & (dist < hi)).sum()) for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:])]
    result["paired_p_all"] = paired_p(cos_of["topk"], cos_of["bottomk"])

    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        common.write_json(out / f"{stem}.json", result)
        bar_chart(out / f"{stem}.png", result,
                  f"{run_args.n_modes} modes, iteration {state['step']}, batch {args.batch_size}, k {args.k}, "
                  f"{args.optimizer}")
    return result


@contextmanager
def writing(out: Path):
    """An OSError while writing into `out` becomes a UserError (one line)."""
    try:
        yield
    except OSError as e:
        raise common.UserError(f"cannot write into {out}: {e.strerror or common.describe(e)}") from None


def paired_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided paired t-test p-value of mean(a - b) = 0 (None when a - b is constant: no spread to test)."""
    from scipy import stats

    diff = a - b
    if not np.any(diff != diff[0]):
        return None
    return float(stats.ttest_rel(a, b).pvalue)


def fmt_cos(v) -> str:
    return "–" if v is None else f"{v:+.3f}"


def fmt_p(p) -> str:
    return "–" if p is None else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def summary_markdown(results: list[dict]) -> str:
    """The table of several checkpoints (one row each) and, per bin, in how many the top-k step is ahead."""
    head = "| run | iteration | " + " | ".join(f"{b}σ" for b in BIN_NAMES) + " | all | paired p (all) |"
    lines = ["Mean cosine between each sample's displacement and the direction to its nearest mode, "
             "top-k step / bottom-k step (one step each from the same weights and batch).", "",
             head, "|" + "---|" * (len(BIN_NAMES) + 4)]
    for r in results:
        cells = [f"{fmt_cos(t['mean_cos'])} / {fmt_cos(b['mean_cos'])}" for t, b in zip(r["topk"]["all"], r["bottomk"]["all"])]
        lines.append(f"| {r['run']} | {r['step']} | " + " | ".join(cells) +
                     f" | {r['topk']['mean_cos_all']:+.3f} / {r['bottomk']['mean_cos_all']:+.3f} | {fmt_p(r['paired_p_all'])} |")
    ahead = []
    for i, name in enumerate(BIN_NAMES):
        pairs = [(r["topk"]["all"][i]["mean_cos"], r["bottomk"]["all"][i]["mean_cos"]) for r in results]
        pairs = [(t, b) for t, b in pairs if t is not None and b is not None]
        ahead.append(f"{name}σ: {sum(t > b for t, b in pairs)} of {len(pairs)}")
    def count(sign: int):  # checkpoints where sign * (top-k - bottom-k) > 0 over all samples, and how many at p < 0.05
        rows = [r for r in results if sign * (r["topk"]["mean_cos_all"] - r["bottomk"]["mean_cos_all"]) > 0]
        return len(rows), sum(r["paired_p_all"] is not None and r["paired_p_all"] < 0.05 for r in rows)

    (top, top_sig), (bottom, bottom_sig) = count(+1), count(-1)
    lines += ["", "Top-k step ahead of the bottom-k step (checkpoints): " + ", ".join(ahead) +
              f"; all samples: {top} of {len(results)} ({top_sig} of them with paired p < 0.05). Bottom-k step ahead "
              f"over all samples: {bottom} of {len(results)} ({bottom_sig} with paired p < 0.05)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    results = []
    loaded = [load(checkpoint, args) for checkpoint in args.checkpoint]  # all refusals come before any output
    for checkpoint, state in zip(args.checkpoint, loaded):
        if len(args.checkpoint) == 1:
            out, stem = (Path(args.out) if args.out else Path(checkpoint).resolve().parent.parent), "update_direction"
        else:
            out = Path(args.out)
            stem = f"{Path(checkpoint).resolve().parent.parent.name}_it{Path(checkpoint).stem.split('_')[-1]}"
        result = analyse(checkpoint, state, args, out, stem)
        results.append(result)
        print(f"{result['run']} iteration {result['step']}")
        print(f"{'bin (sigma)':>12} {'n':>6} {'top-k cos':>10} {'bottom-k cos':>13}")
        for i, name in enumerate(BIN_NAMES):
            t, b = result["topk"]["all"][i], result["bottomk"]["all"][i]
            print(f"{name:>12} {t['count']:>6} {fmt_cos(t['mean_cos']):>10} {fmt_cos(b['mean_cos']):>13}")
        print(f"mean over all samples: top-k {result['topk']['mean_cos_all']:+.3f}, "
              f"bottom-k {result['bottomk']['mean_cos_all']:+.3f} (paired p {fmt_p(result['paired_p_all'])}); "
              f"wrote {out / (stem + '.json')}", flush=True)
    if len(results) > 1:
        text = summary_markdown(results)
        with writing(Path(args.out)):
            (Path(args.out) / "summary.md").write_text(text)
        print(text, end="")
    return results[0] if len(results) == 1 else results


if __name__ == "__main__":
    common.run_cli(main)
