"""Distributed setup and FSDP2 sharding.

- :func:`init_distributed`: one process per device under ``torchrun``; NCCL (+ gloo for CPU
  tensors) on CUDA, gloo on CPU. Works without torchrun too (a world of one).
- :func:`build_mesh`: a 1-D ``("shard",)`` mesh (FSDP), or with ``1 < fsdp_size < world`` a
  2-D ``("replicate", "shard")`` mesh (HSDP: shard within groups of ``fsdp_size`` ranks,
  replicate across groups).
- :func:`shard`: ``fully_shard`` on every decoder layer, then on the root module, which owns
  whatever is left (embeddings, final norm, lm_head, algorithm parameters). The root's
  parameters are gathered only inside the ROOT's forward, so everything that touches them
  (the student body AND the loss on the lm_head) must run inside that one forward.
- :func:`mixed_precision`: bf16 compute with fp32 master weights and fp32 gradient
  reduction on GPU always, on CPU only when ``bf16`` is set; plain fp32 otherwise.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from kubedistill.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join (or create) the default process group; returns this process's place in it."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got '{device}'")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available")
    if "RANK" not in os.environ:  # a world of one, without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mesh(env: DistEnv, fsdp_size: int = -1) -> DeviceMesh:
    world = env.world_size
    if fsdp_size <= 0 or fsdp_size >= world:
        return init_device_mesh(env.device.type, (world,), mesh_dim_names=("shard",))
    if world % fsdp_size:
        raise ConfigError(f"fsdp_size {fsdp_size} must divide the world size {world}")
    return init_device_mesh(env.device.type, (world // fsdp_size, fsdp_size),
                            mesh_dim_names=("replicate", "shard"))


def mixed_precision(env: DistEnv, bf16: bool) -> MixedPrecisionPolicy | None:
    if env.device.type == "cuda" or bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard(root: nn.Module, layers: Iterable[nn.Module], mesh: DeviceMesh,
          mp: MixedPrecisionPolicy | None, cpu_offload: bool = False) -> nn.Module:
    """``fully_shard`` each of ``layers`` and then ``root`` (in place); returns ``root``.

    The root does not cast its forward inputs (teacher states keep their dtype) and keeps
    its parameters gathered after forward, since backward needs them right away.
    ``cpu_offload`` (KDFlow's flag): ``CPUOffloadPolicy(pin_memory=True)`` keeps parameter
    shards, gradients and AdamW state in pinned CPU memory and the optimizer step on the
    CPU; CUDA only (on a CPU mesh there is nothing to offload, and FSDP2 refuses it).
    """
    offload: dict = {}
    if cpu_offload:
        if mesh.device_type != "cuda":
            raise ConfigError("cpu_offload needs CUDA: it moves FSDP2 parameter shards and "
                              "optimizer state off the GPU, and CPU training already keeps "
                              "them in CPU memory; drop --cpu_offload")
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = {"offload_policy": CPUOffloadPolicy(pin_memory=True)}
    layer_kw = {"mesh": mesh, **offload} | ({"mp_policy": mp} if mp else {})
    for layer in layers:
        fully_shard(layer, **layer_kw)
    root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=False) if mp else None
    fully_shard(root, mesh=mesh, reshard_after_forward=False, **offload,
                **({"mp_policy": root_mp} if root_mp else {}))
    return root


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a list of numbers over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU on rank 0 ({} elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
