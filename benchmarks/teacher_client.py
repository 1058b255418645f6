"""The ``openai`` teacher client: throughput beside a bare ``AsyncOpenAI`` loop, cache cost, adaptive limit.

Every server is ``tests/fake_openai.py`` run as a subprocess (its own interpreter, so it never shares
the GIL with the client being measured). Three measurements, one run:

1. **Throughput vs a bare client** — the same ``--requests`` chat requests (same messages, same
   ``max_tokens``, temperature and top_p) sent to one fake server answering every request after a fixed
   ``--latency`` (no capacity limit), at equal concurrency C (``--concurrency``, default 32 and 64), by

   - *bare*: ``openai.AsyncOpenAI(max_retries=0)`` with an ``asyncio.Semaphore(C)`` around each
     ``chat.completions.create`` and ``asyncio.gather`` over all of them, as openai's documentation
     recommends for concurrent requests (run with ``asyncio.run`` on the main thread);
   - *ours*: ``OpenAITeacher.stream`` with ``adaptive: false, max_concurrency: C`` (its own event loop
     in a background thread, answers handed to the caller through a queue, limiter, retry bookkeeping).

   The two run back to back (order swapped every repeat), ``--repeat`` times; client construction is
   outside the timing, connection set-up inside it for both. Reported: requests/s (median and each run),
   the client process's CPU time per request (all threads; the server's is not counted), the server's
   highest in-flight count, and **ratio = ours / bare** requests/s (goal ≥ 0.9), both as the ratio of
   the medians and as the median of each repeat's paired ratio (``_paired``: the two runs of a repeat
   share the machine's load of that moment, so this is the figure to read on a shared machine). ``ours_adaptive`` (``adaptive: true``, ceiling C,
   same server, run once per C in the first repeat) is its own line, not part of the peer comparison: it
   slow-starts from √C, so it also reports its final limit and how often it cut the limit on a server
   that never pushed back. Where C / latency is more than the client's CPU can send (a small machine),
   both clients are CPU-bound and the ratio measures client CPU per request; ``--requests`` also sets
   how many requests wait for a slot at once (raise it to see costs that grow with the backlog).
2. **Cache overhead** — ``ReplyCache.put`` (one committed row per answer, as the session writes them) and
   ``get_many`` (hits and misses) over ``--cache-keys`` keys in a temporary folder, and
   ``TeacherSession.ask`` end to end per request with an instant in-process teacher (a stub
   :class:`Teacher` that answers at once, so only keying, cache, stats and parsing are timed), first
   uncached (every answer written) and then fully cached (nothing sent), for free-text and for JSON
   answers (a small pydantic model: schema per ask, parse per answer). Microseconds per request, median
   of ``--cache-repeat``. The session's ``ctx`` is a stub with ``stats``, ``run_dir.root``, ``shard_id``,
   ``seed`` and ``log``.
3. **Adaptive convergence** — a server with capacity K (``--capacity``) answering after
   ``--adaptive-latency`` (0.4 s, so that K / latency stays well below what one client process can send
   on a busy 2-core machine and the server, not the client's CPU, is the limit) in ``reject`` mode (a request beyond K in flight gets
   429 at once, ``Retry-After: 0``) and in ``queue`` mode (each request's latency is
   ``latency × ceil(in_flight / K)``), against our client with ``adaptive: true,
   max_concurrency: --ceiling`` (other settings default: retries with 1 s full-jitter backoff), sending
   ``--adaptive-requests`` requests, and against a fixed client at exactly K (``adaptive: false``, the
   ideal; the same number of requests, half before and half after the adaptive run, so a change of load
   weighs on both). Reported: the limit sampled over time ([seconds, limit]), its peak, the settled
   limit (median of the limit over the last half of the run, sampled every 10 ms), when it first comes
   within ±35% of that value (``first_in_band_s``) and when it stays there from then on
   (``settle_time_s``; null if it never does), the share of the run's time inside that band, the last
   half's range and number of cuts, the share of 429s among all requests the server saw, failed
   replies, retries, the answers' median latency, and the requests/s achieved vs the fixed-K client.

The machine's load average (1 min) before and after is in the report: on a shared machine compare the
ratios, not the absolute figures.

Usage: ``python benchmarks/teacher_client.py [--requests 300] [--concurrency 32 64] [--latency 0.05]
[--repeat 5] [--capacity 16] [--ceiling 128] [--adaptive-latency 0.4] [--adaptive-requests 400]
[--cache-keys 2000] [--cache-repeat 3] [--skip-throughput] [--skip-cache] [--skip-adaptive]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAX_TOKENS = 64
SYSTEM = "You are a careful assistant. Answer in one short paragraph."
#: The settled band: the limit counts as settled once it stays within ±35% of its last-half median (an
#: AIMD sawtooth with a 0.7 cut spans about ±18% around its median).
BAND = 0.35


def _requests(n: int, tag: str) -> list:
    from synthesizers.teachers.base import Request

    def user(i: int) -> str:
        return f"[{tag}] Question {i}: what does {i * 7919 % 10007} have in common with its neighbours?"

    return [Request(messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": user(i)}),
                    max_tokens=MAX_TOKENS) for i in range(n)]


def _spec(base_url: str, concurrency: int, adaptive: bool, **extra):
    from synthesizers.teachers.spec import TeacherSpec

    return TeacherSpec(model="fake-model", base_url=base_url, api_key="sk-bench", max_concurrency=concurrency,
                       adaptive=adaptive, timeout_s=60, **extra)


def _cuts(history: list[tuple[float, float]]) -> int:
    """How many times the limit went down in ``history`` ([(time, limit)])."""
    return sum(1 for (_, a), (_, b) in itertools.pairwise(history) if b < a)


def _cpu() -> float:
    return time.process_time()  # all threads of this process


# ------------------------------------------------------------------------------------------ 1. throughput

def _bare(base_url: str, requests: list, concurrency: int, temperature: float, top_p: float) -> dict:
    """openai's documented pattern: AsyncOpenAI + Semaphore + gather, on the main thread."""
    import openai

    async def main() -> tuple[float, float, int]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0, timeout=60)
        sem = asyncio.Semaphore(concurrency)

        async def one(req) -> bool:
            async with sem:
                resp = await client.chat.completions.create(
                    model="fake-model", messages=list(req.messages), temperature=temperature, top_p=top_p,
                    max_tokens=req.max_tokens)
                return bool(resp.choices[0].message.content)

        c0, t0 = _cpu(), time.perf_counter()
        ok = await asyncio.gather(*(one(r) for r in requests))
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        await client.close()
        return wall, cpu, sum(ok)

    wall, cpu, ok = asyncio.run(main())
    return {"wall": wall, "cpu": cpu, "ok": ok}


