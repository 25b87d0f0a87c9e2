"""Pool() and create_pool() configured from the environment: ``ASYNCPOOL_*`` by default, libpq's
PG* variables honoured and named in errors, and no silent dial of libpq's defaults."""

from __future__ import annotations

import math
import re
import socket
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import asyncpool
from asyncpool import Pool, PoolConfig, PoolConfigError
from asyncpool.config import OTHER_PREFIXES, OTHER_VARIABLES, env_variables
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler

_LIBPQ = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ASYNCPOOL_* option variable and no libpq target variable."""
    import os

    for var in list(os.environ):
        if var in _LIBPQ or var in env_variables():
            monkeypatch.delenv(var)
    return monkeypatch


async def test_pool_and_create_pool_read_asyncpool_variables(
        clean_env: pytest.MonkeyPatch, pooler: Pooler) -> None:
    clean_env.setenv("ASYNCPOOL_DSN", pooler.dsn())
    clean_env.setenv("ASYNCPOOL_MAX_SIZE", "2")
    clean_env.setenv("ASYNCPOOL_NAME", "from-env")
    clean_env.setenv("ASYNCPOOL_PREPARED_STATEMENTS", "off")
    clean_env.setenv("ASYNCPOOL_TELEMETRY", "false")
    async with Pool() as pool:
        assert (pool.name, pool.config.max_size, pool.config.prepared_statements) == (
            "from-env", 2, "off")
        assert await pool.fetchval("SELECT $1::int", 7) == 7
    pool = await asyncpool.create_pool(max_size=3)  # arguments win
    try:
        assert (pool.name, pool.config.max_size) == ("from-env", 3)
        assert await pool.fetchval("SELECT 8") == 8
    finally:
        await pool.close()


def test_arguments_win_and_a_config_is_taken_as_it_is(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ASYNCPOOL_DSN", "postgresql://env@envhost/db")
    clean_env.setenv("ASYNCPOOL_MAX_SIZE", "4")
    assert Pool().config.dsn == "postgresql://env@envhost/db"
    pool = Pool("postgresql://arg@arghost/db", max_size=6)
    assert (pool.config.dsn, pool.config.max_size) == ("postgresql://arg@arghost/db", 6)
    assert Pool("postgresql://arg@arghost/db").config.max_size == 4
    given = PoolConfig(dsn="postgresql://cfg@cfghost/db")
    assert Pool(config=given).config is given
    assert Pool(config=given, max_size=2).config.max_size == 2


def test_unknown_asyncpool_variables_are_warned_about(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ASYNCPOOL_DSN", "postgresql://a@h/d")
    clean_env.setenv("ASYNCPOOL_MAX_SISE", "5")
    clean_env.setenv("ASYNCPOOL_PREPARED_STATEMENT", "off")
    with pytest.warns(UserWarning, match="is not an asyncpool option") as caught:
        Pool()
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "ASYNCPOOL_MAX_SISE is not an asyncpool option and is ignored; did you mean "
        "ASYNCPOOL_MAX_SIZE?",
        "ASYNCPOOL_PREPARED_STATEMENT is not an asyncpool option and is ignored; did you mean "
        "ASYNCPOOL_PREPARED_STATEMENTS?",
    ]
    with pytest.warns(UserWarning, match="ASYNCPOOL_MAX_SISE"):
        PoolConfig.from_env({"ASYNCPOOL_MAX_SISE": "5"})


def test_an_option_only_code_can_give_is_named_as_such(clean_env: pytest.MonkeyPatch) -> None:
    """``ASYNCPOOL_SERVER_SETTINGS`` was answered with "did you mean
    ASYNCPOOL_PREPARED_STATEMENTS?" (the shared prefix made them look alike)."""
    with pytest.warns(UserWarning, match="no environment variable") as caught:
        PoolConfig.from_env({"ASYNCPOOL_DSN": "postgresql://a@h/d",
                             "ASYNCPOOL_SERVER_SETTINGS": "search_path=app",
                             "ASYNCPOOL_SERVER_SETTING": "x"})
    expected = ("is ignored: server_settings is an option with no environment variable (a "
                "mapping, object or function); give it in code, Pool(server_settings=...) or "
                "lambda_config(server_settings=...)")
    assert sorted(str(w.message) for w in caught) == [
        f"ASYNCPOOL_SERVER_SETTING {expected}", f"ASYNCPOOL_SERVER_SETTINGS {expected}"]


