"""bf16 runs aggregate the optimizer's fp32 masters, not the bf16 copies: FedAvg and the sequential
hand-over keep every bit of the fp32 adapters and write the rounded values to the model."""

import torch
from torch import nn

from _ranks import run_ranks
from splitlora_ds.comm import P2P
from splitlora_ds.federation.fedavg import FedAvg
from splitlora_ds.masters import adapter_masters
from splitlora_ds.modes import Split
from splitlora_ds.runtime import instructions as S
from splitlora_ds.runtime.executor import Executor, RoleParts
from splitlora_ds.topology import Groups, SingleRankMPU

TINY = 2.0 ** -12  # below bf16's resolution at 1.0 (2**-7): lost by any bf16 rounding


class Adapters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_A = nn.Linear(3, 2, bias=False)

    def adapter_parameters(self):
        return {"lora_A.weight": self.lora_A.weight}


def _runner(rank, ds_config):
    import deepspeed
    import torch.distributed as dist

    own = [dist.new_group([r]) for r in range(2)][rank]
    stage = Adapters()
    engine, *_ = deepspeed.initialize(model=stage, model_parameters=list(stage.parameters()), config=ds_config,
                                      mpu=SingleRankMPU(own, rank))
    mode = Split(2, 1)
    groups = Groups(dist.group.WORLD, own)
    return Executor(RoleParts(mode.role_of(rank), mode, mode.schedule(1, 1), stage, engine, P2P(torch.device("cpu")),
                              groups, clients=2, aggregator=FedAvg(0.5, groups.clients, torch.device("cpu"))))


BF16 = {"train_batch_size": 1, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}


def _aggregate_and_hand_over(rank):
    """FedAvg of two clients, then client 0 hands its adapters to client 1 (one spawn, two checks)."""
    runner = _runner(rank, BF16)
    master, param = runner.masters["lora_A.weight"], runner.stage.lora_A.weight
    assert master.dtype == torch.float32 and param.dtype == torch.bfloat16
    with torch.no_grad():
        master.fill_(1.0 + (rank + 1) * TINY)  # client values the bf16 copies cannot hold
    runner._average_adapters(S.AverageAdapters())
    averaged = master.detach().clone(), param.detach().clone()
    if rank == 0:
        with torch.no_grad():
            master.copy_(torch.arange(6.0).view(2, 3) * TINY + 1.0)
        runner._send_adapters(S.SendAdapters(1))
    else:
        runner._recv_adapters(S.RecvAdapters(0))
    return averaged, (master.detach().clone(), param.detach().clone())


def test_fedavg_and_hand_over_carry_the_fp32_masters():
    (avg0, sent), (avg1, (received, param)) = run_ranks(2, _aggregate_and_hand_over)
    expected = torch.full((2, 3), 1.0 + 1.5 * TINY)  # 0.5 (1 + TINY) + 0.5 (1 + 2 TINY), exact in fp32
    for master, bf16 in (avg0, avg1):
        assert torch.equal(master, expected)
        assert torch.equal(bf16, expected.to(torch.bfloat16))
    assert torch.equal(received, sent[0])  # the sequential hand-over: every fp32 bit arrives
    assert torch.equal(param, sent[0].to(torch.bfloat16))


def test_fp32_parameters_are_their_own_masters():
    params = {"w": nn.Parameter(torch.ones(2))}
    opt = torch.optim.SGD(params.values(), lr=0.1)
    assert adapter_masters(opt, params)["w"] is params["w"]
