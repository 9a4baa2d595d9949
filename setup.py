"""phift: fine-tune Microsoft's phi models in plain PyTorch (no HF Trainer, no transformers at run time).

Install torch first (`pip install torch==...`) so that pip does not pick a CUDA build you did not ask for.
The fused LoRA CUDA kernel is compiled here when a CUDA toolkit and a CUDA torch are present; otherwise it is
built on first use on a GPU machine, and CPU machines never need nvcc.
"""
from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
try:
    from kernels.build import cuda_extensions

    ext_modules = cuda_extensions()
    if ext_modules:
        from torch.utils.cpp_extension import BuildExtension

        cmdclass = {"build_ext": BuildExtension}
except ImportError:  # torch not installed yet, or kernels/ absent: pure-Python install
    pass

SERVE = ["fastapi>=0.100", "uvicorn>=0.23"]  # phift api
GGUF = ["gguf>=0.10"]  # phift export --gguf: llama.cpp's own GGUF writer

setup(
    name="phift",
    version="0.1.0",
    description="Raw-PyTorch fine-tuning (LoRA and full; sft, pt, rm, dpo) for Microsoft's phi and Phi-3 models",
    packages=find_packages(include=["phift", "phift.*"]),
    # 3.10: zip(strict=...) and X | Y annotations read at run time; torch 2.4: torch.library.register_fake and the
    # device-generic autocast queries
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "safetensors>=0.4", "tokenizers>=0.15", "huggingface-hub>=0.20",
                      "numpy", "tqdm", "matplotlib", "pyyaml"],
    extras_require={
        "deepspeed": ["deepspeed>=0.14", "ninja"],
        "eval": ["nltk", "jieba", "rouge-chinese"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "serve": SERVE,
        "gguf": GGUF,
        # the references the tests compare against: transformers and PEFT, TRL (DPO's and ORPO's losses, read through
        # its 1.16 trainers' internals, and the DPO benchmark's peer; Python 3.11 up), the openai client, and what
        # runs the notebook. llama.cpp's binding (the GGUF checks) is apart: it builds llama.cpp from source with
        # cmake, about 10 minutes on 2 cores, and where it cannot be built those checks skip rather than the install
        # failing
        "test": ["pytest", "transformers>=4.37", "peft>=0.10", "trl>=1.16; python_version >= '3.11'", "tensorboard",
                 "wandb", *SERVE, *GGUF, "openai>=1.40", "httpx", "nbclient", "nbformat", "ipykernel"],
        "llama": ["llama-cpp-python>=0.3"],
    },
    entry_points={"console_scripts": ["phift=phift.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
