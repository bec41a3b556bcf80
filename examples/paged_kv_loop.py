"""Speculative decoding over a paged KV cache (vLLM / SGLang style: a pool of fixed-size pages and
a block table per request), with dspark's ops as the only dspark part.

Each round drafts a token tree per request: two prompt-lookup chains from the anchor
(dspark.ops.ngram_propose with the longest n-gram match, and with the last bigram). The target
writes every node's K/V into the request's pages at slot length + node and scores the tree;
dspark.ops.verify picks the accepted path; dspark.ops.kv_commit moves that path's K/V to slots
length, length + 1, ... and names the pages only rejected nodes used, which go back to the pool.
The target is a toy one-layer attention LM (random weights, float64) whose paged forward is
spelled out here; greedy output equals its plain greedy decoding (tests/test_examples.py).

    python examples/paged_kv_loop.py [--gamma G] [--page-size P] [--temperature T]
"""
import argparse

import torch

import dspark

F64 = torch.float64


class ToyLM:
    """Token + position embeddings, one attention layer (heads x dim), an LM head. With a single
    layer a token's K/V depend on its token and position only, so a prompt's cache is one
    projection (no causal prefill needed)."""

    def __init__(self, vocab=40, heads=2, dim=16, max_len=512, seed=0):
        g = torch.Generator().manual_seed(seed)
        w = heads * dim

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, dtype=F64) * scale
        self.emb, self.pos = rnd(vocab, w), rnd(max_len, w, scale=0.3)
        self.qkv, self.out = rnd(w, 3 * w, scale=w ** -0.5), rnd(w, w, scale=w ** -0.5)
        self.head, self.heads, self.dim = rnd(w, vocab, scale=3 * w ** -0.5), heads, dim

    def project(self, tokens, positions):  # -> x [N, w]; q, k, v [N, heads, dim]
        x = self.emb[tokens] + self.pos[positions]
        return (x, *(x @ self.qkv).view(len(x), 3, self.heads, self.dim).unbind(1))

    def logits(self, x, q, keys, values, mask):  # q [N, ...] over keys [S, ...] where mask [N, S]
        att = torch.einsum("nhd,shd->hns", q, keys) / self.dim ** 0.5
        att = att.masked_fill(~mask, -float("inf")).softmax(-1)
        return (x + torch.einsum("hns,shd->nhd", att, values).reshape(len(x), -1) @ self.out) \
            @ self.head

    def greedy(self, prompt, max_new):  # plain decoding, recomputing everything: the reference
        seq = list(prompt)
        for _ in range(max_new):
            t = torch.tensor(seq)
            x, q, k, v = self.project(t, torch.arange(len(t)))
            mask = torch.ones(len(t), len(t), dtype=torch.bool).tril()
            seq.append(int(self.logits(x, q, k, v, mask)[-1].float().argmax()))  # as verify
        return seq[len(prompt):]


