"""``diffusekit app``: serve a local web page over a trained run (``diffusekit.app``) until Ctrl-C.

The run is opened and the port bound before the address is printed, so a bad run or a busy port is one
line; without the ``app`` extra the command says in one line how to install it.
"""

from __future__ import annotations

import argparse
import importlib

from diffusekit.app import INSTALL_HINT, missing_extra
from diffusekit.app.actions import AppRun
from diffusekit.cli.common import device_from_flag
from diffusekit.errors import ConfigError

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    missing = missing_extra()
    if missing is not None:
        raise ConfigError(f"the page needs the optional package {missing!r}: {INSTALL_HINT}")
    server = importlib.import_module("diffusekit.app.server")  # the optional `app` extra, checked just above
    with AppRun(args.run, device=device_from_flag(args.device)) as state:
        sock = server.bind(args.host, args.port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"diffusekit app: {state.family.name} run {args.run} at http://{shown}:{port}/ (Ctrl-C to stop; "
              f"outputs go to {state.root}, removed at exit)", flush=True)
        if host not in ("127.0.0.1", "::1"):
            print(f"diffusekit app: warning: listening on {host}: anyone who can reach this machine can use the page "
                  "and run jobs on it", flush=True)
        try:
            server.serve(state, sock, debug=args.debug)
        except KeyboardInterrupt:
            pass
    print("diffusekit app: stopped; its temporary folder is removed", flush=True)
    return 0
