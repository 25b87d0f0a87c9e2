"""Whether the AWS credentials a new session would read may differ from an earlier session's."""

from __future__ import annotations

import hashlib
import os

# What botocore's default chain reads credentials from, besides the network (IMDS, ECS): the
# environment's keys, which profile and files, web identity and container settings.
_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_EC2_METADATA_DISABLED",
)


def credentials_fingerprint() -> str:
    """A digest of the credential settings in the environment and of the shared credentials and
    config files' size and modification time: equal digests, same credentials for a new session.

    A digest, not the values: whoever reads it (a debugger, a crash report) learns no key."""
    digest = hashlib.sha256()
    for name in _VARIABLES:
        value = os.environ.get(name)
        digest.update(b"\0" if value is None else b"\1" + value.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    for variable, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
                              ("AWS_CONFIG_FILE", "~/.aws/config")):
        path = os.path.expanduser(os.environ.get(variable) or default)
        try:
            info = os.stat(path)
        except OSError:
            digest.update(b"-")
        else:
            digest.update(f"{info.st_mtime_ns}:{info.st_size}:{info.st_ino}".encode())
    return digest.hexdigest()
