"""Tianshu's wire contracts: every message that crosses NATS, and the subjects and streams it uses.

A placeholder: the pydantic v2 models, the versioned subject names (``tianshu.v1.…``) and the
JSON Schema generated from them arrive with the next issue.
"""
