"""Where a speculative step's time goes: one generate() call under torch.profiler, summarized.

The engine's stages (``metrics.STAGES``, "step" for a whole-step graph, "prefill") are
``record_function`` ranges when the engine runs with ``nvtx=True`` (besides the NVTX ranges that
Nsight Systems shows). :func:`profile_generate` records one call; :func:`summarize_trace` reads
the exported Chrome trace: per stage the host time per call, the GPU kernel time launched from
it and its top kernels, and per round the GPU's busy and idle time (the gaps between kernels:
what launch latency and host work cost a step). A kernel belongs to the innermost stage whose
host range holds the runtime call that launched it (kernels of a CUDA graph replay carry the
correlation id of their ``cudaGraphLaunch``). On a CPU the trace has host ranges only.
"""
from __future__ import annotations

import bisect
import gzip
import json
import os
from collections import defaultdict
from statistics import median
from typing import Optional

from .metrics import STAGES

STAGE_NAMES = ("prefill", "step", *STAGES)  # the engine's StageTimer names
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


def _load(trace) -> list:
    if isinstance(trace, (str, os.PathLike)):
        opener = gzip.open if str(trace).endswith(".gz") else open
        with opener(trace, "rt") as f:
            trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def summarize_trace(trace, stages=STAGE_NAMES, top: int = 5) -> dict:
    """``trace``: a Chrome trace (path, dict or event list) of one profiled generate() call.
    Returns {"rounds", "stages": {name: {"calls", "host_ms_per_call", "gpu_ms_per_call",
    "top_kernels": [(name, ms per call, share of the stage's GPU time)]}}, "gpu": {"busy_ms",
    "span_ms", "idle_ms", "busy_fraction", "gap_us_median", "gap_us_p90", "per_round_ms":
    {"busy", "idle"}}} (``gpu`` None without GPU events). ``rounds``: the draft (or step) ranges
    after prefill."""
    events = [e for e in _load(trace) if e.get("ph") == "X"]
    ranges = defaultdict(list)  # (pid, tid) -> [(ts, end, name)] of the stage ranges
    for e in events:
        if e.get("cat") == "user_annotation" and e.get("name") in stages:
            ranges[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    starts = {}
    for key, rs in ranges.items():
        rs.sort()
        starts[key] = [r[0] for r in rs]

    def innermost(key, ts) -> Optional[str]:
        rs = ranges.get(key)
        if not rs:
            return None
        i, best = bisect.bisect_right(starts[key], ts) - 1, None
        while i >= 0:  # ranges nest: the latest-starting range that still covers ts
            a, b, name = rs[i]
            if a <= ts <= b:
                best = name
                break
            i -= 1
        return best

    launch_stage = {}  # correlation id -> stage of the launching host call
    for e in events:
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {}):
            launch_stage[e["args"]["correlation"]] = innermost((e["pid"], e["tid"]), e["ts"])
    host = defaultdict(list)
    for rs in ranges.values():
        for a, b, name in rs:
            host[name].append((b - a) / 1e3)
    gpu_events = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES),
                        key=lambda e: e["ts"])
    kernel_ms = defaultdict(lambda: defaultdict(float))  # stage -> kernel name -> ms
    for e in gpu_events:
        stage = launch_stage.get(e.get("args", {}).get("correlation")) or "(outside stages)"
        kernel_ms[stage][e["name"]] += e["dur"] / 1e3
    rounds = len(host.get("draft", [])) or len(host.get("step", []))
    out = {"rounds": rounds, "stages": {}}
    for name in [s for s in stages if s in host] + [s for s in kernel_ms if s not in host]:
        calls = len(host.get(name, [])) or 1
        gpu_total = sum(kernel_ms[name].values())
        tops = sorted(kernel_ms[name].items(), key=lambda kv: -kv[1])[:top]
        out["stages"][name] = {
            "calls": len(host.get(name, [])),
            "host_ms_per_call": sum(host.get(name, [])) / calls,
            "gpu_ms_per_call": gpu_total / calls,
            "top_kernels": [(k, ms / calls, ms / gpu_total if gpu_total else 0.0)
                            for k, ms in tops]}
    out["gpu"] = None
    steps = [e for e in gpu_events
             if launch_stage.get(e.get("args", {}).get("correlation")) not in (None, "prefill")]
    if steps:  # the rounds after prefill: busy time, and the gaps where the GPU waited
        busy, gaps, end = 0.0, [], None
        for e in steps:
            a, b = e["ts"], e["ts"] + e["dur"]
            if end is not None and a > end:
                gaps.append(a - end)
            busy += max(0.0, b - max(a, end if end is not None else a))
            end = b if end is None else max(end, b)
        span = end - steps[0]["ts"]
        gaps.sort()
        n = max(rounds, 1)
        out["gpu"] = {
            "busy_ms": busy / 1e3, "span_ms": span / 1e3, "idle_ms": (span - busy) / 1e3,
            "busy_fraction": busy / span if span else 1.0,
            "gap_us_median": median(gaps) if gaps else 0.0,
            "gap_us_p90": gaps[int(0.9 * (len(gaps) - 1))] if gaps else 0.0,
            "per_round_ms": {"busy": busy / 1e3 / n, "idle": (span - busy) / 1e3 / n}}
    return out


