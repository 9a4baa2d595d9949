"""Build the fused LoRA CUDA extension `phift_lora_cuda`: ahead of time from setup.py, or just in time on first use;
and the small CPU extension `phift_cpu` (the CPU twin of the master-weight AdamW op), just in time only.

setup.py:   `ext_modules=cuda_extensions()` with torch's BuildExtension as build_ext; [] (a plain Python install)
            when torch has no CUDA or there is no toolkit. Torch must be importable while building, so use
            `pip install --no-build-isolation .` for the ahead-of-time build.
phift:      `phift/kernels.py` calls `load()` when the module was not built ahead of time.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

NAME = "phift_lora_cuda"
HERE = Path(__file__).resolve().parent
SOURCES = ("lora_cuda.cu", "lora_op.cpp", "ce_cuda.cu", "ce_op.cpp", "rotary_cuda.cu", "rotary_op.cpp",
           "adamw_cuda.cu", "adamw_op.cpp")
HEADERS = ("common.cuh", "adamw_args.h")
# torch's just-in-time builder rebuilds when a source or a flag changes, not a header: the headers' digest, as a
# flag, makes a header change count.
_DIGEST = hashlib.sha256(b"".join((HERE / h).read_bytes() for h in HEADERS)).hexdigest()[:16]
CXX_FLAGS = ["-O3", f"-DPHIFT_HEADERS_DIGEST={_DIGEST}"]
# Target architectures come from TORCH_CUDA_ARCH_LIST (else the visible GPUs), as torch's builder decides.
NVCC_FLAGS = ["-O3", "-lineinfo", f"-DPHIFT_HEADERS_DIGEST={_DIGEST}"]


def cuda_extensions() -> list:
    """The extension for setup.py's ext_modules, or [] where it cannot be compiled."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return []
    if torch.version.cuda is None or CUDA_HOME is None:
        return []
    sources = [str((HERE / s).relative_to(HERE.parent)) for s in SOURCES]  # setuptools wants paths from setup.py
    return [CUDAExtension(NAME, sources, extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})]


def load(verbose: bool = False):
    """Compile (ninja, cached under TORCH_EXTENSIONS_DIR) and import the extension; raises if it cannot."""
    from torch.utils.cpp_extension import load as load_extension
    return load_extension(name=NAME, sources=[str(HERE / s) for s in SOURCES], extra_cflags=CXX_FLAGS,
                          extra_cuda_cflags=NVCC_FLAGS, verbose=verbose)


CPU_NAME = "phift_cpu"
CPU_SOURCES = ("adamw_cpu.cpp",)
# -march=native: the build runs on the machine that uses it (AVX2/F16C where the CPU has them); -fopenmp: ATen's
# parallel_for, inlined into the extension, runs on OpenMP threads only when the extension is built with it.
CPU_FLAGS = ["-O3", "-march=native", "-fopenmp", f"-DPHIFT_HEADERS_DIGEST={_DIGEST}"]


def load_cpu(verbose: bool = False):
    """Compile (cached under TORCH_EXTENSIONS_DIR) and import the CPU extension; raises if it cannot."""
    from torch.utils.cpp_extension import load as load_extension
    return load_extension(name=CPU_NAME, sources=[str(HERE / s) for s in CPU_SOURCES], extra_cflags=CPU_FLAGS,
                          extra_ldflags=["-fopenmp"], verbose=verbose)
