"""The pairwise stages' math: each loss and its gradients against float64 and against TRL's own code on the same
log-probabilities, the chunked per-token log-probabilities against the full logits, the reward model's scores, and
DPO's references (LoRA's adapters turned off, a frozen copy streamed from the CPU)."""
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from phift import families, lora, stages
from phift.model import LMHead
from phift.weights import load_model, save_model

FAMILIES = ["tiny", "tiny-phi3", "tiny-phi4"]  # phi; Phi-3.5-mini's shape; Phi-4-mini's (tied embedding)
B = 3  # pairs


def build(name, seed=0):
    torch.manual_seed(seed)
    return families.build(families.preset(name, vocab_size=128, max_position_embeddings=64))


def pair_batch(seed=0, vocab=128, prompt=(5, 3, 7), chosen=(4, 6, 2), rejected=(3, 6, 5)):
    """B pairs as data.collate_pairs lays them out: chosen rows, then rejected, right-padded with 0."""
    from phift.data import collate_pairs

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
                for p, c, r in zip(prompt, chosen, rejected)]
    batch = collate_pairs(examples, pad_token_id=0)
    del batch["attention_mask"]
    batch["label_rows"] = LMHead.label_rows(batch["labels"])
    return batch


def full_logit_logps(model, batch):
    """Per row, Σ log softmax(logits)[label] over the labelled positions, from the whole [rows, T, vocab] logits."""
    logits = model(batch["input_ids"])[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits.to(torch.float64), -1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    return (logp * mask).sum(1), mask.sum(1)


# ------------------------------------------------------------------------------------------------------ the head
@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_only_is_what_the_head_projects(name):
    model = build(name).eval()
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model(x, hidden_only=True)), model(x), rtol=0, atol=0)


