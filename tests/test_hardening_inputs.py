# mypy: disable-error-code="arg-type,list-item"
# (wrong argument types are what this file passes on purpose)
"""Bad input: fuzzed native ops and config, hostile API arguments and broken
stored data. Each must end in the documented exception, naming what is wrong,
with nothing stored lost and nothing read or written where it does not belong.

Cases covered elsewhere are not repeated here: ``test_system.py`` (whitespace,
non-string and too-long prompts, ``max_tokens=0``, negative and NaN temperature,
unknown mode and alias, missing draft directory), ``test_models.py`` (every
corruption of an adapter directory at the manager level),
``test_data_collector.py`` (corrupt rows, newer records, hostile ids),
``test_config.py`` (wrong types and ranges key by key, one unsafe tag).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import fuzz_ops
import mlx.core as mx
import numpy as np
import pytest
import yaml
from helpers import make_lora_adapter, make_tiny_llama, save_model_dir, synthetic_example, tiny_system_config
from hypothesis import given
from hypothesis import strategies as st
from speclora import SpeculativeDecodingSystem
from speclora.acceptance import speculative_accept
from speclora.cache import kv_ring_write
from speclora.config import _SECTIONS, Config, load_config
from speclora.data_collector import DataCollector

PROMPT = "def fibonacci(n):"


def tree_digest(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file under ``root`` outside ``skip`` (relative path -> sha256)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(s == p or s in p.parents for s in skip):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# =============================================================== native ops

CI_EXAMPLES = {"speculative_accept": 300, "kv_ring_write": 300, "RollbackKVCache": 200}


@pytest.mark.parametrize("target", sorted(fuzz_ops.TARGETS))
def test_native_op_fuzz(target: str) -> None:
    # scripts/asan_fuzz.sh runs the same targets under AddressSanitizer.
    counts = fuzz_ops.run_target(target, CI_EXAMPLES[target])
    assert counts["result"] > 0 and counts["ValueError"] > 0, counts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_huge_draft_length(temperature: float) -> None:
    K, V = 100_000, 2
    target = mx.zeros((1, K + 1, V)).at[:, :, 1].add(1.0)  # argmax 1 everywhere
    n, tokens = speculative_accept(
        mx.ones((1, K), mx.int32),
        mx.zeros((1, K, V)),
        target,
        temperature=temperature,
        key=mx.random.key(0),
    )
    assert tokens.shape == (1, K + 1)
    if temperature == 0:
        assert n.item() == K and tokens[0, -1].item() == 1


@pytest.mark.parametrize(
    "dtype, value",
    [(mx.int64, 2**32 + 1), (mx.uint64, 2**64 - 1), (mx.uint32, 2**32 - 1)],
)
def test_draft_ids_past_int32_are_rejected_not_wrapped(
    dtype: mx.Dtype, value: int
) -> None:
    # Narrowed to int32 these would read as in-vocabulary ids (1, -1 or -1).
    np_dtype = np.dtype(str(dtype).split(".")[-1])
    drafts = mx.array(np.array([[value]], dtype=np_dtype))
    target = mx.zeros((1, 2, 4)).at[:, :, 1].add(1.0)
    n, tokens = speculative_accept(drafts, mx.zeros((1, 1, 4)), target, validate=False)
    assert n.tolist() == [0] and tokens.tolist() == [[1, -1]]


@pytest.mark.parametrize(
    "start", [np.array([2**32 + 1], np.int64), np.array([2**64 - 1], np.uint64)]
)
def test_ring_positions_past_int32_are_skipped_not_wrapped(start: np.ndarray) -> None:
    cache = mx.zeros((1, 1, 4, 2))
    out = kv_ring_write(
        cache, mx.ones((1, 1, 2, 2)), mx.array(start), keep=0, capacity=0
    )
    assert mx.array_equal(out, cache).item()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: speculative_accept(
                np.zeros((1, 1), np.int32), mx.zeros((1, 1, 3)), mx.zeros((1, 2, 3))
            ),
            "draft_tokens must be an mx.array, got ndarray",
        ),
        (
            lambda: speculative_accept([[0]], mx.zeros((1, 1, 3)), mx.zeros((1, 2, 3))),
            "draft_tokens must be an mx.array, got list",
        ),
        (
            lambda: speculative_accept(
                mx.zeros((1, 1), mx.int32),
                mx.zeros((1, 1, 3)),
                mx.zeros((1, 2, 3)),
                temperature="1",
            ),
            "temperature must be a float, got '1'",
        ),  # type: ignore[arg-type]
        (
            lambda: kv_ring_write(
                mx.zeros((1, 1, 4, 2)), mx.ones((1, 1, 1, 2)), [0], keep=0, capacity=0
            ),
            "start must be an mx.array, got list",
        ),  # type: ignore[arg-type]
        (
            lambda: kv_ring_write(
                mx.zeros((1, 1, 4, 2)),
                mx.ones((1, 1, 1, 2)),
                mx.array([0]),
                keep=2**40,
                capacity=0,
            ),
            f"keep must be a 32-bit int, got {2**40}",
        ),
    ],
    ids=[
        "numpy tokens",
        "list tokens",
        "string temperature",
        "list start",
        "keep past int32",
    ],
)
def test_non_array_or_out_of_range_arguments(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(
        ValueError, match=r"^\[\w+\] " + message.replace("(", r"\(").replace(")", r"\)")
    ):
        call()


# =============================================================== configuration

_FIELDS = {
    name: [f.name for f in dataclasses.fields(cast(Any, kind))]
    for name, kind in _SECTIONS.items()
}
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 16, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["zoo:target", "best", "~", "..", "/", "INFO", "fast", "q_proj", "1e-4"]
    ),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def config_dicts(draw: st.DrawFn) -> Any:
    """Mostly well-formed section / key structure with arbitrary values."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_VALUES)  # not a mapping at all
    config: dict[Any, Any] = {}
    for section in draw(
        st.lists(st.sampled_from([*_FIELDS, "extra", 3, None]), max_size=4, unique=True)
    ):
        if section not in _FIELDS or draw(st.integers(0, 7)) == 0:
            config[section] = draw(_VALUES)
            continue
        keys = draw(
            st.lists(
                st.sampled_from([*_FIELDS[section], "unknown_key"]),
                max_size=4,
                unique=True,
            )
        )
        config[section] = {k: draw(_VALUES) for k in keys}
    return config


