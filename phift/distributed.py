"""Processes: which rank this is, of how many, on which device; the DeepSpeed launcher's runs start here.

A multi-process run is started by the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
environment); torch.distributed then runs NCCL on GPUs and gloo on the CPU. Rank 0 alone writes and logs.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket

import torch


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def init_env():
    """A single process started without the launcher still needs the variables torch.distributed reads."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def start(deepspeed: bool, timeout_s: int = 1800) -> tuple[int, int, torch.device]:
    """(rank, world size, device). DeepSpeed runs start torch.distributed through DeepSpeed."""
    if deepspeed:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_env()
        import deepspeed as ds

        ds.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return (*rank_and_world(), device)


def stop():
    """Every rank waits for rank 0's last write, then the group goes before the interpreter does: a live gloo or
    shared-memory group at exit has aborted a finished run ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()


class MainRankOnly(logging.Filter):
    """Logs of rank 0 only (warnings and errors from every rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main() or record.levelno >= logging.WARNING


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging(level: int = logging.INFO):
    """phift's messages on stderr, one line each: rank 0's, and the warnings of every rank."""
    log = logging.getLogger("phift")
    if not any(isinstance(h.formatter, _Format) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(_Format("%(message)s"))
        handler.addFilter(MainRankOnly())
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
