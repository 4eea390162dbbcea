// The emulator's scheduler: CUDA threads as fibers on one OS thread (see cuda_runtime.h).
// Fibers switch with a few instructions of x86-64 assembly (callee-saved registers, the stack
// pointer and the SSE/x87 control words), not swapcontext, which makes a system call per switch;
// a kernel's warp reductions switch fibers hundreds of thousands of times per launch.
#include <stdio.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <map>
#include <string>
#include <vector>

#include "cuda_runtime.h"

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

extern "C" void minigpt_emu_swap(void** save_sp, void* to_sp);
asm(R"(
    .text
    .globl minigpt_emu_swap
    .hidden minigpt_emu_swap
    .type minigpt_emu_swap, @function
minigpt_emu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size minigpt_emu_swap, .-minigpt_emu_swap
)");

namespace emu {
namespace {

enum State { kReady, kAtBlockBarrier, kAtShuffle, kAtWarpSync, kDone };

// A cp.async copy in flight: its bytes (read at the issue) and the commit group it joins.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
  int size, group;
};

struct Fiber {
  void* sp = nullptr;
  State state = kReady;
  int line = 0;
  unsigned mask = 0;
  uint64_t bits = 0, result = 0;
  int src = 0;
  std::vector<AsyncCopy> copies;  // issued, not yet waited for
  int groups = 0;                 // commit groups closed so far
};

constexpr size_t kStack = 256 * 1024;  // kernels keep a few hundred bytes of locals; -O0 more

std::vector<Fiber> fibers;
std::vector<char*> stacks;
void* scheduler_sp = nullptr;
int current = 0;
void (*g_thunk)(void*) = nullptr;
void* g_ctx = nullptr;
std::vector<unsigned char> dyn_smem;
std::map<const void*, int> max_dyn_smem;
cudaError_t last_error = cudaSuccess;
std::string message;

cudaError_t fail(cudaError_t e, const std::string& why) {
  last_error = e;
  message = why;
  return e;
}

void set_coords(int tid) {
  threadIdx.x = tid % blockDim.x;
  threadIdx.y = (tid / blockDim.x) % blockDim.y;
  threadIdx.z = tid / (blockDim.x * blockDim.y);
}

[[noreturn]] void fiber_main() {
  g_thunk(g_ctx);
  fibers[current].state = kDone;
  minigpt_emu_swap(&fibers[current].sp, scheduler_sp);
  __builtin_trap();  // a finished fiber is never resumed
}

void init_fiber(int i) {
  // The frame minigpt_emu_swap pops: control words, r15..r12, rbx, rbp, then "returns" into
  // fiber_main with the stack aligned as at a call (a zero where its return address would be).
  uint64_t* top = reinterpret_cast<uint64_t*>(stacks[i] + kStack);
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int r = 3; r <= 8; ++r) top[-r] = 0;
  const uint32_t mxcsr = 0x1f80;  // default: round to nearest, exceptions masked, no FTZ
  const uint16_t fcw = 0x037f;
  unsigned char* ctl = reinterpret_cast<unsigned char*>(&top[-9]);
  memcpy(ctl, &mxcsr, 4);
  memcpy(ctl + 4, &fcw, 2);
  fibers[i] = Fiber();
  fibers[i].sp = &top[-9];
}

void ensure_fibers(int n) {
  while ((int)stacks.size() < n) {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) __builtin_trap();
    stacks.push_back(static_cast<char*>(p));
  }
  if ((int)fibers.size() < n) fibers.resize(n);
}

void yield() { minigpt_emu_swap(&fibers[current].sp, scheduler_sp); }

const char* state_name(State s) {
  switch (s) {
    case kAtBlockBarrier: return "__syncthreads";
    case kAtShuffle: return "__shfl_*_sync";
    case kAtWarpSync: return "__syncwarp";
    case kDone: return "returned";
    default: return "running";
  }
}

std::string describe_stall(int n) {
  // Group the threads by (what they wait at, source line): "32 at __shfl_*_sync (line 27) ...".
  std::map<std::pair<int, int>, std::pair<int, int>> groups;  // -> (count, first thread)
  for (int i = 0; i < n; ++i) {
    auto key = std::make_pair((int)fibers[i].state, fibers[i].line);
    auto it = groups.find(key);
    if (it == groups.end()) groups[key] = {1, i};
    else ++it->second.first;
  }
  std::string s = "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                  "," + std::to_string(blockIdx.z) + ") cannot make progress:";
  for (auto& g : groups) {
    s += " " + std::to_string(g.second.first) + " thread(s) from " +
         std::to_string(g.second.second) + " " + state_name((State)g.first.first);
    if (g.first.first != kDone) s += " (line " + std::to_string(g.first.second) + ")";
    s += ";";
  }
  return s + " (threads of one warp must reach the same warp-level call together, and every "
             "live thread of the block the same __syncthreads)";
}

