"""phift: fine-tune Microsoft's phi models (phi-1, phi-1_5, phi-2; Phi-3-mini, Phi-3.5-mini, Phi-4-mini) in plain
PyTorch."""
from .config import PRESETS, Phi3Config, PhiConfig
from .generate import generate
from .model import KVCache, Phi
from .phi3 import Phi3
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load_model, save_model

__all__ = ["KVCache", "PRESETS", "Phi", "Phi3", "Phi3Config", "PhiConfig", "Tokenizer", "generate", "load_model",
           "load_tokenizer", "save_model"]
__version__ = "0.1.0"
