"""Real servers for the tests that need them: Enterprise Gateway and JupyterHub, each in its own environment.

``envs`` builds and caches their virtualenvs (and configurable-http-proxy's npm
prefix); ``enterprise_gateway`` and ``jupyterhub`` start them on 127.0.0.1;
``fixtures`` is the pytest plugin with session-scoped fixtures that start them,
skip with the reason when a prerequisite is missing, and stop them with
everything they started. The modules import nothing from the tests, so scripts
can use them too: ``sys.path.insert(0, "tests"); from servers import jupyterhub``.
"""
