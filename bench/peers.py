"""The peers phift is measured against, each built from a case's fields into step(batch) → loss:

    hf      transformers' PhiForCausalLM or Phi3ForCausalLM, from the config.json phift writes for the case's model
            (+ PEFT LoRA on the attention's q/k/v: q_proj/k_proj/v_proj, Phi-3's fused qkv_proj), a plain loop;
            case.compile: the whole model under torch.compile, as the HF Trainer's --torch_compile does
    litgpt  litgpt.lora.GPT (its phi-1_5 or Phi-3.5-mini-instruct preset, LoRA on query/key/value) with litgpt's
            chunked lm_head + loss
    seed    the seed's stack: HF (+ PEFT) under deepspeed.initialize with phift's filled ds_config (ZeRO-2, CPU Adam),
            activation checkpointing as LLaMA-Factory enables it (transformers' defaults)

LoRA: r 8, alpha 16, dropout 0.1; base weights in the half dtype, fp32 adapters, autocast. Full: fp32 master
weights + autocast (plain loop) or DeepSpeed's own fp16/bf16 with fp32 master weights.
"""
from __future__ import annotations

from bench import phift_case
from bench.cases import LR, MAX_GRAD_NORM, Case, model_shape


# The attention's q/k/v in each transformers model (config.json's model_type), as PEFT names them
PEFT_QKV = {"phi": ["q_proj", "k_proj", "v_proj"], "phi3": ["qkv_proj"]}
# litgpt's preset of each model
LITGPT_NAMES = {"phi-1_5": "phi-1_5", "phi-3.5-mini": "Phi-3.5-mini-instruct"}


def hf_model(c: Case, spec: dict, device, dtype):
    import torch
    import transformers

    d = model_shape(c.model, spec["tiny"]).to_hf_dict()
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf_cfg.use_cache = False
    with torch.device(device):
        model = getattr(transformers, hf_cfg.architectures[0])._from_config(hf_cfg, attn_implementation="sdpa",
                                                                            dtype=dtype)
    return model


def peft_lora(model):
    from peft import LoraConfig, get_peft_model
    # PEFT casts the adapters to fp32 on a half base (autocast_adapter_dtype), as LLaMA-Factory trains them
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                                            target_modules=PEFT_QKV[model.config.model_type]))


def plain_loop(params, c: Case, device, loss_fn):
    """AdamW (fused on CUDA) + clipping + autocast (+ GradScaler for fp16): what phift's TorchEngine and the HF
    Trainer both do."""
    import torch

    half = torch.float16 if c.half == "fp16" else torch.bfloat16
    if device.type != "cuda" and half == torch.float16:
        half = torch.bfloat16
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if half == torch.float16 else None

    def step(batch):
        with torch.autocast(device.type, dtype=half):
            loss = loss_fn(batch)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def build_hf(c: Case, spec: dict, device):
    import torch

    half = torch.float16 if c.half == "fp16" else torch.bfloat16
    model = hf_model(c, spec, device, half if c.mode == "lora" else torch.float32)
    if c.ckpt != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.mode == "lora":
        model = peft_lora(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(model) if c.compile else model
    return plain_loop(params, c, device, lambda b: fwd(**b).loss), {}


def build_litgpt(c: Case, spec: dict, device):
    import torch
    from litgpt.lora import GPT, Config as LitConfig, mark_only_lora_as_trainable
    from litgpt.utils import chunked_cross_entropy

    if c.mode != "lora":
        raise ValueError("litgpt runs LoRA only here")
    over = dict(lora_r=8, lora_alpha=16, lora_dropout=0.1, lora_query=True, lora_key=True, lora_value=True)
    if spec["tiny"]:
        s = model_shape(c.model, True)
        over.update(n_layer=s.num_layers, n_embd=s.hidden_size, n_head=s.num_heads, n_query_groups=s.num_kv_heads,
                    head_size=s.head_dim, intermediate_size=s.intermediate_size, vocab_size=s.vocab_size,
                    padded_vocab_size=s.vocab_size, block_size=s.max_position_embeddings,
                    rotary_percentage=s.rotary_dim / s.head_dim)
    cfg = LitConfig.from_name(LITGPT_NAMES[c.model], **over)
    half = torch.float16 if c.half == "fp16" else torch.bfloat16
    with torch.device(device):
        model = GPT(cfg)
    model.max_seq_length = c.seq
    mark_only_lora_as_trainable(model)
    model.to(half)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(model) if c.compile else model

    def loss_fn(b):  # litgpt/finetune/lora.py's step
        logits = fwd(b["input_ids"], lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, b["labels"][..., 1:])
    return plain_loop(params, c, device, loss_fn), {}


def build_seed(c: Case, spec: dict, device):
    import torch

    phift_case.init_deepspeed(device)
    import deepspeed
    half = torch.float16 if c.half == "fp16" and device.type == "cuda" else torch.bfloat16
    model = hf_model(c, spec, device, half)
    if c.ckpt != "off":
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if c.mode == "lora":
        model = peft_lora(model)
    model.train()
    cfg = phift_case.deepspeed_config(c, spec, device, model.config.hidden_size)
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])

    def step(batch):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        return loss
    return step, {}


BUILDERS = {"hf": build_hf, "litgpt": build_litgpt, "seed": build_seed}
