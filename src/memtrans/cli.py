"""Command-line entry points. Each subcommand is a thin wrapper over a module's `main(argv)`."""
from __future__ import annotations

import importlib
import os
import signal
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
    # Errors a user can cause or meet end in one line naming the file or field and the fix, never a stack
    # trace (MEMTRANS_DEBUG=1 shows it). SIGTERM and SIGINT stop a command cleanly (exit 128 + signal number).
    from memtrans.utils import Interrupted, describe_os_error, handle_signals, stop_with_parent

    debug = os.environ.get("MEMTRANS_DEBUG", "") not in ("", "0")
    try:
        with handle_signals():
            stop_with_parent()  # a child of `memtrans ablate` stops when the ablation is gone (even by SIGKILL)
            return int(module.main(rest) or 0)
    except ValueError as e:  # configuration and input errors
        if debug:
            raise
        print(f"memtrans {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk, a file size limit, missing files
        if debug:
            raise
        print(f"memtrans {name}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"memtrans {name}: interrupted by {signal.Signals(signum).name}; run the same command again to "
              f"continue (finished results are kept)", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
