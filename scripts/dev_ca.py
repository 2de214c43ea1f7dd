#!/usr/bin/env python3
"""Create a development CA and certificates for Baton's mutual TLS (the logic: manager/devca.py).

    python scripts/dev_ca.py OUTDIR --manager manager-1 --node node-1 [--node node-2 ...]
        [--operator alice ...] [--expired manager-1] [--other-ca]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from manager.devca import make_dev_pki


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dev_ca.py", description=__doc__.split("\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--manager", action="append", default=[], metavar="NAME",
                   help="a Manager identity (repeatable; the first is written as manager.pem/key)")
    p.add_argument("--node", action="append", default=[], metavar="ID", help="a node (repeatable)")
    p.add_argument("--operator", action="append", default=[], metavar="NAME",
                   help="an operator (repeatable): operator-NAME.pem reads the Manager's web page")
    p.add_argument("--expired", action="append", default=[], metavar="NAME",
                   help="also an expired Manager certificate expired-NAME.pem (for tests)")
    p.add_argument("--other-ca", action="store_true",
                   help="also an unrelated CA (other-ca.pem) and other-manager-NAME.pem signed by it (for tests)")
    ns = p.parse_args(argv)
    pki = make_dev_pki(ns.outdir, ns.manager or ["manager-1"], ns.node, expired=ns.expired, other_ca=ns.other_ca,
                       operators=ns.operator)
    written = [pki.ca, *pki.managers.values(), *pki.nodes.values(), *pki.expired.values(),
               *pki.other_managers.values(), *([pki.other_ca] if pki.other_ca else []), *pki.operators.values()]
    for issued in written:
        print(f"{issued.cert}  {issued.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
