"""A DPO LoRA step, phift against TRL's DPOTrainer with PEFT: the same pairs, precision and optimizer, in one run.

    python bench/bench_dpo.py --out $OUT/dpo.md                       # a GPU: 4 pairs × 1024 tokens, phi-1_5's shape
    python bench/bench_dpo.py --device cpu --tiny --out /tmp/dpo.md   # smoke test of the harness (2-layer model)

A step is one optimizer step on 4 pairs: 8 rows of 1024 tokens (prompt 512 + answer 512, the answer ending with eos;
no padding), random token ids drawn from --seed, the same pairs for both sides. Each side runs in its own subprocess:
--warmup steps, then --steps timed ones between CUDA synchronisations; peak memory is torch.cuda.max_memory_allocated
over the timed steps (its counter reset just before them).

  phift   `phift train --stage dpo --finetuning_type lora --bf16 True`'s step on a random phi-1_5 (bf16 base weights;
          prepare_model, build_objective, build_engine, its CUDA kernels), LoRA r 8, α 16, dropout 0 on Wqkv (phi's
          fused q, k, v: one adapter), the reference the policy with its adapter off; batches made by
          phift.train.to_batch (a pair's prompt shared by its answers: 4 rows of 1536 tokens, the same
          log-probabilities; `(prompt not shared)`: 8 rows of 1024, as TRL), stepped by the plain engine (fused
          AdamW, clipping at 1.0, bf16 autocast)
  +compile  phift's --compile (each block compiled); TRL's torch_compile (the HF Trainer compiles the whole model)
  +graphs   phift's --cuda_graphs: each step's forward and backward replayed as one CUDA graph (the host's launches
            bound an eager step of the shared layout)
  trl     transformers' PhiForCausalLM of the same shape (bf16 base weights, SDPA) under TRL's DPOTrainer with a PEFT
          LoraConfig r 8, α 16, dropout 0 on q_proj, k_proj, v_proj (three adapters), ref_model None (TRL turns the
          adapter off for the reference), bf16, adamw_torch_fused, clipping at 1.0. The token ids reach it as text of
          a word-level tokenizer whose words are the ids, so it tokenizes them back to the same ids
Both: DPO's sigmoid loss with β 0.1, dropout off, activation checkpointing on (TRL's DPOConfig default; LLaMA-Factory's
and phift's too) unless --checkpointing off. TRL draws the pairs in a shuffled order: every row is as long, so a step
costs the same.

TRL is a test-only reference (setup.py's `test` extra). On a machine with phift, transformers and PEFT it needs the
wheels trl, datasets, pyarrow, pandas, dill, multiprocess and xxhash (PEFT brings accelerate and psutil, torch fsspec
and jinja2, phift's matplotlib python-dateutil); pandas 3 wants numpy >= 2.0.2.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMPLS = ("phift", "phift+compile", "trl", "trl+compile", "phift+graphs", "phift (prompt not shared)",
         "phift (no LoRA kernel)", "phift+compile (no LoRA kernel)")
# phift without its fused LoRA op: the PyTorch LoRA math, as PEFT does
NO_LORA_KERNEL = " (no LoRA kernel)"
# phift with --dpo_share_prompt False: a row per answer, the prompt run twice, as TRL batches pairs
NOT_SHARED = " (prompt not shared)"
PAIRS_PER_STEP, PROMPT, ANSWER, BETA, LR = 4, 512, 512, 0.1, 5e-6
PROFILE_STEPS = 3  # --profile: steps under torch.profiler after the timed ones
TINY = dict(prompt=24, answer=24)  # the smoke test's lengths


# ============================================================================================ the pairs
def make_pairs(n: int, prompt: int, answer: int, vocab: int, seed: int) -> list[dict]:
    """n pairs of random ids below vocab - 1 (the eos id, which ends each answer)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(0, vocab - 1, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(answer - 1) + [vocab - 1],
             "rejected_ids": ids(answer - 1) + [vocab - 1]} for _ in range(n)]


def checksum(pairs: list[dict]) -> str:
    return hashlib.sha1(json.dumps(pairs).encode()).hexdigest()[:12]


def model_config(tiny: bool):
    from phift.config import PhiConfig

    return PhiConfig.from_name("tiny" if tiny else "phi-1_5")


