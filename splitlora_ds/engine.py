"""Executes a role's instruction list (see schedule.py) on its stage, one step at a time.

Each rank wraps its stage in its own DeepSpeed engine (optimizer, LR schedule, clipping and
precision come from the ds_config), whose data-parallel world is the rank alone; FedAvg across
clients is ours, every I steps. The server runs all clients' activations as one batch: a leaf
tensor per client, padded to the longest sequence and concatenated. The step's loss is the mean
over every client's tokens (what the server's adapters train on); each client gets back the
gradient of its own mean token loss (the split-federated convention), so with FedAvg weights
n_c / n the averaged client update is the centralized one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import schedule as S
from .federation.fedavg import allreduce_weighted_average_, broadcast_, flat_nbytes
from .comm import P2P
from .failures import PeerLost, wait_on
from .federation.secure import SecureAggregator
from .privacy.dp import ClientPrivacy
from .masters import adapter_masters, copy_masters_to_params_
from .federation.exchange import exchange_
from .hetero.importance import ImportanceTracker
from .stage import SharedBlockGrad, Stage
from .timing import InstructionClock
from .topology import Groups, Role, Topology


# Called after every instruction with (step, instruction, runner): for tracing, profiling and
# tests that need to see adapters between an optimizer step and an averaging.
Observer = Callable[[int, "S.Instruction", "StageRunner"], None]


@dataclass
class Exchange:
    """Heterogeneous aggregation for this participant (see hetero.exchange): which of its modules
    take part, each one's weight, the method, and the group of every participant."""

    modules: set[str]
    weights: dict[str, float]
    method: str
    group: Optional[dist.ProcessGroup]


@dataclass
class GradClip:
    """Clipping by the global gradient norm (train.clip_scope: global): the threshold, this rank's
    weight in the squared norm (a client's FedAvg weight: client copies are averaged, so each
    counts as its share of the global model; server stages 1), and a process group per set of
    ranks that clip together (ClipGradients.ranks)."""

    max_norm: float
    weight: float
    groups: dict[tuple[int, ...], Optional[dist.ProcessGroup]]


# What torch and DeepSpeed add to the norm before dividing (clip_grad_norm_).
_CLIP_EPS = 1e-6


@dataclass
class StepStats:
    step: int
    seconds: float = 0.0
    loss: Optional[float] = None  # mean token loss over every client's tokens (last stage only)
    tokens: int = 0
    client_loss: list[float] = field(default_factory=list)
    client_tokens: list[int] = field(default_factory=list)
    lr: float = 0.0
    averaged: bool = False
    loss_sum: float = 0.0
    # Seconds per instruction kind: what the rank computed and what it spent sending or waiting.
    seconds_by: dict[str, float] = field(default_factory=dict)
    positions: int = 0  # batch rows x (padded) sequence length this rank ran forward
    grad_norm: Optional[float] = None  # the global gradient norm before clipping (ClipGradients)

    @property
    def compute_seconds(self) -> float:
        return sum(v for k, v in self.seconds_by.items() if k in _COMPUTE)


_COMPUTE = ("Forward", "ComputeLoss", "Backward", "OptimizerStep")


@dataclass
class EvalStats:
    """Token-weighted validation loss over every client's validation data."""

    loss_sum: float = 0.0
    tokens: int = 0
    client_loss_sum: list[float] = field(default_factory=list)
    client_tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, step: StepStats) -> None:
        self.loss_sum += step.loss_sum
        self.tokens += step.tokens
        if not self.client_tokens:
            self.client_loss_sum = [0.0] * len(step.client_tokens)
            self.client_tokens = [0] * len(step.client_tokens)
        for c, (loss, tokens) in enumerate(zip(step.client_loss, step.client_tokens)):
            self.client_loss_sum[c] += loss * tokens
            self.client_tokens[c] += tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def client_loss(self) -> list[float]:
        return [s / max(t, 1) for s, t in zip(self.client_loss_sum, self.client_tokens)]


