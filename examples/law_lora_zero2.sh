#!/usr/bin/env bash
# Recipe 2 of the seed: legal QA LoRA (self_cognition + DISC-Law-SFT triplets) with DeepSpeed ZeRO-2,
# optimizer offloaded to DeepSpeed's CPU Adam. cutoff_len up to 1792 fits a 16 GB T4.
# law_sft_triplet downloads ShengbinYue/DISC-Law-SFT from the hub; offline, use
# --dataset self_cognition,law_sft_triplet_sample (the small sample shipped in data/).
set -euo pipefail
cd "$(dirname "$0")/.."
deepspeed --num_gpus ${NUM_GPUS:-1} --master_port=9901 examples/train_bash.py \
    --deepspeed examples/ds_config.json \
    --stage sft \
    --model_name_or_path ${MODEL:-microsoft/phi-1_5} \
    --do_train True \
    --finetuning_type lora \
    --template vanilla \
    --flash_attn False \
    --shift_attn False \
    --dataset_dir data \
    --dataset ${DATASET:-self_cognition,law_sft_triplet} \
    --cutoff_len 1792 \
    --learning_rate 2e-04 \
    --num_train_epochs 5.0 \
    --max_samples 1000 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 1 \
    --lr_scheduler_type cosine \
    --max_grad_norm 1.0 \
    --logging_steps 5 \
    --save_steps 1000 \
    --warmup_steps 0 \
    --neft_alpha 0 \
    --train_on_prompt False \
    --upcast_layernorm False \
    --lora_rank 8 \
    --lora_dropout 0.1 \
    --lora_target Wqkv \
    --resume_lora_training True \
    --output_dir saves/Phi1.5-1.3B/lora/law \
    --fp16 True \
    --plot_loss True "$@"
