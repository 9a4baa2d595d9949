"""The phi network: rotary, the chunked loss, masks, checkpointing, generation with and without the KV cache."""
import pytest
import torch
import torch.nn.functional as F

from phift.generate import generate, sample_next
from phift.kernels import apply_rotary
from phift.model import LMHead, Phi, rotary_cos_sin


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return Phi(tiny_config).eval()


def test_rotary_touches_only_the_first_rotary_dims():
    x = torch.randn(2, 3, 5, 16)
    cos, sin = rotary_cos_sin(torch.arange(5).expand(2, 5), rotary_dim=8, theta=10000.0)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert not torch.allclose(y[..., 1:, :8], x[..., 1:, :8])
    torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))  # a rotation keeps norms


def test_rotary_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        cq, sq = rotary_cos_sin(torch.tensor([[pq]]), 8, 10000.0)
        ck, sk = rotary_cos_sin(torch.tensor([[pk]]), 8, 10000.0)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))


def test_rotary_matches_rotate_half_written_out():
    x = torch.randn(1, 1, 1, 4)
    cos, sin = rotary_cos_sin(torch.tensor([[3]]), rotary_dim=4, theta=10000.0)
    inv = 1.0 / 10000.0 ** (torch.tensor([0.0, 2.0]) / 4)
    a = 3 * inv
    x1, x2 = x[..., :2], x[..., 2:]
    expected = torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()], dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected)


@pytest.mark.parametrize("rows_per_chunk, hidden, unlabelled", [(7, 16, False), (1000, 16, False), (1000, 64, False),
                                                                  (7, 16, True), (1000, 64, True)])
def test_chunked_loss_equals_plain_cross_entropy_with_gradients(monkeypatch, rows_per_chunk, hidden, unlabelled):
    """7 rows a chunk: many chunks, a ragged last one; 1000: one chunk, whose fp32 logits' gradient (30 rows) is
    larger than the weight's at hidden 16 and is kept for backward at hidden 64; and batches with no label at all
    (no row reaches the head, or every row does)."""
    monkeypatch.setattr(LMHead, "chunk_bytes", 4 * 50 * rows_per_chunk)
    torch.manual_seed(0)
    head = LMHead(hidden, 50)
    h = torch.randn(3, 11, hidden, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100
    labels[2, 7:] = -100
    if unlabelled:
        labels[:] = -100
    # the unlabelled case at hidden 64 sends every row to the head, as phift.graphs does: 30 rows, all ignored
    every_row = torch.arange(3 * 10) if unlabelled and hidden == 64 else None
    loss = head(h, labels, every_row)
    assert loss.grad_fn.keep_g == (rows_per_chunk == 1000 and hidden == 64)
    loss.backward()
    grads = [t.grad.clone() for t in (h, head.weight, head.bias)]
    if unlabelled:  # (F.cross_entropy's mean over no label is nan; the training loss is 0 and moves nothing)
        assert loss.item() == 0 and not any(g.any() for g in grads)
        return
    for t in (h, head.weight, head.bias):
        t.grad = None
    ref = F.cross_entropy(F.linear(h[:, :-1], head.weight, head.bias).reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads, (h.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(got, want)


def test_loss_without_grad_needs_no_backward_buffers(model):
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        loss = model(x, labels=x)
    assert loss.ndim == 0 and torch.isfinite(loss) and not loss.requires_grad


def test_packed_segments_equal_separate_sequences(model):
    a, b = torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 7))
    packed = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    seg = torch.tensor([[1] * 5 + [2] * 7 + [0] * 4])
    pos = torch.tensor([list(range(5)) + list(range(7)) + [0] * 4])
    with torch.no_grad():
        out = model(packed, attention_mask=seg, position_ids=pos)
        torch.testing.assert_close(out[:, :5], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 5:12], model(b), atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_unpadded_logits(model):
    x = torch.randint(0, 128, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], model(x), atol=1e-5, rtol=1e-5)


def test_upcast_layernorm_keeps_activations_in_half(model):
    model.half()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
    x = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        assert model(x).dtype == torch.float16


def test_cached_and_uncached_greedy_decoding_agree(model):
    prompt = torch.randint(0, 128, (7,)).tolist()
    cached = generate(model, [prompt], max_new_tokens=12, use_cache=True)
    uncached = generate(model, [prompt], max_new_tokens=12, use_cache=False)
    assert cached == uncached and len(cached[0]) == 12


def test_batched_left_padded_generation_equals_one_at_a_time(model):
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (3, 9, 6)]
    batched = generate(model, prompts, max_new_tokens=8)
    assert batched == [generate(model, [p], max_new_tokens=8)[0] for p in prompts]


def test_generation_stops_at_eos_and_drops_it(model):
    prompt = [5, 6, 7]
    first = generate(model, [prompt], max_new_tokens=1)[0][0]
    assert generate(model, [prompt], max_new_tokens=10, eos_token_id=first) == [[]]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample_next(logits).item() == 0


# ------------------------------------------------------------ generation never asks cuDNN's attention for a kernel
@pytest.mark.parametrize("family", ["phi", "phi3"])
def test_a_forward_over_a_kv_cache_leaves_cudnn_attention_out_and_training_keeps_it(family, monkeypatch):
    """cuDNN's attention plans per shape (~35 ms on an H200): with a cache, whose keys grow every step, each decode
    step paid it (bench/profile_decode.py: 46 against 10 ms). Generation's forwards run with it switched off; other
    forwards see PyTorch's own choice, and the switch is restored after."""
    from phift.config import Phi3Config, PhiConfig
    from phift.model import KVCache
    from phift.phi3 import Phi3

    torch.manual_seed(0)
    model = (Phi(PhiConfig.from_name("tiny")) if family == "phi"
             else Phi3(Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                  num_kv_heads=2, rotary_dim=8, max_position_embeddings=64,
                                  eos_token_id=127, pad_token_id=127))).eval()
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or sdpa(*a, **kw))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    ids = torch.randint(0, 100, (2, 6))
    model(ids)
    assert seen and all(seen)  # training's shapes repeat: cuDNN's plans pay off there
    seen.clear()
    cache = KVCache(model.config, 2, 10)
    model(ids, kv_cache=cache)
    model(ids[:, :1], attention_mask=torch.ones(2, 7, dtype=torch.long), kv_cache=cache)
    assert len(seen) == 2 * model.config.num_layers and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    seen.clear()
    generate(model, ids.tolist(), max_new_tokens=3)
    assert seen and not any(seen)
