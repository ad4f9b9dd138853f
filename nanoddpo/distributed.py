"""
Data parallelism for train.py under torchrun, in one place: who am I, what is my slice, and the three collectives a
DDPO epoch needs (agree on the run's name, gather the rewards, average the gradients).

    torchrun --nproc_per_node=8 train.py --preset sd14

Every rank draws the whole epoch's prompts and seeds and samples its own slice; the rewards are gathered so that every
rank computes the same advantages; the gradients of exactly the trained parameters are averaged before each optimizer
step. Alone, a process is rank 0 of a world of 1 and nothing is communicated.
"""
import os

import torch
import torch.distributed as dist


class Ranks:
    """This process's place in the world (rank, world size, its device) and the collectives train.py calls."""

    def __init__(self):
        self.distributed = "RANK" in os.environ
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"

    def use_device(self, device):
        """The torch.device this process runs on: `device`, or for "auto" its own GPU (cuda:LOCAL_RANK), else the CPU.
        A GPU is made current, so that kernels and bare "cuda" tensors land on it, not on cuda:0."""
        device = torch.device(self.device if device == "auto" else device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def log(self, *args, **kw):
        if self.rank == 0:
            print(*args, **kw)

    def agree(self, value):
        """Rank 0's value on every rank (e.g. the run's name, which contains the time)."""
        values = [value]
        if self.distributed:
            dist.broadcast_object_list(values, src=0)
        return values[0]

    def mine(self, x):
        """x (batches, world, batch, ...) drawn for all ranks -> this rank's (batches * batch, ...)."""
        return x[:, self.rank].reshape(-1, *x.shape[3:])

    def gather(self, local, batches):
        """This rank's (batches * batch,) rewards -> every rank's, flat in the order (batches, world, batch)."""
        x = torch.as_tensor(local).view(batches, 1, -1)
        if self.distributed:
            x = x.to(self.device)
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x)
            x = torch.cat(parts, dim=1).cpu()
        return x.flatten().numpy()

    def average_gradients(self, params):
        if self.distributed:
            for p in params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()
