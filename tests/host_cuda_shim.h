// Host stand-in for the CUDA device runtime used by kernels/*.cu, so that the real kernel
// sources run on a CPU (tests/host_cuda.py).  Every thread of a launch runs, one after another;
// where a source uses warp shuffles, the lanes of a warp run as fibers (ucontext) stepped
// together, so that __shfl_down_sync exchanges values as on a GPU.
// Only what kernels/*.cu use is provided: thread / block indices, atomicAdd, __shfl_down_sync,
// __shfl_sync and the device math overloads.
#pragma once

// Lanes switch with _setjmp/_longjmp between stacks, which glibc's fortified longjmp refuses.
#undef _FORTIFY_SOURCE

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include <ucontext.h>

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
using std::isfinite;
using std::max;
using std::min;
using std::pow;
using std::sqrt;

namespace host_cuda {

inline std::mutex atomic_mutex;

// The lanes of a warp: 32 fibers with their own stacks, made once per launch.  A fiber runs
// the kernel for its lane of each warp in turn; the scheduler resumes the lanes one after
// another until all have finished the warp.  The first entry into a fiber is by swapcontext,
// every later switch by _setjmp/_longjmp (no signal-mask system call).
struct Warp {
  static constexpr std::size_t stack_size = 256 * 1024;
  int lanes = 0;
  double values[32];
  bool finished[32];
  bool started[32] = {};
  ucontext_t entry;
  ucontext_t fiber[32];
  std::jmp_buf scheduler_jump;
  std::jmp_buf lane_jump[32];
  std::unique_ptr<char[]> stacks{new char[32 * stack_size]};
  const std::function<void()>* kernel = nullptr;
};

inline Warp* warp = nullptr;
inline int lane = 0;

inline void yield_lane() {
  if (_setjmp(warp->lane_jump[lane]) == 0) _longjmp(warp->scheduler_jump, 1);
}

inline void lane_main(int l) {
  for (;;) {
    (*warp->kernel)();
    warp->finished[l] = true;
    yield_lane();
  }
}

// Runs lane l until it yields or finishes its thread of the warp.
__attribute__((noinline)) inline void resume(int l) {
  if (_setjmp(warp->scheduler_jump) != 0) return;
  if (warp->started[l]) _longjmp(warp->lane_jump[l], 1);
  warp->started[l] = true;
  Warp& w = *warp;
  getcontext(&w.fiber[l]);
  w.fiber[l].uc_stack.ss_sp = w.stacks.get() + l * Warp::stack_size;
  w.fiber[l].uc_stack.ss_size = Warp::stack_size;
  w.fiber[l].uc_link = nullptr;  // lane_main never returns
  makecontext(&w.fiber[l], (void (*)())lane_main, 1, l);
  swapcontext(&w.entry, &w.fiber[l]);
}

// Runs kernel() for every thread of the grid.  Sources that use warp shuffles
// (HOST_CUDA_WARPS, defined by host_cuda.py) run each warp's lanes as fibers.
inline void launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   const std::function<void()>& kernel) {
  gridDim = {gx, gy, gz};
  blockDim = {bx, by, bz};
  const unsigned per_block = bx * by * bz;
  const auto thread_index = [&](unsigned t) {
    return host_uint3{t % bx, (t / bx) % by, t / (bx * by)};
  };
#ifdef HOST_CUDA_WARPS
  Warp w;
  w.kernel = &kernel;
  warp = &w;
#endif
  for (unsigned k = 0; k < gz; ++k)
    for (unsigned j = 0; j < gy; ++j)
      for (unsigned i = 0; i < gx; ++i) {
        blockIdx = {i, j, k};
#ifndef HOST_CUDA_WARPS
        for (unsigned t = 0; t < per_block; ++t) {
          threadIdx = thread_index(t);
          kernel();
        }
#else
        for (unsigned first = 0; first < per_block; first += 32) {
          w.lanes = (int)std::min(32u, per_block - first);
          std::fill(w.finished, w.finished + w.lanes, false);
          for (int running = w.lanes; running > 0;) {
            running = 0;
            for (int l = 0; l < w.lanes; ++l) {
              if (w.finished[l]) continue;
              lane = l;
              threadIdx = thread_index(first + l);
              resume(l);
              running += !w.finished[l];
            }
          }
        }
#endif
      }
  warp = nullptr;
}

}  // namespace host_cuda

template <typename T>
inline T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> hold(host_cuda::atomic_mutex);
  T old = *address;
  *address = old + value;
  return old;
}

namespace host_cuda {

// Every lane of the warp must call a shuffle the same number of times, as on a GPU: each lane
// publishes its value and waits until all have, reads lane src's (its own where src is past
// the warp), and waits until all have read.
template <typename T>
inline T exchange(T value, int src) {
  Warp& w = *warp;
  w.values[lane] = (double)value;
  yield_lane();
  T out = src < w.lanes ? (T)w.values[src] : value;
  yield_lane();
  return out;
}

}  // namespace host_cuda

template <typename T>
inline T __shfl_down_sync(unsigned, T value, unsigned delta) {
  return host_cuda::exchange(value, host_cuda::lane + (int)delta);
}

// Lane src's value to every lane.
template <typename T>
inline T __shfl_sync(unsigned, T value, int src) {
  return host_cuda::exchange(value, src);
}
