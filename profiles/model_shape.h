/* Qwen3-0.6B's shapes, for the profiles that call the kernels between the linears (b1_between.c, small_kernels.c). */
#ifndef NANOQWEN_PROFILES_MODEL_SHAPE_H
#define NANOQWEN_PROFILES_MODEL_SHAPE_H

#define HIDDEN 1024
#define HQ 16
#define HKV 8
#define D 128
#define INTER 3072
#define VOCAB 151936

#endif