def _ours(base_url: str, requests: list, concurrency: int, adaptive: bool) -> dict:
    from synthesizers.teachers.openai_backend import OpenAITeacher

    teacher = OpenAITeacher(_spec(base_url, concurrency, adaptive))
    try:
        c0, t0 = _cpu(), time.perf_counter()
        ok = sum(reply.ok for _, reply in teacher.stream(requests))
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        lim = teacher.limiter
        cuts = _cuts(lim.history)
        return {"wall": wall, "cpu": cpu, "ok": ok, "final_limit": round(lim.limit, 1),
                "client_max_inflight": lim.max_inflight, "cuts": cuts}
    finally:
        teacher.close()


def throughput(n: int, concurrencies: list[int], latency: float, repeat: int) -> dict:
    from synthesizers.teachers.spec import Sampling
    from tests.fake_openai import FakeOpenAI

    sampling = Sampling()
    out: dict = {"requests": n, "latency_s": latency}
    with FakeOpenAI(latency=latency, subprocess=True) as fake:
        # Warm-up (imports, first connections), not timed.
        warm = _requests(64, "warm")
        _bare(fake.base_url, warm, 16, sampling.temperature, sampling.top_p)
        _ours(fake.base_url, warm, 16, False)
        for c in concurrencies:
            runs: dict[str, list[dict]] = {"bare": [], "ours": [], "ours_adaptive": []}
            for rep in range(repeat):
                order = ["bare", "ours"] if rep % 2 == 0 else ["ours", "bare"]
                for name in [*order, "ours_adaptive"] if rep == 0 else order:
                    reqs = _requests(n, f"c{c}-r{rep}-{name}")
                    fake.reset_counters()
                    if name == "bare":
                        r = _bare(fake.base_url, reqs, c, sampling.temperature, sampling.top_p)
                    else:
                        r = _ours(fake.base_url, reqs, c, adaptive=name == "ours_adaptive")
                    st = fake.stats()
                    r["server_max_inflight"] = st["max_inflight"]
                    r["server_requests"] = st["total_requests"]
                    runs[name].append(r)
            row: dict = {}
            for name, rs in runs.items():
                wall = statistics.median(r["wall"] for r in rs)
                entry = {"requests_per_s": round(n / wall, 1),
                         "runs_requests_per_s": [round(n / r["wall"], 1) for r in rs],
                         "client_cpu_us_per_request":
                             round(1e6 * statistics.median(r["cpu"] for r in rs) / n),
                         "failed": sum(n - r["ok"] for r in rs),
                         "server_max_inflight": max(r["server_max_inflight"] for r in rs)}
                if name == "ours_adaptive":
                    entry["final_limit"] = [r["final_limit"] for r in rs]
                    entry["cuts"] = [r["cuts"] for r in rs]
                row[name] = entry
            row["ideal_requests_per_s"] = round(c / latency, 1)
            bare = row["bare"]["requests_per_s"]
            row["ratio_ours_vs_bare"] = round(row["ours"]["requests_per_s"] / bare, 3)
            # Each repeat's two runs are back to back: their ratio cancels slow drifts of the machine's load.
            row["ratio_ours_vs_bare_paired"] = round(statistics.median(
                b["wall"] / o["wall"] for b, o in zip(runs["bare"], runs["ours"], strict=True)), 3)
            row["runs_ratio_ours_vs_bare"] = [round(b["wall"] / o["wall"], 3)
                                              for b, o in zip(runs["bare"], runs["ours"], strict=True)]
            row["cpu_ratio_ours_vs_bare"] = round(row["ours"]["client_cpu_us_per_request"]
                                                  / row["bare"]["client_cpu_us_per_request"], 3)
            row["ratio_adaptive_vs_bare"] = round(row["ours_adaptive"]["requests_per_s"] / bare, 3)
            out[f"C={c}"] = row
    return out


