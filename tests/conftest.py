import os
import warnings
from pathlib import Path

import pytest
import torch

# ../shared beside the checkout holds reference data (the real phi-1_5 tokenizer, the seed's datasets).
SHARED = Path(os.environ.get("PHIFT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PHI_TOKENIZER_DIR = SHARED / "data" / "phi-1_5"

torch.set_num_threads(min(2, torch.get_num_threads()))

# Two tiers. The default, `pytest tests`, is the spec suite: every behaviour, fast (no DeepSpeed, no C++ build,
# no bench). `pytest tests --integration` adds the tests marked integration: DeepSpeed runs, phift's C++ ops built
# with the host compiler, the bench harness's smoke runs. CI runs both.


def pytest_addoption(parser):
    parser.addoption("--integration", action="store_true", help="also run the integration tier")


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: DeepSpeed, C++ builds and bench smoke runs (--integration)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--integration"):
        return
    skip = pytest.mark.skip(reason="integration tier: run with --integration")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _no_cpp_build_in_the_spec_tier(request):
    """The spec tier steps optimizers through the PyTorch fallback of phift's CPU AdamW op, whose C++ build takes a
    minute; the integration tier builds it and runs the same tests through it."""
    from phift import kernels

    if not request.config.getoption("--integration"):
        kernels.DISABLED = kernels.DISABLED | {"adamw"}


@pytest.fixture(autouse=True)
def _deterministic_mode_stays_in_its_test():
    """--full_determinism switches torch's process-wide deterministic mode on; a test that trains with it in-process
    leaves the next test in the same worker as it found it."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra) -> dict:
    """The environment for a phift child process: this checkout first on PYTHONPATH, ahead of whatever the parent
    had there (packages carried onto a GPU machine live on PYTHONPATH and must reach the child too)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def shared_data():
    d = SHARED / "data"
    if not d.is_dir():
        pytest.skip(f"reference data not found at {d} (the ../shared folder beside the checkout)")
    return d


@pytest.fixture
def phi_tokenizer():
    if not (PHI_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"real phi-1_5 tokenizer not found at {PHI_TOKENIZER_DIR}")
    from phift.tokenizer import load_tokenizer

    return load_tokenizer(PHI_TOKENIZER_DIR)


@pytest.fixture
def tiny_config():
    from phift.config import PhiConfig

    return PhiConfig.from_name("tiny", vocab_size=128, max_position_embeddings=256)


@pytest.fixture
def poisoned_memory():
    """While active, every new CUDA tensor starts as NaN, so an element that a kernel never writes shows up."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deterministic mode warns about some ops; only its NaN fill is wanted
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield
        torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def phift_extension():
    """The compiled CUDA extension that registers torch.ops.phift.* (built on first use, about a minute)."""
    if os.environ.get("PHIFT_DISABLE_KERNELS", "0") not in ("", "0"):
        pytest.skip("PHIFT_DISABLE_KERNELS is set")
    from phift import kernels

    extension = kernels._extension()
    assert extension is not None, "the phift CUDA extension failed to build or load"
    return extension



@pytest.fixture
def make_peft_adapter():
    """(base checkpoint dir, adapter dir, **LoraConfig fields) → the PEFT model, in eval mode, whose adapter was
    saved there: transformers' model of the checkpoint (PhiForCausalLM, Phi3ForCausalLM) with B drawn at random
    (PEFT starts it at zero), as if trained."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def make(base_dir, adapter_dir, seed=0, **lora_config):
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = peft.get_peft_model(hf, peft.LoraConfig(**lora_config))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        model.save_pretrained(adapter_dir)
        return model.eval()

    return make


# A chat model's tokenizer in miniature: test_phi3_data, test_serve and test_gguf share it
CHAT_TEXTS = ["Who are you? I am an assistant made to help.", "What is 2+2? It is four.", "你好，我是助手。"] * 20
PHI3_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
PHI4_SPECIALS = ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def phi3_tokenizer_dir(tmp_path_factory):
    """A small tokenizer shaped like Phi-3's: LLaMA's sentencepiece form (▁ for spaces, prepended; byte fallback)
    with <s> as bos, <|endoftext|> as eos and pad, and the chat tokens added."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CHAT_TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    tok.add_special_tokens(PHI3_SPECIALS + PHI4_SPECIALS)
    d = tmp_path_factory.mktemp("phi3-tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>"}))
    return d
