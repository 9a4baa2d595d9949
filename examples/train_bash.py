"""The seed's `src/train_bash.py`, for phift: the same flags, e.g.

    python examples/train_bash.py --stage sft --model_name_or_path microsoft/phi-1_5 ...
    deepspeed --num_gpus 1 --master_port=9901 examples/train_bash.py --deepspeed examples/ds_config.json ...
"""
import sys

from phift.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