// Releases a warp whose 32 lanes (or all lanes, in a block smaller than a warp) wait at the
// same warp-level call. Returns 1 if released, 0 if not ready, -1 on a mask error.
int try_release_warp(int w, int n) {
  const int lo = 32 * w, hi = std::min(n, lo + 32);
  const State s = fibers[lo].state;
  if (s != kAtShuffle && s != kAtWarpSync) return 0;
  for (int i = lo; i < hi; ++i)
    if (fibers[i].state != s || fibers[i].line != fibers[lo].line) return 0;
  const unsigned full = (hi - lo) == 32 ? 0xffffffffu : ((1u << (hi - lo)) - 1);
  for (int i = lo; i < hi; ++i) {
    if (fibers[i].mask != full) {
      fail(cudaErrorLaunchFailure,
           "thread " + std::to_string(i) + " called a warp-level function at line " +
               std::to_string(fibers[i].line) +
               " with a mask other than the whole warp; the emulator supports full-warp calls");
      return -1;
    }
    if (s == kAtShuffle && (fibers[i].src < 0 || lo + fibers[i].src >= hi)) {
      fail(cudaErrorLaunchFailure, "thread " + std::to_string(i) + " shuffled from lane " +
                                       std::to_string(fibers[i].src) + " outside its warp");
      return -1;
    }
  }
  for (int i = lo; i < hi; ++i) {
    if (s == kAtShuffle) fibers[i].result = fibers[lo + fibers[i].src].bits;
    fibers[i].state = kReady;
  }
  return 1;
}

// Runs one block. Each warp in turn runs as far as it can on its own (through its warp-level
// calls, up to a __syncthreads or its end) before the next warp starts: a warp that reads
// shared memory another warp writes without a barrier in between then sees the wrong data
// whenever the reader runs first, and a warp that runs into the next phase overwrites what a
// slower warp has yet to read. Even blocks take the warps last to first, odd blocks first to
// last, so a race shows up in one direction or the other in any launch of two blocks or more.
bool run_block(int n, bool last_warp_first) {
  for (int i = 0; i < n; ++i) init_fiber(i);
  memset(dyn_smem.data(), 0xff, dyn_smem.size());  // NaN floats: unwritten reads show up
  const int nwarps = (n + 31) / 32;
  for (;;) {
    for (int k = 0; k < nwarps; ++k) {
      const int w = last_warp_first ? nwarps - 1 - k : k;
      const int lo = 32 * w, hi = std::min(n, lo + 32);
      for (;;) {
        for (int i = lo; i < hi; ++i) {
          if (fibers[i].state != kReady) continue;
          current = i;
          set_coords(i);
          minigpt_emu_swap(&scheduler_sp, fibers[i].sp);
        }
        const int r = try_release_warp(w, n);
        if (r < 0) return false;
        if (r == 0) break;  // at a __syncthreads, finished, or stuck
      }
    }
    int done = 0, at_block = 0;
    for (int i = 0; i < n; ++i) {
      done += fibers[i].state == kDone;
      at_block += fibers[i].state == kAtBlockBarrier;
    }
    if (done == n) {
      for (int i = 0; i < n; ++i)
        if (!fibers[i].copies.empty()) {
          fail(cudaErrorLaunchFailure,
               "thread " + std::to_string(i) + " of block (" + std::to_string(blockIdx.x) +
                   "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
                   ") returned with " + std::to_string(fibers[i].copies.size()) +
                   " cp.async copies it never waited for (cp_async_wait)");
          return false;
        }
      return true;
    }
    if (at_block == 0 || at_block + done != n) {
      fail(cudaErrorLaunchFailure, describe_stall(n));
      return false;
    }
    // Exited threads count as arrived, as on the hardware; the waiting ones must all be at the
    // same __syncthreads.
    int line = -1;
    for (int i = 0; i < n; ++i) {
      if (fibers[i].state != kAtBlockBarrier) continue;
      if (line >= 0 && fibers[i].line != line) {
        fail(cudaErrorLaunchFailure, describe_stall(n));
        return false;
      }
      line = fibers[i].line;
    }
    for (int i = 0; i < n; ++i)
      if (fibers[i].state == kAtBlockBarrier) fibers[i].state = kReady;
  }
}

