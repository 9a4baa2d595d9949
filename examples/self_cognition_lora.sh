#!/usr/bin/env bash
# Recipe 1 of the seed: self-cognition LoRA on phi-1_5 (80 samples; a few minutes on a T4).
# Offline, point --model_name_or_path at a local phi-1_5 directory; set the identity with
# --identity_name / --identity_author.
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/train_bash.py \
    --stage sft \
    --model_name_or_path ${MODEL:-microsoft/phi-1_5} \
    --do_train True \
    --finetuning_type lora \
    --template vanilla \
    --flash_attn False \
    --shift_attn False \
    --dataset_dir data \
    --dataset self_cognition \
    --cutoff_len 1024 \
    --learning_rate 2e-04 \
    --num_train_epochs 20.0 \
    --max_samples 1000 \
    --per_device_train_batch_size 6 \
    --per_device_eval_batch_size 6 \
    --gradient_accumulation_steps 1 \
    --lr_scheduler_type cosine \
    --max_grad_norm 1.0 \
    --logging_steps 5 \
    --save_steps 100 \
    --warmup_steps 0 \
    --neft_alpha 0 \
    --train_on_prompt False \
    --upcast_layernorm False \
    --lora_rank 8 \
    --lora_dropout 0.1 \
    --lora_target Wqkv \
    --resume_lora_training True \
    --output_dir saves/Phi1.5-1.3B/lora/my \
    --fp16 True \
    --plot_loss True "$@"
