"""Adapters between asyncpool and the frameworks it runs under.

Each submodule imports its framework, so import the one you use:

- `asyncpool.integrations.powertools`: a Powertools for AWS Lambda middleware handing each
  invocation a pooled connection.
- `asyncpool.integrations.fastapi`: a FastAPI dependency and a lifespan that keeps one pool across
  Mangum's per-invocation lifespans.
- `asyncpool.integrations.sqlalchemy`: SQLAlchemy's async engine on a pool
  (`create_async_engine(pool)`).
- `asyncpool.integrations.aws_lambda`: pool defaults for one Lambda execution environment and a
  clean close at shutdown.
- `asyncpool.integrations.invocation`: the invocation being served (request id, cold start), added
  to asyncpool's log records; `asyncpool.integrations.lambda_spans` adds it to spans.

The event loop that keeps a pool alive across invocations is `asyncpool.integrations.lambda_runner`;
`asyncpool.integrations.lambda_deadline` cuts an invocation's work short just before its timeout
(for the runner and for FastAPI's `LambdaDeadline`).
"""
