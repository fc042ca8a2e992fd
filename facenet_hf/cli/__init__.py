"""The ``facenet-hf`` command: one module per subcommand, each with ``main(argv=None)``.

Subcommand modules are imported only when their command runs, so ``facenet-hf --help`` loads no torch.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

COMMANDS = {
    "train": "facenet_hf.cli.train",
    "evaluate": "facenet_hf.cli.evaluate",
    "push": "facenet_hf.cli.push",
    "align": "facenet_hf.cli.align",
    "calibrate": "facenet_hf.cli.calibrate",
    "embed": "facenet_hf.cli.embed",
    "verify": "facenet_hf.cli.verify",
    "enrol": "facenet_hf.cli.enrol",
    "identify": "facenet_hf.cli.identify",
    "cluster": "facenet_hf.cli.cluster",
    "plot": "facenet_hf.cli.plot",
    "export": "facenet_hf.cli.export",
    "pack": "facenet_hf.cli.pack",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        msg = f"usage: facenet-hf {{{names}}} ...\n  run `facenet-hf COMMAND --help` for a command's options"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"facenet-hf: unknown command {argv[0]!r}; choose one of: {names}", file=sys.stderr)
            print(msg, file=sys.stderr)
            return 2
        print(msg)
        return 0
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
