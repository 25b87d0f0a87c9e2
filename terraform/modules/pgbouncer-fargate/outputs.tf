output "endpoint" {
  description = "Host name clients connect to (dns_name when set, else the load balancer's)."
  value       = local.endpoint
}

output "port" {
  description = "Port clients connect to."
  value       = var.listen_port
}

output "user" {
  description = "PostgreSQL user to log in as (password: db_credentials_secret_arn)."
  value       = var.db_username
}

output "region" {
  description = "Region of the service and its secrets."
  value       = local.region
}

output "security_group_id" {
  description = "Security group of the load balancer (clients need egress to it on port)."
  value       = aws_security_group.lb.id
}

output "credentials_secret_arn" {
  description = "Secret the client reads its password from (asyncpool SecretsManagerAuth)."
  value       = var.db_credentials_secret_arn
}

output "service_name" {
  description = "ECS service running PgBouncer."
  value       = aws_ecs_service.this.name
}

output "cluster_name" {
  description = "ECS cluster of the service."
  value       = aws_ecs_cluster.this.name
}

output "per_task_pool_size" {
  description = "default_pool_size and max_db_connections of each task."
  value       = local.per_task_pool
}

output "max_server_connections" {
  description = "Most connections the service opens to PostgreSQL (per-task pool x max_tasks)."
  value       = local.per_task_pool * var.max_tasks
}

output "min_client_capacity" {
  description = "Client connections accepted with min_tasks running (max_client_conn x min_tasks)."
  value       = local.max_client_conn * var.min_tasks
}

output "asyncpool_settings" {
  description = "asyncpool settings that fit this PgBouncer (ASYNCPOOL_* environment variables); the password comes from credentials_secret_arn."
  value = {
    # PgBouncer >= 1.21 with max_prepared_statements tracks named statements: one round trip per
    # cached query.
    ASYNCPOOL_PREPARED_STATEMENTS = "on"
    # The certificate comes from your CA: ship its PEM with the function (ASYNCPOOL_SSL_ROOT_CERT).
    ASYNCPOOL_SSL = "verify-full"
  }
}
