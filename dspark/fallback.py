"""Plain decoding where speculation measures slower: the engine's ``ar_fallback``.

Why: a verify budget (dspark/schedule_step.py) decides how many drafts each request verifies,
but every speculative step still pays for drafting them. Where drafting costs as much as the
target's step, no budget can keep up with plain decoding: on the benchmark pair (H100,
2026-12-06, bench/RESULTS.md tenth session) a DSpark step at batch 16-64 took 2.8-4.1x a plain
decoding step and emitted ~3 tokens a request, so every mode, fixed gamma or scheduled, ran at
0.25-0.74x autoregressive throughput there. The issue's bar is "never slower than autoregressive".

How: the first generate() call at a load (batch size, block, whether any request samples)
speculates to its end and is the probe. After ``WARM`` steps (which capture the CUDA graphs) every
speculative step is timed by CUDA events on the stream (the host clock on CPU), with no host sync
between steps: the time a step takes as the GPU lives it while the host queues the next one.
After ``PROBE`` timed steps, ``PROBE`` replays of the target's plain decode of the current
anchors are timed the same way; their logits are dropped (their K / V write at the anchor's
slot is rewritten with the same rows by the next verify, whose root is that anchor). At the end
of the call the gate compares, for the whole call,
    speculation: tokens committed / (timed steps x median step time)
    plain:       requests active at the probe / median decode step time,
and keeps plain decoding for later calls at that load unless speculation is faster by
``margin``. Why the whole call: (a) acceptance is not stationary. On an H100 (2026-12-06 s13,
the benchmark pair, batch 1 and 4) the first five probed steps of a call emitted ~1.2 tokens
where the call averaged 2.6-3, so a probe of five early steps read speculation at 0.45x of the
rate the same call reached, and chose plain decoding where speculation ran 1.2-1.8x. (b) A
static batch speculates until its slowest request ends, its last rounds nearly empty, while
plain decoding emits a token per request every step to the end (s12: probes 1.6 % and 5 % above
plain decoding at batch 128 kept speculation that then ran at 0.52x and 0.74x); tokens over the
whole call carry that tail. The median step time keeps a step that still pays a one-time cost
(a graph captured late, a compile, the probe's own decode replays and host read) from deciding
(s11: four steps timed as a block read 185 tokens/s against 1969). Each step, speculative or
plain, samples from the target's distribution, so the output distribution is unchanged (and
greedy output identical, with the batch-invariant kernels). Measuring costs one host sync and
``PROBE`` decode steps of target time, once per new load; the first call is never switched
mid-way.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import torch


@dataclass(frozen=True)
class FallbackChoice:
    """What a load's probe measured: tokens/s speculating and decoding plainly."""
    speculative_tok_s: float
    plain_tok_s: float
    plain: bool  # plain decoding chosen

    def to_dict(self) -> dict:
        return {"speculative_tok_s": self.speculative_tok_s, "plain_tok_s": self.plain_tok_s,
                "chose": "autoregressive" if self.plain else "speculative"}


def choose_plain(speculative_tok_s: float, plain_tok_s: float, margin: float) -> bool:
    """Plain decoding unless speculation measured faster by more than ``margin`` (a near tie
    goes to plain decoding: it needs no drafter)."""
    return not speculative_tok_s > plain_tok_s * (1.0 + margin)


class FallbackGate:
    """Per load (the engine's key), the faster of speculative and plain decoding steps."""
    WARM, PROBE = 2, 5  # PROBE odd: the median is one step's time, robust to two outliers

    def __init__(self, margin: float = 0.05):
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
                or not 0.0 <= margin < float("inf"):
            raise ValueError(f"ar_fallback margin must be a finite number >= 0, got {margin!r}")
        self.margin = float(margin)
        self.choices: dict = {}  # load key -> FallbackChoice
        self.plain_from = None  # the last call's round index where plain decoding took over
        self._probe = None  # the running call's probe (a load not yet measured)

    def stepper(self, engine, st, timer, key: Hashable) -> Callable[[], None]:
        """The step function for one generate() call of ``engine`` on state ``st``; call
        :meth:`finish` when the call's steps are done."""
        speculative = lambda: engine._step(st, timer)  # noqa: E731
        self.plain_from, self._probe = None, None
        known = self.choices.get(key)
        if known is not None:
            if known.plain:
                self.plain_from = 0
                return lambda: engine._decode_step(st, timer)
            return speculative
        self._probe = _CallProbe(engine, st, key, speculative, self.WARM, self.PROBE)
        return self._probe.step

    def finish(self) -> None:
        """Ends a call: a probing call's measurements become the choice at its load (a call too
        short to time ``PROBE`` steps leaves the load unknown: the next call probes)."""
        probe, self._probe = self._probe, None
        if probe is None or probe.plain_rate is None:
            return
        spec = probe.speculative_rate()
        self.choices[probe.key] = FallbackChoice(spec, probe.plain_rate,
                                                 choose_plain(spec, probe.plain_rate, self.margin))


class _CallProbe:
    """One probing call: its speculative steps timed from step ``warm`` + 1 to the end."""

    def __init__(self, engine, st, key: Hashable, speculative: Callable[[], None], warm: int,
                 reps: int):
        self.engine, self.st, self.key, self.speculative = engine, st, key, speculative
        self.warm, self.reps = warm, reps
        self.clock = _StreamClock(st.tokens.device)
        self.k = 0
        self.marks: list = []  # a clock mark before the first timed step, then after each
        # tokens the timed steps committed, summed step by step on the device (read once, at
        # the end): between steps a serving loop may refill a finished request's row
        self.tokens = None
        self.plain_rate = None

    def step(self) -> None:
        self.k += 1
        if self.k <= self.warm:
            return self.speculative()
        if not self.marks:
            self.marks.append(self.clock.mark())
            self.tokens = torch.zeros((), dtype=torch.int64, device=self.st.tokens.device)
        before = self.st.n_tokens.sum()
        self.speculative()
        self.tokens += self.st.n_tokens.sum() - before
        self.marks.append(self.clock.mark())
        if self.k == self.warm + self.reps:
            self.plain_rate = _plain_rate(self.engine, self.st, self.reps, self.clock)

    def speculative_rate(self) -> float:
        """Tokens committed over the timed steps / (their count x the median step time)."""
        seconds = [self.clock.seconds(a, b) for a, b in zip(self.marks, self.marks[1:])]
        tokens = int(self.tokens)
        return tokens / max(len(seconds) * statistics.median(seconds), 1e-9)


class _StreamClock:
    """Marks on the current stream: CUDA events on a GPU (read once, at the choice), the host
    clock on CPU, where every op has finished when it returns."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _plain_rate(engine, st, reps: int, clock: _StreamClock) -> float:
    """Tokens/s of plain decoding steps on the current anchors: the target's decode (one graph
    on GPU, in the verify graphs' pool), ``reps`` replays queued back to back and timed each
    by the clock (the median, like the speculative side) after two untimed calls (an eager
    one, then the capture), logits dropped."""
    key = ("probe decode", engine._graph_key(st))

    def dry() -> None:
        engine.target.decode(st.anchor(), st.anchor_pos())
    for _ in range(2):
        engine.graphs(key, dry, True)
    marks = [clock.mark()]
    for _ in range(reps):
        engine.graphs(key, dry, True)
        marks.append(clock.mark())
    times = [clock.seconds(a, b) for a, b in zip(marks, marks[1:])]
    return int(st.active.sum()) / max(statistics.median(times), 1e-9)
