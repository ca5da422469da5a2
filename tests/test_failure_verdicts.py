"""A failure names its real cause, in one line, on the rank where it happened; the other ranks
say which rank failed first. Only backend, connection and timeout errors are a lost peer (a killed
or hung peer: tests/test_rank_failure.py)."""

import pytest
import torch

from _launch import ROOT, launch, rank_env, write_recipe
from splitlora_ds.failures import (EXIT_ERROR, EXIT_PEER_FAILED, Failure, PeerLost, describe_error, is_peer_failure,
                                   note_where)
from splitlora_ds.topology import Topology

GLOO_RESET = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:18325: "
              "Connection reset by peer. This is typically caused by a remote worker hanging")
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv"


@pytest.mark.parametrize("message", [GLOO_RESET, GLOO_TIMEOUT, "Application timeout caused pair closure",
                                     "Connection closed by peer [127.0.0.1]:4242"])
def test_backend_connection_and_timeout_errors_are_a_lost_peer(message):
    assert is_peer_failure(RuntimeError(message))


@pytest.mark.parametrize("error", [
    RuntimeError("Sizes of tensors must match except in dimension 0. Expected size 32 but got size 31"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 1073741824 bytes."),
    ValueError("bad labels"), KeyError("input_ids")])
def test_anything_else_is_the_ranks_own_error(error):
    assert not is_peer_failure(error)


def test_out_of_memory_says_where_how_much_and_which_knobs():
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.06 GiB free.")
    note_where(error, 16, "ComputeLoss")
    line = describe_error(error, "server0 (rank 2)", "cuda:0")
    assert line.startswith("server0 (rank 2) ran out of memory at step 16 (ComputeLoss) on cuda:0: "
                           "tried to allocate 2.00 GiB."), line
    for knob in ("train.batch_size", "split.micro_batches", "split.client_layers", "train.pack_length"):
        assert knob in line
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")
    assert "tried to allocate 1073741824 bytes" in describe_error(cpu, "client0 (rank 0)", "cpu")


def test_the_first_place_that_notes_an_error_wins():
    error = ValueError("x")
    note_where(error, 3, "Forward")
    note_where(error, 3, "the step")
    assert describe_error(error, "client1 (rank 1)", "cpu") == "client1 (rank 1) failed at step 3 (Forward): ValueError: x"


def test_a_survivor_names_the_rank_that_failed_first_and_never_advises_resuming():
    lost = PeerLost([2], RuntimeError(GLOO_RESET), step=16, during="RecvGrads")
    topology = Topology(clients=2, server_stages=1)
    plain = lost.describe(topology, 0)
    assert "server0 (rank 2) was lost at step 16 (RecvGrads)" in plain and "--resume latest" in plain
    told = lost.describe(topology, 0, Failure("error", "server0 (rank 2) failed at step 16 (ComputeLoss): ValueError: x"))
    assert told == ("client0 (rank 0) stopped at step 16 (RecvGrads) because server0 (rank 2) failed at step 16 "
                    "(ComputeLoss): ValueError: x; see that rank's output")
    # a loss another rank saw first: resuming is the cure
    seen = lost.describe(topology, 1, Failure("lost", lost.what_was_lost(topology) + " (seen by client0 (rank 0))"))
    assert seen.startswith("client1 (rank 1) stopped at step 16 (RecvGrads) because server0 (rank 2) was lost at "
                           "step 16 (RecvGrads) (seen by client0 (rank 0)); Restart every rank with --resume latest")


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("splitlora_ds: error:")]


@pytest.mark.launcher
@pytest.mark.parametrize("fault,rank,expected", [
    ("oom", 2, "server0 (rank 2) ran out of memory at step 2 (ComputeLoss) on cpu: tried to allocate 2.00 GiB."),
    ("value", 1, "client1 (rank 1) failed at step 2 (Forward): ValueError: input_ids hold -3, outside the vocabulary"),
    ("runtime", 2, "server0 (rank 2) failed at step 2 (RecvActivations): RuntimeError: Sizes of tensors must match"),
])
def test_an_injected_error_is_told_as_itself_on_its_rank_and_named_by_the_others(tmp_path, fault, rank, expected):
    recipe = write_recipe(tmp_path, federation={"clients": 2}, train={"max_steps": 6}, dist={"timeout_s": 30})
    proc = launch(3, ["--recipe", str(recipe)], script=str(ROOT / "tests/scripts/inject_fault.py"),
                  env=rank_env() | {"FAULT": f"{fault}:{rank}:2"}, timeout=240)
    failed = proc.ranks[rank]
    assert failed.returncode == EXIT_ERROR, (failed.returncode, failed.stderr[-3000:])
    (line,) = _errors(failed.stderr)
    assert line.startswith(f"splitlora_ds: error: {expected}"), line
    assert "Traceback" in failed.stderr and "--resume" not in failed.stderr
    for other, survivor in enumerate(proc.ranks):
        if other == rank:
            continue
        assert survivor.returncode == EXIT_PEER_FAILED, (other, survivor.returncode, survivor.stderr[-3000:])
        (told,) = _errors(survivor.stderr)
        assert f"because {expected}" in told and "--resume" not in told, told
        assert "Traceback" not in survivor.stderr, survivor.stderr[-3000:]
