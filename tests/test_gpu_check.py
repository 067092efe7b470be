"""The GPU check (benchmarks/gpu_report.py) on the CPU: the no-GPU line, and the phase runner driven by stand-in
phases (streaming, per-phase limits that kill the process group, results appended as each phase ends, a cut run
whose files all parse, the table from a partial results.jsonl), the parsing of the measurements, the tier's command
and test order, the two plans' commands, the probe's log hook, and the checkpoint comparison.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_report.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_report as gr  # noqa: E402  (the standard library only at import)


def py(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


def check(tmp_path, phases, *extra, wrap=(), timeout=60):
    """Run the check on stand-in phases; (completed process, out folder)."""
    spec, out = tmp_path / "phases.json", tmp_path / "out"
    spec.write_text(json.dumps(phases))
    cmd = [*wrap, sys.executable, str(SCRIPT), "--fake-phases", str(spec), "--out", str(out),
           "--work", str(tmp_path / "work"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout), out


def start_and_cut(tmp_path, phases, marker: str, sig):
    """Run the check on stand-in phases and send it `sig` once `marker` is in its log.txt (a fixed delay would race
    the start-up of the interpreters on a busy machine); (completed process, out folder)."""
    spec, out = tmp_path / "phases.json", tmp_path / "out"
    spec.write_text(json.dumps(phases))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--fake-phases", str(spec), "--out", str(out), "--work",
                             str(tmp_path / "work")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_end, log = time.monotonic() + 60, out / "log.txt"
    while time.monotonic() < t_end and marker not in (log.read_text() if log.is_file() else ""):
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out


def results(out: Path) -> list[dict]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line parses


def phase_line(records, name):
    found = [r for r in records if r.get("phase") == name]
    assert len(found) == 1, (name, records)
    return found[0]


def gone(pid: int, within: float = 3.0) -> bool:
    """The process has exited (or is a zombie waiting to be reaped by init)."""
    t_end = time.monotonic() + within
    while time.monotonic() < t_end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------------------------
# No GPU: one line, exit 0, nothing run
# ---------------------------------------------------------------------------------------------------------------
def test_no_gpu_prints_one_line_for_both_commands(tmp_path):
    """Here (no GPU device file) without importing torch; on a GPU machine through torch, which sees none."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    procs = {part: subprocess.Popen([sys.executable, str(SCRIPT), "--part", part, "--out", str(tmp_path / part)],
                                    env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for part in ("1", "2")}
    for part, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.count("\n") == 1 and "no CUDA GPU present" in out and "nothing run" in out, out
        assert not (tmp_path / part).exists()  # nothing written, nothing run


