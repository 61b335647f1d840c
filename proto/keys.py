"""`minirl-async keys OUT_DIR [--name NAME]`: write a CurveZMQ key pair with `zmq.auth.create_certificates`.

Writes OUT_DIR/NAME.key (public: give it to peers) and OUT_DIR/NAME.key_secret (public + secret: keep it on
this machine, mode 0600). Point `network.curve_server_key` (processes that bind) or `network.curve_client_key`
(processes that connect) at a NAME.key_secret, `network.curve_server_public` at the server's NAME.key, and
`network.curve_allowed_clients` at a folder of the clients' NAME.key files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        print("minirl-async keys: this libzmq was built without CURVE support", file=sys.stderr)
        return 1
    name = getattr(args, "name", None) or "minirl"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        print(f"minirl-async keys: --name {name!r} must be letters, digits, '-', '_' or '.'", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (out / f"{name}{suffix}").exists():
            print(f"minirl-async keys: {out / (name + suffix)} exists; choose another --name or folder",
                  file=sys.stderr)
            return 2
    public, secret = zmq.auth.create_certificates(str(out), name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0
