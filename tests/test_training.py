"""Tests for speclora.training (LoRATrainer); the checkpoint store is in test_checkpoint.py."""

from __future__ import annotations

import json
from pathlib import Path

import speclora  # noqa: F401  (must precede mlx.core: preloads OpenBLAS)

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.lora import LoRALinear

from speclora.records import Disagreement, TrainingExample
from speclora.training import LoRATrainer

VOCAB = 64
TIMESTAMP = "2024-01-01T00:00:00"

MODEL_ARGS: dict = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
}


def make_model(seed: int = 0) -> llama.Model:
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**MODEL_ARGS))
    mx.eval(model.parameters())
    return model


class CharTokenizer:
    """Stand-in tokenizer: one token per character."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [4 + ord(c) % (VOCAB - 4) for c in text]
        return ([1] if add_special_tokens else []) + ids

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 4 + ord("0")) for i in ids)


def rule_sequence(start: int, length: int) -> list[int]:
    """A deterministic stream the draft can learn: each token is the previous + 7."""
    return [4 + (start + 7 * j) % (VOCAB - 4) for j in range(length)]


def make_examples(n: int, *, out_len: int = 24, with_disagreements: bool = False):
    examples = []
    for i in range(n):
        seq = rule_sequence(5 * i, out_len)
        out = seq[1:]
        dis = []
        if with_disagreements:
            for pos in (2, 9):
                # Target top-3: the emitted token plus two others, at 0.5 / 0.3 / 0.2.
                alt = [
                    4 + (out[pos] + 11) % (VOCAB - 4),
                    4 + (out[pos] + 23) % (VOCAB - 4),
                ]
                dis.append(
                    Disagreement(
                        position=pos,
                        draft_token=alt[0],
                        target_token=out[pos],
                        draft_confidence=0.4,
                        target_confidence=0.5,
                        top_k_tokens=[out[pos], *alt],
                        top_k_logprobs=[float(np.log(p)) for p in (0.5, 0.3, 0.2)],
                    )
                )
        examples.append(
            TrainingExample(
                id=f"ex{i}",
                prompt=f"prompt {i}",
                target_output="",
                acceptance_rate=0.2,
                prompt_tokens=[1, 2, seq[0]],
                disagreements=dis,
                timestamp=TIMESTAMP,
                output_tokens=out,
            )
        )
    return examples


def train_config(tmp_path: Path, **overrides) -> dict:
    cfg = {
        "rank": 4,
        "alpha": 8.0,
        "learning_rate": 1e-2,
        "num_epochs": 4,
        "batch_size": 4,
        "min_examples": 4,
        "max_seq_length": 64,
        "eval_fraction": 0.25,
        "replay_ratio": 0.25,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


def lora_params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def logits_of(model, tokens: list[int]) -> np.ndarray:
    return np.array(model(mx.array([tokens])).astype(mx.float32))[0]


def topk_kl(model, examples) -> float:
    """Mean KL(p_target_topk || q_draft_topk) at the disagreements (numpy reference)."""
    kls = []
    for ex in examples:
        seq = ex.prompt_tokens + ex.output_tokens
        logits = logits_of(model, seq)
        for d in ex.disagreements:
            z = logits[len(ex.prompt_tokens) + d.position - 1, d.top_k_tokens]
            log_q = z - np.logaddexp.reduce(z)
            lp = np.array(d.top_k_logprobs)
            log_p = lp - np.logaddexp.reduce(lp)
            kls.append(float((np.exp(log_p) * (log_p - log_q)).sum()))
    return float(np.mean(kls))


# ----------------------------------------------------------------- training


def test_loss_decreases_on_learnable_set(tmp_path):
    model = make_model()
    trainer = LoRATrainer(model, CharTokenizer(), train_config(tmp_path, num_epochs=6))
    steps: list[tuple[int, float]] = []
    result = trainer.train(
        make_examples(16), [], on_step=lambda s, l: steps.append((s, l))
    )
    assert steps == list(enumerate(result["losses"], start=1))
    assert result["num_eval"] == 4 and result["num_examples"] == 12
    assert len(result["eval_losses"]) == 6
    # Held-out sequences follow the same rule, so the eval loss must fall well
    # below the untrained model's (about 4.9 nats; a 1-nat drop is a 2.7x gain
    # in the probability of the held-out tokens).
    assert result["eval_losses"][-1] < result["initial_eval_loss"] - 1.0
    assert result["best_loss"] == min(result["eval_losses"])
    assert result["final_loss"] == result["eval_losses"][-1]
    assert result["global_step"] == len(result["losses"]) == 6 * 3
    assert all(np.isfinite(result["losses"]))


def test_loss_matches_numpy_reference(tmp_path):
    """evaluate() == CE over output tokens + w * KL at index len(prompt) + p - 1."""
    weight, temperature = 0.7, 2.0
    model = make_model()
    trainer = LoRATrainer(
        model,
        CharTokenizer(),
        train_config(tmp_path, distill_weight=weight, distill_temperature=temperature),
    )
    examples = make_examples(3, out_len=12, with_disagreements=True)
    ce_sum, n_tok, kls = 0.0, 0, []
    for ex in examples:
        seq = ex.prompt_tokens + ex.output_tokens
        logits = logits_of(model, seq).astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        p_len = len(ex.prompt_tokens)
        for i in range(p_len, len(seq)):
            ce_sum -= logp[i - 1, seq[i]]
            n_tok += 1
        for d in ex.disagreements:
            z = logits[p_len + d.position - 1, d.top_k_tokens] / temperature
            log_q = z - np.logaddexp.reduce(z)
            lp = np.array(d.top_k_logprobs)
            log_p = lp - np.logaddexp.reduce(lp)
            kls.append((np.exp(log_p) * (log_p - log_q)).sum())
    expected = ce_sum / n_tok + weight * np.mean(kls)
    assert trainer.evaluate(examples) == pytest.approx(expected, rel=1e-4)


def test_distillation_moves_draft_toward_target_topk(tmp_path):
    examples = make_examples(12, with_disagreements=True)
    kl = {}
    for weight in (0.0, 5.0):
        model = make_model()
        if weight == 0.0:
            kl["initial"] = topk_kl(model, examples)
        trainer = LoRATrainer(
            model,
            CharTokenizer(),
            train_config(
                tmp_path / str(weight), distill_weight=weight, eval_fraction=0.0
            ),
        )
        trainer.train(examples, [])
        kl[weight] = topk_kl(model, examples)
    # Same seed and data: only the distillation term differs.
    assert kl[5.0] < 0.5 * kl["initial"]
    assert kl[5.0] < 0.5 * kl[0.0]


def test_only_lora_parameters_change(tmp_path):
    model = make_model()
    base_before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    trainer = LoRATrainer(model, CharTokenizer(), train_config(tmp_path))
    lora_before = lora_params(model)
    assert lora_before and all(
        k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in lora_before
    )
    trainer.train(make_examples(8), [])
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for name, value in base_before.items():
        key = name.replace("q_proj.weight", "q_proj.linear.weight").replace(
            "v_proj.weight", "v_proj.linear.weight"
        )
        assert np.array_equal(after[key], value), name
    lora_after = lora_params(model)
    assert any(not np.array_equal(lora_after[k], lora_before[k]) for k in lora_before)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scale == pytest.approx(8.0 / 4)
    assert not isinstance(model.layers[0].self_attn.k_proj, LoRALinear)


def test_min_examples_error_names_counts(tmp_path):
    trainer = LoRATrainer(
        make_model(), CharTokenizer(), train_config(tmp_path, min_examples=8)
    )
    with pytest.raises(ValueError, match=r"have 3, need at least 8"):
        trainer.train(make_examples(3), make_examples(10))


def test_invalid_config_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="training.rank"):
        LoRATrainer(make_model(), CharTokenizer(), train_config(tmp_path, rank=0))
    with pytest.raises(ValueError, match="target_modules"):
        LoRATrainer(
            make_model(), CharTokenizer(), train_config(tmp_path, target_modules=["qq"])
        )


def test_replay_mixed_in_at_ratio(tmp_path, capsys):
    trainer = LoRATrainer(
        make_model(),
        CharTokenizer(),
        train_config(tmp_path, eval_fraction=0.0, num_epochs=1),
        show_progress=True,
    )
    failures = make_examples(9)
    replay = make_examples(30)[20:]  # ids ex20..ex29, distinct from the failures
    result = trainer.train(failures, replay)
    # round(0.25 * 9 / 0.75) = 3 replayed -> 12 sequences -> 3 batches of 4.
    assert result["num_replay"] == 3 and result["global_step"] == 3
    assert "LoRA training" in capsys.readouterr().err
    # Replay copies of the examples being trained on are not replayed again.
    assert trainer.train(failures, failures)["num_replay"] == 0


def test_encodes_target_output_when_tokens_missing(tmp_path):
    tok = CharTokenizer()
    examples = [
        TrainingExample(
            id=f"t{i}",
            prompt="p",
            target_output="abcabcabcabc",
            acceptance_rate=0.1,
            prompt_tokens=[1, 2],
            disagreements=[],
            timestamp=TIMESTAMP,
        )
        for i in range(4)
    ]
    trainer = LoRATrainer(make_model(), tok, train_config(tmp_path, eval_fraction=0.0))
    before = trainer.evaluate(examples)
    result = trainer.train(examples, [])
    # One sequence of 2 + 12 tokens per example, one batch per epoch.
    assert result["global_step"] == 4
    assert trainer.evaluate(examples) < before


def test_nonfinite_loss_raises_and_restores_weights(tmp_path):
    model = make_model()
    trainer = LoRATrainer(
        model,
        CharTokenizer(),
        train_config(tmp_path, grad_clip=None, eval_fraction=0.0),
    )
    before = lora_params(model)
    with pytest.raises(RuntimeError, match="diverged"):
        trainer.train(make_examples(8), [], learning_rate=1e30, num_epochs=5)
    after = lora_params(model)
    assert all(np.array_equal(after[k], before[k]) for k in before)


# -------------------------------------------------------------- checkpoints


def save_tiny_model_dir(model, path: Path) -> None:
    """A model directory mlx_lm.load reads: config, weights and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({**MODEL_ARGS, "tie_word_embeddings": True})
    )
    mx.save_safetensors(
        str(path / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    ).save_pretrained(str(path))


def test_checkpoints_load_through_mlx_lm(tmp_path):
    from mlx_lm import load

    model_dir = tmp_path / "model"
    save_tiny_model_dir(make_model(), model_dir)
    model, tokenizer = load(str(model_dir))
    examples = [
        TrainingExample(
            id=f"w{i}",
            prompt="p",
            target_output=" ".join(f"w{t}" for t in rule_sequence(3 * i, 20)),
            acceptance_rate=0.1,
            prompt_tokens=[1, 5],
            disagreements=[],
            timestamp=TIMESTAMP,
        )
        for i in range(8)
    ]
    trainer = LoRATrainer(model, tokenizer, train_config(tmp_path))
    result = trainer.train(examples, [])
    probe = [1, 5, *rule_sequence(0, 10)]
    trained = logits_of(model, probe)

    paths = {
        "final": Path(result["final_path"]),
        "latest": Path(result["latest_path"]),
        "best": Path(result["checkpoint_path"]),
    }
    for alias, path in paths.items():
        assert path == tmp_path / "ckpt" / alias
        assert {p.name for p in path.iterdir()} == {
            "adapters.safetensors",
            "adapter_config.json",
            "training_state.json",
        }
        loaded, _ = load(str(model_dir), adapter_path=str(path))
        if alias != "best":  # the model holds the final weights
            np.testing.assert_allclose(
                logits_of(loaded, probe), trained, rtol=1e-5, atol=1e-5
            )
    best_state = json.loads((paths["best"] / "training_state.json").read_text())
    assert best_state["eval_loss"] == result["best_loss"]
    config = json.loads(
        (Path(result["final_path"]) / "adapter_config.json").read_text()
    )
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {
        "rank": 4,
        "scale": 2.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
    }
    assert config["alpha"] == 8.0 and config["target_modules"] == ["q_proj", "v_proj"]
    state = json.loads((Path(result["final_path"]) / "training_state.json").read_text())
    assert (
        state["step"] == result["global_step"] and state["losses"] == result["losses"]
    )
    assert {"timestamp", "version"} <= set(state)

    # A model loaded with the adapter unfused keeps its LoRA layers for training.
    reloaded, _ = load(str(model_dir), adapter_path=result["final_path"])
    again = LoRATrainer(reloaded, tokenizer, train_config(tmp_path, rank=16))
    assert again.lora.rank == 4 and again.lora.keys == config["lora_parameters"]["keys"]
    np.testing.assert_allclose(
        logits_of(reloaded, probe), trained, rtol=1e-5, atol=1e-5
    )


def test_resume_from_previous_adapter(tmp_path):
    examples = make_examples(12)
    first = LoRATrainer(make_model(), CharTokenizer(), train_config(tmp_path / "a"))
    r1 = first.train(examples, [])
    second = LoRATrainer(make_model(), CharTokenizer(), train_config(tmp_path / "b"))
    r2 = second.train(examples, [], num_epochs=1, resume_from=r1["final_path"])
    # Same seed, same held-out split: training starts where the first run ended.
    assert r2["initial_eval_loss"] == pytest.approx(r1["final_loss"], rel=1e-5)
    state = json.loads((Path(r2["final_path"]) / "training_state.json").read_text())
    assert state["resumed_from"] == r1["final_path"]


def test_resume_with_wrong_shape_raises(tmp_path):
    r1 = LoRATrainer(make_model(), CharTokenizer(), train_config(tmp_path / "a")).train(
        make_examples(8), []
    )
    model = make_model()
    trainer = LoRATrainer(model, CharTokenizer(), train_config(tmp_path / "b", rank=8))
    before = lora_params(model)
    with pytest.raises(RuntimeError, match=str(r1["final_path"])):
        trainer.train(make_examples(8), [], resume_from=r1["final_path"])
    with pytest.raises(RuntimeError, match="No adapter weights"):
        trainer.train(make_examples(8), [], resume_from=tmp_path / "missing")
    after = lora_params(model)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_held_out_replay_with_the_widest_top_k(tmp_path):
    """Only one replay example stores top-k log-probabilities (width 3; the rest
    width 1); whichever it is, held out or replayed, training runs on batches as
    wide as the widest example of every set."""
    failures = make_examples(9)
    plain, wide = make_examples(30)[20:], make_examples(30, with_disagreements=True)[20:]
    for i in range(len(plain)):
        trainer = LoRATrainer(make_model(), CharTokenizer(), train_config(tmp_path / str(i), num_epochs=1))
        result = trainer.train(failures, plain[:i] + [wide[i]] + plain[i + 1 :])
        assert np.isfinite(result["final_loss"])
