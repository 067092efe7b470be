"""A minimal training script on common.Run, for tests/test_run.py: a linear model fitted by Adam to noise.

It uses every call of the run plumbing in the order the experiment scripts do, so the plumbing is tested on a run
that takes milliseconds. `--nan-at N` makes the loss of step N non-finite.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def parse_args(argv=None):
    p = common.ArgumentParser(description="toy run")
    common.add_run_flags(p, __file__, save_every=5, unit="iterations")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--lr", type=common.finite_float, default=0.01)
    p.add_argument("--nan-at", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step (signal tests)")
    return p.parse_args(None if argv is None else [str(a) for a in argv])


def main(argv=None):
    args = parse_args(argv)
    common.check_run_flags(args)
    run = common.Run(args, argv=None if argv is None else [str(a) for a in argv], allowed=("sleep", "nan_at"))
    common.seed_everything(args.seed)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    run.register(model=model, opt=opt, gen=gen)
    extra = run.start(args.iterations, torch.device("cpu"), keys=("note",))
    step = run.step
    while step < args.iterations:
        x = torch.randn(8, 4, generator=gen)
        loss = model(x).pow(2).mean() + (float("nan") if args.nan_at == step + 1 else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.add(loss=loss)
        step += 1
        if args.sleep:
            import time
            time.sleep(args.sleep)
        if step % args.log_every == 0:
            run.log_window(step, k=1)
        if args.save_every and step % args.save_every == 0:
            run.log({"step": step, "eval/w": float(model.weight.detach().sum())})
            run.save(step, note="toy")
        if run.stop_requested:
            run.log_window(step, k=1)
            run.interrupt(step, note="toy")
    run.log_window(step, k=1)
    run.save(step, note="toy")
    run.finish({"step": step, "resumed_note": extra.get("note")})


if __name__ == "__main__":
    common.run_cli(main)
