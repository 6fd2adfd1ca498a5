"""Start a test server by hand and keep it running until Ctrl-C or SIGTERM; its details go to a JSON file.

    python tests/servers/serve.py eg|hub|hub-nodelay SERVER.json

The repro scripts in ``repro/`` take that JSON file. Everything the server
started is stopped on exit.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servers import enterprise_gateway, jupyterhub
from servers.process import stop


def main() -> None:
    which, out = sys.argv[1], sys.argv[2]
    directory = Path(tempfile.mkdtemp(prefix=f"kernelproxy-{which}-"))
    started = time.monotonic()
    if which == "eg":
        server = enterprise_gateway.start(directory)
    elif which == "hub":
        server = jupyterhub.start(directory)
    elif which == "hub-nodelay":
        config = (Path(__file__).parent / "nodelay_config.py").read_text()
        server = jupyterhub.start(directory, server_config=config)
    else:
        raise SystemExit(f"unknown server {which!r}: eg, hub or hub-nodelay")
    details = {"kind": which, "url": server.url, "token": server.token, "log": str(server.log), **server.extra}
    Path(out).write_text(json.dumps(details, indent=1))
    print(f"{server.name} ready in {time.monotonic() - started:.1f} s: {server.url} (details in {out})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        while server.process.poll() is None:
            time.sleep(0.5)
        print(f"{server.name} exited by itself; its log: {server.log}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        killed = stop(server)
        print(f"stopped{'; had to kill ' + str(killed) if killed else ''}", flush=True)


if __name__ == "__main__":
    main()
