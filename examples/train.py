"""A small real training job for a claim: an MLP learns a hidden linear rule on every GPU the
claim got (DDP over NCCL), fed by DataLoader workers through /dev/shm; on CPU without a GPU.
It is sent as `python -c <this file>`, so it must fit one command item (4096 characters)."""
import os
import time

# Ask NVML, not CUDA, how many GPUs there are: CUDA used before the fork below breaks the children.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

EPOCHS = int(os.environ.get("EPOCHS", "5"))
BATCH, WORKERS, FEATURES = 1024, 4, 64


def dataset(n=400_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.randn(FEATURES, generator=g)
    return TensorDataset(x, (x @ w > 0).long())


def train(rank, world):
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if world > 1:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world)
    data = dataset()
    sampler = DistributedSampler(data) if world > 1 else None
    # Workers hand batches over in /dev/shm: Docker's 64 MiB would end in "Bus error".
    loader = DataLoader(data, BATCH, shuffle=sampler is None, sampler=sampler, num_workers=WORKERS,
                        pin_memory=cuda, persistent_workers=True)
    model = nn.Sequential(nn.Linear(FEATURES, 512), nn.ReLU(), nn.Linear(512, 2)).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for epoch in range(EPOCHS):
        if sampler:
            sampler.set_epoch(epoch)
        started, seen, right, total = time.time(), 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
            right += (out.argmax(1) == y).sum().item()
            total += loss.item() * len(y)
        if rank == 0:
            rate = seen * world / (time.time() - started)
            print(f"epoch {epoch + 1}/{EPOCHS} loss {total / seen:.4f} accuracy {right / seen:.3f} "
                  f"{rate:.0f} samples/s on {world} {device.type}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    world = max(1, torch.cuda.device_count())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if world == 1:
        train(0, 1)
    else:
        mp.start_processes(train, args=(world,), nprocs=world, start_method="fork")
    print("training done", flush=True)
