"""``scripts/bench.py --http``: the HTTP figures of issue 13 (the controller's ``--http-listen``).

One controller process (``asm controller serve --http-listen``, its default SQLite registry) in front of
one node agent process, both on 127.0.0.1; this process is the client of both paths, side by side:

(i)  chat completion latency overhead over ``Session.query`` (shell provider): the same trivial
     command (``echo x``) ``runs`` times, interleaved round by round, through
       * a library ``Session`` on ``RemoteNode(<controller's gRPC address>)`` -- ``await session.query()``;
       * the real ``openai`` package's ``AsyncOpenAI(...).chat.completions.create(model="shell")``
         against the controller's ``/v1`` (non-stream; the same event loop as the Session);
       * a bare ``httpx`` POST of the same body (what is the server's, what the ``openai`` client's own).
     Medians and p90 per path; overhead = HTTP median - Session median, in ms and as a ratio.
(ii) events/s of one stream: a run of ``cat FILE`` printing ``events`` JSONL lines (one
     ``assistant_delta`` event each, as bench.py's (b)), read to its end
       * through the gRPC StartRun stream (``Session.stream`` via the controller), and
       * through ``POST /v1/runs`` + ``GET /v1/runs/{id}/events`` (SSE) with ``httpx``: frames parsed,
         each ``data:`` JSON-decoded (its seq must equal the frame's ``id:``), every seq 1..N+3 once;
     and the same finished run read again (replay: ``Session.attach`` from seq 0 / the SSE endpoint
     from ``after_seq=0``). Repeated ``repeats`` times, the order alternating; best and median wall,
     events/s = events / wall, and the controller's CPU seconds per path (where the time goes).

Every process is stopped by its PID; every run has a timeout (a hang is reported, not waited for).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from asm_controller import RemoteNode, Session
from asm_node.testing import ServedProcess, serve_controller, serve_node

__all__ = ["HttpConfig", "report_http", "run_http"]

TOKEN = "bench-http-token-0123456789abcdef"
#: The shell provider's per-command timeout (30 s) must not cut a long ``cat`` off on a loaded host.
_OPTIONS: dict[str, Any] = {"command_timeout_ms": 600_000}
_RUN_TIMEOUT_S = 20.0


@dataclass
class HttpConfig:
    runs: int = 200  # (i) completions per path
    warmup: int = 5  # (i) untimed rounds first
    events: int = 100_000  # (ii) lines of the stream run
    repeats: int = 3  # (ii) repetitions per path


# -- helpers --------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _p90(xs: list[float]) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


def _cpu_s(pid: int) -> float:
    """user+system CPU seconds of a process (from /proc), NaN when unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _write_lines(path: Path, n: int) -> None:
    """N JSON lines of ~100 bytes (bench.py's (b) shape)."""
    base = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore"
    with open(path, "w") as f:
        for i in range(n):
            head = f'{{"type":"assistant","i":{i},"text":"'
            f.write(head + base[:max(8, 97 - len(head))] + '"}\n')


def _http_port(ctl: ServedProcess, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"HTTP on port (\d+)", ctl.log())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise RuntimeError(f"the controller printed no HTTP port: {ctl.log()[-2000:]}")


async def _timed(fn: Callable[[], Awaitable[str | None]], timeout: float) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    try:
        err = await asyncio.wait_for(fn(), timeout)
    except TimeoutError:
        err = f"no answer after {timeout:g}s (hang)"
    except Exception as exc:  # a benchmark reports a failed call, it does not crash
        err = f"{type(exc).__name__}: {exc}"
    return (time.perf_counter() - t0) * 1000, err


# -- (i) latency ------------------------------------------------------------------------------------


async def _latency(cfg: HttpConfig, session: Session, base: str) -> dict[str, dict[str, list[Any]]]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0)
    raw = httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {TOKEN}"}, timeout=_RUN_TIMEOUT_S)
    body = {"model": "shell", "messages": [{"role": "user", "content": "echo x"}]}
    out: dict[str, dict[str, list[Any]]] = {k: {"ms": [], "failures": []} for k in ("session", "openai", "httpx")}

    async def via_session() -> str | None:
        result = await session.query("echo x")
        return None if result.ok and result.text.strip() == "x" else f"{result.status} {result.error} {result.text!r}"

    async def via_openai() -> str | None:
        done = await client.chat.completions.create(model="shell", messages=[{"role": "user", "content": "echo x"}])
        text = done.choices[0].message.content or ""
        return None if text.strip() == "x" and done.choices[0].finish_reason == "stop" else f"answer {text!r}"

    async def via_httpx() -> str | None:
        resp = await raw.post("/v1/chat/completions", json=body)
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}: {resp.text[:200]}"
        text = resp.json()["choices"][0]["message"]["content"] or ""
        return None if text.strip() == "x" else f"answer {text!r}"

    paths = {"session": via_session, "openai": via_openai, "httpx": via_httpx}
    try:
        for i in range(cfg.warmup + cfg.runs):
            # Interleaved, the order rotating each round: machine noise and any warm/cold order effect
            # hit every path alike.
            names = list(paths)
            names = names[i % 3:] + names[:i % 3]
            for name in names:
                dt, err = await _timed(paths[name], _RUN_TIMEOUT_S)
                if err:
                    out[name]["failures"].append(err)
                elif i >= cfg.warmup:
                    out[name]["ms"].append(dt)
    finally:
        await raw.aclose()
        await client.close()
    return out