class Timer:
    """--warmup untimed steps, then the timed ones: wall time between CUDA synchronisations, the peak over them."""

    def __init__(self, device, warmup: int, steps: int):
        self.device, self.warmup, self.steps, self.done = device, warmup, steps, 0
        self.start = self.seconds = self.peak = None

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self):
        import torch

        if self.done == self.warmup:
            self._sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.start = time.perf_counter()

    def after_step(self):
        import torch

        self.done += 1
        if self.done == self.warmup + self.steps:
            self._sync()
            self.seconds = time.perf_counter() - self.start
            if self.device.type == "cuda":
                self.peak = torch.cuda.max_memory_allocated(self.device)


# ============================================================================================ the two sides
def run_phift(spec: dict, pairs: list[dict], device, timer: Timer) -> dict:
    """As `phift train --stage dpo` builds the step (its flags parsed, prepare_model, build_objective, build_engine,
    the CUDA kernels loaded), on a random model of the preset's shape."""
    import torch

    from phift import families, kernels
    from phift.args import decide_precision, parse_train_args
    from phift.engines import build_engine
    from phift.train import build_objective, prepare_model, shares_prompt, to_batch

    total = spec["warmup"] + spec["steps"]
    run = parse_train_args([
        "--model_name_or_path", "tiny" if spec["tiny"] else "phi-1_5", "--stage", "dpo", "--dataset", "unused",
        "--output_dir", spec["scratch"], "--finetuning_type", "lora", "--lora_target", "Wqkv", "--lora_rank", "8",
        "--lora_alpha", "16", "--lora_dropout", "0", "--dpo_beta", str(BETA), "--dpo_loss", "sigmoid", "--bf16", "True",
        "--per_device_train_batch_size", str(PAIRS_PER_STEP), "--learning_rate", str(LR), "--max_grad_norm", "1.0",
        "--lr_scheduler_type", "constant", "--max_steps", str(total),
        "--disable_gradient_checkpointing", str(spec["checkpointing"] == "off"), "--compile", str(spec["compile"]),
        "--dpo_share_prompt", str(spec.get("share_prompt", True)), "--cuda_graphs", str(spec.get("graphs", False))])
    precision = decide_precision(run, device)
    kernels.load(device)
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        model = families.build(model_config(spec["tiny"])).to(precision.load)
    objective = build_objective(prepare_model(model, run, precision), run, precision, device)
    engine = build_engine(objective, run, precision, total, device)
    objective.train()
    losses, layout = [], shares_prompt(run, model.config)

    def step(i):
        batch = to_batch(pairs[i * PAIRS_PER_STEP:(i + 1) * PAIRS_PER_STEP], False, pad_id=0, device=device, **layout)
        losses.append(engine.forward_backward(batch, True).detach().clone())  # (a graph's output is reused)
        engine.step(True)

    for i in range(total):
        timer.before_step()
        step(i)
        timer.after_step()
    if spec.get("profile"):
        profile_steps(spec, step, total, 1000 * timer.seconds / spec["steps"])
    return {"loss_first": float(losses[0]), "loss_last": float(losses[-1]), "cuda_kernels": kernels.kernels_enabled(),
            "prompt_shared": layout["share_prompt"],
            "kernels_off": sorted(kernels.DISABLED),
            "trainable": sum(p.numel() for p in objective.parameters() if p.requires_grad)}


def profile_steps(spec: dict, step, first: int, step_ms: float) -> None:
    """PROFILE_STEPS more steps under torch.profiler, summarised as bench/profile_step.py does, to spec["profile"]."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.profile_step import summarize

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(first, first + PROFILE_STEPS):
            step(i)
        if cuda:
            torch.cuda.synchronize()
    _, lines = summarize(prof, PROFILE_STEPS, step_ms, 30)
    Path(spec["profile"]).write_text(f"{spec['impl']}: step {step_ms:.2f} ms (unprofiled)\n" + "\n".join(lines) + "\n")


def word_tokenizer(vocab: int):
    """A tokenizer whose words are token ids ("t17" is 17; "<eos>" the last id): text that tokenizes back to the
    pairs' own ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)}
    words["<eos>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>")


