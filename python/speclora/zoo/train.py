"""Training of the shipped Llama models on a weighted mix of token streams."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class ModelSpec:
    """Size of one Llama model (``mlx_lm.models.llama.ModelArgs`` fields)."""

    hidden_size: int = field(metadata={"help": "Model width."})
    num_hidden_layers: int = field(metadata={"help": "Transformer blocks."})
    intermediate_size: int = field(metadata={"help": "MLP width."})
    num_attention_heads: int = field(metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(metadata={"help": "Key/value heads (GQA)."})

    def config(
        self, *, vocab_size: int, max_len: int, bos_id: int, eos_id: int
    ) -> dict:
        """The ``config.json`` dictionary mlx-lm and transformers read."""
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            **asdict(self),
            "vocab_size": vocab_size,
            "max_position_embeddings": max_len,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_traditional": False,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": "float16",
        }


@dataclass
class TrainSpec:
    """Optimisation settings for one model."""

    steps: int = field(metadata={"help": "Optimizer steps."})
    batch_size: int = field(metadata={"help": "Sequences per step."})
    seq_len: int = field(metadata={"help": "Tokens per sequence, BOS included."})
    learning_rate: float = field(metadata={"help": "Peak learning rate."})
    warmup_steps: int = field(metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(metadata={"help": "AdamW weight decay."})
    mix: dict[str, float] = field(metadata={"help": "Domain -> share of sequences."})
    seed: int = field(metadata={"help": "Seed for init and batch sampling."})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Model whose next-token distributions are the targets "
            "(distillation); None learns the text's own next tokens."
        },
    )


class WindowSampler:
    """Draw training sequences: BOS followed by a random window of a domain's stream.

    Every sequence starts with BOS, as prompts do at generation time; the window
    itself may start anywhere in a document (documents are joined with EOS).

    Args:
        streams (dict[str, np.ndarray]): Domain -> concatenated token ids.
        bos_id (int): The BOS token id.
        seq_len (int): Sequence length including BOS.
    """

    def __init__(self, streams: dict[str, np.ndarray], *, bos_id: int, seq_len: int):
        self.streams = streams
        self.bos_id = bos_id
        self.seq_len = seq_len
        for domain, stream in streams.items():
            if len(stream) < seq_len:
                raise ValueError(
                    f"Stream {domain!r} has {len(stream)} tokens, fewer than seq_len={seq_len}"
                )

    def window(self, domain: str, start: int) -> np.ndarray:
        """BOS + ``seq_len - 1`` tokens of ``domain`` from ``start``."""
        body = self.streams[domain][start : start + self.seq_len - 1]
        return np.concatenate([[self.bos_id], body]).astype(np.int32)

    def batch(
        self, rng: np.random.Generator, batch_size: int, mix: dict[str, float]
    ) -> np.ndarray:  # [B, L] int32
        """A batch whose rows pick their domain with probabilities ``mix``."""
        domains = list(mix)
        probs = np.array([mix[d] for d in domains], dtype=np.float64)
        picks = rng.choice(len(domains), size=batch_size, p=probs / probs.sum())
        rows = []
        for i in picks:
            stream = self.streams[domains[i]]
            start = int(rng.integers(0, len(stream) - self.seq_len + 2))
            rows.append(self.window(domains[i], start))
        return np.stack(rows)

    def fixed_windows(self, domain: str, count: int) -> np.ndarray:  # [N, L] int32
        """Evenly spaced, deterministic windows for loss evaluation."""
        stream = self.streams[domain]
        last = len(stream) - self.seq_len + 1
        starts = np.linspace(0, last, num=min(count, last + 1), dtype=np.int64)
        return np.stack([self.window(domain, int(s)) for s in starts])


def build_model(spec: ModelSpec, config: dict, seed: int):
    """Create a freshly initialised ``mlx_lm`` Llama model."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def _loss(model, batch):  # batch: [B, L] int32
    from speclora.losses import cross_entropy

    return cross_entropy(model(batch[:, :-1]), batch[:, 1:]).mean()


