// __half for the emulation: IEEE binary16 through GCC's _Float16 (round to nearest even).
#pragma once
#include "emu.h"
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }
inline __half __double2half(double d) { return {static_cast<_Float16>(d)}; }