def test_known_non_option_variables_are_not_warned_about(clean_env: pytest.MonkeyPatch) -> None:
    env = {"ASYNCPOOL_DSN": "postgresql://a@h/d", "ASYNCPOOL_OTEL_SEMCONV": "1.24",
           "ASYNCPOOL_TEST_POSTGRES_DSN": "postgresql://x@y/z", "ASYNCPOOL_MAX_SIZE": "3"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PoolConfig.from_env(env).max_size == 3


def test_every_asyncpool_variable_in_the_repository_is_known() -> None:
    """A variable added to the code or docs is either an option or listed as another one, so
    users setting it are not warned."""
    root = Path(__file__).resolve().parent.parent
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                           check=True).stdout.split()
    found: set[str] = set()
    for name in files:
        path = root / name
        if path.suffix in _TEXT and path.is_file():
            found.update(_VARIABLE.findall(path.read_text(errors="replace")))
    unknown = sorted(v for v in found if v not in env_variables() and v not in OTHER_VARIABLES
                     and not v.startswith(OTHER_PREFIXES) and v not in _EXAMPLES_OF_MISTAKES)
    assert unknown == []


_TEXT = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".ini", ".tf"}
_VARIABLE = re.compile(r"\bASYNCPOOL_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_*])")
_EXAMPLES_OF_MISTAKES = {
    "ASYNCPOOL_MAX_SISE", "ASYNCPOOL_PREPARED_STATEMENT", "ASYNCPOOL_SERVER_SETTINGS",
    "ASYNCPOOL_SERVER_SETTING",
    "ASYNCPOOL_REQUEST_ID_FIELD",  # a Python constant (a log record field), not a variable
}


