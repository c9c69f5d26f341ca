// Where a language-model step's time goes, for finding the losses of a decode step against its
// bytes (SONDE_LLM_PROFILE=1; off, each mark is one predictable branch). The step's thread marks
// the end of each phase; the time since the previous mark and the weight bytes the phase read are
// added to that phase. Sums are printed to stderr every SONDE_LLM_PROFILE steps of the same kind
// (decode: one row; prefill: more), as ms per step and GB/s (over wall time, and over the step
// thread's CPU time, which at one thread leaves out the time other processes held the core), then reset.
#pragma once
#include <cstddef>
#include <cstdint>

namespace sonde {

enum StepPhase : int {
  kPhaseEmbed,
  kPhaseNorm,        // attention and FFN RMSNorms, residual adds
  kPhaseQkv,         // q, k, v projections
  kPhaseRope,        // RoPE and the K/V stores into the pool
  kPhaseAttention,
  kPhaseAttnOut,     // the output projection
  kPhaseRouter,      // router product and top-k
  kPhaseExpertsUp,   // the chosen experts' gate and up products
  kPhaseExpertsAct,  // SwiGLU and the down inputs' quantisation
  kPhaseExpertsDown,
  kPhaseExpertsSum,  // weighted sum of the experts' outputs
  kPhaseFfn,         // a dense model's FFN
  kPhaseOutput,      // output norm and vocabulary product
  kPhaseCount
};

// Null when profiling is off; else the calling thread's profile (one step runs on one thread).
struct StepProfile;
StepProfile* StepProfileBegin(size_t rows);
void StepProfileMark(StepProfile* p, StepPhase phase, double bytes = 0);
void StepProfileEnd(StepProfile* p);
// The profile of the step running on this thread, if any (for operators that mark sub-phases).
StepProfile* StepProfileCurrent();

}  // namespace sonde
