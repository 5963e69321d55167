"""Run every benchmark script and write the results, with the speed targets, to one page.

Each script runs in its own process with the same number of torch threads (--threads, also
exported as OMP_NUM_THREADS). The page records the machine (CPU model, cores, load average
before and after), the torch version and the date, and states for each speed target whether
this run meets it. A script that fails is listed with the end of its error output and the
other scripts still run.

    python benchmarks/run_all.py                 # the full run
    python benchmarks/run_all.py --quick         # every script at tiny sizes, a smoke test
    python benchmarks/run_all.py --budget 900    # skip what would run past 15 minutes

NOTE: the full sizes aim at about 15 minutes on 2 idle cores, an estimate from runs on a
loaded machine. Under a load average of 6 to 8 the NCSN++ script alone took over 10 minutes.

Text after the line NOTES_MARKER in the existing output file is kept, so hand-written notes
on a measurement survive a rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NOTES_MARKER = "<!-- Notes below this line are kept by run_all.py. -->"

# Speed targets of the QCSBM penalty, as ratios of step times in the same run.
MAX_NONNEGATIVE_RATIO = 4.0      # non-negative estimator, K = 1, whole batch, conv networks
MAX_EXACT_2D_RATIO = 3.0         # exact penalty on the 2-D network
MIN_PROBE_SHARING_SPEEDUP = 2.0  # K = 16 shared probes against the batch replicated 16 times


@dataclasses.dataclass
class Script:
    """One benchmark script: its file, its arguments for the full and the quick run."""

    key: str
    title: str
    file: str
    full: list[str]
    quick: list[str]
    accepts_threads: bool = True
    writes_json: bool = False
    all_cores: bool = False      # splits all CPU cores among its processes, whatever --threads


SCRIPTS = [
    Script("core", "Training step: 2-D network and a small conv network", "core_step.py",
           ["--repeats", "3", "--toy-batch", "5000", "--conv-batch", "16", "--probe-batch", "8"],
           ["--repeats", "1", "--toy-batch", "200", "--conv-batch", "2", "--probe-batch", "1"],
           writes_json=True),
    Script("ncsnpp", "Training step: NCSN++ networks", "ncsnpp_step.py",
           ["--repeats", "2", "--deep-repeats", "1", "--batch-compact8", "64",
            "--batch-compact32", "4", "--batch-tiny", "8", "--batch-deep", "2"],
           ["--networks", "compact8", "tiny", "--repeats", "1", "--batch-compact8", "2",
            "--batch-tiny", "2"],
           writes_json=True),
    Script("sampler", "Sampler and likelihood throughput", "sampler_throughput.py",
           ["--num-steps", "100", "--toy-batch", "1000", "--image-batch", "16",
            "--compact-batch", "16"],
           ["--num-steps", "3", "--toy-batch", "16", "--image-batch", "1", "--compact-batch", "1"]),
    Script("scaling", "Scaling of the training step", "scaling.py",
           ["--batches", "8", "16", "32", "64", "--image-sizes", "8", "16", "32",
            "--image-batch", "4", "--repeats", "2"],
           ["--batches", "2", "4", "--image-sizes", "8", "--image-batch", "1", "--repeats", "1"],
           writes_json=True),
    Script("ddp", "Two-process DDP against one process", "ddp_throughput.py",
           ["--batch", "32", "--steps", "3", "--world-size", "2"],
           ["--batch", "4", "--steps", "1", "--world-size", "2"], all_cores=True),
    Script("oracle", "2spirals oracle", "oracle_spirals.py",
           ["--queries", "10000", "--points", "50000", "--sigmas", "0.1", "1.0"],
           ["--queries", "200", "--points", "2000", "--sigmas", "0.1"]),
    Script("features", "Feature pass, FID, KID and PRDC", "feature_pass.py",
           ["--num-images", "32", "--stat-points", "2000", "--prdc-points", "5000"],
           ["--num-images", "2", "--batch-size", "2", "--stat-points", "100", "--kid-subsets",
            "2", "--prdc-points", "100"],
           accepts_threads=False),
    Script("images", "Block sampling of `qcsbm sample` with the compact NCSN++",
           "sample_throughput_images.py",
           ["--batch-size", "32", "--pc-steps", "100"],
           ["--batch-size", "2", "--pc-steps", "3", "--skip-features"]),
]


@dataclasses.dataclass
class Outcome:
    """The result of one script: exit status, wall time, output and JSON results.

    `returncode` is None when the script was not found or timed out, and `failure`
    gives the reason for any outcome other than exit status 0.
    """

    script: Script
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    data: dict | None = None
    failure: str | None = None


# --- running ---------------------------------------------------------------------------------


def run_script(script: Script, args, work: Path, timeout: float) -> Outcome:
    """Run one script in a fresh process and collect what it printed and wrote."""
    path = HERE / script.file
    if not path.is_file():
        return Outcome(script, None, 0.0, "", f"{path} not found", failure="not found")
    if timeout <= 0:
        return Outcome(script, None, 0.0, "", "no time left in --budget",
                       failure="skipped, no time left in --budget")

    command = [sys.executable, str(path), *(script.quick if args.quick else script.full)]
    if script.accepts_threads:
        threads = (os.cpu_count() or 1) if script.all_cores else args.threads
        command += ["--threads", str(threads)]
    json_path = work / f"{script.key}.json"
    if script.writes_json:
        command += ["--json", str(json_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    print(f"running {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent,
                              timeout=timeout)
    except subprocess.TimeoutExpired as error:
        seconds = time.perf_counter() - start
        print(f"  timed out after {seconds:.1f} s", flush=True)
        return Outcome(script, None, seconds, _text(error.stdout), _text(error.stderr),
                       failure=f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    print(f"  exit status {done.returncode}, {seconds:.1f} s", flush=True)

    data = None
    failure = None if done.returncode == 0 else f"failed with exit status {done.returncode}"
    if script.writes_json and done.returncode == 0 and json_path.is_file():
        data = json.loads(json_path.read_text())
    return Outcome(script, done.returncode, seconds, done.stdout, done.stderr, data, failure)


def _text(output) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


# --- the machine -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


# --- targets ---------------------------------------------------------------------------------


def step_records(outcomes: dict) -> list[dict]:
    records = []
    for key in ("core", "ncsnpp"):
        outcome = outcomes.get(key)
        if outcome is not None and outcome.data is not None:
            records += outcome.data["steps"]
    return records


def target_rows(outcomes: dict) -> list[str]:
    """Return Markdown rows: target, measured value, met or not."""
    records = step_records(outcomes)
    rows = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    for record in records:
        network, variant = record["network"], record["variant"]
        if variant == "QCSBM exact":
            rows.append(f"| exact 2-D penalty <= {MAX_EXACT_2D_RATIO:g}x USBM | {network} "
                        f"| {record['ratio']:.2f}x | {verdict(record['ratio'] <= MAX_EXACT_2D_RATIO)} |")
        if variant == "QCSBM non-negative" and not network.startswith("2-D"):
            ok = record["ratio"] <= MAX_NONNEGATIVE_RATIO
            rows.append(f"| non-negative, K = 1, whole batch <= {MAX_NONNEGATIVE_RATIO:g}x USBM "
                        f"| {network} | {record['ratio']:.2f}x | {verdict(ok)} |")
        if variant == "QCSBM non-negative, 1/4 of batch":
            whole = _find(records, network, "QCSBM non-negative")
            ok = whole is not None and record["ratio"] < whole["ratio"]
            against = f" (whole batch {whole['ratio']:.2f}x)" if whole else ""
            rows.append(f"| non-negative on 1/4 of the batch: less than the whole batch "
                        f"| {network} | {record['ratio']:.2f}x{against} | {verdict(ok)} |")

    core = outcomes.get("core")
    if core is not None and core.data is not None:
        probes = core.data["probe_sharing"]
        for estimator, shared_ms in probes["shared_ms"].items():
            speedup = probes["replicated_ms"] / shared_ms
            rows.append(f"| K = 16 shared probes >= {MIN_PROBE_SHARING_SPEEDUP:g}x faster than "
                        f"the replicated batch | conv 32x32x3, batch {probes['batch']}, "
                        f"{estimator} | {speedup:.2f}x | "
                        f"{verdict(speedup >= MIN_PROBE_SHARING_SPEEDUP)} |")
    return rows


def _find(records, network, variant):
    for record in records:
        if record["network"] == network and record["variant"] == variant:
            return record
    return None


# --- the page --------------------------------------------------------------------------------


def step_table(records: list[dict]) -> list[str]:
    lines = ["| network | variant | ms / step | time / USBM | peak MiB / step "
             "| memory / USBM |", "|---|---|---|---|---|---|"]
    for record in records:
        base = _find(records, record["network"], "USBM")
        memory_ratio = record["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] else 0
        lines.append(f"| {record['network']} | {record['variant']} | {record['ms']:.1f} "
                     f"| {record['ratio']:.2f} | {record['peak_mib']:.1f} "
                     f"| {memory_ratio:.2f} |")
    return lines


def probe_table(outcomes: dict) -> list[str]:
    core = outcomes.get("core")
    if core is None or core.data is None:
        return []
    probes = core.data["probe_sharing"]
    lines = ["", f"K = 16 probes on the conv network, 32x32x3, batch {probes['batch']}:", "",
             "| layout | ms / step | speed-up over the replicated batch |", "|---|---|---|",
             f"| batch replicated 16 times, one probe each (the paper's code), hutchinson "
             f"| {probes['replicated_ms']:.1f} | 1.00 |"]
    for estimator, shared_ms in probes["shared_ms"].items():
        lines.append(f"| one forward pass shared by 16 probes, {estimator} | {shared_ms:.1f} "
                     f"| {probes['replicated_ms'] / shared_ms:.2f} |")
    return lines


def script_section(outcome: Outcome | None) -> list[str]:
    """Return the script's own Markdown output, or why there is none."""
    if outcome is None:
        return ["Not run."]
    if outcome.failure is not None:
        # Rows printed before the failure are still measurements, so they are kept.
        tail = "\n".join(outcome.stderr.strip().splitlines()[-15:])
        lines = [f"`{outcome.script.file}` {outcome.failure}:", "", "```", tail, "```"]
        if outcome.stdout.strip():
            lines += ["", "Output before it stopped:", "", outcome.stdout.strip()]
        return lines
    text = outcome.stdout.strip()
    if outcome.script.key == "features":
        try:
            return feature_table(json.loads(text))
        except json.JSONDecodeError:
            return ["```", text, "```"]

    # A script's own "# title" line would become a top-level heading of the page.
    return [line[2:] if line.startswith("# ") else line for line in text.splitlines()]


