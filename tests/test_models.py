"""Model loading, pair checks and exact LoRA adapter swapping in ``speclora.models``."""

from __future__ import annotations

import gc
import json
import re
import shutil
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx_lm
import pytest
from helpers import TinyModelDirs, make_lora_adapter, make_tiny_llama, save_model_dir
from mlx import nn
from mlx_lm.tuner.lora import LoRALinear
from speclora import zoo
from speclora.models import ModelManager

PROMPT = mx.array([[0, 108, 105, 112, 112, 115, 36, 119, 115, 118]])  # "<s>hello wor"


def _manager(target: Path | str, draft: Path | str) -> ModelManager:
    return ModelManager({"models": {"target": str(target), "draft": str(draft)}})


def _structure(model: nn.Module) -> dict[str, int]:
    return {name: id(module) for name, module in model.named_modules()}


@pytest.fixture(scope="module")
def adapters(
    tiny_model_dir: TinyModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "draft": make_lora_adapter(tiny_model_dir.draft, root / "draft", seed=3),
        "draft_mlp": make_lora_adapter(
            tiny_model_dir.draft,
            root / "draft_mlp",
            rank=2,
            alpha=6.0,
            keys=("mlp.up_proj",),
            seed=4,
        ),
        "target": make_lora_adapter(tiny_model_dir.target, root / "target", seed=5),
        "target_last": make_lora_adapter(
            tiny_model_dir.target, root / "target_last", num_layers=1, seed=6
        ),
    }


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: TinyModelDirs) -> tuple[ModelManager, nn.Module, nn.Module]:
    manager = _manager(tiny_model_dir.target, tiny_model_dir.draft)
    target, draft = manager.load_models()
    return manager, target, draft


@pytest.fixture
def manager_and_draft(
    loaded: tuple[ModelManager, nn.Module, nn.Module],
) -> Iterator[tuple[ModelManager, nn.Module]]:
    manager, _, draft = loaded
    yield manager, draft
    manager.unload_lora_adapter(draft)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- models


def test_load_models_returns_pair_and_shared_tokenizer(
    loaded: tuple[ModelManager, nn.Module, nn.Module],
) -> None:
    manager, target, draft = loaded
    assert manager.target_model is target and manager.draft_model is draft
    assert manager.is_loaded
    assert manager.tokenizer.encode("hello")[:2] == [0, 108]
    assert target(PROMPT).shape == draft(PROMPT).shape == (1, PROMPT.shape[1], 260)
    assert not target.training and not draft.training


@pytest.mark.parametrize(("dtype", "expected"), [("auto", mx.float32), ("float16", mx.float16)])
def test_half_precision_weights_compute_in_the_configured_dtype(
    tmp_path: Path, dtype: str, expected: mx.Dtype
) -> None:
    model = make_tiny_llama(32, 1, seed=5)
    model.set_dtype(mx.float16)
    path = save_model_dir(model, tmp_path / "half")
    manager = ModelManager({"models": {"target": str(path), "draft": str(path), "dtype": dtype}})
    target, draft = manager.load_models()
    # auto means float32 on the CPU, where half precision has no fast matmul.
    assert {p.dtype for _, p in nn.utils.tree_flatten(target.parameters())} == {expected}
    assert {p.dtype for _, p in nn.utils.tree_flatten(manager.training_copy_of_draft().parameters())} == {expected}


def test_accessors_before_loading_raise() -> None:
    manager = _manager("/nonexistent/t", "/nonexistent/d")
    with pytest.raises(RuntimeError, match="call load_models"):
        _ = manager.tokenizer


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="generation.max_tokens"):
        ModelManager({"generation": {"max_tokens": 0}})


def test_missing_model_dir_names_ref(
    tiny_model_dir: TinyModelDirs, tmp_path: Path
) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(
        RuntimeError, match=re.escape(f"cannot load model '{missing}'")
    ) as info:
        _manager(tiny_model_dir.target, missing).load_models()
    assert "does not exist" in str(info.value)


def test_bad_config_json_names_ref_and_cause(
    tiny_model_dir: TinyModelDirs, tmp_path: Path
) -> None:
    broken = _copy(tiny_model_dir.draft, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="config.json is not valid JSON") as info:
        _manager(tiny_model_dir.target, broken).load_models()
    assert str(broken) in str(info.value)


def test_missing_weights_names_ref(
    tiny_model_dir: TinyModelDirs, tmp_path: Path
) -> None:
    empty = _copy(tiny_model_dir.draft, tmp_path / "noweights")
    for f in empty.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(RuntimeError, match=re.escape(f"cannot load model '{empty}'")):
        _manager(tiny_model_dir.target, empty).load_models()


