"""JupyterHub on 127.0.0.1 with a real configurable-http-proxy and one user's single-user Jupyter Server.

The hub and the single-user server run from one virtualenv (jupyterhub +
jupyter_server), the proxy from an npm prefix (configurable-http-proxy), and
the user's kernels run our Python (``write_kernelspec``). The hub uses the
DummyAuthenticator and SimpleLocalProcessSpawner (no system users: the
single-user server runs as the user running the tests, home directory inside
the session's directory). A service token is used only to start the user's
server and mint a *user* API token, as a user would on the hub's token page;
clients get that user token and the URL of the user's server through the
proxy, ``http://127.0.0.1:PORT/user/NAME/``: what kernelproxy's
``connect_server`` takes.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from . import envs
from .process import (
    ServerProcess,
    free_port,
    launch,
    server_environment,
    stop,
    wait_until_answers,
    write_kernelspec,
)

USER = "kernelproxy"
SERVICE = "kernelproxy-tests"
SPAWN_TIMEOUT = 90.0  # seconds for the user's server to become ready


def build() -> tuple[envs.BuiltEnv, envs.BuiltEnv]:
    """The hub's virtualenv and the proxy's npm prefix (PrerequisiteMissing without npm)."""
    proxy = envs.npm_prefix("configurable-http-proxy", envs.CONFIGURABLE_HTTP_PROXY)
    venv = envs.python_venv("jupyterhub", envs.JUPYTERHUB)
    return venv, proxy


def start(
    directory: Path,
    *,
    proxy_args: tuple[str, ...] = (),
    server_args: tuple[str, ...] = (),
    server_config: str | None = None,
) -> ServerProcess:
    """Start the hub and the user's server; ``url`` is the user's server through the proxy, ``token`` a user token.

    ``extra`` holds ``hub_url`` (the hub's public URL), ``user``, ``service_token``
    (may start and stop the user's server), ``direct_url`` (the single-user server
    itself, bypassing the proxy) and ``proxy_api_url``.
    ``proxy_args`` go to configurable-http-proxy, ``server_args`` to the single-user server;
    ``server_config`` is the text of a Python config file for the single-user server.
    """
    venv, proxy = build()
    jupyter_path = directory / "jupyter-path"
    write_kernelspec(jupyter_path)
    port, hub_port, api_port = free_port(), free_port(), free_port()
    service_token = uuid.uuid4().hex
    single_user_args = list(server_args)
    if server_config is not None:
        config_path = directory / "single_user_config.py"
        config_path.write_text(server_config)
        single_user_args.append(f"--config={config_path}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        single_user_args.append("--allow-root")  # CI runs as root; the spawner runs servers as our user
    config = {
        "bind_url": f"http://127.0.0.1:{port}",
        "hub_bind_url": f"http://127.0.0.1:{hub_port}",
        "proxy_api_url": f"http://127.0.0.1:{api_port}",
        "proxy_command": [str(proxy.path / ".bin" / "configurable-http-proxy"), *proxy_args],
        "db_url": f"sqlite:///{directory / 'jupyterhub.sqlite'}",
        "cookie_secret_file": str(directory / "jupyterhub_cookie_secret"),
        "single_user_cmd": [str(venv.bin("jupyterhub-singleuser"))],
        "single_user_args": single_user_args,
        "home_dir_template": str(directory / "home" / "{username}"),
        "jupyter_path": str(jupyter_path),
        "user": USER,
        "service": SERVICE,
        "service_token": service_token,
    }
    config_file = directory / "jupyterhub_config.py"
    config_file.write_text(CONFIG_TEMPLATE.format(config=json.dumps(config, indent=1)))
    env = server_environment(jupyter_path, JUPYTER_RUNTIME_DIR=str(directory / "runtime"))
    process, log = launch("jupyterhub", [str(venv.bin("jupyterhub")), "-f", str(config_file)], directory, env)
    hub_url = f"http://127.0.0.1:{port}/"
    server = ServerProcess("JupyterHub", hub_url, "", process, log, directory)
    server.extra.update(hub_url=hub_url, user=USER, service_token=service_token, proxy_api_url=config["proxy_api_url"])
    try:
        wait_until_answers(
            server, "hub/api/", success_only=True
        )  # the hub's API through the proxy: hub and proxy are up
        _spawn(server)
        server.token = _hub_api(server, "POST", f"users/{USER}/tokens", {"note": "kernelproxy tests"})["token"]
        server.url = f"{hub_url}user/{USER}/"
        wait_until_answers(server, "api/status", headers={"Authorization": f"token {server.token}"}, success_only=True)
    except BaseException:
        stop(server)
        raise
    return server


def _spawn(server: ServerProcess) -> None:
    """Start the user's single-user server through the hub's REST API and wait until the hub says it is ready."""
    try:
        _hub_api(server, "POST", f"users/{USER}/server")
    except urllib.error.HTTPError as exc:
        if exc.code != 400:  # 400: already running
            raise
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while time.monotonic() < deadline:
        model = _hub_api(server, "GET", f"users/{USER}")
        default = (model.get("servers") or {}).get("", {})
        if default.get("ready"):
            # The single-user server's own address (not through the proxy): for measurements that bypass it.
            server.extra["direct_url"] = _direct_url(server)
            return
        if server.process.poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"the hub did not get {USER}'s server ready within {SPAWN_TIMEOUT:.0f} s:\n{server.log_tail()}")


def _direct_url(server: ServerProcess) -> str:
    """The single-user server's own URL: the proxy's route target for /user/NAME/ plus that path."""
    request = urllib.request.Request(
        server.extra["proxy_api_url"] + "/api/routes",
        headers={"Authorization": f"token {_proxy_token(server)}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        routes = json.loads(response.read())
    prefix = f"/user/{USER}"
    return routes[prefix]["target"].rstrip("/") + prefix + "/"


def _proxy_token(server: ServerProcess) -> str:
    return (server.directory / "proxy-auth-token").read_text().strip()


def _hub_api(server: ServerProcess, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{server.extra['hub_url']}hub/api/{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None),
        headers={"Authorization": f"token {server.extra['service_token']}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        data = response.read()
    return json.loads(data) if data else None


CONFIG_TEMPLATE = '''\
# Written by tests/servers/jupyterhub.py for one test session.
import json
from pathlib import Path

settings = json.loads(r"""{config}""")
c = get_config()  # noqa: F821

c.JupyterHub.bind_url = settings["bind_url"]
c.JupyterHub.hub_bind_url = settings["hub_bind_url"]
c.JupyterHub.db_url = settings["db_url"]
c.JupyterHub.cookie_secret_file = settings["cookie_secret_file"]
c.JupyterHub.log_level = "INFO"

c.ConfigurableHTTPProxy.command = settings["proxy_command"]
c.ConfigurableHTTPProxy.api_url = settings["proxy_api_url"]
# The proxy's API token is generated by the hub; writing it down lets the tests read the proxy's routes.
import secrets
proxy_token = secrets.token_hex(16)
Path(settings["cookie_secret_file"]).with_name("proxy-auth-token").write_text(proxy_token)
c.ConfigurableHTTPProxy.auth_token = proxy_token

c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {{settings["user"]}}

c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = settings["home_dir_template"]
c.Spawner.cmd = settings["single_user_cmd"]
c.Spawner.args = settings["single_user_args"]
c.Spawner.environment = {{"JUPYTER_PATH": settings["jupyter_path"]}}
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90

c.JupyterHub.services = [{{"name": settings["service"], "api_token": settings["service_token"]}}]
user = settings["user"]
c.JupyterHub.load_roles = [
    {{
        "name": "kernelproxy-tests",
        "scopes": [
            f"servers!user={{user}}", f"tokens!user={{user}}", f"read:users!user={{user}}", "read:users:activity"
        ],
        "services": [settings["service"]],
    }}
]
'''
