"""attnopt under tensor parallelism and FSDP2 on the gloo backend (two spawned ranks): the op's DTensor
sharding rules (batch or heads sharded, grouped-query heads, a broadcast bias's gradient), and an
optimized model whose heads a ColwiseParallel/RowwiseParallel plan shards, or that fully_shard wraps,
giving the unsharded model's outputs and gradients."""

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import dtensor_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def test_sharded_op_and_parallel_models(tmp_path):
    mp.spawn(dtensor_workers.run_all, args=(2, str(tmp_path / "rendezvous")), nprocs=2)