def test_unknown_zoo_model_is_a_load_error(tiny_model_dir: TinyModelDirs) -> None:
    with pytest.raises(RuntimeError, match="cannot load model 'zoo:nope'"):
        _manager("zoo:nope", tiny_model_dir.draft).load_models()


@pytest.mark.skipif(
    not (zoo.model_path("target") / "config.json").exists(),
    reason="shipped model weights not built",
)
def test_shipped_pair_loads() -> None:
    manager = ModelManager({})
    target, draft = manager.load_models()
    assert target(mx.array([[0]])).shape == draft(mx.array([[0]])).shape


def test_vocab_size_mismatch_is_refused(
    tiny_model_dir: TinyModelDirs, tmp_path: Path
) -> None:
    wide = save_model_dir(
        make_tiny_llama(32, 1, vocab_size=300, seed=7),
        tmp_path / "wide",
        tokenizer=False,
    )
    with pytest.raises(
        ValueError, match="cannot speculate together: vocab_size 260 != 300"
    ):
        _manager(tiny_model_dir.target, wide).load_models()


def test_logit_width_mismatch_is_refused_when_configs_omit_vocab() -> None:
    # Some configs keep vocab_size elsewhere; the logits' width still decides.
    narrow, wide = (
        make_tiny_llama(32, 1, seed=7),
        make_tiny_llama(32, 1, vocab_size=300, seed=7),
    )
    with pytest.raises(ValueError, match="they output 260 and 300 logits"):
        ModelManager._check_vocab_sizes("t", narrow, {}, "d", wide, {})


def test_tokenizer_special_token_mismatch_is_refused(
    tiny_model_dir: TinyModelDirs, tmp_path: Path
) -> None:
    draft = _copy(tiny_model_dir.draft, tmp_path / "draft")
    config_path = draft / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["pad_token"] = "</s>"
    config_path.write_text(json.dumps(tok_config))
    with pytest.raises(ValueError, match=r"disagree on pad_token_id \(3 != 1\)"):
        _manager(tiny_model_dir.target, draft).load_models()


def test_tokenizer_vocab_mismatch_is_refused(
    tiny_model_dir: TinyModelDirs, tmp_path: Path
) -> None:
    draft = _copy(tiny_model_dir.draft, tmp_path / "draft")
    tok_path = draft / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tok_path.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="vocabularies differ"):
        _manager(tiny_model_dir.target, draft).load_models()


def test_draft_without_tokenizer_uses_targets(
    tiny_model_dir: TinyModelDirs, tmp_path: Path
) -> None:
    bare = save_model_dir(
        make_tiny_llama(32, 1, seed=2), tmp_path / "bare", tokenizer=False
    )
    manager = _manager(tiny_model_dir.target, bare)
    _, draft = manager.load_models()
    assert draft(PROMPT).shape[-1] == 260


# -------------------------------------------------------------------- adapters


@pytest.mark.parametrize("fuse", [True, False])
def test_load_then_unload_restores_base_bitwise(
    manager_and_draft: tuple[ModelManager, nn.Module],
    adapters: dict[str, Path],
    fuse: bool,
) -> None:
    manager, draft = manager_and_draft
    base_logits = draft(PROMPT)
    base_structure = _structure(draft)
    manager.load_lora_adapter(draft, adapters["draft"], fuse=fuse)
    assert not mx.array_equal(draft(PROMPT), base_logits)
    has_lora = any(isinstance(m, LoRALinear) for m in draft.modules())
    assert has_lora is not fuse
    assert manager.unload_lora_adapter(draft)
    assert mx.array_equal(draft(PROMPT), base_logits)
    assert _structure(draft) == base_structure


@pytest.mark.parametrize("fuse", [True, False])
def test_matches_mlx_lm_adapter_loading(
    tiny_model_dir: TinyModelDirs,
    manager_and_draft: tuple[ModelManager, nn.Module],
    adapters: dict[str, Path],
    fuse: bool,
) -> None:
    manager, draft = manager_and_draft
    reference = mlx_lm.load(
        str(tiny_model_dir.draft), adapter_path=str(adapters["draft"])
    )[0]
    expected = reference(PROMPT)
    manager.load_lora_adapter(draft, adapters["draft"], fuse=fuse)
    got = draft(PROMPT)
    if fuse:
        # Fusing reorders the float32 sums: allow a few ulps of the logits' scale.
        error = mx.abs(got - expected).max()
        assert (error <= 1e-5 * mx.abs(expected).max()).item()
    else:
        assert mx.array_equal(got, expected)


