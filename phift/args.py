"""The training flags, with the names and meanings of LLaMA-Factory v0.3.3's `train_bash.py --stage sft`.

Every flag the seed's three commands use parses; boolean flags take a value (`--fp16 True`) as there. Unknown
flags and unsupported values are errors, never silently ignored.
"""
from __future__ import annotations

import argparse


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def _bool(p, name, default, help):
    p.add_argument(name, type=str2bool, default=default, nargs="?", const=True, metavar="{True,False}", help=help)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phift train", description="Supervised fine-tuning of phi models "
                                "(LLaMA-Factory's `--stage sft` flags).", allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--stage", default="sft", choices=["sft"], help="only supervised fine-tuning is supported")
    g.add_argument("--model_name_or_path", required=True,
                   help="checkpoint directory, hub repo id (e.g. microsoft/phi-1_5), or a preset name for a "
                        "random-init model (tiny, phi-1, phi-1_5, phi-2)")
    g.add_argument("--tokenizer_name_or_path", default=None,
                   help="tokenizer directory for a preset (random-init) model; default: a demo tokenizer trained "
                        "on the dataset")
    g.add_argument("--finetuning_type", default="lora", choices=["lora", "full"])
    g.add_argument("--template", default="vanilla")
    _bool(g, "--flash_attn", False, "accepted for compatibility: attention always runs through PyTorch SDPA, "
                                     "which picks flash attention on GPUs that have it")
    _bool(g, "--shift_attn", False, "LongLoRA shift-short attention (not available for phi: must be False)")
    _bool(g, "--upcast_layernorm", False, "keep LayerNorm weights in fp32")
    _bool(g, "--disable_gradient_checkpointing", False,
          "activation checkpointing is on by default, as in LLaMA-Factory; True turns it off (faster, more memory)")
    g.add_argument("--gradient_checkpointing_policy", default="full", choices=["full", "mlp"],
                   help="full: recompute whole blocks in backward (least memory); mlp: recompute only each "
                        "block's fc1 + GELU (their activation is the largest; faster, more memory)")
    g.add_argument("--checkpoint_dir", "--adapter_name_or_path", dest="checkpoint_dir", default=None,
                   help="comma-separated adapter directories to start from, phift's or PEFT LoRA adapters of "
                        "transformers' PhiForCausalLM (see --resume_lora_training); --adapter_name_or_path is "
                        "the name later LLaMA-Factory versions use")
    _bool(g, "--resume_lora_training", True, "True: keep training the last adapter of --checkpoint_dir; "
                                             "False: merge them all into the base and train a new adapter")
    g.add_argument("--compile", type=str2bool, default=False, nargs="?", const=True, metavar="{True,False}",
                   help="torch.compile the model")
    _bool(g, "--cuda_graphs", False, "replay each micro-batch's forward and backward as a CUDA graph, one per batch "
                                     "shape (lengths padded to multiples of 64): for small batches, whose steps the "
                                     "host's kernel launches bound; needs a step without random numbers (phift/graphs.py)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", default="data")
    g.add_argument("--dataset", required=True, help="comma-separated names from dataset_info.json")
    g.add_argument("--cutoff_len", type=int, default=1024)
    g.add_argument("--max_samples", type=int, default=None)
    g.add_argument("--val_size", type=float, default=0.0, help="fraction (<1) or number of samples held out")
    _bool(g, "--train_on_prompt", False, "also train on prompt tokens")
    _bool(g, "--packing", False, "padding-free packing of several samples per row (no cross-sample attention)")
    g.add_argument("--neft_alpha", type=float, default=0.0, help="NEFTune noise alpha (0 = off)")
    g.add_argument("--identity_name", default=None, help="replaces <NAME>/{{name}} in self_cognition data")
    g.add_argument("--identity_author", default=None, help="replaces <AUTHOR>/{{author}} in self_cognition data")

    g = p.add_argument_group("training")
    _bool(g, "--do_train", True, "train (False with --do_eval/--do_predict runs evaluation only)")
    g.add_argument("--output_dir", required=True)
    _bool(g, "--overwrite_output_dir", False, "allow starting over in an output_dir that holds checkpoints")
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--num_train_epochs", type=float, default=3.0)
    g.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides num_train_epochs")
    g.add_argument("--per_device_train_batch_size", type=int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr_scheduler_type", default="linear",
                   choices=["linear", "cosine", "constant", "constant_with_warmup"])
    g.add_argument("--warmup_steps", type=int, default=0)
    g.add_argument("--warmup_ratio", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=42)
    _bool(g, "--fp16", False, "fp16 mixed precision with dynamic loss scaling (CUDA)")
    _bool(g, "--bf16", False, "bf16 mixed precision")
    _bool(g, "--pure_bf16", False, "train the model itself in bf16, without autocast (implies --bf16); full "
                                   "fine-tuning keeps fp32 master weights in the optimizer (phift.optim)")
    g.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON ('auto' values filled from these flags)")
    g.add_argument("--offload_optimizer", default="none", choices=["none", "cpu"],
                   help="cpu: full fine-tuning with the fp32 optimizer state in CPU memory, without DeepSpeed "
                        "(phift/offload.py; one GPU, --fp16 or --bf16)")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--save_steps", type=int, default=500)
    g.add_argument("--save_strategy", default="steps", choices=["steps", "no"],
                   help="no: write no checkpoints (the final weights are still saved)")
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument("--eval_steps", type=int, default=None, help="default: save_steps (needs --val_size)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint directory, or 'latest' for output_dir's newest complete checkpoint")
    _bool(g, "--plot_loss", False, "write training_loss.png (raw and smoothed)")

    g = p.add_argument_group("lora")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: 2 × lora_rank")
    g.add_argument("--lora_dropout", type=float, default=0.1)
    g.add_argument("--lora_target", default="Wqkv", help="Wqkv,out_proj,fc1,fc2 or all (q_proj/k_proj/v_proj "
                                                         "→ Wqkv, dense → out_proj)")
    _bool(g, "--use_rslora", False, "scale by alpha/sqrt(r) instead of alpha/r")

    g = p.add_argument_group("evaluation")
    _bool(g, "--do_eval", False, "eval loss and perplexity on the validation split")
    _bool(g, "--do_predict", False, "generate on the dataset and score BLEU-4 / ROUGE")
    _bool(g, "--predict_with_generate", False, "required with --do_predict, as in LLaMA-Factory")
    g.add_argument("--mcq_files", default=None,
                   help="comma-separated exam CSVs (input,output,A,B,C,D,...,multichoice) to score by likelihood")
    g.add_argument("--max_new_tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top_p", type=float, default=1.0)
    return p


