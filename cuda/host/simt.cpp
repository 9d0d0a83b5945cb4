// simt.cpp: the fiber scheduler behind simt.h (emu backend only).
//
// A block's threads are fibers on one OS thread; blocks are spread over TRIATTN_EMU_THREADS OS
// threads (default: the hardware threads). The scheduler resumes every runnable
// fiber in thread order; a fiber gives control back when it reaches a barrier or finishes. When
// every live lane of a warp waits at the warp barrier the warp is released; when every live
// thread of the block waits at the block barrier the block is released. Anything else with no
// runnable fiber left is a divergent barrier, which CUDA leaves undefined: it is reported. So is
// a misaligned access (simt.h aligned_or_fault): the block finishes, then the launch fails.
//
// Switching fibers: on x86-64 Linux a few instructions that save the callee-saved registers,
// MXCSR and the x87 control word on the fiber's own stack and swap stack pointers; elsewhere
// ucontext. (swapcontext also saves and restores the signal mask, a system call on every switch:
// most of the emu's time went there.) Fiber stacks are shared by every OS thread of the process
// and reused from launch to launch.
#include "simt.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__linux__)
#define TRI_EMU_STACK_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace tri_emu {

namespace {

#if TRI_EMU_STACK_SWITCH
// A suspended fiber (or scheduler): its stack pointer. Below it on its stack: MXCSR and the x87
// control word (8 bytes), then r15, r14, r13, r12, rbx, rbp and the address to resume at.
struct Context {
  void* sp = nullptr;
};

extern "C" void tri_emu_switch_stack(void** save_sp, void* load_sp);

// tri_emu_switch_stack(save_sp, load_sp): push the callee-saved state, store the stack pointer
// to *save_sp, load load_sp, pop the state saved there and return to where that context left.
asm(R"(
  .text
  .p2align 4
  .globl tri_emu_switch_stack
  .hidden tri_emu_switch_stack
  .type tri_emu_switch_stack, @function
tri_emu_switch_stack:
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
  .size tri_emu_switch_stack, .-tri_emu_switch_stack
)");

void switch_context(Context& from, Context& to) { tri_emu_switch_stack(&from.sp, to.sp); }

// A context that starts `entry` on `stack` at the first switch to it. `entry` never returns.
void start_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  *--sp = 0;                                    // entry's return address (it never returns):
  *--sp = reinterpret_cast<uint64_t>(entry);    // the switch's ret lands in entry with rsp = 8 mod 16
  for (int i = 0; i < 6; ++i) *--sp = 0;        // rbp, rbx, r12, r13, r14, r15
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  *--sp = uint64_t{mxcsr} | (uint64_t{fpu_cw} << 32);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void start_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

}  // namespace

thread_local dim3 block_idx;
thread_local dim3 grid_dim;
thread_local dim3 block_dim;
thread_local unsigned char* dyn_smem = nullptr;
thread_local uint64_t block_epoch = 0;

enum class State { Runnable, AtWarpBarrier, AtBlockBarrier, Done };

struct Fiber {
  Context ctx;
  dim3 tid;
  unsigned linear = 0;
  State state = State::Runnable;
  unsigned phase = 0;  // which of the warp's two exchange buffers the next exchange uses
};

thread_local Fiber* current = nullptr;