def graph_replays(trace, launch: str = "cudaGraphLaunch") -> list:
    """The GPU work of each CUDA graph replay in ``trace``, in launch order: a list of replays,
    each the list of its kernels / memsets / copies as (name, start µs after the replay's first
    kernel, duration µs), sorted by start. A replay's work carries its launch's correlation id.
    What a whole-step graph runs per round (``SpeculativeEngine`` on GPU): the kernel count, the
    span against the summed durations (the gaps are launch latency inside the graph), and which
    kernels dominate."""
    events = [e for e in _load(trace) if e.get("ph") == "X"]
    launches = sorted((e["ts"], e["args"]["correlation"]) for e in events
                      if e.get("cat") in LAUNCH_CATEGORIES and e.get("name") == launch
                      and "correlation" in e.get("args", {}))
    work = defaultdict(list)
    for e in events:
        if e.get("cat") in GPU_CATEGORIES and "correlation" in e.get("args", {}):
            work[e["args"]["correlation"]].append((e["ts"], e["dur"], e["name"]))
    out = []
    for _, corr in launches:
        ks = sorted(work.get(corr, []))
        if ks:
            t0 = ks[0][0]
            out.append([(name, ts - t0, dur) for ts, dur, name in ks])
    return out


def replay_summary(replay: list, top: int = 12, sequence: bool = False) -> dict:
    """One replay of :func:`graph_replays`: {"kernels", "span_us", "busy_us" (summed
    durations), "top": [(name, count, µs summed)] by µs}; with ``sequence`` also the replay
    itself as "sequence": [(name cut to 90 characters, start µs, duration µs)]."""
    span = max(t + d for _, t, d in replay) if replay else 0.0
    by = defaultdict(lambda: [0, 0.0])
    for name, _, dur in replay:
        by[name][0] += 1
        by[name][1] += dur
    tops = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    out = {"kernels": len(replay), "span_us": span, "busy_us": sum(d for _, _, d in replay),
           "top": [(name, n, us) for name, (n, us) in tops]}
    if sequence:
        out["sequence"] = [(name[:90], round(t, 2), round(d, 2)) for name, t, d in replay]
    return out


def profile_generate(engine, prompts, trace_path: str, **generate_kw) -> dict:
    """One warm-up call (graph capture, compilation), then one generate() under torch.profiler
    (CPU + CUDA activity); the trace is written to ``trace_path`` (.json or .json.gz) and
    summarized. The engine must have ``nvtx=True`` (its stages are then named ranges)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not engine.nvtx:
        raise ValueError("profile_generate needs an engine made with nvtx=True (stage ranges)")
    fn = engine.generate if engine.drafter is not None else engine.generate_autoregressive
    fn(prompts, **generate_kw)
    acts = [ProfilerActivity.CPU]
    if engine.target.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        fn(prompts, **generate_kw)
        if engine.target.device.type == "cuda":
            torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)  # gzip-compressed by torch for a .gz path
    return summarize_trace(trace_path)


def format_summary(s: dict) -> str:
    lines = [f"rounds {s['rounds']}",
             f"{'stage':16s} {'calls':>6s} {'host ms':>9s} {'GPU ms':>9s}  top kernels "
             f"(ms per call, share)"]
    for name, st in s["stages"].items():
        tops = "; ".join(f"{k[:48]} {ms:.3f} {share:.0%}" for k, ms, share in st["top_kernels"])
        lines.append(f"{name:16s} {st['calls']:6d} {st['host_ms_per_call']:9.3f} "
                     f"{st['gpu_ms_per_call']:9.3f}  {tops}")
    g = s["gpu"]
    if g is not None:
        lines.append(f"GPU after prefill: busy {g['busy_ms']:.2f} ms of {g['span_ms']:.2f} ms "
                     f"({g['busy_fraction']:.0%}); per round busy {g['per_round_ms']['busy']:.3f}"
                     f" ms, idle {g['per_round_ms']['idle']:.3f} ms; gaps between kernels "
                     f"median {g['gap_us_median']:.1f} us, p90 {g['gap_us_p90']:.1f} us")
    return "\n".join(lines)
