"""The hosts and ports a login dials, read once and as asyncpg reads them
(``asyncpg.connect_utils._parse_connect_dsn_and_args``): the target, the credential rules, the
password file's matching and the addresses named in errors all come from here.

asyncpg's order: the ``host`` option, else the DSN's hosts, else the connection service's
``host``, else ``PGHOST``, else the local default. Ports: the ``port`` option (one for every
host, or one per host) over any written with a host; else the DSN's, else the service's ``port``;
else each host's own (``host:port`` in the DSN, the service's ``host`` or ``PGHOST``), else
``PGPORT``'s, else 5432.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncpool.connect.service import Service

#: A host ("" is the default: a local socket, then localhost) and the port written with it.
Written = tuple[str, int | None]
_IPV6 = re.compile(r"\[([^\]]+)\](?::([0-9]+))?")
DEFAULT_PORT = 5432


def host_list(text: str) -> list[Written]:
    """The hosts of a ``host[:port],...`` list (a service's ``host``, ``PGHOST``), as asyncpg
    reads one: a socket directory taken whole, an IPv6 address's brackets dropped, nothing
    stripped. ValueError where asyncpg fails (a port that is no number, a lone ``[``)."""
    hosts: list[Written] = []
    for spec in text.split(","):
        if not spec or spec.startswith("/"):  # (asyncpg fails on an empty one)
            hosts.append((spec, None))
            continue
        if spec.startswith("["):
            match = _IPV6.match(spec)
            if match is None:
                raise ValueError("an IPv6 address not written [address]:port")
            host, port = match[1], match[2]
        else:
            host, _, port = spec.partition(":")
        hosts.append((host, int(port) if port else None))
    return hosts


def port_list(value: Any) -> list[int]:
    """A ``port`` (an option's int or list, or a ``5432,6432`` string) as numbers; [] for none."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return [int(str(item)) for item in items]


def login_hosts(*, host: Any, dsn_hosts: Sequence[Written] | None, service: Service | None,
                env: Mapping[str, str]) -> list[Written]:
    """Each host a login tries, in order, with the port written with it. `host`: the option;
    `dsn_hosts`: the DSN's (one with no host name, only a port, names none)."""
    if host:
        return [(h, None) for h in ([host] if isinstance(host, str) else host)]
    if dsn_hosts and any(h for h, _ in dsn_hosts):
        return list(dsn_hosts)
    if service is not None and service.addresses:
        return list(service.addresses)
    if env.get("PGHOST"):
        return host_list(env["PGHOST"])
    return [("", None)]


def login_addresses(*, host: Any, port: Any, dsn_hosts: Sequence[Written] | None,
                    service: Service | None, env: Mapping[str, str]) -> list[tuple[str, int]]:
    """Each (host, port) a login tries, in order (`login_hosts`; `port`: the option).
    ValueError where asyncpg would fail (ports that match neither one nor every host)."""
    named = login_hosts(host=host, dsn_hosts=dsn_hosts, service=service, env=env)
    ports = port_list(port)
    if not ports and not (dsn_hosts and any(h for h, _ in dsn_hosts)):
        # The DSN's port without a host; else the service's, which asyncpg reads beside the
        # host option and PGHOST too (not beside the DSN's hosts, which set the ports first).
        ports = [p for _, p in dsn_hosts or () if p is not None][:1]
        if not ports and service is not None and service.port:
            ports = port_list(service.port)
    if not ports:
        defaults = _per_host(port_list(env.get("PGPORT")) or [DEFAULT_PORT], len(named))
        return [(h, defaults[i] if p is None else p) for i, (h, p) in enumerate(named)]
    return list(zip([h for h, _ in named], _per_host(ports, len(named)), strict=True))


def _per_host(ports: list[int], count: int) -> list[int]:
    if len(ports) == 1:
        return ports * count
    if len(ports) != count:
        raise ValueError(f"{len(ports)} ports for {count} hosts")
    return ports