// Set by the UBSan alignment handler below; checked after every block.
std::string misaligned;
// Every launch since the last minigpt_emu_clear: grid x, y, z, threads a block, shared memory.
std::vector<std::array<size_t, 5>> launches;
// Grid y and z limit (65535 on every GPU). A test lowers it to reach a launcher's handling of
// the limit with a few blocks instead of 65536 (minigpt_emu_set_max_grid_yz).
unsigned max_grid_yz = 65535;

}  // namespace

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem,
                     void (*thunk)(void*), void* ctx) {
  const uint64_t n = (uint64_t)block.x * block.y * block.z;
  if (n == 0 || n > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > max_grid_yz || grid.z > max_grid_yz)
    return fail(cudaErrorInvalidConfiguration,
                "invalid launch: grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
                    "," + std::to_string(grid.z) + "), block (" + std::to_string(block.x) + "," +
                    std::to_string(block.y) + "," + std::to_string(block.z) + ")");
  auto it = max_dyn_smem.find(kernel);
  const size_t limit = it == max_dyn_smem.end() ? 48 * 1024 : (size_t)it->second;
  if (smem > limit)
    return fail(cudaErrorInvalidValue, "launch asks for " + std::to_string(smem) +
                                           " bytes of dynamic shared memory; the kernel allows " +
                                           std::to_string(limit));
  ensure_fibers((int)n);
  launches.push_back({grid.x, grid.y, grid.z, (size_t)n, smem});
  dyn_smem.assign(smem, 0xff);
  blockDim = block;
  gridDim = grid;
  g_thunk = thunk;
  g_ctx = ctx;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx.x = x;
        blockIdx.y = y;
        blockIdx.z = z;
        const uint64_t b = x + (uint64_t)grid.x * (y + (uint64_t)grid.y * z);
        if (!run_block((int)n, b % 2 == 0)) return last_error;
        if (!misaligned.empty()) {
          const std::string why = misaligned;
          misaligned.clear();
          return fail(cudaErrorMisalignedAddress, why);
        }
      }
  return cudaSuccess;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 232448)
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                           " bytes is more than an H100 block may have (227 KiB)");
  max_dyn_smem[kernel] = value;
  return cudaSuccess;
}

cudaError_t take_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

void* dynamic_smem() { return dyn_smem.data(); }

void sync_block(int line) {
  fibers[current].state = kAtBlockBarrier;
  fibers[current].line = line;
  yield();
}

void sync_warp(unsigned mask, int line) {
  Fiber& f = fibers[current];
  f.state = kAtWarpSync;
  f.line = line;
  f.mask = mask;
  yield();
}

uint64_t exchange(unsigned mask, uint64_t bits, int src, int line) {
  Fiber& f = fibers[current];
  f.state = kAtShuffle;
  f.line = line;
  f.mask = mask;
  f.bits = bits;
  f.src = src;
  yield();
  return fibers[current].result;
}

void cp_async(void* dst, const void* src, int bytes) {
  AsyncCopy c;
  c.dst = dst;
  c.size = bytes < 0 ? 0 : bytes > 16 ? 16 : bytes;
  memcpy(c.bytes, src, c.size);
  c.group = fibers[current].groups;  // the group the next commit closes
  fibers[current].copies.push_back(c);
}

void cp_async_commit() { ++fibers[current].groups; }

void cp_async_wait(int pending_groups) {
  // Lands every copy of the groups older than the newest `pending_groups` committed ones.
  Fiber& f = fibers[current];
  const int upto = f.groups - pending_groups;
  std::vector<AsyncCopy> keep;
  for (const AsyncCopy& c : f.copies) {
    if (c.group < upto) memcpy(c.dst, c.bytes, c.size);
    else keep.push_back(c);
  }
  f.copies.swap(keep);
}

}  // namespace emu

// UBSan's alignment check (build.py compiles the kernels with -fsanitize=alignment) calls this
// on a misaligned access, in place of the UBSan runtime: the access goes ahead (x86 allows it),
// and the launch then fails with cudaErrorMisalignedAddress and this message, as a GPU would
// fault. The structs are the layout the compiler passes (GCC's and Clang's UBSan ABI).
namespace {
struct UbsanLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanType {
  uint16_t kind, info;
  char name[1];
};
struct UbsanTypeMismatch {
  UbsanLocation loc;
  const UbsanType* type;
  unsigned char log_alignment, check_kind;
};
}  // namespace

extern "C" void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* d, uintptr_t ptr) {
  if (!emu::misaligned.empty()) return;  // the first one says where
  const uintptr_t align = (uintptr_t)1 << d->log_alignment;
  if (ptr == 0 || (ptr & (align - 1)) == 0) return;  // not an alignment report
  char addr[32];
  snprintf(addr, sizeof addr, "0x%lx", (unsigned long)ptr);
  emu::misaligned = std::string("misaligned address ") + addr + " for type " + d->type->name +
                    ", which needs " + std::to_string(align) + "-byte alignment, at " +
                    d->loc.file + ":" + std::to_string(d->loc.line) +
                    " (thread " + std::to_string(threadIdx.x) + " of block " +
                    std::to_string(blockIdx.x) + ")";
}

// For the Python side: why the last launch failed (empty when it did not).
extern "C" const char* minigpt_emu_message() { return emu::message.c_str(); }
// The launches of the last call, one field at a time (see emu::launches).
extern "C" int minigpt_emu_launch_count() { return (int)emu::launches.size(); }
extern "C" size_t minigpt_emu_launch_field(int i, int field) { return emu::launches[i][field]; }
extern "C" void minigpt_emu_set_max_grid_yz(unsigned n) { emu::max_grid_yz = n; }
extern "C" void minigpt_emu_clear() {
  emu::launches.clear();
  emu::message.clear();
  emu::last_error = cudaSuccess;
}