def test_unfused_layers_follow_model_mode(
    manager_and_draft: tuple[ModelManager, nn.Module], adapters: dict[str, Path]
) -> None:
    manager, draft = manager_and_draft
    manager.load_lora_adapter(draft, adapters["draft"], fuse=False)
    lora = [m for m in draft.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 2 and not any(m.training for m in lora)


def test_adapter_info(
    manager_and_draft: tuple[ModelManager, nn.Module], adapters: dict[str, Path]
) -> None:
    manager, draft = manager_and_draft
    assert manager.adapter_info(draft)["loaded"] is False
    manager.load_lora_adapter(draft, adapters["draft"])
    assert manager.adapter_info(draft) == {
        "loaded": True,
        "path": str(adapters["draft"]),
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["q_proj", "v_proj"],
        "fused": True,
    }
    manager.unload_lora_adapter(draft)
    assert manager.adapter_info(draft)["loaded"] is False


def test_alpha_derived_from_scale_when_absent(
    manager_and_draft: tuple[ModelManager, nn.Module],
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    manager, draft = manager_and_draft
    adapter = _copy(adapters["draft_mlp"], tmp_path / "noalpha")
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["lora_parameters"]["alpha"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    manager.load_lora_adapter(draft, adapter)
    info = manager.adapter_info(draft)
    assert info["alpha"] == pytest.approx(6.0) and info["rank"] == 2
    assert info["target_modules"] == ["up_proj"]


def test_unload_without_adapter_returns_false(
    manager_and_draft: tuple[ModelManager, nn.Module],
) -> None:
    manager, draft = manager_and_draft
    assert manager.unload_lora_adapter(draft) is False


def test_second_adapter_replaces_first(
    manager_and_draft: tuple[ModelManager, nn.Module], adapters: dict[str, Path]
) -> None:
    manager, draft = manager_and_draft
    base_logits = draft(PROMPT)
    manager.load_lora_adapter(draft, adapters["draft_mlp"])
    only_mlp = draft(PROMPT)
    manager.load_lora_adapter(draft, adapters["draft"], fuse=False)
    manager.load_lora_adapter(draft, adapters["draft_mlp"])
    assert mx.array_equal(draft(PROMPT), only_mlp)
    assert manager.adapter_info(draft)["target_modules"] == ["up_proj"]
    manager.unload_lora_adapter(draft)
    assert mx.array_equal(draft(PROMPT), base_logits)


def _remove(name: str) -> Callable[[Path], None]:
    def remove(adapter: Path) -> None:
        (adapter / name).unlink()

    return remove


def _write(name: str, text: str) -> Callable[[Path], None]:
    def write(adapter: Path) -> None:
        (adapter / name).write_text(text)

    return write


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        for key, value in changes.items():
            if key in ("rank", "scale", "keys", "alpha"):
                config["lora_parameters"][key] = value
            else:
                config[key] = value
        (adapter / "adapter_config.json").write_text(json.dumps(config))

    return edit


def _truncate(adapter: Path) -> None:
    weights = adapter / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _drop_tensor(adapter: Path) -> None:
    weights = cast(dict[str, mx.array], mx.load(str(adapter / "adapters.safetensors")))
    weights.pop(min(weights))
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)


CORRUPTIONS = {
    "missing_config": (_remove("adapter_config.json"), "has no adapter_config.json"),
    "config_not_json": (
        _write("adapter_config.json", "{"),
        "adapter_config.json is not valid JSON",
    ),
    "config_not_object": (
        _write("adapter_config.json", "[]"),
        "must hold a JSON object",
    ),
    "missing_weights": (_remove("adapters.safetensors"), "has no adapters.safetensors"),
    "truncated_weights": (_truncate, "adapters.safetensors is unreadable or corrupt"),
    "garbage_weights": (
        _write("adapters.safetensors", "garbage"),
        "adapters.safetensors is unreadable or corrupt",
    ),
    "dora": (_edit_config(fine_tune_type="dora"), "unsupported fine_tune_type 'dora'"),
    "full": (_edit_config(fine_tune_type="full"), "unsupported fine_tune_type 'full'"),
    "bad_rank": (_edit_config(rank=0), "lora_parameters.rank must be an integer >= 1"),
    "inconsistent_alpha": (_edit_config(alpha=100.0), "disagrees with scale"),
    "bad_num_layers": (_edit_config(num_layers=0), "num_layers must be -1"),
    "too_many_layers": (_edit_config(num_layers=5), "exceeds the model's 1 blocks"),
    "keys_match_nothing": (_edit_config(keys=["self_attn.nothing"]), "match no layer"),
    "missing_tensor": (_drop_tensor, "missing from adapters.safetensors"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("previous", ["base", "fused", "unfused"])
def test_failed_load_names_path_and_leaves_model_unchanged(
    manager_and_draft: tuple[ModelManager, nn.Module],
    adapters: dict[str, Path],
    tmp_path: Path,
    corruption: str,
    previous: str,
) -> None:
    manager, draft = manager_and_draft
    if previous != "base":
        manager.load_lora_adapter(
            draft, adapters["draft_mlp"], fuse=previous == "fused"
        )
    logits, structure, info = (
        draft(PROMPT),
        _structure(draft),
        manager.adapter_info(draft),
    )
    corrupt, expected_message = CORRUPTIONS[corruption]
    adapter = _copy(adapters["draft"], tmp_path / "adapter")
    corrupt(adapter)
    with pytest.raises(RuntimeError, match=re.escape(expected_message)) as error:
        manager.load_lora_adapter(draft, adapter)
    assert str(adapter) in str(error.value)
    assert mx.array_equal(draft(PROMPT), logits)
    assert _structure(draft) == structure
    assert manager.adapter_info(draft) == info


@pytest.mark.parametrize("fuse", [True, False])
def test_wrong_shape_adapter_is_refused_and_model_unchanged(
    manager_and_draft: tuple[ModelManager, nn.Module],
    adapters: dict[str, Path],
    fuse: bool,
) -> None:
    manager, draft = manager_and_draft
    logits, structure = draft(PROMPT), _structure(draft)
    # An adapter for the 64-wide target does not fit the 32-wide draft.
    with pytest.raises(RuntimeError, match="does not fit this model") as error:
        manager.load_lora_adapter(draft, adapters["target"], fuse=fuse)
    assert str(adapters["target"]) in str(error.value)
    assert "shape (64, 4), the model expects (32, 4)" in str(error.value)
    assert mx.array_equal(draft(PROMPT), logits)
    assert _structure(draft) == structure


def test_missing_adapter_dir_is_refused(
    manager_and_draft: tuple[ModelManager, nn.Module], tmp_path: Path
) -> None:
    manager, draft = manager_and_draft
    with pytest.raises(
        RuntimeError,
        match=re.escape(f"LoRA adapter {tmp_path / 'gone'} does not exist"),
    ):
        manager.load_lora_adapter(draft, tmp_path / "gone")


def test_adapter_on_target_applies_to_last_layers(
    loaded: tuple[ModelManager, nn.Module, nn.Module], adapters: dict[str, Path]
) -> None:
    manager, target, _ = loaded
    base_logits = target(PROMPT)
    manager.load_lora_adapter(target, adapters["target_last"], fuse=False)
    try:
        assert not isinstance(target.layers[0].self_attn.q_proj, LoRALinear)
        assert isinstance(target.layers[1].self_attn.q_proj, LoRALinear)
    finally:
        manager.unload_lora_adapter(target)
    assert mx.array_equal(target(PROMPT), base_logits)


def test_manager_does_not_keep_models_alive(adapters: dict[str, Path]) -> None:
    manager = _manager("/nonexistent/t", "/nonexistent/d")
    model = make_tiny_llama(32, 1, seed=2)
    manager.load_lora_adapter(model, adapters["draft"])
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------ adapter aliases


def test_aliases_resolve_into_checkpoint_dir(tmp_path: Path) -> None:
    for alias in ("best", "final", "latest"):
        assert (
            ModelManager.resolve_adapter_path(alias, tmp_path)
            == tmp_path.resolve() / alias
        )


def test_bare_checkpoint_name_resolves_into_checkpoint_dir(tmp_path: Path) -> None:
    (tmp_path / "step_100").mkdir()
    assert (
        ModelManager.resolve_adapter_path("step_100", tmp_path)
        == tmp_path.resolve() / "step_100"
    )


def test_unknown_name_lists_aliases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        RuntimeError, match=r"adapter 'bset' not found: .*best, final, latest"
    ):
        ModelManager.resolve_adapter_path("bset", tmp_path / "ckpt")


def test_explicit_paths_may_point_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ckpt"
    monkeypatch.chdir(ckpt.parent)
    outside = tmp_path / "elsewhere" / "adapter"
    assert ModelManager.resolve_adapter_path(outside, ckpt) == outside
    assert ModelManager.resolve_adapter_path(str(outside), ckpt) == outside
    assert (
        ModelManager.resolve_adapter_path("../x/adapter", ckpt)
        == tmp_path.parent / "x" / "adapter"
    )
    assert (
        ModelManager.resolve_adapter_path("rel/adapter", ckpt)
        == tmp_path / "rel" / "adapter"
    )


def test_alias_escaping_checkpoint_dir_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (ckpt / "best").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="outside checkpoint_dir"):
        ModelManager.resolve_adapter_path("best", ckpt)