namespace {

constexpr size_t STACK_BYTES = 128 * 1024;
constexpr size_t SLOT_BYTES = 32;

struct Launch {
  Context scheduler;
  std::vector<Fiber> fibers;
  // [warp][phase][lane * SLOT_BYTES]
  std::vector<unsigned char> exchange;
  std::vector<unsigned char> smem;
  KernelBody body = nullptr;
  const void* params = nullptr;
  // The first misaligned access of the block, if any.
  bool faulted = false;
  const void* fault_addr = nullptr;
  size_t fault_bytes = 0;
  unsigned fault_thread = 0;
};

thread_local Launch* launch_state = nullptr;

// Fiber stacks not in use, shared by the process's OS threads (launches start fresh threads) and
// kept across launches: allocated once, never zeroed, never freed.
std::mutex stack_pool_lock;
std::vector<std::unique_ptr<unsigned char[]>> stack_pool;

// `count` stacks of STACK_BYTES from the pool (new ones when it runs short).
std::vector<std::unique_ptr<unsigned char[]>> take_stacks(unsigned count) {
  std::vector<std::unique_ptr<unsigned char[]>> taken;
  {
    std::lock_guard<std::mutex> hold(stack_pool_lock);
    while (taken.size() < count && !stack_pool.empty()) {
      taken.push_back(std::move(stack_pool.back()));
      stack_pool.pop_back();
    }
  }
  while (taken.size() < count) taken.emplace_back(new unsigned char[STACK_BYTES]);
  return taken;
}

void give_back_stacks(std::vector<std::unique_ptr<unsigned char[]>>& stacks) {
  std::lock_guard<std::mutex> hold(stack_pool_lock);
  for (auto& s : stacks) stack_pool.push_back(std::move(s));
  stacks.clear();
}

// The calling thread's last launch error (triattn_emu_last_error).
thread_local std::string last_error;

void yield_to_scheduler() { switch_context(current->ctx, launch_state->scheduler); }

void trampoline() {
  launch_state->body(launch_state->params);
  current->state = State::Done;
  yield_to_scheduler();
  abort();  // a finished fiber is never resumed
}

}  // namespace

const dim3& thread_idx() { return current->tid; }

unsigned lane_id() { return current->linear % WARP; }

void sync_block() {
  current->state = State::AtBlockBarrier;
  yield_to_scheduler();
}

void fault_misaligned(const void* p, size_t bytes) {
  Launch* L = launch_state;
  if (L == nullptr) {
    fprintf(stderr, "triattn emu: misaligned %zu-byte access at %p outside a launch\n", bytes, p);
    abort();
  }
  if (L->faulted) return;
  L->faulted = true;
  L->fault_addr = p;
  L->fault_bytes = bytes;
  L->fault_thread = current != nullptr ? current->linear : 0;
}

unsigned char* warp_exchange_begin(const void* mine, size_t bytes) {
  Launch& L = *launch_state;
  unsigned warp = current->linear / WARP, lane = current->linear % WARP;
  unsigned char* slots = &L.exchange[(warp * 2 + current->phase) * WARP * SLOT_BYTES];
  current->phase ^= 1u;
  memcpy(slots + lane * SLOT_BYTES, mine, bytes);
  current->state = State::AtWarpBarrier;
  yield_to_scheduler();
  return slots;
}

