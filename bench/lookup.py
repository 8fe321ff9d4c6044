"""Benchmark 1: stacked (RQ) nearest-code lookup at LLM scale.

RQ with D = 4 over one shared 32000 × 4096 codebook (LLaMA-7B's embedding table size), N = 1024
fp32 feature vectors, inference. Ours (``ResidualQuantizer`` over a ``UnifiedCodebook``, both
search modes) against ``vector_quantize_pytorch.ResidualVQ(shared_codebook=True)`` holding the
same codebook values, in eval mode. Each method runs in its own child process so its peak
memory is its own. Ours (both modes) must return the same codes (asserted); the baseline must
too, except where two codes' distances are tied to within fp32 rounding, which its different
distance formula may break the other way (checked in float64, reported; seen on the Xeon host).

    python bench/lookup.py [--device cuda] [--n 1024 --v 32000 --d 4096 --depth 4] [--json out.json]

The features are pure noise (no code is much nearer than the others): the hardest case for the
certified bf16 prefilter, which then keeps the most candidates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakMemory, machine, table, timeit, worker_env, write_json

from unicodebook.utils.device import onednn_bf16

METHODS = ("ours-fp32", "ours-bf16", "vector-quantize-pytorch")


def make_inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    codebook = 0.02 * torch.randn(args.v, args.d, generator=g)  # LLaMA-like init scale
    z = 0.04 * torch.randn(args.n, args.d, generator=g)
    return codebook.to(args.device), z.to(args.device)


def build(method: str, codebook: torch.Tensor, depth: int):
    """→ (call(z) → codes (N, D), module)."""
    v, d = codebook.shape
    if method.startswith("ours"):
        from unicodebook.quantize.codebook import CodebookRule, UnifiedCodebook
        from unicodebook.quantize.stacked import ResidualQuantizer

        rule = CodebookRule(mode="frozen", search=method.split("-")[1])
        cb = UnifiedCodebook(torch.arange(v), d, rule).to(codebook.device)
        cb.embed.copy_(codebook)
        rq = ResidualQuantizer(cb, depth).eval()
        cb.search_index()  # the norms / bf16 copy are kept between calls, like a codebook buffer
        return lambda z: rq(z.view(1, 1, -1, d)).codes.view(-1, depth), rq
    from vector_quantize_pytorch import ResidualVQ

    rvq = (
        ResidualVQ(dim=d, num_quantizers=depth, codebook_size=v, shared_codebook=True, kmeans_init=False)
        .to(codebook.device)
        .eval()
    )
    with torch.no_grad():
        rvq.layers[0]._codebook.embed.copy_(codebook[None])
    return lambda z: rvq(z[None])[1][0], rvq


def tied_differences(a: torch.Tensor, b: torch.Tensor, codebook: torch.Tensor, z: torch.Tensor) -> tuple[int, float]:
    """Vectors whose codes differ, and the largest relative gap, in float64, between the two
    codes' distances at the first layer where they differ (the residual up to there is common)."""
    rows = (a != b).any(1).nonzero().flatten()
    cb, worst = codebook.double().cpu(), 0.0
    for i in rows.tolist():
        layer = int((a[i] != b[i]).nonzero()[0])
        r = z[i].double().cpu() - cb[a[i, :layer]].sum(0)
        da, db = ((r - cb[a[i, layer]]) ** 2).sum(), ((r - cb[b[i, layer]]) ** 2).sum()
        worst = max(worst, float((da - db).abs() / max(da, db)))
    return len(rows), worst


