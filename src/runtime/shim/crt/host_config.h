// fmoec's stand-in for CUDA's crt/host_config.h, used only where the CUDA headers beside torch
// come without their crt/ folder (pip's nvidia-cuda-runtime): the shim is host-only C++.
#pragma once
