#!/usr/bin/env bash
# DPO (--stage dpo) of phi-1_5 with LoRA on the identity preference pairs shipped in data/identity_dpo.json (an answer
# that gives <NAME> and <AUTHOR>, filled from --identity_name/--identity_author, preferred to one that claims another
# identity). The reference is the model with its adapter turned off: no second copy in memory.
# After the SFT of examples/self_cognition_lora.sh, start from its adapter so that the SFT model is the reference:
#   ADAPTER=saves/Phi1.5-1.3B/lora/my examples/dpo_lora.sh
# (it is merged into the base and a new adapter trains on top). LLaMA-Factory's own preference data works as is:
# register e.g. dpo_en_demo.json as "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": true,
# "formatting": "sharegpt", "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
# and pass DATASET=dpo_en_demo.
set -euo pipefail
cd "$(dirname "$0")/.."
ADAPTER_FLAGS=()
if [ -n "${ADAPTER:-}" ]; then
    ADAPTER_FLAGS=(--checkpoint_dir "$ADAPTER" --resume_lora_training False)
fi
python examples/train_bash.py \
    --stage dpo \
    --model_name_or_path ${MODEL:-microsoft/phi-1_5} \
    ${ADAPTER_FLAGS[@]+"${ADAPTER_FLAGS[@]}"} \
    --do_train True \
    --finetuning_type lora \
    --template vanilla \
    --flash_attn False \
    --shift_attn False \
    --dataset_dir data \
    --dataset ${DATASET:-identity_dpo} \
    --cutoff_len 1024 \
    --dpo_beta 0.1 \
    --dpo_loss sigmoid \
    --learning_rate 5e-05 \
    --num_train_epochs 3.0 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --lr_scheduler_type cosine \
    --max_grad_norm 1.0 \
    --logging_steps 5 \
    --save_steps 1000 \
    --warmup_steps 0 \
    --lora_rank 8 \
    --lora_target Wqkv \
    --output_dir saves/Phi1.5-1.3B/lora/dpo \
    --fp16 True \
    --plot_loss True "$@"
