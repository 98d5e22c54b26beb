"""A torchrun worker whose rank 1 is killed (SIGKILL, as the kernel's OOM killer does) after joining the group."""

import os
import signal

import torch.distributed as dist

from pipeline.train.distributed import init_process_group

init_process_group("cpu")
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
dist.barrier()
dist.destroy_process_group()
