// Timing of vendor-library candidates on the GPU, for smelt's cuBLASLt and cuDNN routines.
//
// A library's heuristic ranks its algorithms by a model of the GPU; the first is often not the
// fastest for a given problem (torch's TunableOp and cuDNN's benchmark mode time them for the
// same reason). Fastest() runs each candidate on the call's stream and returns the quickest,
// measured with CUDA events, each run after a write of twice the L2 cache's size: in a model the
// weights come from memory, not from the cache a back-to-back loop keeps them in (timed in a
// hot loop, BERT-base's batch-1 GEMMs chose algorithms 10 % slower in the model on an H200).
// It times only outside stream capture (a CUDA graph's capture run must not synchronize): the
// first call of a problem, the VM's warm-up run, times; a problem first seen during a capture
// keeps the heuristic's choice. SMELT_VENDOR_TIMING=0 turns timing off; =2 prints each candidate's
// median to stderr (the routines' verbose settings name the one chosen).
//
// The CUDA driver (libcuda.so.1, present wherever a GPU is) is opened with dlopen, as the
// libraries are: the object builds with a plain C++ compiler and no CUDA toolkit.

#pragma once

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace smelt_timer {

using Result = int;  // CUresult; 0 is success
using Event = void*;

struct Driver {
  Result (*event_create)(Event*, unsigned) = nullptr;
  Result (*event_record)(Event, void*) = nullptr;
  Result (*event_sync)(Event) = nullptr;
  Result (*elapsed)(float*, Event, Event) = nullptr;
  Result (*event_destroy)(Event) = nullptr;
  Result (*is_capturing)(void*, int*) = nullptr;
  Result (*ctx_device)(int*) = nullptr;
  Result (*attribute)(int*, int, int) = nullptr;
  Result (*alloc)(uint64_t*, size_t) = nullptr;
  Result (*memset)(uint64_t, unsigned char, size_t, void*) = nullptr;
  Result (*free)(uint64_t) = nullptr;
  bool ok = false;
};

inline const Driver& GetDriver() {
  static Driver d = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return d;
    d.event_create = reinterpret_cast<decltype(d.event_create)>(dlsym(lib, "cuEventCreate"));
    d.event_record = reinterpret_cast<decltype(d.event_record)>(dlsym(lib, "cuEventRecord"));
    d.event_sync = reinterpret_cast<decltype(d.event_sync)>(dlsym(lib, "cuEventSynchronize"));
    d.elapsed = reinterpret_cast<decltype(d.elapsed)>(dlsym(lib, "cuEventElapsedTime"));
    d.event_destroy = reinterpret_cast<decltype(d.event_destroy)>(dlsym(lib, "cuEventDestroy_v2"));
    d.is_capturing = reinterpret_cast<decltype(d.is_capturing)>(dlsym(lib, "cuStreamIsCapturing"));
    d.ctx_device = reinterpret_cast<decltype(d.ctx_device)>(dlsym(lib, "cuCtxGetDevice"));
    d.attribute = reinterpret_cast<decltype(d.attribute)>(dlsym(lib, "cuDeviceGetAttribute"));
    d.alloc = reinterpret_cast<decltype(d.alloc)>(dlsym(lib, "cuMemAlloc_v2"));
    d.memset = reinterpret_cast<decltype(d.memset)>(dlsym(lib, "cuMemsetD8Async"));
    d.free = reinterpret_cast<decltype(d.free)>(dlsym(lib, "cuMemFree_v2"));
    d.ok = d.event_create && d.event_record && d.event_sync && d.elapsed && d.event_destroy && d.is_capturing &&
           d.ctx_device && d.attribute && d.alloc && d.memset && d.free;
    return d;
  }();
  return d;
}

constexpr int kL2CacheSize = 38;  // CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE

// SMELT_VENDOR_TIMING: 0 off, 2 on and printing each candidate's time, anything else on.
inline int Level() {
  const char* v = std::getenv("SMELT_VENDOR_TIMING");
  return v == nullptr ? 1 : std::strcmp(v, "0") == 0 ? 0 : std::strcmp(v, "2") == 0 ? 2 : 1;
}

// The index of the fastest of ``count`` candidates (median of 5 runs, each after an L2 flush),
// where ``run(i)`` launches candidate i on ``stream`` and returns whether it could; 0 when there
// is one candidate or timing is off or impossible (no driver, a capture in progress, a driver
// error). A candidate that cannot launch is never chosen unless none can.
template <typename Run>
int Fastest(void* stream, int count, Run run) {
  const int level = Level();
  if (count <= 1 || level == 0) return 0;
  const Driver& d = GetDriver();
  int capturing = 0, device = 0, l2 = 0;
  if (!d.ok || d.is_capturing(stream, &capturing) != 0 || capturing != 0 || d.ctx_device(&device) != 0 ||
      d.attribute(&l2, kL2CacheSize, device) != 0) {
    return 0;
  }
  size_t flush_bytes = 2 * static_cast<size_t>(l2 > 0 ? l2 : 1 << 20);
  uint64_t flush = 0;
  Event start = nullptr, stop = nullptr;
  int best = 0;
  if (d.alloc(&flush, flush_bytes) == 0 && d.event_create(&start, 0) == 0 && d.event_create(&stop, 0) == 0) {
    constexpr int kRepeat = 5;
    float best_ms = -1.0f;
    for (int i = 0; i < count; ++i) {
      if (!run(i)) continue;  // the warm-up launch; a candidate failing it is out
      std::vector<float> times;
      for (int r = 0; r < kRepeat; ++r) {
        float ms = 0.0f;
        if (d.memset(flush, static_cast<unsigned char>(r), flush_bytes, stream) != 0 ||
            d.event_record(start, stream) != 0 || !run(i) || d.event_record(stop, stream) != 0 ||
            d.event_sync(stop) != 0 || d.elapsed(&ms, start, stop) != 0) {
          break;
        }
        times.push_back(ms);
      }
      if (times.size() != kRepeat) continue;
      std::sort(times.begin(), times.end());
      if (level == 2) std::fprintf(stderr, "smelt timing: candidate %d: %.2f us\n", i, 1e3f * times[kRepeat / 2]);
      if (best_ms < 0.0f || times[kRepeat / 2] < best_ms) {
        best = i;
        best_ms = times[kRepeat / 2];
      }
    }
  }
  if (start) d.event_destroy(start);
  if (stop) d.event_destroy(stop);
  if (flush) d.free(flush);
  return best;
}

}  // namespace smelt_timer
