// Host stand-in for the CUDA device runtime used by kernels/*.cu, so that the real kernel
// sources run on a CPU (tests/host_cuda.py).  Every thread of a launch runs; the 32 lanes of a
// warp run as concurrent host threads so that __shfl_down_sync exchanges values as on a GPU.
// Only what kernels/*.cu use is provided: thread / block indices, atomicAdd, __shfl_down_sync
// and the device math overloads.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct host_uint3 {
  unsigned x, y, z;
};

inline thread_local host_uint3 threadIdx, blockIdx;
inline host_uint3 blockDim, gridDim;

// CUDA's device math: float and double overloads in the global namespace.
using std::acos;
using std::atan2;
using std::ceil;
using std::copysign;
using std::cos;
using std::exp;
using std::fabs;
using std::floor;
using std::fmax;
using std::fmin;
using std::max;
using std::min;
using std::pow;
using std::sqrt;

namespace host_cuda {

inline std::mutex atomic_mutex;

struct Warp {
  explicit Warp(int n) : lanes(n), sync(n), values(n) {}
  int lanes;
  std::barrier<> sync;
  std::vector<double> values;
};

inline thread_local Warp* warp = nullptr;
inline thread_local int lane = 0;

// Runs kernel() for every thread of the grid, one warp (up to 32 host threads) at a time.
inline void launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   const std::function<void()>& kernel) {
  gridDim = {gx, gy, gz};
  blockDim = {bx, by, bz};
  const unsigned per_block = bx * by * bz;
  for (unsigned k = 0; k < gz; ++k)
    for (unsigned j = 0; j < gy; ++j)
      for (unsigned i = 0; i < gx; ++i)
        for (unsigned first = 0; first < per_block; first += 32) {
          const int lanes = (int)std::min(32u, per_block - first);
          Warp w(lanes);
          std::vector<std::thread> threads;
          for (int l = 0; l < lanes; ++l) {
            const unsigned t = first + l;
            threads.emplace_back([&, t, l] {
              blockIdx = {i, j, k};
              threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
              warp = &w;
              lane = l;
              kernel();
            });
          }
          for (auto& th : threads) th.join();
        }
}

}  // namespace host_cuda

template <typename T>
inline T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> hold(host_cuda::atomic_mutex);
  T old = *address;
  *address = old + value;
  return old;
}

// Every lane of the warp must call this the same number of times, as on a GPU.
template <typename T>
inline T __shfl_down_sync(unsigned, T value, unsigned delta) {
  host_cuda::Warp& w = *host_cuda::warp;
  const int lane = host_cuda::lane;
  w.values[lane] = (double)value;
  w.sync.arrive_and_wait();
  const int src = lane + (int)delta;
  T out = src < w.lanes ? (T)w.values[src] : value;
  w.sync.arrive_and_wait();
  return out;
}
