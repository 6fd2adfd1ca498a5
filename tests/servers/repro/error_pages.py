"""Finding: what kernelproxy reports for the errors servers answer with HTML pages (or unhelpful JSON).

Usage: python tests/servers/repro/error_pages.py HUB.json [EG.json]
Cases: a wrong base URL on the single-user server; the hub's own page for a user
whose server is not running (the script stops the user's server through the hub
API with the service token, tries, and starts it again); a wrong token.
"""

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import kernelproxy

hub = json.loads(Path(sys.argv[1]).read_text())


def raw(method, url, token, body=None):
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


def show(label, url, token, **options):
    status, ctype, text = raw("POST", url + "api/kernels", token, {})
    print(f"--- {label}\nraw POST {url}api/kernels -> HTTP {status} ({ctype}), {len(text)} chars: {text[:300]!r}")
    try:
        with kernelproxy.connect_server(url, token=token, **options) as k:
            print("kernelproxy: works", k.call(int))
    except kernelproxy.KernelProxyError as exc:
        print(
            f"kernelproxy: {type(exc).__name__} (status {getattr(exc, 'status', None)}), {len(str(exc))} chars: {exc}"
        )


def hub_api(method, path):
    return raw(method, f"{hub['hub_url']}hub/api/{path}", hub["service_token"])


show("wrong base URL through the proxy", hub["hub_url"] + "nothing/here/", hub["token"])
show("wrong token", hub["url"], "wrong")
print("stopping the user's server:", hub_api("DELETE", f"users/{hub['user']}/server")[0])
for _ in range(100):
    if not json.loads(hub_api("GET", f"users/{hub['user']}")[2]).get("servers"):
        break
    time.sleep(0.2)
show("the user's server is not running", hub["url"], hub["token"])
for path in ("api/kernelspecs", "api/kernels/00000000-0000-0000-0000-000000000000/channels"):
    status, ctype, text = raw("GET", hub["url"] + path, hub["token"])
    print(f"raw GET {hub['url']}{path} (server stopped) -> HTTP {status} ({ctype}): {text[:200]!r}")
print("starting it again:", hub_api("POST", f"users/{hub['user']}/server")[0])
for _ in range(300):
    if json.loads(hub_api("GET", f"users/{hub['user']}")[2]).get("servers", {}).get("", {}).get("ready"):
        break
    time.sleep(0.3)
if len(sys.argv) > 2:
    eg = json.loads(Path(sys.argv[2]).read_text())
    show("Enterprise Gateway: wrong base URL", eg["url"] + "nothing/", eg["token"])
