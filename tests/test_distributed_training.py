"""Data-parallel LoRA training: two processes under ``mlx.launch`` (ring backend on
loopback) against one process, on the same draft and the same examples.

Run as a script, this file is the worker: it trains a tiny draft and writes what
the test compares (the adapter, the losses, the tokens it trained on) to a
per-rank file.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import speclora  # noqa: F401  (must precede mlx.core: preloads OpenBLAS)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from helpers import TINY_VOCAB_SIZE, make_tiny_llama
from speclora import training
from speclora.checkpoint import adapter_weights, load_adapter_checkpoint
from speclora.losses import Batch
from speclora.records import Disagreement, TrainingExample
from speclora.training import LoRATrainer

TIMESTAMP = "2024-01-01T00:00:00"
NUM_EXAMPLES = 11

# Batches of 4 split 2 + 2 between the ranks; with 9 training examples the last
# batch has a single row, so one rank gets an empty share. The ranks' token
# counts differ (examples have different lengths), which a mean of per-rank
# mean losses would get wrong. grad_clip is set so that clipping before the
# gradients are averaged would also show.
TRAINING = {
    "min_examples": 2,
    "num_epochs": 3,
    "batch_size": 4,
    "learning_rate": 1e-2,
    "rank": 4,
    "alpha": 8,
    "dropout": 0.0,
    "eval_fraction": 0.2,
    "distill_weight": 0.5,
    "grad_clip": 1.0,
    "max_seq_length": 64,
    "seed": 3,
}

# Float32 summation order differs between one process (whole batches) and two
# (half batches, then an all-reduce); over 9 AdamW steps that moves the adapter
# by ~1e-6 here. Averaging per-rank mean losses, or clipping each rank's
# gradient, moves it by more than 0.1: 1e-4 separates right from wrong.
ATOL = 1e-4

# The launch is killed when no rank has reported a step for this long: a stall
# (a rank waiting for a peer that died), not a slow machine.
STALL_S = 120.0


def make_examples() -> list[TrainingExample]:
    """Examples of different lengths, with disagreements to distil from."""
    rng = np.random.default_rng(7)
    examples = []
    for i in range(NUM_EXAMPLES):
        prompt = rng.integers(4, TINY_VOCAB_SIZE, int(rng.integers(2, 9))).tolist()
        output = rng.integers(4, TINY_VOCAB_SIZE, int(rng.integers(4, 30))).tolist()
        disagreements = []
        for pos in sorted(rng.choice(len(output), size=min(3, i % 4), replace=False)):
            others = rng.integers(4, TINY_VOCAB_SIZE, 2).tolist()
            disagreements.append(
                Disagreement(
                    position=int(pos),
                    draft_token=others[0],
                    target_token=output[pos],
                    draft_confidence=0.4,
                    target_confidence=0.6,
                    top_k_tokens=[output[pos], *others],
                    top_k_logprobs=[float(np.log(p)) for p in (0.6, 0.3, 0.1)],
                )
            )
        examples.append(
            TrainingExample(
                id=f"ex{i}",
                prompt="p",
                target_output="t",
                acceptance_rate=0.1,
                prompt_tokens=prompt,
                output_tokens=output,
                disagreements=disagreements,
                timestamp=TIMESTAMP,
            )
        )
    return examples


def worker(out_dir: Path) -> None:
    """Train the tiny draft; write ``rank<r>.json`` and ``rank<r>.safetensors``."""
    group = mx.distributed.init()
    rank = group.rank()
    # Every rank has its own checkpoint_dir, as on machines with local disks,
    # so that a write by any rank but 0 is visible.
    config = dict(TRAINING, checkpoint_dir=str(out_dir / f"checkpoints-rank{rank}"))
    trainer = LoRATrainer(make_tiny_llama(seed=0), None, config)

    # Count the output tokens this rank computes the loss on (training steps
    # and evaluation, the only users of iterate_batches; padding rows have none).
    tokens = [0]
    iterate_batches = training.iterate_batches

    def counting_batches(*args: Any, **kwargs: Any) -> Iterator[Batch]:
        for batch in iterate_batches(*args, **kwargs):
            tokens[0] += int(batch.ce_mask.sum().item())
            yield batch

    training.iterate_batches = counting_batches

    def on_step(step: int, loss: float) -> None:
        print(f"rank {rank} step {step} loss {loss:.6f}", flush=True)

    result = trainer.train(make_examples(), on_step=on_step)
    mx.save_safetensors(
        str(out_dir / f"rank{rank}.safetensors"), adapter_weights(trainer.model)
    )
    report = {
        "rank": rank,
        "size": group.size(),
        "tokens": tokens[0],
        "losses": result["losses"],
        "eval_losses": result["eval_losses"],
        "initial_eval_loss": result["initial_eval_loss"],
        "global_step": result["global_step"],
        "train_s": result["elapsed_s"],
    }
    # Written last: its presence means this rank finished.
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------------- test


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are free (the ring uses one per rank)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _run(cmd: list[str], cwd: Path) -> tuple[str, float]:
    """Run ``cmd`` until it exits; kill it if it stops printing for STALL_S.

    Returns:
        tuple[str, float]: Its output (stdout and stderr) and its wall time.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    out = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=STALL_S):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(
                    f"no progress for {STALL_S:.0f} s: {' '.join(cmd)}\n"
                    + out.decode(errors="replace")
                )
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    proc.wait()
    return out.decode(errors="replace"), time.perf_counter() - start