@fuzz_ops.fuzz_settings(300)
@given(config_dicts())
def test_config_fuzz_only_value_errors(data: Any) -> None:
    try:
        config = Config.from_dict(data, base_dir="/base")
    except ValueError as e:
        assert str(e)
        return
    # What validates is a fixed point.
    assert Config.from_dict(config.to_dict(), base_dir="/base") == config


@fuzz_ops.fuzz_settings(150)
@given(
    st.one_of(
        st.text(max_size=200),
        config_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    )
)
def test_config_file_fuzz_only_value_errors(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        loaded = load_config(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert set(loaded) == set(_FIELDS)


@pytest.mark.parametrize(
    "text",
    [
        '!!python/object/apply:os.system ["touch {marker}"]\n',
        "models: !!python/object/new:os.system [touch {marker}]\n",
        "models: !!python/name:os.system\n",
        "models: !!python/module:os\n",
        "models: !!python/object:speclora.config.Config {}\n",
        "generation:\n  max_tokens: 1" + "0" * 5000 + "\n",
        "models: " + "[" * 20_000 + "]" * 20_000 + "\n",
        "a: " + "{b: " * 20_000 + "1" + "}" * 20_000 + "\n",
        "generation:\n  stop_tokens: &a [*a]\n",
        "models:\n  target: !!binary aGVsbG8=\n",
        "models:\n  target: 2001-12-14\n",
        "\xff\xfe\x00m",
    ],
    ids=[
        "object/apply",
        "object/new",
        "python/name",
        "python/module",
        "python/object",
        "5000-digit int",
        "deeply nested list",
        "deeply nested map",
        "self-referencing list",
        "binary",
        "date",
        "not UTF-8",
    ],
)
def test_hostile_config_files(tmp_path: Path, text: str) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "config.yaml"
    if text.startswith("\xff"):
        path.write_bytes(text.encode("latin-1"))
    else:
        path.write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"cannot read config file {tmp_path}"):
        load_config(tmp_path)


# =============================================================== API arguments


@pytest.fixture(scope="module")
def bad_models(
    tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_models")
    other_vocab = save_model_dir(
        make_tiny_llama(32, 1, vocab_size=300, seed=3), root / "other_vocab"
    )
    no_config = root / "no_config"
    shutil.copytree(tiny_model_dir.draft, no_config)
    (no_config / "config.json").unlink()
    bad_json = root / "bad_json"
    shutil.copytree(tiny_model_dir.draft, bad_json)
    (bad_json / "config.json").write_text("{ not json")
    a_file = root / "a_file"
    a_file.write_text("not a model")
    return {
        "other_vocab": other_vocab,
        "no_config": no_config,
        "bad_json": bad_json,
        "a_file": a_file,
    }


@pytest.mark.parametrize(
    "draft, error, message",
    [
        ("other_vocab", ValueError, "vocab_size 260 != 300"),
        ("no_config", RuntimeError, "has no config.json"),
        ("bad_json", RuntimeError, "config.json is not valid JSON"),
        ("a_file", RuntimeError, "is not a directory"),
    ],
)
def test_unusable_draft_model(
    tiny_model_dir: Any,
    bad_models: dict[str, Path],
    tmp_path: Path,
    draft: str,
    error: type,
    message: str,
) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path)
    config["models"]["draft"] = str(bad_models[draft])
    system = SpeculativeDecodingSystem(config)
    with pytest.raises(error, match=message) as info:
        system.initialize()
    if error is RuntimeError:
        assert str(bad_models[draft]) in str(info.value)
    # Nothing half-initialized is left to use.
    with pytest.raises(RuntimeError, match="initialize"):
        system.generate("hi")


@pytest.fixture(scope="module")
def trained(
    tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A system with a trained adapter in use and two failures pending, and the
    adapter directories the table below tries to load."""
    root = tmp_path_factory.mktemp("api")
    system = SpeculativeDecodingSystem(tiny_system_config(tiny_model_dir, root))
    system.initialize()
    assert system.collector is not None
    for i in range(2):
        system.collector.add_failure(synthetic_example(f"trained-{i}", i))
    system.train()
    for i in range(2):
        system.collector.add_failure(synthetic_example(f"pending-{i}", 10 + i))
    best = Path(system.config.training.checkpoint_dir) / "best"
    adapters = root / "adapters"
    paths = {
        "other_model": make_lora_adapter(
            tiny_model_dir.target, adapters / "other_model", rank=4
        )
    }
    for name in ("truncated", "bad_json", "json_list", "nan"):
        shutil.copytree(best, adapters / name)
        paths[name] = adapters / name
    weights = paths["truncated"] / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (paths["bad_json"] / "adapter_config.json").write_text(
        '{"fine_tune_type": "lora", '
    )
    (paths["json_list"] / "adapter_config.json").write_text("[1, 2]")
    nan_weights = mx.load(str(paths["nan"] / "adapters.safetensors"))
    assert isinstance(nan_weights, dict)
    name = min(nan_weights)
    nan_weights[name] = mx.full(nan_weights[name].shape, float("nan"))
    mx.save_safetensors(str(paths["nan"] / "adapters.safetensors"), nan_weights)
    paths["file"] = weights
    yield {
        "system": system,
        "best": best,
        "paths": paths,
        "output": system.generate(PROMPT),
        "adapter": system.get_adapter_info(),
        "prompt_tokens": len(system.decoder.encode_prompt("hi")),
    }
    system.collector.close()


S = SpeculativeDecodingSystem
# (call, exception, message); each call gets the system and the `trained` fixture.
API_CASES: dict[
    str, tuple[Callable[[S, dict[str, Any]], object], type[BaseException], str]
] = {
    "empty prompt": (lambda s, t: s.generate(""), ValueError, "empty"),
    "newline and tab prompt": (lambda s, t: s.generate("\n\t\r"), ValueError, "empty"),
    "enormous prompt": (
        lambda s, t: s.generate("x" * 1_000_000),
        MemoryError,
        "context window",
    ),
    "bytes prompt": (
        lambda s, t: s.generate(b"hi"),
        ValueError,
        "prompt must be a string, got bytes",
    ),
    "None prompt": (
        lambda s, t: s.generate(None),
        ValueError,
        "prompt must be a string, got NoneType",
    ),
    "token-list prompt": (
        lambda s, t: s.generate([1, 2, 3]),
        ValueError,
        "prompt must be a string, got list",
    ),
    "negative max_tokens": (
        lambda s, t: s.generate("hi", max_tokens=-1),
        ValueError,
        "max_tokens must be an integer >= 1, got -1",
    ),
    "float max_tokens": (
        lambda s, t: s.generate("hi", max_tokens=2.0),
        ValueError,
        "max_tokens .* got 2.0",
    ),
    "bool max_tokens": (
        lambda s, t: s.generate("hi", max_tokens=True),
        ValueError,
        "max_tokens .* got True",
    ),
    "huge max_tokens": (
        lambda s, t: s.generate("hi", max_tokens=10**12),
        MemoryError,
        "context window of 512",
    ),
    "max_tokens one past the context": (
        lambda s, t: s.generate("hi", max_tokens=512 - t["prompt_tokens"] + 1),
        MemoryError,
        "= 513 exceeds",
    ),
    "infinite temperature": (
        lambda s, t: s.generate("hi", temperature=math.inf),
        ValueError,
        "temperature .* got inf",
    ),
    "string temperature": (
        lambda s, t: s.generate("hi", temperature="0.5"),
        ValueError,
        "temperature .* got '0.5'",
    ),
    "bool temperature": (
        lambda s, t: s.generate("hi", temperature=True),
        ValueError,
        "temperature .* got True",
    ),
    "upper-case mode": (
        lambda s, t: s.generate("hi", mode="FAST"),
        ValueError,
        "mode must be one of .* got 'FAST'",
    ),
    # (mode=None means generation.mode.)
    "integer mode": (lambda s, t: s.generate("hi", mode=1), ValueError, "got 1"),
    "non-string in a batch": (
        lambda s, t: s.batch_generate(["hi", 3], show_progress=False),
        ValueError,
        "got int",
    ),
    "empty adapter path": (
        lambda s, t: s.load_adapter(""),
        ValueError,
        "non-empty string, got ''",
    ),
    "None adapter path": (lambda s, t: s.load_adapter(None), ValueError, "got None"),
    "adapter of another model": (
        lambda s, t: s.load_adapter(str(t["paths"]["other_model"])),
        RuntimeError,
        "does not fit this model",
    ),
    "truncated adapters.safetensors": (
        lambda s, t: s.load_adapter(str(t["paths"]["truncated"])),
        RuntimeError,
        "adapters.safetensors is unreadable or corrupt",
    ),
    "corrupt adapter_config.json": (
        lambda s, t: s.load_adapter(str(t["paths"]["bad_json"])),
        RuntimeError,
        "adapter_config.json is not valid JSON",
    ),
    "adapter_config.json not an object": (
        lambda s, t: s.load_adapter(str(t["paths"]["json_list"])),
        RuntimeError,
        "must hold a JSON object, got list",
    ),
    "NaN adapter weights": (
        lambda s, t: s.load_adapter(str(t["paths"]["nan"])),
        RuntimeError,
        "NaN or infinite",
    ),
    "adapter path is a file": (
        lambda s, t: s.load_adapter(str(t["paths"]["file"])),
        RuntimeError,
        "is not a directory",
    ),
    "root directory as adapter": (
        lambda s, t: s.load_adapter("/"),
        RuntimeError,
        "has no adapter_config.json",
    ),
    "zero epochs": (
        lambda s, t: s.train(num_epochs=0),
        ValueError,
        "num_epochs must be an int >= 1, got 0",
    ),
    "NaN learning rate": (
        lambda s, t: s.train(learning_rate=math.nan),
        ValueError,
        "learning_rate .* got nan",
    ),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_bad_api_argument(trained: dict[str, Any], case: str) -> None:
    call, error, message = API_CASES[case]
    system: SpeculativeDecodingSystem = trained["system"]
    assert system.collector is not None
    with pytest.raises(error, match=message):
        call(system, trained)
    # The adapter in use, the pending failures and the output are untouched.
    assert system.get_adapter_info() == trained["adapter"]
    assert sorted(f.id for f in system.collector.load_failures()) == [
        "pending-0",
        "pending-1",
    ]
    assert system.generate(PROMPT) == trained["output"]


def test_prompt_with_a_lone_surrogate_is_a_value_error(trained: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="prompt"):
        trained["system"].generate("\ud800 text")


def test_enormous_prompt_is_refused_before_tokenizing(trained: dict[str, Any]) -> None:
    import time

    start = time.perf_counter()
    with pytest.raises(MemoryError):
        trained["system"].generate("x" * 10_000_000)
    # Tokenizing 10 M characters takes seconds and gigabytes; refusing is instant.
    assert time.perf_counter() - start < 1.0


# =============================================================== stored data


def test_broken_and_hostile_records_do_not_stop_training(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path / "run")
    data_dir = Path(config["collection"]["data_dir"])
    collector = DataCollector(data_dir)
    hostile = ["../../escape", str(tmp_path / "absolute"), "ok"]
    for i, example_id in enumerate(hostile):
        collector.add_failure(synthetic_example(example_id, i))
    newer = json.dumps({**synthetic_example("future").to_dict(), "new_field": 1})
    with sqlite3.connect(collector.db_path) as conn:
        conn.executemany(
            "INSERT INTO failures (id, version, payload) VALUES (?, ?, ?)",
            [
                ("truncated", 1, synthetic_example("truncated").to_dict().__repr__()[:40]),
                (
                    "bad-field",
                    1,
                    json.dumps(
                        {**synthetic_example("bad-field").to_dict(), "acceptance_rate": 7}
                    ),
                ),
                ("future", 2, newer),
            ],
        )
    collector.close()
    before = tree_digest(tmp_path, skip=(data_dir,))

    system = SpeculativeDecodingSystem(config)
    system.initialize()
    assert system.collector is not None
    results = system.train()
    assert results["num_examples"] == 3
    assert sorted(f.id for f in system.collector.load_replay_buffer()) == sorted(
        hostile
    )
    with sqlite3.connect(system.collector.db_path) as conn:
        # The newer record waits for a newer version; the corrupt ones are kept aside.
        assert conn.execute("SELECT id, version FROM failures").fetchall() == [
            ("future", 2)
        ]
        assert sorted(r[0] for r in conn.execute("SELECT id FROM quarantine")) == [
            "bad-field",
            "truncated",
        ]
    # Nothing was written outside data_dir and checkpoint_dir.
    after = tree_digest(
        tmp_path, skip=(data_dir, Path(config["training"]["checkpoint_dir"]))
    )
    assert after == before


def test_truncated_collector_database_is_refused_and_kept(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path)
    collector = DataCollector(config["collection"]["data_dir"])
    for i in range(30):
        collector.add_failure(
            dataclasses.replace(synthetic_example(f"x{i}", i), prompt="p" * 3000)
        )
    collector.close()
    db = collector.db_path
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    damaged = db.read_bytes()
    system = SpeculativeDecodingSystem(config)
    with pytest.raises(RuntimeError, match="malformed") as info:
        system.initialize()
    assert str(db.parent) in str(info.value)
    assert db.read_bytes() == damaged  # left for the user to recover, not overwritten
    with pytest.raises(RuntimeError, match="initialize"):
        system.generate("hi")


@pytest.fixture
def outside_adapter(trained: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the trained adapter outside checkpoint_dir, next to leftovers
    that checkpoint recovery would act on inside checkpoint_dir."""
    outside = tmp_path / "outside"
    shutil.copytree(trained["best"], outside / "mine")
    for leftover in (".tmp-other-1234", ".old-other"):
        (outside / leftover).mkdir()
        (outside / leftover / "keep.txt").write_text("not ours")
    return outside / "mine"


def test_adapter_path_with_dot_dot_is_read_only(
    tiny_model_dir: Any,
    tmp_path: Path,
    outside_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path / "run")
    checkpoints = Path(config["training"]["checkpoint_dir"])
    checkpoints.mkdir(parents=True)
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    assert system.collector is not None
    before = tree_digest(outside_adapter.parent)
    monkeypatch.chdir(checkpoints)
    # Not an alias (it has a separator): an explicit path, read from where it is.
    assert system.load_adapter("../../outside/mine") is True
    assert system.get_adapter_info()["path"] == str(outside_adapter)
    for i in range(2):
        system.collector.add_failure(synthetic_example(f"f{i}", i))
    system.train()  # continues from the outside adapter, writes into checkpoint_dir
    assert tree_digest(outside_adapter.parent) == before
    assert (checkpoints / "best").is_dir()


def test_resuming_an_outside_adapter_touches_nothing_else(
    tiny_model_dir: Any, tmp_path: Path, outside_adapter: Path
) -> None:
    config = tiny_system_config(tiny_model_dir, tmp_path / "run")
    system = SpeculativeDecodingSystem(config)
    system.initialize()
    assert system.collector is not None
    assert system.load_adapter(str(outside_adapter)) is True
    # Moved away after loading (as the previous layout's interrupted save left
    # it): training continues from the weights that were loaded, and reads or
    # writes nothing there.
    os.rename(outside_adapter, outside_adapter.parent / ".old-mine")
    before = tree_digest(outside_adapter.parent)
    for i in range(2):
        system.collector.add_failure(synthetic_example(f"f{i}", i))
    system.train()
    assert tree_digest(outside_adapter.parent) == before
    assert not outside_adapter.exists()
