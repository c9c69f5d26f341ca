// The emulator's scheduler: one block at a time, its threads as ucontext fibers that run until they
// reach a synchronisation point. After every sweep over the runnable fibers, satisfied warp groups
// and a block barrier everyone reached are released; when nothing can be released the kernel is
// stuck, which on a GPU is a hang and here is an error naming who waits where.
#include "runtime/cuda/emu/emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

namespace sonde {
namespace emu {

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace {

// Kernels keep their register arrays on this stack; 128 KiB is far above what any of ours use and
// the pages are only touched as needed.
constexpr size_t kStackBytes = 128 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
// Hopper's opt-in maximum: an emulated kernel may not ask for more than a real one could get.
constexpr size_t kMaxDynamicShared = 227 * 1024;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpSync, kWaiting, kDone };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  unsigned linear = 0;
  State state = State::kRunnable;
  unsigned warp_mask = 0;
  int predicate = 0;
  unsigned exchanges = 0;  // parity picks which of the warp's two slot buffers this lane writes
  bool (*ready)(const void*) = nullptr;  // kWaiting: released when ready(ready_arg) holds
  const void* ready_arg = nullptr;
  const char* waits_for = nullptr;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  size_t current = 0;
  unsigned threads = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<unsigned char> slots;  // [warp][parity][lane][kLaneSlotBytes]
  int barrier_count = 0;  // predicate sum and participants of the last released __syncthreads_*
  int barrier_total = 0;
  std::string error;
};

thread_local Block* tl_block = nullptr;

struct Stacks {
  std::vector<void*> stacks;
  ~Stacks() {
    for (void* s : stacks) munmap(s, kStackBytes);
  }
  void* Get(size_t i) {
    while (stacks.size() <= i) {
      void* s = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (s == MAP_FAILED) return nullptr;
      stacks.push_back(s);
    }
    return stacks[i];
  }
};
thread_local Stacks tl_stacks;

struct DynamicSharedBuffer {
  unsigned char* data = nullptr;
  size_t bytes = 0;
  ~DynamicSharedBuffer() { std::free(data); }
  bool Reserve(size_t n) {
    if (n <= bytes) return true;
    unsigned char* p = static_cast<unsigned char*>(std::aligned_alloc(1024, (n + 1023) / 1024 * 1024));
    if (!p) return false;
    std::free(data);
    data = p;
    bytes = n;
    return true;
  }
};
thread_local DynamicSharedBuffer tl_dynamic;

Fiber& Current() { return tl_block->fibers[tl_block->current]; }

void SwitchToScheduler(State s) {
  Fiber& f = Current();
  f.state = s;
  swapcontext(&f.ctx, &tl_block->scheduler);
}

void FiberMain() {
  Block* b = tl_block;
  b->body(b->ctx);
  b->fibers[b->current].state = State::kDone;
  // Returning resumes uc_link, the scheduler.
}

std::string Describe(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) + ")";
}

// Releases every warp group whose lanes all wait at a sync with the same mask. A lane of the mask
// that has exited is a bug the hardware would not report; here it is an error.
bool ReleaseWarps(Block& b) {
  bool released = false;
  const unsigned warps = (b.threads + 31) / 32;
  for (unsigned w = 0; w < warps; ++w) {
    const unsigned lanes = std::min(32u, b.threads - w * 32);
    for (unsigned l = 0; l < lanes; ++l) {
      Fiber& f = b.fibers[w * 32 + l];
      if (f.state != State::kAtWarpSync) continue;
      const unsigned mask = f.warp_mask;
      bool ready = true;
      for (unsigned j = 0; j < lanes && ready; ++j) {
        if (!(mask & (1u << j))) continue;
        const Fiber& g = b.fibers[w * 32 + j];
        if (g.state == State::kDone) {
          b.error = Describe(g) + " exited before a warp sync of mask 0x" + std::to_string(mask) + " in warp " +
                    std::to_string(w);
          return false;
        }
        ready = g.state == State::kAtWarpSync && g.warp_mask == mask;
      }
      if (!ready) continue;
      for (unsigned j = 0; j < lanes; ++j)
        if (mask & (1u << j)) b.fibers[w * 32 + j].state = State::kRunnable;
      released = true;
    }
  }
  return released;
}

// Releases every parked spin-wait whose condition now holds.
bool ReleaseWaits(Block& b) {
  bool released = false;
  for (Fiber& f : b.fibers) {
    if (f.state == State::kWaiting && f.ready(f.ready_arg)) {
      f.state = State::kRunnable;
      released = true;
    }
  }
  return released;
}

bool ReleaseBlockBarrier(Block& b) {
  int count = 0, total = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) continue;
    if (f.state != State::kAtBlockBarrier) return false;
    ++total;
    count += f.predicate != 0;
  }
  if (total == 0) return false;
  b.barrier_count = count;
  b.barrier_total = total;
  for (Fiber& f : b.fibers)
    if (f.state == State::kAtBlockBarrier) f.state = State::kRunnable;
  return true;
}

std::string DescribeStuck(const Block& b) {
  std::string s = "the kernel cannot progress (on a GPU it would hang):";
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) continue;
    if (++shown > 4) {
      s += " ...";
      break;
    }
    s += " " + Describe(f) + (f.state == State::kAtBlockBarrier ? " waits at __syncthreads;"
                              : f.state == State::kWaiting ? std::string(" waits for ") + f.waits_for + ";"
                                                           : " waits at a warp sync of mask " + std::to_string(f.warp_mask) + ";");
  }
  return s;
}