def test_per_token_log_probs_and_their_gradients_equal_float64(monkeypatch):
    """Chunked (three chunks here) per-token log-probabilities of the labels, with a weight per row in the upstream
    gradient, against log_softmax of the whole logits in float64."""
    monkeypatch.setattr(LMHead, "chunk_bytes", 4 * 64 * 5)  # 5 rows a chunk
    torch.manual_seed(0)
    head = LMHead(16, 64)
    torch.nn.init.normal_(head.bias)
    h = torch.randn(2, 8, 16, requires_grad=True)
    labels = torch.randint(0, 64, (2, 8))
    labels[0, :3] = -100
    rows = LMHead.label_rows(labels)
    logps, mean_logits = head(h, labels, rows, per_token=True)
    weights = torch.randn(len(rows))
    (logps * weights).sum().backward()

    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, head.weight, head.bias))
    logits = (h64[:, :-1] @ w64.T + b64).reshape(-1, 64)[rows]
    expected = torch.log_softmax(logits, -1).gather(1, labels[:, 1:].reshape(-1)[rows, None]).squeeze(1)
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(logps.double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(mean_logits.double(), logits.mean(-1), rtol=0, atol=2e-6)
    for ours, theirs in ((h.grad, h64.grad), (head.weight.grad, w64.grad), (head.bias.grad, b64.grad)):
        torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_sequence_log_probs_and_the_dpo_gradient_equal_the_full_logits_in_float64(name, monkeypatch):
    monkeypatch.setattr(LMHead, "chunk_bytes", 4 * 128 * 7)  # 7 positions a chunk: chunks span rows
    model, batch = build(name).double(), pair_batch()
    reference = torch.randn(2 * B, dtype=torch.float64) - 20
    dpo = stages.DPO(model, beta=0.1)
    loss = dpo(**batch, reference_logps=reference)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sums, counts = full_logit_logps(model, batch)
    torch.testing.assert_close(dpo.metrics["logps/chosen"].double(), sums[:B].mean().detach(), rtol=1e-12, atol=0)
    naive = -F.logsigmoid(0.1 * ((sums[:B] - reference[:B]) - (sums[B:] - reference[B:]))).mean()
    naive.backward()
    torch.testing.assert_close(loss.double(), naive, rtol=1e-12, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


# ------------------------------------------------------------------------------------------------------ the losses
def float64_dpo(pc, pr, rc, rr, beta, kind, eps=0.0, nc=None, nr=None):
    """(mean loss, d loss / d π_c, d loss / d π_r): DPO's losses and their gradients written out by hand."""
    d = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
        g = -(1 - eps) * beta * torch.sigmoid(-beta * d) + eps * beta * torch.sigmoid(beta * d)
        return loss.mean(), g / len(d), -g / len(d)
    if kind == "hinge":
        loss = torch.relu(1 - beta * d)
        g = -beta * (1 - beta * d > 0).double()
        return loss.mean(), g / len(d), -g / len(d)
    di = (pc - rc) / nc - (pr - rr) / nr
    loss = (di - 1 / (2 * beta)) ** 2
    g = 2 * (di - 1 / (2 * beta))
    return loss.mean(), g / nc / len(d), -g / nr / len(d)


@pytest.mark.parametrize("kind, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_losses_and_gradients_equal_float64(kind, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-40 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    nc, nr = (torch.randint(1, 30, (8,), generator=g).double() for _ in range(2))
    policy = torch.stack([pc, pr]).float().requires_grad_()
    loss, reward_c, reward_r = stages.dpo_loss(policy[0], policy[1], rc.float(), rr.float(), 0.1, kind, eps,
                                               nc.float(), nr.float())
    loss.mean().backward()
    expected, gc, gr = float64_dpo(pc, pr, rc, rr, 0.1, kind, eps, nc, nr)
    assert abs(loss.mean().item() - expected.item()) <= 1e-6 * max(1, abs(expected.item()))
    torch.testing.assert_close(policy.grad.double(), torch.stack([gc, gr]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reward_c.double(), 0.1 * (pc - rc), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reward_r.double(), 0.1 * (pr - rr), rtol=1e-6, atol=1e-6)


def test_reward_model_loss_and_gradients_equal_float64():
    g = torch.Generator().manual_seed(0)
    c, r = (4 * torch.randn(8, generator=g, dtype=torch.float64) for _ in range(2))
    scores = torch.stack([c, r]).float().requires_grad_()
    loss = stages.pairwise_loss(scores[0], scores[1]).mean()
    loss.backward()
    expected = -F.logsigmoid(c - r).mean()
    dc = -torch.sigmoid(r - c) / 8
    assert abs(loss.item() - expected.item()) <= 1e-6
    torch.testing.assert_close(scores.grad.double(), torch.stack([dc, -dc]), rtol=1e-5, atol=1e-8)


def test_orpo_loss_and_gradients_equal_float64():
    g = torch.Generator().manual_seed(0)
    c, r = (-3 * torch.rand(8, generator=g, dtype=torch.float64) - 1e-3 for _ in range(2))
    c[0] = -0.2  # both sides of log1mexp's branch at -log 2
    means = torch.stack([c, r]).float().requires_grad_()
    loss, log_odds = stages.orpo_loss(means[0], means[1], 0.1)
    loss.mean().backward()
    z = (c - r) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(r)))
    expected = (-c - 0.1 * F.logsigmoid(z)).mean()
    dc = (-1 - 0.1 * torch.sigmoid(-z) / (1 - torch.exp(c))) / 8
    dr = 0.1 * torch.sigmoid(-z) / (1 - torch.exp(r)) / 8
    assert abs(loss.mean().item() - expected.item()) <= 1e-6
    torch.testing.assert_close(log_odds.double(), z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means.grad.double(), torch.stack([dc, dr]), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ against TRL
def trl_dpo(per_token, completion_mask, ref_chosen, ref_rejected, beta, loss_type, mean_logits):
    """TRL's own DPOTrainer._compute_loss on per-token log-probs (what its fused head returns: [2B, T - 1], 0 off the
    completion) and precomputed reference sums; the trainer holds only the state that method reads."""
    trl = pytest.importorskip("trl")
    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=mean_logits,
                                    is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    vars(trainer).update(
        accelerator=types.SimpleNamespace(device=per_token.device, gather=lambda x: x, gather_for_metrics=lambda x: x),
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
              "attention_mask": torch.ones_like(completion_mask), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl.DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_metrics_and_gradients_equal_trls_on_the_same_log_probs(loss_type):
    """phift's DPO objective on a tiny model, and TRL's DPOTrainer fed the per-token log-probabilities and mean logits
    of phift's head for the same batch: the same loss, the same logged metrics, the same weight gradients."""
    model, batch = build("tiny"), pair_batch()
    reference = -60 * torch.rand(2 * B, generator=torch.Generator().manual_seed(1))
    dpo = stages.DPO(model, beta=0.1, loss=loss_type)
    loss = dpo(**batch, reference_logps=reference)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    rows = batch["label_rows"]
    logps, mean_logits = model.lm_head(model(batch["input_ids"], hidden_only=True), batch["labels"], rows,
                                       per_token=True)
    shape = (2 * B, batch["input_ids"].shape[1] - 1)
    per_token = torch.zeros(shape).flatten().index_put((rows,), logps).view(shape)
    per_logit = torch.zeros(shape).flatten().index_put((rows,), mean_logits).view(shape)
    completion = (F.pad(batch["labels"], (0, 0)) != -100).long()
    theirs, metrics = trl_dpo(per_token, completion, reference[:B], reference[B:], 0.1, loss_type, per_logit)
    theirs.backward()
    assert abs(loss.item() - theirs.item()) <= 1e-6 * max(1, abs(theirs.item()))
    for name, value in dpo.metrics.items():
        assert value.item() == pytest.approx(metrics[name], rel=1e-6, abs=1e-6), name
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max().item(), msg=n)


def test_orpo_odds_ratio_equals_trls():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(0)
    c, r = (-3 * torch.rand(6, generator=g) - 1e-3 for _ in range(2))
    trainer = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device=c.device))
    theirs, *_, their_log_odds = orpo.ORPOTrainer.odds_ratio_loss(trainer, c, r)
    ours, log_odds = stages.orpo_loss(c, r, 0.1)
    # TRL's ORPO loss is nll − mean(its term): the term is phift's loss less its −log p(chosen)
    torch.testing.assert_close(-theirs, ours + c, rtol=0, atol=1e-7)
    assert log_odds.mean().item() == pytest.approx(their_log_odds.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------------ rm, references
def test_the_reward_model_scores_each_row_at_its_last_token_whatever_follows():
    model = build("tiny").eval()
    rm = stages.RewardModel(model)
    batch = pair_batch()
    with torch.no_grad():
        scores = rm.scores(batch["input_ids"], batch["last"])
        h = model(batch["input_ids"], hidden_only=True)
        for i, last in enumerate(batch["last"].tolist()):
            assert scores[i].item() == pytest.approx(rm.v_head(h[i, last]).item(), abs=1e-6)
            padded = batch["input_ids"].clone()
            padded[i, last + 1:] = 7  # what follows the last token (padding) changes nothing: attention is causal
            assert rm.scores(padded, batch["last"])[i].item() == pytest.approx(scores[i].item(), abs=1e-5)
    loss = rm(**batch)
    assert loss.item() == pytest.approx(stages.pairwise_loss(*scores.chunk(2)).mean().item(), abs=1e-6)
    assert rm.metrics["accuracy"].item() == (scores[:B] > scores[B:]).float().mean().item()


@pytest.mark.parametrize("name", FAMILIES)
def test_the_lora_reference_is_the_base_loaded_on_its_own(name, tmp_path):
    """DPO's reference under LoRA, the policy with its adapters turned off, equals a separately loaded frozen base;
    after it the adapters are back, and a merged adapter is put back merged."""
    base = build(name)
    save_model(base, tmp_path / "base")
    policy = load_model(tmp_path / "base")
    lora.inject(policy, "all", verbose=False)
    for m in lora.lora_modules(policy).values():
        torch.nn.init.normal_(m.lora_B, std=0.5)
    batch = pair_batch()
    dpo = stages.DPO(policy, beta=0.1)
    frozen = stages.FrozenReference(load_model(tmp_path / "base"), torch.device("cpu"))
    expected = frozen.logps(batch["input_ids"], batch["labels"], batch["label_rows"])
    adapted = stages.sequence_logps(policy, batch["input_ids"], batch["labels"])[0].detach()
    assert (adapted - expected).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(dpo.reference_logps(batch["input_ids"], batch["labels"], batch["label_rows"]),
                               expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    assert policy.training
    lora.set_merged(policy, True)
    with lora.disabled(policy):
        off = stages.sequence_logps(policy, batch["input_ids"], batch["labels"])[0].detach()
    torch.testing.assert_close(off, expected, rtol=0, atol=1e-4)
    assert all(m.merged and not m.disabled for m in lora.lora_modules(policy).values())
    torch.testing.assert_close(stages.sequence_logps(policy, batch["input_ids"], batch["labels"])[0].detach(),
                               adapted, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["tiny", "tiny-phi4"])
def test_a_reference_streamed_from_host_memory_gives_the_same_log_probs(name):
    """--dpo_ref_offload's hooks (each module's weights copied in for its forward, dropped after; a tied embedding
    kept once) change nothing of the reference's numbers."""
    batch = pair_batch()
    kept = stages.FrozenReference(build(name), torch.device("cpu"))
    streamed = stages.FrozenReference(build(name), torch.device("cpu"), offload=True)
    torch.testing.assert_close(streamed.logps(batch["input_ids"], batch["labels"], batch["label_rows"]),
                               kept.logps(batch["input_ids"], batch["labels"], batch["label_rows"]), rtol=0, atol=0)


def test_dpo_turns_every_dropout_off_as_v033_did():
    model = families.build(families.preset("tiny", vocab_size=128, resid_pdrop=0.1, embd_pdrop=0.1,
                                           attention_dropout=0.1))
    lora.inject(model, "all", dropout=0.1, verbose=False)
    stages.DPO(model, beta=0.1)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(m.lora_dropout == 0 for m in lora.lora_modules(model).values())
    assert all(layer.attn.dropout == 0 for layer in model.layers)
