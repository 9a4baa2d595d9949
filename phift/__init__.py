"""phift: fine-tune Microsoft's phi models (phi-1, phi-1_5, phi-2) in plain PyTorch."""
from .checkpoint import load_model, save_model
from .config import PRESETS, PhiConfig
from .generate import generate
from .model import KVCache, Phi
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["KVCache", "PRESETS", "Phi", "PhiConfig", "Tokenizer", "generate", "load_model", "load_tokenizer",
           "save_model"]
__version__ = "0.1.0"