# ------------------------------------------------------------------------------------------ 2. cache

def cache_overhead(keys_n: int, repeat: int) -> dict:
    import hashlib

    from pydantic import BaseModel

    from curate.stats import ShardStats
    from synthesizers.teachers.base import Reply, Teacher
    from synthesizers.teachers.cache import ReplyCache
    from synthesizers.teachers.session import Ask, TeacherSession

    class Answer(BaseModel):
        question: str
        answer: str
        confidence: float

    json_text = ('{"question": "what is it?", "answer": "' + "an answer of some length " * 6
                 + '", "confidence": 0.8}')
    text = "A free-text answer of a typical short length, " * 8

    class Instant(Teacher):
        backend = "instant"

        def __init__(self):
            self.sent = 0

        def stream(self, requests):
            for i, req in enumerate(requests):
                self.sent += 1
                yield i, Reply(text=json_text if req.schema is not None else text, prompt_tokens=40,
                               completion_tokens=60, latency_s=0.05, finish_reason="stop")

    reply = Reply(text=text, prompt_tokens=40, completion_tokens=60, latency_s=0.05, finish_reason="stop")
    res: dict[str, list[float]] = {k: [] for k in ("put", "get_hit", "get_miss", "ask_text_uncached",
                                                   "ask_text_cached", "ask_json_uncached", "ask_json_cached")}
    with tempfile.TemporaryDirectory(prefix="curate-teacher-cache-") as tmp:
        for rep in range(repeat):
            keys = [hashlib.sha256(f"{rep}-{i}".encode()).hexdigest() for i in range(keys_n)]
            cache = ReplyCache(Path(tmp) / f"raw-{rep}" / "c.sqlite")
            t0 = time.perf_counter()
            for k in keys:
                cache.put(k, reply)
            res["put"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = cache.get_many(keys)
            res["get_hit"].append(time.perf_counter() - t0)
            assert len(got) == keys_n
            missing = [hashlib.sha256(f"miss-{rep}-{i}".encode()).hexdigest() for i in range(keys_n)]
            t0 = time.perf_counter()
            assert not cache.get_many(missing)
            res["get_miss"].append(time.perf_counter() - t0)
            cache.close()

            for kind, model in (("text", None), ("json", Answer)):
                ctx = SimpleNamespace(stats=ShardStats(),
                                      run_dir=SimpleNamespace(root=Path(tmp) / f"run-{rep}-{kind}"),
                                      shard_id="p0-00000", seed=0, log=logging.getLogger("bench"))
                teacher = Instant()
                session = TeacherSession("bench", _spec("http://127.0.0.1:9/v1", 8, True), ctx, "t" * 16,
                                         teacher=teacher)
                asks = [Ask(messages=({"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": f"Question {rep}-{i}: explain item {i}."}),
                            model=model, row=f"r{i}") for i in range(keys_n)]
                t0 = time.perf_counter()
                answers = session.ask(asks)
                res[f"ask_{kind}_uncached"].append(time.perf_counter() - t0)
                assert all(a.ok for a in answers) and teacher.sent == keys_n
                t0 = time.perf_counter()
                answers = session.ask(asks)
                res[f"ask_{kind}_cached"].append(time.perf_counter() - t0)
                assert all(a.ok for a in answers) and teacher.sent == keys_n  # nothing sent the second time
                session.close()
    return {"keys": keys_n,
            **{f"{name}_us_per_request": round(1e6 * statistics.median(v) / keys_n, 1)
               for name, v in res.items()}}


# ------------------------------------------------------------------------------------------ 3. adaptive

def _sampled(history: list[tuple[float, float]], t0: float, t_end: float,
             step: float) -> list[tuple[float, float]]:
    """The limit (a step function of time) sampled every ``step`` seconds from ``t0`` to ``t_end``."""
    out, j, value = [], 0, history[0][1]
    t = t0
    while t <= t_end + 1e-9:
        while j < len(history) and history[j][0] <= t:
            value = history[j][1]
            j += 1
        out.append((t - t0, value))
        t += step
    return out


def _convergence(fake, n: int, capacity: int, ceiling: int, mode: str) -> dict:
    from synthesizers.teachers.openai_backend import OpenAITeacher

    def run(adaptive: bool, concurrency: int, count: int, tag: str) -> tuple[dict, object]:
        fake.reset_counters()
        teacher = OpenAITeacher(_spec(fake.base_url, concurrency, adaptive))
        try:
            reqs = _requests(count, f"{mode}-{tag}")
            t0 = time.monotonic()
            replies = [r for _, r in teacher.stream(reqs)]
            t_end = time.monotonic()
        finally:
            teacher.close()
        st = fake.stats()
        return ({"seconds": t_end - t0, "replies": replies, "server_requests": st["total_requests"],
                 "http_429": st["by_status"].get(429, 0), "server_max_inflight": st["max_inflight"]},
                (teacher.limiter, t0, t_end))

    def summary(parts: list[dict]) -> dict:
        seconds = sum(p["seconds"] for p in parts)
        replies = [r for p in parts for r in p["replies"]]
        total = sum(p["server_requests"] for p in parts)
        rejected = sum(p["http_429"] for p in parts)
        lat = [r.latency_s for r in replies if r.ok]
        return {"requests_per_s": round(len(replies) / seconds, 1), "seconds": round(seconds, 2),
                "failed": sum(not r.ok for r in replies),
                "server_requests": total, "http_429": rejected,
                "share_429": round(rejected / total, 4) if total else 0.0,
                "server_max_inflight": max(p["server_max_inflight"] for p in parts),
                "latency_p50_ms": round(1e3 * statistics.median(lat), 1) if lat else None,
                "retries": sum(r.attempts - 1 for r in replies)}

    # The fixed client's n requests are split around the adaptive run, so a change of the machine's load
    # during the run weighs on both alike.
    before, _ = run(False, capacity, n // 2, "fixed-a")
    middle, (lim, t0, t_end) = run(True, ceiling, n, "adaptive")
    after, _ = run(False, capacity, n - n // 2, "fixed-b")
    fixed, adaptive = summary([before, after]), summary([middle])
    duration = t_end - t0
    fine = _sampled(lim.history, t0, t_end, 0.01)
    half = [v for t, v in fine if t >= duration / 2]
    settled = statistics.median(half)
    inside = [abs(v - settled) <= BAND * settled for _, v in fine]
    first_in = next((t for (t, _), ok in zip(fine, inside, strict=True) if ok), None)
    if all(inside):
        stays_from: float | None = 0.0
    else:
        last_out = max(i for i, ok in enumerate(inside) if not ok)
        stays_from = fine[last_out + 1][0] if last_out + 1 < len(fine) else None
    half_hist = [(t, v) for t, v in lim.history if t - t0 >= duration / 2]
    cuts = _cuts(half_hist)
    coarse_step = max(duration / 40, 0.05)
    adaptive.update({
        "settled_limit": round(settled, 1),
        "first_in_band_s": round(first_in, 2) if first_in is not None else None,
        "settle_time_s": round(stays_from, 2) if stays_from is not None else None,
        "share_of_time_in_band": round(sum(inside) / len(inside), 3),
        "peak_limit": round(max(v for _, v in lim.history), 1),
        "last_half_min": round(min(half), 1), "last_half_max": round(max(half), 1),
        "last_half_cuts": cuts,
        "last_half_cuts_per_s": round(cuts / (duration / 2), 2),
        "limit_over_time": [[round(t, 2), round(v, 1)]
                            for t, v in _sampled(lim.history, t0, t_end, coarse_step)],
    })
    return {"fixed_at_capacity": fixed, "adaptive": adaptive,
            "ratio_adaptive_vs_fixed": round(adaptive["requests_per_s"] / fixed["requests_per_s"], 3)}


def convergence(n: int, capacity: int, ceiling: int, latency: float) -> dict:
    from tests.fake_openai import FakeOpenAI

    out: dict = {"capacity": capacity, "ceiling": ceiling, "latency_s": latency, "requests": n,
                 "ideal_requests_per_s": round(capacity / latency, 1), "band": BAND}
    for mode in ("reject", "queue"):
        with FakeOpenAI(latency=latency, capacity=capacity, capacity_mode=mode, capacity_retry_after=0,
                        subprocess=True) as fake:
            out[mode] = _convergence(fake, n, capacity, ceiling, mode)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per throughput run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--latency", type=float, default=0.05, help="the fake server's answer time (s)")
    ap.add_argument("--repeat", type=int, default=5, help="throughput runs of each client per concurrency")
    ap.add_argument("--cache-repeat", type=int, default=3)
    ap.add_argument("--capacity", type=int, default=16, help="K of the convergence servers")
    ap.add_argument("--ceiling", type=int, default=128, help="max_concurrency of the adaptive client")
    ap.add_argument("--adaptive-latency", type=float, default=0.4,
                    help="the convergence servers' answer time (s): long enough that K / latency stays "
                    "below what one client process can send, so the server, not the client, is the limit")
    ap.add_argument("--adaptive-requests", type=int, default=400)
    ap.add_argument("--cache-keys", type=int, default=2000)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-cache", action="store_true")
    ap.add_argument("--skip-adaptive", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)

    import openai

    from curate.testing import write_report

    t_start = time.perf_counter()
    report: dict = {"cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2),
                    "openai": openai.__version__}
    if not args.skip_throughput:
        report["throughput"] = throughput(args.requests, args.concurrency, args.latency, args.repeat)
    if not args.skip_cache:
        report["cache"] = cache_overhead(args.cache_keys, args.cache_repeat)
    if not args.skip_adaptive:
        report["adaptive"] = convergence(args.adaptive_requests, args.capacity, args.ceiling,
                                         args.adaptive_latency)
    report["load_after"] = round(os.getloadavg()[0], 2)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return write_report(report, args.json)


if __name__ == "__main__":
    main()
