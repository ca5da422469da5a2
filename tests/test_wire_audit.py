"""What crosses the wire, recorded tensor by tensor in a real run: in the standard split topology
a client's labels (its target text as token ids, shifted to the position that predicts them)
travel to the server with its activations, as the README says; nothing else of the client's text
does (no input ids). Each micro-batch travels packed, with its segment ids as the mask.

In the U-shaped split (split.client_tail_layers) the clients compute their own loss: no label,
target, token count or id leaves a client, only floats (activations, gradients) and the segment
ids; the server hands each client floats for exactly its real positions."""

import pytest
import torch

from _launch import ROOT, check, launch, write_recipe
from splitlora_ds.config import load_config
from splitlora_ds.prepare import prepare
from splitlora_ds.data.examples import IGNORE_INDEX
from splitlora_ds.runtime.packing import PackPlan, next_token_targets

pytestmark = pytest.mark.launcher


def test_standard_split_sends_activations_mask_and_labels(tmp_path):
    recipe = write_recipe(tmp_path, federation={"clients": 2, "aggregate_every": 2}, train={"max_steps": 2},
                          data={"num_samples": 40})
    check(launch(3, ["--recipe", str(recipe), "--out", str(tmp_path)], script=str(ROOT / "tests/scripts/record_wire.py")))
    cfg = load_config(str(recipe))
    for c in range(2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", str(c)), mp.setenv("WORLD_SIZE", "3"), mp.setenv("LOCAL_RANK", str(c))
            prep = prepare(cfg)
        batches = [next(prep.batches) for _ in range(2)]
        m = cfg.micro_batches
        log = torch.load(tmp_path / f"client{c}.wire.pt")["log"]
        sent = [entry["tensors"] for entry in log if entry["dir"] == "sent"]
        received = [entry["tensors"] for entry in log if entry["dir"] == "received"]
        assert m > 1 and len(sent) == len(received) == 2 * m and all(entry["peer"] == 2 for entry in log)
        for step, batch in enumerate(batches):
            targets = next_token_targets(batch["labels"], batch["attention_mask"])
            rows = torch.arange(batch["input_ids"].shape[0]).tensor_split(m)
            for micro, bundle in zip(rows, sent[step * m:(step + 1) * m]):
                hidden, mask, sent_targets, counts = bundle
                plan = PackPlan.build([batch["attention_mask"][micro]], cfg.train.pack_length)
                assert hidden.is_floating_point() and hidden.shape[:2] == (plan.rows, plan.length)
                assert torch.equal(mask, plan.segments)  # reveals the lengths
                assert torch.equal(sent_targets, plan.pack([targets[micro]], -100))  # the target text, in the clear
                expected = torch.zeros(2, dtype=torch.long)
                expected[c] = int((targets != -100).sum())  # the step's token count, for the loss's mean
                assert torch.equal(counts, expected)
                ids = plan.pack([batch["input_ids"][micro]], 0)
                assert not any(t.shape == ids.shape and torch.equal(t, ids) for t in bundle)  # input ids stay home
        for (grad,), bundle in zip(received, sent):  # only the gradient of the activations comes back
            assert grad.is_floating_point() and grad.shape == bundle[0].shape


# ---------------------------------------------------------------------------- U-shaped split
# The clients keep the head and the last block (split.client_tail_layers: 1) and compute their own
# loss: what leaves a client is floats and the segment ids of its packed micro-batch, nothing else.

U_SPLIT = {"client_layers": 1, "client_tail_layers": 1, "micro_batches": 2}
U_STEPS = 2  # per client
H = 32  # tests/_launch.py tiny_model's hidden size


def u_recipe(tmp_path, server_stages, mode="split"):
    return write_recipe(tmp_path, mode=mode, split={**U_SPLIT, "server_stages": server_stages},
                        federation={"clients": 2, "aggregate_every": 1 if mode == "sequential" else 2},
                        train={"max_steps": U_STEPS}, data={"num_samples": 40})


def record(tmp_path, recipe, world, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    check(launch(world, ["--recipe", str(recipe), "--out", str(tmp_path), *extra],
                 script=str(ROOT / "tests/scripts/record_wire.py")))
    return {p.name[:-len(".wire.pt")]: torch.load(p) for p in tmp_path.glob("*.wire.pt")}


def client_batches(cfg, c, world, steps):
    """Client c's training batches, as its rank draws them, and its sample count."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANK", str(c)), mp.setenv("WORLD_SIZE", str(world)), mp.setenv("LOCAL_RANK", str(c))
        prep = prepare(cfg)
    return [next(prep.batches) for _ in range(steps)], prep.num_samples


def contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """Whether `needle` occurs as a contiguous run anywhere in the flattened `haystack`, compared as
    numbers whatever the dtypes (a token id sent as a float is still the token id)."""
    flat, needle = haystack.flatten().double(), needle.double()
    if needle.numel() == 0 or flat.numel() < needle.numel():
        return False
    return bool((flat.unfold(0, needle.numel(), 1) == needle).all(1).any())


def texts_of(batches):
    """Every sample's input ids (its real positions) and its next-token targets (its scored
    positions): the client's text in the two forms that must never leave it."""
    out = []
    for batch in batches:
        targets = next_token_targets(batch["labels"], batch["attention_mask"])
        for ids, mask, tgt in zip(batch["input_ids"], batch["attention_mask"], targets):
            out += [ids[mask > 0], tgt[tgt != IGNORE_INDEX]]
    assert all(t.numel() >= 8 for t in out)  # long enough that no structured tensor matches by chance
    return out


def audit_u_shaped(cfg, wire, clients, server_stages, sequential=False):
    """Checks (a), (b), (d) and (e) of the U-shaped audit on one run's recordings; returns each
    client's (activation bundles sent, tail activations received, tail gradients sent) in order."""
    m, world = cfg.micro_batches, clients + server_stages
    first, last = clients, clients + server_stages - 1
    client_ranks = set(range(clients))
    texts = {}
    per_client, samples = {}, []
    for c in range(clients):
        batches, n = client_batches(cfg, c, world, U_STEPS)
        samples.append(n)
        texts[c] = texts_of(batches)
        log = wire[f"client{c}"]["log"]
        sent = [e for e in log if e["dir"] == "sent"]
        received = [e for e in log if e["dir"] == "received"]
        # (a) a client sends: [activations, segment ids] to server stage 0, [gradient] to the last
        # stage, and in sequential mode its adapters (one flat float tensor) to the next client.
        activations = [e["tensors"] for e in sent if e["peer"] == first and len(e["tensors"]) == 2]
        tail_grads = [e["tensors"] for e in sent if e["peer"] == last and len(e["tensors"]) == 1]
        handovers = [e["tensors"] for e in sent if e["peer"] in client_ranks]
        assert len(activations) + len(tail_grads) + len(handovers) == len(sent)
        assert len(activations) == len(tail_grads) == U_STEPS * m
        assert bool(handovers) == sequential
        for bundle in sent:
            integers = [t for t in bundle["tensors"] if not t.is_floating_point()]
            assert integers == [] or (len(bundle["tensors"]) == 2 and integers[0] is bundle["tensors"][1])
        for (flat,) in handovers:
            assert flat.is_floating_point() and flat.dim() == 1
        # what comes back: from the last stage its rows of the output [n_c, H], from stage 0 the
        # gradient of its activations; nothing from anyone else but, sequential, adapters
        tails = [e["tensors"] for e in received if e["peer"] == last and e["tensors"][0].dim() == 2]
        grads = [e["tensors"] for e in received if e["peer"] == first and e["tensors"][0].dim() == 3]
        handed = [e["tensors"] for e in received if e["peer"] in client_ranks]
        assert len(tails) == len(grads) == U_STEPS * m and len(tails) + len(grads) + len(handed) == len(received)
        for step, batch in enumerate(batches):
            targets = next_token_targets(batch["labels"], batch["attention_mask"])
            rows = torch.arange(batch["input_ids"].shape[0]).tensor_split(m)
            for k, micro in enumerate(rows):
                i = step * m + k
                hidden, mask = activations[i]
                plan = PackPlan.build([batch["attention_mask"][micro]], cfg.train.pack_length)
                assert hidden.is_floating_point() and hidden.shape == (plan.rows, plan.length, H)
                assert not mask.is_floating_point() and torch.equal(mask, plan.segments)  # reveals the lengths
                # (b) neither the ids nor the targets, packed as the client packs them
                ids, tgt = plan.pack([batch["input_ids"][micro]], 0), plan.pack([targets[micro]], IGNORE_INDEX)
                assert not torch.equal(mask, ids) and not torch.equal(mask, tgt)
                # (e) the last stage returns exactly the micro-batch's real positions, floats
                (tail,) = tails[i]
                assert tail.is_floating_point() and tail.shape == (int((mask > 0).sum()), H)
                (grad,) = grads[i]
                assert grad.is_floating_point() and grad.shape == hidden.shape
                (tail_grad,) = tail_grads[i]
                assert tail_grad.is_floating_point() and tail_grad.shape == tail.shape
        # (b) no sent tensor holds any sample's ids or targets as a run of numbers, in any dtype
        for bundle in sent:
            for t in bundle["tensors"]:
                assert not any(contains(t, text) for text in texts[c])
        per_client[c] = (activations, tails, tail_grads)

    everyone = [text for c in texts for text in texts[c]]
    for s in range(server_stages):
        rank, log = clients + s, wire[f"server{s}"]["log"]
        for e in log:
            to_client = e["peer"] in client_ranks
            for t in e["tensors"]:
                # (d) integers reach a server from clients only as segment ids; none goes to a client
                if to_client and e["dir"] == "sent":
                    assert t.is_floating_point()
                if not t.is_floating_point():
                    assert not any(contains(t, text) for text in everyone)  # no ids or targets, any form
            if to_client and e["dir"] == "sent":
                (t,) = e["tensors"]  # the tail activations (last stage) or activation gradients (stage 0)
                assert (t.dim() == 2 and rank == last) or (t.dim() == 3 and rank == first)
            if to_client and e["dir"] == "received":
                assert (len(e["tensors"]) == 2 and rank == first) or (len(e["tensors"]) == 1 and rank == last)
        # what the server sent a client is what that client received, message for message
        for c in range(clients):
            out = [e["tensors"] for e in log if e["dir"] == "sent" and e["peer"] == c]
            back = [e["tensors"] for e in wire[f"client{c}"]["log"] if e["dir"] == "received" and e["peer"] == rank]
            assert len(out) == len(back) and all(torch.equal(a, b) for x, y in zip(out, back) for a, b in zip(x, y))
        # collectives (those of more than this rank): a server rank joins one, the run-start
        # all-reduce of the clients' sample counts (the FedAvg weights); the clients' loss and token
        # sums and their adapters stay among the clients
        shared = [op for op in wire[f"server{s}"]["collectives"] if len(op["ranks"]) > 1]
        assert len(shared) == 1 and shared[0]["op"] == "all_reduce", shared
        assert shared[0]["sent"].is_floating_point() and shared[0]["sent"].shape == (clients,)
        assert shared[0]["received"].tolist() == [float(n) for n in samples]
    for c in range(clients):
        for op in wire[f"client{c}"]["collectives"]:
            if len(op["ranks"]) > 1 and not set(op["ranks"]) <= client_ranks:
                assert op["received"].tolist() == [float(n) for n in samples], op
    return per_client


@pytest.mark.parametrize("server_stages", [1, 2])
def test_u_shaped_clients_send_only_floats_and_segment_ids(tmp_path, server_stages):
    recipe = u_recipe(tmp_path, server_stages)
    wire = record(tmp_path, recipe, 2 + server_stages)
    assert sorted(wire) == ["client0", "client1"] + [f"server{s}" for s in range(server_stages)]
    audit_u_shaped(load_config(str(recipe)), wire, 2, server_stages)


def test_u_shaped_sequential_clients_send_only_floats_and_segment_ids(tmp_path):
    recipe = u_recipe(tmp_path, 1, mode="sequential")
    audit_u_shaped(load_config(str(recipe)), record(tmp_path, recipe, 3), 2, 1, sequential=True)


def test_u_shaped_activations_do_not_depend_on_the_labels(tmp_path):
    """(c) Nothing a client sends before its first update is derived from its labels: two runs that
    differ only in the labels (record_wire.py --relabel keeps every input id and mask and replaces
    the labels by other targets at other positions, so the targets, which positions are scored and
    the token counts all change) send bit-identical activation bundles in the first step, and get
    bit-identical tail activations back. Its gradients must differ: they are what the labels train
    (that also shows the relabelling took effect). Later steps differ legitimately: the adapters
    moved by other gradients."""
    runs = []
    for name, extra in (("labels", ()), ("relabelled", ("--relabel",))):
        recipe = u_recipe(tmp_path / name, 1)
        cfg = load_config(str(recipe))
        runs.append(audit_u_shaped(cfg, record(tmp_path / name, recipe, 3, *extra), 2, 1))
    m = cfg.micro_batches
    for c in range(2):
        (acts_a, tails_a, grads_a), (acts_b, tails_b, grads_b) = runs[0][c], runs[1][c]
        for i in range(m):  # step 0: every micro-batch's forward happens before any update
            assert all(torch.equal(a, b) for a, b in zip(acts_a[i], acts_b[i]))
            assert torch.equal(tails_a[i][0], tails_b[i][0])
            assert not torch.equal(grads_a[i][0], grads_b[i][0])
