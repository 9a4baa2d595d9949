"""NEFTune: bounded uniform noise on the embeddings, in training only."""
import math

import torch

from phift.model import Phi
from phift.neftune import add_neftune


def test_noise_only_in_training_and_within_alpha_over_sqrt_length_times_width(tiny_config):
    torch.manual_seed(0)
    model = Phi(tiny_config)
    clean = model.wte.weight.detach()
    handle = add_neftune(model.wte, alpha=5.0)
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.wte(x), clean[x])
        model.train()
        noise = model.wte(x) - clean[x]
    bound = 5.0 / math.sqrt(8 * tiny_config.hidden_size)
    assert 0.9 * bound < noise.abs().max() <= bound * (1 + 1e-6)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model.wte(x), clean[x])