def _distill_loss(model, batch, teacher):  # batch: [B, L] int32
    """Cross-entropy of ``model`` against ``teacher``'s next-token distributions.

    A draft taught this way spends its small capacity on imitating the model it
    will draft for, which is what speculative acceptance rewards.
    """
    import mlx.core as mx
    from mlx import nn

    inputs = batch[:, :-1]
    soft = mx.stop_gradient(mx.softmax(teacher(inputs).astype(mx.float32), axis=-1))
    log_q = nn.log_softmax(model(inputs).astype(mx.float32), axis=-1)
    return -(soft * log_q).sum(axis=-1).mean()


def mean_loss(model, windows: np.ndarray, *, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over ``windows``, BOS position excluded.

    Args:
        model (nn.Module): The model to evaluate.
        windows (np.ndarray): ``[N, L]`` int32 token windows.
        batch_size (int): Windows per forward pass. Default: ``16``.

    Returns:
        float: Loss averaged over all predicted tokens.
    """
    import mlx.core as mx

    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = mx.array(windows[i : i + batch_size])
        loss = _loss(model, chunk)
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total += loss.item() * n
        count += n
    return total / count


def train(
    model,
    sampler: WindowSampler,
    spec: TrainSpec,
    *,
    teacher=None,
    log: Callable[[str], None] = print,
    log_every: int = 50,
) -> dict:
    """Train ``model`` in place with AdamW and a warm-up + cosine learning rate.

    Args:
        model (nn.Module): The model to train.
        sampler (WindowSampler): Source of training sequences.
        spec (TrainSpec): Optimisation settings.
        teacher (nn.Module, optional): The model named by ``spec.teacher``, kept
            frozen; required exactly when ``spec.teacher`` is set.
        log (Callable[[str], None]): Progress sink. Default: ``print``.
        log_every (int): Steps between progress lines. Default: ``50``.

    Returns:
        dict: ``{"seconds": float, "final_train_loss": float}`` where the loss is
        the mean over the last ``log_every`` steps.
    """
    import mlx.core as mx
    import mlx.optimizers as optim

    from speclora.training import train_step

    if (teacher is None) != (spec.teacher is None):
        raise ValueError(
            f"spec.teacher is {spec.teacher!r} but a teacher model was "
            f"{'not ' if teacher is None else ''}given"
        )
    warmup = optim.linear_schedule(0.0, spec.learning_rate, max(spec.warmup_steps, 1))
    decay = optim.cosine_decay(
        spec.learning_rate,
        max(spec.steps - spec.warmup_steps, 1),
        spec.learning_rate * 0.1,
    )
    schedule = optim.join_schedules([warmup, decay], [max(spec.warmup_steps, 1)])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=spec.weight_decay)
    if teacher is None:
        loss_fn = _loss
    else:
        teacher.eval()
        loss_fn = functools.partial(_distill_loss, teacher=teacher)
    step = train_step(model, loss_fn, optimizer, grad_clip=1.0)
    rng = np.random.default_rng(spec.seed)
    model.train()
    recent: list[float] = []
    start = time.perf_counter()
    for it in range(1, spec.steps + 1):
        batch = mx.array(sampler.batch(rng, spec.batch_size, spec.mix))
        recent.append(float(np.asarray(step(batch))))
        recent = recent[-log_every:]
        if it % log_every == 0 or it == spec.steps:
            elapsed = time.perf_counter() - start
            log(
                f"step {it}/{spec.steps} loss {np.mean(recent):.3f} "
                f"lr {optimizer.learning_rate.item():.2e} {elapsed:.0f}s"
            )
        if not math.isfinite(recent[-1]):
            raise RuntimeError(f"Training diverged at step {it}: loss {recent[-1]}")
    model.eval()
    return {
        "seconds": time.perf_counter() - start,
        "final_train_loss": float(np.mean(recent)),
    }
