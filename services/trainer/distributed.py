"""Data-parallel training: run a recipe in `spec.distributed.num_processes` processes.

    train_distributed(request)     one machine: rank 0 runs in the calling process (so the
                                   worker's callbacks - metrics, checkpoint uploads, stop
                                   requests - work unchanged), ranks 1..N-1 are spawned
                                   processes; gloo on CPU, NCCL on CUDA (one GPU per rank).
    python -m services.trainer.distributed --spec spec.json --train train.jsonl --out DIR
                                   one process of a torchrun / accelerate launch job, e.g. over
                                   several machines (README "Distributed training"): the
                                   rendezvous comes from the environment (MASTER_ADDR,
                                   MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK).

Every process runs the spec's recipe (`recipes.train`; the JobSpec allows several processes for
the SFT recipe only); it finds the process group, takes its shard of each global batch and wraps
the model the way `spec.distributed.strategy` says: DDP, or FSDP2 (parameters, gradients and
optimizer state sharded over the ranks; gloo on CPU works too). See recipes/sft.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmstudio.jobspec import JobSpec

from .methods import UnsupportedOnHardware
from .recipes import TrainRequest, TrainResult, train

# A rank that dies leaves the others blocked in a collective; they give up after this.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def check_distributed(spec: JobSpec) -> None:
    """Raise UnsupportedOnHardware if this machine cannot run the spec's process layout."""
    n = spec.distributed.num_processes
    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise UnsupportedOnHardware(
            f"distributed.num_processes={n} needs {n} GPUs on this worker, it has "
            f"{torch.cuda.device_count()} (multi-node: launch with torchrun, see README)"
        )


def train_distributed(request: TrainRequest) -> TrainResult:
    """`recipes.train(request)` over `spec.distributed.num_processes` local processes (just
    that for one). The callbacks run in this process (rank 0); returns rank 0's result; raises
    if any rank fails."""
    spec = request.spec
    n = spec.distributed.num_processes
    if n == 1:
        return train(request)
    check_distributed(spec)
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already running in this process")
    addr, port = "127.0.0.1", _free_port()
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch / thread state
    # the other ranks get the data, not the callbacks (rank 0 alone reports and checkpoints)
    inputs = {"rows": request.rows, "out_dir": request.out_dir, "eval_rows": request.eval_rows,
              "resume_from": request.resume_from}
    children = [
        ctx.Process(
            target=_spawned_rank,
            args=(rank, n, addr, port, spec.model_dump_json(), inputs, torch.get_num_threads()),
            daemon=True,
        )
        for rank in range(1, n)
    ]
    for p in children:
        p.start()
    try:
        _init(0, n, addr, port)
        result = train(request)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for p in children:
            p.join(timeout=COLLECTIVE_TIMEOUT.total_seconds())
            if p.is_alive():
                p.kill()
    failed = [(rank, p.exitcode) for rank, p in enumerate(children, 1) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"distributed training: rank(s) failed with exit codes {failed}")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, addr: str, port: int) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
        world_size=world, timeout=COLLECTIVE_TIMEOUT,
    )


def _spawned_rank(rank: int, world: int, addr: str, port: int, spec_json: str, inputs: dict,
                  threads: int) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # parallel.pick_device -> cuda:<rank>
    torch.set_num_threads(threads)
    _init(rank, world, addr, port)
    try:
        train(TrainRequest(JobSpec.model_validate_json(spec_json), **inputs))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# one process of a torchrun / accelerate launch job


def main(argv: list[str] | None = None) -> int:
    from llmstudio.jsonl import parse_jsonl

    ap = argparse.ArgumentParser(prog="python -m services.trainer.distributed",
                                 description="one process of a multi-process training job")
    ap.add_argument("--spec", required=True, help="job spec (JSON or YAML file)")
    ap.add_argument("--train", required=True, help="training rows (JSONL)")
    ap.add_argument("--eval", help="validation rows (JSONL) for eval_every / early_stopping")
    ap.add_argument("--out", required=True, help="checkpoint directory (rank 0 writes)")
    ap.add_argument("--resume", help="checkpoint directory to resume from")
    args = ap.parse_args(argv)

    text = Path(args.spec).read_text()
    if args.spec.endswith((".yaml", ".yml")):
        import yaml

        spec = JobSpec.model_validate(yaml.safe_load(text))
    else:
        spec = JobSpec.model_validate_json(text)

    def rows(path: str | None) -> list[dict] | None:
        return parse_jsonl(Path(path).read_bytes(), path) if path else None

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)  # env://
    try:
        main_rank = dist.get_rank() == 0
        request = TrainRequest(spec, rows(args.train) or [], Path(args.out),
                               eval_rows=rows(args.eval),
                               resume_from=Path(args.resume) if args.resume else None)
        if main_rank:
            request.on_metrics = lambda m: print(json.dumps(m), flush=True)
        result = train(request)
        if main_rank:
            print(json.dumps({"steps": result.steps, "final_loss": result.final_loss,
                              "checkpoint": str(result.adapter_dir),
                              "stop_reason": result.stop_reason}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
