// See cuda_runtime.h: the emulator defines the fp16 type there.
#pragma once
#include "cuda_runtime.h"
