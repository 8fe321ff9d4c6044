"""A bounded load test of `unicodebook serve`: many concurrent clients on 127.0.0.1 for a few
seconds, a mix of chat (plain and streamed), drawing and /health; reports requests served,
errors and latency percentiles per kind as one JSON line.

    python bench/serve_load.py --url http://127.0.0.1:PORT --image IMG.png --clients 32 --seconds 5
    python bench/serve_load.py ... --kinds draw        # drawings only (greedy: batched by the server)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path

import httpx


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    pick = lambda q: round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1)  # noqa: E731
    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99), "max_ms": round(1000 * xs[-1], 1)}


async def client(
    c: httpx.AsyncClient, i: int, until: float, image_url: str, model: str, out: dict, kinds: list[str]
) -> None:
    k = i
    while time.perf_counter() < until:
        kind = kinds[k % len(kinds)]
        k += 1
        chat = {
            "model": model,
            "max_tokens": 16,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": "what colour is it?"},
                    ],
                }
            ],
        }
        t0 = time.perf_counter()
        try:
            if kind == "health":
                res = await c.get("/health")
            elif kind == "draw":
                res = await c.post("/v1/images/generations", json={"prompt": "a red circle", "seed": k})
            else:
                res = await c.post("/v1/chat/completions", json={**chat, "stream": kind == "stream"})
            ok = res.status_code == 200 and (kind != "stream" or res.text.rstrip().endswith("data: [DONE]"))
        except httpx.HTTPError:
            ok = False
        slot = out.setdefault(kind, {"served": 0, "errors": 0, "latency": []})
        slot["served" if ok else "errors"] += 1
        if ok:
            slot["latency"].append(time.perf_counter() - t0)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--image", type=Path, required=True, help="a PNG to ask about")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--kinds", default="chat,stream,draw,health", help="the request kinds each client cycles through")
    a = p.parse_args()
    image_url = "data:image/png;base64," + base64.b64encode(a.image.read_bytes()).decode()
    out: dict = {}
    limits = httpx.Limits(max_connections=a.clients)
    async with httpx.AsyncClient(base_url=a.url, timeout=120, limits=limits) as c:
        model = (await c.get("/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        kinds = a.kinds.split(",")
        await asyncio.gather(*(client(c, i, start + a.seconds, image_url, model, out, kinds) for i in range(a.clients)))
        wall = time.perf_counter() - start
    report = {
        "clients": a.clients,
        "seconds": round(wall, 2),
        "served": sum(v["served"] for v in out.values()),
        "errors": sum(v["errors"] for v in out.values()),
        "by_kind": {
            k: {"served": v["served"], "errors": v["errors"], **percentiles(v["latency"])}
            for k, v in sorted(out.items())
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
