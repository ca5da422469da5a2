"""Runs a role's instructions (runtime/schedules.py) on its stage, one step at a time.

Each rank wraps its stage in its own DeepSpeed engine (optimizer, LR schedule, clipping and
precision come from the ds_config), whose data-parallel world is the rank alone; FedAvg across
clients is ours, every I steps. Instructions address micro-batch buffers by id (`MicroBatch`);
the step's batch is split into M of them and packed (runtime/packing.py). Server stage 0 packs
micro-batch m of every client it serves into one batch.

The step's loss is the mean over every client's tokens of the whole step (what the server's
adapters train on): each micro-batch's token-loss sum is divided by the step's token count N,
which the clients know before they split their batch and send along with every micro-batch.
Each client gets back the gradient of its own mean token loss (the split-federated convention),
so with FedAvg weights n_c / n the averaged client update is the centralized one.

U-shaped split (split.client_tail_layers): each client computes its own mean token loss L_c on
its tail and the server's layers train on sum_c w_c L_c (w_c: the FedAvg weight, known to every
rank from the sample counts), so no token count, target or id ever travels. The last server
stage hands each client the output at its own positions (in its own order) and scales the
gradient each client returns by w_c; server stage 0 divides it out again, so each client's
bottom gets the gradient of its own L_c, as in the standard split.

Nothing in a step makes the host wait for the device before the step's end, so compute overlaps
communication on a GPU: the bookkeeping (segment ids, targets, owners, token counts, packing plans,
score indices) lives on the host, where the data loader and the wire deliver it, and goes to the
device with queued copies; the step's figures (loss sums, the gradient norm) stay on the device
until StepStats.finish reads them; the clock records CUDA events (timing.py); under NCCL the
wire's headers and integer tensors travel on a host-side gloo channel (comm.py), so a receive
never reads device memory. What still waits is DeepSpeed's own engine clipping (clip_scope role,
centralized). tests/test_host_sync.py counts every wait.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..comm import P2P
from ..failures import PeerLost, is_peer_failure, note_where, wait_on
from ..federation.fedavg import broadcast_, flat_nbytes
from ..hetero.importance import ImportanceTracker
from ..federation.pool import ClientPool
from ..masters import adapter_masters, copy_masters_to_params_, reset_optimizer_state_
from ..modes import Mode
from ..privacy.dp import ClientPrivacy
from ..stage import SharedBlockGrad, Stage
from ..timing import instruction_clock
from ..topology import Groups, Role
from . import instructions as I
from .buffers import MicroBatch
from .loss import IGNORE, token_loss
from ..config import DEFAULT_PACK_LENGTH
from .packing import PackPlan, next_token_targets, sample_ids
from .schedules import Schedule
from .stats import EvalStats, StepStats
from .wire import Activations

# Called after every instruction with (step, instruction, executor): for tracing, profiling and
# tests that need to see adapters between an optimizer step and an averaging.
Observer = Callable[[int, I.Instruction, "Executor"], None]

# What torch and DeepSpeed add to the norm before dividing (clip_grad_norm_).
_CLIP_EPS = 1e-6


@dataclass
class GradClip:
    """Clipping by the global gradient norm (train.clip_scope: global): the threshold, this rank's
    weight in the squared norm (a client's FedAvg weight: client copies are averaged, so each
    counts as its share of the global model; server stages 1), and a process group per set of
    ranks that clip together (ClipGradients.ranks)."""

    max_norm: float
    weight: float
    groups: dict[tuple[int, ...], Optional[dist.ProcessGroup]]


@dataclass(frozen=True)
class Packing:
    """train.pack / train.pack_length: pack rows instead of padding them to the longest."""

    enabled: bool = True
    length: Optional[int] = DEFAULT_PACK_LENGTH

    def plan(self, masks: Sequence[torch.Tensor], groups: Optional[Sequence[int]] = None) -> PackPlan:
        return PackPlan.build(masks, self.length, groups) if self.enabled else PackPlan.padded(masks, groups)


@dataclass
class Hetero:
    """Heterogeneous split points at server stage 0: the layer each client's activations enter at,
    and every client's FedAvg weight (shared blocks weigh rows by them; see SharedBlockGrad)."""

    entry_layers: list[int]
    client_weights: list[float]