def run_trl(spec: dict, pairs: list[dict], device, timer: Timer) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PhiConfig as HFPhiConfig
    from transformers import PhiForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cfg = model_config(spec["tiny"])
    torch.manual_seed(spec["seed"])
    hf_cfg = HFPhiConfig(**cfg.to_hf_dict())
    hf_cfg.use_cache = False
    with torch.device(device):
        model = PhiForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    text = lambda ids: " ".join("<eos>" if i == cfg.vocab_size - 1 else f"t{i}" for i in ids)  # noqa: E731
    dataset = Dataset.from_dict({"prompt": [text(p["prompt_ids"]) for p in pairs],
                                 "chosen": [" " + text(p["chosen_ids"]) for p in pairs],
                                 "rejected": [" " + text(p["rejected_ids"]) for p in pairs]})
    total = spec["warmup"] + spec["steps"]
    args = DPOConfig(output_dir=spec["scratch"], per_device_train_batch_size=PAIRS_PER_STEP, max_steps=total,
                     learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=BETA,
                     loss_type="sigmoid", bf16=True, optim="adamw_torch_fused" if device.type == "cuda" else
                     "adamw_torch", gradient_checkpointing=spec["checkpointing"] == "on", max_length=None,
                     logging_steps=total, save_strategy="no", report_to="none", seed=spec["seed"],
                     use_cpu=device.type != "cuda", dataloader_num_workers=0, disable_tqdm=True,
                     torch_compile=spec["compile"])
    losses = []

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.before_step()

        def on_step_end(self, args, state, control, **kwargs):
            timer.after_step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=word_tokenizer(
        cfg.vocab_size), peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj"]),
        callbacks=[Timing()])
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if [list(x) for x in trainer.train_dataset[key]] != [p[key] for p in pairs]:
            raise RuntimeError(f"TRL's {key} are not the pairs' own: the word-level tokenizer failed its job")
    trainer.train()
    return {"loss_mean": losses[-1] if losses else None,
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def worker(impl: str, spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    lengths = TINY if spec["tiny"] else dict(prompt=PROMPT, answer=ANSWER)
    steps = spec["warmup"] + spec["steps"] + (PROFILE_STEPS if spec.get("profile") else 0)
    pairs = make_pairs(steps * PAIRS_PER_STEP, lengths["prompt"], lengths["answer"],
                       model_config(spec["tiny"]).vocab_size, spec["seed"])
    timer = Timer(device, spec["warmup"], spec["steps"])
    spec = {**spec, "impl": impl, "compile": "+compile" in impl, "graphs": "+graphs" in impl,
            "share_prompt": NOT_SHARED not in impl}
    if spec.get("profile") and impl.startswith("phift"):
        spec["profile"] = f"{spec['profile']}_{''.join(c if c.isalnum() else '_' for c in impl)}.txt"
    else:
        spec.pop("profile", None)
    extra = (run_phift if impl.startswith("phift") else run_trl)(spec, pairs, device, timer)
    pairs_timed = spec["steps"] * PAIRS_PER_STEP
    return {"impl": impl, "status": "ok", "pairs_per_s": round(pairs_timed / timer.seconds, 3),
            "step_ms": round(1000 * timer.seconds / spec["steps"], 2),
            "peak_gib": round(timer.peak / 2**30, 3) if timer.peak is not None else None,
            "tokens_per_step": PAIRS_PER_STEP * 2 * (lengths["prompt"] + lengths["answer"]),
            "data_checksum": checksum(pairs), **extra}


# ============================================================================================ the parent
def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing reference is a row, not a crash
            out[name] = f"absent ({type(e).__name__})"
    return out


def _log(log: Path | None, title: str, text: str) -> None:
    if log is not None:
        with open(log, "a") as f:
            f.write(f"== {title}\n{text}\n")


def run_impl(impl: str, spec: dict, timeout_s: int, log: Path | None = None) -> dict:
    """One impl in its own process; a failed worker's whole stderr is appended to log."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--spec", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if impl.endswith(NO_LORA_KERNEL):  # read when phift is imported
        env["PHIFT_DISABLE_KERNELS"] = ",".join(filter(None, [env.get("PHIFT_DISABLE_KERNELS"), "lora"]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
        _log(log, f"{impl}: timeout after {timeout_s} s", (e.stderr or b"").decode(errors="replace"))  # bytes here
        return {"impl": impl, "status": f"timeout after {timeout_s} s"}
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        _log(log, f"{impl}: exit {proc.returncode}", proc.stderr)
        last = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        return {"impl": impl, "status": "error: " + " | ".join(last)}
    return json.loads(rows[-1])


def best_of(rows: list[dict], side: str, max_gib: float | None = None) -> dict | None:
    """The fastest measured row of one side (phift or trl, compiled or not), within max_gib of peak memory."""
    ok = [r for r in rows if r.get("status") == "ok" and r["impl"].startswith(side)
          and (max_gib is None or r["peak_gib"] is None or r["peak_gib"] <= max_gib)]
    return max(ok, key=lambda r: r["pairs_per_s"], default=None)


def question(rows: list[dict]) -> tuple[dict, dict, float] | None:
    """phift's fastest at no more memory than TRL's fastest, that TRL row, and the ratio (goal: ≥ 2)."""
    trl = best_of(rows, "trl")
    phift = trl and best_of(rows, "phift", trl["peak_gib"])
    return (phift, trl, phift["pairs_per_s"] / trl["pairs_per_s"]) if phift else None


def report(meta: dict, rows: list[dict]) -> str:
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    best_trl = best_of(rows, "trl")
    lines = [f"# DPO LoRA step: phift vs TRL ({meta['date']})", ""]
    if meta["tiny"]:
        lines += ["**TINY SMOKE TEST** (2-layer model, short rows): the numbers say nothing about speed.", ""]
    lines += [f"Device: {meta['device']}. {PAIRS_PER_STEP} pairs a step, rows of {meta['row_tokens']} tokens "
              f"(prompt {meta['prompt']} + answer {meta['answer']}), bf16, AdamW, LoRA r 8 α 16 on q/k/v, "
              f"activation checkpointing {meta['checkpointing']}, {meta['warmup']} warm-up + {meta['steps']} timed "
              f"steps. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
              "| impl | pairs/s | step (ms) | peak GiB | vs fastest TRL | status |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | | | | | {r['status']} |")
            continue
        speedup = f"{r['pairs_per_s'] / best_trl['pairs_per_s']:.2f}×" if best_trl and r["impl"].startswith(
            "phift") else ""
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {r['impl']} | {r['pairs_per_s']:.2f} | {r['step_ms']:.1f} | {peak} | {speedup} | ok |")
    checks = {r.get("data_checksum") for r in ok.values()}
    lines += ["", f"Same pairs on every side: {'yes' if len(checks) == 1 else 'NO'} (checksum "
              f"{', '.join(sorted(c for c in checks if c))}). Trainable parameters: "
              + ", ".join(f"{r['impl']} {r['trainable']:,}" for r in ok.values())
              + " (phift: one adapter on the fused Wqkv; PEFT: one each on q_proj, k_proj, v_proj)."]
    q = question(rows)
    if q:
        lines.append(f"phift's fastest at no more memory than TRL's fastest: {q[0]['impl']} ÷ {q[1]['impl']} = "
                     f"{q[2]:.2f}× (goal ≥ 2×).")
    if "phift" in ok and not meta["tiny"]:
        lines.append(f"phift's CUDA kernels: {'on' if ok['phift'].get('cuda_kernels') else 'off (PyTorch fallbacks)'}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="the markdown report (rows go beside it as .jsonl)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the 2-layer model on short rows: a smoke test")
    p.add_argument("--impls", help="comma-separated among " + ", ".join(IMPLS) + " (default: the first five on a "
                                    "GPU, the first four on the CPU, which has no CUDA graphs)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--checkpointing", choices=("on", "off"), default="on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=int, default=600)
    p.add_argument("--profile", help="after the timed steps, profile phift's and write where its time goes to "
                                     "PROFILE_<impl>.txt (not part of the timing)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("ROW " + json.dumps(worker(a.worker, json.loads(a.spec))), flush=True)
        return
    if a.out is None:
        p.error("--out is required")
    import tempfile

    import torch

    lengths = TINY if a.tiny else dict(prompt=PROMPT, answer=ANSWER)
    device_name = torch.cuda.get_device_name(0) if a.device == "cuda" and torch.cuda.is_available() else a.device
    command = "python bench/bench_dpo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"date": datetime.date.today().isoformat(), "device": device_name, "command": command, "tiny": a.tiny,
            "warmup": a.warmup, "steps": a.steps, "checkpointing": a.checkpointing, **lengths,
            "row_tokens": lengths["prompt"] + lengths["answer"], "versions": versions()}
    rows, log = [], a.out.with_suffix(".log")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for impl in (a.impls or ",".join(IMPLS[:5] if a.device == "cuda" else IMPLS[:4])).split(","):
            spec = {"device": a.device, "tiny": a.tiny, "warmup": a.warmup, "steps": a.steps,
                    "checkpointing": a.checkpointing, "seed": a.seed, "scratch": scratch, "profile": a.profile}
            rows.append(run_impl(impl, spec, a.timeout_s, log=log))
            print(json.dumps(rows[-1]), flush=True)
    header = {"bench": "dpo", "meta": meta}
    a.out.with_suffix(".jsonl").write_text("".join(json.dumps(x) + "\n" for x in [header, *rows]))
    a.out.write_text(report(meta, rows))
    print(a.out.read_text())


if __name__ == "__main__":
    main()