# -- (ii) one stream ---------------------------------------------------------------------------------


def _check_seqs(seqs: list[int], want: int) -> str | None:
    if len(seqs) != want:
        return f"{len(seqs)} events (want {want})"
    if seqs != list(range(1, want + 1)):
        dup = len(seqs) - len(set(seqs))
        return f"seqs not 1..{want} once each ({dup} duplicates)"
    return None


async def _grpc_stream(session: Session, prompt: str, want: int) -> tuple[str | None, str]:
    stream = session.stream(prompt, options=_OPTIONS)
    seqs = [ev.seq async for ev in stream]
    result = stream.result
    if result is None or not result.ok:
        return f"status={getattr(result, 'status', None)} error={getattr(result, 'error', None)}", stream.run_id
    return _check_seqs(seqs, want), stream.run_id


async def _grpc_replay(session: Session, run_id: str, node: str, want: int) -> str | None:
    # ``session`` is not the one that started the run: a Session refuses to reuse its own run ids.
    stream = session.attach(run_id, RemoteNode(node, token=TOKEN), "shell")
    seqs = [ev.seq async for ev in stream]
    return _check_seqs(seqs, want)


async def _sse_read(http: httpx.AsyncClient, run_id: str, want: int) -> str | None:
    """GET /v1/runs/{id}/events to its end: frames parsed, each data decoded, its seq the frame's id."""
    seqs: list[int] = []
    loads = json.loads
    async with http.stream("GET", f"/v1/runs/{run_id}/events", params={"after_seq": 0}) as resp:
        if resp.status_code != 200:
            return f"HTTP {resp.status_code}"
        frame_id: str | None = None
        data: str | None = None
        async for line in resp.aiter_lines():
            if not line:  # a frame ends
                if data is not None:
                    ev = loads(data)
                    if str(ev.get("seq")) != frame_id:
                        return f"frame id {frame_id} carries seq {ev.get('seq')}"
                    seqs.append(ev["seq"])
                frame_id, data = None, None
            elif line.startswith("id: "):
                frame_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line.startswith("event: stream_error"):
                return "stream_error frame"
    return _check_seqs(seqs, want)


async def _sse_stream(http: httpx.AsyncClient, prompt: str, want: int) -> tuple[str | None, str]:
    resp = await http.post("/v1/runs", json={"provider": "shell", "prompt": prompt, "options": _OPTIONS})
    if resp.status_code != 201:
        return f"POST /v1/runs: HTTP {resp.status_code} {resp.text[:200]}", ""
    run_id: str = resp.json()["run"]["run_id"]
    return await _sse_read(http, run_id, want), run_id


async def _one(fn: Callable[[], Awaitable[str | None]], timeout: float, ctl_pid: int) -> dict[str, Any]:
    c0, k0 = time.process_time(), _cpu_s(ctl_pid)
    ms, err = await _timed(fn, timeout)
    return {"wall": ms / 1000, "cpu": time.process_time() - c0, "ctl_cpu": _cpu_s(ctl_pid) - k0, "error": err}


async def _streams(cfg: HttpConfig, session: Session, replayer: Session, base: str, path: Path,
                   ctl: ServedProcess, node: str) -> dict[str, list[dict[str, Any]]]:
    want = cfg.events + 3  # run_started, N assistant_delta, result, run_completed
    prompt = f"cat {path}"
    timeout = max(60.0, cfg.events / 2_000)
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in ("grpc", "sse", "grpc_replay", "sse_replay")}
    async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {TOKEN}"},
                                 timeout=httpx.Timeout(timeout, connect=10.0)) as http:
        for r in range(cfg.repeats):
            order = ("grpc", "sse") if r % 2 == 0 else ("sse", "grpc")
            for name in order:
                run_ids: list[str] = []

                async def live(name: str = name, run_ids: list[str] = run_ids) -> str | None:
                    if name == "grpc":
                        err, rid = await _grpc_stream(session, prompt, want)
                    else:
                        err, rid = await _sse_stream(http, prompt, want)
                    run_ids.append(rid)
                    return err

                out[name].append(await _one(live, timeout, ctl.pid))
                if not run_ids or not run_ids[0]:
                    continue
                rid = run_ids[0]

                async def replay(name: str = name, rid: str = rid) -> str | None:
                    if name == "grpc":
                        return await _grpc_replay(replayer, rid, node, want)
                    return await _sse_read(http, rid, want)

                out[f"{name}_replay"].append(await _one(replay, timeout, ctl.pid))
    return out


