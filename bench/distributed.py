"""Benchmark 6: both training stages on N processes (torchrun → Accelerate) against one process
on the same global batch: step time, and how far the results drift apart.

Each run is a real CLI run on the tiny preset's shapes world. Step time is read from the
runs' own ``metrics.jsonl`` (``elapsed_s`` between two logged steps, so start-up is left
out). On a 2-core machine the fair comparison is 1 process × 2 threads against 2 processes ×
1 thread.

    python bench/distributed.py [--steps 60] [--nproc 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, write_json
from safetensors.torch import load_file


def _cli(args: list[str], nproc: int, port: int) -> None:
    launch = (
        [sys.executable, "-m", "unicodebook"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={port}",
            "-m",
            "unicodebook",
        ]
    )
    subprocess.run(
        [*launch, *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))},
    )


def _step_time(run: Path, key: str) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if key in r and "elapsed_s" in r]
    a, b = rows[0], rows[-1]
    return (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])


def _max_diff(a: Path, b: Path) -> float:
    """Largest |difference| of the trained weights (the codebook's EMA statistics — counts and
    sums, not weights — are left out; the codebook itself is in)."""
    x, y = load_file(a), load_file(b)
    return max(
        float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].is_floating_point() and ".ema_" not in k
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    threads = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "unicodebook",
                "data",
                "shapes",
                "--out",
                str(tmp / "data"),
                "--n-train",
                "512",
                "--n-val",
                "32",
                "--n-test",
                "32",
            ],
            check=True,
            capture_output=True,
        )
        common = [
            f"train_tokenizer.steps={args.steps}",
            "train_tokenizer.log_every=10",
            "train_tokenizer.grid_every=0",
            f"train_lm.steps={args.steps // 2}",
            "train_lm.log_every=5",
            "train_lm.sample_every=0",
        ]
        rows, out = [], {"machine": machine(), "steps": args.steps, "nproc": args.nproc}
        runs = {}
        for n in (1, args.nproc):
            r = tmp / f"n{n}"
            t = f"{max(1, threads // n)}"
            _cli(
                [
                    "train-tokenizer",
                    "--data",
                    str(tmp / "data"),
                    "--out",
                    str(r / "s1"),
                    *common,
                    f"train_tokenizer.threads={t}",
                    f"train_lm.threads={t}",
                ],
                n,
                29_600 + n,
            )
            # the stage II config comes from the 1-process tokenizer run: set the threads again
            _cli(
                [
                    "train-lm",
                    "--tokenizer",
                    str(tmp / "n1" / "s1"),
                    "--data",
                    str(tmp / "data"),
                    "--out",
                    str(r / "s2"),
                    f"train_lm.threads={t}",
                ],
                n,
                29_700 + n,
            )
            runs[n] = r
        for stage, key, weights in (
            ("stage I", "loss", "s1/model.safetensors"),
            ("stage II", "lr", "s2/llm/model.safetensors"),
        ):
            t1, tn = (
                _step_time(runs[1] / weights.split("/")[0], key),
                _step_time(runs[args.nproc] / weights.split("/")[0], key),
            )
            diff = _max_diff(runs[1] / weights, runs[args.nproc] / weights)
            rows.append([stage, f"{t1 * 1000:.0f}", f"{tn * 1000:.0f}", f"{t1 / tn:.2f}×", f"{diff:.1e}"])
            out[stage] = {
                "s_per_step_1": t1,
                f"s_per_step_{args.nproc}": tn,
                "speedup": t1 / tn,
                "max_weight_diff": diff,
            }
    print(machine())
    print(table(["stage", "1 proc ms/step", f"{args.nproc} proc ms/step", "speed-up", "max |Δweight|"], rows))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
