"""Speculative-decoding metrics: tau, acceptance, per-position acceptance, histogram, time split."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


class StageTimer:
    """Accumulates wall time per named stage without syncing inside a step: CUDA events on GPU
    (read by ``totals()`` after the caller's sync), perf_counter on CPU. With ``nvtx`` every
    stage is also an NVTX range (what Nsight Systems shows per stage) and a torch.profiler
    ``record_function`` range (what dspark.profiling reads, any device); off, it costs nothing."""

    def __init__(self, device: torch.device, nvtx: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.annotate = nvtx
        self.nvtx = nvtx and self.cuda
        self._spans: dict[str, list] = {}

    @contextmanager
    def __call__(self, name: str):
        with torch.profiler.record_function(name) if self.annotate else nullcontext():
            with self._timed(name):
                yield

    @contextmanager
    def _timed(self, name: str):
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
        else:
            a = time.perf_counter()
            yield
            b = time.perf_counter()
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._spans.setdefault(name, []).append((a, b))

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self._spans.items()}
        return {k: sum(b - a for a, b in v) for k, v in self._spans.items()}


# Stages a step is timed in (StageTimer names): the drafter's proposal, the verify lengths of a
# scheduled step (dspark/schedule_step.py: the scheduling op and the packing), the target's forward
# over the verified tokens (autoregressive decoding: the whole decode step), the acceptance op
# (dspark.ops.verify) and the commit (KV compaction, state and drafter updates).
STAGES = ("draft", "schedule", "target forward", "accept", "commit")


def clip_rounds(accept: torch.Tensor, active: torch.Tensor,
                emitted: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The round log [rounds, B] cut to the tokens each request kept: a round commits
    accept + 1 tokens, but a request returns only ``emitted[b]`` of all its rounds' tokens (the
    rest lay past max_new_tokens or a stop token). A cut round counts the tokens it kept
    (accepted drafts = kept - 1); a round that kept none is not a round of that request."""
    committed = (accept + 1) * active  # [rounds, B] tokens each round committed
    before = committed.cumsum(0) - committed  # tokens of the request's earlier rounds
    left = torch.as_tensor(emitted, dtype=committed.dtype, device=committed.device)
    kept = (left[None] - before).clamp(min=0).minimum(committed)
    return torch.where(active.bool(), (kept - 1).clamp(min=0), accept), kept > 0


@dataclass
class Metrics:
    gamma: int = 0  # 0: autoregressive decoding (no drafts: no acceptance statistics)
    rounds: int = 0  # target forwards after prefill (speculative rounds or decode steps)
    request_rounds: int = 0  # sum over rounds of active requests
    new_tokens: int = 0  # tokens returned (after stop / max_new truncation)
    tau: float = 1.0  # tokens per request-round, bonus/correction included
    acceptance_rate: float = 0.0  # accepted drafts / drafted depth
    position_acceptance: list = field(default_factory=list)  # P(accept depth k | reached k)
    accept_hist: list = field(default_factory=list)  # request-rounds with k accepted, k = 0..gamma
    prefill_s: float = 0.0
    draft_s: float = 0.0
    schedule_s: float = 0.0
    target_forward_s: float = 0.0
    accept_s: float = 0.0
    commit_s: float = 0.0
    step_s: float = 0.0  # whole steps, when the stages are not timed apart (stage_times off)
    other_s: float = 0.0  # the host loop and anything outside the timed stages
    total_s: float = 0.0
    tokens_per_s: float = 0.0  # new_tokens / total_s (prefill included): aggregate throughput
    decode_tokens_per_s: float = 0.0  # new_tokens / (total_s - prefill_s)
    user_tokens_per_s: float = 0.0  # mean over requests of tokens / (its rounds x time/round)
    # verify budgets: "fixed" (every draft verified) or the scheduler's mode
    schedule: str = "fixed"
    verified_per_request: float = 0.0  # drafts verified per request-round
    verified_hist: list = field(default_factory=list)  # request-rounds verifying l, l = 0..gamma
    wasted_tokens: int = 0  # verified drafts that were rejected
    wasted_fraction: float = 0.0  # of the verified drafts
    forward_rows: int = 0  # rows of the target forwards (finished requests and padding included)
    # rounds / the mean request's active rounds: a batch runs until its slowest request ends
    # (plain decoding of equal-length requests: 1; speculation: > 1, its last rounds part-empty)
    tail: float = 1.0
    # mean per round of tokens x SPS(B) at the round's B verify rows (where a table is known):
    theta_predicted: Optional[float] = None  # the scheduler's objective: expected tokens
    theta_achieved: Optional[float] = None  # the tokens the round committed
    # the same per round (lists): verified (mean drafts per active request), wasted,
    # theta_predicted / theta_achieved (where a table is known), rows (scheduled runs)
    per_round: dict = field(default_factory=dict)

    @property
    def speculative(self) -> bool:
        return self.gamma > 0

    @classmethod
    def from_rounds(cls, gamma: int, accept: torch.Tensor, active: torch.Tensor, new_tokens: int,
                    times: dict, total_s: float, *, verified: Optional[torch.Tensor] = None,
                    expected: Optional[torch.Tensor] = None, sps: Optional[list] = None,
                    rows: Optional[list] = None, user_tokens: Optional[list] = None,
                    schedule: str = "fixed") -> "Metrics":
        """accept, active: [rounds, B] accepted drafts and active flags per request-round;
        times: seconds per stage ("prefill", STAGES, "step"). Scheduled runs also give verified
        [rounds, B] (drafts verified; default gamma), expected [rounds] (tokens the scheduler
        expected the round to commit), sps (SPS(B) for B = 1..), rows (forward rows per round,
        padding included); user_tokens: tokens returned per request."""
        a = accept[active].long()
        hist = torch.bincount(a, minlength=gamma + 1)[:gamma + 1] if a.numel() else \
            torch.zeros(gamma + 1, dtype=torch.long)
        reached = hist.flip(0).cumsum(0).flip(0)  # request-rounds with >= k accepted
        pos = [float(reached[k] / reached[k - 1]) if reached[k - 1] else 0.0
               for k in range(1, gamma + 1)]
        n = int(a.numel())
        prefill = times.get("prefill", 0.0)
        stage = {name: times.get(name, 0.0) for name in STAGES}
        step = times.get("step", 0.0)
        rounds, batch = accept.shape
        if verified is None:
            verified = torch.full_like(accept, gamma)
        v = verified[active].long()
        vhist = torch.bincount(v, minlength=gamma + 1)[:gamma + 1] if v.numel() else \
            torch.zeros(gamma + 1, dtype=torch.long)
        wasted = int((v - a).sum())
        series = {}  # one entry per round, over its active requests
        if gamma:
            n_act = active.sum(1).clamp(min=1)
            series = dict(verified=((verified * active).sum(1) / n_act).tolist(),
                          wasted=((verified - accept) * active).sum(1).tolist())
        theta = (None, None)
        if sps is not None and expected is not None and rounds:
            rate = torch.tensor([0.0] + list(sps), dtype=torch.float64)
            at = rate[(batch + verified.sum(1)).clamp(max=len(sps))]  # SPS(B) of each round
            pred, got = expected.double() * at, ((accept + 1) * active).sum(1).double() * at
            theta = (float(pred.mean()), float(got.mean()))
            series.update(theta_predicted=pred.tolist(), theta_achieved=got.tolist())
        if rows is not None and gamma:
            series["rows"] = list(rows)
        decode_s = total_s - prefill
        own = active.sum(0)  # [B] rounds each request was active in
        tail = float(rounds / own.double().mean()) if rounds and own.sum() > 0 else 1.0
        user = 0.0
        if user_tokens and rounds and decode_s > 0:
            step_time = decode_s / rounds
            user = sum(t / (r * step_time) for t, r in zip(user_tokens, own.clamp(min=1).tolist())
                       ) / len(user_tokens)
        return cls(gamma=gamma, rounds=rounds, request_rounds=n, tail=tail,
                   new_tokens=new_tokens, tau=float(a.float().mean() + 1) if n else 1.0,
                   acceptance_rate=float(a.float().mean() / gamma) if n and gamma else 0.0,
                   position_acceptance=pos, accept_hist=hist.tolist(), prefill_s=prefill,
                   draft_s=stage["draft"], schedule_s=stage["schedule"],
                   target_forward_s=stage["target forward"],
                   accept_s=stage["accept"], commit_s=stage["commit"], step_s=step,
                   other_s=max(total_s - prefill - sum(stage.values()) - step, 0.0),
                   total_s=total_s,
                   tokens_per_s=new_tokens / total_s if total_s > 0 else 0.0,
                   decode_tokens_per_s=new_tokens / decode_s if decode_s > 0 else 0.0,
                   user_tokens_per_s=user, schedule=schedule if gamma else "",
                   verified_per_request=float(v.float().mean()) if n and gamma else 0.0,
                   verified_hist=vhist.tolist() if gamma else [], wasted_tokens=wasted,
                   wasted_fraction=wasted / max(1, int(v.sum())),
                   forward_rows=sum(rows) if rows is not None else rounds * batch * (gamma + 1),
                   theta_predicted=theta[0], theta_achieved=theta[1], per_round=series)

    def _stages(self) -> str:
        if self.step_s and not (self.draft_s or self.target_forward_s):
            return f"steps {self.step_s:.3f}s (one graph; stage_times=True splits them)"
        return (f"draft {self.draft_s:.3f}s schedule {self.schedule_s:.3f}s target forward "
                f"{self.target_forward_s:.3f}s accept {self.accept_s:.3f}s commit "
                f"{self.commit_s:.3f}s")

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        head = (f"tokens {self.new_tokens} in {self.total_s:.3f}s ({self.tokens_per_s:.1f} tok/s, "
                f"decode {self.decode_tokens_per_s:.1f} tok/s, per user "
                f"{self.user_tokens_per_s:.1f} tok/s)")
        if self.speculative:
            pos = " ".join(f"{p:.2f}" for p in self.position_acceptance)
            theta = ""
            if self.theta_predicted is not None:
                theta = (f" | theta predicted {self.theta_predicted:.1f} achieved "
                         f"{self.theta_achieved:.1f} tok/s (SPS table)")
            return (f"{head} | rounds {self.rounds} | tau {self.tau:.2f} | accept "
                    f"{self.acceptance_rate:.2%} | per-position [{pos}] | hist "
                    f"{self.accept_hist} | schedule {self.schedule}: verified "
                    f"{self.verified_per_request:.2f} drafts/request-round, hist "
                    f"{self.verified_hist}, wasted {self.wasted_tokens} "
                    f"({self.wasted_fraction:.0%}), forward rows {self.forward_rows}{theta} | "
                    f"time prefill {self.prefill_s:.3f}s {self._stages()} "
                    f"other {self.other_s:.3f}s")
        return (f"{head} | autoregressive: {self.rounds} decode steps | time prefill "
                f"{self.prefill_s:.3f}s target forward {self.target_forward_s:.3f}s other "
                f"{self.other_s:.3f}s")