def _launch_command(out_dir: Path) -> list[str]:
    launcher = Path(sys.executable).with_name("mlx.launch")
    assert launcher.is_file(), f"mlx.launch is not installed next to {sys.executable}"
    return [
        str(launcher),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1",
        "-n",
        "2",
        "--starting-port",
        str(_free_port_pair()),
        "--python",
        sys.executable,
        __file__,
        str(out_dir),
    ]


def _read(out_dir: Path, rank: int, output: str) -> tuple[dict, dict[str, mx.array]]:
    report_path = out_dir / f"rank{rank}.json"
    # mlx.launch exits with 0 whatever its ranks do: what finished is what wrote.
    assert report_path.is_file(), f"rank {rank} did not finish:\n{output}"
    weights = mx.load(str(out_dir / f"rank{rank}.safetensors"))
    assert isinstance(weights, dict)
    return json.loads(report_path.read_text()), weights


def _max_diff(a: dict[str, mx.array], b: dict[str, mx.array]) -> float:
    assert a.keys() == b.keys()
    return max(float(mx.abs(a[k] - b[k]).max()) for k in a)


def test_two_ranks_train_the_same_adapter_as_one_process(tmp_path: Path) -> None:
    tests_dir = Path(__file__).parent
    single_dir, dist_dir = tmp_path / "single", tmp_path / "distributed"
    single_dir.mkdir()
    dist_dir.mkdir()

    single_out, single_s = _run([sys.executable, __file__, str(single_dir)], tests_dir)
    dist_out, dist_s = _run(_launch_command(dist_dir), tests_dir)
    ref, ref_weights = _read(single_dir, 0, single_out)
    r0, r0_weights = _read(dist_dir, 0, dist_out)
    r1, r1_weights = _read(dist_dir, 1, dist_out)
    print(
        f"\nwall time, launch to exit: 1 process {single_s:.1f} s, 2 processes "
        f"(mlx.launch, ring) {dist_s:.1f} s; in train(): {ref['train_s']:.2f} s vs "
        f"{r0['train_s']:.2f} s"
    )
    assert (ref["size"], r0["size"], r1["size"]) == (1, 2, 2)
    assert (r0["rank"], r1["rank"]) == (0, 1)

    # Each rank trained and scored its own share: together the whole data, once.
    assert 0 < r0["tokens"] < ref["tokens"] and 0 < r1["tokens"] < ref["tokens"]
    assert r0["tokens"] + r1["tokens"] == ref["tokens"]

    # The same optimizer steps with the same (averaged) losses, on every rank.
    assert r0["global_step"] == r1["global_step"] == ref["global_step"] == 9
    for r in (r0, r1):
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["eval_losses"], ref["eval_losses"], rtol=1e-5)
        np.testing.assert_allclose(
            r["initial_eval_loss"], ref["initial_eval_loss"], rtol=1e-5
        )

    # Training moved the adapter far beyond the tolerance it is compared with.
    config = dict(TRAINING, checkpoint_dir=str(tmp_path / "unused"))
    initial = adapter_weights(LoRATrainer(make_tiny_llama(seed=0), None, config).model)
    assert _max_diff(ref_weights, initial) > 100 * ATOL

    # The ranks hold identical weights, equal to one process's within ATOL.
    assert _max_diff(r0_weights, r1_weights) == 0.0
    assert _max_diff(r0_weights, ref_weights) < ATOL

    # Only rank 0 wrote checkpoints, and its final adapter is the trained one.
    assert not (dist_dir / "checkpoints-rank1").exists()
    final, _, _ = load_adapter_checkpoint(dist_dir / "checkpoints-rank0" / "final")
    assert _max_diff(final, r0_weights) == 0.0
    for alias in ("latest", "best", "final"):
        assert (dist_dir / "checkpoints-rank0" / alias).is_dir()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
