"""Whether the AWS credentials a new session would read may differ from an earlier session's."""

from __future__ import annotations

import hashlib
import os

# What botocore's default chain reads credentials from, besides the network (IMDS, ECS): the
# environment's keys, which profile and files, web identity and container settings, and the two
# files it reads last (the EC2 tools' and boto 2's).
_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_EC2_METADATA_DISABLED", "AWS_CREDENTIAL_FILE",
    "BOTO_CONFIG",
)


def credentials_fingerprint() -> str:
    """A digest of the credential settings in the environment and of the size and modification
    time of the files credentials are read from: equal digests, same credentials for a new
    session.

    A digest, not the values: whoever reads it (a debugger, a crash report) learns no key."""
    digest = hashlib.sha256()
    for name in _VARIABLES:
        value = os.environ.get(name)
        digest.update(b"\0" if value is None else b"\1" + value.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    for path in _credential_files():
        try:
            info = os.stat(path)
        except OSError:
            digest.update(b"-")
        else:
            digest.update(f"{info.st_mtime_ns}:{info.st_size}:{info.st_ino}".encode())
    return digest.hexdigest()


def _credential_files() -> list[str]:
    """The files botocore's default chain may read keys from, as it finds them."""
    environ = os.environ
    paths = [environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
             environ.get("AWS_CONFIG_FILE") or "~/.aws/config"]
    if "AWS_CREDENTIAL_FILE" in environ:  # (read only when set)
        paths.append(environ["AWS_CREDENTIAL_FILE"])
    paths += [environ["BOTO_CONFIG"]] if "BOTO_CONFIG" in environ else ["/etc/boto.cfg", "~/.boto"]
    return [os.path.expanduser(path) for path in paths]
