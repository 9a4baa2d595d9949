"""A micro-batch's forward and backward replayed as a CUDA graph (`--cuda_graphs`).

A full fine-tuning step of phi-1_5 on one 1×1024 sample is bound by the host, not the GPU: about 1,500 kernel
launches, each a few microseconds of Python, dispatcher and autograd (bench/HISTORY.md, `2026-11-28 t`: ~55 ms a
step of a 24-block phi with no math at all). A CUDA graph records those launches once and replays them with one
call. What it needs, and how this module gives it:

- Static shapes. Each batch is right-padded (tokens 0, labels -100, attention mask 0) to a multiple of `BUCKET`
  tokens, and every position goes to the loss head (`label_rows` of all rows; the unlabelled ones cost a little
  vocabulary projection and add nothing), so one graph serves every batch of a (batch size, bucket) pair. With
  causal attention, right padding changes no real token's output, and the loss divides by the labelled count.
- Static memory. Batches are copied into the graph's own input tensors, and the graph's activations live in one
  private memory pool that all graphs share (only one replays at a time, and its only other output, the loss, is
  consumed in stream order before the next replay).
- Gradients at fixed addresses. With one micro-batch a step (--gradient_accumulation_steps 1) the first graph
  captured allocates the gradients itself, inside its pool, at the points of the backward where eager allocates
  them, so a graphed step peaks where an eager one does; its replays overwrite them, and graphs of later shapes
  add into them. With accumulation, every graph adds into gradients made before any capture. Either way the
  gradients stay for the whole run: nothing may free them (GraphedEngine leaves them alone), and this
  module zeroes them when an accumulation window starts, unless the replay about to run overwrites them. The
  clipping norm and the optimizer step stay outside the graph: they read the learning rate and step count from
  the host, and cost a handful of launches.
- No host syncs and no random numbers inside: checkpointing runs without saving the RNG state, so nothing in the
  model may draw one (dropout, LoRA dropout, NEFTune noise); `check` and phift.args.check refuse those up front.
- Preference pairs (rm, dpo, orpo) in the shared-prompt layout, collated to static shapes already
  (data.collate_shared_pairs' `static`): a graph per (prompt, chosen, rejected) span. The objective's metrics are
  outputs of the graph too: each graph keeps its own, and the engine's module shows those of the last replay. A
  pair batch in a row per answer (beyond a sliding window) runs eagerly.

The first batch of each shape runs eagerly (its gradients are real: it is also the warm-up that capture needs),
and the graph is captured right after, so a run pays one capture per shape and nothing else. The gradient-owning
first graph is the exception: its eager warm-up's gradients are dropped before the capture, and the graph's first
replay computes that batch again (one extra forward and backward a run).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..data import SharedPairs
from ..stages import Objective
from . import Engine

BUCKET = 64  # tokens: batch lengths are padded up to a multiple of this


def check(model) -> str | None:
    """Why a CUDA graph cannot hold this model's step, or None when it can: nothing in the step may draw random
    numbers (the flags that would, --neft_alpha and --lora_dropout, are refused by phift.args.check)."""
    drawing = [name for name, m in model.named_modules()
               if (isinstance(m, torch.nn.Dropout) and m.p > 0) or getattr(m, "lora_dropout", 0.0) > 0
               or getattr(m, "dropout", 0.0) > 0]
    if drawing:
        return (f"--cuda_graphs needs a step without random numbers, but {drawing[0]} applies dropout (pass "
                "--lora_dropout 0 for LoRA; a checkpoint whose config declares dropout cannot be graphed)")
    return None


class GraphedEngine(Engine):
    """The plain engine with each micro-batch's forward and backward replayed as a graph (GraphedStep); clipping, the
    optimizer step and the schedule run as the engine runs them, outside the graph."""

    def __init__(self, engine: Engine):
        why = check(engine.module)
        if why:
            raise ValueError(why)
        self.inner = engine
        self.graphed = GraphedStep(engine.params, engine.forward_backward, engine.spec.accumulation, engine.module)

    @property
    def module(self):
        return self.inner.module

    def forward(self, batch):
        return self.inner.forward(batch)

    def forward_backward(self, batch, boundary: bool = True):
        return self.graphed(batch, boundary)

    def update(self):
        return self.inner.update()

    def zero_grad(self):
        pass  # the gradients stay at the addresses the graphs write; GraphedStep zeroes them when a window opens

    def lr(self):
        return self.inner.lr()

    def weights_state_dict(self):
        return self.inner.weights_state_dict()

    def save(self, directory):
        self.inner.save(directory)

    def load(self, directory, restore):
        self.inner.load(directory, restore)


class GraphedStep:
    """loss = step(batch, boundary): forward, loss / accumulation (× the fp16 loss scale), backward, as a replayed
    graph."""

    def __init__(self, params, forward_backward, accumulation: int = 1, module=None):
        """params: the trainable parameters. forward_backward(batch) -> loss runs the eager forward and backward (the
        engine's, with its autocast, loss scaling and accumulation divisor); it is run once eagerly per shape and
        captured once. accumulation: micro-batches a step; at 1 the first graph owns (allocates, then overwrites)
        the gradients. module: the objective, whose `metrics` (tensors its forward sets) each graph keeps."""
        self.params, self.forward_backward, self.module = params, forward_backward, module
        self.owner = None if accumulation == 1 else False  # the gradient-owning graph's shape key, once captured
        self.graphs = {}  # shape key -> (graph, static inputs, static loss)
        self.pool = None
        self.replays = 0
        self.window_start = True  # the next micro-batch opens an accumulation window: stale gradients, or none
        self.stream = None  # where eager warm-ups run and graphs are captured (made on the first call)

    def graphable(self, batch: dict) -> bool:
        """A language-model batch, or preference pairs sharing their prompt (collated to static shapes); not pairs in
        a row per answer, whose log-probabilities read only the labelled positions."""
        return not isinstance(self.module, Objective) or "pairs" in batch

    @staticmethod
    def key(batch: dict) -> tuple:
        """What fixes a graph: every tensor's shape and dtype, and a pair batch's spans."""
        def sig(v):
            if isinstance(v, SharedPairs):
                return (v.prompt, v.chosen, v.rejected) + tuple(
                    None if (t := getattr(v, f.name)) is None else (tuple(t.shape), t.dtype)
                    for f in dataclasses.fields(v) if f.name not in ("prompt", "chosen", "rejected"))
            return tuple(v.shape), v.dtype
        return tuple((k, sig(v)) for k, v in sorted(batch.items()))

    @staticmethod
    def pad(batch: dict) -> dict:
        """Right-pad to a multiple of BUCKET tokens and send every position to the loss head (a pair batch comes in
        static shapes already)."""
        if "pairs" in batch:
            return batch
        B, T = batch["input_ids"].shape
        extra = -T % BUCKET
        fill = {"labels": -100}
        out = {}
        for k, v in batch.items():
            if k == "label_rows":
                continue
            out[k] = F.pad(v, (0, extra), value=fill.get(k, 0)) if extra else v
        out["label_rows"] = torch.arange(B * (T + extra - 1), device=batch["input_ids"].device)
        return out

    def __call__(self, batch: dict, boundary: bool = True) -> torch.Tensor:
        """The micro-batch's loss (the graph's output tensor: read it before the next call). `boundary`: this
        micro-batch closes its accumulation window (the optimizer steps next)."""
        if not self.graphable(batch):  # eagerly, on the current stream; its autograd graph dies here
            self._open_window(overwrites=False)
            loss = self.forward_backward(batch).detach()
            self.window_start = boundary
            return loss
        batch = self.pad(batch)
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        key = self.key(batch)
        entry = self.graphs.get(key)
        if entry is None and self.owner is None:
            # the first shape at one micro-batch a step: warm up eagerly, drop those gradients (and the cached blocks
            # that held them, so that the graph's pool may use that memory), capture a graph that allocates its own
            # in its pool, and replay it below for this batch
            self._on_capture_stream(lambda: self.forward_backward(batch))
            for p in self.params:
                p.grad = None
            torch.cuda.empty_cache()
            entry = self.graphs[key] = self._capture(batch)
            self.owner = key
        elif entry is None:
            # eager: this micro-batch's real gradients, and the warm-up. Only its detached loss may outlive it: its
            # autograd graph holds the parameters' gradient accumulators, made outside any capture, which the
            # capture would otherwise reuse
            self._open_window(overwrites=False)
            loss = self._on_capture_stream(lambda: self.forward_backward(batch).detach())
            metrics = self.metrics
            self.graphs[key] = self._capture(batch)
            self.metrics = metrics  # this batch's, not the capture's (which replays alone fill)
            self.window_start = boundary
            return loss
        graph, static, loss, metrics = entry
        for k, v in batch.items():
            if isinstance(v, SharedPairs):
                for f in dataclasses.fields(v):
                    if isinstance(t := getattr(v, f.name), torch.Tensor):
                        getattr(static[k], f.name).copy_(t, non_blocking=True)
            elif k != "label_rows":  # every row, fixed by the shape: the static copy already holds it
                static[k].copy_(v, non_blocking=True)
        self._open_window(overwrites=key == self.owner)
        self.metrics = metrics
        graph.replay()
        self.replays += 1
        self.window_start = boundary
        return loss

    def _on_capture_stream(self, fn):
        """fn() on the stream that captures run on, ordered after and before the current stream's work. cuBLAS keeps
        a workspace per stream (tens of MB, from the caching allocator), so warming up where the graph is captured
        makes one, not a second inside the graph's pool."""
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = fn()
        main.wait_stream(self.stream)
        for t in [out, *self.metrics.values()]:
            if isinstance(t, torch.Tensor):
                t.record_stream(main)  # made on the side stream, read and freed on the current one
        return out

    @property
    def metrics(self) -> dict:
        """The objective's logged values of the last micro-batch ({} for a bare network)."""
        return getattr(self.module, "metrics", None) or {}

    @metrics.setter
    def metrics(self, value: dict):
        if self.module is not None and hasattr(self.module, "metrics"):
            self.module.metrics = value

    def _open_window(self, overwrites: bool):
        """Zero the gradients the last optimizer step consumed, unless the coming computation overwrites them."""
        if self.window_start and not overwrites:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)

    def _capture(self, batch: dict):
        if self.owner is not None:  # later graphs, or any under accumulation, add into gradients that must exist
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        static = {k: _clone_pairs(v) if isinstance(v, SharedPairs) else v.clone() for k, v in batch.items()}
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            loss = self.forward_backward(static).detach()
        self.pool = graph.pool()  # (capture records the gradient adds without running them: replays alone do)
        return graph, static, loss, dict(self.metrics)


def _clone_pairs(p: SharedPairs) -> SharedPairs:
    return dataclasses.replace(p, **{f.name: t.clone() for f in dataclasses.fields(p)
                                     if isinstance(t := getattr(p, f.name), torch.Tensor)})