class StageRunner:
    def __init__(self, role: Role, schedule: S.Schedule, stage: Stage, engine, p2p: P2P,
                 groups: Optional[Groups], batches: Optional[Iterator[dict]] = None,
                 fedavg_weight: float = 1.0, observers: Sequence[Observer] = (),
                 label_smoothing: float = 0.0, entry_layers: Optional[Sequence[int]] = None,
                 exchange: Optional[Exchange] = None, importance: Optional[ImportanceTracker] = None,
                 client_weights: Sequence[float] = (), clip: Optional[GradClip] = None,
                 secure: Optional[SecureAggregator] = None, privacy: Optional[ClientPrivacy] = None):
        self.role = role
        self.schedule = schedule
        self.topology: Topology = schedule.topology
        self.stage = stage
        self.engine = engine
        self.p2p = p2p
        self.groups = groups
        self.batches = batches
        self.fedavg_weight = fedavg_weight
        self.observers = list(observers)
        self.label_smoothing = label_smoothing
        # Heterogeneous split points: the layer each client's activations enter server stage 0 at.
        self.entry_layers = list(entry_layers) if entry_layers is not None else None
        # Every client's FedAvg weight (server stage 0 of a heterogeneous run weighs shared blocks by them).
        self.client_weights = list(client_weights)
        self.clip = clip
        self.secure = secure  # federation.secure_aggregation: FedAvg through pairwise masks
        self.privacy = privacy  # a client's DP mechanisms (privacy.*), None when off
        # What aggregation reads and writes: the optimizer's fp32 copies in bf16 runs.
        self.masters = adapter_masters(engine.optimizer, stage.adapter_parameters()) if engine is not None else {}
        self.exchange = exchange
        self.importance = importance
        self.training = True
        self.eval_batches: Optional[Iterator[dict]] = None
        self.device = p2p.device
        self.clock = InstructionClock(self.device)
        self._handlers = {
            S.LoadBatch: self._load_batch,
            S.LoadEvalBatch: self._load_eval_batch,
            S.Forward: self._forward,
            S.SendActivations: self._send_activations,
            S.RecvActivations: self._recv_activations,
            S.ComputeLoss: self._compute_loss,
            S.Backward: self._backward,
            S.SendGrads: self._send_grads,
            S.RecvGrads: self._recv_grads,
            S.ClipGradients: self._clip_gradients,
            S.OptimizerStep: self._optimizer_step,
            S.AverageAdapters: self._average_adapters,
            S.ReduceLossStats: self._reduce_loss_stats,
            S.SendAdapters: self._send_adapters,
            S.RecvAdapters: self._recv_adapters,
            S.ShareAdapters: self._share_adapters,
            S.TurnBarrier: self._turn_barrier,
        }

    # ------------------------------------------------------------------ driver
    def train_step(self, step: int) -> StepStats:
        self._reset()
        self.stats = StepStats(step)
        t0 = t = self.clock.now()
        for instruction in self.schedule.train(self.role, step):
            self._execute(instruction, step)
            kind = type(instruction).__name__
            done = self.clock.now()
            self.stats.seconds_by[kind] = self.stats.seconds_by.get(kind, 0.0) + done - t
            for observe in self.observers:
                observe(step, instruction, self)
            t = self.clock.now() if self.observers else done  # observers' time is nobody's instruction
        self.stats.seconds = t - t0
        return self.stats

    @torch.no_grad()
    def evaluate(self, batches: Sequence[dict], num_batches: int, step: int = -1) -> Optional[EvalStats]:
        """One pass over validation data after step `step`: every client sends `num_batches`
        batches (empty ones once its own shard is exhausted); the last stage returns the
        token-weighted loss."""
        # comm/ counts training traffic: what evaluation sends is left out of the byte counters.
        traffic = self.p2p.bytes_sent, self.p2p.bytes_received
        for instruction in self.schedule.before_eval(self.role, step):
            self._execute(instruction, step)
        self.engine.eval()
        self.training = False
        empty = {"input_ids": torch.zeros(0, 1, dtype=torch.long),
                 "attention_mask": torch.zeros(0, 1, dtype=torch.long),
                 "labels": torch.full((0, 1), -100, dtype=torch.long)}
        self.eval_batches = iter(list(batches)[:num_batches] + [empty] * max(0, num_batches - len(batches)))
        result = EvalStats() if self._computes_loss() else None
        t0 = self.clock.now()
        try:
            for _ in range(num_batches):
                self._reset()
                self.stats = StepStats(-1)
                for instruction in self.schedule.eval(self.role):
                    self._execute(instruction, step)
                if result is not None:
                    result.add(self.stats)
        finally:
            self.engine.train()
            self.training = True
            self.eval_batches = None
            self.p2p.bytes_sent, self.p2p.bytes_received = traffic
        if result is not None and self._whole_model_client():
            # fedlora: each client scored its own shard; the job-wide figure sums them all.
            sums, tokens = self._sum_over_clients(result.loss_sum, result.tokens)
            result.loss_sum, result.tokens = float(sum(sums)), int(sum(tokens))
            result.client_loss_sum, result.client_tokens = sums, tokens
        if result is not None:
            result.seconds = self.clock.now() - t0
        return result

    def _execute(self, instruction: S.Instruction, step: int) -> None:
        """Run one instruction; a failed exchange with a peer becomes PeerLost naming the peer,
        the step and the instruction (errors of instructions that talk to nobody propagate)."""
        try:
            self._handlers[type(instruction)](instruction)
        except PeerLost as e:
            e.step, e.during = step, type(instruction).__name__
            raise
        except RuntimeError as e:
            peers = self.schedule.peers(instruction, self.role.rank)
            if not peers:
                raise
            raise PeerLost(peers, e, step, type(instruction).__name__) from e

    def _computes_loss(self) -> bool:
        return (self.role.kind == "centralized" or self._whole_model_client()
                or (self.role.is_server and self.role.index == self.topology.server_stages - 1))

    def _whole_model_client(self) -> bool:
        """fedlora: a client that holds the whole model (no server stages)."""
        return self.role.is_client and self.schedule.mode == "fedlora"

    def _reset(self) -> None:
        self.x = self.mask = self.labels = self.sizes = self.row_entry = None
        self.client_targets = self.shared_grad = None
        self.output = self.loss = self.grad_output = None
        self.inputs: list[torch.Tensor] = []

    # ------------------------------------------------------------------ handlers
    def _load_batch(self, _: S.LoadBatch) -> None:
        self._use_batch(next(self.batches))

    def _use_batch(self, batch: dict) -> None:
        self.x = batch["input_ids"].to(self.device)
        self.mask = batch["attention_mask"].to(self.device)
        self.labels = batch["labels"].to(self.device)
        # Rows contributed by each client (centralized batches pool all clients in order).
        sizes = batch.get("client_sizes", [self.x.shape[0]])
        self.sizes = torch.tensor(sizes, dtype=torch.int64, device=self.device)

    def _load_eval_batch(self, _: S.LoadEvalBatch) -> None:
        self._use_batch(next(self.eval_batches))

    def _forward(self, _: S.Forward) -> None:
        if self.x.shape[0] == 0:
            # A client with no evaluation rows left sends an empty activation (attention kernels
            # reject zero-row batches, and there is nothing to compute).
            self.output = torch.zeros(0, self.x.shape[1], self.stage.hidden_size,
                                      dtype=self.stage.compute_dtype, device=self.device)
            return
        self.stats.positions += self.x.shape[0] * self.x.shape[1]
        if self._computes_loss():
            # The head projects only positions with a next-token target: logits [N, V].
            has_target = F.pad(self.labels[:, 1:] != -100, (0, 1), value=False)
            self.output = self.engine(self.x, self.mask, has_target.flatten().nonzero().squeeze(1),
                                      row_entry=self.row_entry,
                                      shared_grad=self.shared_grad if self.training else None)
        else:
            self.output = self.engine(self.x, self.mask, row_entry=self.row_entry,
                                      shared_grad=self.shared_grad if self.training else None)
            if self.privacy is not None:  # what leaves the client: clipped (and noised) per sample
                self.output = self.privacy.release(self.output, self.mask, self.training)

    def _send_activations(self, ins: S.SendActivations) -> None:
        self.p2p.send([self.output, self.mask, self.labels, self.sizes], ins.dst)

    def _recv_activations(self, ins: S.RecvActivations) -> None:
        bundles = self.p2p.recv_many(ins.srcs, self.stage.compute_dtype)
        longest = max(hidden.shape[1] for hidden, *_ in bundles)
        hs, masks, labels = [], [], []
        for hidden, mask, lab, _sizes in bundles:
            leaf = hidden.requires_grad_(True)
            self.inputs.append(leaf)
            pad = longest - hidden.shape[1]
            # Right padding: padded keys are masked out and padded labels ignored, so a
            # client's real tokens compute exactly what they would in its own batch.
            hs.append(F.pad(leaf, (0, 0, 0, pad)))
            masks.append(F.pad(mask, (0, pad), value=0))
            labels.append(F.pad(lab, (0, pad), value=-100))
        self.x = torch.cat(hs) if len(hs) > 1 else hs[0]
        self.mask = torch.cat(masks)
        self.labels = torch.cat(labels)
        self.sizes = torch.cat([b[3] for b in bundles])
        # Target tokens per source (each predicts the next token): the gradient each client gets
        # back is rescaled from the step's mean loss to its own (see _send_grads).
        self.client_targets = torch.stack([(lab[:, 1:] != -100).sum() for _h, _m, lab, _s in bundles])
        if self.entry_layers is not None and self.role.index == 0:
            # On the CPU: the stage reads row counts from it per layer (see Stage.forward).
            clients = [self.topology.role_of(src).index for src in ins.srcs]
            rows = torch.tensor([h.shape[0] for h, *_ in bundles])
            self.row_entry = torch.repeat_interleave(torch.tensor([self.entry_layers[c] for c in clients]), rows)
            if self.training:
                self.shared_grad = self._shared_block_grad(clients, rows)
        if self.role.index == 0 and len(ins.srcs) < self.topology.clients:
            # Serving some clients only (sequential): rows per client index, 0 for the others,
            # so the per-client figures downstream name the right client.
            sizes = torch.zeros(self.topology.clients, dtype=torch.int64, device=self.device)
            for src, (_h, _m, _l, rows) in zip(ins.srcs, bundles):
                sizes[src] = rows.sum()
            self.sizes = sizes

    def _shared_block_grad(self, clients: list[int], rows: torch.Tensor) -> SharedBlockGrad:
        """Row scales N w_c / N_c and block weights W_i for the shared blocks (see SharedBlockGrad)."""
        w = torch.tensor([self.client_weights[c] for c in clients], dtype=torch.float32, device=self.device)
        targets = self.client_targets.to(torch.float32)
        per_client = targets.sum() * w / targets.clamp(min=1)
        entry = [self.entry_layers[c] for c in clients]
        layer_weight = {int(i): sum(self.client_weights[c] for c, e in zip(clients, entry) if e <= int(i))
                        for i in self.stage.layers}
        return SharedBlockGrad(torch.repeat_interleave(per_client, rows.to(self.device)), layer_weight)

    def _compute_loss(self, _: S.ComputeLoss) -> None:
        valid = self.labels[:, 1:] != -100  # position t predicts token t + 1
        # Logits arrive for the target positions only ([N, V], see _forward), or for all ([B, T, V]).
        logits = self.output[:, :-1][valid] if self.output.dim() == 3 else self.output
        targets = self.labels[:, 1:][valid]
        smoothing = self.label_smoothing if self.training else 0.0  # eval/loss: plain cross-entropy
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=smoothing)
        row_loss = torch.zeros(valid.shape[0], dtype=token_loss.dtype, device=token_loss.device)
        row_loss.index_add_(0, valid.nonzero()[:, 0], token_loss.detach())
        row_tokens = valid.sum(dim=1)
        tokens = int(row_tokens.sum())
        self.loss = token_loss.sum() / max(tokens, 1)
        # Per-client figures for the client<i>/ tags.
        per_client_loss = torch.stack([r.sum() for r in row_loss.split(self.sizes.tolist())])
        per_client_tokens = torch.stack([r.sum() for r in row_tokens.split(self.sizes.tolist())])
        self.stats.loss = float(self.loss.detach())
        self.stats.loss_sum = float(row_loss.sum())
        self.stats.tokens = tokens
        self.stats.client_tokens = [int(t) for t in per_client_tokens]
        self.stats.client_loss = [float(l) / max(int(t), 1) for l, t in zip(per_client_loss, per_client_tokens)]

    def _backward(self, _: S.Backward) -> None:
        if self.loss is not None:
            self.engine.backward(self.loss)
        else:
            # d(sum(out * g))/d(params) = g^T d(out)/d(params): the chain rule across the cut.
            self.engine.backward((self.output * self.grad_output).sum())
        if self.importance is not None:
            self.importance.update(self.stage)  # gradients are complete until the optimizer step

    def _send_grads(self, ins: S.SendGrads) -> None:
        grads = [leaf.grad for leaf in self.inputs]
        if self.role.index == 0:
            # The loss is the mean over all N tokens of the step, so client c's slice holds N_c / N
            # times the gradient of its own mean loss; it gets the gradient of its own mean loss.
            scale = self.client_targets.sum() / self.client_targets.clamp(min=1)
            grads = [g * s.to(g.dtype) for g, s in zip(grads, scale)]
        works = [self.p2p.isend([grad], dst) for grad, dst in zip(grads, ins.dsts)]
        for dst_works, dst in zip(works, ins.dsts):
            wait_on(dst_works, dst)

    def _recv_grads(self, ins: S.RecvGrads) -> None:
        (self.grad_output,) = self.p2p.recv(ins.src, self.output.dtype)

    @torch.no_grad()
    def _clip_gradients(self, ins: S.ClipGradients) -> None:
        grads = [p.grad for p in self.stage.adapter_parameters().values() if p.grad is not None]
        local = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.device))
        total = (local.double() * self.clip.weight).reshape(1).to(self.p2p.staging)
        group = self.clip.groups[ins.ranks]
        if len(ins.ranks) > 1:
            dist.all_reduce(total, group=group)
        norm = float(total.sqrt())
        self.stats.grad_norm = norm
        coef = min(1.0, self.clip.max_norm / (norm + _CLIP_EPS))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)

    def _optimizer_step(self, _: S.OptimizerStep) -> None:
        # The rate this step applies (DeepSpeed's schedulers advance inside engine.step()).
        self.stats.lr = float(self.engine.optimizer.param_groups[0]["lr"])
        self.engine.step()

    def _reduce_loss_stats(self, _: S.ReduceLossStats) -> None:
        sums, tokens = self._sum_over_clients(self.stats.loss_sum, self.stats.tokens)
        self.stats.client_loss = [s / max(t, 1) for s, t in zip(sums, tokens)]
        self.stats.client_tokens = tokens
        self.stats.tokens = int(sum(tokens))
        self.stats.loss = float(sum(sums)) / max(self.stats.tokens, 1)

    def _sum_over_clients(self, loss_sum: float, tokens: int) -> tuple[list[float], list[int]]:
        """Every client's (loss sum, token count), gathered with one all-reduce."""
        c = self.topology.clients
        buf = torch.zeros(2 * c, dtype=torch.float64, device=self.p2p.staging)
        buf[self.role.index], buf[c + self.role.index] = loss_sum, tokens
        if c > 1:
            dist.all_reduce(buf, group=self.groups.clients)
        values = buf.tolist()
        return values[:c], [int(t) for t in values[c:]]

    def _average_adapters(self, _: S.AverageAdapters) -> None:
        if self.exchange is not None:
            ex = self.exchange
            nbytes = exchange_(self.stage, ex.weights, ex.modules, ex.method, ex.group, self.masters)
            if self.role.is_client:  # server stage 0 plays the aggregator: its copies do not travel
                self._count_aggregation_traffic(nbytes)
        else:
            masters = list(self.masters.values())
            if self.privacy is not None:
                self.privacy.before_aggregation_(masters, self.fedavg_weight)
            if self.secure is not None:
                nbytes = self.secure.weighted_sum_(masters, self.fedavg_weight, self.p2p.staging)
            else:
                allreduce_weighted_average_(masters, self.fedavg_weight, self.groups.clients, self.p2p.staging)
                nbytes = flat_nbytes(masters)
            self._count_aggregation_traffic(nbytes)
            if self.privacy is not None:
                self.privacy.after_aggregation(masters)
        self._masters_to_params()
        self.stats.averaged = True

    def _count_aggregation_traffic(self, nbytes: int) -> None:
        # Counted as a FedAvg server would see it, whatever the collective: each client uploads
        # its adapters and downloads the result at its own shapes.
        self.p2p.bytes_sent += nbytes
        self.p2p.bytes_received += nbytes
        self.p2p.adapter_bytes_sent += nbytes

    def _masters_to_params(self) -> None:
        # Aggregation wrote the optimizer's (fp32) masters; the model computes with the parameters.
        copy_masters_to_params_(self.masters, self.stage.adapter_parameters())

    def _send_adapters(self, ins: S.SendAdapters) -> None:
        masters = list(self.masters.values())
        self.p2p.send([_flatten_dense_tensors([m.detach() for m in masters])], ins.dst, exact=True)
        self.p2p.adapter_bytes_sent += flat_nbytes(masters)

    @torch.no_grad()
    def _recv_adapters(self, ins: S.RecvAdapters) -> None:
        masters = list(self.masters.values())
        (flat,) = self.p2p.recv(ins.src, masters[0].dtype)
        for m, t in zip(masters, _unflatten_dense_tensors(flat, masters)):
            m.copy_(t)
        self._masters_to_params()

    @torch.no_grad()
    def _share_adapters(self, ins: S.ShareAdapters) -> None:
        # Not counted in comm/: vanilla split learning would evaluate on the last client; the
        # broadcast only lets every client's validation shard be scored with that model.
        masters = list(self.masters.values())
        broadcast_(masters, ins.src, self.groups.clients, self.p2p.staging)
        self._masters_to_params()

    def _turn_barrier(self, _: S.TurnBarrier) -> None:
        dist.barrier(group=self.groups.clients)
