"""torchrun --nproc-per-node N -m emsedit_fast.distributed: data-parallel meta-training (emsedit_fast.parallel).

    torchrun --nproc-per-node 2 -m emsedit_fast.distributed --editor emsedit --mode batch --model tiny-llama \\
        --n-edits 8 --n-batches 40 --output runs/dp        (any option of `python -m emsedit_fast.train`)

Each rank trains on every W-th batch; gradients are averaged and normaliser statistics merged at every optimiser
step; rank 0 writes the checkpoint and results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import torch.distributed as dist

from emsedit_fast.cli import run_command


def main(argv: list[str] | None = None) -> int:
    from emsedit_fast.config import add_run_arguments

    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m emsedit_fast.distributed",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--train-data", help="'bundled' or a records file")
    parser.add_argument("--n-edits", type=int, help="edits per local batch (global batch: world size x this)")
    parser.add_argument("--n-batches", type=int, help="training batches in total, over all ranks")
    parser.add_argument("--output", help="run folder (rank 0 writes checkpoint/ and results.json)")
    parser.add_argument("--resume", help="a checkpoint folder to resume from (loaded on every rank)")
    parser.add_argument("--editor-device", help="device of the hypernetworks (default: the model's)")
    parser.add_argument("--dist-backend", choices=["gloo", "nccl"], help="default: nccl with CUDA, else gloo")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    return run_command(args, lambda a: _run(a, rank), level=logging.INFO if rank == 0 else logging.WARNING,
                       prefix=f"[rank {rank}] ")


def _run(args, rank: int) -> int:
    from emsedit_fast.config import config_from_args
    from emsedit_fast.parallel import train_data_parallel

    cfg = config_from_args(args)
    if args.output is None:
        cfg = dataclasses.replace(cfg, output=os.path.join("runs", f"{cfg.editor.name}-{cfg.train.mode}-dp"))
    try:
        _, trainer, results = train_data_parallel(cfg, editor_device=args.editor_device, resume=args.resume,
                                                  progress=False if args.no_progress else None,
                                                  backend=args.dist_backend)
        if rank == 0:
            print(f"trained {results['optimizer_batches_per_rank']} steps x {results['world_size']} ranks "
                  f"(global batch {results['global_batch_edits']} edits) in {results['seconds']:.1f} s; "
                  f"checkpoint {results['checkpoint']}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _exit_without_finalisation(code: int) -> None:
    """Flush and leave with os._exit. After destroy_process_group, gloo's worker threads can still own tensors
    whose destruction during interpreter finalisation needs the GIL; the process then aborts (SIGABRT, "terminate
    called without an active exception") although every result is already written, and torchrun reports the run as
    failed. Nothing is left to finalise at this point: the checkpoint and results.json are closed files."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_without_finalisation(main())
