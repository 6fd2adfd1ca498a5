"""Transports: how requests and replies travel between host and agent."""
