"""Multi-GPU through the DeepSpeed launcher: `phift train` unchanged under `deepspeed --num_gpus N`.

For each case it runs the same global batch on 1 GPU (gradient accumulation) and on N GPUs, reads
trainer_log.jsonl, and reports tokens/s, the N-GPU speed-up, peak memory and the largest loss difference over the
run (same seed and data order, so the curves should coincide up to bf16 noise). Data: synthetic samples long
enough that every row is cut to exactly `cutoff_len` tokens.

    python bench/bench_multigpu.py --tokenizer DIR --out $OUT/multigpu.md [--gpus 2] [--only REGEX]

phi-family cases tokenize with --tokenizer (phi-1_5's); a Phi-3-family model's vocabulary is smaller than phi-1_5's
ids, so its cases use a byte-level BPE trained here on the synthetic data (random weights either way).
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("court contract liability statute evidence judgment appeal damages property tort claim party law "
         "article clause defendant plaintiff ruling 法院 合同 责任 证据 判决 上诉 赔偿 财产 条款 被告 原告").split()

CASES = [  # name, model preset, finetuning type, micro batch, cutoff, ZeRO stage, steps
    ("LoRA r8 6×1024", "phi-1_5", "lora", 6, 1024, 2, 50),
    ("full 4×1024", "phi-1_5", "full", 4, 1024, 2, 15),
    ("phi-2 full 2×1024 ZeRO-3", "phi-2", "full", 2, 1024, 3, 6),
    ("Phi-3.5-mini LoRA r8 4×1024", "phi-3.5-mini", "lora", 4, 1024, 2, 30),
    ("Phi-4-mini full 1×1024 ZeRO-3", "phi-4-mini", "full", 1, 1024, 3, 8),
]


def synthetic_dataset(directory: Path, n: int = 600, words: int = 1400) -> list[dict]:
    rng = random.Random(0)
    rows = [{"instruction": " ".join(rng.choices(WORDS, k=words // 2)), "input": "",
             "output": " ".join(rng.choices(WORDS, k=words // 2))} for _ in range(n)]
    (directory / "synthetic.json").write_text(json.dumps(rows, ensure_ascii=False))
    (directory / "dataset_info.json").write_text(json.dumps({"synthetic": {"file_name": "synthetic.json"}}))
    return rows


def tokenizer_for(preset: str, args, rows: list[dict], work: Path) -> str:
    """phi-1_5's tokenizer for the phi family; for Phi-3's (32,064 ids and fewer than phi-1_5's), a small BPE."""
    from phift import families
    from phift.tokenizer import train_demo_tokenizer

    if families.family_of(families.preset(preset)).name == "phi":
        return args.tokenizer
    directory = work / "tokenizer-small"
    if not directory.exists():
        train_demo_tokenizer([r["instruction"] + " " + r["output"] for r in rows[:50]], 4096).save(directory)
    return str(directory)


def run(name, gpus, accum, case, args, data_dir, work, tokenizer):
    _, preset, ft, micro, cutoff, stage, steps = case
    cfg = work / f"ds_z{stage}.json"
    cfg.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                               "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                               "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": stage}}))
    out = work / name
    cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(29600 + gpus), str(ROOT / "examples" /
           "train_bash.py"), "--deepspeed", str(cfg), "--model_name_or_path", preset, "--dataset", "synthetic", "--dataset_dir", str(data_dir), "--template", "vanilla",
           "--finetuning_type", ft, "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps",
           str(accum), "--cutoff_len", str(cutoff), "--max_steps", str(steps), "--logging_steps", "1",
           "--save_strategy", "no", "--learning_rate", "1e-4" if ft == "full" else "2e-4", "--bf16", "True",
           "--lora_dropout", "0", "--disable_gradient_checkpointing", "True", "--output_dir", str(out),
           "--overwrite_output_dir", "True", "--tokenizer_name_or_path", tokenizer]
    t = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.run_timeout)
    except subprocess.TimeoutExpired as e:
        (Path(args.log_dir) / f"{name.replace(' ', '_').replace('×', 'x')}.log").write_text(
            str(e.stdout)[-20000:] + str(e.stderr)[-20000:])
        return {"error": f"timed out after {args.run_timeout} s", "wall": time.time() - t}
    (Path(args.log_dir) / f"{name.replace(' ', '_').replace('×', 'x')}.log").write_text(
        proc.stdout[-20000:] + proc.stderr[-20000:])
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:160], "wall": time.time() - t}
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    timed = log[len(log) // 3:]  # past warm-up
    elapsed = timed[-1]["elapsed_time"] - log[len(log) // 3 - 1]["elapsed_time"]
    tokens = len(timed) * micro * accum * gpus * cutoff
    return {"tok_s": tokens / elapsed, "mem": max(e.get("gpu_mem_gib", 0) for e in log),
            "losses": [e["loss"] for e in log], "wall": time.time() - t}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--log_dir", default=tempfile.gettempdir())
    p.add_argument("--run_timeout", type=int, default=150)
    p.add_argument("--only", default=None, help="a regular expression over case names")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp())
    rows = synthetic_dataset(work)
    n = args.gpus
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    meta = {"device": device, "gpus": n, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": "python bench/bench_multigpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    results = []
    for case in [c for c in CASES if args.only is None or re.search(args.only, c[0])]:
        tokenizer = tokenizer_for(case[1], args, rows, work)
        one = run(f"{case[0]}-1", 1, n, case, args, work, work, tokenizer) if case[1] != "phi-2" else {"skipped": True}
        many = run(f"{case[0]}-{n}", n, 1, case, args, work, work, tokenizer)
        row = {"case": case[0], "model": case[1], "finetuning": case[2], "micro_batch": case[3], "cutoff": case[4],
               "zero_stage": case[5], "steps": case[6], "gpus": n}
        if "error" in many or "error" in one:
            row["status"] = f"failed: 1 GPU: {one.get('error', 'ok')}; {n} GPUs: {many.get('error', 'ok')}"
        else:
            row.update(status="ok", tokens_per_s=many["tok_s"], peak_gib=many["mem"],
                       one_gpu_tokens_per_s=one.get("tok_s"), one_gpu_peak_gib=one.get("mem"))
            if "skipped" not in one:
                row["speedup"] = many["tok_s"] / one["tok_s"]
                row["max_loss_diff"] = max(abs(a - b) / a for a, b in zip(one["losses"], many["losses"]))
        results.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in [{"bench": "multigpu", "meta": meta},
                                                                          *results]) + "\n")
    text = "\n".join([f"Multi-GPU scaling (`bench/bench_multigpu.py`), {device} × {n}, torch {torch.__version__}, "
                      f"{meta['date']}. Same global batch on 1 GPU (accumulation {n}) and on {n} GPUs; bf16; tokens/s "
                      "over the last two thirds of the steps; peak = max_memory_allocated.", "",
                      *table([(r, None) for r in results], n)]) + "\n"
    out.write_text(text)
    print(text)


def table(rows: list[tuple[dict, object]], gpus: int | None = None) -> list[str]:
    """The rows as a markdown table; with runs (bench/report.py), each row names its run and device."""
    runs = any(run is not None for _, run in rows)
    n = gpus or "N"
    lines = [f"| case | GPUs | 1 GPU tok/s | {n} GPUs tok/s | speed-up | peak GiB 1 / {n} | max loss diff |"
             + (" run | device |" if runs else ""),
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |" + (" --- | --- |" if runs else "")]
    for r, run in rows:
        def num(key, fmt):
            return "—" if r.get(key) is None else format(r[key], fmt)
        cells = ([r["case"], str(r["gpus"]), "—", r["status"], "", "", ""] if r["status"] != "ok" else
                 [r["case"], str(r["gpus"]), num("one_gpu_tokens_per_s", ",.0f"), num("tokens_per_s", ",.0f"),
                  num("speedup", ".2f") + ("×" if r.get("speedup") else ""),
                  f"{num('one_gpu_peak_gib', '.1f')} / {num('peak_gib', '.1f')}",
                  "—" if r.get("max_loss_diff") is None else f"{100 * r['max_loss_diff']:.2f} %"])
        if runs:
            cells += [run.label, run.device]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