std::string RunBlock(Block& b) {
  for (size_t i = 0; i < b.fibers.size(); ++i) {
    Fiber& f = b.fibers[i];
    f.state = State::kRunnable;
    f.exchanges = 0;
    void* stack = tl_stacks.Get(i);
    if (!stack) return "could not allocate fiber stacks";
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, FiberMain, 0);
  }
  for (;;) {
    for (size_t i = 0; i < b.fibers.size(); ++i) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kRunnable) continue;
      b.current = i;
      threadIdx = f.tid;
      swapcontext(&b.scheduler, &f.ctx);
      if (!b.error.empty()) return b.error;
    }
    bool all_done = true;
    for (const Fiber& f : b.fibers) all_done &= f.state == State::kDone;
    if (all_done) return {};
    bool released = ReleaseWarps(b);
    if (!b.error.empty()) return b.error;
    released = ReleaseWaits(b) || released;
    if (!released && !ReleaseBlockBarrier(b)) return DescribeStuck(b);
  }
}

int BlockBarrier(int predicate) {
  Current().predicate = predicate;
  SwitchToScheduler(State::kAtBlockBarrier);
  return tl_block->barrier_count;
}

}  // namespace

void __syncthreads() { BlockBarrier(0); }
int __syncthreads_count(int predicate) { return BlockBarrier(predicate != 0); }
int __syncthreads_and(int predicate) {
  const int count = BlockBarrier(predicate != 0);
  return count == tl_block->barrier_total;
}
int __syncthreads_or(int predicate) { return BlockBarrier(predicate != 0) > 0; }

void __syncwarp(unsigned mask) { detail::WarpExchange(mask, nullptr, 0); }

unsigned __ballot_sync(unsigned mask, int predicate) {
  const int mine = predicate != 0;
  const unsigned char* slots = detail::WarpExchange(mask, &mine, sizeof mine);
  unsigned bits = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(mask & (1u << lane))) continue;
    int p;
    std::memcpy(&p, slots + lane * detail::kLaneSlotBytes, sizeof p);
    if (p) bits |= 1u << lane;
  }
  return bits;
}
int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
int __all_sync(unsigned mask, int predicate) {
  // Lanes past the end of a partial last warp do not exist and do not vote.
  const unsigned warp_first = Current().linear & ~31u, lanes = std::min(32u, tl_block->threads - warp_first);
  const unsigned live = lanes == 32 ? mask : mask & ((1u << lanes) - 1);
  return __ballot_sync(mask, predicate) == live;
}

void __trap() {
  tl_block->error = Describe(Current()) + " executed __trap()";
  SwitchToScheduler(State::kDone);
  std::abort();  // never resumed: the scheduler abandons the launch
}

namespace detail {

unsigned LaneId() { return Current().linear & 31; }

unsigned char* DynamicShared() { return tl_dynamic.data; }

void WaitUntil(bool (*ready)(const void*), const void* arg, const char* what) {
  while (!ready(arg)) {
    Fiber& f = Current();
    f.ready = ready;
    f.ready_arg = arg;
    f.waits_for = what;
    SwitchToScheduler(State::kWaiting);
  }
}

const unsigned char* WarpExchange(unsigned mask, const void* data, size_t bytes) {
  Block& b = *tl_block;
  Fiber& f = Current();
  const unsigned lane = f.linear & 31, warp = f.linear >> 5;
  if (!(mask & (1u << lane))) {
    b.error = Describe(f) + " synchronised its warp with a mask (0x" + std::to_string(mask) + ") that leaves itself out";
    SwitchToScheduler(State::kDone);
    std::abort();
  }
  unsigned char* buffer = b.slots.data() + (warp * 2 + (f.exchanges & 1)) * 32 * kLaneSlotBytes;
  if (bytes) std::memcpy(buffer + lane * kLaneSlotBytes, data, bytes);
  ++f.exchanges;
  f.warp_mask = mask;
  SwitchToScheduler(State::kAtWarpSync);
  return buffer;
}

std::string RunGrid(dim3 grid, dim3 block, size_t dynamic_shared, void (*body)(void*), void* ctx) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64)
    return "invalid configuration: a block of " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
           std::to_string(block.z) + " threads (1..1024, z <= 64)";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu)
    return "invalid configuration: a grid of " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
           std::to_string(grid.z) + " blocks";
  if (dynamic_shared > kMaxDynamicShared)
    return "invalid configuration: " + std::to_string(dynamic_shared) + " bytes of dynamic shared memory (at most " +
           std::to_string(kMaxDynamicShared) + ")";
  if (tl_block) return "a kernel launched from inside a kernel (dynamic parallelism is not emulated)";
  if (!tl_dynamic.Reserve(dynamic_shared)) return "out of host memory for dynamic shared memory";

  Block b;
  b.threads = static_cast<unsigned>(threads);
  b.body = body;
  b.ctx = ctx;
  b.fibers.resize(threads);
  b.slots.assign(size_t((threads + 31) / 32) * 2 * 32 * kLaneSlotBytes, 0);
  for (unsigned z = 0, i = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        b.fibers[i].tid = {x, y, z};
        b.fibers[i].linear = i;
      }
  blockDim = block;
  gridDim = grid;
  tl_block = &b;
  std::string error;
  for (unsigned bz = 0; bz < grid.z && error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && error.empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && error.empty(); ++bx) {
        blockIdx = {bx, by, bz};
        // Uninitialised shared memory reads as NaN (0xff bytes), so a kernel that forgets to fill
        // it fails its test here instead of passing on leftovers.
        if (dynamic_shared) std::memset(tl_dynamic.data, 0xff, dynamic_shared);
        error = RunBlock(b);
        if (!error.empty())
          error = "block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) + "): " + error;
      }
  tl_block = nullptr;
  return error;
}

}  // namespace detail
}  // namespace emu
}  // namespace sonde