def parse_train_args(argv=None) -> argparse.Namespace:
    p = train_parser()
    args = p.parse_args(argv)
    if args.shift_attn:
        p.error("--shift_attn True (LongLoRA S²-attention) is LLaMA-only in LLaMA-Factory; phi has no such path")
    if args.fp16 and args.bf16:
        p.error("--fp16 and --bf16 are exclusive")
    if args.pure_bf16:
        if args.fp16:
            p.error("--pure_bf16 and --fp16 are exclusive")
        if args.deepspeed:
            p.error("--pure_bf16 is for the plain PyTorch engine; DeepSpeed's own bf16 mode already keeps the model "
                    "in bf16 with fp32 master weights: drop --pure_bf16 and pass --bf16 True")
        if args.upcast_layernorm:
            p.error("--pure_bf16 keeps every weight in bf16; it cannot be combined with --upcast_layernorm True")
        args.bf16 = True
    if args.offload_optimizer == "cpu":
        if args.finetuning_type != "full":
            p.error("--offload_optimizer cpu is for --finetuning_type full (LoRA's optimizer state is a few MB)")
        if args.deepspeed:
            p.error("--offload_optimizer cpu is phift's own offload; with --deepspeed, offload in the DeepSpeed config")
        if not (args.fp16 or args.bf16):
            p.error("--offload_optimizer cpu trains the model in half precision: pass --fp16 True or --bf16 True")
        if args.upcast_layernorm:
            p.error("--offload_optimizer cpu keeps every weight in half precision; drop --upcast_layernorm True")
    if args.do_predict and not args.predict_with_generate:
        p.error("--do_predict needs --predict_with_generate True (as in LLaMA-Factory)")
    if args.finetuning_type == "full" and args.checkpoint_dir:
        p.error("--checkpoint_dir holds LoRA adapters; with --finetuning_type full point "
                "--model_name_or_path at the checkpoint instead")
    if not 0 <= args.lora_dropout < 1:
        p.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    for name in ("cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                 "save_steps", "lora_rank"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.eval_steps is None:
        args.eval_steps = args.save_steps
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    return args
