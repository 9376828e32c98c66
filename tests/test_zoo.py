"""The shipped target/draft pair, its prompts and the script that builds them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import speclora
from speclora import zoo
from speclora.zoo.corpus import split_of

MIN_PROMPTS = {"eval": 64, "train": 256}


def _records(root: Path, domain: str) -> list[dict]:
    with open(root / "prompts" / f"{domain}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_manifest_files(root: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    for name in ("target", "draft"):
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert f"{name}/{f}" in manifest["files"]
    for rel, digest in manifest["files"].items():
        assert _sha256(root / rel) == digest, rel


def test_model_path_names_the_shipped_dirs():
    assert zoo.model_path("target") == zoo.ZOO_DIR / "target"
    assert zoo.model_path("draft") == zoo.ZOO_DIR / "draft"


def test_model_path_rejects_unknown_name():
    with pytest.raises(ValueError, match="'verifier'.*target.*draft"):
        zoo.model_path("verifier")


def test_resolve_maps_zoo_refs_and_passes_others_through():
    assert zoo.resolve("zoo:draft") == str(zoo.ZOO_DIR / "draft")
    assert (
        zoo.resolve("mlx-community/Qwen3-0.6B-4bit") == "mlx-community/Qwen3-0.6B-4bit"
    )
    assert zoo.resolve("/models/local") == "/models/local"
    with pytest.raises(ValueError, match="'big'"):
        zoo.resolve("zoo:big")


@pytest.mark.parametrize("domain, split", [("poetry", "eval"), ("code", "test")])
def test_load_prompts_rejects_unknown_domain_or_split(domain, split):
    with pytest.raises(ValueError, match=repr(domain if domain == "poetry" else split)):
        zoo.load_prompts(domain, split)


@pytest.mark.parametrize("domain", ["prose", "code"])
def test_prompt_sets_have_required_sizes(domain):
    for split, minimum in MIN_PROMPTS.items():
        prompts = zoo.load_prompts(domain, split)
        assert len(prompts) >= minimum
        assert all(p.strip() for p in prompts)


@pytest.mark.parametrize("domain", ["prose", "code"])
def test_prompts_come_from_disjoint_heldout_documents(domain):
    records = _records(zoo.ZOO_DIR, domain)
    docs = {
        s: {r["doc"] for r in records if r["split"] == s} for s in ("train", "eval")
    }
    assert docs["train"].isdisjoint(docs["eval"])
    # Documents map to splits by a hash of their path: none was trained on.
    assert {split_of(domain, d) for d in docs["eval"]} == {"eval"}
    assert {split_of(domain, d) for d in docs["train"]} == {"prompt-train"}
    assert len({r["id"] for r in records}) == len(records)


def test_manifest_hashes_match_shipped_files():
    _check_manifest_files(zoo.ZOO_DIR)


def test_manifest_matches_the_build_configuration():
    from dataclasses import asdict

    from speclora.zoo.build import full_config

    manifest = json.loads((zoo.ZOO_DIR / "manifest.json").read_text())
    cfg = full_config()
    assert manifest["seq_len"] == cfg.seq_len
    assert manifest["context_len"] == cfg.context_len
    for name in ("target", "draft"):
        config = json.loads((zoo.model_path(name) / "config.json").read_text())
        tokenizer = json.loads((zoo.model_path(name) / "tokenizer_config.json").read_text())
        assert config["max_position_embeddings"] == tokenizer["model_max_length"] == cfg.context_len
    for name in ("target", "draft"):
        entry = manifest["models"][name]
        assert entry["architecture"] == asdict(cfg.models[name])
        assert entry["training"] == asdict(cfg.training[name])


def test_manifest_records_the_domain_shift():
    manifest = json.loads((zoo.ZOO_DIR / "manifest.json").read_text())
    losses = {n: manifest["models"][n]["losses"] for n in ("target", "draft")}
    for domain in ("prose", "code"):
        key = f"heldout_{domain}"
        assert losses["draft"][key] - losses["target"][key] >= 0.3


def test_target_and_draft_share_the_tokenizer():
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (zoo.model_path("target") / name).read_bytes() == (
            zoo.model_path("draft") / name
        ).read_bytes()
    configs = [
        json.loads((zoo.model_path(n) / "config.json").read_text())
        for n in ("target", "draft")
    ]
    assert configs[0]["vocab_size"] == configs[1]["vocab_size"]
    assert all(c["model_type"] == "llama" for c in configs)


def test_tokenizer_prepends_bos_round_trips_and_templates_as_plain_text():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo.model_path("target")))
    text = "def f(x):\n\treturn  x ** 2  # carré ✓\n\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == tok.bos_token + text


def test_shipped_pair_loads_with_mlx_lm_and_generates():
    import mlx_lm

    target, tokenizer = mlx_lm.load(str(zoo.model_path("target")))[:2]
    draft, draft_tokenizer = mlx_lm.load(str(zoo.model_path("draft")))[:2]
    assert draft_tokenizer.vocab_size == tokenizer.vocab_size
    prompt = zoo.load_prompts("prose", "eval")[0]
    out = list(mlx_lm.stream_generate(target, tokenizer, prompt, max_tokens=4))
    assert len(out) == 4
    assert all(0 <= r.token < tokenizer.vocab_size for r in out)
    spec = list(
        mlx_lm.stream_generate(
            target,
            tokenizer,
            prompt,
            max_tokens=4,
            draft_model=draft,
            num_draft_tokens=3,
        )
    )
    assert len(spec) == 4


def _quick_build(out: Path, *extra: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(speclora.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    command = [
        sys.executable,
        "-m",
        "speclora.zoo",
        "build",
        "--quick",
        "--out",
        str(out),
    ]
    subprocess.run(
        [*command, *extra], check=True, env=env, capture_output=True, timeout=300
    )


def test_quick_build_runs_end_to_end_and_reproduces_its_files(tmp_path):
    import mlx_lm

    _quick_build(tmp_path)
    _check_manifest_files(tmp_path)
    for domain in ("prose", "code"):
        splits = {r["split"] for r in _records(tmp_path, domain)}
        assert splits == {"train", "eval"}
    model, tokenizer = mlx_lm.load(str(tmp_path / "draft"))[:2]
    out = list(mlx_lm.stream_generate(model, tokenizer, "import os\n", max_tokens=3))
    assert 1 <= len(out) <= 3

    # Retraining one model from scratch must give byte-identical files; the
    # draft learns from the saved target, as in a full build.
    first = json.loads((tmp_path / "manifest.json").read_text())["files"]
    for name in ("target", "draft"):
        _quick_build(tmp_path, "--only", name)
        assert json.loads((tmp_path / "manifest.json").read_text())["files"] == first


def _tiny_pair_and_sampler():
    import numpy as np
    from speclora.zoo.train import ModelSpec, WindowSampler, build_model

    def make(spec, seed):
        config = spec.config(vocab_size=64, max_len=32, bos_id=0, eos_id=1)
        return build_model(spec, config, seed)

    teacher = make(ModelSpec(32, 2, 64, 2, 2), seed=3)
    student = make(ModelSpec(16, 1, 32, 1, 1), seed=4)
    stream = np.random.default_rng(0).integers(2, 64, size=4000).astype(np.int32)
    sampler = WindowSampler({"prose": stream}, bos_id=0, seq_len=32)
    return teacher, student, sampler


def _spec(steps: int, teacher: str | None):
    from speclora.zoo.train import TrainSpec

    return TrainSpec(
        steps=steps,
        batch_size=4,
        seq_len=32,
        learning_rate=1e-2,
        warmup_steps=1,
        weight_decay=0.0,
        mix={"prose": 1.0},
        seed=0,
        teacher=teacher,
    )


def test_distillation_moves_the_student_towards_the_teacher():
    import mlx.core as mx
    from speclora.zoo.train import _distill_loss, train

    teacher, student, sampler = _tiny_pair_and_sampler()
    windows = mx.array(sampler.fixed_windows("prose", 8))

    def kl() -> float:
        # Cross-entropy against the teacher minus the teacher's own entropy.
        return (
            _distill_loss(student, windows, teacher)
            - _distill_loss(teacher, windows, teacher)
        ).item()

    before = kl()
    train(student, sampler, _spec(40, "target"), teacher=teacher, log=lambda _: None)
    after = kl()
    assert after < 0.5 * before


def test_train_requires_a_teacher_exactly_when_the_spec_names_one():
    from speclora.zoo.train import train

    teacher, student, sampler = _tiny_pair_and_sampler()
    with pytest.raises(ValueError, match="teacher"):
        train(student, sampler, _spec(1, "target"))
    with pytest.raises(ValueError, match="teacher"):
        train(student, sampler, _spec(1, None), teacher=teacher)


def test_build_rejects_a_model_teaching_itself_or_its_teacher():
    import dataclasses

    from speclora.zoo.build import _training_order, quick_config

    cfg = quick_config()
    cfg.training["target"] = dataclasses.replace(
        cfg.training["target"], teacher="target"
    )
    with pytest.raises(ValueError, match="teacher 'target'"):
        _training_order(cfg)
    cfg.training["target"] = dataclasses.replace(
        cfg.training["target"], teacher="draft"
    )
    with pytest.raises(ValueError, match="one another"):
        _training_order(cfg)
