// fmoec's stand-in for CUDA's crt/host_defines.h (see host_config.h): the function and type
// qualifiers the runtime API headers use, defined away for a host-only g++ compile.
#pragma once
#define __host__
#define __device__
#define __global__
#define __shared__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(a) __align__(a)
#define __cudart_builtin__
#define __device_builtin__
#define __device_builtin_texture_type__
#define __device_builtin_surface_type__
#define CUDARTAPI
#define CUDARTAPI_CDECL
#define __CUDA_ALIGN__(n) __align__(n)
#define __location__(a) __##a
#define __specialization_static
#define __thread__ __thread
#define __import__
#define __export__
#define __cdecl
#define __annotate__(a) __attribute__((a))
#define __dv(v)
#define __CUDA_DEPRECATED
#define CUDART_CB