class PagedKV:
    """A pool of `pages` pages of `page_size` slots; block_table[b, i] = request b's i-th page
    (-1: none). kv_commit takes the pool as [layers = 1, pages, page_size, heads, dim]."""

    def __init__(self, pages, page_size, heads, dim, batch, max_len):
        self.k = torch.zeros(1, pages, page_size, heads, dim, dtype=F64)
        self.v = torch.zeros_like(self.k)
        self.free, self.page_size = list(range(pages)), page_size
        self.table = torch.full((batch, -(-max_len // page_size)), -1, dtype=torch.int64)
        self.length = [0] * batch  # slots holding committed K/V (all but the anchor)

    def write(self, b, start, k, v):  # rows at slots start.., taking pages from the pool
        for i in range(start // self.page_size, -(-(start + len(k)) // self.page_size)):
            if self.table[b, i] < 0:
                self.table[b, i] = self.free.pop()
        page, row = self.where(b, torch.arange(start, start + len(k)))
        self.k[0, page, row], self.v[0, page, row] = k, v

    def read(self, b, n):  # K, V of slots 0..n-1
        page, row = self.where(b, torch.arange(n))
        return self.k[0, page, row], self.v[0, page, row]

    def where(self, b, slots):
        return self.table[b, slots // self.page_size], slots % self.page_size

    def release(self, b, pages):  # back to the pool; the table forgets them
        for p in (int(p) for p in pages if p >= 0):
            self.table[b][self.table[b] == p] = -1
            self.free.append(p)


def generate(model, prompts, max_new, gamma=3, page_size=4, temperature=0.0, seed=0):
    """max_new tokens after each prompt (ids, len >= 2); returns (outputs, cache, rounds through
    the second chain, i.e. rounds where kv_commit moved rows)."""
    B, max_len = len(prompts), max(map(len, prompts)) + max_new + 2 * gamma + 1
    cache = PagedKV(B * -(-max_len // page_size), page_size, model.heads, model.dim, B, max_len)
    seqs = [list(p) for p in prompts]
    for b, p in enumerate(seqs):  # the cache holds every committed token but the anchor
        _, _, k, v = model.project(torch.tensor(p[:-1]), torch.arange(len(p) - 1))
        cache.write(b, 0, k, v)
        cache.length[b] = len(p) - 1
    n = 1 + 2 * gamma  # the tree: anchor, chain A (nodes 1..gamma), chain B (gamma + 1..2 gamma)
    parents = torch.tensor([-1, *range(gamma), 0, *range(gamma + 1, 2 * gamma)])
    depth = torch.tensor([0, *range(1, gamma + 1), *range(1, gamma + 1)])
    ancestor = torch.zeros(n, n, dtype=torch.bool)  # ancestor[j, i]: node i is j or above it
    for j in range(n):
        i = j
        while i >= 0:
            ancestor[j, i], i = True, int(parents[i])
    moved = 0
    while True:
        live = [b for b in range(B) if len(seqs[b]) - len(prompts[b]) < max_new]
        if not live:
            break
        ctx = torch.zeros(len(live), max_len, dtype=torch.int64)
        for r, b in enumerate(live):
            ctx[r, :len(seqs[b])] = torch.tensor(seqs[b])
        lens = torch.tensor([len(seqs[b]) for b in live])
        chain_a = dspark.ops.ngram_propose(ctx, lens, gamma, max_ngram=3)
        chain_b = dspark.ops.ngram_propose(ctx, lens, gamma, max_ngram=1)[:, 1:]
        drafts = torch.cat([chain_a, chain_b], 1)  # [R, n]: anchor, A, B
        start = torch.tensor([cache.length[b] for b in live])  # slot of each root (the anchor)
        logits = []
        for r, b in enumerate(live):  # write the tree's K/V at slots start + node, then attend
            x, q, k, v = model.project(drafts[r], start[r] + depth)
            cache.write(b, int(start[r]), k, v)
            keys, values = cache.read(b, int(start[r]) + n)
            mask = torch.cat([torch.ones(n, int(start[r]), dtype=torch.bool), ancestor], 1)
            logits.append(model.logits(x, q, keys, values, mask))
        offsets = torch.arange(len(live) + 1) * n
        res = dspark.ops.verify(torch.cat(logits).float(), offsets, drafts.reshape(-1),
                                parents.repeat(len(live)), None,
                                dspark.ops.sampling_tensors(len(live), temperature),
                                seeds=torch.full((len(live),), seed), positions=start,
                                max_nodes=n)
        table = cache.table[live]  # rows of the live requests (the op only reads the table)
        lengths, freed = dspark.ops.kv_commit(cache.k, cache.v, start, res.accept_nodes,
                                              res.accept_count, offsets, table)
        for r, b in enumerate(live):
            c = int(res.accept_count[r])
            seqs[b] += res.out_tokens[r, :c + 1].tolist()  # accepted drafts + bonus/correction
            cache.release(b, freed[r])
            cache.length[b] = int(lengths[r])  # = len(seqs[b]) - 1: the path, below the anchor
            moved += c > 0 and int(res.accept_nodes[r, 1]) - int(offsets[r]) > gamma
    return [s[len(p):len(p) + max_new] for s, p in zip(seqs, prompts)], cache, moved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--page-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args()
    model = ToyLM()
    prompts = [[1, 2, 3, 1, 2], [5, 6, 7, 8, 5, 6], [9, 9, 4]]
    out, cache, moved = generate(model, prompts, args.max_new_tokens, args.gamma,
                                 args.page_size, args.temperature)
    for prompt, tokens in zip(prompts, out):
        print(prompt, "->", tokens)
    print(f"rounds that moved K/V rows (path through the second chain): {moved}; pages in use "
          f"{int((cache.table >= 0).sum())} for {sum(cache.length)} cached tokens")


if __name__ == "__main__":
    main()