@dataclass
class RoleParts:
    """What one rank's executor works with."""

    role: Role
    mode: Mode
    schedule: Schedule
    stage: Stage
    engine: Any  # the DeepSpeed engine around `stage`
    p2p: P2P
    groups: Optional[Groups]
    clients: int  # data owners: the length of per-client figures
    batches: Optional[Iterator[dict]] = None
    packing: Packing = field(default_factory=Packing)
    label_smoothing: float = 0.0
    aggregator: Any = None  # federation strategy (aggregate_(masters) -> bytes), None: no aggregation
    hetero: Optional[Hetero] = None
    clip: Optional[GradClip] = None
    importance: Optional[ImportanceTracker] = None
    privacy: Optional[ClientPrivacy] = None  # a client's DP mechanisms (privacy.*), None when off
    # every client's FedAvg weight: a U-shaped split's server weighs each client's loss by it
    client_weights: Sequence[float] = ()
    # logical clients: the clients this client rank may serve (None: it is one client, always);
    # its aggregator then sums the ranks' weighted round sums (weight 1)
    pool: Optional[ClientPool] = None
    observers: Sequence[Observer] = ()


class Executor:
    def __init__(self, parts: RoleParts):
        self.parts = parts
        self.role, self.mode, self.schedule = parts.role, parts.mode, parts.schedule
        self.topology = parts.schedule.topology
        self.stage, self.engine, self.p2p = parts.stage, parts.engine, parts.p2p
        self.device = parts.p2p.device
        self.clock = instruction_clock(self.device)
        # What aggregation reads and writes: the optimizer's fp32 copies in bf16 runs.
        self.masters = adapter_masters(self.engine.optimizer, self.stage.adapter_parameters()) if self.engine else {}
        self.training = True
        self.computes_loss = parts.mode.computes_loss(parts.role)
        self.u_shaped = parts.mode.u_shaped
        self.holds_tail = self.u_shaped and parts.role.is_client  # the client runs its own tail and loss
        self.eval_batches: Optional[Iterator[dict]] = None
        self.buffers: dict[int, MicroBatch] = {}
        self.step_counts: Optional[torch.Tensor] = None  # [clients] target tokens of this step per client (host)
        self.pending: list[tuple[list, int]] = []  # sends in flight: (work handles, peer)
        self.stats = StepStats(-1)
        self.step = -1
        self._grads_ready = False
        self.batches = parts.batches  # the stream LoadBatch reads (a logical client's while it trains)
        # Logical clients: the last aggregate of this rank's class (each participation starts from it).
        self.global_masters: list[torch.Tensor] = []
        if parts.pool is not None and parts.role.is_client:
            self.global_masters = [m.detach().clone() for m in self.masters.values()]
        self._handlers = {
            I.LoadBatch: self._load_batch,
            I.LoadEvalBatch: self._load_eval_batch,
            I.Forward: self._forward,
            I.SendActivations: self._send_activations,
            I.RecvActivations: self._recv_activations,
            I.ComputeLoss: self._compute_loss,
            I.Backward: self._backward,
            I.SendGrads: self._send_grads,
            I.RecvGrads: self._recv_grads,
            I.SendTailActivations: self._send_tail_activations,
            I.RecvTailActivations: self._recv_tail_activations,
            I.TailForward: self._tail_forward,
            I.TailBackward: self._tail_backward,
            I.SendTailGrads: self._send_tail_grads,
            I.RecvTailGrads: self._recv_tail_grads,
            I.ClipGradients: self._clip_gradients,
            I.OptimizerStep: self._optimizer_step,
            I.AverageAdapters: self._average_adapters,
            I.ReduceLossStats: self._reduce_loss_stats,
            I.SendAdapters: self._send_adapters,
            I.RecvAdapters: self._recv_adapters,
            I.ShareAdapters: self._share_adapters,
            I.TurnBarrier: self._turn_barrier,
            I.BeginParticipation: self._begin_participation,
            I.EndParticipation: self._end_participation,
        }

    # ------------------------------------------------------------------ driver
    def train_step(self, step: int) -> StepStats:
        """Run the step's instructions. Nothing here waits for the device until the step's end:
        the clock marks instruction boundaries and the figures stay on the device; both are read
        once, at the end (see timing.py and StepStats.finish)."""
        self._reset(step)
        self.clock.start()
        for instruction in self.schedule.train(self.role, step):
            self._execute(instruction, step)
            self.clock.mark(type(instruction).__name__)
            if self.parts.observers:
                for observe in self.parts.observers:
                    observe(step, instruction, self)
                self.clock.mark(None)  # observers' time is nobody's instruction
        self._wait_sends(step)
        self.clock.mark("WaitSends")
        timings = self.clock.finish()
        self.stats.seconds, self.stats.seconds_by = timings.seconds, timings.by_label
        return self.stats.finish()

    @torch.no_grad()
    def evaluate(self, batches: Sequence[dict], num_batches: int, step: int = -1) -> Optional[EvalStats]:
        """One pass over validation data after step `step`: every client sends `num_batches`
        batches (empty ones once its own shard is exhausted); the loss's role returns the
        token-weighted loss."""
        # comm/ counts training traffic: what evaluation sends is left out of the byte counters.
        traffic = self.p2p.bytes_sent, self.p2p.bytes_received
        for instruction in self.schedule.before_eval(self.role, step):
            self._execute(instruction, step)
        self.engine.eval()
        self.training = False
        empty = {"input_ids": torch.zeros(0, 1, dtype=torch.long),
                 "attention_mask": torch.zeros(0, 1, dtype=torch.long),
                 "labels": torch.full((0, 1), IGNORE, dtype=torch.long)}
        self.eval_batches = iter(list(batches)[:num_batches] + [empty] * max(0, num_batches - len(batches)))
        result = EvalStats() if self.computes_loss else None
        self.clock.start()
        try:
            for _ in range(num_batches):
                self._reset(-1)
                for instruction in self.schedule.eval(self.role):
                    self._execute(instruction, step)
                self._wait_sends(step)
                if result is not None:
                    result.add(self.stats.finish())
        finally:
            self.engine.train()
            self.training = True
            self.eval_batches = None
            self.p2p.bytes_sent, self.p2p.bytes_received = traffic
        if result is not None and self.mode.loss_on_clients:
            # fedlora, U-shaped split: each client scored its own shard; the job-wide figure sums them all.
            summed = self._sum_over_clients(torch.tensor([*result.client_loss_sum, *result.client_tokens],
                                                         dtype=torch.float64)).tolist()
            c = len(result.client_tokens)
            sums, tokens = summed[:c], [int(t) for t in summed[c:]]
            result.loss_sum, result.tokens = float(sum(sums)), int(sum(tokens))
            result.client_loss_sum, result.client_tokens = sums, tokens
        if result is not None:
            self.clock.mark(None)
            result.seconds = self.clock.finish().seconds
        return result

    def _execute(self, instruction: I.Instruction, step: int) -> None:
        """Run one instruction. A backend, connection or timeout error of an exchange with a peer
        becomes PeerLost naming the peers, the step and the instruction; any other error (out of
        memory, a bad tensor, a bug) propagates as itself, noted with the step and instruction."""
        kind = type(instruction).__name__
        try:
            self._handlers[type(instruction)](instruction)
        except PeerLost as e:
            e.step, e.during = step, kind
            raise
        except Exception as e:
            peers = self.schedule.peers(instruction, self.role.rank)
            if peers and is_peer_failure(e):
                raise PeerLost(peers, e, step, kind) from e
            note_where(e, step, kind)
            raise

    def _wait_sends(self, step: int) -> None:
        """Sends start at once and are waited for here, at the end of the step: a rank never
        blocks on a send, so the pipeline's order of sends and receives cannot deadlock."""
        pending, self.pending = self.pending, []
        for works, peer in pending:
            try:
                wait_on(works, peer)
            except PeerLost as e:
                e.step, e.during = step, "sending"
                raise

    def _reset(self, step: int) -> None:
        self.step = step
        self.buffers = {}
        self.step_counts = None
        self.stats = StepStats(step)
        self._grads_ready = False

    # ------------------------------------------------------------------ loading
    def _load_batch(self, _: I.LoadBatch) -> None:
        self._use_batch(next(self.batches), self.schedule.micro_batches)

    def _load_eval_batch(self, _: I.LoadEvalBatch) -> None:
        self._use_batch(next(self.eval_batches), 1)

    def _use_batch(self, batch: dict, micro_batches: int) -> None:
        """Split the batch's rows into micro-batch buffers 0..M-1, each packed on its own. The
        loader's batches are on the host: targets, owners, the step's token counts and the packing
        are worked out there, before anything moves to the device."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = next_token_targets(batch["labels"], mask)
        # The client of every row: this client, or (a centralized batch pools every client's rows
        # in client order) the client that contributed it.
        sizes = batch.get("client_sizes")
        if sizes is None:
            rows_owner = torch.full((ids.shape[0],), self._own_client, dtype=torch.long)
        else:
            rows_owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        owner = torch.where(mask > 0, rows_owner[:, None], -1)
        scored = owner[targets != IGNORE]
        self.step_counts = torch.bincount(scored, minlength=self.parts.clients)
        for m, rows in enumerate(torch.arange(ids.shape[0]).tensor_split(micro_batches)):
            self.buffers[m] = self._packed_input(ids[rows], mask[rows], targets[rows], owner[rows])

    @property
    def _own_client(self) -> int:
        return self.role.index if self.role.is_client else 0

    def _packed_input(self, ids, mask, targets, owner) -> MicroBatch:
        # Per-sample DP clipping works on rows: a client that clips its activations keeps one
        # sample per row.
        packing = self.parts.packing
        if self.parts.privacy is not None and self.parts.privacy.cfg.activation_clip is not None:
            packing = Packing(enabled=False)
        plan = packing.plan([mask])
        return MicroBatch(self._on_device(plan.pack([ids], 0)), plan.segments, plan.pack([targets], IGNORE),
                          plan.pack([owner], -1))

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor's copy on the compute device, queued: the host does not wait for it."""
        return t.to(self.device, non_blocking=True)

    def _device_mask(self, b: MicroBatch) -> torch.Tensor:
        if b.device_mask is None:
            b.device_mask = self._on_device(b.mask)
        return b.device_mask

    def _score_index(self, b: MicroBatch) -> torch.Tensor:
        """The flat positions with a next-token target (what the head projects), found on the host."""
        return self._on_device((b.targets.flatten() != IGNORE).nonzero().squeeze(1))

    def _step_tokens(self) -> int:
        """The step's target tokens over every client (the loss's denominator), known on the host."""
        return int(self.step_counts.sum())

    # ------------------------------------------------------------------ compute
    def _forward(self, ins: I.Forward) -> None:
        b = self.buffers[ins.buffer]
        if b.empty:
            # Nothing to compute (attention kernels reject zero-row batches): an empty activation.
            b.output = torch.zeros(b.x.shape[0], b.x.shape[1], self.stage.hidden_size,
                                   dtype=self.stage.compute_dtype, device=self.device)
            return
        self.stats.positions += b.x.shape[0] * b.x.shape[1]
        self.stats.real_tokens += b.real_tokens
        shared_grad = b.shared_grad if self.training else None
        mask = self._device_mask(b)
        if self.holds_tail:
            b.output = self.engine(b.x, mask, part="bottom")
        elif self.computes_loss:
            # The head projects only positions with a next-token target: logits [N, V].
            b.output = self.engine(b.x, mask, self._score_index(b), row_entry=b.row_entry, shared_grad=shared_grad)
        else:
            b.output = self.engine(b.x, mask, row_entry=b.row_entry, shared_grad=shared_grad)
        leaves_client = self.role.is_client and (self.holds_tail or not self.computes_loss)
        if leaves_client and self.parts.privacy is not None:  # what leaves the client: clipped, noised
            # One release per step for the accountant: the micro-batches are disjoint parts
            # of the one batch sampled this step.
            b.output = self.parts.privacy.release(b.output, mask, self.training and ins.buffer == 0)

    def _compute_loss(self, ins: I.ComputeLoss) -> None:
        b = self.buffers[ins.buffer]
        if b.empty:
            return
        smoothing = self.parts.label_smoothing if self.training else 0.0  # eval/loss: plain cross-entropy
        logits = b.tail_output if self.holds_tail else b.output
        loss = token_loss(logits, b.targets, b.owner, self.parts.clients, smoothing)
        # Divided by the whole step's token count: M micro-batches sum to the step's mean loss.
        b.loss = loss.total / max(self._step_tokens(), 1)
        self.stats.add_loss(loss.client_sum, loss.client_tokens.tolist())

    def _backward(self, ins: I.Backward) -> None:
        b = self.buffers[ins.buffer]
        if b.loss is not None:
            self.engine.backward(b.loss)
        elif b.output is not None and b.output.requires_grad and b.grad_output is not None:
            # d(sum(out * g))/d(params) = g^T d(out)/d(params): the chain rule across the cut.
            self.engine.backward((b.output * b.grad_output).sum())
        b.output = b.loss = b.grad_output = None  # the graph is spent; leaves stay for SendGrads

    def _gradients_complete(self) -> None:
        """Every micro-batch's backward is done: what reads whole-step gradients runs now."""
        if not self._grads_ready and self.parts.importance is not None:
            self.parts.importance.update(self.stage)
        self._grads_ready = True

    @torch.no_grad()
    def _clip_gradients(self, ins: I.ClipGradients) -> None:
        self._gradients_complete()
        clip = self.parts.clip
        grads = [p.grad for p in self.stage.adapter_parameters().values() if p.grad is not None]
        local = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.device))
        total = (local.double() * clip.weight).reshape(1).to(self.p2p.staging)
        if len(ins.ranks) > 1:
            dist.all_reduce(total, group=clip.groups[ins.ranks])
        norm = total.sqrt()
        self.stats.set_grad_norm(norm)
        # On the device, as torch's clip_grad_norm_ does: deciding on the host whether to clip
        # would wait for the norm. Multiplying by exactly 1.0 when under the threshold changes nothing.
        coef = (clip.max_norm / (norm + _CLIP_EPS)).clamp(max=1.0).reshape(()).to(torch.float32)
        for g in grads:
            g.mul_(coef)

    def _optimizer_step(self, _: I.OptimizerStep) -> None:
        self._gradients_complete()
        # The rate this step applies (DeepSpeed's schedulers advance inside engine.step()).
        self.stats.lr = float(self.engine.optimizer.param_groups[0]["lr"])
        self.engine.step()

    # ------------------------------------------------------------------ activations and gradients
    def _send_activations(self, ins: I.SendActivations) -> None:
        b = self.buffers[ins.buffer]
        counts = self.step_counts
        if counts is None and not self.u_shaped:
            counts = torch.zeros(self.parts.clients, dtype=torch.long)
        acts = Activations(b.output, b.mask, b.targets, counts, b.owner, b.origin)
        self.pending.append((self.p2p.isend(acts.to_wire(self.u_shaped, self.role.is_client), ins.dst), ins.dst))

    def _recv_activations(self, ins: I.RecvActivations) -> None:
        from_clients = self.role.is_server and self.role.index == 0
        received = [Activations.from_wire(bundle, self.u_shaped, from_clients)
                    for bundle in self.p2p.recv_many(ins.srcs, self.stage.compute_dtype)]
        if from_clients:
            self.buffers[ins.buffer] = self._pack_clients(ins.srcs, received)
            return
        (acts,) = received
        leaf = acts.hidden.requires_grad_(self.training)
        self.buffers[ins.buffer] = MicroBatch(leaf, acts.mask, acts.targets, acts.owner, leaves=[leaf],
                                              origin=acts.origin)
        if acts.counts is not None:
            self.step_counts = acts.counts

    def _pack_clients(self, srcs: tuple[int, ...], received: list[Activations]) -> MicroBatch:
        """Server stage 0: every served client's micro-batch, packed into one batch."""
        clients = [self.topology.role_of(src).index for src in srcs]
        leaves = [acts.hidden.requires_grad_(self.training) for acts in received]
        masks = [acts.mask for acts in received]
        hetero = self.parts.hetero
        # Rows that enter at different layers (heterogeneous split points) never share a packed row.
        plan = self.parts.packing.plan(masks, groups=clients if hetero is not None else None)
        owners = [torch.where(mask > 0, c, -1) for mask, c in zip(masks, clients)]
        b = MicroBatch(plan.pack(leaves, 0.0), plan.segments, None, plan.pack(owners, -1), leaves=leaves, plan=plan,
                       source_clients=clients)
        if self.u_shaped:
            # where each position sits in its client's micro-batch: the last stage hands it back there
            b.origin = plan.pack([torch.arange(m.numel()).view_as(m) for m in masks], -1)
        else:
            self.step_counts = torch.stack([acts.counts for acts in received]).sum(0)
            b.targets = plan.pack([acts.targets for acts in received], IGNORE)
        if hetero is not None:
            rows_client = plan.row_group.cpu()
            # On the CPU: the stage reads row counts from it per layer (see Stage.forward).
            b.row_entry = torch.tensor(hetero.entry_layers)[rows_client]
            if self.training:
                b.shared_grad = self._shared_block_grad(clients, rows_client)
        return b

    def _shared_block_grad(self, clients: list[int], rows_client: torch.Tensor) -> SharedBlockGrad:
        """Row scales N w_c / N_c and block weights W_i for the shared blocks (see SharedBlockGrad).
        U-shaped, a row of client c already carries w_c times the gradient of L_c: scale 1."""
        hetero = self.parts.hetero
        weights = self._rank_weights()
        w = torch.tensor(weights, dtype=torch.float32)  # on the host, with the counts
        if self.u_shaped:
            per_client = torch.ones_like(w)
        else:
            counts = self.step_counts.to(torch.float32)
            per_client = counts.sum() * w / counts.clamp(min=1)
        layer_weight = {int(i): sum(weights[c] for c in clients if hetero.entry_layers[c] <= int(i))
                        for i in self.stage.layers}
        return SharedBlockGrad(self._on_device(per_client[rows_client]), layer_weight)

    def _rank_weights(self) -> list[float]:
        """Each client rank's FedAvg weight; with logical clients, that of the client it trains in
        this step among the round's participants (0 while it sits out)."""
        pool = self.parts.pool
        if pool is None:
            return list(self.parts.hetero.client_weights)
        place = pool.participation.locate(self.step)
        return [pool.weight(c, place.round) if c is not None else 0.0
                for c in (place.client_of(r) for r in range(self.topology.clients))]

    def _send_grads(self, ins: I.SendGrads) -> None:
        b = self.buffers.pop(ins.buffer)
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in b.leaves]
        if b.source_clients and self.u_shaped:
            # Client c's slice holds w_c times the gradient of its own loss (see _recv_tail_grads).
            grads = [g / self._loss_weight(c) for g, c in zip(grads, b.source_clients)]
        elif b.source_clients:
            # The loss is the mean over all N tokens of the step, so client c's slice holds N_c / N
            # times the gradient of its own mean loss; it gets the gradient of its own mean loss.
            counts = self.step_counts
            grads = [g * (counts.sum() / counts[c].clamp(min=1)).to(g.dtype) for g, c in zip(grads, b.source_clients)]
        for grad, dst in zip(grads, ins.dsts):
            self.pending.append((self.p2p.isend([grad], dst), dst))

    def _recv_grads(self, ins: I.RecvGrads) -> None:
        b = self.buffers[ins.buffer]
        (b.grad_output,) = self.p2p.recv(ins.src, b.output.dtype)

    # ------------------------------------------------------------------ U-shaped split: the clients' tails
    def _send_tail_activations(self, ins: I.SendTailActivations) -> None:
        """Each client gets the output at its own real positions, in the order of its micro-batch's
        flat positions: [n_c, H] floats, nothing else (it knows its own mask)."""
        b = self.buffers[ins.buffer]
        flat = b.output.detach().flatten(0, 1)
        owner, origin = b.owner.flatten(), b.origin.flatten()  # on the host
        for dst in ins.dsts:
            c = self.topology.role_of(dst).index
            mine = (owner == c).nonzero().squeeze(1)
            positions = self._on_device(mine[torch.argsort(origin[mine])])
            b.tail_positions[c] = positions
            self.pending.append((self.p2p.isend([flat.index_select(0, positions)], dst), dst))

    def _recv_tail_grads(self, ins: I.RecvTailGrads) -> None:
        """Every client's gradient of its own loss w.r.t. its positions of the output, weighted by
        its FedAvg weight: the server's layers train on sum_c w_c L_c."""
        b = self.buffers[ins.buffer]
        grad = torch.zeros_like(b.output).flatten(0, 1)
        for src, (values,) in zip(ins.srcs, self.p2p.recv_many(ins.srcs, b.output.dtype)):
            c = self.topology.role_of(src).index
            grad.index_copy_(0, b.tail_positions[c], values * self._loss_weight(c))
        b.grad_output = grad.view_as(b.output)

    def _loss_weight(self, c: int) -> float:
        """U-shaped: the weight w of client rank c's loss in the server's objective sum_c w_c L_c:
        its FedAvg weight, or with logical clients that of the client it trains this step among
        the round's participants."""
        pool = self.parts.pool
        if pool is None:
            return self.parts.client_weights[c]
        place = pool.participation.locate(self.step)
        return pool.weight(place.client_of(c), place.round)

    def _real_positions(self, b: MicroBatch) -> torch.Tensor:
        """The flat positions of real tokens, found on the host, for indexing on the device."""
        return self._on_device((b.mask.flatten() > 0).nonzero().squeeze(1))

    def _recv_tail_activations(self, ins: I.RecvTailActivations) -> None:
        b = self.buffers[ins.buffer]
        (values,) = self.p2p.recv(ins.src, self.stage.compute_dtype)
        hidden = values.new_zeros(b.mask.numel(), values.shape[-1])
        # The width spelled out: an empty micro-batch (no rows) cannot infer it from zero elements.
        hidden = hidden.index_copy(0, self._real_positions(b), values).view(*b.mask.shape, values.shape[-1])
        b.tail_input = hidden.requires_grad_(self.training)

    def _tail_forward(self, ins: I.TailForward) -> None:
        b = self.buffers[ins.buffer]
        if b.empty:
            return
        b.tail_output = self.engine(b.tail_input, self._device_mask(b), self._score_index(b), part="tail")

    def _tail_backward(self, ins: I.TailBackward) -> None:
        b = self.buffers[ins.buffer]
        if b.loss is not None:
            self.engine.backward(b.loss)
        b.loss = b.tail_output = None

    def _send_tail_grads(self, ins: I.SendTailGrads) -> None:
        b = self.buffers[ins.buffer]
        leaf, b.tail_input = b.tail_input, None
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        values = grad.flatten(0, 1).index_select(0, self._real_positions(b))
        privacy = self.parts.privacy
        if privacy is not None and privacy.cfg.tail_gradient_clip is not None:
            # Computed from the labels: clipped per sample and noised before it leaves (privacy/dp.py).
            # The samples are found on the host from the mask, in the order of _real_positions.
            # One release per step for the accountant, as in _forward.
            values = privacy.release_tail_gradient(values, self._on_device(sample_ids(b.mask)),
                                                   self.training and ins.buffer == 0)
        self.pending.append((self.p2p.isend([values], ins.dst), ins.dst))

    # ------------------------------------------------------------------ aggregation
    def _reduce_loss_stats(self, _: I.ReduceLossStats) -> None:
        """Every client's loss sums and token counts, summed over the clients (read at the step's end)."""
        sums, tokens = self.stats.own_loss(self.parts.clients, self.device)
        counts = self._on_device(torch.tensor(tokens, dtype=torch.float64))
        self.stats.set_reduced(self._sum_over_clients(torch.cat([sums, counts])))

    def _sum_over_clients(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (float64) summed over the clients with one all-reduce."""
        buf = values.to(self.p2p.staging)
        if self.topology.clients > 1:
            dist.all_reduce(buf, group=self.parts.groups.clients)
        return buf

    def _average_adapters(self, _: I.AverageAdapters) -> None:
        if self.parts.pool is not None:
            # the round's participants (federation/rounds.py), not this rank's own adapters
            plan = self.parts.pool.participation.locate(self.step).round
            nbytes = self.parts.aggregator.aggregate_round_(self.masters, plan)
        else:
            nbytes = self.parts.aggregator.aggregate_(self.masters)
        if self.global_masters:
            self.global_masters = [m.detach().clone() for m in self.masters.values()]
        if self.role.is_client:  # server stage 0 plays the aggregator: its copies do not travel
            # Counted as a FedAvg server would see it, whatever the collective: each client uploads
            # its adapters and downloads the result at its own shapes.
            self.p2p.bytes_sent += nbytes
            self.p2p.bytes_received += nbytes
            self.p2p.adapter_bytes_sent += nbytes
        self._masters_to_params()
        self.stats.averaged = True

    def _masters_to_params(self) -> None:
        # Aggregation wrote the optimizer's (fp32) masters; the model computes with the parameters.
        copy_masters_to_params_(self.masters, self.stage.adapter_parameters())

    def _send_adapters(self, ins: I.SendAdapters) -> None:
        masters = list(self.masters.values())
        self.p2p.send([_flatten_dense_tensors([m.detach() for m in masters])], ins.dst, exact=True)
        self.p2p.adapter_bytes_sent += flat_nbytes(masters)

    @torch.no_grad()
    def _recv_adapters(self, ins: I.RecvAdapters) -> None:
        masters = list(self.masters.values())
        (flat,) = self.p2p.recv(ins.src, masters[0].dtype)
        for m, t in zip(masters, _unflatten_dense_tensors(flat, masters)):
            m.copy_(t)
        self._masters_to_params()

    @torch.no_grad()
    def _share_adapters(self, ins: I.ShareAdapters) -> None:
        # Not counted in comm/: vanilla split learning would evaluate on the last client; the
        # broadcast only lets every client's validation shard be scored with that model.
        masters = list(self.masters.values())
        broadcast_(masters, ins.src, self.parts.groups.clients, self.p2p.staging)
        self._masters_to_params()

    def _turn_barrier(self, _: I.TurnBarrier) -> None:
        dist.barrier(group=self.parts.groups.clients)


    # ------------------------------------------------------------------ logical clients
    @torch.no_grad()
    def _begin_participation(self, ins: I.BeginParticipation) -> None:
        """Start training client `ins.client`: its stream at its position, and (when ranks serve
        several clients) the global adapters with a fresh optimizer state."""
        pool = self.parts.pool
        place = pool.participation.locate(self.step)
        self.batches = pool.stream(ins.client, place.round.round_index)
        if self.parts.clip is not None:
            self.parts.clip.weight = pool.slot_weight(ins.client, place.round, place.slot)
        if pool.participation.stateless:
            for m, g in zip(self.masters.values(), self.global_masters):
                m.copy_(g)
            self._masters_to_params()
            reset_optimizer_state_(self.engine.optimizer)

    def _end_participation(self, ins: I.EndParticipation) -> None:
        """Client `ins.client`'s adapters go to the round's aggregation, with its weight among the
        round's participants."""
        pool = self.parts.pool
        weight = pool.weight(ins.client, pool.participation.locate(self.step).round)
        if self.parts.aggregator is not None:  # None: one client in all, nothing to aggregate
            self.parts.aggregator.participated(ins.client, self.masters, weight)

    def adapters_loaded(self) -> None:
        """A checkpoint's adapters were just loaded: with logical clients checkpoints are taken at
        the end of a round only (Schedule.is_due), so they are the global adapters."""
        if self.global_masters:
            self.global_masters = [m.detach().clone() for m in self.masters.values()]