namespace {

// Run blocks first, first + stride, ... of the grid on the calling OS thread; 0, or an error code
// with its message in `message`.
int run_blocks(KernelBody body, const void* params, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
               unsigned first, unsigned stride, std::string& message) {
  const unsigned nt = block.x * block.y * block.z;
  Launch L;
  L.body = body;
  L.params = params;
  L.fibers.resize(nt);
  std::vector<std::unique_ptr<unsigned char[]>> stacks = take_stacks(nt);
  const unsigned warps = nt / WARP;
  L.exchange.assign((size_t)warps * 2 * WARP * SLOT_BYTES, 0);
  // Dynamic shared memory is 16-byte aligned on the device (arch.cuh dynamic_smem); so here.
  L.smem.resize(dynamic_smem_bytes + 32);
  unsigned char* smem_base = L.smem.data() + ((16 - ((uintptr_t)L.smem.data() & 15)) & 15);
  Launch* outer = launch_state;
  Fiber* outer_fiber = current;
  launch_state = &L;
  grid_dim = grid;
  block_dim = block;
  int status = 0;
  const unsigned blocks = grid.x * grid.y * grid.z;
  for (unsigned linear = first; linear < blocks && status == 0; linear += stride) {
    const unsigned bx = linear % grid.x, by = (linear / grid.x) % grid.y, bz = linear / (grid.x * grid.y);
    block_idx.x = bx;
    block_idx.y = by;
    block_idx.z = bz;
    // Fresh shared memory holds garbage on hardware; make reads of unwritten bytes visible
    // (static shared arrays: TRI_SHARED, keyed by the epoch).
    memset(L.smem.data(), 0xff, L.smem.size());
    dyn_smem = smem_base;
    ++block_epoch;
    for (unsigned t = 0; t < nt; ++t) {
      Fiber& f = L.fibers[t];
      f.linear = t;
      f.tid.x = t % block.x;
      f.tid.y = (t / block.x) % block.y;
      f.tid.z = t / (block.x * block.y);
      f.state = State::Runnable;
      f.phase = 0;
      start_context(f.ctx, stacks[t].get(), STACK_BYTES, trampoline);
    }
    for (;;) {
      for (unsigned t = 0; t < nt; ++t) {
        Fiber& f = L.fibers[t];
        if (f.state != State::Runnable) continue;
        current = &f;
        switch_context(L.scheduler, f.ctx);
      }
      bool all_done = true, released = false;
      for (unsigned w = 0; w < warps; ++w) {
        bool any_live = false, all_at_warp = true;
        for (unsigned l = 0; l < WARP; ++l) {
          const Fiber& f = L.fibers[w * WARP + l];
          if (f.state == State::Done) continue;
          any_live = true;
          if (f.state != State::AtWarpBarrier) all_at_warp = false;
        }
        if (any_live) all_done = false;
        if (any_live && all_at_warp) {
          for (unsigned l = 0; l < WARP; ++l) {
            Fiber& f = L.fibers[w * WARP + l];
            if (f.state == State::AtWarpBarrier) f.state = State::Runnable;
          }
          released = true;
        }
      }
      if (all_done) break;
      if (released) continue;
      bool all_at_block = true;
      for (const Fiber& f : L.fibers)
        if (f.state != State::Done && f.state != State::AtBlockBarrier) all_at_block = false;
      if (!all_at_block) {
        char buf[128];
        snprintf(buf, sizeof buf, "divergent barrier in block (%u, %u, %u)", bx, by, bz);
        message = buf;
        status = 3;
        break;
      }
      for (Fiber& f : L.fibers)
        if (f.state == State::AtBlockBarrier) f.state = State::Runnable;
    }
    if (status == 0 && L.faulted) {
      char buf[192];
      snprintf(buf, sizeof buf, "misaligned %zu-byte access at %p in block (%u, %u, %u), thread %u", L.fault_bytes,
               L.fault_addr, bx, by, bz, L.fault_thread);
      message = buf;
      status = 4;
    }
  }
  launch_state = outer;
  current = outer_fiber;
  dyn_smem = nullptr;
  give_back_stacks(stacks);
  return status;
}

// OS threads a launch may use: TRIATTN_EMU_THREADS, else the machine's hardware threads.
unsigned worker_count(unsigned blocks) {
  unsigned n = std::thread::hardware_concurrency();
  if (const char* v = getenv("TRIATTN_EMU_THREADS")) n = (unsigned)atoi(v);
  if (n == 0) n = 1;
  return n < blocks ? n : blocks;
}

}  // namespace

int launch(KernelBody body, const void* params, dim3 grid, dim3 block, size_t dynamic_smem_bytes) {
  last_error.clear();
  const unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt % WARP != 0) {
    last_error = "block of " + std::to_string(nt) + " threads is not whole warps";
    return 2;
  }
  const unsigned blocks = grid.x * grid.y * grid.z;
  if (blocks == 0) return 0;
  // Blocks are independent (they only meet in global memory, which the kernels write disjointly),
  // so they are spread over OS threads; each has its own fibers and shared memory.
  const unsigned workers = worker_count(blocks);
  std::vector<int> status(workers, 0);
  std::vector<std::string> messages(workers);
  std::vector<std::thread> threads;
  for (unsigned w = 1; w < workers; ++w)
    threads.emplace_back(
        [&, w] { status[w] = run_blocks(body, params, grid, block, dynamic_smem_bytes, w, workers, messages[w]); });
  status[0] = run_blocks(body, params, grid, block, dynamic_smem_bytes, 0, workers, messages[0]);
  for (auto& t : threads) t.join();
  for (unsigned w = 0; w < workers; ++w)
    if (status[w] != 0) {
      last_error = messages[w];
      return status[w];
    }
  return 0;
}

}  // namespace tri_emu

extern "C" const char* triattn_emu_last_error() { return tri_emu::last_error.c_str(); }
