# Sourced by the .ci/device-*.sh scripts on a GPU machine: puts the libraries a `--features
# cuda` fmoec binary loads on LD_LIBRARY_PATH: libtorch's (torch/lib of the machine's python3)
# and the CUDA libraries of PyPI's torch wheel beside it (nvidia/cu13/lib; a folder that is not
# there is skipped by the loader).
FMOEC_CUDA_LIBS="$(python3 -c 'import os, torch; d = os.path.dirname(torch.__file__); print(d + "/lib:" + os.path.join(os.path.dirname(d), "nvidia", "cu13", "lib"))')"
export LD_LIBRARY_PATH="$FMOEC_CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
