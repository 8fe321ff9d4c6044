"""Several stage II runs side by side on one machine, each evaluated on the test split.

A tiny model leaves a GPU (or many CPU cores) mostly idle, so runs train concurrently
(``--parallel``), each a ``python -m unicodebook train-lm`` process, and each is evaluated with
``eval model`` as soon as it ends. A run is given as ``NAME:key=value,key=value``: config
overrides (``train_lm.tasks.decompress=0``), plus two keys of the sweep's own:

* ``from=OTHER`` — start from OTHER's result (``train_lm.init_from``), once OTHER has ended:
  a curriculum, e.g. text-to-image alone, then the mix;
* ``share=F`` — this run trains ``F · steps`` steps (default 1).

``--steps auto`` sizes the runs to ``--budget-s``: all runs without ``from`` first train a few
steps side by side, which gives the seconds per step at this concurrency, and the longest
chain of shares is fitted into the budget. Results go to ``OUT/summary.json`` as each run ends
(a run that fails or times out is reported, not fatal), and a table is printed last::

    python scripts/stage2_sweep.py --tokenizer runs/demo/tokenizer --data runs/data20k \\
        --out runs/sweep --steps 3000 --parallel 4 \\
        mix: nodec:train_lm.tasks.decompress=0 \\
        t2i:train_lm.tasks.decompress=0,train_lm.tasks.instruct=0,share=0.5 \\
        curriculum:from=t2i,share=0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path


def parse_run(spec: str) -> dict:
    name, _, rest = spec.partition(":")
    run = {"name": name, "overrides": [], "from": None, "share": 1.0}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k == "from":
            run["from"] = v
        elif k == "share":
            run["share"] = float(v)
        else:
            run["overrides"].append(kv)
    return run


def chain_share(runs: dict, name: str) -> float:
    r = runs[name]
    return r["share"] + (chain_share(runs, r["from"]) if r["from"] else 0.0)


class Sweep:
    def __init__(self, args):
        self.a = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.summary_path = Path(args.summary or self.out / "summary.json")
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        self.summary: dict = {"args": vars(args), "runs": {}}
        self.lock = threading.Lock()
        threads = max(1, (os.cpu_count() or 2) // max(1, args.parallel))
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def save(self, run: str | None = None, entry: dict | None = None) -> None:
        """Write summary.json (atomically), after recording ``entry`` as ``run``'s result."""
        with self.lock:  # the worker threads record and write one at a time
            if run is not None:
                self.summary["runs"][run] = entry
            tmp = self.summary_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.summary, indent=1))
            tmp.replace(self.summary_path)

    def train(self, name: str, overrides: list[str], steps: int, timeout: float) -> tuple[bool, float]:
        run = self.out / name
        shutil.rmtree(run, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "unicodebook",
            "train-lm",
            "--tokenizer",
            self.a.tokenizer,
            "--data",
            self.a.data,
            "--out",
            str(run),
            f"train_lm.steps={steps}",
            "train_lm.sample_every=0",
            "train_lm.save_every=0",
            *overrides,
        ]
        if self.a.config:
            cmd[4:4] = ["--config", self.a.config]
        t0 = time.time()
        with open(self.out / f"{name}.log", "w") as logf:
            try:
                rc = subprocess.run(
                    cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env, timeout=timeout
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        return rc == 0, time.time() - t0

    def evaluate(self, name: str, timeout: float) -> dict:
        cmd = [
            sys.executable,
            "-m",
            "unicodebook",
            "eval",
            "model",
            "--model",
            str(self.out / name),
            "--data",
            self.a.data,
            "--split",
            "test",
        ]
        if self.a.max_t2i:
            cmd += ["--max-t2i", str(self.a.max_t2i)]
        if self.a.max_vqa:
            cmd += ["--max-vqa", str(self.a.max_vqa)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": "eval timed out"}
        if p.returncode != 0:
            return {"error": (p.stderr.strip().splitlines() or ["eval failed"])[-1]}
        res = json.loads(p.stdout)
        return {k: v for k, v in res.items() if not isinstance(v, (list, dict)) or k.startswith("vqa_by")}

    def seconds_per_step(self, first: list[dict]) -> float:
        """Train every first-wave run for a few steps side by side; the slowest one's seconds
        per step over the second half."""
        n = self.a.calib_steps
        results = {}

        def one(r):
            results[r["name"]] = self.train(
                f"_calib_{r['name']}", r["overrides"] + [f"train_lm.log_every={n // 2}"], n, self.a.timeout_s
            )

        ts = [threading.Thread(target=one, args=(r,)) for r in first[: self.a.parallel]]
        [t.start() for t in ts]
        [t.join() for t in ts]
        per_step = []
        for r in first[: self.a.parallel]:
            metrics = self.out / f"_calib_{r['name']}" / "metrics.jsonl"
            if not results[r["name"]][0] or not metrics.exists():
                raise SystemExit(
                    f"calibration run {r['name']} failed: see {self.out / ('_calib_' + r['name'] + '.log')}"
                )
            # the second half only: the first steps carry kernel warm-up and the other
            # processes' start-up (on one H200, timing all of them overestimated 2.7×)
            half, last = (json.loads(x) for x in metrics.read_text().splitlines()[-2:])
            per_step.append((last["elapsed_s"] - half["elapsed_s"]) / (last["step"] - half["step"]))
        for r in first[: self.a.parallel]:
            shutil.rmtree(self.out / f"_calib_{r['name']}", ignore_errors=True)
        return max(per_step)

    def main(self, specs: list[str]) -> None:
        runs = {r["name"]: r for r in map(parse_run, specs)}
        for r in runs.values():
            if r["from"] and r["from"] not in runs:
                raise SystemExit(f"run {r['name']}: from={r['from']} is not a run of this sweep")
        # one process encodes the train images into the code cache; the runs then all read it
        # (started together, each would encode them itself)
        first = next(r for r in runs.values() if not r["from"])
        if not self.train("_cache", first["overrides"], 1, self.a.timeout_s)[0]:
            raise SystemExit(f"the cache run failed: see {self.out / '_cache.log'}")
        shutil.rmtree(self.out / "_cache", ignore_errors=True)
        if self.a.steps == "auto":
            sps = self.seconds_per_step([r for r in runs.values() if not r["from"]])
            longest = max(chain_share(runs, n) for n in runs)
            steps = int(self.a.budget_s / (sps * longest))
            steps = steps // 50 * 50 if steps >= 100 else max(2, steps)
            self.summary["seconds_per_step"] = sps
            self.log(
                f"calibrated: {sps:.3f} s/step with {min(self.a.parallel, len(runs))} side by side -> {steps} steps"
            )
        else:
            steps, sps = int(self.a.steps), None
        self.summary["steps"] = steps
        self.save()

        done: dict[str, bool] = {}
        cond = threading.Condition()
        slots = threading.Semaphore(self.a.parallel)

        def worker(r):
            if r["from"]:
                with cond:
                    cond.wait_for(lambda: r["from"] in done)
                if not done[r["from"]]:
                    with cond:
                        done[r["name"]] = False
                        cond.notify_all()
                    self.save(r["name"], {"error": f"{r['from']} failed"})
                    return
            n = max(1, round(steps * r["share"]))
            overrides = r["overrides"] + ([f"train_lm.init_from={self.out / r['from']}"] if r["from"] else [])
            timeout = (2 * n * sps + 120) if sps else self.a.timeout_s
            with slots:
                self.log(f"{r['name']}: training {n} steps")
                ok, secs = self.train(r["name"], overrides, n, timeout)
            entry = {"steps": n, "overrides": overrides, "train_s": round(secs, 1), "ok": ok}
            if ok:
                metrics = [json.loads(x) for x in (self.out / r["name"] / "metrics.jsonl").read_text().splitlines()]
                entry["final_metrics"] = metrics[-1]
            with cond:
                done[r["name"]] = ok
                cond.notify_all()
            if ok:
                self.log(f"{r['name']}: trained in {secs:.0f} s; evaluating")
                t0 = time.time()
                entry["eval"] = self.evaluate(r["name"], self.a.eval_timeout_s)
                entry["eval_s"] = round(time.time() - t0, 1)
                if self.a.pack:
                    self.pack(r["name"])
            else:
                self.log(f"{r['name']}: FAILED (see {self.out / (r['name'] + '.log')})")
            self.save(r["name"], entry)

        ts = [threading.Thread(target=worker, args=(r,)) for r in runs.values()]
        [t.start() for t in ts]
        [t.join() for t in ts]
        self.table()

    def pack(self, name: str) -> None:
        """The model folder (no checkpoints, no TensorBoard) as ``PACK/NAME.tgz``."""
        dest = Path(self.a.pack)
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest / f"{name}.tgz", "w:gz") as tf:
            for p in sorted((self.out / name).iterdir()):
                if p.name not in ("checkpoints", "tb", "codes_cache"):
                    tf.add(p, arcname=f"{name}/{p.name}")

    def table(self) -> None:
        def pct(e, k):
            v = e.get("eval", {}).get(k)
            return "-" if v is None else f"{100 * v:.1f}"

        print(
            f"\n{'run':<14}{'steps':>7}{'train s':>9}{'VQA':>7}{'descr':>7}"
            f"{'t2i seen':>10}{'held-out':>10}{'decomp':>8}"
        )
        for name, e in self.summary["runs"].items():
            if "eval" not in e or "error" in e.get("eval", {}):
                print(f"{name:<14} {e.get('error') or e.get('eval', {}).get('error') or 'training failed'}")
                continue
            print(
                f"{name:<14}{e['steps']:>7}{e['train_s']:>9.0f}"
                f"{pct(e, 'vqa_accuracy'):>7}{pct(e, 'description_accuracy'):>7}"
                f"{pct(e, 't2i_accuracy_seen'):>10}{pct(e, 't2i_accuracy_held_out'):>10}"
                f"{pct(e, 'decompression_code_accuracy'):>8}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="NAME:key=value,... (config overrides, from=RUN, share=F)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="a preset or YAML file (default: the tiny preset)")
    p.add_argument("--steps", default="auto", help="steps of a share-1 run, or 'auto' (fit --budget-s)")
    p.add_argument("--budget-s", type=float, default=300, help="wall-clock seconds of training for --steps auto")
    p.add_argument("--calib-steps", type=int, default=40, help="an even number >= 4")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--max-t2i", type=int, default=0)
    p.add_argument("--max-vqa", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=3600, help="limit of a training process when steps are fixed")
    p.add_argument("--eval-timeout-s", type=float, default=600)
    p.add_argument("--summary", help="where summary.json goes (default OUT/summary.json)")
    p.add_argument("--pack", help="write each model folder as PACK/NAME.tgz")
    a = p.parse_args()
    if a.steps != "auto" and not a.steps.isdigit():
        p.error("--steps: a number or 'auto'")
    if a.parallel < 1:
        p.error("--parallel must be >= 1")
    if a.steps == "auto" and (a.calib_steps < 4 or a.calib_steps % 2 or not math.isfinite(a.budget_s)):
        p.error("--steps auto needs an even --calib-steps >= 4 and a finite --budget-s")
    Sweep(a).main(a.runs)


if __name__ == "__main__":
    main()
