"""torch.library.opcheck of both ops, and torch.compile(fullgraph=True) == eager."""
import pytest
import torch

from helpers import make_batch, sample_args


def verify_cases():
    gen = torch.Generator().manual_seed(0)
    return {
        "chain_q_keyed": make_batch([3, 0, 2], 11, gen, q_dtype=torch.float32),
        "tree_noq_uniforms": make_batch([4, 2], 9, gen, layout="tree", randomness="uniforms",
                                        dtype=torch.bfloat16, temperature="mixed"),
        "greedy_f16_q64_wide": make_batch([1, 5], 17, gen, temperature="greedy", top_k=3,
                                          dtype=torch.float16, q_dtype=torch.float64, max_nodes=9),
    }


@pytest.mark.parametrize("case", ["chain_q_keyed", "tree_noq_uniforms", "greedy_f16_q64_wide"])
def test_opcheck_verify(device, case):
    b = verify_cases()[case].to(device)
    torch.library.opcheck(torch.ops.dspark.verify.default, b.args())


@pytest.mark.parametrize("randomness", ["keyed", "uniforms"])
@pytest.mark.parametrize("return_probs", [False, True])
def test_opcheck_sample(device, randomness, return_probs):
    gen = torch.Generator().manual_seed(1)
    args = sample_args(torch.randn(5, 13, generator=gen), gen, top_k=[0, 2, 0, 5, 1],
                       top_p=[1.0, 1.0, 0.7, 0.9, 1.0], randomness=randomness)
    args = tuple(None if a is None else a.to(device) for a in args)
    torch.library.opcheck(torch.ops.dspark.sample.default, (*args, return_probs))


def decode_step(logits, offsets, tokens, parents, q, temp, top_k, top_p, seeds, positions):
    """What a decode loop does: verify, then sample the next block's first token from the rows
    after the last accepted node (the ops plus a few torch ops around them)."""
    out, count, nodes = torch.ops.dspark.verify(logits, offsets, tokens, parents, q, temp, top_k,
                                                top_p, seeds, positions, None, 8)
    last = nodes.gather(1, count.unsqueeze(1)).squeeze(1)
    nxt, probs = torch.ops.dspark.sample(logits.index_select(0, last).contiguous(), temp, top_k,
                                         top_p, seeds, positions + count + 1, None, True)
    return out, count, nodes, nxt, probs


def step_args(b):
    return (b.target_logits, b.node_offsets, b.draft_tokens, b.parents, b.draft_probs,
            b.temperature, b.top_k, b.top_p, b.seeds, b.positions)


def test_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    compiled = torch.compile(decode_step, fullgraph=True)
    # Two batches with the same shapes (N = 19 nodes, 4 requests) and different contents.
    for lengths in ([7, 0, 3, 5], [6, 2, 3, 4]):
        b = make_batch(lengths, 50, gen, layout="tree", q_dtype=torch.float32,
                       temperature="mixed", top_k="random", top_p="random", max_nodes=8)
        args = step_args(b.to(device))
        eager, got = decode_step(*args), compiled(*args)
        for e, c in zip(eager, got):
            assert e.dtype == c.dtype and e.device == c.device and torch.equal(e, c)


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager(device):
    """The ops capture into a CUDA graph (no host sync inside) and replays with new inputs copied
    into the captured buffers give exactly the eager results."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    gen = torch.Generator().manual_seed(3)
    batches = [make_batch(lengths, 300, gen, layout="tree", q_dtype=torch.float32,
                          temperature="mixed", top_k="random", top_p="random", max_nodes=8)
               for lengths in ([7, 0, 3, 5], [6, 2, 3, 4], [0, 7, 7, 1])]
    static = [a.clone() if a is not None else None for a in step_args(batches[0].to("cuda"))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_step(*static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = decode_step(*static)
    for b in batches:
        args = step_args(b.to("cuda"))
        for dst, src in zip(static, args):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, decode_step(*args)):
            assert torch.equal(got, want)
