"""What a new connection logs in with: a password, an RDS IAM token, a rotating secret.

The AWS providers (`iam`, `secrets_manager`) import aiobotocore; import them only when used.
"""

from asyncpool.credentials.provider import CredentialProvider, StaticPassword

__all__ = ["CredentialProvider", "StaticPassword"]
