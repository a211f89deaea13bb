"""Weight broadcast from learner rank 0 to the generators' workers over a torch.distributed
process group of its own (NCCL between GPUs, gloo between CPUs), apart from the learners'
default group and from whatever group vLLM sets up inside its workers.

Rank 0 of the group (learner rank 0) hosts its TCPStore on a port the OS picks; every member
joins with (host, port, rank, world_size). The weights travel flattened, one dtype per bucket
of at most `bucket_bytes`, in the order of `meta` (name, shape, dtype), which every member is
given beforehand.
"""
from __future__ import annotations

import datetime
import math
import socket

import torch
import torch.distributed as dist

Meta = list[tuple[str, tuple[int, ...], str]]   # (name, shape, dtype name) per tensor, in sending order


def node_ip() -> str:
    """This node's address as Ray knows it (127.0.0.1 on a loopback-only test machine)."""
    import ray
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return socket.gethostbyname(socket.gethostname())


def weights_meta(state_dict: dict[str, torch.Tensor]) -> Meta:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]


def open_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store, on a free port (store.port)."""
    return dist.TCPStore(node_ip(), 0, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_group(store_or_host, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
    """-> a process group of its own (not the default one). Blocks until every member has joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = store_or_host if isinstance(store_or_host, dist.TCPStore) else \
        dist.TCPStore(store_or_host, port, world_size, is_master=False, timeout=timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=node_ip())]   # this node's address, as Ray's
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


def _buckets(meta: Meta, bucket_bytes: int) -> list[list[int]]:
    """Consecutive tensors of one dtype, at most bucket_bytes each (a larger tensor is alone)."""
    out, cur, size, dtype = [], [], 0, None
    for i, (_, shape, dt) in enumerate(meta):
        nbytes = math.prod(shape) * getattr(torch, dt).itemsize
        if cur and (dt != dtype or size + nbytes > bucket_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size, dtype = size + nbytes, dt
    if cur:
        out.append(cur)
    return out


def meta_mb(meta: Meta) -> float:
    return sum(math.prod(shape) * getattr(torch, dt).itemsize for _, shape, dt in meta) / 2**20


def broadcast_weights(pg, meta: Meta, state_dict: dict[str, torch.Tensor] | None, device: torch.device,
                      bucket_bytes: int) -> dict[str, torch.Tensor]:
    """Rank 0 sends `state_dict`; the others pass None and get the tensors back (on `device`)."""
    out: dict[str, torch.Tensor] = {}
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    for bucket in _buckets(meta, bucket_bytes):
        dtype = getattr(torch, meta[bucket[0]][2])
        sizes = [math.prod(meta[i][1]) for i in bucket]
        if state_dict is not None:
            flat = torch.cat([state_dict[meta[i][0]].reshape(-1).to(device=device, dtype=dtype) for i in bucket])
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        pg.broadcast([flat], opts).wait()
        for i, part in zip(bucket, flat.split(sizes)):
            out[meta[i][0]] = part.view(meta[i][1])
    return out
