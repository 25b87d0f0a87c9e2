# What asyncpool needs to reach the database, whichever pooler was chosen.

output "endpoint" {
  description = "Pooler host name (the DSN host)."
  value       = local.pooler.endpoint
}

output "port" {
  description = "Pooler port."
  value       = local.pooler.port
}

output "user" {
  description = "PostgreSQL user the function logs in as."
  value       = local.pooler.user
}

output "region" {
  description = "Region (IAM tokens are signed for it)."
  value       = local.pooler.region
}

output "function_name" {
  description = "The Lambda function."
  value       = aws_lambda_function.this.function_name
}

output "function_environment" {
  description = "The asyncpool environment the function runs with."
  value       = local.function_environment
}
