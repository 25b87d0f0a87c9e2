"""Which `server_settings` can be sent at login, and what to do with the others (#20).

A transaction pooler hands each transaction to any server connection, so a setting holds only
if every server connection has it. PgBouncer passes on a short list of startup parameters (it
tracks them per client and sets them on the server connection it lends) and refuses any other
("unsupported startup parameter"), or drops it silently when it is in
`ignore_startup_parameters`; RDS Proxy refuses `options`. So behind a pooler asyncpool sends the
tracked ones at login and applies the rest inside each `pool.transaction()` with ``SET LOCAL``
(or ``set_config(name, value, true)``): they hold for that transaction, on whichever
server connection runs it. Statements outside `pool.transaction()` run with the role's settings:
for a setting that must hold everywhere, set it on the role (``ALTER ROLE app SET ...``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from asyncpool.errors import PoolConfigError

#: Startup parameters PgBouncer tracks and forwards (and RDS Proxy accepts), lower-case.
LOGIN_SAFE = frozenset({"application_name", "client_encoding", "datestyle", "timezone",
                        "standard_conforming_strings"})
#: Parameters that cannot be changed once a session has started (or, for `options`, that are a
#: command line, not a setting): through a transaction pooler they cannot hold at all.
LOGIN_ONLY = frozenset({"options", "log_connections", "log_disconnections",
                        "ignore_system_indexes", "post_auth_delay", "jit_debugging_support",
                        "jit_profiling_support", "session_preload_libraries"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
#: The message of PgBouncer's refusal of a startup parameter.
UNSUPPORTED = "unsupported startup parameter"


@dataclass(frozen=True)
class StartupPlan:
    """What is sent at login, and what is set in each transaction (`transaction_sql`)."""

    at_login: dict[str, str]
    per_transaction: dict[str, str] = field(default_factory=dict)

    @property
    def transaction_sql(self) -> str | None:
        """One simple-protocol query setting every per-transaction value (None: nothing).

        ``SET LOCAL`` wherever it means what ``set_config(name, value, true)`` (and a login)
        means: a ``SELECT`` takes the transaction's snapshot, after which ``SET TRANSACTION
        ISOLATION LEVEL`` (or ``SNAPSHOT``) is refused, and SQLAlchemy users may start with one.
        A value ``SET LOCAL`` would read otherwise goes through ``set_config``."""
        if not self.per_transaction:
            return None
        statements, calls = [], []
        for name, value in self.per_transaction.items():
            statement = _set_local(name, value)
            if statement is None:
                calls.append(f"set_config({_literal(name)}, {_literal(value)}, true)")
            else:
                statements.append(statement)
        if calls:
            statements.append("SELECT " + ", ".join(calls))
        return "; ".join(statements)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


#: Settings whose SET takes a list of identifiers (PostgreSQL's GUC_LIST_QUOTE): there a quoted
#: string is one element, where set_config splits the text on commas.
_IDENTIFIER_LISTS = frozenset({"search_path", "temp_tablespaces"})
_QUOTED_IDENTIFIER = re.compile(r'^"(?:[^"]|"")+"$')
_BARE_IDENTIFIER = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


def _set_local(name: str, value: str) -> str | None:
    """``SET LOCAL`` with the meaning of ``set_config(name, value, true)``, or None where it
    would differ (a backslash, which depends on standard_conforming_strings; a list element
    that is not a plain or quoted identifier)."""
    if "\\" in value:
        return None
    target = ".".join(f'"{part}"' for part in name.split("."))  # names are checked words
    if name.lower() not in _IDENTIFIER_LISTS:
        return f"SET LOCAL {target} = {_literal(value)}"
    elements = []
    for element in _list_elements(value):
        if _QUOTED_IDENTIFIER.match(element):
            elements.append(element)
        elif _BARE_IDENTIFIER.match(element):
            elements.append(f'"{element.lower()}"')  # set_config folds a bare one to lower case
        else:
            return None
    return f"SET LOCAL {target} = {', '.join(elements)}" if elements else None


def _list_elements(value: str) -> list[str]:
    """`value` split on the commas outside double quotes, each element stripped."""
    elements: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            elements.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    elements.append("".join(current).strip())
    return elements


def check_names(settings: Mapping[str, str], pool: str) -> None:
    for name in settings:
        if not _NAME.match(name):
            raise PoolConfigError(f"pool {pool!r}: server_settings key {name!r} is not a setting "
                                  "name")


def combined(from_dsn: Mapping[str, str], option: Mapping[str, str] | None,
             pool: str) -> dict[str, str]:
    """The run-time settings of a DSN's query and of the ``server_settings=`` option, as one
    mapping (the option's spelling of a name given in both). One given in both with different
    values is a PoolConfigError: the pool does not pick one (asyncpg would take the option's
    without a word). Names are matched as PostgreSQL matches them, in any case."""
    settings = dict(from_dsn)
    by_name = {k.lower(): k for k in from_dsn}
    for name, value in (option or {}).items():
        other = by_name.get(name.lower())
        if other is not None:
            if settings[other] != value:
                raise PoolConfigError(
                    f"pool {pool!r}: the setting {name!r} is given twice and the two disagree: "
                    f"the DSN's ?{other}={settings[other]!r} and server_settings[{name!r}]="
                    f"{value!r}; give it once (the pool does not pick one)")
            del settings[other]
        settings[name] = value
    return settings


def plan(settings: Mapping[str, str] | None, *, pooled: bool, pool: str,
         pooler: str = "a transaction pooler", from_dsn: Collection[str] = ()) -> StartupPlan:
    """Everything at login when `pooled` is False; else the login-safe ones at login and the
    rest per transaction. Raises PoolConfigError for one that cannot hold behind a pooler
    (named as the DSN's when in `from_dsn`)."""
    settings = dict(settings or {})
    check_names(settings, pool)
    if not pooled:
        return StartupPlan(settings)
    stuck = sorted(k for k in settings if k.lower() in LOGIN_ONLY)
    if stuck:
        named = ", ".join(f"the DSN's ?{k}=" if k in from_dsn else f"server_settings {k}"
                          for k in stuck)
        raise PoolConfigError(
            f"pool {pool!r}: {named} cannot hold through {pooler}: "
            "it is read only at login, and the pooler neither passes it on nor lets it be set "
            "later. Set it on the role instead (ALTER ROLE ... SET, as a superuser where "
            "needed), or connect directly"
        )
    at_login = {k: v for k, v in settings.items() if k.lower() in LOGIN_SAFE}
    rest = {k: v for k, v in settings.items() if k.lower() not in LOGIN_SAFE}
    return StartupPlan(at_login, rest)
