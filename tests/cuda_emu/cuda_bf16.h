// See cuda_runtime.h: the emulator defines the bf16 type there.
#pragma once
#include "cuda_runtime.h"
