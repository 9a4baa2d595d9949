import os
from pathlib import Path

import pytest
import torch

# ../shared beside the checkout holds reference data (the real phi-1_5 tokenizer, the seed's datasets).
SHARED = Path(os.environ.get("PHIFT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PHI_TOKENIZER_DIR = SHARED / "data" / "phi-1_5"

torch.set_num_threads(min(2, torch.get_num_threads()))


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
