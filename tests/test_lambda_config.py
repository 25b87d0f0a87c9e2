"""lambda_config(): pool defaults for one Lambda execution environment, and who wins over them."""

from __future__ import annotations

import pytest

from asyncpool import PoolConfig, PoolConfigError
from asyncpool.integrations.aws_lambda import lambda_config, running_on_lambda
from asyncpool.integrations.lambda_runner import LambdaRunner


def test_sized_for_one_invocation_at_a_time_and_checked_after_a_freeze() -> None:
    cfg = lambda_config(environ={})
    assert (cfg.min_size, cfg.max_size) == (1, 1)
    assert cfg.validate_after == 0.5
    assert cfg.acquire_timeout == cfg.connect_timeout == 5.0
    # Without the function timeout, leak detection keeps the pool's own default.
    assert cfg.leak_timeout == PoolConfig().leak_timeout


def test_function_timeout_bounds_leaks_and_waits() -> None:
    cfg = lambda_config(function_timeout=3, environ={})
    assert cfg.leak_timeout == 3.0
    assert cfg.acquire_timeout == 1.5
    assert lambda_config(function_timeout=60, environ={}).acquire_timeout == 5.0


def test_environment_beats_the_defaults_and_arguments_beat_the_environment() -> None:
    env = {"ASYNCPOOL_MAX_SIZE": "3", "ASYNCPOOL_LEAK_TIMEOUT": "none", "ASYNCPOOL_NAME": "orders"}
    cfg = lambda_config(function_timeout=10, environ=env)
    assert (cfg.max_size, cfg.leak_timeout, cfg.name) == (3, None, "orders")
    assert lambda_config(environ=env, max_size=2).max_size == 2


def test_rejects_a_function_timeout_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="function_timeout"):
        lambda_config(function_timeout=0, environ={})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10**400])
def test_a_function_timeout_that_is_no_functions_timeout_is_refused_by_its_name(bad: float
                                                                                ) -> None:
    """NaN passed the ``<= 0`` check, and the error named leak_timeout=nan, which the caller
    did not give; infinity meant no leak_timeout; an int past a float's range was a bare
    OverflowError."""
    with pytest.raises(PoolConfigError, match=r"function_timeout=.*: must be a finite number "
                                              r"of seconds > 0, your function's configured"):
        lambda_config(function_timeout=bad, environ={})


def test_running_on_lambda_follows_the_runtime_variable() -> None:
    assert running_on_lambda({"AWS_LAMBDA_FUNCTION_NAME": "orders"})
    assert not running_on_lambda({})


def test_runner_rejects_a_negative_margin() -> None:
    with pytest.raises(ValueError, match="timeout_margin"):
        LambdaRunner(timeout_margin=-1)


def test_takes_pool_options_as_pool_does() -> None:
    """`Pool()`'s keywords, asyncpg's names included, mean the same in lambda_config(); a
    misspelt or foreign one is a `PoolConfigError` naming the closest option (it was Python's
    bare TypeError, and asyncpg's names were refused)."""
    cfg = lambda_config(environ={}, dsn="postgresql://app@db/app", timeout=3, host="other",
                        statement_cache_size=0, max_inactive_connection_lifetime=0)
    assert (cfg.dsn, cfg.connect_timeout, cfg.prepared_statements, cfg.max_idle) == (
        "postgresql://app@db/app", 3, "off", None)
    assert cfg.connect_kwargs == {"host": "other"}
    with pytest.raises(PoolConfigError, match=r"max_sise=: not an option of lambda_config\(\); "
                                              r"did you mean max_size=\?"):
        lambda_config(environ={}, max_sise=1)  # type: ignore[call-arg]
    with pytest.raises(PoolConfigError, match=r"observers=: an argument of Pool\(\)"):
        lambda_config(environ={}, observers=[])  # type: ignore[call-arg]
    with pytest.raises(PoolConfigError, match="function_timeout='10': must be a number"):
        lambda_config(environ={}, function_timeout="10")  # type: ignore[arg-type]
