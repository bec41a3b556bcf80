"""ModelRunner: a Transformer + its static KV cache + CUDA graphs for the fixed-shape calls.

prefill (eager, any length), ``extend`` (a causal block of T tokens per request: decode is T = 1)
and ``forward_tree`` (the target forward of a speculative step over packed ragged token trees;
not to be confused with ``dspark.ops.verify``, the acceptance op that reads its logits) share one
forward. ``commit`` moves an accepted tree path's K/V into place after verification. On CUDA,
``extend`` and ``forward_tree`` are captured once per shape bucket and replayed; elsewhere they
run eagerly (same code path). Outputs of graphed calls are static buffers: valid until the next
call with the same shapes.

``compile=True`` additionally runs ``extend``/``forward_tree`` through ``torch.compile`` (one
compile per shape bucket, then captured in the same CUDA graph): inductor fuses the ~40 small
elementwise kernels per layer (norms, rotary, cache writes, SiLU·up) that dominate batch-1 decode
latency.
Compilation costs tens of seconds per bucket, so it is opt-in (``dspark generate --compile``).
``compile="max-autotune-no-cudagraphs"`` (or ``"max-autotune"``'s graph-free twin) lets inductor
also benchmark GEMM kernels; modes that bring their own CUDA graphs are refused (ours capture).

``fused`` (default: on for CUDA) runs decode / extend / verify calls over at most
``FUSED_MAX_ROWS`` token rows entirely on the dspark kernels: ``dspark::fused_linear`` (one
weight-streaming kernel per projection with RMSNorm / SiLU-gate / residual folded in) and
``dspark::decode_attention`` (the block's chain or tree, QK-norm, rotary, cache write). Their
sums do not depend on the row count, so a token's logits are bit-identical in decode and verify.
``batch_invariant=True`` forces them for every decode / extend / verify call, whatever the rows
(above FUSED_MAX_ROWS they re-read the weights once per 64 rows: slower than cuBLAS there, but
greedy speculative output then equals greedy autoregressive output at any batch size).
Above the fused rows, ``hybrid=True`` (the default on CUDA; ``DSPARK_HYBRID=0`` / ``1`` for A/B
runs) keeps ``dspark::decode_attention`` under the cuBLAS projections (``Block.hybrid``: one
attention kernel a layer instead of the unfused core's QK-norm, rotary, cache write and masked SDPA
over the whole cache) for caches of at most ``HYBRID_MAX_SLOTS`` slots; ``hybrid=False`` keeps
cuBLAS + SDPA there. Measured on an H100 at the Qwen3-8B shape (bench/RESULTS.md, 2026-12-07):
faster than cuBLAS + SDPA at every shape timed (32 rows at batch 4: 10.74 vs 12.40 ms).
Prefill stays on cuBLAS + SDPA (shared by the autoregressive and speculative runs).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .kv import KVCache
from .transformer import (
    FUSED_MAX_BLOCK,
    FUSED_MAX_ROWS,
    FUSED_TILE_ROWS,
    HYBRID_MAX_SLOTS,
    PackedLayout,
    Transformer,
)

# torch.compile modes without CUDA graphs of their own (the runner captures the compiled call)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# prefill blocks (batch x padded rows) up to this many tokens replay from a CUDA graph: the
# small ones are bound by launches; above it a prefill is compute-bound and its graph would keep
# activations of that size in the graph pool
PREFILL_GRAPH_TOKENS = 8192


class Forward(NamedTuple):
    logits: torch.Tensor  # [rows, V] float32
    hidden: Optional[torch.Tensor]  # [len(taps), rows..., hidden] or None


def tree_masks(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """parents [R, W] local ids (-1 = root) -> ancestor-or-self mask [R, W, W] and depth [R, W]."""
    R, W = parents.shape
    ids = torch.arange(W, device=parents.device)
    anc = (ids[:, None] == ids[None, :]).expand(R, W, W).clone()
    cur = ids.expand(R, W)
    for _ in range(W - 1):
        cur = torch.where(cur >= 0, parents.gather(1, cur.clamp(min=0)), -1)
        anc |= cur[..., None] == ids
    return anc, anc.sum(-1) - 1


class ModelRunner:
    def __init__(self, model: Transformer, use_cuda_graphs: Optional[bool] = None,
                 compile: Union[bool, str] = False, fused: Optional[bool] = None,
                 batch_invariant: bool = False, fused_max_rows: Optional[int] = None,
                 hybrid: Optional[bool] = None):
        if isinstance(compile, str) and compile not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES} (the runner captures "
                             f"its own CUDA graphs), got {compile!r}")
        if compile and getattr(model, "tp", None) is not None:
            raise ValueError("compile is not supported with a tensor-parallel model (its "
                             "collectives are not traced)")
        self.model = model
        self.compile = compile
        self.config = model.config
        self.cache: Optional[KVCache] = None
        if use_cuda_graphs is None:
            use_cuda_graphs = model.device.type == "cuda"
        self.use_cuda_graphs = use_cuda_graphs
        self.fused = model.device.type == "cuda" if fused is None else fused
        # calls the fused kernels do not take: cuBLAS projections around decode_attention
        # (None: on for CUDA unless DSPARK_HYBRID=0, the switch for the CLI's A/B runs)
        if hybrid is None:
            env = os.environ.get("DSPARK_HYBRID", "auto")
            if env not in ("auto", "0", "1"):
                raise ValueError(f"DSPARK_HYBRID must be 'auto', '0' or '1', got {env!r}")
            hybrid = model.device.type == "cuda" if env == "auto" else env == "1"
        self.hybrid = bool(hybrid)
        self.batch_invariant = batch_invariant
        # fused_max_rows: the largest decode / verify call (token rows) on the fused kernels
        # (None: FUSED_MAX_ROWS; "auto": this model's measured crossover, dspark/crossover.py);
        # above it cuBLAS + SDPA, unless batch_invariant
        auto = fused_max_rows == "auto"
        if fused_max_rows is None or auto:
            fused_max_rows = FUSED_MAX_ROWS
        if isinstance(fused_max_rows, bool) or not isinstance(fused_max_rows, int) \
                or fused_max_rows < 1:
            raise ValueError(f"fused_max_rows must be an integer >= 1 or 'auto', got "
                             f"{fused_max_rows!r}")
        self.fused_max_rows = fused_max_rows
        if batch_invariant:
            if fused is False or not model.fusable():
                raise ValueError("batch_invariant needs the fused dspark kernels (fused=True and "
                                 "a SiLU-gated MLP)")
            self.fused = True
        self._graphs: dict = {}
        self._pool = None
        self._compiled: dict = {}
        self.pad_prefill = False  # pad prefills to their bucket on CPU too (tests)
        # a fused ragged verify on its padded block or with gathers around attention (_pad_ragged)
        self.ragged_fused = os.environ.get("DSPARK_RAGGED_FUSED", "auto")
        if self.ragged_fused not in ("auto", "pad", "gather"):
            raise ValueError(f"DSPARK_RAGGED_FUSED must be 'auto', 'pad' or 'gather', got "
                             f"{self.ragged_fused!r}")
        if auto and self.fused and not batch_invariant and model.fusable():
            from ..crossover import resolve_fused_max_rows  # (it imports the scheduler)
            self.fused_max_rows = resolve_fused_max_rows(self)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def cache_serial(self) -> int:
        """Names the current KV-cache allocation (0: none); graphs over it are keyed by it."""
        return self.cache.serial if self.cache is not None else 0

    def release(self) -> None:
        """Drop the KV cache and the graphs captured over it (and their memory pool)."""
        self._graphs.clear()
        self._pool = None  # a fresh pool: the old one's graphs (and its memory) are gone
        self.cache = None

    def allocate(self, batch: int, max_len: int) -> KVCache:
        """(Re)allocate the KV cache for ``batch`` sequences of ``max_len`` slots (drops graphs)."""
        c = self.cache
        if c is None or c.batch != batch or c.max_len != max_len:
            self.release()
            cfg = self.config
            self.cache = KVCache(cfg.num_layers, batch, self.model.cache_kv_heads, max_len,
                                 cfg.head_dim, self.model.dtype, self.device)
        return self.cache

    # ---- eager entry points ------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], taps: Sequence[int] = ()) -> Forward:
        """Run prompts (one per cache row, len >= 1) into cache slots 0..len-1.

        Returns the logits after each prompt's last token [B, V] and the tapped residual streams
        [len(taps), B, T_max, hidden] (right-padded) or None.

        On a GPU, B * T_bucket <= PREFILL_GRAPH_TOKENS: the block is padded to a power of two
        of rows (>= 16) and, with CUDA graphs, replayed from a graph per (B, T_bucket). Eager,
        the prefill of the benchmark pair (24 layers) took 18.9 ms of host time for 1.8 ms of
        GPU work (H100, 2026-12-06 s12 profile): an eighth of a 16-prompt plain-decoding run.
        Padding rows come after every real row (causal: no real row sees them) and write only
        slots past the prompt, which decoding overwrites, as the right-padding of shorter
        prompts always did."""
        B = len(prompts)
        if self.cache is None or self.cache.batch != B:
            raise ValueError(f"prefill of {B} prompts needs a cache of batch {B}: call allocate()")
        return self._prefill_block("prefill", prompts, (), taps)

    @torch.inference_mode()
    def prefill_rows(self, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                     taps: Sequence[int] = ()) -> Forward:
        """Prefill ``prompts`` into the given cache rows (slots 0..len-1 of each), leaving every
        other row as it is: a finished request's slot refilled with the next prompt
        (continuous batching, dspark/serve.py). Returns what :meth:`prefill` returns for them.
        On a GPU the block is padded to a power-of-two bucket (as :meth:`prefill`) and replayed
        from a graph per (len(rows), bucket); the row ids are an input of the graph."""
        B = len(rows)
        if self.cache is None:
            raise ValueError("prefill_rows() before allocate(): there is no KV cache")
        if B == 0 or B != len(prompts) or len(set(rows)) != B \
                or not all(0 <= r < self.cache.batch for r in rows):
            raise ValueError(f"prefill_rows needs distinct cache rows in [0, {self.cache.batch}), "
                             f"one per prompt; got rows {list(rows)} for {len(prompts)} prompts")
        ids = torch.as_tensor(list(rows), dtype=torch.int64, device=self.device)
        return self._prefill_block("prefill_rows", prompts, (ids,), taps)

    def _prefill_block(self, name: str, prompts, rows: tuple, taps) -> Forward:
        """The prompts as one right-padded block through :meth:`_prefill` (rows: () or the
        cache-row ids), graphed where :meth:`prefill` says."""
        B = len(prompts)
        lens = [len(p) for p in prompts]
        T = max(lens)
        if min(lens) < 1 or T > self.cache.max_len:
            raise ValueError(f"prompt lengths must be in [1, {self.cache.max_len}], got {lens}")
        # on a GPU (graphed or not: both compute the same shapes, so the same bits) or when
        # asked (pad_prefill): the bucket's rows
        bucket = min(max(16, 1 << (T - 1).bit_length()), self.cache.max_len)
        padded = (self.pad_prefill or self.device.type == "cuda") \
            and B * bucket <= PREFILL_GRAPH_TOKENS
        width = bucket if padded else T
        graphed = padded and self.use_cuda_graphs and not torch.cuda.is_current_stream_capturing()
        tokens = torch.zeros(B, width, dtype=torch.int64)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.int64)
        tokens, last = tokens.to(self.device), torch.as_tensor(lens, device=self.device) - 1
        if graphed:  # static outputs: copied out, the next prefill's replay overwrites them
            fwd = self._run(name, self._prefill, tuple(taps), tokens, last, *rows)
            return Forward(fwd.logits.clone(),
                           None if fwd.hidden is None else fwd.hidden[:, :, :T].clone())
        fwd = self._prefill(tokens, last, *rows, tuple(taps))
        return Forward(fwd.logits, None if fwd.hidden is None else fwd.hidden[:, :, :T])

    def _prefill(self, tokens, last, *rows_taps):
        """tokens [B, T] from slot 0 (causal, the kernels of a full forward); last [B]; then
        optionally rows [B] i64 (the cache rows to fill; default 0..B-1), then the taps."""
        *rows, taps = rows_taps
        rows = rows[0] if rows else None
        B, T = tokens.shape
        dev = tokens.device
        positions = torch.arange(T, device=dev).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T)
        start = torch.zeros(B, dtype=torch.int64, device=dev)
        c = self.cache
        h, tapped = self.model(tokens, positions, start, causal, c.k, c.v, T, taps, rows=rows)
        logits = self.model.logits(h[torch.arange(B, device=dev), last])
        return Forward(logits, torch.stack(tapped) if tapped else None)

    def extend(self, tokens: torch.Tensor, start: torch.Tensor, last: Optional[torch.Tensor] = None,
               taps: Sequence[int] = ()) -> Forward:
        """A causal block per request. tokens [B, T] at positions/slots start[b] + t; returns the
        logits of row ``last[b]`` ([B] i64, default T - 1) as [B, V] and taps [n, B, T, hidden].
        Rows past a request's real block are harmless padding (they only write slots beyond it)."""
        if last is None:
            last = torch.full_like(start, tokens.shape[1] - 1)
        return self._run("extend", self._extend, tuple(taps), tokens, start, last)

    def decode(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """One token per request ([B] at positions ``start``); logits [B, V]."""
        return self.extend(tokens[:, None], start).logits

    def forward_tree(self, draft_tokens: torch.Tensor, parents: torch.Tensor,
                     node_offsets: torch.Tensor, start: torch.Tensor, max_nodes: int,
                     taps: Sequence[int] = (), padded: bool = False,
                     layout: Optional[PackedLayout] = None) -> Forward:
        """The target forward of a speculative step over packed ragged token trees: request r's
        nodes are draft_tokens[off[r]:off[r+1]] (node 0 = root = anchor at position start[r]);
        parents are local ids (-1 at the root). Node j is written to slot start[r] + j at
        position start[r] + depth(j) and attends to the cache, its ancestors and itself. Returns
        logits [N, V] and taps [n, N, hidden] (packed rows).

        Unless every request has ``max_nodes`` nodes, the projections and the MLP run on the N
        packed rows only and attention on the padded [R, max_nodes] layout
        (:class:`~dspark.models.transformer.PackedLayout`): a verify of shorter proposals costs
        fewer rows. ``padded``: rows from off[R] to N are padding (a row count rounded up to a
        captured graph size): they touch no cache slot and their outputs are unspecified.
        ``layout``: that packed layout when the caller already has it (implies ``padded``; the
        scheduled engine builds it while packing), instead of deriving it from node_offsets."""
        given = () if layout is None else (layout.dest, layout.src, layout.fill)
        return self._run("forward_tree", self._forward_tree,
                         (max_nodes, tuple(taps), padded or layout is not None),
                         draft_tokens, parents, node_offsets, start, *given)

    @property
    def tensor_parallel(self) -> bool:
        """Whether the model is one rank's shard of a tensor-parallel target (dspark.models.tp)."""
        return getattr(self.model, "tp", None) is not None

    def commit(self, root: torch.Tensor, accepted_nodes: torch.Tensor,
               accept_count: torch.Tensor, node_offsets: Optional[torch.Tensor] = None) -> None:
        """After ``dspark.ops.verify`` of a tree: move the accepted path's K/V to the slots right
        after the committed prefix (one ``dspark::kv_commit``). root: [B] root slots;
        accepted_nodes: [B, W] verify's flat node ids with its node_offsets [B + 1], or *local*
        ids when node_offsets is None (root first, entries past accept_count ignored);
        accept_count: [B]. Chains need no call: their accepted nodes already sit in slots
        root + depth (rollback = shorter lengths)."""
        if self.cache is None:
            raise ValueError("commit() before allocate(): there is no KV cache")
        self.cache.commit(root, accepted_nodes, accept_count, node_offsets)

    # ---- traced bodies -----------------------------------------------------------------------
    def _extend(self, tokens, start, last, taps):
        B, T = tokens.shape
        dev = tokens.device
        c = self.cache
        path = self._path(B * T, T)
        if path:
            # on the dspark kernels: no mask, no position arange (each would be one more small
            # kernel, outside the programmatic-launch chain); decode's last row is row 0
            h, tapped = self.model(tokens, None, start, None, c.k, c.v, c.max_len, taps, path)
            h = h[:, 0] if T == 1 else h[torch.arange(B, device=dev), last]
            return Forward(self.model.logits(h, path is True),
                           torch.stack(tapped) if tapped else None)
        positions = start[:, None] + torch.arange(T, device=dev)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T)
        h, tapped = self.model(tokens, positions, start, causal, c.k, c.v, c.max_len, taps)
        logits = self.model.logits(h[torch.arange(B, device=dev), last])
        return Forward(logits, torch.stack(tapped) if tapped else None)

    def _forward_tree(self, draft_tokens, parents, node_offsets, start, *given_static):
        *given, (max_nodes, taps, padded) = given_static  # given: a PackedLayout's dest, src, fill
        N, R, W = draft_tokens.shape[0], start.shape[0], max_nodes
        fused = self._path(N, W)
        if N == R * W and not padded:  # every request has max_nodes nodes: no packing
            tokens, par = draft_tokens.view(R, W), parents.view(R, W)
            h, tapped = self._tree_body(tokens, par, start, taps, fused)
            flat = lambda t: t.reshape(N, *t.shape[2:])  # noqa: E731
        else:  # ragged: the projections on the N packed rows, attention on [R, W]
            layout = PackedLayout(*given, R, W) if given else \
                PackedLayout.from_offsets(node_offsets, N, W)
            par = layout.pad_ids(parents, -1)  # block positions no row fills: lone roots
            if fused and self._pad_ragged(N, R, W):
                # the whole [R, W] block through every layer, packed once at the end: one
                # gather instead of two per layer (a real row's bits are the same either way:
                # the fused kernels are row-independent, and a row no node fills is nobody's
                # ancestor and writes only its own block slot)
                h, tapped = self._tree_body(layout.pad_ids(draft_tokens, 0), par, start, taps,
                                            fused)
                flat = layout.pack
            else:
                h, tapped = self._tree_body(draft_tokens, par, start, taps, fused, layout)
                flat = lambda t: t  # noqa: E731
        hidden = torch.stack([flat(t) for t in tapped]) if tapped else None
        return Forward(self.model.logits(flat(h), fused is True), hidden)

    def _tree_body(self, tokens, par, start, taps, fused, layout=None):
        """The model over a block of trees given by par [R, W] (local parent ids, -1 at roots);
        tokens [R, W], or the packed rows [N] of ``layout``; fused: :meth:`_path`'s answer."""
        c = self.cache
        if fused:  # the kernels take the tree as parents (row j at position start + depth(j))
            return self.model(tokens, None, start, None, c.k, c.v, c.max_len, taps, fused, par,
                              layout)
        anc, depth = tree_masks(par)
        return self.model(tokens, start[:, None] + depth, start, anc, c.k, c.v, c.max_len, taps,
                          layout=layout)

    def _pad_ragged(self, N: int, R: int, W: int) -> bool:
        """Whether a fused ragged verify of N packed rows runs on its padded [R, W] block: when
        the padding costs the fused projections no extra 64-row pass (their time is per pass:
        the pair's forward took 2.37 ms at 63 rows and 2.50 at 127, H100 s13), and the
        gathers it saves are 2 per layer (~0.2 ms a round on the 24-layer pair, estimated:
        s13's sync round at batch 1 took 0.26 ms more than fixed γ's). ``ragged_fused``
        ("pad" / "gather", ``DSPARK_RAGGED_FUSED``) forces either for A/B runs."""
        if self.ragged_fused != "auto":
            return self.ragged_fused == "pad" and self._fuse(R * W, W)
        tiles = lambda rows: -(-rows // FUSED_TILE_ROWS)  # noqa: E731
        return self._fuse(R * W, W) and tiles(R * W) <= tiles(N)

    def _fuse(self, rows: int, block: int) -> bool:
        """Whether a call over ``rows`` token rows, ``block`` per request, runs on the dspark
        kernels (see the module docstring)."""
        if self.batch_invariant:
            if not self.model.fusable(block):
                raise ValueError(f"batch_invariant: blocks of {block} tokens exceed the fused "
                                 f"kernels' limit")
            return True
        return self.fused and self.model.can_fuse(rows, block, self.fused_max_rows)

    def _path(self, rows: int, block: int):
        """How a decode / verify call runs: True = the dspark kernels (:meth:`_fuse`),
        "attention" = cuBLAS projections around decode_attention (``hybrid``), False = cuBLAS +
        SDPA."""
        if self._fuse(rows, block):
            return True
        if self.hybrid and block <= FUSED_MAX_BLOCK and self.cache is not None \
                and self.cache.max_len <= HYBRID_MAX_SLOTS:
            return "attention"
        return False

    def _body(self, name, fn):
        if not self.compile or name in ("prefill", "prefill_rows"):  # a compile per bucket: no
            return fn
        if name not in self._compiled:
            # dynamic=False: every bucket is a fixed shape anyway, and static shapes let inductor
            # pick its best kernels; taps/max_nodes are Python constants (guarded per value).
            mode = self.compile if isinstance(self.compile, str) else None
            self._compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
        return self._compiled[name]

    @torch.inference_mode()
    def _run(self, name, fn, static, *tensors):
        body = self._body(name, fn)
        call = lambda *t: body(*t, static)  # noqa: E731
        if not self.use_cuda_graphs or torch.cuda.is_current_stream_capturing():
            return call(*tensors)  # (inside a caller's capture: part of the caller's graph)
        key = (name, static, tuple(t.shape for t in tensors))
        entry = self._graphs.get(key)
        if entry is None:
            # NOTE(graphs): warm-up and capture rerun the call on the real inputs; a forward only
            # writes its own block's slots from the same context, so the reruns are idempotent.
            inputs = [t.clone() for t in tensors]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    call(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = call(*inputs)
            entry = self._graphs[key] = (graph, inputs, out)
        graph, inputs, out = entry
        for dst, src in zip(inputs, tensors, strict=True):
            dst.copy_(src)
        graph.replay()
        return out