@pytest.mark.parametrize("part", ["1", "2"])
def test_no_gpu_seen_by_torch_prints_one_line(tmp_path, monkeypatch, capsys, part):
    fake_torch = Namespace(__version__="2.11.0", cuda=Namespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(gr, "no_gpu_device_files", lambda: False)  # a device file, but torch sees no GPU
    assert gr.main(["--part", part, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out == "gpu_report: no CUDA GPU present (torch 2.11.0, torch.cuda.is_available() is False): nothing run\n"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# The phase runner
# ---------------------------------------------------------------------------------------------------------------
def test_runner_relays_lines_as_they_come(tmp_path):
    seen = []
    runner = gr.Runner(tmp_path, tmp_path / "work", 1, "r", budget=60,
                       echo=lambda text: seen.append((time.monotonic(), text)))
    child = py("""
        import time
        print("first line")
        time.sleep(0.8)
        print("second line")
    """)
    runner.run_all([gr.Phase("talk", cmd=child, timeout=20)])
    t_first = next(t for t, text in seen if text == "[talk] first line")
    t_second = next(t for t, text in seen if text == "[talk] second line")
    assert t_second - t_first > 0.5  # relayed before the child slept, not captured until it exited
    assert "[talk] first line" in (tmp_path / "log.txt").read_text()
    assert phase_line(results(tmp_path), "talk")["status"] == "ok"


def test_phase_limit_stops_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    child = py(f"""
        import subprocess, time
        g = subprocess.Popen(["sleep", "60"])
        open({str(pid_file)!r}, "w").write(str(g.pid))
        print("started", flush=True)
        time.sleep(60)
    """)
    runner = gr.Runner(tmp_path, tmp_path / "work", 1, "r", budget=60, echo=lambda text: None)
    t0 = time.monotonic()
    runner.run_all([gr.Phase("hang", cmd=child, timeout=1.5, grace=0.5), gr.Phase("after", cmd=py("print(1)"))])
    assert time.monotonic() - t0 < 15
    recs = results(tmp_path)
    hang = phase_line(recs, "hang")
    assert hang["status"] == "timeout" and hang["timeout_s"] == 1.5 and "started" in hang["tail"]
    assert phase_line(recs, "after")["status"] == "ok"  # the next phase still runs
    assert gone(int(pid_file.read_text()))  # the grandchild went with the group


def test_results_are_appended_as_each_phase_ends(tmp_path):
    spec, out = tmp_path / "phases.json", tmp_path / "out"
    spec.write_text(json.dumps([{"name": "quick", "cmd": py("print('done')"), "timeout": 20},
                                {"name": "slow", "cmd": ["sleep", "2"], "timeout": 20}]))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--fake-phases", str(spec), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t_end = time.monotonic() + 15
        quick = None
        while time.monotonic() < t_end and quick is None:
            if (out / "results.jsonl").is_file():
                quick = next((r for r in results(out) if r.get("phase") == "quick"), None)
            time.sleep(0.05)
        assert quick is not None and quick["status"] == "ok"
        assert proc.poll() is None  # written while the next phase was still running
    finally:
        proc.wait(30)
    assert proc.returncode == 0
    assert [r["phase"] for r in results(out)] == ["env", "plan", "quick", "slow", "end"]


def test_budget_cuts_limits_and_skips_phases(tmp_path):
    budget = gr.MIN_START_S + gr.RESERVE_S + 1.0  # limits cut to the budget; after 1.5 s, nothing starts
    proc, out = check(tmp_path, [{"name": "first", "cmd": ["echo", "1"], "timeout": 60},
                                 {"name": "second", "cmd": ["sleep", "1.5"], "timeout": 60},
                                 {"name": "third", "cmd": ["echo", "3"], "timeout": 60}], "--budget", str(budget))
    recs = results(out)
    first = phase_line(recs, "first")
    assert first["status"] == "ok" and first["timeout_s"] <= budget - gr.RESERVE_S
    assert phase_line(recs, "second")["status"] == "ok"
    third = phase_line(recs, "third")
    assert third["status"] == "skipped" and third["reason"].startswith("budget")
    assert proc.returncode == 1  # not every phase ran


def test_a_cut_run_leaves_files_that_parse(tmp_path):
    pid_file = tmp_path / "bg.pid"
    phases = [{"name": "quick", "cmd": py("print('one')"), "timeout": 20},
              {"name": "background", "background": True, "timeout": 60,
               "cmd": py(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")},
              {"name": "long", "timeout": 60, "cmd": py(f"""
                   import os, time
                   while not os.path.exists({str(pid_file)!r}):  # the background phase is running
                       time.sleep(0.01)
                   for i in range(60):
                       print("tick", i)
                       time.sleep(0.5)
               """)}]
    proc, out = start_and_cut(tmp_path, phases, "[long] tick 0", signal.SIGINT)  # SIGINT: what timeout(1) sends
    assert proc.returncode == 130
    recs = results(out)
    assert phase_line(recs, "quick")["status"] == "ok"
    assert phase_line(recs, "long")["status"] == "interrupted"
    assert phase_line(recs, "background")["status"] == "interrupted"
    assert phase_line(recs, "end")["status"] == "interrupted"
    assert "interrupted" in (out / "table.md").read_text()
    assert "[long] tick 0" in (out / "log.txt").read_text()
    assert gone(int(pid_file.read_text()))


def test_a_killed_run_keeps_its_lines_and_the_table_is_rebuilt(tmp_path):
    phases = [{"name": "quick", "cmd": py("print('one')"), "timeout": 20},
              {"name": "long", "cmd": ["sleep", "60"], "timeout": 60}]
    proc, out = start_and_cut(tmp_path, phases, "== long (limit", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    recs = results(out)  # SIGKILL: no end line, but every line written parses
    assert phase_line(recs, "quick")["status"] == "ok" and not any(r["phase"] == "end" for r in recs)
    shown = subprocess.run([sys.executable, str(SCRIPT), "--table", "--out", str(out)], capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0
    assert "| quick | ok |" in shown.stdout and "| long | not reached |" in shown.stdout
    assert "cut (no end line)" in shown.stdout and (out / "table.md").read_text() == shown.stdout


# ---------------------------------------------------------------------------------------------------------------
# The table, the measurements
# ---------------------------------------------------------------------------------------------------------------
def test_table_from_a_partial_results_file(tmp_path):
    run = {"part": 1, "run": "x"}
    lines = [
        {**run, "phase": "env", "device_name": "NVIDIA H200", "torch": "2.11.0", "cuda": "12.8"},
        {**run, "phase": "plan", "budget_s": 330, "phases": [
            {"name": "tier", "label": "CUDA test tier"}, {"name": "dcgan_default", "label": "DCGAN default"},
            {"name": "dcgan_fast", "label": "DCGAN fast"}, {"name": "fid10k", "label": "FID-10k"}]},
        {**run, "phase": "tier_test", "test": "tests/test_cuda.py::test_mog[a]", "outcome": "passed"},
        {**run, "phase": "tier_test", "test": "tests/test_cuda.py::test_mog[b]", "outcome": "failed"},
        {**run, "phase": "dcgan_default", "label": "DCGAN default", "status": "ok", "wall_s": 18.2,
         "timeout_s": 75, "measured": {"images_per_s": 41000.0, "kernels_per_step": 212.0, "peak_memory_gb": 1.5}},
        {**run, "phase": "dcgan_fast", "label": "DCGAN fast", "status": "failed", "reason": "exit 1: boom",
         "measured": {"error": "no warm log windows"}},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"part": 1, "run": "x", "pha')  # torn
    table = gr.build_table(gr.read_results(path))
    assert "NVIDIA H200" in table and "cut (no end line)" in table
    assert "so far: 1 failed, 1 passed" in table  # the tier's streamed tests, before its own line
    assert "41,000 images/s" in table and "212 kernels/step" in table
    assert "| DCGAN fast | failed | no warm log windows · exit 1: boom |" in table
    assert "| FID-10k | not reached |" in table
    assert "target: default command >= 4,600 images/s | met" in table
    assert "1.50 GiB (DCGAN default)" in table


def probe_log(steps, ips=None, dt=0.1, t0=100.0, gap=0.01):
    """A probe log of one record per step in `steps`, `dt` s of training between records."""
    log, t = [], t0
    for s in steps:
        fields = {"step": s} if ips is None else {"step": s, "images_per_s": ips}
        log.append({"step": s, "t_enter": t, "t_exit": t + gap, "fields": fields})
        t += gap + dt
    return log


def test_steady_rate_uses_warm_windows_only():
    log = probe_log(range(50, 801, 50), ips=6400.0, dt=1.0)
    log[0]["fields"]["images_per_s"] = 10.0  # the first window: compilation
    wins = gr.windows_from_log(log)
    assert [w["s0"] for w in wins][:2] == [50, 100] and all(w["steps"] == 50 for w in wins)
    r = gr.steady_rate(wins, warmup=100, stop=700, sources=[("field", "images_per_s", 128), ("time", None, 1)])
    assert r["measured_steps"] == 600 and r["steps_per_s"] == pytest.approx(50.0)
    assert "images_per_s" in r["method"]
    r = gr.steady_rate(wins, warmup=100, stop=700, sources=[("time", None, 1)])
    assert r["steps_per_s"] == pytest.approx(50.0)  # 50 steps per 1.0 s window, hook time excluded
    assert gr.steady_rate(wins, warmup=900, stop=None, sources=[("time", None, 1)]) is None


def test_rate_falls_back_to_timestamps_and_merges_records_at_one_step():
    log = probe_log([100, 200, 300, 400], dt=2.0)  # no throughput field
    log.insert(2, {"step": 200, "t_enter": 0, "t_exit": log[1]["t_exit"] + 5.0, "fields": {"fid": 3.0}})
    for e in log[3:]:
        e["t_enter"] += 5.0
        e["t_exit"] += 5.0
    wins = gr.windows_from_log(log)
    assert [(w["s0"], w["s1"]) for w in wins] == [(100, 200), (200, 300), (300, 400)]
    assert wins[0]["fields"]["fid"] == 3.0  # the evaluation logged at step 200 joins that window
    assert wins[1]["dt"] == pytest.approx(2.0)  # from the end of the evaluation record, not the first record
    r = gr.steady_rate(wins, 100, None, [("field", "images_per_s", 100), ("time", None, 1)])
    assert r["measured_steps"] == 200 and "timestamps" in r["method"]  # the last window dropped


def test_a_missing_field_is_a_failed_measurement_not_a_crash(tmp_path):
    spec = gr.TrainingSpec(128, 100, 700, [("field", "images_per_s", 128)], tmp_path, "dcgan")
    m = gr.parse_training(spec)({"log": probe_log(range(50, 801, 50))}, [], {})
    assert "error" in m and "images_per_s" not in m
    m = gr.parse_training(spec)(None, [], {})  # no probe result, no run folder
    assert "error" in m
    assert "error" in gr.parse_json_result("wall_s")({"samples": 10}, [], {})
    assert "error" in gr.parse_json_result("wall_s")(None, [], {})
    table = gr.build_table([{"phase": "plan", "run": "x", "part": 1, "phases": [{"name": "mog"}]},
                            {"phase": "mog", "run": "x", "part": 1, "status": "failed", "measured": {"it_per_s": "?"}}])
    assert "| mog | failed |" in table


def test_profile_and_replay_figures_per_step(tmp_path):
    probe = {"log": probe_log(range(50, 901, 50), ips=64000.0),
             "profile": {"start_step": 800, "stop_step": 850, "steps": 50, "kernels": 2500, "launches": 50,
                         "graph_launches": 50, "cpu_ops": 100},
             "replay": {"start_step": 750, "stop_step": 800, "steps": 50, "count": 50, "gpu_ms_median": 1.2,
                        "host_ms_median": 0.05},
             "peak_memory_gb": 2.0}
    spec = gr.TrainingSpec(128, 150, 750, [("field", "images_per_s", 128)], tmp_path, "dcgan")
    m = gr.parse_training(spec)(probe, [], {})
    assert m["images_per_s"] == pytest.approx(64000.0) and m["kernels_per_step"] == 50
    assert m["graph_launches_per_step"] == 1 and m["replays_per_step"] == 1 and m["replay_gpu_ms"] == 1.2
    assert m["peak_memory_gb"] == 2.0
    assert "replay 1.200 ms GPU" in gr.FORMATTERS["dcgan_fast"](m)


# ---------------------------------------------------------------------------------------------------------------
# The tier, the plans
# ---------------------------------------------------------------------------------------------------------------
def fake_ctx(tmp_path, cuda_graph=False):
    args = Namespace(device="cuda", workers=4, test_timeout=120, tier_timeout=200.0)
    ctx = gr.Ctx(args, tmp_path / "out", tmp_path / "work")
    ctx.flags["cuda_graph"] = cuda_graph
    return ctx


def test_tier_command_uses_xdist_and_timeout_when_present(tmp_path):
    ctx = fake_ctx(tmp_path)
    cmd = gr.tier_cmd(ctx, have=lambda m: True)
    assert cmd[1:6] == ["-m", "pytest", "-m", "cuda", "tests/test_cuda.py"] and "tests/test_cuda_readiness.py" in cmd
    assert cmd[cmd.index("-n") + 1] == "4" and "--timeout=120" in cmd and "-p" in cmd
    assert any(c.startswith("--junitxml=") and c.endswith("tier.xml") for c in cmd)
    bare = gr.tier_cmd(ctx, have=lambda m: False)
    assert "-n" not in bare and not any(c.startswith("--timeout") for c in bare)


def test_plugin_puts_compiled_tests_first():
    class Item:
        def __init__(self, nodeid, marked=False):
            self.nodeid, self.marked = nodeid, marked

        def get_closest_marker(self, name):
            return object() if self.marked and name == "compiled" else None

    names = ["t::test_mog[a]", "t::test_dcgan[fp32]", "t::test_dcgan[compile]", "t::test_x", "t::test_dcgan[fast-path]",
             "t::test_cifar_minibatch_disc_model_compiled"]
    items = [Item(n, marked=(n == "t::test_x")) for n in names]
    gr.pytest_collection_modifyitems(items)
    assert [i.nodeid for i in items] == ["t::test_dcgan[compile]", "t::test_x", "t::test_dcgan[fast-path]",
                                         "t::test_cifar_minibatch_disc_model_compiled", "t::test_mog[a]",
                                         "t::test_dcgan[fp32]"]


def test_tier_lines_become_result_lines(tmp_path):
    runner = gr.Runner(tmp_path, tmp_path / "work", 1, "r", budget=60, echo=lambda text: None)
    watcher = gr.TierWatcher(lambda: runner)
    for line in ["[gw0] [ 10%] PASSED tests/test_cuda.py::test_mog[fast-step] ",
                 "tests/test_cuda.py::test_dcgan[fp32] FAILED                      [ 20%]",
                 "FAILED tests/test_cuda.py::test_dcgan[fp32] - AssertionError: x",
                 "=========== 1 failed, 1 passed in 12.34s ==========="]:
        watcher(line)
    recs = results(tmp_path)
    assert [(r["test"].split("::")[1], r["outcome"]) for r in recs] == [("test_mog[fast-step]", "passed"),
                                                                      ("test_dcgan[fp32]", "failed")]
    assert watcher.summary == "1 failed, 1 passed in 12.34s"
    m = gr.parse_tier(tmp_path / "missing.xml", watcher)(None, [], {"rc": 1})
    assert (m["passed"], m["failed"], m["failed_tests"]) == (1, 1, ["tests/test_cuda.py::test_dcgan[fp32]"])


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_plans_run_fake_data_on_cuda_without_tracking(tmp_path, cuda_graph):
    ctx = fake_ctx(tmp_path, cuda_graph)
    one, two = gr.plan_part1(ctx), gr.plan_part2(ctx)
    assert [p.name for p in one] == ["tier", "flags", "warmup", "dcgan_default", "dcgan_fast", "dcgan_reference",
                                     "mog", "cifar_fm", "fid10k"]
    assert [p.name for p in one if p.background] == ["tier", "warmup"] and one[3].barrier
    for phase in one + two:
        if phase.cmd is None or callable(phase.cmd) and phase.name in ("resume_rest", "mog_rest"):
            continue
        cmd = [str(c) for c in (phase.cmd() if callable(phase.cmd) else phase.cmd)]
        assert "--track" not in cmd
        scripts = [c for c in cmd if c.endswith("_topk.py") or c.startswith("improved_gan_")]
        if scripts and "--help" not in cmd:
            assert cmd[cmd.index("--device") + 1] == "cuda" and "--max-steps" in cmd
            if not scripts[0].startswith("mog"):
                assert cmd[cmd.index("--dataset") + 1] == "fake"
    fast = [str(c) for c in one[4].cmd()]
    assert ("--cuda-graph" in fast) == cuda_graph and "--compile" in fast and "bf16" in fast
    assert ("--replay-at" in fast) == cuda_graph
    warm = [str(c) for c in one[2].cmd()]
    assert ("--cuda-graph" in warm) == cuda_graph and warm[warm.index("--max-steps") + 1] == "20"
    default = [str(c) for c in one[3].cmd]
    assert default[default.index("--profile-at") + 1] == "700" and "--compile" not in default
    assert gr.expected_total(one) <= gr.BUDGET_S - 30 and gr.expected_total(two) <= gr.BUDGET_S - 30  # planned


def test_flags_phase_reads_the_help_text(tmp_path):
    ctx = fake_ctx(tmp_path)
    parse = gr.parse_flags(ctx)
    help_text = ["usage: dcgan_cifar_topk.py [-h] " + " ".join(gr.DCGAN_FLAGS_USED), "  --cuda-graph  one graph"]
    assert parse(None, help_text, {}) == {"cuda_graph": True, "missing": []} and ctx.flags["cuda_graph"]
    m = parse(None, ["usage: x --max-steps N"], {})
    assert not m["cuda_graph"] and "--fake-size" in m["missing"] and not ctx.flags["cuda_graph"]


# ---------------------------------------------------------------------------------------------------------------
# The probe and the checkpoint comparison (these import torch)
# ---------------------------------------------------------------------------------------------------------------
def test_probe_records_log_calls_and_opens_its_windows(tmp_path):
    """The probe runs a script as __main__ with its hook on the metrics-log call (here a stand-in logger class named
    through GPU_REPORT_LOG_HOOKS); a measurement window opens at the first record at or after --replay-at and closes
    at the next (torch.profiler uses the same control; it is left out here, where its start-up alone takes
    seconds)."""
    (tmp_path / "standin_log.py").write_text(textwrap.dedent("""
        import json
        from pathlib import Path

        class Logger:
            def __init__(self, run_dir):
                self.dir = Path(run_dir)

            def log(self, record):
                with open(self.dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\\n")
    """))
    script = tmp_path / "stand_in.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import standin_log
        logger = standin_log.Logger({str(tmp_path)!r})
        for i in range(1, 8):
            time.sleep(0.05)
            logger.log({{"step": 10 * i, "images_per_s": 1000.0}})
    """))
    result = tmp_path / "result.json"
    env = dict(os.environ, GPU_REPORT_RESULT=str(result), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(tmp_path),
               GPU_REPORT_LOG_HOOKS="standin_log.Logger")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", "probe", "--replay-at", "25", "--", str(script)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(result.read_text())
    assert data["hooks"] == ["standin_log.Logger.log"] and not data["errors"]
    assert [e["step"] for e in data["log"]] == [10, 20, 30, 40, 50, 60, 70]
    assert (data["replay"]["start_step"], data["replay"]["stop_step"], data["replay"]["count"]) == (30, 40, 0)
    assert "profile" not in data and data["run_dir"] == str(tmp_path) and data["exit_code"] == 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 7  # the script's own writes unchanged
    wins = gr.windows_from_log(data["log"])
    assert len(wins) == 6 and all(w["dt"] >= 0.04 for w in wins)


def test_probe_default_hooks_name_common_classes():
    assert "common.Run" in gr.LOG_CLASSES


def test_compare_checkpoints_bit_for_bit(tmp_path):
    torch = pytest.importorskip("torch")
    w = torch.randn(3, 4)
    base = {"G": {"w": w, "b": torch.zeros(4)}, "opt_g": {"state": {0: {"exp_avg": torch.ones(2)}}},
            "rng": {"torch": torch.arange(5, dtype=torch.uint8)}, "step": 40}
    torch.save(base, tmp_path / "a.pt")
    torch.save({**base, "rng": {"torch": torch.arange(1, 6, dtype=torch.uint8)}}, tmp_path / "b.pt")
    m = gr.compare_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt")
    assert m["weights_identical"] and m["optimizer_identical"] and not m["all_identical"] and "error" not in m
    nudged = w.clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(float("inf")))  # one ulp
    torch.save({**base, "G": {"w": nudged, "b": torch.zeros(4)}}, tmp_path / "c.pt")
    m = gr.compare_checkpoints(tmp_path / "a.pt", tmp_path / "c.pt")
    assert not m["weights_identical"] and m["error"] == "weights differ" and m["differing"][0].startswith("G/w")
    torch.save({**base, "G": {"w": w, "b": -torch.zeros(4)}}, tmp_path / "d.pt")  # -0.0 == 0.0, not bit-equal
    assert not gr.compare_checkpoints(tmp_path / "a.pt", tmp_path / "d.pt")["weights_identical"]
