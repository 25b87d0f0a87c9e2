output "endpoint" {
  description = "Host name clients connect to (asyncpool DSN host)."
  value       = aws_db_proxy.this.endpoint
}

output "port" {
  description = "Port clients connect to."
  value       = var.db_port
}

output "user" {
  description = "PostgreSQL user to log in as; the IAM token is generated for this user."
  value       = var.db_username
}

output "region" {
  description = "Region the IAM auth token must be signed for."
  value       = local.region
}

output "proxy_arn" {
  description = "ARN of the proxy."
  value       = aws_db_proxy.this.arn
}

output "proxy_resource_id" {
  description = "The proxy's prx-... id, as used in rds-db:connect resource ARNs."
  value       = local.proxy_resource_id
}

output "connect_policy_arn" {
  description = "IAM policy granting rds-db:connect as user on this proxy: attach it to the Lambda role."
  value       = aws_iam_policy.connect.arn
}

output "security_group_id" {
  description = "Security group of the proxy (clients need egress to it on port)."
  value       = aws_security_group.proxy.id
}

output "credentials_secret_arn" {
  description = "Secret holding the proxy's own login to PostgreSQL (username/password); clients never read it."
  value       = aws_secretsmanager_secret.db.arn
}

output "max_connections_percent" {
  description = "The pool size the proxy got, as a percentage of the database's max_connections."
  value       = local.max_connections_percent
}

output "asyncpool_settings" {
  description = "asyncpool settings that fit this proxy (ASYNCPOOL_* environment variables); credentials are an IamAuth provider for user in region."
  value = {
    # RDS Proxy does not track named prepared statements across its backend connections:
    # unnamed (unnamed statements, one round trip) or off, never on.
    ASYNCPOOL_PREPARED_STATEMENTS = "unnamed"
    # IAM tokens need TLS; the proxy's certificate chains to Amazon's root CAs (system trust store).
    ASYNCPOOL_SSL = "verify-full"
  }
}
