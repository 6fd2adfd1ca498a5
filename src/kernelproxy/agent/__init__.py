"""The kernel-side agent. ``_agent.py`` is shipped to kernels as source; see its docstring."""
