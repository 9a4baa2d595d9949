#!/usr/bin/env bash
# Continued pre-training (--stage pt) of phi-1_5 with LoRA on legal text, before the legal-QA SFT of
# examples/law_lora_zero2.sh. Each record (a line of a .txt file) is a document; the documents are joined and cut into
# blocks of --cutoff_len tokens, every token trained, as LLaMA-Factory v0.3.3's pt stage did (no template).
# law_pt_sample (data/law_pt_sample.txt, shipped) runs offline; a corpus of your own is one entry of
# data/dataset_info.json, e.g. "statutes": {"file_name": "statutes.txt", "columns": {"prompt": "text"}}.
# The adapter then starts the SFT: --checkpoint_dir saves/Phi1.5-1.3B/lora/law_pt --resume_lora_training False
# (merged into the base, a new adapter on top).
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/train_bash.py \
    --stage pt \
    --model_name_or_path ${MODEL:-microsoft/phi-1_5} \
    --do_train True \
    --finetuning_type lora \
    --flash_attn False \
    --shift_attn False \
    --dataset_dir data \
    --dataset ${DATASET:-law_pt_sample} \
    --cutoff_len 1024 \
    --learning_rate 2e-04 \
    --num_train_epochs 3.0 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --lr_scheduler_type cosine \
    --max_grad_norm 1.0 \
    --logging_steps 5 \
    --save_steps 1000 \
    --warmup_steps 0 \
    --upcast_layernorm False \
    --lora_rank 8 \
    --lora_dropout 0.1 \
    --lora_target Wqkv \
    --output_dir saves/Phi1.5-1.3B/lora/law_pt \
    --fp16 True \
    --plot_loss True "$@"
