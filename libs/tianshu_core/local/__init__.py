"""Tooling for running Tianshu on one machine: never imported by the engine, the client or a service.

- `embedded`: a development Postgres from the `pgserver` wheel (`make demo`, the tests, `tianshu dev`),
  seen and stopped with `tianshu embedded status|stop`.
- `dev`: `tianshu dev`, the whole service stack as local processes.
- `model_server`: a scripted OpenAI- and Anthropic-compatible model server for tests and `tianshu dev`.

They sit apart so that importing `tianshu_core` (what an application or a service does) loads none of
them; `tests/test_layout.py` checks it.
"""
