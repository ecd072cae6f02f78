// The CUDA keywords of kernels/*.cu for a host C++ compiler, shared by the host emulations
// (include after the CUDA headers, which define them for the device): each block runs as
// fibers (fiber_block.h), `static` stands in for __shared__ (blocks run one after another),
// __syncthreads is the block barrier, and WEGEFT_HOST_EMULATION tells the kernel files to
// leave out their inline PTX (each emulation supplies those helpers).
#pragma once

#include <algorithm>

#include "fiber_block.h"

using std::max;
using std::min;
#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
#ifndef WEGEFT_HOST_EMULATION
#define WEGEFT_HOST_EMULATION 1
#endif
inline void __syncthreads() { fb::sync_block(); }
