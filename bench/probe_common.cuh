// bench/probe_common.cuh: what the phase probes (probe_attention.cu, probe_verify.cu) share:
// error checks, device arrays, a seeded generator, stamping a mark, and the wall time of a call
// replayed in a CUDA graph (L2 hot, and behind a 256 MB write that evicts L2). Measuring tools
// only; nothing here is part of the product.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

template <typename E>
E* device_array(size_t n) {
  E* d = nullptr;
  CK(cudaMalloc(&d, (n ? n : 1) * sizeof(E)));
  return d;
}
template <typename E>
E* upload(const std::vector<E>& h) {
  E* d = device_array<E>(h.size());
  CK(cudaMemcpy(d, h.data(), h.size() * sizeof(E), cudaMemcpyHostToDevice));
  return d;
}

// Parses "--name value" pairs: set(name, value) returns false for a name it does not know (the
// probe then says which and exits with status 2).
template <typename Set>
void parse_args(int argc, char** argv, Set&& set) {
  for (int i = 1; i + 1 < argc; i += 2)
    if (!set(argv[i], std::atof(argv[i + 1]))) {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      std::exit(2);
    }
}

struct DeviceFacts {
  int sms = 0, clock_khz = 0;
};
inline DeviceFacts device_facts() {
  DeviceFacts d;
  CK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaDeviceGetAttribute(&d.clock_khz, cudaDevAttrClockRate, 0));
  return d;
}

// Uniform in [-0.5, 0.5): a fixed linear congruential sequence, the same on every run.
struct Lcg {
  uint32_t state = 12345u;
  float operator()() {
    state = state * 1664525u + 1013904223u;
    return float(state >> 8) / float(1u << 24) - 0.5f;
  }
};

__device__ __forceinline__ long long global_ns() {
  long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

// Thread 0 of the calling block stamps mark i of `marks` ([2][16]: clock64, globaltimer ns).
__device__ __forceinline__ void stamp_mark(long long (*marks)[16], int i) {
  if (threadIdx.x == 0) {
    marks[0][i] = clock64();
    marks[1][i] = global_ns();
  }
}

// 256 MB written between calls: the next call finds nothing of its inputs in L2.
struct L2Flush {
  static constexpr size_t kBytes = size_t(256) << 20;
  char* buf = device_array<char>(kBytes);
  void operator()(cudaStream_t s, int i) const { CK(cudaMemsetAsync(buf, i & 0xff, kBytes, s)); }
};

// Mean µs per call of `call(stream)` in a graph of `calls` calls, each behind `flush` if asked,
// over 5 replays after a warm-up replay.
template <typename Call>
double graph_us(cudaStream_t stream, int calls, const L2Flush* flush, Call&& call) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < calls; ++i) {
    if (flush) (*flush)(stream, i);
    call(stream);
  }
  CK(cudaStreamEndCapture(stream, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaGraphLaunch(ge, stream));
  CK(cudaEventRecord(a, stream));
  for (int k = 0; k < 5; ++k) CK(cudaGraphLaunch(ge, stream));
  CK(cudaEventRecord(b, stream));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  return 1e3 * ms / 5.0 / calls;
}

// Wall µs per call: hot (100 calls), and cold (20 calls behind a flush, minus 20 flushes alone).
template <typename Call>
void print_wall(cudaStream_t stream, const L2Flush& flush, Call&& call) {
  const double hot = graph_us(stream, 100, nullptr, call);
  const double both = graph_us(stream, 20, &flush, call);
  const double flush_only = graph_us(stream, 20, &flush, [](cudaStream_t) {});
  std::printf(
      "\nwall per call in a graph: hot %.2f us; cold %.2f us (flush + call %.2f, flush %.2f)\n",
      hot, both - flush_only, both, flush_only);
}
