"""Plain decoding where speculation measures slower: the engine's ``ar_fallback``.

Why: a verify budget (dspark/schedule_step.py) decides how many drafts each request verifies,
but every speculative step still pays for drafting them. Where drafting costs as much as the
target's step, no budget can keep up with plain decoding: on the benchmark pair (H100,
2026-12-06, bench/RESULTS.md tenth session) a DSpark step at batch 16-64 took 2.8-4.1x a plain
decoding step and emitted ~3 tokens a request, so every mode, fixed gamma or scheduled, ran at
0.25-0.74x autoregressive throughput there. The issue's bar is "never slower than autoregressive".

How: at a load (batch size) it has not seen, a generate() call times its speculative steps
``WARM`` .. ``WARM + PROBE`` one by one (after ``WARM`` steps, which capture the CUDA graphs),
then ``PROBE`` replays of the target's plain decode of the current anchors, whose logits are
dropped (its K / V write at the anchor's slot is rewritten with the same rows by the next
verify, whose root is that anchor). On a GPU each step is timed by CUDA events on the stream,
with no host sync between steps: the time a step takes as the GPU lives it while the host queues
the next one, idle gaps included. Measured on an H100 (2026-12-06 s12, the benchmark pair,
batch 1): a host sync around each step serialised launching and running, and the probe read
788 tokens/s for the DSpark step that ran at 1535 in the same call, so the gate chose plain
decoding (0.99x) where speculation was 1.66x. Each side's rate uses its median step time: a
step that still pays a one-time cost (a graph captured late, a compile) does not decide the
choice (s11: four steps timed as a block read 185 tokens/s against 1969). If plain decoding
yields as many tokens per second (speculation not ahead by ``margin``), the call continues
with plain decoding steps,
and the choice is kept for later calls at that load (batch size, block, and whether any request
samples), which then do not probe. Each step,
speculative or plain, samples from the target's distribution, so the output distribution is
unchanged (and greedy output identical, with the batch-invariant kernels). Measuring costs one
host sync and ``PROBE`` decode steps of target time, once per new load.
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
    """Plain decoding unless speculation measured faster by more than ``margin``. The probe
    sees every request active; plain decoding keeps that rate to the end of a call, while a
    speculative call runs until its slowest request ends, its last rounds nearly empty (s12,
    benchmark pair, batch 128: probes 1.6 % and 5 % above plain decoding kept speculation that
    then ran at 0.52x and 0.74x; 12 % above ran at 1.03x). A near tie goes to plain decoding."""
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

    def stepper(self, engine, st, timer, key: Hashable) -> Callable[[], None]:
        """The step function for one generate() call of ``engine`` on state ``st``."""
        speculative = lambda: engine._step(st, timer)  # noqa: E731
        plain = lambda: engine._decode_step(st, timer)  # noqa: E731
        self.plain_from = None
        known = self.choices.get(key)
        if known is not None:
            if known.plain:
                self.plain_from = 0
            return plain if known.plain else speculative
        k, chosen = 0, None
        clock = _StreamClock(st.tokens.device)
        marks = []  # (clock mark, tokens committed so far): before the probe, after each step

        def step() -> None:
            nonlocal k, chosen
            if chosen is not None:
                return chosen()
            if k == self.WARM + self.PROBE:
                spans = list(zip(marks, marks[1:]))
                seconds = [clock.seconds(a, b) for (a, _), (b, _) in spans]
                tokens = torch.stack([n1 - n0 for (_, n0), (_, n1) in spans]).tolist()
                spec = statistics.mean(tokens) / max(statistics.median(seconds), 1e-9)
                plain_rate = _plain_rate(engine, st, self.PROBE, clock)
                choice = FallbackChoice(spec, plain_rate,
                                        choose_plain(spec, plain_rate, self.margin))
                self.choices[key] = choice
                if choice.plain:
                    self.plain_from = int(st.rounds)
                chosen = plain if choice.plain else speculative
                return chosen()
            k += 1
            if k <= self.WARM:
                return speculative()
            if not marks:  # token counts stay on the stream: no host read until the choice
                marks.append((clock.mark(), st.n_tokens.sum()))
            speculative()
            marks.append((clock.mark(), st.n_tokens.sum()))
        return step


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
