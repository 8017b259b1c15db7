"""Shared pytest fixtures: the trained fixture models in ../shared/fixtures and tiny models built on the spot.

Tiny models are built once per session (a build takes well under a second after the first import of
transformers) and must be treated as read-only: a test that wants to break one copies it first
(the `copy_model` fixture).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).parents[1]
# The shared fixtures live next to the repository (../shared/fixtures); a checkout may also carry them inside.
FIXTURES = next((p for p in (REPO.parent / "shared" / "fixtures", REPO / "shared" / "fixtures") if p.is_dir()),
                REPO.parent / "shared" / "fixtures")


@pytest.fixture
def copy_model(tmp_path):
    """copy_model(src, name=None) -> Path: a private, writable copy of a model folder under tmp_path."""
    def copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        for f in dst.iterdir():
            f.chmod(0o644)
        return dst
    return copy


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """/work/shared/fixtures (trained models and text); the test is skipped if it is absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def llama_s_dir(fixture_dir) -> Path:
    """The trained 32M-parameter LLaMA (fp16, 5 shards, SentencePiece tokenizer)."""
    d = fixture_dir / "llama-s"
    if not (d / "config.json").is_file():
        pytest.skip(f"fixture model not found at {d}")
    return d


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """build(**kwargs) -> Path: a tiny model for build_tiny_model's kwargs, built once per session.

    Pass bpe=True for build_tiny_bpe_model. Equal kwargs return the same (read-only) folder.
    """
    from wqedge.tinymodel import build_tiny_bpe_model, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple, Path] = {}

    def build(bpe: bool = False, **kwargs) -> Path:
        key = (bpe, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            out = root / f"m{len(cache)}"
            cache[key] = (build_tiny_bpe_model if bpe else build_tiny_model)(out, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Path:
    """The default tiny model: hidden 128, 2 layers, 4 heads / 2 kv heads, vocab 512, fp16, untied."""
    return tiny_model_factory()


@pytest.fixture(scope="session")
def tiny_bpe_model_dir(tiny_model_factory) -> Path:
    """The default tiny model with a byte-level BPE tokenizer (GPT-2 regex; vocab laid out as LLaMA 3's)."""
    return tiny_model_factory(bpe=True)


# Tests marked engine("llama.cpp"/"onnxruntime") run in a child pytest process (tests/engine_isolation.py).
from engine_isolation import pytest_configure, pytest_runtest_logreport, pytest_runtest_protocol  # noqa: E402,F401