def feature_table(result: dict) -> list[str]:
    lines = ["| measurement | value |", "|---|---|"]
    for name, value in result.items():
        formatted = f"{value:.3g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {formatted} |")
    return lines


def render(outcomes: dict, args, started: str, load_before: str, load_after: str,
           notes: str) -> str:
    records = step_records(outcomes)
    cores = os.cpu_count()
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    if args.budget is not None:
        command += f" --budget {args.budget:g}"
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` (`--threads {args.threads}`). Every number below comes from "
        "this one run. The networks are untrained, so sampler NFE show the cost of a solve, "
        "not what a trained model needs.",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu_model()}, {cores} cores",
        f"- torch {torch.__version__}, {args.threads} intra-op threads",
        f"- Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"- started {started} UTC, {'quick smoke run' if args.quick else 'full run'}",
        f"- 1, 5 and 15-minute load average: {load_before} before, {load_after} after",
    ]
    first_load = float(load_before.split(",")[0]) if load_before != "unknown" else 0.0
    if cores and first_load > 0.75 * cores:
        lines += ["", f"**Other processes loaded the CPU during this run** (load average "
                  f"{first_load:.1f} on {cores} cores), so the times are inflated and noisy; "
                  "ratios taken within one table are the more reliable numbers."]

    lines += ["", "## Speed targets", "", "| target | case | measured | verdict |",
              "|---|---|---|---|", *target_rows(outcomes)]

    lines += ["", "## 1. Training step time and peak memory", "",
              "Peak memory is the tensor memory one step allocates (batch, autograd graph, "
              "gradients, temporaries) on top of the weights and the Adam state: "
              "`torch.profiler` allocation events on the CPU, "
              "`torch.cuda.max_memory_allocated` on CUDA. \"paper (two-stage)\" is the "
              "Hutchinson form ||J^T v||^2 - v^T J J v with the paper's two-stage backward; "
              "\"non-negative\" is 1/2 ||(J - J^T) v||^2. K is the number of probes.", ""]
    lines += step_table(records) if records else script_section(outcomes.get("core"))
    if outcomes.get("ncsnpp") is not None and outcomes["ncsnpp"].data is None:
        lines += [""] + script_section(outcomes["ncsnpp"])
    lines += probe_table(outcomes)

    sections = [("2. Sampler and likelihood throughput", ["sampler", "images"]),
                ("3. Scaling with batch size and image size", ["scaling"]),
                ("4. Two-process DDP against one process", ["ddp"]),
                ("5. 2spirals oracle, feature pass and PRDC", ["oracle", "features"])]
    for heading, keys in sections:
        lines += ["", f"## {heading}"]
        for key in keys:
            script = next(s for s in SCRIPTS if s.key == key)
            lines += ["", f"### {script.title} (`{script.file}`)", ""]
            lines += script_section(outcomes.get(key))

    lines += ["", "## Run log", "", "| script | arguments | result | wall seconds |",
              "|---|---|---|---|"]
    for outcome in outcomes.values():
        arguments = " ".join(outcome.script.quick if args.quick else outcome.script.full)
        lines.append(f"| `{outcome.script.file}` | `{arguments}` | {outcome.failure or 'ok'} "
                     f"| {outcome.seconds:.1f} |")

    lines += ["", NOTES_MARKER]
    return "\n".join(lines) + "\n" + notes


def kept_notes(path: Path) -> str:
    if not path.is_file():
        return ""
    text = path.read_text()
    return text.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in text else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="run every script at tiny sizes (a smoke test, not a measurement)")
    parser.add_argument("--out", type=Path, default=HERE / "README.md",
                        help="the Markdown page to write")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads of every script (default: CPU count)")
    parser.add_argument("--only", nargs="+", choices=[s.key for s in SCRIPTS],
                        help="run only these scripts")
    parser.add_argument("--script-timeout", type=float, default=900,
                        help="seconds after which a script is stopped and reported as failed")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: a script gets at most the time left, "
                             "and scripts that would start after it are skipped")
    args = parser.parse_args()

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_before = load_average()
    start = time.perf_counter()
    outcomes = {}
    with tempfile.TemporaryDirectory() as folder:
        for script in SCRIPTS:
            if args.only and script.key not in args.only:
                continue
            timeout = args.script_timeout
            if args.budget is not None:
                timeout = min(timeout, args.budget - (time.perf_counter() - start))
            outcomes[script.key] = run_script(script, args, Path(folder), timeout)
    load_after = load_average()

    page = render(outcomes, args, started, load_before, load_after, kept_notes(args.out))
    args.out.write_text(page)
    print(f"wrote {args.out}")
    failed = [o.script.file for o in outcomes.values() if o.failure is not None]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
