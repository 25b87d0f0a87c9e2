"""What asyncpool knows about the pooler in front of the server, from its address alone."""

from __future__ import annotations

import re

#: RDS Proxy endpoints: ``<name>.proxy-<id>.<region>.rds.amazonaws.com``.
RDS_PROXY_HOST = re.compile(r"\.proxy-[a-z0-9]+\.[a-z0-9-]+\.rds\.amazonaws\.com$", re.I)


def is_rds_proxy(host: str) -> bool:
    """True for an RDS Proxy endpoint (which sends no BackendKeyData: nothing can be cancelled)."""
    return bool(RDS_PROXY_HOST.search(host or ""))
