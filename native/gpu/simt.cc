// The SIMT emulator's scheduler (simt.h): every thread of a block is a fiber on the calling OS
// thread; the scheduler resumes them in turn, each running until its next __syncthreads() or its
// end. On x86-64 a fiber switch is six register pushes and a stack swap (emorl_simt_switch); under
// AddressSanitizer, or elsewhere, ucontext (which ASan understands; it costs two system calls per
// switch).
#if !defined(__CUDACC__)
#include "simt.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define EMORL_SIMT_FAST_SWITCH 1
#else
#include <ucontext.h>
#endif

#if defined(EMORL_SIMT_FAST_SWITCH)
// Pushes the callee-saved registers, stores the stack pointer in *from, switches to the stack
// `to` and pops its registers: returns where that stack last called this (System V x86-64).
extern "C" void emorl_simt_switch(void** from, void* to);
asm(R"(
  .text
  .globl emorl_simt_switch
  .hidden emorl_simt_switch
  .type emorl_simt_switch, @function
emorl_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emorl_simt_switch, .-emorl_simt_switch
)");
#endif

namespace emorl {
namespace simt {
namespace {

constexpr size_t kStackBytes = 64 * 1024;

struct Fiber {
  std::unique_ptr<char[]> stack;
  unsigned char done = 0;
#if defined(EMORL_SIMT_FAST_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
};

struct Run {
  std::vector<Fiber> fibers;
  unsigned current = 0;
  const std::function<void()>* body = nullptr;
  const char* fault = nullptr;  // the first device_fault of the launch
#if defined(EMORL_SIMT_FAST_SWITCH)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
};

// The launch whose fibers run on this OS thread (the fibers find it here).
thread_local Run* active_run = nullptr;

void run_body(Run* r) noexcept {
  (*r->body)();  // kernels do not throw; if one did, noexcept ends the process rather than unwind across stacks
  r->fibers[r->current].done = 1;
}

#if defined(EMORL_SIMT_FAST_SWITCH)
[[noreturn]] void fiber_entry() {
  Run* r = active_run;
  run_body(r);
  emorl_simt_switch(&r->fibers[r->current].sp, r->scheduler_sp);
  __builtin_unreachable();  // a finished fiber is never resumed
}

// A fresh stack whose first switch "returns" into fiber_entry, entered as if called (rsp ≡ 8 mod 16).
void start_fiber(Run&, Fiber& f) {
  auto top = (reinterpret_cast<uintptr_t>(f.stack.get()) + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // fiber_entry's return address: never used
  *--sp = reinterpret_cast<void*>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12..r15
  f.sp = sp;
  f.done = 0;
}

void resume(Run& r, Fiber& f) { emorl_simt_switch(&r.scheduler_sp, f.sp); }
void yield(Run& r, Fiber& f) { emorl_simt_switch(&f.sp, r.scheduler_sp); }
#else
void fiber_entry() { run_body(active_run); }  // returning resumes uc_link: the scheduler

// Kept out of run_grid: getcontext returns twice, which would make its loop counters volatile.
__attribute__((noinline)) void start_fiber(Run& r, Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &r.scheduler;
  makecontext(&f.ctx, fiber_entry, 0);
  f.done = 0;
}

void resume(Run& r, Fiber& f) { swapcontext(&r.scheduler, &f.ctx); }
void yield(Run& r, Fiber& f) { swapcontext(&f.ctx, &r.scheduler); }
#endif

// Restores the caller's active launch however run_grid leaves.
struct ActiveRun {
  explicit ActiveRun(Run* r) : saved(active_run) { active_run = r; }
  ~ActiveRun() { active_run = saved; }
  Run* saved;
};

}  // namespace

void barrier() {
  Run* r = active_run;
  if (!r) throw std::logic_error("__syncthreads() outside an emulated launch");
  yield(*r, r->fibers[r->current]);
}

void device_fault(const char* what) {
  Run* r = active_run;
  if (!r) throw std::logic_error(std::string("emulated device fault outside a launch: ") + what);
  if (!r->fault) r->fault = what;
}

namespace {

// EMORL_SIMT_SCHEDULE: the order in which a launch runs its blocks, and a block its threads
// between barriers. A GPU promises neither, so a kernel must give the same results in both: run
// "reverse" as well as the default "forward", a thread that reads what a lower-numbered thread
// wrote since the last barrier (a missing __syncthreads() that "forward" hides) reads stale or
// poisoned data, and a block that depends on an earlier block's writes sees them missing.
bool reverse_schedule() {
  const char* s = std::getenv("EMORL_SIMT_SCHEDULE");
  if (!s || !*s || std::strcmp(s, "forward") == 0) return false;
  if (std::strcmp(s, "reverse") == 0) return true;
  throw std::invalid_argument(std::string("EMORL_SIMT_SCHEDULE must be 'forward' or 'reverse', got '") + s + "'");
}

}  // namespace

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  // CUDA's limits (compute capability 7.0 and later), so that a launch a GPU would refuse fails here too
  const unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    throw std::invalid_argument("emulated launch: a block needs 1..1024 threads, at most 1024 x 1024 x 64 (got " +
                                std::to_string(block.x) + " x " + std::to_string(block.y) + " x " + std::to_string(block.z) + ")");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("emulated launch: a grid needs 1..2^31-1 x 1..65535 x 1..65535 blocks (got " +
                                std::to_string(grid.x) + " x " + std::to_string(grid.y) + " x " + std::to_string(grid.z) + ")");
  const bool reverse = reverse_schedule();
  // the i-th of n in the schedule's order
  const auto nth = [reverse](unsigned i, unsigned n) { return reverse ? n - 1 - i : i; };
  Run r;
  r.fibers.resize(nt);
  for (auto& f : r.fibers) f.stack.reset(new char[kStackBytes]);
  r.body = &body;
  ActiveRun active(&r);
  blockDim = block;
  gridDim = grid;
  for (unsigned iz = 0; iz < grid.z; ++iz)
    for (unsigned iy = 0; iy < grid.y; ++iy)
      for (unsigned ix = 0; ix < grid.x; ++ix) {
        blockIdx = dim3(nth(ix, grid.x), nth(iy, grid.y), nth(iz, grid.z));
        for (auto& f : r.fibers) start_fiber(r, f);
        for (;;) {
          for (unsigned i = 0; i < nt; ++i) {
            const unsigned t = nth(i, nt);
            if (r.fibers[t].done) continue;
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            r.current = t;
            resume(r, r.fibers[t]);
          }
          unsigned finished = 0;
          for (const auto& f : r.fibers) finished += f.done;
          if (finished == nt) break;
          if (finished) throw std::logic_error("emulated launch: some threads of a block exited while others wait at __syncthreads()");
        }
      }
  if (r.fault) throw std::runtime_error(std::string("emulated launch: ") + r.fault + " (a fault on a GPU)");
}

}  // namespace simt
}  // namespace emorl
#endif