# -- driver ------------------------------------------------------------------------------------------


async def run_http(cfg: HttpConfig, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Both figures on fresh processes in ``workdir`` (stopped by PID before returning)."""
    token_file = workdir / "token"
    token_file.write_text(TOKEN)
    lines = workdir / "lines.jsonl"
    _write_lines(lines, cfg.events)
    node = serve_node(workdir, "--token-file", str(token_file))
    ctl: ServedProcess | None = None
    try:
        ctl = serve_controller(workdir, "--node", node.address, "--token-file", str(token_file),
                               "--http-listen", "127.0.0.1:0", token=TOKEN)
        base = f"http://127.0.0.1:{_http_port(ctl)}"
        say(f"node pid {node.pid} on {node.address}, controller pid {ctl.pid} on {ctl.address} (HTTP {base})")
        target = RemoteNode(ctl.address, token=TOKEN)
        async with Session("shell", node=target) as session, Session("shell", node=target) as replayer:
            say(f"(i) latency: {cfg.runs} completions per path (+{cfg.warmup} warm-up), interleaved ...")
            latency = await _latency(cfg, session, base)
            say(f"(ii) one stream: {cfg.events:,} events x {cfg.repeats} per path ...")
            await replayer.connect()  # its connection is up before it is timed
            streams = await _streams(cfg, session, replayer, base, lines, ctl, ctl.address)
        return {"cfg": cfg, "latency": latency, "streams": streams}
    finally:
        if ctl is not None:
            ctl.stop()
        node.stop()


def report_http(out: dict[str, Any]) -> None:
    cfg: HttpConfig = out["cfg"]
    lat = out["latency"]
    print(f"\n(i) chat completion latency vs Session.query, shell `echo x`, {cfg.runs} each, interleaved (ms)")
    print(f"  {'path':<44} {'median':>8} {'p90':>8} {'failed':>7}")
    labels = {"session": "Session.query via controller gRPC", "openai": "openai AsyncOpenAI chat.completions (HTTP)",
              "httpx": "httpx POST /v1/chat/completions (HTTP)"}
    for k, label in labels.items():
        xs = lat[k]["ms"]
        print(f"  {label:<44} {_median(xs):8.2f} {_p90(xs):8.2f} {len(lat[k]['failures']):7d}")
    base = _median(lat["session"]["ms"])
    for k in ("openai", "httpx"):
        m, p = _median(lat[k]["ms"]), _p90(lat[k]["ms"])
        print(f"  overhead {k:<7} median {m - base:+7.2f} ms ({m / base:.2f}x)   p90 {p - _p90(lat['session']['ms']):+7.2f} ms")
    for k in lat:
        for f in lat[k]["failures"][:3]:
            print(f"  failure ({k}): {f}")
    st = out["streams"]
    n = cfg.events + 3
    print(f"\n(ii) one stream of {n:,} events (`cat` of {cfg.events:,} lines), {cfg.repeats} repeats each")
    print(f"  {'path':<36} {'best ev/s':>11} {'median ev/s':>12} {'client cpu s':>13} {'ctl cpu s':>10} {'failed':>7}")
    labels = {"grpc": "live, gRPC StartRun (Session.stream)", "sse": "live, POST /v1/runs + SSE /events",
              "grpc_replay": "replay, gRPC AttachRun (attach)", "sse_replay": "replay, SSE /events?after_seq=0"}
    best: dict[str, float] = {}
    for k, label in labels.items():
        ok = [r for r in st[k] if r["error"] is None]
        walls = sorted(r["wall"] for r in ok)
        best[k] = n / walls[0] if walls else float("nan")
        med = n / _median(walls) if walls else float("nan")
        cpu = _median([r["cpu"] for r in ok])
        kcpu = _median([r["ctl_cpu"] for r in ok])
        print(f"  {label:<36} {best[k]:>11,.0f} {med:>12,.0f} {cpu:>13.2f} {kcpu:>10.2f} {len(st[k]) - len(ok):>7d}")
        for r in st[k]:
            if r["error"]:
                print(f"  failure ({k}): {r['error']}")
    print(f"  SSE / gRPC (best): live {best['sse'] / best['grpc']:.2f}x, replay "
          f"{best['sse_replay'] / best['grpc_replay']:.2f}x")