def worker(args) -> None:
    """Memory pass (allocator returning freed blocks at once) or timing pass (default allocator)."""
    torch.manual_seed(0)
    codebook, z = make_inputs(args)
    if args.worker == "matmul":  # the ceiling: one block GEMM of the search, best of several
        a, b = z, codebook[:4096]
        rates = [
            2 * a.shape[0] * a.shape[1] * b.shape[0] / timeit(lambda: a @ b.t(), args.device, 1, 0) / 1e9
            for _ in range(8)
        ]
        print(json.dumps({"gflops": max(rates)}))
        return
    call, module = build(args.worker, codebook, args.depth)
    with torch.no_grad():
        if args.memory:
            with PeakMemory(args.device) as mem:
                codes = call(z)
            save_file({"codes": codes.cpu().contiguous()}, args.codes)
            print(json.dumps({"peak_bytes": mem.peak}))
            return
        sec = timeit(lambda: call(z), args.device, repeat=args.repeat, warmup=1)
    kept = list(module.buffers()) + list(module.parameters())  # codebook and its EMA statistics
    if args.worker.startswith("ours"):  # plus the cached search index (its fp32 rows are the codebook)
        ix = module.codebook.search_index()
        kept += [t for t in (ix.sqnorm, ix.lowp, ix.lowp_norm, ix.err_norm) if t is not None]
    state = sum(t.numel() * t.element_size() for t in kept)
    print(json.dumps({"seconds": sec, "state_bytes": state}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="default: all, except ours-bf16 on a device without native bf16 kernels (emulated "
        "there, ~8x slower than fp32, and never what search: auto picks)",
    )
    p.add_argument("--worker", choices=METHODS + ("matmul",), help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--codes", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    methods = args.methods or [m for m in METHODS if m != "ours-bf16" or onednn_bf16(torch.device(args.device))]
    if "ours-bf16" not in methods and not args.methods:
        print("no native bf16 kernels on this device: ours-bf16 skipped (search: auto takes fp32 here)")
    flops = 2 * args.n * args.v * args.d * args.depth  # the D distance GEMMs
    results, codes = {}, {}
    common = [f"--{k}={getattr(args, k)}" for k in ("n", "v", "d", "depth", "repeat", "device")]

    def child(*extra: str, env=None) -> dict:
        run = subprocess.run(
            [sys.executable, __file__, *extra, *common], env=env, capture_output=True, text=True, check=False
        )
        if run.returncode:
            sys.exit(f"{extra} failed:\n{run.stderr[-3000:]}")
        return json.loads(run.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            out = Path(tmp) / f"{m}.safetensors"
            results[m] = child("--worker", m)
            results[m].update(child("--worker", m, "--memory", "--codes", str(out), env=worker_env()))
            codes[m] = load_file(out)["codes"]
    rate = child("--worker", "matmul")["gflops"]
    notes = []
    for m in methods[1:]:
        if torch.equal(codes[m], codes[methods[0]]):
            continue
        # ours (both modes) are certified to be the fp32 search's codes; only the baseline, which
        # rounds its distances differently (x² + y² − 2xy, then a square root), may pick the
        # other code of a pair tied to fp32 rounding
        assert not m.startswith("ours"), f"{m} returned different codes from {methods[0]}"
        n_diff, worst = tied_differences(codes[m], codes[methods[0]], *make_inputs(args))
        tol = args.d * 2.0**-24  # worst-case relative error of a d-term fp32 dot product
        assert worst <= tol, (
            f"{m}: codes differ where the distances are {worst:.1e} apart (relative), beyond fp32 rounding {tol:.1e}"
        )
        notes.append(
            f"{m}: {n_diff} of {args.n} vectors take another code at a near-tie (distances {worst:.1e} apart "
            f"at most, relative; fp32 rounding of a {args.d}-term dot product: {tol:.1e}); identical elsewhere"
        )
    base = results.get(
        "vector-quantize-pytorch", results[methods[0]]
    )  # the ratios are against the baseline when it ran
    rows = []
    for m in methods:
        r = results[m]
        eff = flops / r["seconds"] / 1e9
        rows.append(
            [
                m,
                f"{r['seconds']:.2f}",
                f"{base['seconds'] / r['seconds']:.2f}×",
                f"{r['peak_bytes'] / 2**20:.0f}",
                f"{r['peak_bytes'] / base['peak_bytes']:.2f}×",
                f"{r['state_bytes'] / 2**20:.0f}",
                f"{eff:.0f}",
                f"{eff / rate:.0%}",
            ]
        )
    print(f"\nRQ lookup: N={args.n}, V={args.v}, d={args.d}, D={args.depth}, fp32 in/out, {args.device}")
    print(f"machine: {machine(args.device)}")
    print(f"fp32 matmul rate (one search block, {args.n}×{args.d}·{args.d}×4096, best of 8): {rate:.0f} GFLOP/s")
    print("\n".join(notes) if notes else "all methods returned identical codes", end="\n\n")
    print(
        table(
            [
                "method",
                "seconds",
                "speed-up",
                "peak extra MiB",
                "peak ratio",
                "kept state MiB",
                "GFLOP/s (fp32-equivalent)",
                "of fp32 matmul rate",
            ],
            rows,
        )
    )
    write_json(
        args.json,
        {
            "args": vars(args),
            "machine": machine(args.device),
            "matmul_gflops": rate,
            "results": results,
            "code_notes": notes,
        },
    )


if __name__ == "__main__":
    main()
