"""Command-line entry points. Each subcommand is a thin wrapper over a module's `main(argv)`."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("memtrans.train.trainer", "train a model from a YAML config"),
    "eval": ("memtrans.eval.evaluate", "evaluate a run directory on a held-out split"),
    "ablate": ("memtrans.ablation.runner", "run an ablation plan and write its report"),
    "report": ("memtrans.ablation.report", "(re)write the report of an ablation output directory"),
    "fetch-corpus": ("memtrans.data.fetch", "download a study corpus with the system package tools"),
    "info": ("memtrans.info", "device, CPU, precision policy and retrieval paths (paste into bug reports)"),
    "generate": ("memtrans.generate", "read a prompt with a run's model (memory as in training), then write"),
}


def usage() -> str:
    lines = ["usage: memtrans COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "memtrans COMMAND --help for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"memtrans: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except ValueError as e:  # configuration and input errors: one clear line, no stack trace
        print(f"memtrans {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