async def test_no_dsn_and_no_environment_is_a_clear_error(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(PoolConfigError, match=r"no database to connect to: pass a DSN .* set "
                                              r"ASYNCPOOL_DSN, or set libpq's PGHOST"):
        await asyncpool.create_pool(telemetry=False)


async def test_no_dsn_names_a_database_url_that_is_set(clean_env: pytest.MonkeyPatch) -> None:
    # Heroku's and many frameworks' variable: not read (a DSN is explicit), but named.
    clean_env.setenv("DATABASE_URL", "postgresql://app:Sup3r-s3cret@db:5432/app")  # pragma: allowlist secret
    with pytest.raises(PoolConfigError) as info:
        await asyncpool.create_pool(telemetry=False)
    assert ("(DATABASE_URL is set but not read: pass Pool(os.environ['DATABASE_URL']), or set "
            "ASYNCPOOL_DSN to it)") in str(info.value)
    assert "Sup3r-s3cret" not in str(info.value)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_errors_name_the_pghost_pgport_target(clean_env: pytest.MonkeyPatch,
                                                    closed_port: int) -> None:
    clean_env.setenv("PGHOST", "127.0.0.1")
    clean_env.setenv("PGPORT", str(closed_port))
    clean_env.setenv("PGUSER", "envuser")
    clean_env.setenv("PGDATABASE", "envdb")
    pool = Pool(name="pg-env", min_size=1, connect_timeout=2, telemetry=False)
    with pytest.raises(asyncpool.ConnectError, match=f"envuser@127.0.0.1:{closed_port}/envdb"):
        await pool.open()
    await pool.close()
    assert pool.target == f"envuser@127.0.0.1:{closed_port}/envdb"


async def test_pg_variables_fill_what_the_dsn_leaves_out(clean_env: pytest.MonkeyPatch,
                                                         pooler: Pooler) -> None:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(pooler.dsn())
    assert parts.hostname is not None
    assert parts.password is not None
    clean_env.setenv("PGHOST", parts.hostname)
    clean_env.setenv("PGPORT", str(parts.port))
    clean_env.setenv("PGPASSWORD", unquote(parts.password))
    async with Pool(f"postgresql://{parts.username}@/{parts.path.lstrip('/')}", name="pg-partial",
                    max_size=1, telemetry=False) as pool:
        assert pool.target == f"{parts.username}@{parts.hostname}:{parts.port}{parts.path}"
        assert await pool.fetchval("SELECT 1") == 1


def test_a_misspelt_variable_is_blamed_on_the_line_that_made_the_pool(
        clean_env: pytest.MonkeyPatch) -> None:
    """The warning points at the caller's line, not at asyncpool's code, whichever way in."""
    clean_env.setenv("ASYNCPOOL_DSN", "postgresql://a@h/d")
    clean_env.setenv("ASYNCPOOL_MAX_SISE", "5")
    makers: tuple[Callable[[], object], ...] = (Pool, asyncpool.create_pool, lambda_config,
                                                 PoolConfig.from_env)
    for make in makers:
        with pytest.warns(UserWarning, match="ASYNCPOOL_MAX_SISE") as caught:
            make()
        assert [w.filename for w in caught] == [__file__]


def test_a_deprecated_option_is_blamed_on_the_callers_line() -> None:
    makers: tuple[Callable[[], object], ...] = (
        lambda: Pool("postgresql://a@h/d", prepared_statements="describe-cache"),  # type: ignore[call-overload]
        lambda: Pool("postgresql://a@h/d", allow_iam_without_tls=True),
        lambda: PoolConfig(dsn="postgresql://a@h/d", allow_iam_without_tls=True),
        lambda: Pool(config=PoolConfig(dsn="postgresql://a@h/d"), allow_iam_without_tls=True),
        lambda: PoolConfig(dsn="postgresql://a@h/d").replace(allow_iam_without_tls=True),
    )
    for make in makers:
        with pytest.warns(DeprecationWarning, match="is now called") as caught:
            make()
        assert [w.filename for w in caught] == [__file__]



async def test_a_connection_service_named_any_way_is_where_the_pool_connects(
        clean_env: pytest.MonkeyPatch, pooler: Pooler, tmp_path: Path) -> None:
    """PGSERVICE, service= and the DSN's ?service= connect where the service's section says, as
    in libpq (asyncpg reads a service only from a DSN and ignores PGSERVICE: the pool dialled
    libpq's defaults, the local socket as the operating system's user). The section points at
    the PgBouncer under test (its port and a password: this machine, so no TLS needed)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(pooler.dsn())
    path = tmp_path / "pg_service.conf"
    password = unquote(parts.password or "").replace("%", "%%")
    path.write_text(f"[orders]\nhost={parts.hostname}\nport={parts.port}\n"
                    f"dbname={parts.path.lstrip('/')}\nuser={unquote(parts.username or '')}\n"
                    f"password={password}\n")
    clean_env.setenv("PGSERVICEFILE", str(path))
    query = "SELECT current_database() || ' ' || current_user"
    expected = f"{parts.path.lstrip('/')} {unquote(parts.username or '')}"
    clean_env.setenv("PGSERVICE", "orders")
    async with Pool(min_size=0, telemetry=False) as pool:
        assert await pool.fetchval(query) == expected
        assert str(pool._slots.connector.target) == (  # type: ignore[union-attr]
            f"{unquote(parts.username or '')}@{parts.hostname}:{parts.port}/"
            f"{parts.path.lstrip('/')}")
    clean_env.delenv("PGSERVICE")
    async with asyncpool.create_pool(service="orders", telemetry=False) as pool:
        assert await pool.fetchval(query) == expected
    async with Pool("postgresql://?service=orders", telemetry=False) as pool:
        assert await pool.fetchval(query) == expected
    with pytest.raises(PoolConfigError, match="connection service 'nosuch' is not defined"):
        await Pool("postgresql://?service=nosuch", telemetry=False).open()


_DSN = "postgresql://app@db.internal/app"


@pytest.mark.parametrize("variable", env_variables())
@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_variable_is_not_set(variable: str, blank: str) -> None:
    """An empty ``ASYNCPOOL_*`` variable (a template variable left empty in Terraform or
    compose) is the default, as libpq takes an empty PG* variable: ACQUIRE_TIMEOUT,
    LEAK_TIMEOUT, VALIDATE_AFTER, MAX_LIFETIME and MAX_IDLE were None (the limit off), MAX_SIZE
    and CONNECT_TIMEOUT a PoolConfigError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PoolConfig.from_env({variable: blank}) == PoolConfig.from_env({})
        assert (PoolConfig.from_env({variable: blank, "ASYNCPOOL_DSN": _DSN})
                == PoolConfig.from_env({"ASYNCPOOL_DSN": _DSN}))
        # lambda_config's own defaults (validate_after=0.5, 5 s timeouts...) stay too.
        assert (lambda_config(environ={variable: blank}, dsn=_DSN)
                == lambda_config(environ={}, dsn=_DSN))


def test_none_still_turns_a_limit_off() -> None:
    limits = ("acquire_timeout", "leak_timeout", "validate_after", "max_lifetime", "max_idle",
              "statement_cache_ttl", "command_timeout", "max_queries")
    config = PoolConfig.from_env({f"ASYNCPOOL_{name.upper()}": word
                                  for name, word in zip(limits, ["none", "None", "NONE", " none ",
                                                                 "null", "off", "none", "none"],
                                                        strict=True)})
    assert {name: getattr(config, name) for name in limits} == dict.fromkeys(limits)


@pytest.mark.parametrize(("variable", "option", "choices"), [
    ("ASYNCPOOL_PREPARED_STATEMENTS", "prepared_statements", ["off", "on", "unnamed"]),
    ("ASYNCPOOL_LEAK_ACTION", "leak_action", ["reclaim", "log"]),
    ("ASYNCPOOL_CANCEL_REQUESTS", "cancel_requests", ["auto", "off"]),
    ("ASYNCPOOL_SSL", "ssl", ["disable", "allow", "prefer", "require", "verify-ca",
                              "verify-full"]),
])
def test_a_choice_is_taken_in_any_case_and_with_spaces(variable: str, option: str,
                                                       choices: list[str]) -> None:
    """``ON`` was refused where `` on`` was taken: case counted, spaces did not."""
    for choice in choices:
        for written in (choice, choice.upper(), choice.title(), f" {choice.upper()} "):
            assert getattr(PoolConfig.from_env({variable: written}), option) == choice
    with pytest.raises(PoolConfigError) as info:
        PoolConfig.from_env({variable: "Maybe"})
    assert all(choice in str(info.value) for choice in choices)
    assert variable in str(info.value)


def test_a_switch_is_taken_in_any_case_and_a_bad_one_lists_the_words() -> None:
    for written, value in [("true", True), ("TRUE", True), (" Yes ", True), ("1", True),
                           ("On", True), ("false", False), ("FALSE", False), (" no", False),
                           ("0", False), ("OFF", False)]:
        assert PoolConfig.from_env({"ASYNCPOOL_TELEMETRY": written}).telemetry is value
        assert PoolConfig.from_env(
            {"ASYNCPOOL_ALLOW_UNPROTECTED_CREDENTIALS": written}
        ).allow_unprotected_credentials is value
    with pytest.raises(PoolConfigError, match=r"ASYNCPOOL_TELEMETRY='maybe': write true or "
                                              r"false \(in any case; 1/0, yes/no and on/off"):
        PoolConfig.from_env({"ASYNCPOOL_TELEMETRY": "maybe"})


def test_numbers_are_plain_ascii_and_minus_zero_is_zero() -> None:
    config = PoolConfig.from_env({"ASYNCPOOL_VALIDATE_AFTER": "-0", "ASYNCPOOL_MAX_SIZE": " 5 "})
    assert (repr(config.validate_after), config.max_size) == ("0.0", 5)
    for variable, text in [("ASYNCPOOL_MAX_SIZE", "\u0663"), ("ASYNCPOOL_ACQUIRE_TIMEOUT", "\u0665")]:
        with pytest.raises(PoolConfigError, match=f"{variable}=.*: write a"):
            PoolConfig.from_env({variable: text})


#: The options in seconds whose None is "no limit" ("never" for validate_after).
_NO_LIMIT = ("acquire_timeout", "max_lifetime", "max_idle", "validate_after", "leak_timeout",
             "statement_cache_ttl", "command_timeout")


@pytest.mark.parametrize("option", _NO_LIMIT)
def test_infinity_is_no_limit_as_none_is_in_code_and_in_the_environment(option: str) -> None:
    """``inf`` (``float("inf")``, ``ASYNCPOOL_*=inf``) is taken for None: the same meaning and
    the same cost (an infinite leak_timeout tracked every checkout, an infinite command_timeout
    gave asyncpg a timer per query)."""
    variable = f"ASYNCPOOL_{option.upper()}"
    infinite: dict[str, Any] = {option: math.inf}
    for config in (PoolConfig(**infinite),
                   *(PoolConfig.from_env({variable: text})
                     for text in ("inf", "Infinity", " INF ", "1e400"))):
        assert getattr(config, option) is None
        none: dict[str, Any] = {option: None}
        assert config == PoolConfig(**none)
    pool = Pool(_DSN, leak_timeout=math.inf, telemetry=False)
    assert not pool._slots.track_leaks  # no bookkeeping per checkout for a limit never reached


def test_connect_timeout_has_a_limit_infinite_or_none() -> None:
    for given in (math.inf, None):
        with pytest.raises(PoolConfigError, match=(
                rf"connect_timeout={given!r}: a login must have a time limit; give a number of "
                r"seconds > 0$")):
            PoolConfig(connect_timeout=given)  # type: ignore[arg-type]
    for text in ("inf", "none"):
        with pytest.raises(PoolConfigError, match=(
                r"a login must have a time limit.*\(set by ASYNCPOOL_CONNECT_TIMEOUT\)"
                if text == "inf" else r"ASYNCPOOL_CONNECT_TIMEOUT='none': write a number")):
            PoolConfig.from_env({"ASYNCPOOL_CONNECT_TIMEOUT": text})
    # Not offered "None for no limit" where None is refused.
    with pytest.raises(PoolConfigError, match=r"connect_timeout=-1: must be a number of seconds "
                                              r"> 0$"):
        PoolConfig(connect_timeout=-1)


@pytest.mark.parametrize("option", [*_NO_LIMIT, "connect_timeout", "lifetime_jitter"])
def test_nan_in_a_variable_is_refused_with_the_variable_s_spelling(option: str) -> None:
    variable = f"ASYNCPOOL_{option.upper()}"
    what = ("a fraction in \\[0, 1\\)" if option == "lifetime_jitter"
            else "a number of seconds" + (" or none" if option in _NO_LIMIT else ""))
    for text in ("nan", "NaN", "-nan"):
        with pytest.raises(PoolConfigError, match=rf"^{variable}='{text}': write {what}$"):
            PoolConfig.from_env({variable: text})
        with pytest.raises(PoolConfigError, match=rf"{option}=nan: must be"):
            PoolConfig(**{option: math.nan})  # type: ignore[arg-type]


async def test_infinite_limits_reach_asyncpg_as_none(postgres: PostgresServer) -> None:
    """asyncpg armed a timer for every query under command_timeout=inf, and one for every
    cached statement under an infinite max_cached_statement_lifetime."""
    async with Pool(postgres.dsn(), min_size=1, max_size=1, command_timeout=math.inf,
                    statement_cache_ttl=math.inf, prepared_statements="on",
                    telemetry=False) as pool, pool.acquire() as conn:
        assert conn.raw._config.command_timeout is None  # type: ignore[attr-defined]
        assert conn.raw._stmt_cache.get_max_lifetime() == 0  # type: ignore[attr-defined]  # asyncpg's "no limit"
        assert await conn.fetchval("SELECT $1::int", 1, timeout=math.inf) == 1


def test_asyncpool_ssl_takes_a_switch_with_ssl_true_s_meaning() -> None:
    """``ASYNCPOOL_SSL=true`` was refused though ``ssl=True`` is taken in code: it means the
    same now, ``verify-full`` (never a weaker check than asked for); false is ``disable``."""
    from asyncpool.connect.tls import resolve_tls

    for words, value, mode in ((("true", "TRUE", " yes ", "1", "on"), True, "verify-full"),
                               (("false", "False", "no", "0", "off"), False, "disable")):
        for word in words:
            config = PoolConfig.from_env({"ASYNCPOOL_SSL": word, "ASYNCPOOL_DSN": _DSN})
            assert config == PoolConfig(_DSN, ssl=value)
            assert resolve_tls(config, environ={}).mode == mode
    # Given twice, the two must agree, as for a mode.
    # Named as the variable and its text, not "the ssl option=True" the user never wrote.
    with pytest.raises(PoolConfigError, match=re.escape(
            "the TLS setting is given twice and the two disagree: ASYNCPOOL_SSL='ON' (ssl=True: "
            "'verify-full') and the DSN's sslmode='require'")):
        resolve_tls(PoolConfig.from_env({"ASYNCPOOL_SSL": "ON",
                                         "ASYNCPOOL_DSN": f"{_DSN}?sslmode=require"}), environ={})
    # Given in code over the variable: the option's own words.
    with pytest.raises(PoolConfigError, match=re.escape("the ssl option=True and the DSN's")):
        resolve_tls(PoolConfig.from_env({"ASYNCPOOL_SSL": "off"}, ssl=True,
                                        dsn=f"{_DSN}?sslmode=require"), environ={})
    # Kept by replace() while ssl is not replaced.
    config = PoolConfig.from_env({"ASYNCPOOL_SSL": "yes", "ASYNCPOOL_DSN": _DSN})
    assert config.replace(max_size=3)._variable_of("ssl") == "ASYNCPOOL_SSL='yes'"
    assert config.replace(ssl="require")._variable_of("ssl") is None
    assert config._variable_of("dsn") is None  # its text may hold a password
    for word in ("none", "tls", "verify"):
        with pytest.raises(PoolConfigError, match=(
                rf"^ASYNCPOOL_SSL='{word}': write one of disable, allow, prefer, require, "
                r"verify-ca, verify-full \(in any case\), or true \(verify-full: the certificate "
                r"and the host name are checked\) / false \(disable\)")):
            PoolConfig.from_env({"ASYNCPOOL_SSL": word})


@pytest.mark.parametrize(("dsn", "error"), [
    ("garbage", "DsnError"),  # not read at all
    ("postgresql://app:Secr3t-xyz@127.0.0.1:1/app?sslmod=require",  # pragma: allowlist secret
     "PoolConfigError"),  # a misspelt keyword in it
])
def test_a_dsn_refused_from_the_environment_names_its_variable(
        clean_env: pytest.MonkeyPatch, dsn: str, error: str) -> None:
    """Every other option refused from its variable said "(set by ASYNCPOOL_...)"; a DSN from
    ASYNCPOOL_DSN did not, so on Lambda nothing said where the DSN came from. The DSN itself is
    still not shown; given in code, the variable is not named."""
    clean_env.setenv("ASYNCPOOL_DSN", dsn)
    for make in (lambda: Pool(telemetry=False), lambda: lambda_config(function_timeout=10)):
        with pytest.raises(PoolConfigError) as refused:
            make()
        assert type(refused.value).__name__ == error
        assert str(refused.value).endswith("(set by ASYNCPOOL_DSN)"), refused.value
        assert "Secr3t" not in str(refused.value)
    with pytest.raises(PoolConfigError) as given:
        Pool(dsn, telemetry=False)
    assert "ASYNCPOOL_DSN" not in str(given.value)
