"""What every ``facenet-hf`` command shares: logging set-up and ``--section.key VALUE`` overrides."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from facenet_hf.config import ConfigError

__all__ = [
    "load_model_or_error",
    "message_naming",
    "overrides_from_argv",
    "progress_enabled",
    "setup_logging",
    "shard_arg",
]


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("accelerate", "httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def overrides_from_argv(rest: list[str]) -> list[str]:
    """``["--train.lr", "1e-3", "--data.p=8", "loss.margin=0.3"]`` -> ``["train.lr=1e-3", "data.p=8", ...]``."""
    out: list[str] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        key = tok[2:] if tok.startswith("--") else tok
        if "=" in key:
            out.append(key)
            i += 1
        elif tok.startswith("--") and i + 1 < len(rest):
            out.append(f"{key}={rest[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"argument {tok!r} needs a value: use --{key} VALUE or {key}=VALUE")
    return out


def load_model_or_error(command: str, model_id: str, *, revision: str | None = None) -> Any:
    """``FaceNet.from_pretrained(model_id)``, or None after printing why it cannot be loaded (one line, stderr)."""
    from facenet_hf.model import FaceNet, InvalidConfigError

    try:
        return FaceNet.from_pretrained(model_id, revision=revision)
    except (
        FileNotFoundError,
        InvalidConfigError,
        KeyError,
        OSError,
    ) as e:  # e.g. pickle-only weights: refused
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"facenet-hf {command}: cannot load model {model_id}: {msg}", file=sys.stderr)
        return None


def progress_enabled() -> bool:
    """Progress bars only on a terminal: a log file gets no carriage-return floods."""
    return sys.stderr.isatty()


def shard_arg(text: str) -> tuple[int, int]:
    """argparse type of ``--shard i/n`` (this worker's share of a job split n ways): ``"1/4"`` -> ``(1, 4)``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def message_naming(path: str, e: BaseException) -> str:
    """An exception's message, prefixed with ``path`` unless it already names it (a KeyError's without quotes)."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return msg if path in msg else f"{path}: {msg}"
