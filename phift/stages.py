"""What the loop's engine trains at each --stage: an nn.Module around the network whose forward(**batch) is the loss.

    sft, pt   the network itself: its masked mean cross-entropy (pt's blocks label every token)
    rm        RewardModel: a value head on the final hidden state; -logsigmoid(r_chosen - r_rejected), each answer
              scored at its last token
    dpo       DPO: each answer's summed log-probability under the policy and the reference; TRL's DPO losses
    orpo      ORPO: the chosen answer's mean negative log-likelihood + λ · -logsigmoid(log odds ratio); no reference

A pairwise batch holds B pairs as 2B rows, the chosen answers first (data.collate_pairs), or (unless
--dpo_share_prompt False) as B rows [prompt | chosen | rejected] whose prompt both answers read
(data.collate_shared_pairs, model.SharedPrompt): the same log-probabilities and scores, a prompt's tokens run once.
Every engine (plain, DeepSpeed, offload) trains an objective as it trains the network: its parameters are the network's (and the value
head's), its forward returns the loss, and `metrics` holds the last forward's logged values (detached, TRL's names),
which the loop averages over the steps it logs. The losses are plain functions of per-answer numbers (`pairwise_loss`,
`dpo_loss`, `orpo_loss`), tested against TRL's own and against float64.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from . import lora
from .data import SharedPairs
from .model import LMHead, SharedPrompt
from .tensorfile import load_safetensors
from .weights import VALUE_HEAD_WEIGHTS


# ------------------------------------------------------------------------------------------------------ the losses
def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """A reward model's loss per pair: -log sigmoid(r_chosen - r_rejected) (Bradley-Terry; TRL's RewardTrainer)."""
    return -F.logsigmoid(chosen - rejected)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """(loss, chosen reward, rejected reward) per pair, from each answer's summed log-probability under the policy and
    the reference, as TRL's DPOTrainer computes them. With Δ = (π_c - ref_c) - (π_r - ref_r):

        sigmoid  -(1 - ε) logsigmoid(βΔ) - ε logsigmoid(-βΔ)    DPO; ε > 0 is cDPO's label smoothing
        hinge    relu(1 - βΔ)                                 SLiC
        ipo      (Δ' - 1 / 2β)²                                IPO; Δ' the log-ratios averaged over each answer's
                                                               tokens (TRL's normalisation)
    The rewards β (π - ref) are detached: they are logged, not trained.
    """
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if kind == "sigmoid":
        delta = beta * (chosen_ratio - rejected_ratio)
        loss = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    elif kind == "hinge":
        loss = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif kind == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}: sigmoid, hinge or ipo")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean_logps, rejected_mean_logps, beta: float):
    """(loss, log odds ratio) per pair from each answer's mean token log-probability: ORPO's -log p(chosen) (per
    token) + λ · -logsigmoid(log odds(chosen) - log odds(rejected)), λ = beta (the paper's and later LLaMA-Factory's
    form; TRL's odds-ratio term is the same, its NLL covers the prompt too)."""
    chosen, rejected = chosen_mean_logps, rejected_mean_logps
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -chosen - beta * F.logsigmoid(log_odds), log_odds.detach()


def shared_hidden(model: nn.Module, input_ids, pairs: SharedPairs) -> torch.Tensor:
    """The final norm's output over collate_shared_pairs' rows."""
    shared = SharedPrompt.of(pairs.prompt, pairs.chosen, pairs.rejected, pairs.prompt_pad)
    return model(input_ids, position_ids=pairs.position_ids, shared_prompt=shared, hidden_only=True)


def sequence_logps(model: nn.Module, input_ids, labels=None, label_rows=None, pairs: SharedPairs | None = None):
    """Per answer row: Σ log p(label) over its labelled positions (with its gradient), their count, and Σ of their mean
    logits (TRL's logits/* metrics). The vocabulary is projected a chunk of positions at a time (LMHead's per_token):
    never [rows, T, vocab] at once, and prompt and padding positions not at all. With `pairs` the batch is
    collate_shared_pairs' B rows, and the answers come out as collate_pairs' 2B rows would."""
    if pairs is not None:
        h = shared_hidden(model, input_ids, pairs)
        logps, mean_logits = model.lm_head(h, pairs.targets, pairs.sources, per_token=True, shifted=False)
        rows, seq = 2 * input_ids.shape[0], pairs.answer
    else:
        if label_rows is None:
            label_rows = LMHead.label_rows(labels)
        h = model(input_ids, hidden_only=True)
        logps, mean_logits = model.lm_head(h, labels, label_rows, per_token=True)
        rows, T = input_ids.shape
        seq = label_rows // (T - 1)  # label_rows index the flattened [rows, T - 1] shifted positions
    zeros = logps.new_zeros(rows + 1)  # the last slot takes the entries of no answer (collate_shared_pairs' static)
    return (zeros.index_add(0, seq, logps)[:rows], zeros.index_add(0, seq, torch.ones_like(logps))[:rows],
            zeros.index_add(0, seq, mean_logits)[:rows])


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of the network off, LoRA's included: v0.3.3's DPO trainer (TRL's disable_dropout) did so for the
    policy and the reference alike, whose log-probabilities must be comparable."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name in ("dropout", "lora_dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


# ------------------------------------------------------------------------------------------------------ objectives
class Objective(nn.Module):
    """A network (`model`) and what a stage computes from it; `metrics` holds the last forward's logged values."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.metrics: dict[str, torch.Tensor] = {}

    @property
    def config(self):
        return self.model.config


def network_of(module: nn.Module) -> nn.Module:
    """The network inside an objective (or the network itself: sft and pt train it bare)."""
    return module.model if isinstance(module, Objective) else module


class ValueHead(nn.Module):
    """hidden → 1: TRL's ValueHead (whose `summary` names the keys v0.3.3 and later LLaMA-Factory save), without its
    dropout."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, h):
        return self.summary(h.to(self.summary.weight.dtype))  # (under autocast, then cast to its half again)


class RewardModel(Objective):
    """The network's final hidden state → a scalar score per row, read at the row's last token (`last`: the eos that
    ends the answer, or its last token kept after the cutoff).

    v0.3.3's PairwiseTrainer read scores (for eval and predict) at a row's last token that is not the pad id, which
    for phi (pad = eos) is the token before the answer's eos; it trained on the mean loss over the tokens from where
    the two answers differ to the longer one's end. phift scores at the last token and trains on that score, as TRL's
    RewardTrainer and later LLaMA-Factory do.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.v_head = ValueHead(model.config.hidden_size)

    def scores(self, input_ids, last=None, attention_mask=None, pairs: SharedPairs | None = None) -> torch.Tensor:
        """One score per answer row (chosen first); with `pairs`, collate_shared_pairs' rows, read at each answer's
        last token there."""
        if pairs is not None:
            h = shared_hidden(self.model, input_ids, pairs)
            h = h.reshape(-1, h.shape[-1]).index_select(0, pairs.last)
        else:
            h = self.model(input_ids, attention_mask=attention_mask, hidden_only=True)
            h = h[torch.arange(h.shape[0], device=h.device), last]
        return self.v_head(h).squeeze(-1).float()

    def forward(self, input_ids, last=None, labels=None, label_rows=None, attention_mask=None, pairs=None):
        chosen, rejected = self.scores(input_ids, last, attention_mask, pairs).chunk(2)
        loss = pairwise_loss(chosen, rejected).mean()
        self.metrics = {"accuracy": (chosen > rejected).float().mean(), "rewards/chosen": chosen.detach().mean(),
                        "rewards/rejected": rejected.detach().mean(), "margin": (chosen - rejected).detach().mean()}
        return loss


def save_value_head(model: RewardModel, directory, state: dict | None = None) -> None:
    """VALUE_HEAD_WEIGHTS in `directory`: v_head.summary.weight [1, hidden] and .bias [1], fp32. state: the head's
    tensors under the objective's names, where the module's own are partitioned (ZeRO-3)."""
    state = state or {f"v_head.{k}": v for k, v in model.v_head.state_dict().items()}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()},
              str(Path(directory) / VALUE_HEAD_WEIGHTS))


def load_value_head(model: RewardModel, directory) -> None:
    """Load VALUE_HEAD_WEIGHTS from `directory` into the reward model's head; a missing file or a head of another
    shape is an error naming the file."""
    path = Path(directory) / VALUE_HEAD_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {VALUE_HEAD_WEIGHTS} in {directory}: a reward model (--stage rm) keeps its value "
                                "head there, beside its adapter or weights")
    state = {k.removeprefix("v_head."): v for k, v in load_safetensors(path).items()}
    own = model.v_head.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ValueError(f"{path} holds {sorted((k, tuple(v.shape)) for k, v in state.items())}; this model's value "
                         f"head is {sorted((k, tuple(v.shape)) for k, v in own.items())}")
    model.v_head.load_state_dict(state)


class FrozenReference:
    """DPO's reference as a model of its own (--ref_model, or a copy of the base for full fine-tuning), frozen and in
    eval mode; not a submodule of the objective, so no engine trains, casts or saves it.

    offload: its weights stay in (pinned) CPU memory, and each top-level module (the embedding, each block, the final
    norm, the head) is copied to `device` just before its forward and dropped after: one block's weights on the GPU
    instead of a second model."""

    def __init__(self, model: nn.Module, device: torch.device, offload: bool = False):
        self.model = model.eval().requires_grad_(False)
        if not offload:
            self.model.to(device)
            return
        pin = device.type == "cuda"
        host = {}  # tensor → its host copy (a tied weight is one tensor, kept once)
        for t in [*model.parameters(), *model.buffers()]:
            host[t] = t.data.cpu().pin_memory() if pin else t.data.cpu()
            t.data = host[t]
        for module in [m for name, m in model.named_children() if name != "layers"] + list(model.layers):
            _stream(module, {t: host[t] for t in [*module.parameters(), *module.buffers()]}, device)

    @torch.no_grad()
    def logps(self, input_ids, labels=None, label_rows=None, pairs=None):
        return sequence_logps(self.model, input_ids, labels, label_rows, pairs)[0]


def _stream(module: nn.Module, host: dict[torch.Tensor, torch.Tensor], device: torch.device) -> None:
    """Give `module`'s tensors a copy on `device` for the length of its forward, their host copies otherwise."""
    def upload(*_):
        for t, h in host.items():
            t.data = h.to(device, non_blocking=True)

    def release(*_):
        for t, h in host.items():
            t.data = h

    module.register_forward_pre_hook(upload)
    module.register_forward_hook(release)


class DPO(Objective):
    """Direct preference optimisation: B pairs, chosen and rejected in one forward of 2B rows.

    The reference's log-probabilities come from, in this order: the batch (`reference_logps`, computed once before
    training: --dpo_precompute_ref), a FrozenReference, or the policy itself with its LoRA adapters turned off (its
    base: no second copy), which without LoRA is the reference only before the first step (when --dpo_precompute_ref
    computes them)."""

    def __init__(self, model: nn.Module, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: FrozenReference | None = None):
        super().__init__(model)
        self.beta, self.loss, self.label_smoothing, self.reference = beta, loss, label_smoothing, reference
        disable_dropout(model)

    @torch.no_grad()
    def reference_logps(self, input_ids, labels=None, label_rows=None, pairs=None) -> torch.Tensor:
        if self.reference is not None:
            return self.reference.logps(input_ids, labels, label_rows, pairs)
        was_training = self.model.training
        self.model.eval()
        try:
            with lora.disabled(self.model):
                return sequence_logps(self.model, input_ids, labels, label_rows, pairs)[0]
        finally:
            self.model.train(was_training)

    def forward(self, input_ids, labels=None, label_rows=None, reference_logps=None, last=None, attention_mask=None,
                pairs=None):
        if reference_logps is None:  # first: its transient memory is gone before the policy's activations pile up
            reference_logps = self.reference_logps(input_ids, labels, label_rows, pairs)
        logps, tokens, logit_sums = sequence_logps(self.model, input_ids, labels, label_rows, pairs)
        (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), reference_logps.to(logps.dtype).chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                            self.loss, self.label_smoothing, chosen_tokens,
                                                            rejected_tokens)
        self.metrics = preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected, logit_sums, tokens)
        return losses.mean()


def preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, logit_sums, tokens) -> dict:
    """What TRL logs for a preference step; logit_sums and tokens hold the chosen half, then the rejected one."""
    (chosen_tokens, rejected_tokens), (chosen_logits, rejected_logits) = tokens.chunk(2), logit_sums.chunk(2)
    return {
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean(),
        # TRL's: the mean logit over the vocabulary, averaged over every answer token of the batch
        "logits/chosen": chosen_logits.sum() / chosen_tokens.sum(),
        "logits/rejected": rejected_logits.sum() / rejected_tokens.sum()}


class ORPO(Objective):
    """Odds-ratio preference optimisation (Hong et al., 2024): supervised loss and preference in one term, no
    reference. Rewards are β × each answer's mean token log-probability, as TRL logs them."""

    def __init__(self, model: nn.Module, beta: float):
        super().__init__(model)
        self.beta = beta
        disable_dropout(model)

    def forward(self, input_ids, labels=None, label_rows=None, last=None, attention_mask=None, pairs=None):
        logps, tokens, logit_sums = sequence_logps(self.model, input_ids, labels, label_rows, pairs)
        chosen, rejected = (logps / tokens).chunk(2)
        losses, log_odds = orpo_loss(chosen, rejected, self.beta)
        chosen_rewards, rejected_rewards = self.beta * chosen.detach(), self.beta * rejected.detach()
        self.metrics = {**preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected, logit_sums, tokens),
                        "nll_loss": -chosen.detach().mean(), "log_odds_ratio": log_odds.mean()}
        return losses.mean()
